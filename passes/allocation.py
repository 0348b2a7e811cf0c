"""Per-block sparsity allocation for the one-shot passes, at a fixed overall sparsity.

``uniform``: every block gets the target. ``owl`` (Yin et al., "Outlier Weighed Layerwise
Sparsity", reference code luuyin/OWL): one calibration pass over the *dense* model computes, per
block, the layerwise outlier distribution LOD = the share of the block's Wanda scores |W_ij|·‖X_j‖₂
(all its linears together) above ``m`` × their mean; the LODs are scaled linearly onto [0, 2λ]
and shifted so that the parameter-weighted mean keep-ratio is 1 − target: more outliers, lower
sparsity. The block sparsities span at most 2λ; as in the reference code the span is centred on
the target only when the LODs are spread evenly (a single outlier-heavy block sits up to 2λ
below the target while the others sit a little above it).

``sensitivity`` (after Shao et al., "One-Shot Sensitivity-Aware Mixed Sparsity Pruning for Large
Language Models"): every unit (a linear, or a whole block) has a convex estimated-loss curve L_u(s)
from :mod:`calibrate.sensitivity`; :func:`allocate` minimises Σ_u L_u(s_u) subject to
Σ_u n_u s_u = S · Σ_u n_u (counted in parameters) and lo_u ≤ s_u ≤ hi_u. With convex curves the
optimum prunes the parameters of smallest marginal loss first, whichever unit they are in: a
greedy over the curves' linear segments, sorted by slope, the last one taken partly so that the
target is met exactly. The pruning pass re-solves it before every block with the blocks already
pruned fixed at what they got and the current block's curve measured on the inputs the pruned
earlier blocks produce.
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch

log = logging.getLogger(__name__)

ALLOCATIONS = ("uniform", "owl", "sensitivity")


def outlier_ratio(scores: Sequence[torch.Tensor], m: float) -> float:
    """Share of all entries of ``scores`` (concatenated) above ``m`` × their mean."""
    flat = torch.cat([s.reshape(-1).float() for s in scores])
    return float((flat > m * flat.mean()).sum()) / flat.numel()


def owl_sparsities(lod: Sequence[float], target: float, lam: float, sizes: Sequence[int] | None = None) -> list[float]:
    """Block sparsities from outlier ratios (OWL): keep-ratios spread over 2λ in proportion to the
    LOD, shifted so the ``sizes``-weighted mean sparsity is exactly ``target``."""
    n = len(lod)
    if n == 0:
        return []
    sizes = [1] * n if sizes is None else list(sizes)
    if len(sizes) != n:
        raise ValueError(f"{len(sizes)} block sizes for {n} blocks")
    lo, hi = min(lod), max(lod)
    spread = [0.0] * n if hi == lo else [(x - lo) / (hi - lo) * 2 * lam for x in lod]
    total = sum(sizes)
    mean = sum(k * s for k, s in zip(spread, sizes)) / total
    keep = [k - mean + (1 - target) for k in spread]
    out = [1 - k for k in keep]
    if min(out) < 0 or max(out) >= 1:
        raise ValueError(f"OWL with lambda {lam} puts a block outside [0, 1) at target {target}: {min(out):.3f}..{max(out):.3f}")
    return out


def allocate(
    curves: Sequence[Sequence[float]],
    sizes: Sequence[int],
    target: float,
    lo: Sequence[float],
    hi: Sequence[float],
) -> list[float]:
    """Sparsity per unit minimising Σ curve_u(s_u) at exactly ``target`` of Σ ``sizes`` parameters.

    ``curves[u][k]`` is unit u's estimated loss at sparsity k/G (G = len − 1, the same for every
    unit), linear in between; ``lo``/``hi`` bound each unit's sparsity (lo = hi fixes it). Slopes are
    made non-decreasing (a cumulative max) so that a unit's segments are taken in order."""
    n = len(curves)
    if not (len(sizes) == len(lo) == len(hi) == n):
        raise ValueError(f"{n} curves, {len(sizes)} sizes, {len(lo)} lower and {len(hi)} upper bounds")
    if n == 0:
        return []
    g = len(curves[0]) - 1
    if g < 1 or any(len(c) != g + 1 for c in curves):
        raise ValueError("every curve needs the same number (≥ 2) of grid points")
    for u in range(n):
        if not 0.0 <= lo[u] <= hi[u] <= 1.0:
            raise ValueError(f"unit {u}: bounds [{lo[u]}, {hi[u]}] are not inside [0, 1] in order")
        if sizes[u] <= 0:
            raise ValueError(f"unit {u}: size {sizes[u]} must be positive")
    total = float(sum(sizes))
    need = target * total - sum(n_u * l for n_u, l in zip(sizes, lo))
    room = sum(n_u * (h - l) for n_u, h, l in zip(sizes, hi, lo))
    tol = 1e-9 * total
    if need < -tol or need > room + tol:
        lo_s = sum(n_u * l for n_u, l in zip(sizes, lo)) / total
        hi_s = sum(n_u * h for n_u, h in zip(sizes, hi)) / total
        raise ValueError(f"target sparsity {target} is outside what the bounds allow: [{lo_s:.4f}, {hi_s:.4f}]")
    items = []  # (slope per parameter, unit, segment start, segment end)
    for u, c in enumerate(curves):
        slope_max = float("-inf")  # made non-decreasing over the segments inside the bounds only
        for k in range(g):
            a, b = max(k / g, lo[u]), min((k + 1) / g, hi[u])
            if b > a:
                slope_max = max(slope_max, (float(c[k + 1]) - float(c[k])) * g / sizes[u])
                items.append((slope_max, u, a, b))
    items.sort(key=lambda t: (t[0], t[1], t[2]))
    out = list(map(float, lo))
    for _slope, u, a, b in items:
        if need <= 0:
            break
        params = (b - a) * sizes[u]
        take = min(params, need)
        out[u] += take / sizes[u]
        need -= take
    return [min(max(s, l), h) for s, l, h in zip(out, lo, hi)]


