"""Shared plumbing of the calibrated one-shot passes (Wanda, SparseGPT): config and driver."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

import torch

from calibrate.runner import LayerwiseRunner, resolve_compute_dtype
from calibrate.stats import Collector
from passes.base import LayerChange, PassContext, PassResult, SparsityTarget
from core.adapters.base import LinearRef

log = logging.getLogger(__name__)


@dataclass
class OneShotConfig(SparsityTarget):
    batch_size: int = 8
    """Calibration windows per forward pass of a block."""
    calibration_dtype: str = "auto"
    """Precision of the calibration forward passes: 'float32', 'bfloat16', or 'auto' (bfloat16 on CPUs
    with AVX512-BF16/AMX, else float32). Statistics are accumulated in float32/float64 and the solver
    runs in float32 on the float32 weights either way (the reference implementations calibrate in fp16)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 1 <= self.batch_size <= 1024:
            raise ValueError(f"batch_size {self.batch_size} is outside [1, 1024]")
        if self.calibration_dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"calibration_dtype '{self.calibration_dtype}' is not one of auto, float32, bfloat16")


PruneFn = Callable[[list[LinearRef], Collector], dict]
"""Prunes, in place, the linears that share one collector (one input); returns facts for the result."""


def run_oneshot(
    name: str,
    cfg: OneShotConfig,
    model: torch.nn.Module,
    ctx: PassContext,
    make_collector: Callable[[LinearRef], Collector],
    prune: PruneFn,
) -> PassResult:
    if ctx.calibration is None:
        raise ValueError(f"pass '{name}' needs calibration data, and the context has none")
    t0 = time.perf_counter()
    windows = ctx.calibration()
    result = PassResult(name, info={"pattern": cfg.pattern, "sparsity": cfg.sparsity, "calibration_windows": list(windows.shape)})
    solver_seconds = 0.0

    def apply(block: int, refs: list[LinearRef], collectors: dict[str, Collector]) -> None:
        nonlocal solver_seconds
        ts = time.perf_counter()
        groups: dict[int, list[LinearRef]] = {}
        for ref in refs:
            groups.setdefault(id(collectors[ref.name]), []).append(ref)
        for group in groups.values():
            facts = prune(group, collectors[group[0].name])
            if facts:
                result.info.setdefault("layers", {})["+".join(r.name for r in group)] = facts
        for ref in refs:
            result.layers.append(LayerChange.of(ref))
        solver_seconds += time.perf_counter() - ts

    dtype = resolve_compute_dtype(cfg.calibration_dtype)
    result.info["calibration_dtype"] = str(dtype).replace("torch.", "")
    runner = LayerwiseRunner(model, ctx.adapter, windows, batch_size=cfg.batch_size, show_progress=ctx.progress, compute_dtype=dtype)
    report = runner.run(make_collector, apply, roles=cfg.targets, blocks=cfg.blocks)
    if not result.layers:
        raise ValueError(f"pass '{name}': no linear matches targets {cfg.targets} and blocks {cfg.blocks}")
    result.seconds = time.perf_counter() - t0
    result.info["runner"] = report.to_dict()
    result.info["solver_seconds"] = round(solver_seconds, 2)
    log.info("%s: %d linears pruned in %.1f s (solver %.1f s)", name, len(result.layers), result.seconds, solver_seconds)
    return result
