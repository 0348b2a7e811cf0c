"""TensorRT backend: log parsing (quoted logs), options, and the recorded skip where TensorRT is absent."""

import importlib.util

import pytest

from engines import get_engine
from engines.trt_log import parse_sparsity_log
from core.errors import EngineUnavailable

HAS_TRT = importlib.util.find_spec("tensorrt") is not None


def test_parse_trtexec_log_with_fused_layers():
    # trtexec --sparsity=enable --fp16 --verbose, quoted from NVIDIA/TensorRT issue #4056 (truncated list)
    lines = [
        "[08/05/2024-12:06:54] [I] [TRT] (Sparsity) Layers eligible for sparse math: MatMul_401, Conv_619 + Relu_620, "
        "Conv_622 + Relu_623, Conv_235 + Relu_236, Conv_626, Conv_239, Conv_621 + Add_627 + Relu_628",
    ]
    log = parse_sparsity_log(lines)
    assert log.seen
    assert log.eligible == ["MatMul_401", "Conv_619 + Relu_620", "Conv_622 + Relu_623", "Conv_235 + Relu_236", "Conv_626", "Conv_239", "Conv_621 + Add_627 + Relu_628"]
    assert log.picked == []


def test_parse_eligible_matmuls_none_picked():
    # quoted from NVIDIA/TensorRT issue #2169 (list shortened): dense kernels were faster, so nothing was picked
    lines = [
        "[07/19/2022-11:58:20] [I] [TRT] (Sparsity) Layers eligible for sparse math: Conv_22, MatMul_51, MatMul_69, MatMul_83, Gemm_725",
        "[07/19/2022-11:58:20] [I] [TRT] (Sparsity) TRT inference plan picked sparse implementation for layers:",
    ]
    log = parse_sparsity_log(lines)
    assert log.eligible == ["Conv_22", "MatMul_51", "MatMul_69", "MatMul_83", "Gemm_725"]
    assert log.picked == []
    assert log.eligible_not_picked == log.eligible


def test_parse_python_logger_format():
    # TensorRT 8 Python logger, quoted from NVIDIA/TensorRT issue #1403
    lines = [
        "[TensorRT] INFO: (Sparsity) Layers eligible for sparse math: Conv_0",
        "[TensorRT] INFO: (Sparsity) TRT inference plan picked sparse implementation for layers:",
    ]
    log = parse_sparsity_log(lines)
    assert log.eligible == ["Conv_0"] and log.picked == []


def test_parse_empty_lists_and_absent_lines():
    # both lists empty, quoted from pytorch/TensorRT issue #1340
    lines = [
        "[09/16/2022-09:55:37] [I] [TRT] Total Activation Memory: 7864832",
        "[09/16/2022-09:55:37] [I] [TRT] (Sparsity) Layers eligible for sparse math:",
        "[09/16/2022-09:55:37] [I] [TRT] (Sparsity) TRT inference plan picked sparse implementation for layers:",
    ]
    log = parse_sparsity_log(lines)
    assert log.seen and log.eligible == [] and log.picked == []
    assert not parse_sparsity_log(["[I] [TRT] Engine built in 31.1935 sec."]).seen


def test_parse_picked_subset():
    # Not a quoted log: the two quoted line formats above with a non-empty picked list, as our own
    # logger writes them ("[INFO] " + TensorRT's message).
    lines = [
        "[INFO] (Sparsity) Layers eligible for sparse math: /model/layers.0/mlp/up_proj/MatMul, /model/layers.0/mlp/down_proj/MatMul",
        "[INFO] (Sparsity) TRT inference plan picked sparse implementation for layers: /model/layers.0/mlp/up_proj/MatMul",
    ]
    log = parse_sparsity_log(lines)
    assert log.picked == ["/model/layers.0/mlp/up_proj/MatMul"]
    assert log.to_dict()["eligible_not_picked"] == ["/model/layers.0/mlp/down_proj/MatMul"]


def test_tensorrt_options_are_validated():
    with pytest.raises(ValueError, match="unknown option 'int8'"):
        get_engine("tensorrt", {"int8": True})
    with pytest.raises(ValueError, match="min <= opt <= max"):
        get_engine("tensorrt", {"min_shape": [1, 8], "opt_shape": [1, 4], "max_shape": [1, 16]})
    with pytest.raises(ValueError, match="sparsity must be true or false"):
        get_engine("tensorrt", {"sparsity": "yes"})


@pytest.mark.skipif(HAS_TRT, reason="tensorrt is importable here; the unavailable path cannot be observed")
def test_unavailable_tensorrt_is_a_typed_skip():
    with pytest.raises(EngineUnavailable) as err:
        get_engine("tensorrt").check_available()
    assert err.value.backend == "tensorrt" and "not importable" in err.value.reason


