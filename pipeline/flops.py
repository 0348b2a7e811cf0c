"""Whole-model forward FLOPs of a decoder or encoder with per-layer shapes.

Counted (2 FLOPs per multiply-add): every linear of every block (q/k/v/o, up/gate/down),
the attention scores QKᵀ and the weighted sum PV over the full key length (the exported
graphs compute the whole score matrix and mask it), and the output head (vocabulary projection) for
every position the graph produces logits for. Not counted: norms, activations,
softmax, rotary and residual adds (element-wise, a small fraction at these shapes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from core.structure import LayerShape


@dataclass(frozen=True)
class FlopsModel:
    hidden: int
    head_dim: int
    vocab: int
    gated: bool
    layers: tuple[LayerShape, ...]
    output_head: bool = True
    """Count the vocabulary projection (causal LMs)."""

    @classmethod
    def of(cls, model: Any, adapter: Any) -> "FlopsModel":
        from core.structure import head_dim, layer_shapes

        d = adapter.dims(model.config)
        return cls(d["hidden"], head_dim(adapter, model.config), int(model.config.vocab_size), adapter.gated_mlp, tuple(layer_shapes(model, adapter)), adapter.task == "causal-lm")

    def forward(self, batch: int, new_tokens: int, context: int | None = None) -> dict[str, float]:
        """FLOPs of one forward over ``new_tokens`` positions attending to ``context`` keys (default: themselves)."""
        keys = new_tokens if context is None else context
        tokens = batch * new_tokens
        linear = attention = 0.0
        for s in self.layers:
            q, kv = s.heads * self.head_dim, s.kv_heads * self.head_dim
            per_token = self.hidden * (q + 2 * kv) + q * self.hidden + (3 if self.gated else 2) * self.hidden * s.ffn
            linear += 2.0 * tokens * per_token
            attention += 2.0 * 2 * batch * s.heads * new_tokens * keys * self.head_dim
        head = 2.0 * tokens * self.hidden * self.vocab if self.output_head else 0.0
        return {"linear": linear, "attention": attention, "output_head": head, "total": linear + attention + head}
