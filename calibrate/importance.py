"""Per-head and per-FFN-channel importance from calibration data.

Two estimators, each returning, for every block, one score per query head and one per
FFN channel:

- ``activation``: the expected squared norm of the unit's contribution to the block's
  output. A head h writes ``a_h W_o,hᵀ`` into the residual stream, so its score is
  ``E‖a_h W_o,hᵀ‖² = tr(W_o,hᵀ W_o,h · E[a_h a_hᵀ])`` — read from the output
  projection's input second moments (one Hessian collector per block, taken by the
  layer-wise runner). An FFN channel j writes ``x_j W_down[:, j]``: ``E[x_j²]‖W_down[:, j]‖²``.
- ``taylor``: first-order Taylor expansion of the loss in a mask gate per unit (Michel et
  al. 2019, "Are Sixteen Heads Really Better than One?"): ``|∂L/∂ξ_h| = |Σ_tokens a_h ·
  ∂L/∂a_h|`` per window, averaged over windows. The loss is the model's own
  next-token loss, so this estimator needs a causal LM.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from calibrate.runner import LayerwiseRunner
from calibrate.stats import Collector, HessianCollector, InputNormCollector
from core.adapters.base import LinearRef, ModelAdapter
from core.progress import progress

log = logging.getLogger(__name__)

METHODS = ("activation", "taylor")


@dataclass
class Importance:
    heads: list[torch.Tensor]
    """Per block: one score per query head."""
    ffn: list[torch.Tensor]
    """Per block: one score per FFN channel."""
    method: str


def _head_scores_from_moments(w_o: torch.Tensor, second_moment: torch.Tensor, hd: int) -> torch.Tensor:
    """tr(W_hᵀ W_h S_hh) for every head h; ``w_o`` is (out, heads·hd), S the input second moment."""
    w = w_o.double()
    heads = w.shape[1] // hd
    scores = torch.empty(heads, dtype=torch.float64)
    for h in range(heads):
        sl = slice(h * hd, (h + 1) * hd)
        g = w[:, sl].t() @ w[:, sl]
        scores[h] = (g * second_moment[sl, sl]).sum()
    return scores.clamp(min=0).float()


def activation_importance(
    model: torch.nn.Module,
    adapter: ModelAdapter,
    windows: torch.Tensor,
    hd: int,
    batch_size: int = 8,
    compute_dtype: torch.dtype = torch.float32,
    show_progress: bool = True,
) -> Importance:
    blocks = len(adapter.blocks(model))
    heads: list[torch.Tensor | None] = [None] * blocks
    ffn: list[torch.Tensor | None] = [None] * blocks

    def make(ref: LinearRef) -> Collector:
        return HessianCollector(ref.in_features) if ref.role == "o" else InputNormCollector(ref.in_features)

    def apply(block: int, refs: list[LinearRef], cols: dict[str, Collector]) -> None:
        for ref in refs:
            col = cols[ref.name]
            if ref.role == "o":
                assert isinstance(col, HessianCollector)
                heads[block] = _head_scores_from_moments(ref.weight_out_in(), col.sum / col.rows, hd)
            else:
                norms = ref.weight_out_in().double().pow(2).sum(0)
                ffn[block] = (col.sq_norms() / col.rows * norms).float()

    runner = LayerwiseRunner(model, adapter, windows, batch_size=batch_size, show_progress=show_progress, compute_dtype=compute_dtype)
    runner.run(make, apply, roles=["o", "down"])
    if any(h is None for h in heads) or any(f is None for f in ffn):
        raise RuntimeError("activation importance: some block's o/down projection was never called")
    return Importance([h for h in heads if h is not None], [f for f in ffn if f is not None], "activation")


def taylor_importance(
    model: torch.nn.Module,
    adapter: ModelAdapter,
    windows: torch.Tensor,
    hd: int,
    compute_dtype: torch.dtype = torch.float32,
    show_progress: bool = True,
) -> Importance:
    """|Σ_tokens a·∂L/∂a| per head / FFN channel and window, averaged over windows (batch of one)."""
    if adapter.task != "causal-lm":
        raise ValueError(
            f"taylor importance needs the model's own loss, and '{adapter.family}' is an {adapter.task} "
            "without one; use importance: activation"
        )
    refs = adapter.linears(model, roles=["o", "down"])
    sums: dict[str, torch.Tensor] = {}
    grads_needed = []
    saved = {p: p.requires_grad for p in model.parameters()}

    def hook_for(ref: LinearRef) -> Any:
        width = hd if ref.role == "o" else 1

        def pre(_m: torch.nn.Module, args: tuple) -> None:
            x = args[0]

            def on_grad(g: torch.Tensor) -> None:
                contrib = (x.detach().float() * g.float()).sum(dim=-2)  # over tokens: (batch, in)
                per_unit = contrib.reshape(contrib.shape[0], -1, width).sum(-1).abs().sum(0)
                sums[ref.name] = sums.get(ref.name, 0) + per_unit.double()

            if x.requires_grad:
                x.register_hook(on_grad)
            else:
                grads_needed.append(ref.name)

        return pre

    handles = [r.module.register_forward_pre_hook(hook_for(r)) for r in refs]
    emb = model.get_input_embeddings().weight
    was_training = model.training
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        emb.requires_grad_(True)  # activations then carry gradients; no weight gradient but this one
        model.eval()
        rows = range(windows.shape[0])
        for i in progress(rows, desc="taylor importance") if show_progress else rows:
            ids = windows[i : i + 1]
            with torch.autocast("cpu", dtype=compute_dtype, enabled=compute_dtype != torch.float32):
                out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids, use_cache=False)
            out.loss.float().backward()
            emb.grad = None
    finally:
        for h in handles:
            h.remove()
        for p, flag in saved.items():
            p.requires_grad_(flag)
        model.train(was_training)
    if grads_needed:
        raise RuntimeError(f"taylor importance: no gradient reached {grads_needed[:3]}")
    n = windows.shape[0]
    heads = [(sums[r.name] / n).float() for r in refs if r.role == "o"]
    ffn = [(sums[r.name] / n).float() for r in refs if r.role == "down"]
    return Importance(heads, ffn, "taylor")
