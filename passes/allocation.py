"""Per-block sparsity allocation for the one-shot passes, at a fixed overall sparsity.

``uniform``: every block gets the target. ``owl`` (Yin et al., "Outlier Weighed Layerwise
Sparsity", reference code luuyin/OWL): one calibration pass over the *dense* model computes, per
block, the layerwise outlier distribution LOD = the share of the block's Wanda scores |W_ij|·‖X_j‖₂
(all its linears together) above ``m`` × their mean; the LODs are scaled linearly onto [0, 2λ]
and shifted so that the parameter-weighted mean keep-ratio is 1 − target: more outliers, lower
sparsity. The block sparsities span at most 2λ; as in the reference code the span is centred on
the target only when the LODs are spread evenly (a single outlier-heavy block sits up to 2λ
below the target while the others sit a little above it).

The sensitivity-aware allocation of Shao et al. (issue 11) is not built yet; a recipe asking for it
gets a RecipeError saying so.
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch

log = logging.getLogger(__name__)

ALLOCATIONS = ("uniform", "owl")


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
