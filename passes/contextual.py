"""Contextual sparsity (Deja Vu: Liu et al., ICML 2023) for gated MLPs: per token, only the selected
MLP units are computed, with real gathers.

For a gated MLP, y = W_down (act(W_gate x) ⊙ W_up x); unit i contributes
act(g_i) · u_i · W_down[:, i]. A **selector** scores the units of every token and the block keeps
its ``k`` best (k = ``keep`` × units, fixed per block — Deja Vu's fixed top-K), or, for the
threshold selector, every unit above a per-block threshold:

- ``oracle``: |act(gate) · up| from the dense computation — the upper bound, for evaluation only
  (it computes everything, so it saves nothing);
- ``threshold``: training-free, |act(W_gate x)| ≥ τ_l, τ_l calibrated per block on calibration
  tokens so that the mean kept share is ``keep`` (the gate is computed densely — a third of the
  MLP — and only the selected rows of W_up and W_downᵀ are gathered; CATS-style);
- ``predictor``: Deja Vu's lookahead predictor, two linears d → ``predictor_rank`` → units with
  no nonlinearity, reading ``predictor_input`` (``prev``: the hidden state entering the previous
  block, available a block ahead; ``block``: this block's input; ``mlp``: the MLP's own input),
  trained on CPU with a BCE loss weighted towards recall (``recall_weight`` × the
  positives' balance weight) on labels = the top ``label_keep`` × units of |act(gate) · up|.

**Execution** (:class:`ContextualMLP`): a single-token step (KV-cache decode, batch any) gathers
the selected rows of W_gate and W_up and the rows of W_downᵀ (kept pre-transposed and contiguous)
and multiplies only those — the skipped units' work is not done. Longer inputs (prefill, and the
perplexity evaluation) run ``full_mode``: ``mask`` (each token's own selection applied as a mask on
the dense computation: the same function, used for perplexity) or ``dense`` (the prefill graph
stays dense, as in Deja Vu). Attention stays dense (measured on SmolLM2: head output norms are
nearly uniform); K/V are always computed. ``dense_blocks`` keep their MLP dense.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from calibrate.contextual import collect_context_stats, gated_mlp, mass_share, recall_at_k
from core.progress import progress
from core.contextual import CONFIG_KEY, ContextStore, ContextualMLP, Predictor, capture_block_inputs, contextual_spec, set_submodule
from passes.base import NEEDS_ROW_SKIPPING_KERNEL, DataFacts, LayerChange, OptionError, Pass, PassContext, PassResult, SpeedupNeed, register_pass

log = logging.getLogger(__name__)

SELECTORS = ("oracle", "threshold", "predictor")
INPUTS = ("prev", "block", "mlp")


@dataclass
class ContextualConfig:
    keep: float = 0.3
    """Share of MLP units computed per token (every block not in ``dense_blocks``)."""
    keep_per_block: dict[int, float] | None = None
    """Per-block overrides of ``keep``."""
    selector: str = "predictor"
    dense_blocks: list[int] = field(default_factory=lambda: [0])
    """Blocks whose MLP stays dense (negative indices count from the end)."""
    predictor_rank: int = 128
    predictor_input: str = "prev"
    label_keep: float | None = None
    """Predictor labels: the top this share of units (default: ``keep``)."""
    recall_weight: float = 2.0
    """Positive-class weight of the BCE, over the balance weight (units − k) / k: > 1 favours recall."""
    predictor_steps: int = 150
    """Adam steps per block (≈0.07 s each at batch 512, rank 128, on one AVX2 core)."""
    predictor_lr: float = 2e-3
    predictor_batch: int = 512
    tokens_per_window: int = 64
    max_tokens: int = 8192
    holdout_share: float = 0.1
    """Share of the sampled calibration tokens kept out of predictor training; recall@k is measured there."""
    full_mode: str = "mask"
    """Multi-token inputs: 'mask' (each token's own selection, as a mask) or 'dense' (prefill dense)."""

    def __post_init__(self) -> None:
        if not 0.0 < self.keep <= 1.0:
            raise ValueError(f"keep {self.keep} is outside (0, 1]")
        for b, k in (self.keep_per_block or {}).items():
            if not isinstance(b, int) or not 0.0 < float(k) <= 1.0:
                raise ValueError(f"keep_per_block {{{b}: {k}}}: expected a block index and a share in (0, 1]")
        if self.selector not in SELECTORS:
            raise ValueError(f"selector '{self.selector}' is not one of {', '.join(SELECTORS)}")
        if self.predictor_input not in INPUTS:
            raise ValueError(f"predictor_input '{self.predictor_input}' is not one of {', '.join(INPUTS)}")
        if not 1 <= self.predictor_rank <= 8192:
            raise ValueError(f"predictor_rank {self.predictor_rank} is outside [1, 8192]")
        if self.label_keep is not None and not 0.0 < self.label_keep <= 1.0:
            raise ValueError(f"label_keep {self.label_keep} is outside (0, 1]")
        if self.recall_weight <= 0 or self.predictor_lr <= 0 or self.predictor_steps < 1 or self.predictor_batch < 1:
            raise ValueError("recall_weight and predictor_lr must be positive, predictor_steps and predictor_batch at least 1")
        if not 1 <= self.tokens_per_window or self.max_tokens < 16:
            raise ValueError("tokens_per_window must be ≥ 1 and max_tokens ≥ 16")
        if not 0.0 < self.holdout_share < 0.5:
            raise ValueError(f"holdout_share {self.holdout_share} is outside (0, 0.5)")
        if self.full_mode not in ("mask", "dense"):
            raise ValueError(f"full_mode '{self.full_mode}' is not one of mask, dense")

    def keep_of(self, block: int) -> float:
        return float((self.keep_per_block or {}).get(block, self.keep))


def train_predictor(x: torch.Tensor, act: torch.Tensor, cfg: ContextualConfig, rank: int, seed: int) -> tuple[Predictor, dict[str, float]]:
    """Fit a predictor to the top-``label_keep`` units of ``act`` from ``x`` (both (tokens, ·))."""
    units = act.shape[1]
    k = max(1, round((cfg.label_keep or cfg.keep) * units))
    labels = torch.zeros_like(act, dtype=torch.float32).scatter_(-1, act.float().topk(k, dim=-1).indices, 1.0)
    torch.manual_seed(seed)
    pred = Predictor(x.shape[1], rank, units)
    opt = torch.optim.Adam(pred.parameters(), lr=cfg.predictor_lr)
    pos_weight = torch.tensor(cfg.recall_weight * (units - k) / k)
    g = torch.Generator().manual_seed(seed)
    xf = x.float()
    losses = []
    for step in range(cfg.predictor_steps):
        idx = torch.randint(0, xf.shape[0], (min(cfg.predictor_batch, xf.shape[0]),), generator=g)
        for group in opt.param_groups:
            group["lr"] = cfg.predictor_lr * 0.5 * (1 + math.cos(math.pi * step / cfg.predictor_steps))
        loss = F.binary_cross_entropy_with_logits(pred(xf[idx]), labels[idx], pos_weight=pos_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    pred.requires_grad_(False)
    n = max(1, min(10, len(losses) // 10))
    return pred.eval(), {"loss_first": round(sum(losses[:n]) / n, 5), "loss_last": round(sum(losses[-n:]) / n, 5)}


@register_pass
class ContextualPass(Pass):
    name = "contextual"
    config_class = ContextualConfig
    uses_calibration = True
    changes_shapes = True
    report_title = "Contextual sparsity (Deja Vu)"

    @classmethod
    def speedup_need(cls, options: dict[str, Any]) -> SpeedupNeed | None:
        return NEEDS_ROW_SKIPPING_KERNEL

    @classmethod
    def report_section(cls, variant: dict[str, Any], result: dict[str, Any]) -> list[Any]:
        """Selector, kept MLP share, recall@k of the selection on held-out calibration tokens, the
        predictor's cost, and the decode ratio where measured."""
        from core.document import Paragraph

        info = result.get("info") or {}
        if "blocks" not in info:
            return []
        sparse = [b for b, r in info["blocks"].items() if r["keep"] < 1.0]
        recall = {
            "predictor": f"recall@k of the predictor on held-out calibration tokens {info.get('mean_recall_at_k', float('nan')):.3f}",
            "threshold": f"recall@k of the top-k units by |act(gate)| on held-out calibration tokens {info.get('mean_threshold_recall_at_k', float('nan')):.3f}",
        }.get(info["selector"], "the oracle computes every unit to choose (an upper bound, no saving)")
        pred = (
            f", predictor rank {info['predictor_rank']} reading {info['predictor_input']} ({info['predictor_macs_share']:.3f} of a block's MACs)"
            if info["selector"] == "predictor" else ""
        )
        macs = f"; MLP MACs computed {info['mlp_macs_share']:.3f} × dense" if "mlp_macs_share" in info else ""
        dec = variant.get("decode") or {}
        speed = f"; decode {dec['decode_ratio']:.3f} × dense ms/token" if "decode_ratio" in dec else ""
        return [Paragraph(
            f"**{variant['name']}**: contextual MLP sparsity, selector {info['selector']}, {info['keep']:.2f} of the units computed "
            f"per token in {len(sparse)} of {len(info['blocks'])} blocks (attention dense){pred}{macs}; {recall}; "
            f"perplexity with each token's own selection, prefill {info['full_mode']}{speed}."
        )]

    @classmethod
    def check(cls, config: Any, model: Any, data: DataFacts) -> None:
        if model.task != "causal-lm":
            raise OptionError("selector", f"contextual sparsity runs KV-cache decoding of causal LMs; this {model.family} model is an {model.task}")
        if not model.gated_mlp:
            raise OptionError("selector", f"contextual sparsity selects units of a gated MLP (act(gate) · up); this {model.family} model's MLP is not gated")
        if "gate" not in model.roles:
            raise OptionError("selector", f"contextual sparsity gathers rows of separate gate and up linears; this {model.family} model fuses them into one (gate_up)")
        n = model.layers
        outside = [b for b in config.dense_blocks if not -n <= b < n]
        if outside:
            raise OptionError("dense_blocks", f"{outside} are outside the model's {n} blocks (indices within [-{n}, {n - 1}])")

    def run(self, model: torch.nn.Module, ctx: PassContext) -> PassResult:
        cfg = self.config
        windows = ctx.calibration_windows(self.name)
        if ctx.adapter.task != "causal-lm":
            raise ValueError(f"pass 'contextual' runs KV-cache decoding of causal LMs; '{ctx.adapter.family}' is an {ctx.adapter.task}")
        t0 = time.perf_counter()
        blocks = ctx.adapter.blocks(model)
        n = len(blocks)
        dense = {b % n for b in cfg.dense_blocks if -n <= b < n}
        if len(dense) != len(cfg.dense_blocks):
            raise ValueError(f"dense_blocks {cfg.dense_blocks}: every index must be within [-{n}, {n - 1}]")
        memo_key = f"contextual-stats:{ctx.prefix_key}:{cfg.tokens_per_window}:{cfg.max_tokens}:{ctx.seed}" if ctx.prefix_key else None
        stats = ctx.memo.get(memo_key) if memo_key else None
        if stats is None:  # variants of one build over the same model share one calibration pass
            stats = collect_context_stats(model, ctx.adapter, windows, cfg.tokens_per_window, cfg.max_tokens, seed=ctx.seed, show_progress=ctx.progress)
            if memo_key:
                ctx.memo[memo_key] = stats
        store = ContextStore()
        if cfg.selector == "predictor" and cfg.predictor_input != "mlp":
            for i, b in enumerate(blocks):
                capture_block_inputs(b, store, i)
        block_macs = {}  # multiply-accumulates per token of each block's linears, from their weights
        for ref in ctx.adapter.linears(model):
            block_macs[ref.block] = block_macs.get(ref.block, 0) + ref.weight_out_in().numel()
        info: dict[str, Any] = {"selector": cfg.selector, "keep": cfg.keep, "full_mode": cfg.full_mode, "predictor_rank": cfg.predictor_rank,
                                "predictor_input": cfg.predictor_input, "dense_blocks": sorted(dense), "tokens": stats.tokens, "blocks": {}}
        result = PassResult(self.name, info=info)
        for l, block in enumerate(progress(blocks, f"contextual {cfg.selector}") if ctx.progress else blocks):
            mlp = gated_mlp(ctx.adapter, block)
            st = stats.block(l)
            act = st["act"].float()
            units = act.shape[1]
            keep = 1.0 if l in dense else cfg.keep_of(l)
            k = max(1, round(keep * units))
            split = max(1, int(round(act.shape[0] * cfg.holdout_share)))
            hidden = mlp.gate.weight.shape[1]
            rec: dict[str, Any] = {"keep": keep, "k": k, "mass90_share": round(mass_share(act[-split:]), 4), "mlp_macs_share": 1.0}
            if l in dense:
                info["blocks"][str(l)] = rec
                continue
            threshold, pred = None, None
            with torch.no_grad():
                gate_act = mlp.gate_activity(st["mlp"])
            if cfg.selector == "threshold":
                threshold = float(torch.quantile(gate_act[:-split].reshape(-1)[:2_000_000], 1 - keep))
                rec["threshold"] = round(threshold, 6)
                rec["kept_share_holdout"] = round(float((gate_act[-split:] >= threshold).float().mean()), 4)
                rec["mlp_macs_share"] = round((1 + 2 * keep) / 3, 4)  # the whole gate, then the kept rows of up and down
            elif cfg.selector == "predictor":
                x = st[cfg.predictor_input].float()
                t1 = time.perf_counter()
                pred, fit = train_predictor(x[:-split], act[:-split], cfg, cfg.predictor_rank, ctx.seed + l)
                rec["predictor"] = {**fit, "seconds": round(time.perf_counter() - t1, 2)}
                with torch.no_grad():
                    rec["recall_at_k"] = round(recall_at_k(pred(x[-split:]), act[-split:], k), 4)
                log.info("contextual: block %d predictor loss %.4f → %.4f, recall@k %.3f (%.1f s)", l, fit["loss_first"], fit["loss_last"], rec["recall_at_k"], rec["predictor"]["seconds"])
                pred_macs = x.shape[1] * cfg.predictor_rank + cfg.predictor_rank * units
                rec["predictor_macs_share"] = round(pred_macs / block_macs[l], 4)
                rec["mlp_macs_share"] = round((3 * hidden * k + pred_macs) / (3 * hidden * units), 4)
            rec["threshold_recall_at_k"] = round(recall_at_k(gate_act[-split:], act[-split:], k), 4)
            set_submodule(block, ctx.adapter.mlp_path(), ContextualMLP(
                mlp.module, ctx.adapter.gated_mlp_names(), cfg.selector, k, l, threshold, pred, cfg.predictor_input, store, cfg.full_mode,
            ))
            info["blocks"][str(l)] = rec
            result.layers.append(LayerChange(f"{ctx.adapter.blocks_path}.{l}.{ctx.adapter.mlp_path()}", "up", l, (units, hidden), 1 - keep))
        setattr(model.config, CONFIG_KEY, contextual_spec(model, ctx.adapter))
        # MLP multiply-accumulates per token computed, over the dense MLPs' (every block; the oracle computes all)
        info["mlp_macs_share"] = round(sum(r["mlp_macs_share"] for r in info["blocks"].values()) / len(info["blocks"]), 4)
        recs = [r for r in info["blocks"].values() if "recall_at_k" in r or "threshold_recall_at_k" in r]
        if recs:
            info["mean_threshold_recall_at_k"] = round(sum(r["threshold_recall_at_k"] for r in recs) / len(recs), 4)
            if cfg.selector == "predictor":
                info["mean_recall_at_k"] = round(sum(r["recall_at_k"] for r in recs) / len(recs), 4)
                info["predictor_macs_share"] = round(sum(r["predictor_macs_share"] for r in recs) / len(recs), 4)
        result.seconds = time.perf_counter() - t0
        log.info("contextual: %s selector, keep %.2f on %d blocks in %.1f s", cfg.selector, cfg.keep, len(result.layers), result.seconds)
        return result


