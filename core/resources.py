"""What this process has used (no heavy imports: the build records it after every stage)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any


def peak_rss_bytes(field: str = "VmHWM") -> int | None:
    """This process's peak resident set (``VmHWM``; ``VmPeak``: peak address space) in bytes; None where
    /proc is not there."""
    try:
        for line in Path("/proc/self/status").read_text(encoding="ascii").splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


def _cpu_jiffies() -> tuple[int, int] | None:
    """(busy, total) clock ticks of all CPUs since boot from /proc/stat's first line; None where it is not
    there. Busy: user, nice, system, irq, softirq and steal (time another guest held a CPU of this one)."""
    try:
        fields = Path("/proc/stat").read_text(encoding="ascii").splitlines()[0].split()
    except (OSError, IndexError):
        return None
    if not fields or fields[0] != "cpu" or len(fields) < 9:
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = (int(x) for x in fields[1:9])
    busy = user + nice + system + irq + softirq + steal
    return busy, busy + idle + iowait


BUSY_HOST_SHARE = 0.1
"""Above this share of the machine's CPU time held by anything else while a stage's timed rounds ran,
the stage warns and the report flags its ratios."""


class HostLoad:
    """How much of the machine's CPU time went to anything but this process while a timed block ran
    (other processes, and steal: a hypervisor giving this guest's CPU to another): ``start()`` and
    ``stop()`` around the block, then ``others_share`` = (all CPUs' busy time − this process's CPU
    time) / all CPUs' time. Timing ratios taken while others held a real share of the cores are
    skewed, unevenly between what is compared. None where /proc/stat is not there. In a container,
    /proc/stat may count the whole host's CPUs: then load on cores this build does not use counts too
    (a warning that errs towards caution)."""

    def __init__(self) -> None:
        self._start: tuple[tuple[int, int], float] | None = None
        self.others_share: float | None = None

    @staticmethod
    def _own_seconds() -> float:
        t = os.times()
        return t.user + t.system

    def start(self) -> "HostLoad":
        j = _cpu_jiffies()
        self._start = (j, self._own_seconds()) if j else None
        return self

    @property
    def busy(self) -> bool:
        """Whether the last ``stop()`` found others above :data:`BUSY_HOST_SHARE`."""
        return self.others_share is not None and self.others_share > BUSY_HOST_SHARE

    def record(self) -> dict[str, Any]:
        """The measurement for a stage's JSON: ``host_others_cpu_share`` and ``host_busy`` (empty when none)."""
        if self.others_share is None:
            return {}
        return {"host_others_cpu_share": round(self.others_share, 4), "host_busy": self.busy}

    def stop(self, what: str = "timing") -> float | None:
        """End the block; logs a warning naming ``what`` was timed when the host was busy."""
        j = _cpu_jiffies()
        if self._start is None or j is None:
            return None
        (busy0, total0), own0 = self._start
        ticks = os.sysconf("SC_CLK_TCK")
        total = (j[1] - total0) / ticks
        if total <= 0:
            return None
        others = (j[0] - busy0) / ticks - (self._own_seconds() - own0)
        self.others_share = max(0.0, min(1.0, others / total))
        if self.busy:
            logging.getLogger(__name__).warning(
                "%s: other processes (or the hypervisor) held %.0f%% of this machine's CPU time while the rounds ran; the ratios may be "
                "skewed, unevenly between what was compared", what, 100 * self.others_share)
        return self.others_share
