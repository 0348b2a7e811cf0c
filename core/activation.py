"""Activation sparsity (TEAL-style): each linear's input entries with a magnitude at or below a
per-layer threshold are set to zero, so a kernel that stores the weight input-major reads only the
rows of the inputs that remain. The thresholds live in the model config (``activation_sparsity``)
and are applied by forward pre-hooks on the linears, so a saved model reloads with them
(``core.models.load_hf_dir``) and its exported graph computes them (Abs, Greater, Where).

Inputs are grouped by what they read: ``attn_in`` (q, k, v: the normed hidden state), ``o_in``,
``mlp_in`` (gate, up) and ``down_in`` (the gated activation); one threshold per group per block.

One output group, CATS-style (Lee et al. 2024): ``gate_out`` thresholds the gate's activation
SiLU(gate(x)) — an entry with |SiLU(g)| at or below the threshold is zero, so the up projection's
row and the down projection's input for it need not be computed at all. It is applied as a forward
hook on the gate that sets those pre-activations to 0 (SiLU(0) = 0), so the model stays a plain
gated MLP; models whose MLP is not SiLU-gated with a separate gate are refused.

Two forms (``spec['method']``): ``teal`` — calibrated magnitude thresholds (``thresholds``: block →
group → t; an entry is kept when |x| > t); ``topk`` — per token, the ``keep`` largest magnitudes of
each group's input (``keep``: block → group → k; an entry is kept when |x| is greater than the
(k+1)-th largest |x| of its row, so ties at that value go, and at most k remain). The top-k form needs
no calibration and keeps the same share of every token's inputs; thresholds keep more on some tokens
and fewer on others.
"""

from __future__ import annotations

from typing import Any

import torch

from core.adapters.base import ModelAdapter

CONFIG_KEY = "activation_sparsity"
GROUPS: dict[str, tuple[str, ...]] = {"attn_in": ("q", "k", "v", "qkv"), "o_in": ("o",), "mlp_in": ("gate", "up", "gate_up"), "down_in": ("down",)}
GATE_OUT = "gate_out"
"""The output group (CATS): the gate's SiLU activation, thresholded (threshold form only)."""
ALL_GROUPS: tuple[str, ...] = (*GROUPS, GATE_OUT)
GATE_OUT_EXCLUDES = ("mlp_in", "down_in")
"""Input groups that cannot be combined with ``gate_out``: both would sparsify the same MLP."""
_HOOK_ATTR = "_activation_sparsity_hook"
_OUT_HOOK_ATTR = "_activation_sparsity_out_hook"


def group_of(role: str) -> str | None:
    return next((g for g, roles in GROUPS.items() if role in roles), None)


def _threshold_hook(threshold: float):
    def hook(module: torch.nn.Module, args: tuple) -> tuple:
        x = args[0]
        return (torch.where(x.abs() > threshold, x, torch.zeros((), dtype=x.dtype, device=x.device)),) + tuple(args[1:])

    return hook


