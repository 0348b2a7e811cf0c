"""Shrink: remove FFN channels and attention heads whose weights are entirely zero.

A model exported with masked units (``structured: {apply: mask}``, or any pruning that
zeroed whole channels) still computes them. This pass finds them from the weights and
slices them out of the graph. A *consumer* is a ``MatMul(X, W)`` with a 2-D initialiser
``W`` [K, N] read by no other node; input row k of W all zero means feature k of X is
dead. From X the pass walks back to the projections that produce those features:

1. **FFN region**: X is computed from ``MatMul(·, W_p)`` projections (2-D initialisers
   [D, K], e.g. up and gate) through element-wise nodes only (activations, Mul, Add,
   Div, Cast, ...), whose other operands are scalars or 1-D initialisers of length K
   (biases). Dead features are removed from the consumer's rows, the projections'
   columns and those 1-D initialisers. Exact: element-wise nodes act per feature, and a
   dead feature's value was multiplied by zero rows.
2. **Attention region**: otherwise the walk follows data inputs (not the shape inputs
   of Reshape/Expand/Slice/..., not through Shape) back to the first weight MatMuls: the
   query projection (width K = heads × head_dim) and key/value projections (width K or
   kv_heads × head_dim), each optionally followed by a bias ``Add`` with a 1-D
   initialiser. A head is dead when its head_dim rows of W are all zero. Without GQA any
   dead head goes (one is always kept). With GQA only whole KV groups go — query heads
   then k/v heads of the group — because the group size is a constant of the exported
   graph (the KV-repeat ``Expand``); dead heads in live groups are reported, not removed.
   Head counts written as literals into the region's Reshape/Expand target shapes (the
   dynamo exporter does this; the tracing exporter writes -1 or reads shapes at run time)
   are rewritten by position in the layouts the exporters use: rank 5 = the KV repeat
   [B, kv, rep, L, d], rank 4 = [B, heads, L, d] or [B, L, heads, d], rank 3 = [B, L,
   heads·d]; a shared shape Concat is copied first so other blocks keep theirs.

Anything else (a region value that is a graph output or read outside the region, a
weight shared by several nodes, an unexpected node) leaves that consumer unchanged and
is reported in ``last_report``. Invariant: graph outputs are unchanged up to float
summation order (the removed terms were exact zeros).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import onnx_ir as ir

log = logging.getLogger(__name__)

_ELEMENTWISE = {
    "Mul", "Add", "Sub", "Div", "Sigmoid", "Tanh", "Relu", "Erf", "Gelu", "Silu", "Cast", "Identity", "Pow",
    "Sqrt", "Neg", "Abs", "Exp", "Softplus", "HardSigmoid", "HardSwish", "Clip", "LeakyRelu", "Elu", "Max", "Min",
}
# inputs of these ops that carry data (the rest are shapes, indices, axes)
_DATA_INPUTS = {
    "Reshape": (0,), "Expand": (0,), "Slice": (0,), "Unsqueeze": (0,), "Squeeze": (0,), "Transpose": (0,),
    "Softmax": (0,), "Where": (1, 2), "Gather": (0,), "Split": (0,), "Tile": (0,), "Pad": (0,),
}
_SHAPE_OPS = {"Shape", "Size", "ConstantOfShape", "Constant", "Range"}


@dataclass
class ShrinkReport:
    ffn: list[dict[str, Any]] = field(default_factory=list)
    attention: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"ffn": self.ffn, "attention": self.attention, "skipped": self.skipped}


def _weight(node: ir.Node) -> ir.Value | None:
    """The 2-D initialiser B of ``MatMul(A, B)``, read by this node only."""
    if node.op_type != "MatMul" or len(node.inputs) < 2 or node.inputs[1] is None:
        return None
    w = node.inputs[1]
    if not w.is_initializer() or w.const_value is None or len(w.const_value.shape) != 2:
        return None
    return w


def _array(v: ir.Value) -> np.ndarray:
    return v.const_value.numpy()


def _set_array(v: ir.Value, arr: np.ndarray) -> None:
    arr = np.ascontiguousarray(arr)
    v.const_value = ir.tensor(arr, name=v.name)
    v.shape = ir.Shape(arr.shape)


def _constant(v: ir.Value) -> np.ndarray | None:
    """The value of an initialiser, a Constant node's output, or an Identity of one (shared initialisers)."""
    if v.const_value is not None:
        return v.const_value.numpy()
    prod = v.producer()
    if prod is not None and prod.op_type == "Identity" and prod.inputs[0] is not None and prod.inputs[0].const_value is not None:
        return prod.inputs[0].const_value.numpy()
    if prod is not None and prod.op_type == "Constant" and "value" in prod.attributes:
        return prod.attributes["value"].value.numpy()
    return None