# --- report ---------------------------------------------------------------------------------------

ALLOCATION_TITLE = "Mixed sparsity (per block and role, measured from the weights)"
ROLE_ORDER = ("q", "k", "v", "qkv", "o", "gate", "up", "gate_up", "down")


def sparsity_by_layer(result: dict) -> tuple[dict, dict[str, dict[int, float]]] | None:
    """For a one-shot pass result whose sparsities were mixed per layer: the allocation facts and the
    measured sparsity of every pruned linear, by role then block (from the weights, as the pass
    recorded them); None for a uniform pass."""
    info = result.get("info") or {}
    alloc = info.get("allocation")
    if not (isinstance(alloc, dict) and alloc.get("method") in ("owl", "sensitivity") and result.get("layers")):
        return None
    by_role: dict[str, dict[int, float]] = {}
    for layer in result["layers"]:
        by_role.setdefault(layer["role"], {})[int(layer["block"])] = float(layer["sparsity"])
    return {**alloc, "target": alloc.get("target", info.get("sparsity"))}, by_role


def allocation_report(variant: dict, result: dict) -> list:
    """The report blocks of a mixed allocation: one line of facts and the sparsity-by-block plot."""
    from core.document import Figure, Paragraph, new_figure, png_of, safe_name

    got = sparsity_by_layer(result)
    if got is None:
        return []
    alloc, by_role = got
    values = [s for blocks in by_role.values() for s in blocks.values()]
    how = {
        "owl": f"OWL (λ {alloc.get('lambda')}, M {alloc.get('m')})",
        "sensitivity": f"sensitivity ({alloc.get('measure')} measure, one sparsity per {alloc.get('unit')}, bounds {alloc.get('bounds')})",
    }[alloc["method"]]
    text = f"**{variant['name']}**: {how}; target {alloc.get('target')}; measured per-linear sparsity {min(values):.3f}–{max(values):.3f}."
    fig, ax = new_figure()
    for role in sorted(by_role, key=lambda r: (ROLE_ORDER.index(r) if r in ROLE_ORDER else len(ROLE_ORDER), r)):
        blocks = sorted(by_role[role])
        ax.plot(blocks, [by_role[role][b] for b in blocks], marker=".", lw=1, label=role)
    if alloc.get("target") is not None:
        ax.axhline(float(alloc["target"]), color="0.3", lw=0.8, ls="--", label="target")
    ax.set_ylim(0, 1)
    ax.set_xlabel("block")
    ax.set_ylabel("sparsity (measured)")
    ax.set_title(f"{variant['name']}: {alloc['method']} allocation", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, ncol=4, loc="lower right")
    return [Paragraph(text), Figure(f"sparsity_{safe_name(variant['name'])}.png", f"sparsity by block and role: {variant['name']}", png_of(fig))]
