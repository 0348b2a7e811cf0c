"""Parse TensorRT's verbose build log for its 2:4 sparsity decisions.

TensorRT (trtexec, or the Python API with a VERBOSE/INFO logger) prints two lines
when ``BuilderFlag.SPARSE_WEIGHTS`` is set::

    (Sparsity) Layers eligible for sparse math: <layer>, <layer>, ...
    (Sparsity) TRT inference plan picked sparse implementation for layers: <layer>, ...

whatever the prefix (``[08/05/2024-12:06:54] [I] [TRT] `` from trtexec,
``[TensorRT] INFO: `` from older Python loggers, nothing from ours). Fused layers
appear as ``Conv_619 + Relu_620``. Eligible-but-not-picked layers are those
where TensorRT timed a dense kernel faster.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

_ELIGIBLE = re.compile(r"\(Sparsity\) Layers eligible for sparse math:(.*)$")
_PICKED = re.compile(r"\(Sparsity\) TRT inference plan picked sparse implementation for layers:(.*)$")


@dataclass
class SparsityLog:
    eligible: list[str] = field(default_factory=list)
    picked: list[str] = field(default_factory=list)
    seen: bool = False
    """Whether the log held the sparsity lines at all (absent: sparsity was not enabled, or the log was not verbose)."""

    @property
    def eligible_not_picked(self) -> list[str]:
        picked = set(self.picked)
        return [layer for layer in self.eligible if layer not in picked]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"eligible_not_picked": self.eligible_not_picked}


def _layers(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def parse_sparsity_log(lines: Iterable[str]) -> SparsityLog:
    out = SparsityLog()
    for line in lines:
        line = line.rstrip("\n")
        if m := _ELIGIBLE.search(line):
            out.eligible.extend(_layers(m.group(1)))
            out.seen = True
        elif m := _PICKED.search(line):
            out.picked.extend(_layers(m.group(1)))
            out.seen = True
    return out
