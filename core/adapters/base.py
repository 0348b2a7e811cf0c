"""Model adapters: what differs between transformer families, as data.

An adapter says where the blocks are, which linears play which role
(q/k/v/qkv/o for attention, up/gate/down for the MLP), how to read head counts
from the config, and whether the model is causal. Passes and exports work
through it, so adding a family is one small file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


def get_submodule(root: torch.nn.Module, path: str) -> torch.nn.Module:
    return root.get_submodule(path) if path else root


@dataclass(frozen=True)
class LinearRef:
    """One linear layer of a block, found through an adapter."""

    name: str
    role: str
    block: int
    module: torch.nn.Module

    @property
    def transposed(self) -> bool:
        """GPT-2's ``Conv1D`` stores its weight as (in, out)."""
        return type(self.module).__name__ == "Conv1D"

    def weight_out_in(self) -> torch.Tensor:
        """A view of the weight as (out_features, in_features); in-place edits reach the module."""
        w = self.module.weight.data
        return w.t() if self.transposed else w

    @property
    def in_features(self) -> int:
        return self.weight_out_in().shape[1]

    @property
    def out_features(self) -> int:
        return self.weight_out_in().shape[0]


@dataclass(frozen=True)
class ModelFacts:
    """What the checks before a build need to know of a model, read from its config alone (no weights)."""

    family: str
    task: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    context: int | None
    """Longest sequence the model's positions cover (None where the config does not say)."""
    gated_mlp: bool
    roles: tuple[str, ...]

    def in_features(self, role: str) -> int:
        """Width of the reduction (input) axis of a linear of this role."""
        return self.ffn if role == "down" else self.heads * self.head_dim if role == "o" else self.hidden


@dataclass(frozen=True)
class ModelAdapter:
    family: str
    model_types: tuple[str, ...]
    task: str
    """'causal-lm' or 'encoder'."""
    blocks_path: str
    """Dotted path of the ModuleList of blocks, relative to the loaded model."""
    linear_paths: dict[str, str]
    """Role → dotted path inside one block."""
    config_keys: dict[str, str]
    """Our names (heads, kv_heads, hidden, ffn, layers) → the config attribute."""
    defaults: dict[str, Any] = field(default_factory=dict)
    gated_mlp: bool = False
    head_path: str | None = None
    """Output head (e.g. lm_head) that calibration capture may skip; None for encoders."""
    attention_path: str = ""
    """Attention module inside one block, whose head-count attributes structured pruning updates."""
    head_attrs: dict[str, str] = field(default_factory=dict)
    """Attention attribute → what it holds after head removal: 'heads' (query heads), 'kv_heads',
    'groups' (query heads per KV head) or 'width' (query heads × head_dim)."""

    def matches(self, config: Any) -> bool:
        return getattr(config, "model_type", None) in self.model_types

    def config_value(self, config: Any, key: str) -> int:
        attr = self.config_keys.get(key)
        value = getattr(config, attr, None) if attr else None
        if value is None:
            default = self.defaults.get(key)
            value = default(config) if callable(default) else default
        if value is None:
            raise ValueError(f"{self.family} config has no value for '{key}' (attribute '{attr}')")
        return int(value)

    def dims(self, config: Any) -> dict[str, int]:
        heads = self.config_value(config, "heads")
        hidden = self.config_value(config, "hidden")
        return {
            "layers": self.config_value(config, "layers"),
            "hidden": hidden,
            "heads": heads,
            "kv_heads": self.config_value(config, "kv_heads") if "kv_heads" in self.config_keys else heads,
            "head_dim": hidden // heads,
            "ffn": self.config_value(config, "ffn"),
        }

    def facts(self, config: Any) -> ModelFacts:
        """The model's facts from its config (a transformers config or any object with its attributes)."""
        d = self.dims(config)
        ctx_attr = self.config_keys.get("context")
        context = getattr(config, ctx_attr, None) if ctx_attr else None
        return ModelFacts(
            self.family, self.task, d["layers"], d["hidden"], d["heads"], d["kv_heads"], d["head_dim"], d["ffn"],
            int(context) if isinstance(context, int) else None, self.gated_mlp, tuple(self.linear_paths),
        )

    def blocks(self, model: torch.nn.Module) -> list[torch.nn.Module]:
        return list(get_submodule(model, self.blocks_path))

    def linears(
        self,
        model: torch.nn.Module,
        roles: list[str] | tuple[str, ...] | None = None,
        blocks: list[int] | None = None,
    ) -> list[LinearRef]:
        """Linears of the selected blocks and roles, in block order then role order."""
        out = []
        all_blocks = self.blocks(model)
        chosen = range(len(all_blocks)) if not blocks else [b for b in blocks if b < len(all_blocks)]
        for b in chosen:
            block = all_blocks[b]
            for role, path in self.linear_paths.items():
                if roles is not None and role not in roles:
                    continue
                out.append(LinearRef(f"{self.blocks_path}.{b}.{path}", role, b, get_submodule(block, path)))
        return out