@pytest.mark.skipif(HAS_TRT, reason="tensorrt is importable here")
def test_build_records_tensorrt_skip_in_results_and_report(tiny_dirs, text_file, tmp_path):
    from pipeline.build import build
    from tests.test_build import tiny_recipe

    recipe = tiny_recipe(
        tiny_dirs["llama"],
        text_file,
        tmp_path / "b",
        variants=[{"name": "m2of4", "passes": [{"magnitude": {"pattern": "2:4"}}]}],
        engines=["onnxruntime-cpu", {"backend": "tensorrt", "options": {"max_shape": [2, 128]}}],
        export={"exporter": "torchscript"},
    )
    s = build(recipe)
    for v in s.results["variants"]:
        assert v["engines"]["onnxruntime-cpu"]["status"] == "ok"
        assert v["engines"]["tensorrt"]["status"] == "skipped"
        assert "not importable" in v["engines"]["tensorrt"]["reason"]
    assert "tensorrt" in (tmp_path / "b" / "report.md").read_text()
    assert (tmp_path / "b" / "manifest.json").read_text().count("not importable") >= 1


@pytest.mark.tensorrt
@pytest.mark.skipif(not HAS_TRT, reason="tensorrt is not importable on this machine (its wheels need NVIDIA's index)")
def test_tensorrt_builds_a_sparse_engine_and_matches_pytorch(tmp_path):
    import numpy as np
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    from export.onnx_export import export_onnx
    from passes import PassContext
    from passes.magnitude import MagnitudeConfig, MagnitudePass
    from core.adapters import adapter_for
    from tests.conftest import tiny_model

    model = tiny_model("llama")
    MagnitudePass(MagnitudeConfig(pattern="2:4")).run(model, PassContext(adapter_for(model.config)))
    export_onnx(model, "causal-lm", tmp_path / "m.onnx")
    engine = get_engine("tensorrt", {"max_shape": [2, 64], "opt_shape": [1, 32]})
    art = engine.build(tmp_path / "m.onnx", tmp_path)
    assert art.info["sparsity_log"]["seen"]
    ids = np.random.default_rng(0).integers(0, 200, (1, 32)).astype(np.int64)
    with engine.runner(art) as r:
        out = r.infer({"input_ids": ids, "attention_mask": np.ones_like(ids)})["logits"]
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(out, ref, atol=2e-2, rtol=2e-2)  # TF32 GEMMs


@pytest.mark.parametrize("backend", ["onnxruntime-cuda", "onnxruntime-trt", "torch-cuda"])
def test_gpu_backends_are_typed_skips_without_a_gpu(backend):
    import onnxruntime as ort
    import torch

    engine = get_engine(backend)
    has = torch.cuda.is_available() if backend == "torch-cuda" else {"onnxruntime-cuda": "CUDAExecutionProvider", "onnxruntime-trt": "TensorrtExecutionProvider"}[backend] in ort.get_available_providers()
    if has:
        pytest.skip(f"{backend} is available here; its unavailable path cannot be observed")
    with pytest.raises(EngineUnavailable) as err:
        engine.check_available()
    assert err.value.backend == backend and err.value.reason


def test_gpu_backend_options():
    assert get_engine("onnxruntime-trt", {"sparsity": False}).options["sparsity"] is False
    with pytest.raises(ValueError, match="sparsity must be true or false"):
        get_engine("onnxruntime-trt", {"sparsity": "on"})
    with pytest.raises(ValueError, match="dtype .float32. must be float16 or bfloat16"):
        get_engine("torch-cuda", {"dtype": "float32"})


@pytest.mark.gpu
def test_torch_cuda_runner_runs_2of4_linears_sparse(tiny_dirs, tmp_path):
    import numpy as np
    import torch

    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("needs a CUDA GPU with compute capability 8.0+ (2:4 sparse tensor cores)")
    from engines.torch_cuda import convert_2of4_linears
    from passes import PassContext
    from passes.magnitude import MagnitudeConfig, MagnitudePass
    from core.adapters import adapter_for
    from tests.conftest import tiny_config
    from transformers import AutoModelForCausalLM

    cfg = tiny_config("llama")
    cfg.hidden_size, cfg.intermediate_size = 128, 256  # semi-structured kernels need dims of 64+
    model = AutoModelForCausalLM.from_config(cfg).eval()
    MagnitudePass(MagnitudeConfig(pattern="2:4")).run(model, PassContext(adapter_for(cfg)))
    ids = torch.randint(0, 200, (2, 64))
    ref = model(input_ids=ids).logits
    m = model.to("cuda", torch.float16)
    assert len(convert_2of4_linears(m, adapter_for(cfg))) == 2 * 7
    out = m(input_ids=ids.cuda()).logits.float().cpu()
    np.testing.assert_allclose(out.numpy(), ref.detach().numpy(), atol=5e-2, rtol=5e-2)
