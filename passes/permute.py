"""Input-channel permutation before N:M selection, folded into the layer that produces the input.

An N:M pattern keeps N of every M *consecutive* inputs, so two important input channels that
happen to share a group compete for its N places. Reordering a linear's inputs changes which
channels share a group; when the reordering is folded into the linear that produces those inputs
(its output rows permuted the same way), the model computes exactly the same function. Two places
inside a decoder block allow it without touching the residual stream:

1. ``down``'s inputs are act(gate(x)) · up(x) per FFN channel: permute gate's and up's output rows
   (and biases) and down's input columns together;
2. ``o``'s inputs are the heads' attention outputs, each head's channels the value channels of its
   KV head: one permutation per KV head, applied to v's output rows of that head and to o's input
   columns of every query head that reads it (so grouped-query attention stays exact).

The permutation maximises the importance the N:M mask keeps, Σ_rows Σ_groups (sum of the N
largest scores in the group), by a chunked greedy assignment: channels sorted by total importance
are dealt out in M chunks of G = inputs/M channels; chunk k is matched to the G groups (greedy
maximum-gain matching over the G × G table of "kept importance this channel adds to that group":
Σ_rows max(0, value − the group's N-th largest in that row), exact since a new member can only
displace the N-th largest).
The identity is kept when it scores at least as well. Scores are the pass's own (Wanda |W|·‖X‖, or
SparseGPT's w²/[H⁻¹]_jj).
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

from calibrate.stats import Collector
from core.adapters.base import LinearRef

log = logging.getLogger(__name__)


def kept_importance(scores: torch.Tensor, n: int, m: int) -> float:
    """Σ over rows and groups of M consecutive columns of the N largest scores (what an N:M mask keeps)."""
    rows, cols = scores.shape
    return float(scores.reshape(rows, cols // m, m).topk(n, dim=-1).values.sum())


def _greedy_match(gain: torch.Tensor) -> torch.Tensor:
    """Channel → group for a square gain table, taking the largest remaining gain first."""
    g = gain.shape[0]
    order = torch.argsort(gain.reshape(-1), descending=True).tolist()
    match = [-1] * g
    used = [False] * g
    left = g
    for flat in order:
        c, grp = divmod(flat, g)
        if match[c] < 0 and not used[grp]:
            match[c], used[grp] = grp, True
            left -= 1
            if not left:
                break
    return torch.tensor(match)


def nm_permutation(scores: torch.Tensor, n: int, m: int, chunk: int = 64) -> torch.Tensor:
    """A column order ``perm`` (new column i = old column perm[i]) raising the N:M-kept importance of
    ``scores`` (rows, cols); the identity when it does not."""
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"channel permutation: {cols} inputs are not a multiple of M={m}")
    s = scores.float().abs()
    groups = cols // m
    ranked = torch.argsort(s.sum(0), descending=True)
    members: list[list[int]] = [[] for _ in range(groups)]
    for k in range(m):
        chans = ranked[k * groups : (k + 1) * groups]
        if k < n:  # fewer than N members: every channel is kept wherever it goes
            for grp, c in enumerate(chans.tolist()):
                members[grp].append(c)
            continue
        held = s[:, torch.tensor(members)].permute(1, 0, 2)  # (groups, rows, k), k >= n
        nth = held.topk(n, dim=-1).values[..., -1]  # (groups, rows): the smallest value the group keeps now
        gain = torch.empty(groups, groups)
        for i in range(0, groups, chunk):
            cand = s[:, chans[i : i + chunk]].t()  # (c, rows)
            # a new member raises a row's kept sum only by displacing the N-th largest: relu(value - nth)
            gain[i : i + chunk] = (cand[:, None, :] - nth[None]).clamp_min_(0).sum(-1)
        for c, grp in zip(chans.tolist(), _greedy_match(gain).tolist()):
            members[grp].append(c)
    perm = torch.tensor([c for grp in members for c in grp])
    if kept_importance(s[:, perm], n, m) <= kept_importance(s, n, m):
        return torch.arange(cols)
    return perm


def head_permutation(scores: torch.Tensor, n: int, m: int, heads: int, kv_heads: int) -> torch.Tensor:
    """One permutation of head channels per KV head for ``o``'s inputs: ``scores`` (rows, heads × d);
    the query heads of a KV head share its permutation (their column blocks stacked as extra rows).
    Returns the full column order of o's inputs (and, per KV head, of v's output rows)."""
    rows, cols = scores.shape
    d = cols // heads
    if d % m:
        raise ValueError(f"channel permutation: head width {d} is not a multiple of M={m}")
    per_kv = heads // kv_heads
    blocks = scores.reshape(rows, heads, d)
    perms = []
    for g in range(kv_heads):
        stacked = blocks[:, g * per_kv : (g + 1) * per_kv].permute(1, 0, 2).reshape(-1, d)
        perms.append(nm_permutation(stacked, n, m))
    return torch.cat([g_perm + h * d for h in range(heads) for g_perm in [perms[h // per_kv]]])


def kv_rows(o_perm: torch.Tensor, heads: int, kv_heads: int) -> torch.Tensor:
    """v's output-row order matching an o input order from :func:`head_permutation`."""
    d = o_perm.numel() // heads
    per_kv = heads // kv_heads
    return torch.cat([o_perm[(g * per_kv) * d : (g * per_kv + 1) * d] - (g * per_kv) * d + g * d for g in range(kv_heads)])


