"""Sparse layout: every GEMM weight reaches its MatMul/Gemm as a plain initialiser.

TensorRT finds 2:4 weights only by looking back from a GEMM through Cast, Q/DQ
and Transpose (see :mod:`export.sparsity_report`); a weight behind a Reshape,
a Mul by a constant, or a chain of them is invisible to it. Rules:

1. a GEMM weight input computed from initialisers alone by a chain of
   Transpose / Reshape / Cast / Mul / Div / Unsqueeze / Squeeze / Identity nodes,
   at least one of which TensorRT does not look through (anything but Transpose
   and Cast), is folded into a new initialiser holding the computed value
   (evaluated with the ONNX reference evaluator), named ``<source initialiser>.folded``;
2. nothing else changes: in particular a tied embedding read through a plain
   Transpose (visible to TensorRT) is not duplicated.

Invariant: outputs are unchanged (the folded value is exactly what the chain
computed). Afterwards the pass records, per GEMM weight, whether it is 2:4 along
TensorRT's axis, in ``last_report``.
"""

from __future__ import annotations

import onnx
import onnx_ir as ir
from onnx.reference import ReferenceEvaluator

_FOLDABLE = {"Transpose", "Reshape", "Cast", "Mul", "Div", "Unsqueeze", "Squeeze", "Identity"}
_GEMM_WEIGHT = {"MatMul": (1, 0), "Gemm": (1,)}
_VISIBLE = {"Transpose", "Cast"}  # TensorRT's sparsity detection traces through these


def _chain(value: ir.Value) -> list[ir.Node] | None:
    """Nodes (producers first) computing ``value`` from initialisers only, through foldable ops."""
    nodes: list[ir.Node] = []
    stack = [value]
    while stack:
        v = stack.pop()
        if v.is_initializer() or v.const_value is not None:
            continue
        prod = v.producer()
        if prod is None or prod.op_type not in _FOLDABLE or prod.domain not in ("", "ai.onnx"):
            return None
        if prod not in nodes:
            nodes.append(prod)
        stack.extend(i for i in prod.inputs if i is not None)
    return list(reversed(nodes))


class SparseLayoutPass(ir.passes.InPlacePass):
    def __init__(self) -> None:
        super().__init__()
        self.last_report: list = []
        self.folded: list[str] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = False
        for node in list(graph):
            for slot in _GEMM_WEIGHT.get(node.op_type, ()):
                if slot >= len(node.inputs) or node.inputs[slot] is None:
                    continue
                value = node.inputs[slot]
                if value.is_initializer():
                    continue
                chain = _chain(value)
                if not chain or all(n.op_type in _VISIBLE for n in chain):
                    continue
                folded = self._evaluate(chain, value)
                sources = [i.name for n in chain for i in n.inputs if i is not None and i.is_initializer()]
                name = f"{sources[0] if sources else value.name}.folded"
                new = ir.Value(name=name, shape=ir.Shape(folded.shape), type=ir.TensorType(ir.DataType.from_numpy(folded.dtype)), const_value=ir.tensor(folded, name=name))
                graph.register_initializer(new)
                node.replace_input_with(slot, new)
                self.folded.append(name)
                modified = True
        if modified:
            from onnx_ir.passes.common import RemoveUnusedNodesPass

            RemoveUnusedNodesPass()(model)
            for n in [n for n, v in graph.initializers.items() if not v.uses() and v not in graph.outputs]:
                del graph.initializers[n]
        from export.sparsity_report import sparsity_report

        self.last_report = sparsity_report(ir.to_proto(model))
        return ir.passes.PassResult(model, modified)

    @staticmethod
    def _evaluate(chain: list[ir.Node], value: ir.Value):
        inits = {i.name: i.const_value.numpy() for n in chain for i in n.inputs if i is not None and i.const_value is not None}
        nodes = [ir.to_proto(n) for n in chain]
        g = onnx.helper.make_graph(
            nodes,
            "fold",
            [],
            [onnx.helper.make_tensor_value_info(value.name, onnx.TensorProto.UNDEFINED, None)],
            [onnx.numpy_helper.from_array(a, k) for k, a in inits.items()],
        )
        m = onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", 18)])
        return ReferenceEvaluator(m).run(None, {})[0]
