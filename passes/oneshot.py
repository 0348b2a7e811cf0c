"""Shared plumbing of the calibrated one-shot passes (Wanda, SparseGPT): config and driver."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from calibrate.runner import LayerwiseRunner, resolve_compute_dtype
from calibrate.stats import Collector
from passes.base import DataFacts, LayerChange, OptionError, Pass, PassContext, PassResult, SparsityTarget
from passes.permute import permute_block
from passes.reconstruct import BlockData, reconstruct_masked, residual_module, residual_targets
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
    """Per-layer sparsity at the same overall sparsity (unstructured only): 'uniform', 'owl' (per
    block, from outlier ratios) or 'sensitivity' (per linear or block, from estimated loss curves)."""
    owl_lambda: float = 0.08
    """OWL: block sparsities spread over at most 2 × lambda around the target."""
    owl_m: float = 5.0
    """OWL: a Wanda score is an outlier above m × the block's mean score."""
    sensitivity_measure: str = "loss"
    """Sensitivity: how a layer's cost of a sparsity is estimated: 'loss' (the model's calibration
    loss measured with only that block — or input group — pruned, at ``sensitivity_points`` sparsities), 'relative'
    (the layer's OBS/diagonal output error over its output energy) or 'hutchinson' (that output
    error × the loss Hessian's trace over the layer's own)."""
    sensitivity_unit: str = "block"
    """Sensitivity: one sparsity per block ('block'), per group of linears sharing one input ('input':
    q/k/v, o, gate/up, down — with 'loss', each group's own Δloss after the pass's own solver) or per
    linear ('matrix'; not with 'loss')."""
    sensitivity_points: int = 3
    """Sensitivity with 'loss': candidate sparsities per block, evenly spread over the bounds."""
    sensitivity_windows: int = 2
    """Sensitivity with 'loss': calibration windows the loss is measured on (the first ones)."""
    sensitivity_deviation: float = 0.1
    """Sensitivity: each unit's sparsity stays within target ± this (and inside [0, 0.99])."""
    sensitivity_bounds: list[float] | None = None
    """Sensitivity: absolute [low, high] sparsity bounds instead of the deviation."""
    sensitivity_resolve: bool = True
    """Sensitivity: re-solve the allocation before every block with that block's curve measured
    on the outputs of the already pruned blocks (False: keep the dense-model plan)."""
    hutchinson_samples: int = 8
    """Sensitivity with 'hutchinson' scale: Rademacher vectors (Hessian-vector products)."""
    hutchinson_windows: int = 2
    """Sensitivity with 'hutchinson' scale: calibration windows in the loss whose Hessian is traced."""
    permute: bool = False
    """N:M only: before each block is pruned, reorder the inputs of its down and o linears so the
    pattern keeps more of their importance, folded into gate/up and v (the model's function is
    unchanged). See :mod:`passes.permute`."""
    reconstruct: str = "none"
    """After each block is pruned, train its kept weights (masks fixed) towards the dense model's
    activations: 'block' (all its linears on the block output), 'sublayer' (attention on the residual
    after attention, then the MLP on the block output) or 'none'. See :mod:`passes.reconstruct`."""
    reconstruct_steps: int = 16
    """Reconstruction: Adam steps per block (per sub-layer with 'sublayer'), one runner batch each."""
    reconstruct_lr: float = 1e-3
    """Reconstruction: peak learning rate (10 % warm-up, cosine decay); chosen on the held-out
    calibration batches of blocks 0–5 (1e-4 / 3e-4 / 1e-3 → held-out block error × 0.955 / 0.927 /
    0.881 for Wanda 2:4, benchmarks/results/reconstruct_option_search.json), never on an evaluation text."""
    reconstruct_holdout: int = 2
    """Reconstruction: the last runner batches, never trained on; a block whose error there grows is undone."""

    def __post_init__(self) -> None:
        super().__post_init__()
        from passes.reconstruct import MODES

        if self.permute and self.nm is None:
            raise ValueError("permute reorders inputs for an N:M pattern; it needs 'pattern', not 'sparsity'")
        if self.reconstruct not in MODES:
            raise ValueError(f"reconstruct '{self.reconstruct}' is not one of {', '.join(MODES)}")
        if not 1 <= self.reconstruct_steps <= 100_000:
            raise ValueError(f"reconstruct_steps {self.reconstruct_steps} is outside [1, 100000]")
        if not 0 < self.reconstruct_lr < 1:
            raise ValueError(f"reconstruct_lr {self.reconstruct_lr} is outside (0, 1)")
        if not 1 <= self.reconstruct_holdout <= 64:
            raise ValueError(f"reconstruct_holdout {self.reconstruct_holdout} is outside [1, 64]")
        from passes.allocation import ALLOCATIONS

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
        if self.allocation == "sensitivity":
            self._check_sensitivity()
        if not 1 <= self.batch_size <= 1024:
            raise ValueError(f"batch_size {self.batch_size} is outside [1, 1024]")
        if self.calibration_dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"calibration_dtype '{self.calibration_dtype}' is not one of auto, float32, bfloat16")

    def _check_sensitivity(self) -> None:
        if self.sensitivity_unit not in ("matrix", "block", "input"):
            raise ValueError(f"sensitivity_unit '{self.sensitivity_unit}' is not one of block, input, matrix")
        if self.sensitivity_measure not in ("loss", "relative", "hutchinson"):
            raise ValueError(f"sensitivity_measure '{self.sensitivity_measure}' is not one of loss, relative, hutchinson")
        if self.sensitivity_measure == "loss" and self.sensitivity_unit == "matrix":
            raise ValueError("sensitivity_measure 'loss' prunes whole blocks or the linears of one input together; it needs sensitivity_unit 'block' or 'input'")
        if not 2 <= self.sensitivity_points <= 20:
            raise ValueError(f"sensitivity_points {self.sensitivity_points} is outside [2, 20]")
        if not 1 <= self.sensitivity_windows <= 64:
            raise ValueError(f"sensitivity_windows {self.sensitivity_windows} is outside [1, 64]")
        if not 0.0 <= self.sensitivity_deviation <= 0.5:
            raise ValueError(f"sensitivity_deviation {self.sensitivity_deviation} is outside [0, 0.5]")
        if self.sensitivity_bounds is not None:
            b = self.sensitivity_bounds
            if not (isinstance(b, (list, tuple)) and len(b) == 2 and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in b)):
                raise ValueError(f"sensitivity_bounds {b!r} must be a list of two numbers [low, high]")
            if not 0.0 <= b[0] <= self.sparsity <= b[1] < 1.0:
                raise ValueError(f"sensitivity_bounds {list(b)} must satisfy 0 <= low <= sparsity ({self.sparsity}) <= high < 1")
        if not 1 <= self.hutchinson_samples <= 1000:
            raise ValueError(f"hutchinson_samples {self.hutchinson_samples} is outside [1, 1000]")
        if not 1 <= self.hutchinson_windows <= 64:
            raise ValueError(f"hutchinson_windows {self.hutchinson_windows} is outside [1, 64]")

    def sparsity_range(self) -> tuple[float, float]:
        """Each unit's sparsity bounds under sensitivity allocation."""
        if self.sensitivity_bounds is not None:
            return float(self.sensitivity_bounds[0]), float(self.sensitivity_bounds[1])
        s, d = self.sparsity, self.sensitivity_deviation
        return max(0.0, s - d), min(0.99, s + d)


