"""SDS, sparse → dense → sparse (Li et al., "Enhancing One-shot Pruned Pre-trained Language Models
through Sparse-Dense-Sparse Mechanism", arXiv 2408.10473, COLING 2025), block by block.

For each transformer block, on the calibration runner's inputs (the outputs of the already
processed, pruned blocks):

1. **sparse**: prune the block with the wrapped one-shot method (``base``: SparseGPT or Wanda,
   unstructured or N:M);
2. **dense**: re-activate every pruned connection (it restarts from 0) and train all the block's
   linear weights for ``recon_steps`` Adam steps to reproduce the target outputs — by default
   the *dense model's* output of this block (``target: model``: the block's dense copy run on the
   dense model's own activations, so the reconstruction also absorbs the error the earlier pruned
   blocks pass on), or the dense block on the same inputs (``target: block``) — under a
   sparsity-friendly regulariser that keeps the weight mass where the next pruning will leave it;
3. **sparse**: collect fresh statistics on the reconstructed block and prune it again with the same
   method and pattern; ``iterations`` > 1 repeats 2–3 (S→D→S→D→S…);
4. optionally (``reconstruct: block``), recover: the final sparse block's kept weights trained towards
   the same targets with the mask fixed (:func:`passes.reconstruct.reconstruct_masked`,
   ``reconstruct_steps`` at ``reconstruct_lr``, undone if the held-out error grows).

Where we had to choose (the paper's method section could not be read here — only its abstract: it
names "reactivating pruned connections with sparse regularization", layer-wise reconstruction and a
second pruning with the same method):

- the unit of reconstruction is the whole block (its nonlinearity and the q/k/v ↔ o and
  gate/up ↔ down coupling are trained together); memory stays one block deep;
- the loss is the block output's squared error divided by the step-1 pruned block's error on the
  same batches (so it starts near 1 and ``reg_weight`` reads as "fraction of step 1's error");
- the regulariser (``regularizer``): ``l1`` = Σ|w| over the positions the last pruning removed,
  divided by the layer's kept Σ|w| (re-weighted L1: new mass is allowed where it pays); ``l2`` the
  same with squares; ``smallest`` = squared magnitude of the weights the pattern would drop *now*
  (recomputed every step, per N:M group or per output row), over the layer's Σw² — it lets the
  mask move; ``none`` = plain dense reconstruction (the ablation);
- the windows of the last ``holdout_batches`` runner batches are never trained on; the per-block
  reconstruction errors in the result are measured there (and on the training batches).

Checkpointing: SDS resumes at stage granularity (a killed build reruns this pass); the block
loop itself holds no state worth saving beyond the runner's activations.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from calibrate.runner import LayerwiseRunner, resolve_compute_dtype
from calibrate.stats import Collector
from core.adapters.base import LinearRef
from core.masks import is_nm_sparse, nm_mask, sparsity_of, unstructured_mask
from passes.base import DataFacts, LayerChange, OptionError, Pass, PassContext, PassResult, register_pass
from passes.oneshot import PruneFn, by_collector
from passes.reconstruct import BlockData, reconstruct_masked, trainable_weight
from passes.sparsegpt import SparseGPTConfig, sparsegpt_pruner
from passes.training import lr_factor
from passes.wanda import wanda_pruner

log = logging.getLogger(__name__)

BASES = ("sparsegpt", "wanda")
REGULARIZERS = ("l1", "l2", "smallest", "none")
TARGETS = ("model", "block")
_SPARSEGPT_ONLY = ("blocksize", "damp", "max_damp_steps", "solve_dtype")


@dataclass
class SDSConfig(SparseGPTConfig):
    batch_size: int = 2
    """Calibration windows per runner batch — and per reconstruction step."""
    base: str = "sparsegpt"
    """The one-shot method of both prunings: 'sparsegpt' or 'wanda' (its options are this pass's)."""
    iterations: int = 1
    """Dense → sparse rounds after the first pruning (1 = S→D→S, 2 = S→D→S→D→S)."""
    recon_steps: int = 48
    """Adam steps of each dense reconstruction, per block; one runner batch per step."""
    recon_lr: float = 1e-3
    """Peak learning rate of the reconstruction (10 % warm-up, cosine decay); chosen on the held-out
    calibration block error (benchmarks/results/sds_options_*.json), never on an evaluation text."""
    regularizer: str = "l1"
    """'l1' or 'l2' on the positions the last pruning removed, 'smallest' on the weights the
    pattern would drop now, or 'none'."""
    reg_weight: float = 1.0
    """Weight of the regulariser against the (step-1-normalised) reconstruction error."""
    target: str = "model"
    """'model': the dense model's own output of the block; 'block': the dense block on the pruned inputs."""
    holdout_batches: int = 4
    """Runner batches (of ``batch_size`` windows) kept out of the reconstruction to measure it."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.base not in BASES:
            raise ValueError(f"base '{self.base}' is not one of {', '.join(BASES)}")
        if self.base == "wanda":
            defaults = SparseGPTConfig(sparsity=0.5)
            changed = [k for k in _SPARSEGPT_ONLY if getattr(self, k) != getattr(defaults, k)]
            if changed:
                raise ValueError(f"{', '.join(changed)}: SparseGPT solver options, but base is 'wanda'")
        if self.allocation != "uniform":
            raise ValueError(f"allocation '{self.allocation}': SDS prunes every block to the same target; use 'uniform'")
        if self.permute:
            raise ValueError("permute: SDS does not reorder inputs (prune with the one-shot pass's permute first, or use 'false')")
        if self.reconstruct == "sublayer":
            raise ValueError("reconstruct 'sublayer': SDS's recovery after its final pruning trains the whole block; use 'block' or 'none'")
        if self.reconstruct_holdout != SparseGPTConfig(sparsity=0.5).reconstruct_holdout:
            raise ValueError("reconstruct_holdout: SDS measures every reconstruction on its own holdout_batches; leave reconstruct_holdout unset")
        if not 1 <= self.iterations <= 8:
            raise ValueError(f"iterations {self.iterations} is outside [1, 8]")
        if not 1 <= self.recon_steps <= 100_000:
            raise ValueError(f"recon_steps {self.recon_steps} is outside [1, 100000]")
        if not 0 < self.recon_lr < 1:
            raise ValueError(f"recon_lr {self.recon_lr} is outside (0, 1)")
        if self.regularizer not in REGULARIZERS:
            raise ValueError(f"regularizer '{self.regularizer}' is not one of {', '.join(REGULARIZERS)}")
        if not 0 <= self.reg_weight <= 1e6 or not math.isfinite(self.reg_weight):
            raise ValueError(f"reg_weight {self.reg_weight} is outside [0, 1e6]")
        if self.target not in TARGETS:
            raise ValueError(f"target '{self.target}' is not one of {', '.join(TARGETS)}")
        if not 1 <= self.holdout_batches <= 64:
            raise ValueError(f"holdout_batches {self.holdout_batches} is outside [1, 64]")


def _keep_mask(w: torch.Tensor, cfg: SDSConfig) -> torch.Tensor:
    """The positions the pattern keeps by magnitude now (per N:M group, or per output row)."""
    a = w.detach().abs()
    return nm_mask(a, *cfg.nm) if cfg.nm is not None else unstructured_mask(a, cfg.sparsity, scope="row")


def reconstruct(
    blk: BlockData, refs: list[LinearRef], cfg: SDSConfig, step1_errors: list[float], pruned: dict[str, torch.Tensor]
) -> dict[str, float]:
    """Step 2: train every linear weight of the block densely towards the targets under the regulariser.

    ``pruned`` maps each linear to the positions the last pruning removed (True = removed).
    Returns the first/last loss and regulariser values."""
    module = blk.module
    saved_flags = {n: p.requires_grad for n, p in module.named_parameters()}
    for p in module.parameters():
        p.requires_grad_(False)
    params = [ref.module.weight for ref in refs]
    for p in params:
        p.requires_grad_(True)
    norms = {}
    with torch.no_grad():
        for ref in refs:
            w = trainable_weight(ref)
            norms[ref.name] = (float(w.abs().sum()) if cfg.regularizer == "l1" else float(w.pow(2).sum())) or 1.0
    opt = torch.optim.Adam(params, lr=cfg.recon_lr)
    warmup = max(1, cfg.recon_steps // 10)
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    try:
        for step in range(cfg.recon_steps):
            i = blk.train[step % len(blk.train)]
            for g in opt.param_groups:
                g["lr"] = cfg.recon_lr * lr_factor(step, warmup, cfg.recon_steps)
            err = (blk.forward(i) - blk.targets[i]).pow(2).sum() / max(step1_errors[i], 1e-30)
            reg = torch.zeros(())
            if cfg.regularizer != "none" and cfg.reg_weight > 0:
                parts = []
                for ref in refs:
                    w = trainable_weight(ref)
                    if cfg.regularizer == "l1":
                        parts.append((w.abs() * pruned[ref.name]).sum() / norms[ref.name])
                    elif cfg.regularizer == "l2":
                        parts.append((w.pow(2) * pruned[ref.name]).sum() / norms[ref.name])
                    else:  # smallest: what the pattern would drop now
                        parts.append((w.pow(2) * ~_keep_mask(w, cfg)).sum() / norms[ref.name])
                reg = torch.stack(parts).mean()
            loss = err + cfg.reg_weight * reg
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            now = {"loss": float(err.detach()), "reg": float(reg.detach())}
            if step == 0:
                first = now
            last = now
    finally:
        for p in params:
            p.grad = None
        for n, p in module.named_parameters():
            p.requires_grad_(saved_flags[n])
    return {"loss_first": round(first["loss"], 5), "loss_last": round(last["loss"], 5), "reg_first": round(first["reg"], 6), "reg_last": round(last["reg"], 6)}


def _check_pattern(refs: list[LinearRef], cfg: SDSConfig) -> None:
    """SDS never hands back a denser block than asked (checked, not assumed)."""
    for ref in refs:
        w = ref.weight_out_in()
        if cfg.nm is not None:
            if not is_nm_sparse(w, *cfg.nm):
                raise RuntimeError(f"SDS: {ref.name} is not {cfg.pattern} after the final pruning")
        elif sparsity_of(w) < cfg.sparsity - 1e-3:  # the solvers round per row / per column block
            raise RuntimeError(f"SDS: {ref.name} has sparsity {sparsity_of(w):.4f} < the target {cfg.sparsity}")


def pruner_for(cfg: SDSConfig) -> tuple[Callable[[LinearRef], Collector], PruneFn]:
    return sparsegpt_pruner(cfg) if cfg.base == "sparsegpt" else wanda_pruner(cfg)


@register_pass
class SDSPass(Pass):
    name = "sds"
    config_class = SDSConfig
    uses_calibration = True
    streams = True
    report_title = "SDS (sparse → dense → sparse)"

    @classmethod
    def report_section(cls, variant: dict[str, Any], result: dict[str, Any]) -> list[Any]:
        """Settings and the held-out block reconstruction error of the final sparse blocks against the
        base method's own (step 1) blocks, overall and the range per block."""
        from core.document import Paragraph

        info = result.get("info") or {}
        if "holdout_error_ratio" not in info:
            return []
        last = f"sparse{info['iterations']}"
        per = [r[last]["holdout"] / r["step1"]["holdout"] for r in info["blocks"].values() if r["step1"]["holdout"] > 0]
        spread = f" (per block {min(per):.3f}–{max(per):.3f})" if per else ""
        recover = ", masked recovery of the final sparse block" if info.get("recover") == "block" else ""
        return [Paragraph(
            f"**{variant['name']}**: SDS over {info['base']} ({info['pattern'] or info['sparsity']}), {info['iterations']} × "
            f"{info['recon_steps']} reconstruction steps per block, regulariser {info['regularizer']} × {info['reg_weight']}, "
            f"target {info['target']}{recover}; held-out block error after SDS = {info['holdout_error_ratio']:.3f} × step 1's{spread}."
        )]

    @classmethod
    def check(cls, config: Any, model: Any, data: DataFacts) -> None:
        super().check(config, model, data)
        n_batches = -(-data.calibration_windows // config.batch_size)
        if n_batches <= config.holdout_batches:
            raise OptionError(
                "holdout_batches",
                f"{data.calibration_windows} calibration windows make {n_batches} batches of {config.batch_size}; "
                f"holdout_batches {config.holdout_batches} leaves none to reconstruct on (more windows or a smaller batch_size)",
            )

    def run(self, model: torch.nn.Module, ctx: PassContext) -> PassResult:
        cfg = self.config
        t0 = time.perf_counter()
        windows = ctx.calibration_windows(self.name)
        n_batches = -(-int(windows.shape[0]) // cfg.batch_size)
        if n_batches <= cfg.holdout_batches:
            raise ValueError(
                f"pass 'sds': {windows.shape[0]} calibration windows make {n_batches} batches of {cfg.batch_size}; "
                f"holdout_batches {cfg.holdout_batches} leaves none to reconstruct on (more windows or a smaller batch_size)"
            )
        make_collector, prune = pruner_for(cfg)
        dtype = resolve_compute_dtype(cfg.calibration_dtype)
        runner = LayerwiseRunner(model, ctx.adapter, windows, batch_size=cfg.batch_size, show_progress=ctx.progress, compute_dtype=dtype, stream=ctx.stream)
        blocks_mod = ctx.adapter.blocks(model)
        result = PassResult(self.name, info={
            "base": cfg.base, "pattern": cfg.pattern, "sparsity": cfg.sparsity, "iterations": cfg.iterations,
            "recon_steps": cfg.recon_steps, "recon_lr": cfg.recon_lr, "regularizer": cfg.regularizer,
            "reg_weight": cfg.reg_weight, "target": cfg.target, "recover": cfg.reconstruct, "calibration_windows": list(windows.shape),
            "holdout_windows": min(int(windows.shape[0]), cfg.holdout_batches * cfg.batch_size), "blocks": {},
        })
        seconds = {"prune": 0.0, "reconstruct": 0.0, "collect": 0.0, "measure": 0.0, "recover": 0.0}

        def prune_all(refs: list[LinearRef], collectors: dict[str, Collector]) -> None:
            ts = time.perf_counter()
            for group in by_collector(refs, collectors):
                prune(group, collectors[group[0].name], cfg.sparsity)
            seconds["prune"] += time.perf_counter() - ts

        def apply(b: int, refs: list[LinearRef], collectors: dict[str, Collector]) -> None:
            if not refs:
                return
            module = blocks_mod[b]
            ts = time.perf_counter()
            if cfg.target == "model":
                targets = runner.current_targets
            else:
                targets = [t.hidden for t in runner.next_inputs(runner.compute_copy(module), runner.current_inputs)]
            blk = BlockData(module, runner.current_inputs, targets, cfg.holdout_batches)
            dense_hold = blk.errors(blk.hold)
            seconds["measure"] += time.perf_counter() - ts
            prune_all(refs, collectors)
            ts = time.perf_counter()
            e1 = blk.errors(list(range(len(blk.inputs))))
            record: dict[str, Any] = {
                "dense": _summ(None, dense_hold),
                "step1": _summ([e1[i] for i in blk.train], [e1[i] for i in blk.hold]),
            }
            seconds["measure"] += time.perf_counter() - ts
            for it in range(1, cfg.iterations + 1):
                pruned = {ref.name: (ref.weight_out_in() == 0) for ref in refs}
                ts = time.perf_counter()
                record[f"train{it}"] = reconstruct(blk, refs, cfg, e1, pruned)
                seconds["reconstruct"] += time.perf_counter() - ts
                ts = time.perf_counter()
                record[f"dense{it}"] = _summ(None, blk.errors(blk.hold))
                seconds["measure"] += time.perf_counter() - ts
                ts = time.perf_counter()
                with torch.no_grad():  # the next pruning's statistics, on the reconstructed dense block
                    fresh = runner.collect(module, refs, blk.inputs, make_collector)
                seconds["collect"] += time.perf_counter() - ts
                prune_all(refs, fresh)
                ts = time.perf_counter()
                record[f"sparse{it}"] = _summ(blk.errors(blk.train), blk.errors(blk.hold))
                seconds["measure"] += time.perf_counter() - ts
            if cfg.reconstruct == "block":  # masked recovery of the final sparse block (same targets, same holdout)
                ts = time.perf_counter()
                record["recover"] = reconstruct_masked(ctx.adapter, blk, refs, "block", cfg.reconstruct_steps, cfg.reconstruct_lr)
                seconds["recover"] += time.perf_counter() - ts
                ts = time.perf_counter()
                record[f"sparse{cfg.iterations}"] = _summ(blk.errors(blk.train), blk.errors(blk.hold))
                seconds["measure"] += time.perf_counter() - ts
            _check_pattern(refs, cfg)
            final = record[f"sparse{cfg.iterations}"]
            log.info(
                "sds block %d: holdout error dense %.4g, step 1 %.4g, after SDS %.4g (%.3f× step 1)",
                b, record["dense"]["holdout"], record["step1"]["holdout"], final["holdout"],
                final["holdout"] / max(record["step1"]["holdout"], 1e-30),
            )
            result.info["blocks"][str(b)] = record
            for ref in refs:
                result.layers.append(LayerChange.of(ref))
            del blk

        report = runner.run(make_collector, apply, roles=cfg.targets, blocks=cfg.blocks, teacher=cfg.target == "model")
        if not result.layers:
            raise ValueError(f"pass 'sds': no linear matches targets {cfg.targets} and blocks {cfg.blocks}")
        blocks = result.info["blocks"]
        s1 = sum(r["step1"]["holdout"] for r in blocks.values())
        sf = sum(r[f"sparse{cfg.iterations}"]["holdout"] for r in blocks.values())
        result.info["holdout_error_ratio"] = round(sf / max(s1, 1e-30), 5)
        result.info["seconds"] = {k: round(v, 2) for k, v in seconds.items()}
        result.info["runner"] = report.to_dict()
        result.seconds = time.perf_counter() - t0
        log.info("sds: %d linears, holdout block error %.3f× step 1's, %.1f s (reconstruction %.1f s)",
                 len(result.layers), result.info["holdout_error_ratio"], result.seconds, seconds["reconstruct"])
        return result


def _summ(train: list[float] | None, hold: list[float]) -> dict[str, float]:
    """Summed squared block-output errors (on the training batches when measured, and the holdout)."""
    out = {"holdout": float(f"{sum(hold):.6g}")}
    if train is not None:
        out["train"] = float(f"{sum(train):.6g}")
    return out
