"""Precision: an FP16 graph for runtimes that take precision from the graph (TensorRT 11).

Rules:
1. every MatMul/Gemm whose weight input is a float32 initialiser gets that
   initialiser converted to float16 (Gemm's bias too);
2. its activation input is cast to float16 (one Cast per distinct tensor, shared by
   all the GEMMs that read it, e.g. q/k/v), and its output is cast back to float32.

Everything else — normalisations, softmax, residual adds, the logits' consumers —
stays float32, where fp16 would overflow or lose the small differences
normalisations need. Invariant: graph inputs and outputs keep their names and
types (the model's I/O stays int64/float32); only GEMM arithmetic and weight
storage change precision. GEMMs whose weights are not initialisers (e.g.
attention's QKᵀ) are left in float32.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

_GEMMS = {"MatMul": (1,), "Gemm": (1, 2)}


def _is_float32_initializer(value: ir.Value | None) -> bool:
    return value is not None and value.const_value is not None and value.is_initializer() and value.dtype == ir.DataType.FLOAT


class Fp16GemmPass(ir.passes.InPlacePass):
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        casts_in: dict[int, ir.Value] = {}
        converted: dict[int, ir.Value] = {}
        modified = False
        for node in list(graph):
            if node.op_type not in _GEMMS or node.domain not in ("", "ai.onnx"):
                continue
            weight_slots = [i for i in _GEMMS[node.op_type] if i < len(node.inputs)]
            if not weight_slots or not _is_float32_initializer(node.inputs[weight_slots[0]]):
                continue
            x = node.inputs[0]
            if x is None or x.dtype not in (ir.DataType.FLOAT, None):
                continue
            for slot in weight_slots:
                w = node.inputs[slot]
                if not _is_float32_initializer(w):
                    continue
                if id(w) not in converted:
                    arr = w.const_value.numpy().astype(np.float16)
                    w16 = ir.Value(name=f"{w.name}.fp16", shape=w.shape, type=ir.TensorType(ir.DataType.FLOAT16), const_value=ir.tensor(arr, name=f"{w.name}.fp16"))
                    graph.register_initializer(w16)
                    converted[id(w)] = w16
                node.replace_input_with(slot, converted[id(w)])
            if id(x) not in casts_in:
                cast = ir.node("Cast", inputs=[x], attributes={"to": ir.DataType.FLOAT16}, name=f"{node.name}_to_fp16")
                cast.outputs[0].name = f"{x.name}.fp16"
                cast.outputs[0].dtype = ir.DataType.FLOAT16
                graph.insert_before(node, cast)
                casts_in[id(x)] = cast.outputs[0]
            node.replace_input_with(0, casts_in[id(x)])
            y = node.outputs[0]
            name = y.name
            outputs_at = [i for i, o in enumerate(graph.outputs) if o is y]
            back = ir.node("Cast", inputs=[y], attributes={"to": ir.DataType.FLOAT}, name=f"{node.name}_to_fp32")
            graph.insert_after(node, back)
            y32 = back.outputs[0]
            y32.dtype = ir.DataType.FLOAT
            y32.shape = y.shape
            for user, index in list(y.uses()):  # consumers read the fp32 copy; the GEMM itself now yields fp16
                if user is not back:
                    user.replace_input_with(index, y32)
            for i in outputs_at:
                graph.outputs[i] = y32
            y.name = f"{name}.fp16"
            y32.name = name
            y.dtype = ir.DataType.FLOAT16
            modified = True
        if modified:
            from onnx_ir.passes.common import RemoveUnusedNodesPass, TopologicalSortPass

            # fp32 weights replaced by fp16 copies are no longer read
            for name in [n for n, v in graph.initializers.items() if not v.uses() and v not in graph.outputs]:
                del graph.initializers[name]
            RemoveUnusedNodesPass()(model)
            TopologicalSortPass()(model)
        return ir.passes.PassResult(model, modified)
