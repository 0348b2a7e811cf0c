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


TASK_OUTPUT = {"causal-lm": "logits", "encoder": "last_hidden_state"}
"""The output a task's model (and its exported graph) gives: next-token logits or the final hidden states."""


def task_output_name(task: str) -> str:
    if task not in TASK_OUTPUT:
        raise ValueError(f"task '{task}' is not one of {', '.join(TASK_OUTPUT)}")
    return TASK_OUTPUT[task]


def task_outputs(model: torch.nn.Module, task: str, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs: Any) -> Any:
    """The model's forward call for its task (a causal LM without its KV cache); the returned object
    holds :func:`task_output_name` and whatever ``kwargs`` asked for (e.g. hidden states)."""
    if task == "causal-lm":
        kwargs.setdefault("use_cache", False)
    return model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)


def task_forward(model: torch.nn.Module, task: str, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The one tensor the exported graph outputs for this task (logits or last hidden state)."""
    return getattr(task_outputs(model, task, input_ids, attention_mask), task_output_name(task))


@dataclass(frozen=True)
class LinearRef:
    """One linear layer of a block, found through an adapter."""

    name: str
    role: str
    block: int
    module: torch.nn.Module
    adapter: "ModelAdapter | None" = None

    @property
    def transposed(self) -> bool:
        """The weight is stored as (in, out) (the adapter's ``weight_layout``: GPT-2's ``Conv1D``)."""
        return self.adapter is not None and self.adapter.weight_layout == "in_out"

    def set_size(self, out_features: int, in_features: int) -> None:
        """Update the module's own size attributes after its weight was replaced (the adapter names them)."""
        sizes = self.adapter.linear_size_attrs if self.adapter is not None else {"in": "in_features", "out": "out_features"}
        for key, value in (("in", in_features), ("out", out_features)):
            if key in sizes and hasattr(self.module, sizes[key]):
                setattr(self.module, sizes[key], value)

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
class GatedMLP:
    """The parts of one block's gated MLP (``down(act(gate(x)) · up(x))``), found through the adapter."""

    module: torch.nn.Module
    gate: torch.nn.Module
    up: torch.nn.Module
    down: torch.nn.Module
    act: Any

    def unit_activity(self, x: torch.Tensor) -> torch.Tensor:
        """|act(gate(x)) · up(x)| per unit, in float32."""
        x = x.float()
        return (self.act(torch.nn.functional.linear(x, self.gate.weight.float())) * torch.nn.functional.linear(x, self.up.weight.float())).abs()

    def gate_activity(self, x: torch.Tensor) -> torch.Tensor:
        """|act(gate(x))| per unit, in float32 (the threshold selector's score)."""
        return self.act(torch.nn.functional.linear(x.float(), self.gate.weight.float())).abs()


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
    vocab: int | None = None
    head_slicing_refusal: str = ""
    """Why attention heads cannot be sliced out of this family's blocks (the adapter's reason); empty when they can."""

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
    weight_layout: str = "out_in"
    """How the block linears store their weight: 'out_in' (``nn.Linear``) or 'in_out' (GPT-2's ``Conv1D``)."""
    linear_size_attrs: dict[str, str] = field(default_factory=lambda: {"in": "in_features", "out": "out_features"})
    """The linear modules' attributes holding their input/output widths (updated when a width changes)."""
    mlp_activation: str | None = None
    """Gated MLPs: the MLP module's attribute holding the activation applied to the gate (``act(gate) · up``)."""
    native: dict[str, str] = field(default_factory=dict)
    """What the native CPU engine (``engines/native_cpu``) needs to run the family without PyTorch:
    paths of the token embedding (``embed``), the final norm (``final_norm``), and inside a block the
    norms before attention and MLP (``attn_norm``, ``mlp_norm``). Empty: the engine refuses the family."""
    head_attrs: dict[str, str] = field(default_factory=dict)
    """Attention attribute → what it holds after head removal: 'heads' (query heads), 'kv_heads',
    'groups' (query heads per KV head) or 'width' (query heads × head_dim)."""
    native_refusal: str = ""
    """Why the engines that run Llama-style blocks themselves (native-cpu, the fused ONNX Runtime graph)
    cannot run this family although its blocks look Llama-like (e.g. Qwen3's per-head q/k norms); empty
    when they can or when ``native`` is empty."""
    head_slicing_refusal: str = ""
    """Why structured removal cannot slice attention heads out of this family's blocks (e.g. Phi-3 slices its
    fused qkv_proj by the config's head counts); empty when it can."""

    @property
    def output_name(self) -> str:
        return task_output_name(self.task)

    def mlp_path(self) -> str:
        """The gated MLP's path inside a block (the parent of its gate projection)."""
        if not self.gated_mlp or "gate" not in self.linear_paths:
            raise ValueError(f"'{self.family}' has no gated MLP (act(gate) · up, then down)")
        return self.linear_paths["gate"].rsplit(".", 1)[0]

    def gated_mlp_names(self) -> dict[str, str]:
        """Attribute names inside the gated MLP module: gate, up and down linears and the activation."""
        prefix = self.mlp_path() + "."
        names = {r: self.linear_paths[r][len(prefix):] for r in ("gate", "up", "down") if self.linear_paths.get(r, "").startswith(prefix)}
        if len(names) != 3 or not self.mlp_activation:
            raise ValueError(f"'{self.family}': its gated MLP's gate/up/down linears and activation are not all inside '{self.mlp_path()}'")
        return {**names, "act": self.mlp_activation}

    def gated_mlp_parts(self, block: torch.nn.Module) -> GatedMLP:
        """The gated MLP of one block and its parts."""
        names = self.gated_mlp_names()
        mlp = get_submodule(block, self.mlp_path())
        return GatedMLP(mlp, getattr(mlp, names["gate"]), getattr(mlp, names["up"]), getattr(mlp, names["down"]), getattr(mlp, names["act"]))

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

    def _head_dim(self, config: Any, hidden: int, heads: int) -> int:
        """The config's own head width where the family states one (Qwen3, Gemma: not hidden / heads), else hidden / heads."""
        attr = self.config_keys.get("head_dim")
        explicit = getattr(config, attr, None) if attr else None
        return int(explicit) if isinstance(explicit, int) and explicit > 0 else hidden // heads

    def dims(self, config: Any) -> dict[str, int]:
        heads = self.config_value(config, "heads")
        hidden = self.config_value(config, "hidden")
        return {
            "layers": self.config_value(config, "layers"),
            "hidden": hidden,
            "heads": heads,
            "kv_heads": self.config_value(config, "kv_heads") if "kv_heads" in self.config_keys else heads,
            "head_dim": self._head_dim(config, hidden, heads),
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
            int(vocab) if isinstance(vocab := getattr(config, "vocab_size", None), int) else None,
            self.head_slicing_refusal,
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
                out.append(LinearRef(f"{self.blocks_path}.{b}.{path}", role, b, get_submodule(block, path), self))
        return out