def _replace_side(graph: ir.Graph, node: ir.Node, slot: int, arr: np.ndarray) -> None:
    """Give ``node`` its own initialiser holding ``arr`` at input ``slot`` (the old one may be shared)."""
    old = node.inputs[slot]
    name = f"{old.name}.shrunk"
    i = 0
    while name in graph.initializers:
        i += 1
        name = f"{old.name}.shrunk{i}"
    arr = np.ascontiguousarray(arr)
    new = ir.Value(name=name, shape=ir.Shape(arr.shape), type=ir.TensorType(ir.DataType.from_numpy(arr.dtype)), const_value=ir.tensor(arr, name=name))
    graph.register_initializer(new)
    node.replace_input_with(slot, new)


def _bias_of(value: ir.Value, width: int) -> tuple[ir.Node, int, np.ndarray] | None:
    """An ``Add(value, b)`` right after a projection, with a constant 1-D b of ``width``."""
    uses = list(value.uses())
    if len(uses) != 1:
        return None
    node, idx = uses[0][0], uses[0][1]
    if node.op_type != "Add":
        return None
    other = node.inputs[1 - idx]
    arr = _constant(other) if other is not None else None
    if arr is not None and arr.shape == (width,):
        return node, 1 - idx, arr
    return None


def _walk_back(start: ir.Value, expand: Callable[[ir.Value, ir.Node | None], list[ir.Value] | None]) -> list[ir.Value] | None:
    """Values reached walking back from ``start``; ``expand(value, producer)`` names the inputs to follow
    (or None to abandon the walk, which then returns None). Each value is visited once."""
    values: list[ir.Value] = []
    stack, seen = [start], set()
    while stack:
        v = stack.pop()
        if id(v) in seen:
            continue
        seen.add(id(v))
        more = expand(v, v.producer())
        if more is None:
            return None
        values.append(v)
        stack.extend(more)
    return values


def _downstream(projections: list[ir.Node], values: list[ir.Value]) -> list[ir.Value]:
    """Region values computed from the projections' outputs (the ones whose widths change)."""
    members = {id(v): v for v in values}
    out: dict[int, ir.Value] = {}
    stack = [p.outputs[0] for p in projections]
    while stack:
        v = stack.pop()
        if id(v) in out:
            continue
        out[id(v)] = v
        for node, _ in v.uses():
            for o in node.outputs:
                if id(o) in members:
                    stack.append(o)
    return list(out.values())