PruneFn = Callable[[list[LinearRef], Collector, "float | list[float] | None"], dict]
"""Prunes, in place, the linears that share one collector (one input) to the given unstructured
sparsity — one for all, or one per linear — (None with an N:M pattern); returns facts for the result."""

SaliencyFn = Callable[[list[torch.Tensor], Collector], "tuple[list[torch.Tensor], torch.Tensor, str]"]
"""For the weights (out × in) that share one collector: each one's per-weight error estimate, the
input Hessian's diagonal, and the selection scope ('matrix' or 'row'); see calibrate.sensitivity."""


def check_reconstruct_batches(cfg: OneShotConfig, windows: int) -> None:
    """Reconstruction needs more runner batches than it holds out."""
    if cfg.reconstruct == "none":
        return
    batches = -(-windows // cfg.batch_size)
    if batches <= cfg.reconstruct_holdout:
        raise OptionError(
            "reconstruct_holdout",
            f"{windows} calibration windows make {batches} batches of {cfg.batch_size}; holding out {cfg.reconstruct_holdout} "
            "leaves none to reconstruct on (more windows, a smaller batch_size or a smaller reconstruct_holdout)",
        )


def _stream_refusal(name: str, cfg: OneShotConfig) -> str | None:
    """Why the one-shot driver cannot run ``cfg`` block-streamed; None when it can."""
    if cfg.allocation == "sensitivity" and cfg.sensitivity_measure != "relative":
        return (
            f"pass '{name}' with sensitivity_measure '{cfg.sensitivity_measure}' measures the loss through the "
            "whole model (every later block at once); block-streamed, sensitivity allocation needs sensitivity_measure 'relative'"
        )
    return None


class OneShotPass(Pass):
    """Base of the calibrated one-shot passes: their shared checks before a build."""

    streams = True

    @classmethod
    def stream_refusal(cls, config: Any) -> str | None:
        return _stream_refusal(cls.name, config) or super().stream_refusal(config)

    @classmethod
    def check(cls, config: Any, model: Any, data: DataFacts) -> None:
        super().check(config, model, data)
        check_reconstruct_batches(config, data.calibration_windows)


def run_oneshot(
    name: str,
    cfg: OneShotConfig,
    model: torch.nn.Module,
    ctx: PassContext,
    make_collector: Callable[[LinearRef], Collector],
    prune: PruneFn,
    saliency: SaliencyFn | None = None,
) -> PassResult:
    t0 = time.perf_counter()
    why = _stream_refusal(name, cfg) if ctx.stream is not None else None
    if why:
        raise ValueError(why)
    windows = ctx.calibration_windows(name)
    check_reconstruct_batches(cfg, int(windows.shape[0]))
    if cfg.reconstruct == "sublayer":
        residual_module(ctx.adapter, ctx.adapter.blocks(model)[0])  # refuses a family it cannot split, before any work
    result = PassResult(name, info={"pattern": cfg.pattern, "sparsity": cfg.sparsity, "calibration_windows": list(windows.shape)})
    recon_seconds = 0.0
    solver_seconds = 0.0
    dtype = resolve_compute_dtype(cfg.calibration_dtype)
    block_sparsity: dict[int, float] = {}
    planner = None
    if cfg.allocation == "owl":
        block_sparsity, result.info["allocation"] = _owl(cfg, model, ctx, windows, dtype)
    elif cfg.allocation == "sensitivity":
        if saliency is None:
            raise ValueError(f"pass '{name}' has no error estimate for sensitivity allocation")
        planner = _SensitivityPlanner.measure(cfg, model, ctx, windows, dtype, make_collector, saliency, prune)

    blocks_mod = ctx.adapter.blocks(model)
    head_dim = ctx.adapter.dims(model.config)["head_dim"] if cfg.permute else 0

    def apply(block: int, refs: list[LinearRef], collectors: dict[str, Collector]) -> None:
        nonlocal solver_seconds, recon_seconds
        residual = None
        if cfg.reconstruct == "sublayer" and refs:  # the dense stream's residual, while the block is still dense
            tr = time.perf_counter()
            residual = residual_targets(ctx.adapter, blocks_mod[block], runner.current_teacher_inputs)
            recon_seconds += time.perf_counter() - tr
        ts = time.perf_counter()
        if cfg.permute and refs:
            if saliency is None:
                raise ValueError(f"pass '{name}' has no importance score to permute inputs by")
            result.info.setdefault("permute", {})[str(block)] = permute_block(refs, collectors, saliency, cfg.nm, head_dim)
        planned = planner.decide(block, refs, collectors, runner.current_inputs) if planner is not None else None
        for group in by_collector(refs, collectors):
            sp = [planned[r.name] for r in group] if planned is not None else block_sparsity.get(block, cfg.sparsity)
            facts = prune(group, collectors[group[0].name], sp)
            if facts:
                result.info.setdefault("layers", {})["+".join(r.name for r in group)] = facts
        solver_seconds += time.perf_counter() - ts
        if cfg.reconstruct != "none" and refs:
            tr = time.perf_counter()
            data = BlockData(blocks_mod[block], runner.current_inputs, runner.current_targets, cfg.reconstruct_holdout)
            rec = reconstruct_masked(ctx.adapter, data, refs, cfg.reconstruct, cfg.reconstruct_steps, cfg.reconstruct_lr, residual)
            result.info.setdefault("reconstruct", {})[str(block)] = rec
            del data
            recon_seconds += time.perf_counter() - tr
            log.info("%s block %d: held-out block error %.4g → %.4g%s", name, block, rec["holdout_before"], rec["holdout_after"], " (undone)" if rec.get("undone") else "")
        for ref in refs:
            result.layers.append(LayerChange.of(ref))

    result.info["calibration_dtype"] = str(dtype).replace("torch.", "")

    def get_state() -> dict[str, Any]:  # what a resumed streamed sweep needs of the blocks already done
        return {"layers": [c.to_dict() for c in result.layers], "info": result.info, "solver_seconds": solver_seconds,
                "recon_seconds": recon_seconds, "done": planner.done if planner is not None else {}}

    def set_state(saved: dict[str, Any]) -> None:
        nonlocal solver_seconds, recon_seconds
        result.layers[:] = [LayerChange(**{**c, "shape": tuple(c["shape"])}) for c in saved["layers"]]
        result.info.update(saved["info"])
        solver_seconds, recon_seconds = saved["solver_seconds"], saved["recon_seconds"]
        if planner is not None:
            planner.done.update(saved["done"])

    runner = LayerwiseRunner(model, ctx.adapter, windows, batch_size=cfg.batch_size, show_progress=ctx.progress, compute_dtype=dtype, stream=ctx.stream)
    report = runner.run(make_collector, apply, roles=cfg.targets, blocks=cfg.blocks, teacher=cfg.reconstruct != "none", state=(get_state, set_state))
    if not result.layers:
        raise ValueError(f"pass '{name}': no linear matches targets {cfg.targets} and blocks {cfg.blocks}")
    if planner is not None:
        result.info["allocation"] = planner.summary()
    if cfg.reconstruct != "none":
        recs = result.info.get("reconstruct", {}).values()
        before = sum(r["holdout_before"] for r in recs)
        result.info["reconstruct_summary"] = {
            "mode": cfg.reconstruct, "steps": cfg.reconstruct_steps, "lr": cfg.reconstruct_lr,
            "holdout_error_ratio": round(sum(r["holdout_after"] if not r.get("undone") else r["holdout_before"] for r in recs) / max(before, 1e-30), 5),
            "blocks_undone": sum(1 for r in recs if r.get("undone")),
            "seconds": round(recon_seconds, 2),
        }
    result.seconds = time.perf_counter() - t0
    result.info["runner"] = report.to_dict()
    result.info["solver_seconds"] = round(solver_seconds, 2)
    log.info("%s: %d linears pruned in %.1f s (solver %.1f s)", name, len(result.layers), result.seconds, solver_seconds)
    return result


def measuring_sweep(model: torch.nn.Module, ctx: PassContext) -> tuple[torch.nn.Module, Any]:
    """The model a dense measuring sweep runs over, and its stream: ``model`` itself in memory; when the
    pass runs block-streamed, a read-only stream over the same source (its own skeleton), so the
    measurement reads each block from disk and the pruning sweep that follows writes them."""
    if ctx.stream is None:
        return model, None
    from core.streaming import BlockStream

    ro = BlockStream(ctx.stream.source, None)
    return ro.model, ro


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

    sweep_model, sweep_stream = measuring_sweep(model, ctx)
    runner = LayerwiseRunner(sweep_model, ctx.adapter, windows, batch_size=cfg.batch_size, show_progress=ctx.progress, compute_dtype=dtype, stream=sweep_stream)
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


class _SensitivityPlanner:
    """Sensitivity allocation (see :mod:`passes.allocation`). A dense calibration pass measures,
    per block, the cost curve of each unit: with ``loss``, the calibration loss with only that
    block pruned (by the pass's own solver, on the block's statistics) at a few sparsities; with
    ``relative``/``hutchinson``, every linear's output-error curve, scaled. :meth:`decide` then
    re-solves before each block of the pruning pass, the blocks already pruned fixed at what they
    got and the current block measured again on the inputs the pruned blocks produce."""

    def __init__(self, cfg: OneShotConfig, model, adapter, windows, saliency: SaliencyFn, prune: PruneFn):
        self.cfg = cfg
        self.model = model
        self.adapter = adapter
        self.loss_ids = windows[: cfg.sensitivity_windows].long()
        self.saliency = saliency
        self.prune = prune
        self.numel: dict[str, int] = {}  # linear name -> parameters
        self.block_of: dict[str, int] = {}
        self.curves: dict = {}  # linear name -> ErrorCurve on the dense model ('relative'/'hutchinson')
        self.unit_of: dict[str, str] = {}  # linear name -> its allocation unit
        self.unit_loss: dict[str, list[tuple[float, float]]] = {}  # unit -> measured (sparsity, Δloss), dense pass
        self.remeasured: dict[str, list[tuple[float, float]]] = {}  # the same on the pruned model's inputs
        self.traces: dict[str, float] | None = None
        self.tuple_out = False
        self.scale: dict[str, float] = {}
        self.done: dict[str, float] = {}
        self.seconds = 0.0

    @property
    def by_loss(self) -> bool:
        return self.cfg.sensitivity_measure == "loss"

    @classmethod
    def measure(cls, cfg, model, ctx, windows, dtype, make_collector, saliency, prune) -> "_SensitivityPlanner":
        from calibrate.sensitivity import hutchinson_traces

        t0 = time.perf_counter()
        self = cls(cfg, model, ctx.adapter, windows, saliency, prune)
        if cfg.sensitivity_measure == "hutchinson":
            self.traces = hutchinson_traces(model, ctx.adapter, windows[: cfg.hutchinson_windows], cfg.hutchinson_samples, roles=cfg.targets, show_progress=ctx.progress)
        sweep_model, sweep_stream = measuring_sweep(model, ctx)
        runner = LayerwiseRunner(sweep_model, ctx.adapter, windows, batch_size=cfg.batch_size, show_progress=ctx.progress, compute_dtype=dtype, stream=sweep_stream)

        def measure(block: int, refs: list[LinearRef], collectors: dict[str, Collector]) -> None:
            self.tuple_out = runner.tuple_out  # known once the runner captured block 0
            for r in refs:
                self.numel[r.name] = r.weight_out_in().numel()
                self.block_of[r.name] = block
            self.unit_of.update(self._units(block, refs, collectors))
            if self.by_loss:
                self.unit_loss.update(self._loss_points(block, refs, collectors, runner.current_inputs))
            else:
                self.curves.update(_curves(block, refs, collectors, saliency))

        runner.run(make_collector, measure, roles=cfg.targets, blocks=cfg.blocks)
        self.scale = {name: self._scale(c) for name, c in self.curves.items()}
        if self.traces is not None:
            pos = sorted(v for v in self.scale.values() if v > 0)
            floor = pos[len(pos) // 2] * 1e-3 if pos else 1.0
            bad = [n for n, v in self.scale.items() if v <= 0]
            if bad:
                log.warning("sensitivity: %d linears have a non-positive Hessian-trace estimate (%s...); floored at %.3g", len(bad), bad[0], floor)
            self.scale = {n: max(v, floor) for n, v in self.scale.items()}
        self.planned = self._solve({}, {}, {})
        self.seconds = time.perf_counter() - t0
        return self

    def _candidates(self) -> list[float]:
        lo, hi = self.cfg.sparsity_range()
        n = self.cfg.sensitivity_points
        return [lo + (hi - lo) * i / (n - 1) for i in range(n)]

    def _units(self, block: int, refs: list[LinearRef], collectors: dict[str, Collector]) -> dict[str, str]:
        """Linear name -> allocation unit: the block ('7'), the linears of one input ('7:q+k+v') or the linear."""
        unit = self.cfg.sensitivity_unit
        if unit == "matrix":
            return {r.name: r.name for r in refs}
        if unit == "block":
            return {r.name: str(block) for r in refs}
        return {r.name: f"{block}:" + "+".join(g.role for g in group) for group in by_collector(refs, collectors) for r in group}

    def _loss_points(self, block: int, refs: list[LinearRef], collectors: dict[str, Collector], inputs: list) -> dict[str, list[tuple[float, float]]]:
        """Per unit of this block, (sparsity, Δloss) with only that unit pruned (by the pass's own solver),
        on the block's held inputs for the first windows."""
        from calibrate.sensitivity import loss_from_block

        k = self.loss_ids.shape[0]
        held, rows = [], 0
        for b in inputs:  # the first k windows' inputs, without copying the rest
            if rows >= k:
                break
            held.append(b.hidden[: k - rows])
            rows += held[-1].shape[0]
        hidden = torch.cat(held, 0).float()
        base = loss_from_block(self.model, self.adapter, block, hidden, self.loss_ids, self.tuple_out)
        units: dict[str, list[list[LinearRef]]] = {}
        for group in by_collector(refs, collectors):
            units.setdefault(self.unit_of[group[0].name], []).append(group)
        out: dict[str, list[tuple[float, float]]] = {}
        for unit, groups in units.items():
            members = [r for g in groups for r in g]
            saved = [r.weight_out_in().clone() for r in members]
            points = []
            for s in self._candidates():
                try:
                    for group in groups:
                        self.prune(group, collectors[group[0].name], s)
                    points.append((s, loss_from_block(self.model, self.adapter, block, hidden, self.loss_ids, self.tuple_out) - base))
                finally:
                    for r, w in zip(members, saved):
                        r.weight_out_in().copy_(w)
            log.info("sensitivity: %s Δloss %s", unit if ":" in unit else f"block {unit}", ", ".join(f"{s:.2f}: {d:+.4f}" for s, d in points))
            out[unit] = points
        return out

    def _scale(self, c) -> float:
        if self.traces is None:
            return 1.0 / c.energy if c.energy > 0 else 0.0
        denom = c.rows * c.trace_h
        return 0.5 * self.traces[c.name] / denom if denom > 0 else 0.0

    @staticmethod
    def _loss_curve(points: list[tuple[float, float]]) -> list[float]:
        """Δloss on the curve grid: linear through (0, 0) and the measured points, extended with the last slope."""
        from calibrate.sensitivity import GRID

        pts = [(0.0, 0.0), *sorted(points)]
        out = []
        for k in range(GRID + 1):
            x = k / GRID
            i = next((j for j in range(1, len(pts)) if pts[j][0] >= x), len(pts) - 1)
            (x0, y0), (x1, y1) = pts[i - 1], pts[i]
            out.append(y0 + (x - x0) * (y1 - y0) / (x1 - x0) if x1 > x0 else y1)
        return out

    def _solve(self, fresh: dict, fresh_loss: dict[int, list[tuple[float, float]]], fixed: dict[str, float]) -> dict[str, float]:
        """Sparsity per linear: ``fixed`` ones kept, ``fresh`` measurements replacing the dense ones."""
        from passes.allocation import allocate

        lo, hi = self.cfg.sparsity_range()
        units: dict[str, list[str]] = {}
        for name, block in self.block_of.items():
            units.setdefault(self.unit_of[name], []).append(name)
        curves, sizes, los, his = [], [], [], []
        for names in units.values():
            if self.by_loss:
                unit = self.unit_of[names[0]]
                curves.append(self._loss_curve(fresh_loss.get(unit, self.unit_loss[unit])))
            else:
                # a fresh curve keeps the dense Hutchinson factor; the relative scale follows its own energy
                scaled = [fresh.get(n, self.curves[n]).curve * (self.scale[n] if self.traces is not None else self._scale(fresh.get(n, self.curves[n]))) for n in names]
                curves.append(torch.stack(scaled).sum(0).tolist())
            sizes.append(sum(self.numel[n] for n in names))
            if all(n in fixed for n in names):
                s = sum(fixed[n] * self.numel[n] for n in names) / sizes[-1]
                los.append(s)
                his.append(s)
            else:
                los.append(lo)
                his.append(hi)
        sp = allocate(curves, sizes, self.cfg.sparsity, los, his)
        return {n: fixed.get(n, s) for names, s in zip(units.values(), sp) for n in names}

    def decide(self, block: int, refs: list[LinearRef], collectors: dict[str, Collector], inputs: list) -> dict[str, float]:
        if not self.cfg.sensitivity_resolve:
            plan = self.planned
        elif self.by_loss:
            fresh_loss = self._loss_points(block, refs, collectors, inputs)
            self.remeasured.update(fresh_loss)
            plan = self._solve({}, fresh_loss, self.done)
        else:
            plan = self._solve(_curves(block, refs, collectors, self.saliency), {}, self.done)
        for r in refs:
            self.done[r.name] = plan[r.name]
        log.info("sensitivity: block %d sparsities %.3f..%.3f", block, min(plan[r.name] for r in refs), max(plan[r.name] for r in refs))
        return {r.name: plan[r.name] for r in refs}

    def summary(self) -> dict:
        blocks: dict[int, list[str]] = {}
        for n, b in self.block_of.items():
            blocks.setdefault(b, []).append(n)

        def weighted(sp: dict[str, float], names) -> float:
            return round(sum(sp[n] * self.numel[n] for n in names) / sum(self.numel[n] for n in names), 6)

        lo, hi = self.cfg.sparsity_range()
        info = {
            "method": "sensitivity",
            "measure": self.cfg.sensitivity_measure,
            "unit": self.cfg.sensitivity_unit,
            "bounds": [round(lo, 6), round(hi, 6)],
            "resolve": self.cfg.sensitivity_resolve,
            "target": self.cfg.sparsity,
            "allocated_sparsity": weighted(self.done, list(self.done)),
            "block_sparsity": {str(b): weighted(self.done, ns) for b, ns in sorted(blocks.items())},
            "planned_block_sparsity": {str(b): weighted(self.planned, ns) for b, ns in sorted(blocks.items())},
            "matrix_sparsity": {n: round(s, 6) for n, s in self.done.items()},
            "seconds_measuring": round(self.seconds, 2),
        }
        if self.unit_loss:
            info["delta_loss_dense"] = {u: [[round(s, 4), round(d, 6)] for s, d in pts] for u, pts in self.unit_loss.items()}
        if self.remeasured:
            info["delta_loss_pruned_inputs"] = {u: [[round(s, 4), round(d, 6)] for s, d in pts] for u, pts in self.remeasured.items()}
        if self.traces is not None:
            info["hessian_trace"] = {n: float(f"{t:.6g}") for n, t in self.traces.items()}
        return info


def by_collector(refs: list[LinearRef], collectors: dict[str, Collector]) -> list[list[LinearRef]]:
    """The linears grouped by the collector (the input) they share, e.g. q/k/v, gate/up."""
    groups: dict[int, list[LinearRef]] = {}
    for ref in refs:
        groups.setdefault(id(collectors[ref.name]), []).append(ref)
    return list(groups.values())


def _curves(block: int, refs: list[LinearRef], collectors: dict[str, Collector], saliency: SaliencyFn) -> dict:
    """Error curves of a block's target linears from their collectors (one factorisation per shared input)."""
    from calibrate.sensitivity import error_curve

    out = {}
    for group in by_collector(refs, collectors):
        ws = [r.weight_out_in() for r in group]
        sals, h_diag, scope = saliency(ws, collectors[group[0].name])
        for r, w, sal in zip(group, ws, sals):
            out[r.name] = error_curve(r.name, block, r.role, w, sal, h_diag, scope)
    return out
