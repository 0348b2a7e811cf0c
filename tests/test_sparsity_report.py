"""`pipeline inspect` must agree with `polygraphy inspect sparsity` on every weight."""

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from export.onnx_export import export_onnx
from export.sparsity_report import is_2of4_along, sparsity_report
from passes import PassContext
from passes.magnitude import MagnitudeConfig, MagnitudePass
from core.adapters import adapter_for
from tests.conftest import tiny_model


def _polygraphy(model: onnx.ModelProto):
    from polygraphy.tools.sparse import SparsityPruner

    pruner = SparsityPruner(model)
    pruner.check()
    return {n: info.axis for n, info in pruner.prune_infos.items()}, set(pruner.sparse_tensors)


@pytest.fixture(scope="module")
def tiny_2of4_onnx(tmp_path_factory):
    model = tiny_model("llama")
    MagnitudePass(MagnitudeConfig(pattern="2:4", targets=["q", "k", "v", "o", "gate", "up"])).run(model, PassContext(adapter_for(model.config)))
    path = tmp_path_factory.mktemp("inspect") / "m.onnx"
    export_onnx(model, "causal-lm", path, exporter="dynamo")
    return path


def test_report_agrees_with_polygraphy_on_every_weight(tiny_2of4_onnx):
    proto = onnx.load(str(tiny_2of4_onnx))
    poly_axes, poly_sparse = _polygraphy(proto)
    rows = {r.name: r for r in sparsity_report(proto)}
    eligible = {n for n, r in rows.items() if r.eligible}
    assert eligible == set(poly_axes)
    assert {n: rows[n].axis for n in eligible} == poly_axes
    assert {n for n, r in rows.items() if r.is_2of4} == poly_sparse
    # what was pruned is 2:4, what was not (down_proj, lm_head) is not
    assert rows["model.layers.0.self_attn.q_proj.weight.T"].is_2of4
    assert not rows["model.layers.0.mlp.down_proj.weight.T"].is_2of4
    assert rows["model.layers.1.mlp.up_proj.weight.T"].sparsity == pytest.approx(0.5)


def test_gemm_transpose_and_cast_rules_agree_with_polygraphy():
    rng = np.random.default_rng(0)
    w24 = rng.standard_normal((8, 16)).astype(np.float32)
    w24.reshape(8, 4, 4)[:, :, :2] = 0  # 2:4 along axis 1 (the reduction axis of Gemm transB=1)
    wt = w24.T.copy()  # (16, 8): 2:4 along axis 0 only
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16])
    y1 = helper.make_tensor_value_info("y1", TensorProto.FLOAT, [2, 8])
    y2 = helper.make_tensor_value_info("y2", TensorProto.FLOAT, [2, 8])
    y3 = helper.make_tensor_value_info("y3", TensorProto.FLOAT, [2, 8])
    nodes = [
        helper.make_node("Gemm", ["x", "g_w"], ["y1"], name="gemm_tb", transB=1),
        helper.make_node("Transpose", ["t_w"], ["t_wT"], name="tr", perm=[1, 0]),
        helper.make_node("MatMul", ["x", "t_wT"], ["y2"], name="mm_tr"),
        helper.make_node("Cast", ["c_w"], ["c_wf"], name="cast", to=TensorProto.FLOAT),
        helper.make_node("MatMul", ["x", "c_wf"], ["y3"], name="mm_cast"),
    ]
    inits = [
        numpy_helper.from_array(w24, "g_w"),  # Gemm transB: axis 1 → 2:4
        numpy_helper.from_array(w24, "t_w"),  # transposed into B: axis 0 of B = axis 1 of t_w → 2:4
        numpy_helper.from_array(wt.astype(np.float16), "c_w"),  # (16, 8) fp16 behind a Cast
    ]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y1, y2, y3], inits), opset_imports=[helper.make_opsetid("", 18)])
    poly_axes, poly_sparse = _polygraphy(model)
    rows = {r.name: r for r in sparsity_report(model)}
    assert {n: r.axis for n, r in rows.items() if r.eligible} == poly_axes
    assert {n for n, r in rows.items() if r.is_2of4} == poly_sparse
    assert rows["t_w"].via == "Transpose" and rows["c_w"].via == "Cast"
    assert rows["g_w"].is_2of4 and rows["t_w"].is_2of4


def test_is_2of4_along_hand_cases():
    a = np.array([[0, 0, 3, 4, 0, 6, 0, 8]], dtype=np.float32)
    assert is_2of4_along(a, 1)
    assert not is_2of4_along(np.array([[1, 0, 3, 4]], dtype=np.float32), 1)
    assert not is_2of4_along(np.zeros((3, 6), np.float32), 1)  # 6 is not a multiple of 4


def test_inspect_cli(tiny_2of4_onnx, tmp_path):
    r = subprocess.run([sys.executable, "-m", "pipeline", "inspect", str(tiny_2of4_onnx), "--json"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert any(x["is_2of4"] for x in rows) and all("axis" in x for x in rows)
    t = subprocess.run([sys.executable, "-m", "pipeline", "inspect", str(tiny_2of4_onnx)], capture_output=True, text=True, timeout=120)
    assert "2:4-sparse along TensorRT's axis" in t.stdout
    bad = tmp_path / "x.onnx"
    bad.write_bytes(b"not onnx")
    b = subprocess.run([sys.executable, "-m", "pipeline", "inspect", str(bad)], capture_output=True, text=True, timeout=120)
    assert b.returncode == 1 and "could not be read as an ONNX model" in b.stderr
