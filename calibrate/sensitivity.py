"""Statistics for sensitivity-aware mixed sparsity (issue 11): per-linear error curves and
Hessian-trace estimates. ``passes.allocation`` decides the sparsities from them.

**Error curve.** For a linear with weight W (out × in) and input Hessian H = (2/n)XᵀX, removing
weight w_ij alone raises the layer's mean squared output error by

- ``obs`` (SparseGPT, ``passes.sparsegpt.obs_saliency``, on the solver's own damped factorisation):
  w_ij² / [H⁻¹]_jj, the Optimal Brain Surgeon saliency, which assumes the rest of the row is
  re-fitted (SparseGPT's error compensation);
- ``diag`` (Wanda): w_ij² · H_jj = (|w_ij|·‖X_j‖)² · 2/n, the error without any update: Wanda's
  own score squared.

The curve E(s) is the sum of the smallest saliencies that a sparsity s removes — over the whole
matrix (``matrix`` scope, SparseGPT's unstructured selection) or row by row (``row`` scope,
Wanda's per-output selection) — at s = 0, 1/G, …, 1. Sorted saliencies make E convex in s. Summing
single-weight saliencies ignores their interactions (with compensation the true error is lower at
high sparsity); it is an estimate of the *shape* of each layer's cost, which is what an
allocation compares.

**Energy.** Σ w_ij² H_jj, the diagonal estimate of the layer's mean squared output. E(s)/energy is
the relative output error, scale-free across layers.

**Measured loss** (:func:`loss_from_block`): the model's mean next-token loss on a few
calibration windows when block b's inputs are given (the hidden states the runner holds) and
blocks b, b+1, … and the head run as they are; the pass calls it with block b pruned to several
candidate sparsities, everything else untouched, so ΔL_b(s) includes how the block's error
propagates through the rest of the model — which neither output-error estimate sees.

**Hessian trace** (Hutchinson): tr(G_l) ≈ mean over Rademacher v of vᵀ(Gv) restricted to the
entries of layer l, where G is the Hessian of the model's mean next-token loss and Gv comes from
double back-propagation. It converts a layer's output error into loss: if G_l ≈ c_l · (H_l ⊗ I)
then ΔL ≈ ½ c_l ΔE with c_l = tr(G_l) / (out_l · tr(H_l)).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from core.adapters.base import ModelAdapter
from core.progress import progress

log = logging.getLogger(__name__)

GRID = 100
"""Curve points: sparsity k/GRID for k = 0..GRID."""


@dataclass
class ErrorCurve:
    """One linear's estimated output error at each grid sparsity, and its output energy."""

    name: str
    block: int
    role: str
    numel: int
    rows: int
    curve: torch.Tensor
    """(GRID + 1,) float64, E(k/GRID); curve[0] = 0."""
    energy: float
    trace_h: float
    """tr(H) of the layer's input Hessian (the local curvature per output row)."""


def cumulative_smallest(saliency: torch.Tensor, scope: str, grid: int = GRID) -> torch.Tensor:
    """Sum of the smallest ``s`` share of ``saliency`` (out × in) for s = k/grid: over the whole
    matrix (``matrix``) or the same count in every row (``row``)."""
    if scope not in ("matrix", "row"):
        raise ValueError(f"scope '{scope}' is not one of matrix, row")
    sal = saliency.double()
    ks = torch.arange(grid + 1, dtype=torch.float64) / grid
    if scope == "matrix":
        flat = sal.reshape(-1).sort().values
        csum = torch.cat([torch.zeros(1, dtype=torch.float64), flat.cumsum(0)])
        idx = (ks * flat.numel()).round().long()
        return csum[idx]
    rows = sal.sort(dim=1).values.cumsum(1)
    csum = torch.cat([torch.zeros(rows.shape[0], 1, dtype=torch.float64), rows], 1).sum(0)
    idx = (ks * sal.shape[1]).round().long()
    return csum[idx]


def diag_saliency(weight: torch.Tensor, h_diag: torch.Tensor) -> torch.Tensor:
    """w² · H_jj: the squared output error of removing w without compensation (Wanda's score²)."""
    return weight.double().pow(2) * h_diag.double()[None, :]


def error_curve(name: str, block: int, role: str, weight: torch.Tensor, saliency: torch.Tensor, h_diag: torch.Tensor, scope: str) -> ErrorCurve:
    w2 = weight.double().pow(2)
    return ErrorCurve(
        name=name,
        block=block,
        role=role,
        numel=weight.numel(),
        rows=weight.shape[0],
        curve=cumulative_smallest(saliency, scope),
        energy=float((w2 * h_diag.double()[None, :]).sum()),
        trace_h=float(h_diag.double().sum()),
    )


