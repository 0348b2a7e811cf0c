"""Activation sparsity (TEAL-style): each linear's input entries with a magnitude at or below a
per-layer threshold are set to zero, so a kernel that stores the weight input-major reads only the
rows of the inputs that remain. The thresholds live in the model config (``activation_sparsity``)
and are applied by forward pre-hooks on the linears, so a saved model reloads with them
(``core.models.load_hf_dir``) and its exported graph computes them (Abs, Greater, Where).

Inputs are grouped by what they read: ``attn_in`` (q, k, v: the normed hidden state), ``o_in``,
``mlp_in`` (gate, up) and ``down_in`` (the gated activation); one threshold per group per block.
"""

from __future__ import annotations

from typing import Any

import torch

from core.adapters.base import ModelAdapter

CONFIG_KEY = "activation_sparsity"
GROUPS: dict[str, tuple[str, ...]] = {"attn_in": ("q", "k", "v", "qkv"), "o_in": ("o",), "mlp_in": ("gate", "up", "gate_up"), "down_in": ("down",)}
_HOOK_ATTR = "_activation_sparsity_hook"


def group_of(role: str) -> str | None:
    return next((g for g, roles in GROUPS.items() if role in roles), None)


def _threshold_hook(threshold: float):
    def hook(module: torch.nn.Module, args: tuple) -> tuple:
        x = args[0]
        return (torch.where(x.abs() > threshold, x, torch.zeros((), dtype=x.dtype, device=x.device)),) + tuple(args[1:])

    return hook


def apply_activation_spec(model: torch.nn.Module, adapter: ModelAdapter, spec: dict[str, Any]) -> int:
    """Install (or replace) the threshold hooks ``spec['thresholds']`` describes: {block index (str): {group: t}}.
    Returns the number of linears hooked; a block or group the model does not have is a ValueError."""
    thresholds = spec.get("thresholds")
    if not isinstance(thresholds, dict):
        raise ValueError(f"config '{CONFIG_KEY}': expected a 'thresholds' mapping of block → group → threshold, got {thresholds!r}")
    blocks = adapter.blocks(model)
    count = 0
    for ref in adapter.linears(model):
        old = getattr(ref.module, _HOOK_ATTR, None)
        if old is not None:
            old.remove()
            delattr(ref.module, _HOOK_ATTR)
    for b, groups in thresholds.items():
        i = int(b)
        if not 0 <= i < len(blocks):
            raise ValueError(f"config '{CONFIG_KEY}': block {i} is outside the model's {len(blocks)} blocks")
        for group, t in groups.items():
            if group not in GROUPS:
                raise ValueError(f"config '{CONFIG_KEY}': group '{group}' is not one of {', '.join(GROUPS)}")
            for ref in adapter.linears(model, roles=list(GROUPS[group]), blocks=[i]):
                setattr(ref.module, _HOOK_ATTR, ref.module.register_forward_pre_hook(_threshold_hook(float(t))))
                count += 1
    return count


def remove_activation_hooks(model: torch.nn.Module, adapter: ModelAdapter) -> None:
    for ref in adapter.linears(model):
        old = getattr(ref.module, _HOOK_ATTR, None)
        if old is not None:
            old.remove()
            delattr(ref.module, _HOOK_ATTR)