class ShrinkPass(ir.passes.InPlacePass):
    def __init__(self, head_dim: int | None = None) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.last_report = ShrinkReport()

    def _skip(self, consumer: str, reason: str) -> bool:
        """Record why ``consumer`` is left unchanged; returns False (nothing modified)."""
        self.last_report.skipped.append({"consumer": consumer, "reason": reason})
        return False

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.last_report = ShrinkReport()
        graph = self._graph = model.graph
        outputs = set(id(v) for v in graph.outputs)
        modified = False
        for node in list(graph):
            w = _weight(node)
            if w is None or len(w.uses()) != 1:
                continue
            rows_dead = ~np.any(_array(w) != 0, axis=1)
            if not rows_dead.any():
                continue
            x = node.inputs[0]
            region = self._ffn_region(x, w.const_value.shape[0])
            if region is not None:
                modified |= self._shrink_ffn(node, w, rows_dead, region, outputs)
            else:
                modified |= self._shrink_attention(node, w, rows_dead, outputs)
        if modified:
            for name in [n for n, v in graph.initializers.items() if not v.uses() and v not in graph.outputs]:
                del graph.initializers[name]
        return ir.passes.PassResult(model, modified)

    # --- FFN ---------------------------------------------------------------------------------

    def _ffn_region(self, x: ir.Value, k: int) -> dict[str, Any] | None:
        """Projections, 1-D side constants and region values behind ``x``, or None if not an FFN."""
        projections: list[ir.Node] = []
        sides: list[tuple[ir.Node, int, np.ndarray]] = []

        def expand(v: ir.Value, prod: ir.Node | None) -> list[ir.Value] | None:
            if prod is None:
                return None  # a graph input
            pw = _weight(prod)
            if pw is not None and pw.const_value.shape[1] == k:
                projections.append(prod)
                return []
            if prod.op_type not in _ELEMENTWISE:
                return None
            more = []
            for slot, inp in enumerate(prod.inputs):
                if inp is None:
                    continue
                arr = _constant(inp)
                if arr is None:
                    more.append(inp)
                elif arr.shape == (k,):
                    sides.append((prod, slot, arr))
                elif arr.size != 1:
                    return None
            return more

        values = _walk_back(x, expand)
        if values is None or not projections:
            return None
        return {"projections": projections, "sides": sides, "values": values}

    def _shrink_ffn(self, consumer: ir.Node, w: ir.Value, dead: np.ndarray, region: dict[str, Any], outputs: set[int]) -> bool:
        keep = np.flatnonzero(~dead)
        if keep.size == 0:
            keep = np.array([0])  # keep one channel so every shape stays non-empty
        inside = {id(n) for n in region["projections"]} | {id(v.producer()) for v in region["values"]} | {id(consumer)}
        for v in region["values"]:
            if id(v) in outputs or any(id(u[0]) not in inside for u in v.uses()):
                return self._skip(w.name, f"value '{v.name}' is used outside the FFN region")
        weights = [p.inputs[1] for p in region["projections"]]
        if any(len(pw.uses()) != 1 for pw in weights):
            return self._skip(w.name, "a projection weight is shared with another node")
        before = int(dead.size)
        _set_array(w, _array(w)[keep])
        for pw in weights:
            _set_array(pw, _array(pw)[:, keep])
        for node, slot, arr in region["sides"]:
            _replace_side(self._graph, node, slot, arr[keep])
        for v in region["values"]:
            v.shape = None
        self.last_report.ffn.append({"consumer": w.name, "projections": [pw.name for pw in weights], "channels": before, "kept": int(keep.size)})
        return True

    # --- attention ---------------------------------------------------------------------------

    def _attention_region(self, x: ir.Value) -> tuple[list[ir.Node], list[ir.Value], list[ir.Node]]:
        """(projection MatMuls, region values, Reshape/Expand nodes) behind the attention output ``x``."""
        projections: list[ir.Node] = []
        reshapes: list[ir.Node] = []

        def expand(v: ir.Value, prod: ir.Node | None) -> list[ir.Value]:
            if prod is None or prod.op_type in _SHAPE_OPS:
                return []  # a graph input (attention mask) or shape arithmetic: nothing to slice behind it
            if _weight(prod) is not None:
                projections.append(prod)
                return []
            if prod.op_type in ("Reshape", "Expand"):
                reshapes.append(prod)
            slots = _DATA_INPUTS.get(prod.op_type, range(len(prod.inputs)))
            return [prod.inputs[i] for i in slots if i < len(prod.inputs) and prod.inputs[i] is not None and not prod.inputs[i].is_initializer()]

        values = _walk_back(x, expand) or []
        values = [v for v in values if v.producer() is not None and v.producer().op_type not in _SHAPE_OPS]
        return projections, values, reshapes

    def _shape_pieces(self, node: ir.Node) -> list[tuple[ir.Node | None, int, np.ndarray | None]] | None:
        """The target shape of a Reshape/Expand as pieces (Concat node or None, input slot, constant or None).

        None when the shape is neither a constant nor a Concat of pieces of known length."""
        shape = node.inputs[1]
        if shape is None:
            return None
        arr = _constant(shape)
        if arr is not None:
            return [(None, 1, arr.reshape(-1))]
        prod = shape.producer()
        if prod is None or prod.op_type != "Concat":
            return []  # computed at run time from data shapes: nothing literal to fix
        pieces = []
        literals = []
        unknown = False
        for i, inp in enumerate(prod.inputs):
            a = _constant(inp) if inp is not None else None
            if a is not None:
                literals += a.reshape(-1).tolist()
            if a is None and (inp is None or inp.shape is None or len(inp.shape) != 1 or not isinstance(inp.shape[0], int)):
                unknown = True
                continue
            pieces.append((prod, i, a.reshape(-1) if a is not None else np.zeros(int(inp.shape[0]), np.int64) - 2))
        if unknown:
            # positions unknown: fine only if no literal could be a head count
            return [] if all(v <= 0 or v == self.head_dim for v in literals) else None
        return pieces

    def _head_literal_edits(self, reshapes: list[ir.Node], counts: dict[int, int], kv: tuple[int, int]) -> list | None:
        """Edits turning literal head counts in the region's Reshape/Expand shapes into the new ones.

        Positions follow the layouts the exporters write: rank 5 is the KV repeat [B, kv, rep, L, d]
        (position 1 is the KV head count, 2 the unchanged group size); in rank 4 a positive literal
        at position 1 or 2 is a head count (heads or KV heads); in rank 3 the last entry may be
        heads × head_dim. Returns None when a shape cannot be read."""
        edits = []
        for node in reshapes:
            pieces = self._shape_pieces(node)
            if pieces is None:
                return None
            full = np.concatenate([p[2] for p in pieces]) if pieces else np.zeros(0, np.int64)
            rank = full.size
            for pos, value in enumerate(full.tolist()):
                if value <= 0:
                    continue
                new = None
                if rank == 5 and pos == 1:
                    new = kv[1] if value == kv[0] else None
                elif rank == 4 and pos in (1, 2) and value in counts:
                    new = counts[value]
                elif rank == 3 and pos == 2 and value in counts:
                    new = counts[value]
                if new is not None and new != value:
                    start = 0
                    for concat, slot, arr in pieces:
                        if start <= pos < start + arr.size:
                            edits.append((node, concat, slot, pos - start, new))
                            break
                        start += arr.size
        return edits

    def _apply_literal_edits(self, edits: list) -> None:
        clones: dict[int, ir.Node] = {}
        for node, concat, slot, offset, new in edits:
            target = node
            if concat is not None:
                # a shape Concat may be shared with other blocks: give this Reshape/Expand its own copy
                if id(node) not in clones:
                    clone = ir.node("Concat", inputs=list(concat.inputs), attributes={"axis": concat.attributes["axis"].value})
                    self._graph.insert_before(node, clone)
                    node.replace_input_with(1, clone.outputs[0])
                    clones[id(node)] = clone
                target = clones[id(node)]
            arr = _constant(target.inputs[slot]).copy()
            flat = arr.reshape(-1)
            flat[offset] = new
            _replace_side(self._graph, target, slot, arr)

    def _shrink_attention(self, consumer: ir.Node, w: ir.Value, dead_rows: np.ndarray, outputs: set[int]) -> bool:
        name = w.name
        hd = self.head_dim
        k = dead_rows.size
        if hd is None or k % hd:
            return self._skip(name, f"not an FFN region, and head_dim {hd} does not divide its width {k}")
        projections, values, reshapes = self._attention_region(consumer.inputs[0])
        widths = {p.inputs[1].const_value.shape[1] for p in projections}
        q_nodes = [p for p in projections if p.inputs[1].const_value.shape[1] == k]
        kv_nodes = [p for p in projections if p.inputs[1].const_value.shape[1] != k]
        kv_widths = {p.inputs[1].const_value.shape[1] for p in kv_nodes}
        if not (len(projections) == 3 and len(q_nodes) >= 1 and len(kv_widths) <= 1 and all(wd % hd == 0 for wd in widths)):
            return self._skip(name, f"expected q/k/v projections behind the attention output, found widths {sorted(widths)}")
        heads = k // hd
        kv_heads = (next(iter(kv_widths)) // hd) if kv_widths else heads
        if heads % kv_heads:
            return self._skip(name, f"{heads} heads do not split into {kv_heads} KV groups")
        group = heads // kv_heads
        dead_heads = dead_rows.reshape(heads, hd).all(1)
        inside = {id(p) for p in projections} | {id(v.producer()) for v in values} | {id(consumer)}
        for v in _downstream(projections, values):
            if id(v) in outputs or any(id(u[0]) not in inside and u[0].op_type not in _SHAPE_OPS for u in v.uses()):
                return self._skip(name, f"value '{v.name}' is used outside the attention region")
        if group == 1:
            keep_q = np.flatnonzero(~dead_heads)
            keep_kv = keep_q
        else:
            dead_groups = dead_heads.reshape(kv_heads, group).all(1)
            keep_kv = np.flatnonzero(~dead_groups)
            keep_q = np.array([g * group + i for g in keep_kv for i in range(group)], dtype=np.int64)
        if keep_kv.size == 0:
            keep_kv = np.array([0])
            keep_q = np.arange(group)
        if keep_q.size == heads:
            self.last_report.attention.append({"consumer": name, "heads": heads, "kv_heads": kv_heads, "kept": heads, "kept_kv": kv_heads, "dead_heads_kept": int(dead_heads.sum()), "reason": "no whole KV group is dead"})
            return False
        counts = {heads: int(keep_q.size), kv_heads: int(keep_kv.size), heads * hd: int(keep_q.size) * hd}
        edits = self._head_literal_edits(reshapes, counts, (kv_heads, int(keep_kv.size)))
        if edits is None:
            return self._skip(name, "a Reshape/Expand shape behind the attention output cannot be read")
        rows_q = (keep_q[:, None] * hd + np.arange(hd)[None]).reshape(-1)
        rows_kv = (keep_kv[:, None] * hd + np.arange(hd)[None]).reshape(-1)
        weights = [p.inputs[1] for p in projections] + [w]
        if any(len(x.uses()) != 1 for x in weights):
            return self._skip(name, "a projection weight is shared with another node")
        if kv_nodes and len(q_nodes) != 1:
            return self._skip(name, "cannot tell the query projection from key/value")
        _set_array(w, _array(w)[rows_q])
        for p in projections:
            pw = p.inputs[1]
            is_q = not kv_nodes or p is q_nodes[0]  # without GQA, q, k and v keep the same heads
            cols = rows_q if is_q else rows_kv
            bias = _bias_of(p.outputs[0], _array(pw).shape[1])
            _set_array(pw, _array(pw)[:, cols])
            if bias is not None:
                _replace_side(self._graph, bias[0], bias[1], bias[2][cols])
        self._apply_literal_edits(edits)
        for v in values:
            v.shape = None
        self.last_report.attention.append(
            {"consumer": name, "heads": heads, "kv_heads": kv_heads, "kept": int(keep_q.size), "kept_kv": int(keep_kv.size),
             "dead_heads_kept": int(dead_heads.sum()) - (heads - int(keep_q.size))}
        )
        return True