def _permute_rows(ref: LinearRef, order: torch.Tensor) -> None:
    """Output rows (and bias) of a producer linear reordered: new row i = old row order[i]."""
    with torch.no_grad():
        w = ref.weight_out_in()
        w.copy_(w[order].clone())
        bias = getattr(ref.module, "bias", None)
        if bias is not None:
            bias.copy_(bias[order].clone())


def _permute_cols(ref: LinearRef, order: torch.Tensor) -> None:
    with torch.no_grad():
        w = ref.weight_out_in()
        w.copy_(w[:, order].clone())


def permute_block(
    refs: list[LinearRef],
    collectors: dict[str, Collector],
    saliency: Callable[[list[torch.Tensor], Collector], tuple],
    nm: tuple[int, int],
    head_dim: int,
) -> dict[str, dict[str, float]]:
    """Permute ``down``'s and ``o``'s inputs of one block before its N:M pruning (see the module
    docstring), folding each permutation into its producers and the collectors' statistics. A role
    is left alone when its producers are not among ``refs`` (they must be pruned — and refreshed —
    with it). Returns, per permuted role, the N:M-kept share of its importance before and after."""
    by_role = {r.role: r for r in refs}
    n, m = nm
    out: dict[str, dict[str, float]] = {}
    plans = []
    if {"down", "gate", "up"} <= by_role.keys():
        plans.append(("down", ["gate", "up"], None))
    if {"o", "v"} <= by_role.keys():
        plans.append(("o", ["v"], head_dim))
    for role, producers, d in plans:
        ref = by_role[role]
        col = collectors[ref.name]
        (score,), *_ = saliency([ref.weight_out_in()], col)
        if d is None:
            order = nm_permutation(score, n, m)
            producer_order = {p: order for p in producers}
        else:
            heads = ref.weight_out_in().shape[1] // d
            kv_heads = by_role["v"].weight_out_in().shape[0] // d
            order = head_permutation(score, n, m, heads, kv_heads)
            producer_order = {"v": kv_rows(order, heads, kv_heads)}
        total = float(score.double().abs().sum()) or 1.0
        before = kept_importance(score.abs(), n, m) / total
        after = kept_importance(score.abs()[:, order], n, m) / total
        out[role] = {"kept_before": round(before, 6), "kept_after": round(after, 6)}
        if torch.equal(order, torch.arange(order.numel())):
            continue
        _permute_cols(ref, order)
        for p, o in producer_order.items():
            _permute_rows(by_role[p], o)
        col.permute(order)
    return out
