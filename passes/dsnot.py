"""DSnoT (Zhang et al., ICLR 2024): training-free prune-and-grow on a one-shot mask.

A linear's row i computes y_i = Σ_j W_ij x_j. Pruning the set P_i of its weights changes the
*expected* output by e_i = Σ_{j∈P_i} W_ij E[x_j] (the reconstruction error of the mean). DSnoT
swaps weights in and out of the mask, one pair per row per cycle, to drive e_i towards zero
without changing how many weights the row keeps:

1. grow: of the row's pruned weights whose contribution c_ij = W_ij E[x_j] has the sign of e_i
   (restoring it shrinks |e_i|), the one with the largest |c_ij| / Var[x_j]^p — a large, steady
   contribution;
2. prune: unstructured — of the kept weights whose contribution has the opposite sign (removing
   it shrinks |e_i| further), the one of least importance (the pass's own score, e.g. Wanda's
   |W|·‖X‖); N:M — the least important kept weight of the grown weight's group of M, so every
   group keeps exactly N;
3. the swap is taken only while |e_i| > ``threshold``, if it does not flip e_i's sign and if it
   shrinks |e_i| (under N:M the weight pruned in the group may carry e_i's sign; the reference
   implementation takes such a swap even when it grows |e_i|, this one does not); a row that
   cannot take its swap stops for good. A weight that was swapped once never moves again.
   At most ``cycles`` cycles.

The weights' values are not changed (no update; that is what SparseGPT's solver does instead,
which is why this module serves the score-only passes). Everything is vectorised over rows;
the loop runs over cycles.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class DSnoTStats:
    swaps: int
    """Weights grown back (= weights newly pruned)."""
    rows_changed: int
    error_before: float
    """Mean |e_i| over rows before the swaps."""
    error_after: float
    cycles: int

    def to_dict(self) -> dict:
        return {
            "dsnot_swaps": self.swaps,
            "dsnot_rows_changed": self.rows_changed,
            "dsnot_error_before": float(f"{self.error_before:.6g}"),
            "dsnot_error_after": float(f"{self.error_after:.6g}"),
            "dsnot_cycles": self.cycles,
        }


def dsnot_refine(
    weight: torch.Tensor,
    keep: torch.Tensor,
    importance: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    nm: tuple[int, int] | None = None,
    cycles: int = 50,
    threshold: float = 0.1,
    var_power: float = 1.0,
) -> tuple[torch.Tensor, DSnoTStats]:
    """The refined keep-mask (``True`` = keep) of ``weight`` (out, in) and what changed.

    ``importance`` (out, in) ranks kept weights for pruning (lowest goes first); ``mean`` and
    ``var`` are the inputs' per-channel mean and variance over the calibration tokens."""
    rows, cols = weight.shape
    if keep.shape != weight.shape or importance.shape != weight.shape:
        raise ValueError(f"DSnoT: mask {tuple(keep.shape)} and importance {tuple(importance.shape)} must match the weight {tuple(weight.shape)}")
    if mean.shape != (cols,) or var.shape != (cols,):
        raise ValueError(f"DSnoT: input statistics must have {cols} channels, got {tuple(mean.shape)} and {tuple(var.shape)}")
    if nm is not None and cols % nm[1]:
        raise ValueError(f"DSnoT: {cols} input columns are not a multiple of M={nm[1]}")
    contrib = weight.double() * mean.double()[None, :]  # c_ij = W_ij E[x_j]
    grow_value = contrib.abs() / var.double().clamp_min(1e-12).pow(var_power)[None, :]
    imp = importance.double()
    keep = keep.clone()
    frozen = torch.zeros_like(keep)  # swapped once: never moves again
    error = (contrib * (~keep)).sum(1)
    sign0 = torch.sign(error)
    before = float(error.abs().mean())
    active = error.abs() > threshold
    arange = torch.arange(rows)
    swaps = 0
    changed = torch.zeros(rows, dtype=torch.bool)
    done = 0
    neg_inf = torch.tensor(float("-inf"), dtype=torch.float64)
    pos_inf = torch.tensor(float("inf"), dtype=torch.float64)
    for done in range(1, cycles + 1):
        if not bool(active.any()):
            done -= 1
            break
        s = torch.sign(error)[:, None]
        grow_ok = ~keep & ~frozen & (torch.sign(contrib) == s)
        g_score = torch.where(grow_ok, grow_value, neg_inf)
        g_best, g = g_score.max(1)
        valid = active & torch.isfinite(g_best)
        if nm is not None:
            m = nm[1]
            start = g - g % m
            group = start[:, None] + torch.arange(m)[None, :]  # (rows, M) column indices
            cand = keep.gather(1, group) & ~frozen.gather(1, group)
            p_score = torch.where(cand, imp.gather(1, group), pos_inf)
            p_best, p_local = p_score.min(1)
            p = start + p_local
        else:
            prune_ok = keep & ~frozen & (torch.sign(contrib) == -s)
            p_best, p = torch.where(prune_ok, imp, pos_inf).min(1)
        valid &= torch.isfinite(p_best)
        after = error - contrib[arange, g] + contrib[arange, p]
        take = valid & (torch.sign(after) == sign0) & (after.abs() < error.abs())
        active &= take  # a row that cannot take its swap stops for good
        if not bool(take.any()):
            break
        r = arange[take]
        keep[r, g[take]] = True
        keep[r, p[take]] = False
        frozen[r, g[take]] = True
        frozen[r, p[take]] = True
        error = torch.where(take, after, error)
        changed |= take
        swaps += int(take.sum())
        active &= error.abs() > threshold
    return keep, DSnoTStats(swaps, int(changed.sum()), before, float(error.abs().mean()), done)
