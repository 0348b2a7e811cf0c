"""The float64 diagnosis of a failed engine/PyTorch parity: it excuses an engine that is closer to
exact arithmetic than PyTorch fp32 and never a wrong engine."""

import copy

import numpy as np
import torch

from export.onnx_export import export_onnx
from pipeline import validate as V
from tests.conftest import VOCAB, tiny_model


def _feeds():
    ids = np.random.default_rng(0).integers(0, VOCAB, (2, 12)).astype(np.int64)
    return [{"input_ids": ids, "attention_mask": np.ones_like(ids)}]


def test_a_wrong_engine_is_not_within_the_fp32_floor(tmp_path):
    model = tiny_model("llama")
    export_onnx(model, "causal-lm", tmp_path / "m.onnx", opset=18, exporter="torchscript")
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.model.layers[0].mlp.down_proj.weight.mul_(1.5)  # the engine no longer computes this model
    r = V.parity(other, "causal-lm", tmp_path / "m.onnx", "logits", _feeds(), atol=1e-3, rtol=1e-3)
    assert not r["passed"]
    f = r["fp64_reference"]
    assert f["torch_fp32_vs_fp64"] < 1e-4 < f["engine_vs_fp64"]
    assert f["within_floor"] is False


def test_an_engine_closer_to_float64_than_pytorch_fp32_is_within_the_floor(tmp_path):
    model = tiny_model("llama")
    # the engine computes in float64, so it is exact where PyTorch fp32 rounds; atol 0 makes the
    # elementwise comparison fail on that rounding alone
    export_onnx(copy.deepcopy(model).double(), "causal-lm", tmp_path / "m64.onnx", opset=18, exporter="torchscript")
    r = V.parity(model, "causal-lm", tmp_path / "m64.onnx", "logits", _feeds(), atol=0.0, rtol=0.0)
    assert not r["passed"]
    f = r["fp64_reference"]
    assert 0 < f["torch_fp32_vs_fp64"] < 1e-4
    assert f["engine_vs_fp64"] < f["torch_fp32_vs_fp64"]
    assert f["within_floor"] is True


def test_a_passing_parity_is_not_rechecked(tmp_path):
    model = tiny_model("llama")
    export_onnx(model, "causal-lm", tmp_path / "m.onnx", opset=18, exporter="torchscript")
    r = V.parity(model, "causal-lm", tmp_path / "m.onnx", "logits", _feeds(), atol=1e-3, rtol=1e-3)
    assert r["passed"] and "fp64_reference" not in r


def test_report_cell_shows_the_float64_diagnosis():
    from pipeline.report import _parity_cell

    row = {"parity": False, "parity_maxabs": 0.0135, "parity_fp64": {"torch_fp32_vs_fp64": 0.1004, "engine_vs_fp64": 0.00014, "within_floor": True}}
    cell = _parity_cell(row)
    assert cell.startswith("FAIL (0.01350)") and "fp32 floor 0.1" in cell and "engine 0.00014" in cell and "within it" in cell
    assert _parity_cell({"parity": True, "parity_maxabs": 1e-5}) == "pass (0.00001)"
