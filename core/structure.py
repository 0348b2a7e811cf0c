"""Physical removal of attention heads and FFN channels, and per-layer shapes that survive save/reload.

A block's attention is described by its query heads, its key/value heads (fewer under GQA:
query head ``h`` reads KV head ``h // group``) and the head width; its MLP by the FFN
width. Removing heads slices the rows of q/k/v (of a fused qkv projection: one
segment each) and the input columns of the output projection; removing FFN channels
slices the rows of up/gate and the input columns of down. Biases follow their rows;
output biases stay. The attention module's head-count attributes are updated through
the adapter (``head_attrs``) so the family's own forward runs unchanged.

Under GQA every kept KV head must keep the same number of query heads (the attention
kernels repeat each KV head ``group`` times), so within-group removal is uniform per
layer; whole KV groups can go freely.

Per-layer shapes are written into the saved config as ``pruned_layers`` and
:func:`apply_layer_shapes` rebuilds an empty model of those shapes before the weights
are loaded (``core.models.load_hf_dir`` does this), since Hugging Face configs have
one head count and one FFN width for all layers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch

from core.adapters.base import LinearRef, ModelAdapter, get_submodule

CONFIG_KEY = "pruned_layers"


@dataclass(frozen=True)
class LayerShape:
    heads: int
    kv_heads: int
    ffn: int

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def head_dim(adapter: ModelAdapter, config: Any) -> int:
    return adapter.dims(config)["head_dim"]


def _refs(model: torch.nn.Module, adapter: ModelAdapter, block: int) -> dict[str, LinearRef]:
    return {r.role: r for r in adapter.linears(model, blocks=[block])}


def _ffn_width(refs: dict[str, LinearRef]) -> int:
    return refs["gate_up"].out_features // 2 if "gate_up" in refs else refs["up"].out_features


def _block_shape(refs: dict[str, LinearRef], hd: int) -> LayerShape:
    if "qkv" in refs:  # fused [q | k | v]: the query width is the output projection's input
        heads = refs["o"].in_features // hd
        return LayerShape(heads, (refs["qkv"].out_features // hd - heads) // 2, _ffn_width(refs))
    return LayerShape(refs["q"].out_features // hd, refs["k"].out_features // hd, _ffn_width(refs))


def layer_shapes(model: torch.nn.Module, adapter: ModelAdapter) -> list[LayerShape]:
    """Heads, KV heads and FFN width of every block, read from the weights themselves."""
    hd = head_dim(adapter, model.config)
    return [_block_shape(_refs(model, adapter, b), hd) for b in range(len(adapter.blocks(model)))]


def linear_macs(model: torch.nn.Module, adapter: ModelAdapter) -> int:
    """Multiply-adds per token of every decoder block's linears (in × out of each weight as stored; a
    masked channel still counts: the graph computes it). Passes record it before and after
    (``info['linear_macs_per_token']``) so the report can place variants at the same work."""
    return sum(ref.in_features * ref.out_features for ref in adapter.linears(model))


def _set_weight(ref: LinearRef, weight_out_in: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Replace a linear's weight (given as (out, in)) and bias, keeping the module's storage convention."""
    m = ref.module
    w = weight_out_in.t() if ref.transposed else weight_out_in
    m.weight = torch.nn.Parameter(w.contiguous().clone(), requires_grad=m.weight.requires_grad)
    if bias is not None:
        m.bias = torch.nn.Parameter(bias.contiguous().clone(), requires_grad=m.bias.requires_grad)
    ref.set_size(*weight_out_in.shape)


def _rows(ref: LinearRef, rows: torch.Tensor) -> None:
    w = ref.weight_out_in()
    bias = ref.module.bias.data[rows] if getattr(ref.module, "bias", None) is not None else None
    _set_weight(ref, w[rows], bias)


def _cols(ref: LinearRef, cols: torch.Tensor) -> None:
    _set_weight(ref, ref.weight_out_in()[:, cols], None)


def _head_rows(heads: Sequence[int], hd: int) -> torch.Tensor:
    if not heads:
        return torch.zeros(0, dtype=torch.long)
    return torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in heads])


