"""Structured pruning: remove attention heads (or whole KV groups) and FFN channels.

Importance comes from ``calibrate.importance`` (activation-based or Taylor); this pass
decides what goes and then slices the matrices (``core.structure``), so the pruned
model is smaller on every backend. Allocation is either ``uniform`` (the same fraction
in every layer) or ``global`` (scores normalised per layer by their ℓ2 norm, ranked
across layers, with a floor of ``min_keep`` per layer so no layer is emptied).

Head units: ``kv-group`` removes whole KV groups (k/v shrink too, so does the KV cache);
``query`` removes query heads and keeps k/v, the same number in every group of a layer
(GQA's equal-group rule). For models without GQA the two coincide (a unit is a head).
``auto`` picks ``kv-group`` when the model has GQA.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import torch

from calibrate.importance import METHODS, Importance, activation_importance, taylor_importance
from calibrate.runner import resolve_compute_dtype
from passes.base import NEEDS_GRAPH_SHRINK, NEEDS_NOTHING, DataFacts, LayerChange, OptionError, Pass, PassContext, PassResult, SpeedupNeed, register_pass
from core.structure import head_dim, layer_shapes, linear_macs, mask_block, record_shapes, slice_block
from core.models import count_parameters

log = logging.getLogger(__name__)

ROUND_TO = (1, 8, 16, 32, 64, 128)


@dataclass
class StructuredConfig:
    heads: float = 0.0
    """Fraction of head units removed (rounded to whole units per layer)."""
    ffn: float = 0.0
    """Fraction of FFN channels removed."""
    head_unit: str = "auto"
    """'kv-group', 'query' or 'auto' (kv-group when the model has GQA)."""
    importance: str = "activation"
    """'activation' (output-norm contribution) or 'taylor' (head-mask gradient, causal LMs)."""
    allocation: str = "uniform"
    """'uniform' (same fraction per layer) or 'global' (ranked across layers with a floor)."""
    min_keep: float = 0.1
    """Global allocation: every layer keeps at least this fraction of its units (and at least one)."""
    round_to: int = 1
    """FFN widths kept as a multiple of this (1, 8, 16, 32, 64, 128) for kernel alignment."""
    apply: str = "slice"
    """'slice' removes the units; 'mask' zeroes them and keeps shapes (for graph-level shrinking)."""
    batch_size: int = 8
    calibration_dtype: str = "auto"
    taylor_windows: int = 32
    """Taylor importance: calibration windows back-propagated (batch of one each)."""

    def __post_init__(self) -> None:
        for key in ("heads", "ffn"):
            v = getattr(self, key)
            if not isinstance(v, (int, float)) or not 0.0 <= v < 1.0:
                raise ValueError(f"{key} {v!r} is outside [0, 1)")
        if self.heads == 0 and self.ffn == 0:
            raise ValueError("heads and ffn are both 0; set a fraction of head units and/or FFN channels to remove")
        choices = {
            "head_unit": ("auto", "kv-group", "query"),
            "importance": METHODS,
            "allocation": ("uniform", "global"),
            "apply": ("slice", "mask"),
            "calibration_dtype": ("auto", "float32", "bfloat16"),
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"{key} '{getattr(self, key)}' is not one of {', '.join(allowed)}")
        if self.round_to not in ROUND_TO:
            raise ValueError(f"round_to {self.round_to} is not one of {', '.join(map(str, ROUND_TO))}")
        if not 0.0 < self.min_keep <= 1.0:
            raise ValueError(f"min_keep {self.min_keep} is outside (0, 1]")
        if not 1 <= self.batch_size <= 1024:
            raise ValueError(f"batch_size {self.batch_size} is outside [1, 1024]")
        if self.taylor_windows < 1:
            raise ValueError(f"taylor_windows {self.taylor_windows} must be at least 1")


def _round_keep(keep: float, total: int, multiple: int, floor: int) -> int:
    """Round a kept count to a multiple, within [max(floor, multiple), total]."""
    if multiple > 1:
        k = int(round(keep / multiple)) * multiple
        k = max(k, multiple, math.ceil(floor / multiple) * multiple)
        return total if k >= total else k
    return min(total, max(floor, int(round(keep))))


def allocate(
    scores: list[torch.Tensor],
    fraction: float,
    allocation: str,
    min_keep: float = 0.1,
    multiple: int = 1,
) -> list[list[int]]:
    """Indices kept per layer, highest scores first kept (ties broken by lower index)."""
    counts = []
    if allocation == "uniform":
        for s in scores:
            counts.append(_round_keep(s.numel() * (1 - fraction), s.numel(), multiple, 1))
    elif allocation == "global":
        normed = [s.double() / s.double().norm().clamp(min=1e-30) for s in scores]
        pooled = torch.cat(normed)
        total = pooled.numel()
        remove = int(round(fraction * total))
        order = torch.argsort(pooled, stable=True)  # ascending: lowest scores removed first
        removed = torch.zeros(total, dtype=torch.bool)
        removed[order[:remove]] = True
        start = 0
        for s in scores:
            n = s.numel()
            kept = int((~removed[start : start + n]).sum())
            start += n
            counts.append(_round_keep(kept, n, multiple, max(1, math.ceil(min_keep * n))))
    else:
        raise ValueError(f"allocation '{allocation}' is not uniform or global")
    out = []
    for s, k in zip(scores, counts):
        order = sorted(range(s.numel()), key=lambda i: (-float(s[i]), i))
        out.append(sorted(order[:k]))
    return out


def plan_heads(
    head_scores: list[torch.Tensor],
    kv_heads: list[int],
    fraction: float,
    unit: str,
    allocation: str,
    min_keep: float,
) -> list[list[int]]:
    """Kept query heads per layer for the chosen head unit."""
    if unit == "kv-group":
        group_scores = [s.reshape(kv, -1).sum(1) for s, kv in zip(head_scores, kv_heads)]
        kept_groups = allocate(group_scores, fraction, allocation, min_keep)
        out = []
        for s, kv, groups in zip(head_scores, kv_heads, kept_groups):
            g = s.numel() // kv
            out.append([k * g + i for k in groups for i in range(g)])
        return out
    # query heads within groups: a per-layer count, then the same number kept in every group
    kept_any = allocate(head_scores, fraction, allocation, min_keep)
    out = []
    for s, kv, kept in zip(head_scores, kv_heads, kept_any):
        g = s.numel() // kv
        if g == 1:  # no GQA: every head has its own k/v, any subset will do
            out.append(kept)
            continue
        per_group = min(g, max(1, int(round(len(kept) / kv))))
        heads = []
        for k in range(kv):
            grp = s[k * g : (k + 1) * g]
            order = sorted(range(g), key=lambda i: (-float(grp[i]), i))
            heads += [k * g + i for i in sorted(order[:per_group])]
        out.append(heads)
    return out


def compute_importance(model: torch.nn.Module, ctx: PassContext, cfg: StructuredConfig) -> Importance:
    """Importance scores, shared between variants of a build that prune the same model the same way."""
    key = None
    if ctx.prefix_key is not None:
        key = f"importance:{ctx.prefix_key}:{cfg.importance}:{cfg.calibration_dtype}:{cfg.batch_size}:{cfg.taylor_windows}"
        if key in ctx.memo:
            log.info("structured: reusing %s importance computed for an earlier variant", cfg.importance)
            return ctx.memo[key]
    imp = _compute_importance(model, ctx, cfg)
    if key is not None:
        ctx.memo[key] = imp
    return imp


def _compute_importance(model: torch.nn.Module, ctx: PassContext, cfg: StructuredConfig) -> Importance:
    windows = ctx.calibration()
    hd = head_dim(ctx.adapter, model.config)
    dtype = resolve_compute_dtype(cfg.calibration_dtype)
    if cfg.importance == "taylor":
        return taylor_importance(model, ctx.adapter, windows[: cfg.taylor_windows], hd, dtype, ctx.progress)
    return activation_importance(model, ctx.adapter, windows, hd, cfg.batch_size, dtype, ctx.progress)


@register_pass
class StructuredPass(Pass):
    name = "structured"
    config_class = StructuredConfig
    uses_calibration = True
    changes_shapes = True

    report_title = "Structured pruning (kept / dense, per block)"

    @classmethod
    def shapes_change(cls, options: dict) -> bool:
        return options.get("apply", "slice") == "slice"

    @classmethod
    def check(cls, config: Any, model: Any, data: DataFacts) -> None:
        if config.heads > 0 and config.apply == "slice" and model.head_slicing_refusal:
            raise OptionError("heads", f"{model.family}: {model.head_slicing_refusal}")

    @classmethod
    def speedup_need(cls, options: dict[str, Any]) -> SpeedupNeed | None:
        return NEEDS_GRAPH_SHRINK if options.get("apply") == "mask" else NEEDS_NOTHING

    @classmethod
    def report_section(cls, variant: dict[str, Any], result: dict[str, Any]) -> list[Any]:
        """Parameters before/after and the kept heads / KV heads / FFN channels, one row per run of
        consecutive blocks that keep the same shape."""
        from core.document import Paragraph, Table

        info = result.get("info") or {}
        if not info.get("kept"):
            return []
        after, before = info["parameters_after"], info["parameters_before"]

        def cells(k: dict[str, Any]) -> list[str]:
            return [f"{k['heads']} / {k['dense']['heads']}", f"{k['kv_heads']} / {k['dense']['kv_heads']}", f"{k['ffn']} / {k['dense']['ffn']}"]

        kept, rows, start = info["kept"], [], 0
        for i in range(1, len(kept) + 1):
            if i == len(kept) or cells(kept[i]) != cells(kept[start]):
                first, last = kept[start]["block"], kept[i - 1]["block"]
                rows.append([str(first) if first == last else f"{first}–{last}", *cells(kept[start])])
                start = i
        macs = info.get("linear_macs_per_token")
        work = (f"; the decoder linears do {macs['after'] / macs['before']:.3f} of their multiply-adds per token"
                + (" (masked channels are still computed)" if info["apply"] == "mask" else "") if macs else "")
        return [
            Paragraph(
                f"**{variant['name']}**: {before / 1e6:.2f}M → {after / 1e6:.2f}M parameters ({100 * after / before:.1f} %){work}; "
                f"{info['importance']} importance, {info['head_unit']} head units, {info['allocation']} allocation, {info['apply']}."
            ),
            Table(["block", "heads", "KV heads", "FFN channels"], rows),
        ]

    def run(self, model: torch.nn.Module, ctx: PassContext) -> PassResult:
        cfg = self.config
        ctx.calibration_windows(self.name)  # fails early, naming the pass, when there is none
        t0 = time.perf_counter()
        adapter = ctx.adapter
        before = layer_shapes(model, adapter)
        params_before = count_parameters(model)
        macs_before = linear_macs(model, adapter)
        gqa = any(s.kv_heads < s.heads for s in before)
        unit = cfg.head_unit if cfg.head_unit != "auto" else ("kv-group" if gqa else "query")
        imp = compute_importance(model, ctx, cfg)
        keep_heads = plan_heads(imp.heads, [s.kv_heads for s in before], cfg.heads, unit, cfg.allocation, cfg.min_keep) if cfg.heads > 0 else None
        keep_ffn = allocate(imp.ffn, cfg.ffn, cfg.allocation, cfg.min_keep, cfg.round_to) if cfg.ffn > 0 else None
        cut = slice_block if cfg.apply == "slice" else mask_block
        after = [
            cut(model, adapter, b, keep_heads[b] if keep_heads is not None else None, keep_ffn[b] if keep_ffn is not None else None)
            for b in range(len(before))
        ]
        if cfg.apply == "slice":
            record_shapes(model, adapter)
        result = PassResult(self.name, seconds=time.perf_counter() - t0)
        result.layers = [LayerChange.of(ref) for ref in adapter.linears(model)]
        per_layer = [{"block": b, **s1.to_dict(), "dense": s0.to_dict()} for b, (s0, s1) in enumerate(zip(before, after))]
        result.info = {
            "importance": imp.method,
            "head_unit": unit,
            "allocation": cfg.allocation,
            "apply": cfg.apply,
            "calibration_windows": list(ctx.calibration().shape),
            "parameters_before": params_before,
            "parameters_after": count_parameters(model),
            "kept": per_layer,
            # a masked channel is still computed by the graph: only slicing lowers the work
            "linear_macs_per_token": {"before": macs_before, "after": linear_macs(model, adapter)},
        }
        log.info(
            "structured: %s importance, %d → %d parameters (%.1f%%) in %.1f s",
            imp.method, params_before, result.info["parameters_after"], 100 * result.info["parameters_after"] / params_before, result.seconds,
        )
        return result