def hutchinson_traces(
    model: torch.nn.Module,
    adapter: ModelAdapter,
    windows: torch.Tensor,
    samples: int = 8,
    seed: int = 0,
    roles: list[str] | tuple[str, ...] | None = None,
    show_progress: bool = True,
) -> dict[str, float]:
    """tr(G_l) of the loss Hessian for every target linear, by Hutchinson's estimator on ``windows``.

    One gradient with a graph, then ``samples`` Hessian-vector products (double back-propagation),
    each with a fresh Rademacher vector over all the target weights at once; the cross-layer terms
    of vᵀGv average out, so the per-layer partial sums estimate each layer's own trace. The model's
    weights are not changed; its ``requires_grad`` flags are restored.
    """
    if adapter.task != "causal-lm":
        raise ValueError(f"Hessian-trace sensitivity needs a language-model loss; a {adapter.task} model has none")
    if samples < 1:
        raise ValueError(f"hutchinson samples {samples} must be at least 1")
    t0 = time.perf_counter()
    refs = adapter.linears(model, roles=roles)
    params = [r.module.weight for r in refs]
    flags = {id(p): p.requires_grad for p in model.parameters()}
    gen = torch.Generator().manual_seed(seed)
    traces = [0.0] * len(refs)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        ids = windows.long()
        # the fused CPU attention kernels have no second derivative; the math kernel has
        with sdpa_kernel(SDPBackend.MATH):
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids, use_cache=False)
            grads = torch.autograd.grad(out.loss, params, create_graph=True)
        it = range(samples)
        for i in progress(it, desc="Hessian trace (Hutchinson)") if show_progress else it:
            vs = [torch.randint(0, 2, p.shape, generator=gen, dtype=torch.int8).to(p.dtype).mul_(2).sub_(1) for p in params]
            with sdpa_kernel(SDPBackend.MATH):
                hvs = torch.autograd.grad(grads, params, grad_outputs=vs, retain_graph=i < samples - 1)
            for j, (v, hv) in enumerate(zip(vs, hvs)):
                traces[j] += float((v * hv).sum()) / samples
    finally:
        for p in model.parameters():
            p.requires_grad_(flags[id(p)])
    log.info("Hutchinson traces of %d linears from %d samples on %s windows in %.1f s", len(refs), samples, tuple(windows.shape), time.perf_counter() - t0)
    return {r.name: t for r, t in zip(refs, traces)}


class _Inject(torch.nn.Module):
    """Stands in for block b: runs it on the given hidden states instead of what the embeddings produce."""

    def __init__(self, block: torch.nn.Module, hidden: torch.Tensor):
        super().__init__()
        self.block = block
        self.hidden = hidden

    def forward(self, hidden: torch.Tensor, *args, **kwargs):
        return self.block(self.hidden.to(hidden.dtype), *args, **kwargs)


def loss_from_block(model: torch.nn.Module, adapter: ModelAdapter, block: int, hidden: torch.Tensor, ids: torch.Tensor, tuple_out: bool = False) -> float:
    """Mean next-token loss of ``ids`` when block ``block`` receives ``hidden`` (its inputs for those
    windows) and the blocks from it on, then the head, run as they are now. The blocks before it are
    pass-through stand-ins (``tuple_out``: the family's blocks return tuples), so every block keeps its
    own index — and its own attention mask where blocks alternate sliding-window and global attention."""
    from calibrate.runner import PassThrough

    if adapter.task != "causal-lm":
        raise ValueError(f"loss-based sensitivity needs a language-model loss; a {adapter.task} model has none")
    if hidden.shape[:2] != ids.shape:
        raise ValueError(f"hidden states {tuple(hidden.shape)} do not match windows {tuple(ids.shape)}")
    parent_path, _, attr = adapter.blocks_path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    original = getattr(parent, attr)
    blocks = list(original)
    try:
        stand_ins = [PassThrough(blocks[i], tuple_out=tuple_out) for i in range(block)]
        setattr(parent, attr, torch.nn.ModuleList([*stand_ins, _Inject(blocks[block], hidden), *blocks[block + 1 :]]))
        with torch.inference_mode():
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids, use_cache=False)
    finally:
        setattr(parent, attr, original)
    return float(out.loss)
