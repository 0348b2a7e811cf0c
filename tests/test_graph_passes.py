"""ONNX graph passes: cleanup, FP16 GEMMs, sparse layout — outputs kept, checker after each."""

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from export.graph import run_graph_passes
from export.graph.cleanup import CleanupPass
from export.graph.precision import Fp16GemmPass
from export.graph.sparse_layout import SparseLayoutPass
from export.onnx_export import export_onnx
from export.sparsity_report import sparsity_report
from tests.conftest import VOCAB, tiny_model


def _run(model, feeds):
    proto = model if isinstance(model, onnx.ModelProto) else ir.to_proto(model)
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


@pytest.fixture(scope="module")
def tiny_llama_onnx(tmp_path_factory):
    path = tmp_path_factory.mktemp("gp") / "m.onnx"
    export_onnx(tiny_model("llama"), "causal-lm", path, exporter="dynamo")
    return path


def _feeds(b=2, s=9):
    ids = np.random.default_rng(0).integers(0, VOCAB, (b, s)).astype(np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def test_cleanup_removes_identity_dead_nodes_and_duplicate_initializers():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])
    w = np.arange(16, dtype=np.float32).reshape(4, 4)
    nodes = [
        helper.make_node("Identity", ["x"], ["x1"], name="id"),
        helper.make_node("MatMul", ["x1", "w_a"], ["h"], name="mm1"),
        helper.make_node("MatMul", ["h", "w_b"], ["y"], name="mm2"),
        helper.make_node("Relu", ["h"], ["unused"], name="dead"),
    ]
    proto = helper.make_model(
        helper.make_graph(nodes, "g", [x], [y], [numpy_helper.from_array(w, "w_a"), numpy_helper.from_array(w.copy(), "w_b")]),
        opset_imports=[helper.make_opsetid("", 18)],
    )
    feeds = {"x": np.random.default_rng(1).standard_normal((2, 4)).astype(np.float32)}
    before = _run(proto, feeds)[0]
    model = ir.from_proto(proto)
    report = run_graph_passes(model, [CleanupPass()])
    assert report == {"CleanupPass": True}
    ops = [n.op_type for n in model.graph]
    assert ops == ["MatMul", "MatMul"]
    assert len(model.graph.initializers) == 1
    np.testing.assert_array_equal(_run(model, feeds)[0], before)
    assert run_graph_passes(model, [CleanupPass()]) == {"CleanupPass": False}  # nothing left to clean


def test_fp16_gemms_keep_io_types_and_accuracy(tiny_llama_onnx):
    model = ir.load(str(tiny_llama_onnx))
    feeds = _feeds()
    ref = _run(model, feeds)[0]
    run_graph_passes(model, [Fp16GemmPass(), CleanupPass()])
    proto = ir.to_proto(model)
    assert [i.type.tensor_type.elem_type for i in proto.graph.input] == [TensorProto.INT64, TensorProto.INT64]
    assert proto.graph.output[0].name == "logits" and proto.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    inits = {t.name: t for t in proto.graph.initializer}
    weight_gemms = [n for n in proto.graph.node if n.op_type == "MatMul" and n.input[1] in inits]
    block_gemms = [n for n in weight_gemms if n.input[1].startswith("model.layers.")]
    assert len(block_gemms) == 2 * 7  # every decoder linear
    assert all(inits[n.input[1]].data_type == TensorProto.FLOAT16 for n in weight_gemms)
    # (the tied lm_head reads the embedding through a Transpose, not an initialiser: it stays fp32)
    producers = {o: n for n in proto.graph.node for o in n.output}
    softmax_inputs = [producers.get(n.input[0]) for n in proto.graph.node if n.op_type == "Softmax"]
    assert softmax_inputs and all(p is None or p.op_type != "Cast" for p in softmax_inputs)  # softmax stays fp32
    got = _run(proto, feeds)[0]
    assert got.dtype == np.float32
    assert np.abs(got - ref).max() < 2e-2 * max(1.0, np.abs(ref).max())


def test_sparse_layout_folds_hidden_weights_so_tensorrt_can_see_them():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((16, 8)).astype(np.float32)
    w.reshape(4, 4, 8)[:, :2, :] = 0  # 2:4 along axis 0 (MatMul B's reduction axis)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 8])
    nodes = [
        helper.make_node("Reshape", ["w_flat", "shape"], ["w_r"], name="reshape"),
        helper.make_node("Mul", ["w_r", "scale"], ["w_s"], name="scale"),
        helper.make_node("MatMul", ["x", "w_s"], ["y"], name="mm"),
    ]
    inits = [
        numpy_helper.from_array(w.reshape(-1), "w_flat"),
        numpy_helper.from_array(np.array([16, 8], np.int64), "shape"),
        numpy_helper.from_array(np.array(0.5, np.float32), "scale"),
    ]
    proto = helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits), opset_imports=[helper.make_opsetid("", 18)])
    assert not sparsity_report(proto)  # hidden behind Reshape and Mul: nothing TensorRT could check
    feeds = {"x": rng.standard_normal((3, 16)).astype(np.float32)}
    before = _run(proto, feeds)[0]
    model = ir.from_proto(proto)
    p = SparseLayoutPass()
    run_graph_passes(model, [p])
    assert p.folded == ["w_flat.folded"]
    rows = {r.name: r for r in p.last_report}
    assert rows["w_flat.folded"].is_2of4 and rows["w_flat.folded"].via == "direct"
    assert [n.op_type for n in model.graph] == ["MatMul"]
    np.testing.assert_allclose(_run(model, feeds)[0], before, rtol=1e-6, atol=1e-6)


def test_sparse_layout_leaves_a_clean_export_alone(tiny_llama_onnx):
    model = ir.load(str(tiny_llama_onnx))
    p = SparseLayoutPass()
    assert run_graph_passes(model, [p]) == {"SparseLayoutPass": False}
    assert all(r.via == "direct" for r in p.last_report if r.name.startswith("model.layers."))
    assert {r.via for r in p.last_report} <= {"direct", "Transpose"}  # the tied lm_head: visible, not duplicated
