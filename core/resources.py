"""What this process has used (no heavy imports: the build records it after every stage)."""

from __future__ import annotations

from pathlib import Path


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