def _gate_hook(threshold: float):
    """Forward hook on a gate projection: pre-activations whose SiLU has a magnitude at or below the
    threshold become 0, so SiLU(gate) · up is exactly zero there."""

    def hook(module: torch.nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        return torch.where(torch.nn.functional.silu(out).abs() > threshold, out, torch.zeros((), dtype=out.dtype, device=out.device))

    return hook


def check_gate_out(model: torch.nn.Module, adapter: ModelAdapter) -> None:
    """ValueError unless ``gate_out`` applies: a SiLU-gated MLP with a separate gate projection."""
    act = getattr(getattr(model, "config", None), "hidden_act", None)
    if not adapter.gated_mlp or "gate" not in adapter.linear_paths or act not in ("silu", "swish"):
        raise ValueError(f"config '{CONFIG_KEY}': group '{GATE_OUT}' needs a SiLU-gated MLP with a separate gate projection; "
                         f"this {adapter.family} model has gated_mlp={adapter.gated_mlp}, linears {sorted(adapter.linear_paths)}, hidden_act={act!r}")


def topk_threshold(a: torch.Tensor, keep: int) -> torch.Tensor:
    """Per row of magnitudes ``a`` (..., K): the (keep+1)-th largest value, shape (..., 1); entries above it
    are the kept ones (at most ``keep``). ``keep`` must be in [1, K-1]."""
    return torch.topk(a, keep + 1, dim=-1).values[..., -1:]


def _topk_hook(keep: int):
    def hook(module: torch.nn.Module, args: tuple) -> tuple:
        x = args[0]
        a = x.abs()
        return (torch.where(a > topk_threshold(a, keep), x, torch.zeros((), dtype=x.dtype, device=x.device)),) + tuple(args[1:])

    return hook


def spec_values(spec: dict[str, Any]) -> tuple[str, dict[str, dict[str, Any]]]:
    """(method, block → group → value) of a spec: thresholds for ``teal``, kept counts for ``topk``;
    a malformed spec is a ValueError naming the key."""
    method = spec.get("method", "teal")
    key = {"teal": "thresholds", "topk": "keep"}.get(method)
    if key is None:
        raise ValueError(f"config '{CONFIG_KEY}': method {method!r} is not 'teal' or 'topk'")
    values = spec.get(key)
    if not isinstance(values, dict):
        raise ValueError(f"config '{CONFIG_KEY}': method {method!r} expects a '{key}' mapping of block → group → value, got {values!r}")
    return method, values


def apply_activation_spec(model: torch.nn.Module, adapter: ModelAdapter, spec: dict[str, Any]) -> int:
    """Install (or replace) the hooks a spec describes (:func:`spec_values`): {block index (str): {group: t or k}}.
    Returns the number of linears hooked; a block or group the model does not have, or a kept count
    outside [1, in_features - 1], is a ValueError."""
    method, thresholds = spec_values(spec)
    blocks = adapter.blocks(model)
    count = 0
    remove_activation_hooks(model, adapter)
    for b, groups in thresholds.items():
        i = int(b)
        if not 0 <= i < len(blocks):
            raise ValueError(f"config '{CONFIG_KEY}': block {i} is outside the model's {len(blocks)} blocks")
        if GATE_OUT in groups:
            clash = [g for g in GATE_OUT_EXCLUDES if g in groups]
            if clash:
                raise ValueError(f"config '{CONFIG_KEY}': block {i} sparsifies the MLP twice: '{GATE_OUT}' with {clash}")
        for group, t in groups.items():
            if group == GATE_OUT:
                if method != "teal":
                    raise ValueError(f"config '{CONFIG_KEY}': group '{GATE_OUT}' has the threshold form only (method 'teal'), not {method!r}")
                check_gate_out(model, adapter)
                for ref in adapter.linears(model, roles=["gate"], blocks=[i]):
                    setattr(ref.module, _OUT_HOOK_ATTR, ref.module.register_forward_hook(_gate_hook(float(t))))
                    count += 1
                continue
            if group not in GROUPS:
                raise ValueError(f"config '{CONFIG_KEY}': group '{group}' is not one of {', '.join(ALL_GROUPS)}")
            for ref in adapter.linears(model, roles=list(GROUPS[group]), blocks=[i]):
                if method == "topk":
                    if not isinstance(t, int) or not 1 <= t < ref.in_features:
                        raise ValueError(f"config '{CONFIG_KEY}': block {i} group '{group}' keeps {t!r} inputs; expected an integer in [1, {ref.in_features - 1}]")
                    hook = _topk_hook(t)
                else:
                    hook = _threshold_hook(float(t))
                setattr(ref.module, _HOOK_ATTR, ref.module.register_forward_pre_hook(hook))
                count += 1
    return count


def remove_activation_hooks(model: torch.nn.Module, adapter: ModelAdapter) -> None:
    for ref in adapter.linears(model):
        for attr in (_HOOK_ATTR, _OUT_HOOK_ATTR):
            old = getattr(ref.module, attr, None)
            if old is not None:
                old.remove()
                delattr(ref.module, attr)
