"""Per-weight sparsity report of an ONNX model, by TensorRT's 2:4 rules.

TensorRT looks for 2:4 structure in GEMM/convolution *weights* along the
reduction axis: MatMul input B along axis 0 (input A along axis 1 when A is a
weight), Gemm B along axis 1 with ``transB`` else 0 (A along 0 with ``transA``
else 1), Conv weights along axis 1 (input channels). A weight is traced back
from the consuming node through Cast / QuantizeLinear / DequantizeLinear
(axis unchanged) and Transpose (axis mapped through ``perm``); any other
producer hides the weight from sparsity detection. A traced weight is
*eligible* when it is float32/float16/bfloat16 and its reduction axis is a
multiple of 4 — the same rules as ``polygraphy inspect sparsity``, which this
report reproduces with vectorised checks.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

_AXIS_INSENSITIVE = {"Cast", "QuantizeLinear", "DequantizeLinear", "TRT_FP8QuantizeLinear", "TRT_FP8DequantizeLinear"}
_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}


@dataclass
class WeightSparsity:
    name: str
    consumer: str
    """Consuming node's op type and name, e.g. 'MatMul node_MatMul_12'."""
    axis: int
    """Reduction axis of the initializer itself (after tracing back through Transposes)."""
    shape: tuple[int, ...]
    dtype: str
    sparsity: float
    is_2of4: bool
    """Every group of 4 consecutive entries along ``axis`` has at least two zeros."""
    eligible: bool
    """Float type and axis length divisible by 4: TensorRT may run it with sparse kernels."""
    via: str
    """'direct', or the ops traced through (e.g. 'Transpose')."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _reduction_inputs(node: onnx.NodeProto) -> list[tuple[int, int]]:
    """(input index, reduction axis of that input) for GEMM-like nodes."""
    if node.op_type == "MatMul":
        return [(1, 0), (0, 1)]
    if node.op_type == "Gemm":
        attrs = {a.name: a.i for a in node.attribute}
        return [(1, 1 if attrs.get("transB", 0) else 0), (0, 0 if attrs.get("transA", 0) else 1)]
    if node.op_type == "Conv":
        return [(1, 1)]
    return []


def is_2of4_along(arr: np.ndarray, axis: int) -> bool:
    """At least two zeros in every group of 4 consecutive entries along ``axis``."""
    if arr.shape[axis] % 4:
        return False
    moved = np.moveaxis(arr, axis, -1)
    groups = moved.reshape(-1, arr.shape[axis] // 4, 4)
    return bool(((groups != 0).sum(-1) <= 2).all())


def sparsity_report(model: onnx.ModelProto | str | Path) -> list[WeightSparsity]:
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model))
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    found: dict[str, WeightSparsity] = {}

    def trace(tensor: str, axis: int, via: list[str]) -> tuple[str, int, list[str]] | None:
        while tensor not in inits:
            node = producer.get(tensor)
            if node is None:
                return None
            if node.op_type in _AXIS_INSENSITIVE:
                via.append(node.op_type)
                tensor = node.input[0]
            elif node.op_type == "Transpose":
                perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
                if perm is None:
                    return None
                via.append("Transpose")
                axis = perm.index(axis)
                tensor = node.input[0]
            else:
                return None
        return tensor, axis, via

    for node in g.node:
        for idx, axis in _reduction_inputs(node):
            if idx >= len(node.input):
                continue
            traced = trace(node.input[idx], axis, [])
            if traced is None:
                continue
            name, ax, via = traced
            if name in found:
                continue
            t = inits[name]
            arr = numpy_helper.to_array(t)
            if arr.ndim <= ax:
                continue
            eligible = t.data_type in _FLOAT_TYPES and arr.shape[ax] % 4 == 0
            found[name] = WeightSparsity(
                name=name,
                consumer=f"{node.op_type} {node.name}",
                axis=ax,
                shape=tuple(int(d) for d in arr.shape),
                dtype=onnx.helper.tensor_dtype_to_np_dtype(t.data_type).name if t.data_type != onnx.TensorProto.BFLOAT16 else "bfloat16",
                sparsity=float((arr == 0).mean()) if arr.size else 0.0,
                is_2of4=bool(eligible and is_2of4_along(arr, ax)),
                eligible=eligible,
                via="direct" if not via else "+".join(via),
            )
    return list(found.values())


def render_table(rows: list[WeightSparsity]) -> str:
    header = f"{'weight':<52} {'consumer':<8} {'shape':<16} {'axis':>4} {'sparsity':>8} {'2:4':>5} {'eligible':>8}  via"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r.name[:52]:<52} {r.consumer.split()[0]:<8} {'x'.join(map(str, r.shape)):<16} {r.axis:>4} "
            f"{r.sparsity:>8.3f} {('yes' if r.is_2of4 else 'no'):>5} {('yes' if r.eligible else 'no'):>8}  {r.via}"
        )
    n24 = sum(r.is_2of4 for r in rows)
    lines.append(f"{len(rows)} GEMM/Conv weights, {sum(r.eligible for r in rows)} eligible, {n24} 2:4-sparse along TensorRT's axis")
    return "\n".join(lines)