def kv_heads_for(keep_heads: Sequence[int], heads: int, kv_heads: int) -> list[int]:
    """The KV heads a set of kept query heads needs, checking GQA's equal-group rule."""
    group = heads // kv_heads
    per_kv: dict[int, int] = {}
    for h in keep_heads:
        per_kv[h // group] = per_kv.get(h // group, 0) + 1
    if len(set(per_kv.values())) > 1:
        raise ValueError(
            f"kept query heads {sorted(keep_heads)} leave KV groups with unequal sizes {per_kv}; "
            "GQA attention needs the same number of query heads for every kept KV head"
        )
    return sorted(per_kv)


@dataclass(frozen=True)
class _Plan:
    """What one block keeps: row indices of q (and of o's input), of k/v, of the FFN; None = all."""

    shape: LayerShape
    hd: int
    refs: dict[str, LinearRef]
    q_rows: torch.Tensor | None
    kv_rows: torch.Tensor | None
    ffn: torch.Tensor | None
    kept: LayerShape


def _plan(model: torch.nn.Module, adapter: ModelAdapter, block: int, keep_heads: Sequence[int] | None, keep_ffn: Sequence[int] | None) -> _Plan:
    """Check the kept units of one block against its shape and GQA's equal-group rule."""
    hd = head_dim(adapter, model.config)
    refs = _refs(model, adapter, block)
    shape = _block_shape(refs, hd)
    q_rows = kv_rows = ffn = None
    heads, kv, width = shape.heads, shape.kv_heads, shape.ffn
    if keep_heads is not None:
        keep = sorted(set(int(h) for h in keep_heads))
        if not keep or keep[0] < 0 or keep[-1] >= shape.heads:
            raise ValueError(f"block {block}: kept heads {keep} must be a non-empty subset of 0..{shape.heads - 1}")
        keep_kv = kv_heads_for(keep, shape.heads, shape.kv_heads)
        q_rows, kv_rows = _head_rows(keep, hd), _head_rows(keep_kv, hd)
        heads, kv = len(keep), len(keep_kv)
    if keep_ffn is not None:
        keep = sorted(set(int(c) for c in keep_ffn))
        if not keep or keep[0] < 0 or keep[-1] >= shape.ffn:
            raise ValueError(f"block {block}: kept FFN channels must be a non-empty subset of 0..{shape.ffn - 1}")
        ffn = torch.tensor(keep, dtype=torch.long)
        width = len(keep)
    return _Plan(shape, hd, refs, q_rows, kv_rows, ffn, LayerShape(heads, kv, width))


def _qkv_rows(plan: _Plan) -> torch.Tensor:
    """Rows of a fused [q | k | v] projection (GPT-2; Phi-3 with GQA) that the plan keeps."""
    q_width, kv_width = plan.shape.heads * plan.hd, plan.shape.kv_heads * plan.hd
    return torch.cat([plan.q_rows, plan.kv_rows + q_width, plan.kv_rows + q_width + kv_width])


def _ffn_rows(plan: _Plan, role: str) -> torch.Tensor:
    """Rows of an FFN input projection that the plan keeps: a fused [gate | up] (Phi-3) keeps each channel twice."""
    return torch.cat([plan.ffn, plan.ffn + plan.shape.ffn]) if role == "gate_up" else plan.ffn


def slice_block(
    model: torch.nn.Module,
    adapter: ModelAdapter,
    block: int,
    keep_heads: Sequence[int] | None = None,
    keep_ffn: Sequence[int] | None = None,
) -> LayerShape:
    """Keep only the listed query heads and FFN channels of one block (``None`` keeps all)."""
    plan = _plan(model, adapter, block, keep_heads, keep_ffn)
    refs = plan.refs
    with torch.no_grad():
        if plan.q_rows is not None:
            if "qkv" in refs:
                _rows(refs["qkv"], _qkv_rows(plan))
            else:
                _rows(refs["q"], plan.q_rows)
                _rows(refs["k"], plan.kv_rows)
                _rows(refs["v"], plan.kv_rows)
            _cols(refs["o"], plan.q_rows)
            k = plan.kept
            attn = get_submodule(adapter.blocks(model)[block], adapter.attention_path)
            values = {"heads": k.heads, "kv_heads": k.kv_heads, "groups": k.heads // k.kv_heads, "width": k.heads * plan.hd}
            for attr, what in adapter.head_attrs.items():
                setattr(attn, attr, values[what])
        if plan.ffn is not None:
            for role in ("up", "gate", "gate_up"):
                if role in refs:
                    _rows(refs[role], _ffn_rows(plan, role))
            _cols(refs["down"], plan.ffn)
    return plan.kept


def _dropped(kept: torch.Tensor, total: int) -> torch.Tensor:
    mask = torch.ones(total, dtype=torch.bool)
    mask[kept] = False
    return mask


def mask_block(
    model: torch.nn.Module,
    adapter: ModelAdapter,
    block: int,
    keep_heads: Sequence[int] | None = None,
    keep_ffn: Sequence[int] | None = None,
) -> LayerShape:
    """Zero (instead of removing) the heads and FFN channels not kept; shapes stay, outputs equal slicing.
    Returns the shape the block would have if sliced."""
    plan = _plan(model, adapter, block, keep_heads, keep_ffn)
    refs = plan.refs
    with torch.no_grad():
        if plan.q_rows is not None:
            gone = _dropped(plan.q_rows, plan.shape.heads * plan.hd)
            if "qkv" in refs:
                refs["qkv"].weight_out_in()[_dropped(_qkv_rows(plan), refs["qkv"].out_features)] = 0
            else:
                gone_kv = _dropped(plan.kv_rows, plan.shape.kv_heads * plan.hd)
                refs["q"].weight_out_in()[gone] = 0
                refs["k"].weight_out_in()[gone_kv] = 0
                refs["v"].weight_out_in()[gone_kv] = 0
            refs["o"].weight_out_in()[:, gone] = 0
        if plan.ffn is not None:
            gone_c = _dropped(plan.ffn, plan.shape.ffn)
            for role in ("up", "gate", "gate_up"):
                if role in refs:
                    refs[role].weight_out_in()[_dropped(_ffn_rows(plan, role), refs[role].out_features)] = 0
            refs["down"].weight_out_in()[:, gone_c] = 0
    return plan.kept


def record_shapes(model: torch.nn.Module, adapter: ModelAdapter) -> list[LayerShape]:
    """Write the per-layer shapes into the config (saved as ``pruned_layers``) when any differ from it."""
    shapes = layer_shapes(model, adapter)
    d = adapter.dims(model.config)
    dense = LayerShape(d["heads"], d["kv_heads"], d["ffn"])
    if any(s != dense for s in shapes):
        setattr(model.config, CONFIG_KEY, [s.to_dict() for s in shapes])
    return shapes


def parse_layer_shapes(raw: Any, layers: int) -> list[LayerShape]:
    if not isinstance(raw, list) or len(raw) != layers:
        raise ValueError(f"config '{CONFIG_KEY}' must list one shape per layer ({layers}), got {raw!r:.200}")
    out = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict) or set(item) != {"heads", "kv_heads", "ffn"}:
            raise ValueError(f"config '{CONFIG_KEY}[{i}]' must be {{heads, kv_heads, ffn}}, got {item!r}")
        s = LayerShape(int(item["heads"]), int(item["kv_heads"]), int(item["ffn"]))
        if min(s.heads, s.kv_heads, s.ffn) < 1 or s.heads % s.kv_heads:
            raise ValueError(f"config '{CONFIG_KEY}[{i}]' = {item} is not a valid layer shape")
        out.append(s)
    return out


def apply_layer_shapes(model: torch.nn.Module, adapter: ModelAdapter, shapes: list[LayerShape]) -> None:
    """Shrink a freshly built (dense-shaped) model to ``shapes``; its weights are to be loaded afterwards."""
    current = layer_shapes(model, adapter)
    if len(shapes) != len(current):
        raise ValueError(f"{len(shapes)} layer shapes for a model with {len(current)} blocks")
    for b, (want, have) in enumerate(zip(shapes, current)):
        keep_heads = None
        if (want.heads, want.kv_heads) != (have.heads, have.kv_heads):
            group = want.heads // want.kv_heads
            have_group = have.heads // have.kv_heads
            if group > have_group or want.kv_heads > have.kv_heads:
                raise ValueError(f"block {b}: shape {want} is larger than the model's {have}")
            keep_heads = [g * have_group + i for g in range(want.kv_heads) for i in range(group)]
        keep_ffn = list(range(want.ffn)) if want.ffn != have.ffn else None
        slice_block(model, adapter, b, keep_heads, keep_ffn)
    setattr(model.config, CONFIG_KEY, [s.to_dict() for s in shapes])
