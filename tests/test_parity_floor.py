"""The float64 diagnosis of a failed engine/PyTorch parity: it excuses an engine that is closer to
exact arithmetic than PyTorch fp32 and never a wrong engine."""

import copy

import numpy as np
import torch

from export.onnx_export import export_onnx
from pipeline import validate as V
from tests.conftest import VOCAB, tiny_model


def _engine(path):
    """Opens the engine as validation does: a runner of the project's engine interface."""
    from engines.onnxruntime import OnnxRuntimeCpuEngine

    return lambda: OnnxRuntimeCpuEngine({}).open(path)


def _feeds():
    ids = np.random.default_rng(0).integers(0, VOCAB, (2, 12)).astype(np.int64)
    return [{"input_ids": ids, "attention_mask": np.ones_like(ids)}]


def test_a_wrong_engine_is_not_within_the_fp32_floor(tmp_path):
    model = tiny_model("llama")
    export_onnx(model, "causal-lm", tmp_path / "m.onnx", opset=18, exporter="torchscript")
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.model.layers[0].mlp.down_proj.weight.mul_(1.5)  # the engine no longer computes this model
    r = V.parity(other, "causal-lm", _engine(tmp_path / "m.onnx"), "logits", _feeds(), atol=1e-3, rtol=1e-3)
    assert not r["passed"]
    f = r["fp64_reference"]
    assert f["torch_fp32_vs_fp64"] < 1e-4 < f["engine_vs_fp64"]
    assert f["within_floor"] is False


def test_an_engine_closer_to_float64_than_pytorch_fp32_is_within_the_floor(tmp_path):
    model = tiny_model("llama")
    # the engine computes in float64, so it is exact where PyTorch fp32 rounds; atol 0 makes the
    # elementwise comparison fail on that rounding alone
    export_onnx(copy.deepcopy(model).double(), "causal-lm", tmp_path / "m64.onnx", opset=18, exporter="torchscript")
    r = V.parity(model, "causal-lm", _engine(tmp_path / "m64.onnx"), "logits", _feeds(), atol=0.0, rtol=0.0)
    assert not r["passed"]
    f = r["fp64_reference"]
    assert 0 < f["torch_fp32_vs_fp64"] < 1e-4
    assert f["engine_vs_fp64"] < f["torch_fp32_vs_fp64"]
    assert f["within_floor"] is True


def test_a_passing_parity_is_not_rechecked(tmp_path):
    model = tiny_model("llama")
    export_onnx(model, "causal-lm", tmp_path / "m.onnx", opset=18, exporter="torchscript")
    r = V.parity(model, "causal-lm", _engine(tmp_path / "m.onnx"), "logits", _feeds(), atol=1e-3, rtol=1e-3)
    assert r["passed"] and "fp64_reference" not in r
    assert r["engine_runner"].startswith("onnxruntime ") and "CPUExecutionProvider" in r["engine_runner"]


def test_report_cell_shows_the_float64_diagnosis():
    from pipeline.report.compose import parity_cell as _parity_cell

    row = {"parity": False, "parity_maxabs": 0.0135, "parity_fp64": {"torch_fp32_vs_fp64": 0.1004, "engine_vs_fp64": 0.00014, "within_floor": True}}
    cell = _parity_cell(row)
    assert cell.startswith("FAIL (0.01350)") and "fp32 floor 0.1" in cell and "engine 0.00014" in cell and "within it" in cell
    assert _parity_cell({"parity": True, "parity_maxabs": 1e-5}) == "pass (0.00001)"


def _greedy(model, prompt, n):
    from export.kv_export import GreedyResult

    cfg = model.generation_config
    eos, cfg.eos_token_id = cfg.eos_token_id, None
    with torch.no_grad():
        out = model.generate(
            torch.from_numpy(prompt), attention_mask=torch.ones(prompt.shape, dtype=torch.long), max_new_tokens=n,
            do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0,
        )
    cfg.eos_token_id = eos
    return GreedyResult(out.sequences[:, prompt.shape[1]:].numpy(), [x.numpy() for x in out.logits], 0.0, [])


def test_differing_greedy_tokens_are_diagnosed_against_float64():
    from export.kv_export import compare_with_generate

    model = tiny_model("llama")
    prompt = np.random.default_rng(1).integers(0, VOCAB, (1, 8)).astype(np.int64)
    same = compare_with_generate(_greedy(model, prompt, 8), model, prompt)
    assert same["tokens_identical"] and "fp64_reference" not in same
    wrong = copy.deepcopy(model)
    with torch.no_grad():
        wrong.lm_head.weight.neg_()  # a different model: its greedy tokens differ from the first step
    r = compare_with_generate(_greedy(wrong, prompt, 8), model, prompt)
    assert not r["tokens_identical"]
    f = r["fp64_reference"]
    assert f["torch_fp32_tokens_equal_fp64"] == 8 and f["engine_tokens_equal_fp64"] == 0
    assert f["torch_fp32_first_step_vs_fp64"] < 1e-4 < f["engine_first_step_vs_fp64"]
    assert model.generation_config.eos_token_id == tiny_model("llama").generation_config.eos_token_id


def test_report_greedy_cell_shows_the_float64_diagnosis():
    from pipeline.report.compose import greedy_cell as _greedy_cell

    r = {"tokens_identical": False, "greedy_tokens": 32, "fp64_reference": {
        "engine_tokens_equal_fp64": 13, "torch_fp32_tokens_equal_fp64": 7, "engine_first_step_vs_fp64": 1.6, "torch_fp32_first_step_vs_fp64": 1.1}}
    assert _greedy_cell(r).startswith("NO (32); leading tokens equal to float64: engine 13, PyTorch fp32 7")
    assert _greedy_cell({"tokens_identical": True, "greedy_tokens": 32}) == "yes (32)"
