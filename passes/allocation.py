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
