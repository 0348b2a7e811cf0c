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
    allocation: str = "uniform"
    """Per-block sparsity at the same overall sparsity: 'uniform' or 'owl' (unstructured only)."""
    owl_lambda: float = 0.08
    """OWL: block sparsities spread over at most 2 × lambda around the target."""
    owl_m: float = 5.0
    """OWL: a Wanda score is an outlier above m × the block's mean score."""

    def __post_init__(self) -> None:
        super().__post_init__()
        from passes.allocation import ALLOCATIONS

        if self.allocation == "sensitivity":
            raise ValueError("allocation 'sensitivity' (Hessian-based mixed sparsity) is not built yet; use uniform or owl")
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"allocation '{self.allocation}' is not one of {', '.join(ALLOCATIONS)}")
        if self.allocation != "uniform" and self.sparsity is None:
            raise ValueError(f"allocation '{self.allocation}' mixes unstructured sparsities; it needs 'sparsity', not 'pattern'")
        if self.allocation == "owl":
            s = self.sparsity
            limit = min(s, 1 - s) / 2  # the span is up to 2λ on one side of the target
            if not 0 <= self.owl_lambda <= limit:
                raise ValueError(f"owl_lambda {self.owl_lambda} is outside [0, {limit:g}] for sparsity {s}")
            if self.owl_m <= 0:
                raise ValueError(f"owl_m {self.owl_m} must be positive")
        if not 1 <= self.batch_size <= 1024:
            raise ValueError(f"batch_size {self.batch_size} is outside [1, 1024]")
        if self.calibration_dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"calibration_dtype '{self.calibration_dtype}' is not one of auto, float32, bfloat16")


PruneFn = Callable[[list[LinearRef], Collector, "float | None"], dict]
"""Prunes, in place, the linears that share one collector (one input) to the given unstructured
sparsity (None with an N:M pattern); returns facts for the result."""


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
    dtype = resolve_compute_dtype(cfg.calibration_dtype)
    block_sparsity: dict[int, float] = {}
    if cfg.allocation == "owl":
        block_sparsity, result.info["allocation"] = _owl(cfg, model, ctx, windows, dtype)

    def apply(block: int, refs: list[LinearRef], collectors: dict[str, Collector]) -> None:
        nonlocal solver_seconds
        ts = time.perf_counter()
        groups: dict[int, list[LinearRef]] = {}
        for ref in refs:
            groups.setdefault(id(collectors[ref.name]), []).append(ref)
        for group in groups.values():
            facts = prune(group, collectors[group[0].name], block_sparsity.get(block, cfg.sparsity))
            if facts:
                result.info.setdefault("layers", {})["+".join(r.name for r in group)] = facts
        for ref in refs:
            result.layers.append(LayerChange.of(ref))
        solver_seconds += time.perf_counter() - ts

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


def _owl(cfg: OneShotConfig, model: torch.nn.Module, ctx: PassContext, windows: torch.Tensor, dtype: torch.dtype) -> tuple[dict[int, float], dict]:
    """OWL's dense calibration pass: per block, the outlier ratio of its Wanda scores; then the
    block sparsities (see :mod:`passes.allocation`). The weights are not changed here."""
    from calibrate.stats import InputNormCollector
    from passes.allocation import outlier_ratio, owl_sparsities

    t0 = time.perf_counter()
    lod: dict[int, float] = {}
    sizes: dict[int, int] = {}

    def measure(block: int, refs: list[LinearRef], collectors: dict[str, Collector]) -> None:
        scores = [ref.weight_out_in().abs().float() * collectors[ref.name].norms().float()[None, :] for ref in refs]
        lod[block] = outlier_ratio(scores, cfg.owl_m)
        sizes[block] = sum(s.numel() for s in scores)

    runner = LayerwiseRunner(model, ctx.adapter, windows, batch_size=cfg.batch_size, show_progress=ctx.progress, compute_dtype=dtype)
    runner.run(lambda ref: InputNormCollector(ref.in_features), measure, roles=cfg.targets, blocks=cfg.blocks)
    blocks = sorted(lod)
    sp = owl_sparsities([lod[b] for b in blocks], cfg.sparsity, cfg.owl_lambda, [sizes[b] for b in blocks])
    info = {
        "method": "owl",
        "lambda": cfg.owl_lambda,
        "m": cfg.owl_m,
        "outlier_ratio": {str(b): round(lod[b], 6) for b in blocks},
        "block_sparsity": {str(b): round(s, 6) for b, s in zip(blocks, sp)},
        "seconds": round(time.perf_counter() - t0, 2),
    }
    log.info("owl: block sparsities %.3f..%.3f (target %.3f) from outlier ratios in %.1f s", min(sp), max(sp), cfg.sparsity, info["seconds"])
    return dict(zip(blocks, sp)), info
