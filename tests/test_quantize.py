"""Prune-then-quantize: the maths by hand, zero preservation as a property, GPTQ against RTN, the
ONNX rewrite against ONNX Runtime, and a tiny Llama through the whole build."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from core.quant import QuantScheme, codes_of, pack_matmul_nbits, quantize_dequantize, rtn, unpack_matmul_nbits

INT8 = QuantScheme(8, 16, 0)
INT4 = QuantScheme(4, 16, 0)


def test_int8_by_hand():
    w = torch.tensor([[0.0, 1.27, -0.635, 0.001] + [0.0] * 12])
    wq, s, z = rtn(w, INT8)
    assert s.item() == pytest.approx(0.01)
    assert z.item() == 128
    assert torch.allclose(wq[0, :4], torch.tensor([0.0, 1.27, -0.64, 0.0]), atol=1e-6)  # -63.5 rounds to -64 (half to even)
    assert codes_of(wq.numpy(), s.numpy(), z.numpy(), INT8)[0, :4].tolist() == [128, 255, 64, 128]


def test_int4_by_hand_keeps_zero_exact():
    # one block of 16: range [-0.5, 1.0] → scale 0.1, rounded up to the fp16 number 0.10003662109375
    # (= 1639 · 2^-14), zero point round(5.0) = 5; 0 ↦ 5 ↦ 0
    w = torch.tensor([[-0.5, 0.0, 1.0, 0.26] + [0.0] * 12])
    wq, s, z = rtn(w, INT4)
    assert s.item() == 1639 * 2.0**-14 and s.half().float().item() == s.item()
    assert z.item() == 5
    assert wq[0, 1].item() == 0.0 and wq[0, 4:].abs().sum().item() == 0.0
    assert wq[0, 3].item() == pytest.approx(3 * 1639 * 2.0**-14)
    codes = codes_of(wq.numpy(), s.numpy(), z.numpy(), INT4)
    assert codes[0, :4].tolist() == [0, 5, 15, 8]


def test_int4_scales_are_fp16_numbers_rounded_up():
    """4-bit scales are the smallest fp16 number at or above (hi − lo) / 15 where that is a normal fp16
    number (so every code stays in 0..15), and the float32 value elsewhere (tiny or huge ranges)."""
    from core.quant import HALF_MIN_NORMAL, grid, half_up

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(200, 32, generator=gen) * torch.logspace(-7, 5, 200)[:, None]
    scale, zero = grid(w, 4)
    raw = (w.amax(1).clamp(min=0) - w.amin(1).clamp(max=0)) / 15
    normal = (raw >= HALF_MIN_NORMAL) & (raw <= 65504)
    assert normal.any() and (~normal).any()
    assert torch.equal(scale[normal].half().float(), scale[normal]) and (scale[normal] >= raw[normal]).all()
    assert (scale[normal] < raw[normal] * (1 + 2.0**-10)).all()  # at most one fp16 step above
    assert torch.equal(scale[~normal & (raw > 0)], raw[~normal & (raw > 0)])
    assert torch.equal(half_up(torch.tensor([0.0, 1.0, 65504.0])), torch.tensor([0.0, 1.0, 65504.0]))
    wq = quantize_dequantize(w, scale[:, None], zero[:, None], 4)
    codes = torch.round(wq / scale[:, None]) + zero[:, None]
    assert codes.min() >= 0 and codes.max() <= 15


def test_matmul_nbits_packing_by_hand():
    codes = np.array([[1, 2, 3, 4] * 4], np.uint8)  # (1, 16)
    b, zp = pack_matmul_nbits(codes, np.array([[7]]), 16)
    assert b.shape == (1, 1, 8) and b[0, 0, 0] == 0x21 and b[0, 0, 1] == 0x43  # first code in the low nibble
    assert zp.tolist() == [7]
    w = unpack_matmul_nbits(b, zp, np.array([0.5], np.float32), 16, 16)
    assert w[0, :4].tolist() == [-3.0, -2.5, -2.0, -1.5]


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 9), cols=st.integers(1, 70), density=st.floats(0.0, 1.0), seed=st.integers(0, 2**16),
    scheme=st.sampled_from([INT8, INT4, QuantScheme(4, 32, 4), QuantScheme(8, 64, 4)]), scale=st.sampled_from([1e-4, 0.05, 30.0]),
)
def test_zeros_survive_and_codes_roundtrip(rows, cols, density, seed, scheme, scale):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * scale
    w[torch.rand(rows, cols, generator=g) > density] = 0.0
    wq, s, z = rtn(w, scheme)
    assert bool((wq[w == 0] == 0).all())
    codes = codes_of(wq.numpy(), s.numpy(), z.numpy(), scheme)
    b, zp = pack_matmul_nbits(codes, z.numpy(), scheme.block_size, scheme.bits)
    assert np.array_equal(unpack_matmul_nbits(b, zp, s.numpy(), cols, scheme.block_size, scheme.bits), wq.numpy())
    assert (wq - w).abs().max().item() <= s.max().item() / 2 * (1 + 1e-5) + 1e-12


def _correlated_problem(rows=48, cols=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1024, cols, generator=g) @ (torch.randn(cols, cols, generator=g) * 0.3 + torch.eye(cols))
    w = torch.randn(rows, cols, generator=g) * 0.1
    keep = torch.zeros(rows, cols, dtype=torch.bool)
    keep.view(rows, cols // 4, 4).scatter_(2, torch.rand(rows, cols // 4, 4, generator=g).argsort(-1)[..., :2], True)
    return x, w * keep, 2.0 / x.shape[0] * x.t() @ x


@pytest.mark.parametrize("scheme", [QuantScheme(8, 32, 0), QuantScheme(4, 32, 0)])
def test_gptq_beats_rtn_and_mask_aware_keeps_the_2of4_pattern(scheme):
    from core.masks import is_nm_sparse
    from passes.quantize import gptq_quantize

    x, w, h = _correlated_problem()
    err = lambda q: float(((x @ (q - w).t()) ** 2).mean())
    r, _, _ = rtn(w, scheme)
    masked, _, _, _ = gptq_quantize(w, h, scheme, w != 0)
    plain, _, _, _ = gptq_quantize(w, h, scheme, None)
    assert err(masked) < err(r)
    assert bool((masked[w == 0] == 0).all()) and is_nm_sparse(masked, 2, 4)
    assert int((plain[w == 0] != 0).sum()) > 0 and not is_nm_sparse(plain, 2, 4)


def _matmul_graph(path: Path, w_t: np.ndarray) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    k, n = w_t.shape
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "lin.weight.T"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", n])],
        [numpy_helper.from_array(w_t, "lin.weight.T")],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = 9
    onnx.save(m, str(path))


@pytest.mark.parametrize("scheme,tol", [(QuantScheme(8, 32, 0), 1e-5), (QuantScheme(8, 32, 4), 0.02), (QuantScheme(4, 32, 0), 1e-5), (QuantScheme(4, 32, 4), 0.05)])
def test_graph_rewrite_runs_on_onnxruntime(tmp_path, scheme, tol):
    import onnx
    import onnxruntime as ort

    from export.quant_graph import rewrite_quantized

    w = torch.randn(40, 96, generator=torch.Generator().manual_seed(1)) * 0.1
    w[torch.rand(40, 96, generator=torch.Generator().manual_seed(2)) < 0.5] = 0.0
    wq, s, z = rtn(w, scheme)
    _matmul_graph(tmp_path / "m.onnx", wq.t().contiguous().numpy())
    info = rewrite_quantized(tmp_path / "m.onnx", tmp_path / "q.onnx", {**scheme.to_dict(), "weights": ["lin.weight"]}, {"lin.weight.scale": s, "lin.weight.zero": z})
    assert info["zeros_preserved"] and info["zeros_before"] == int((wq == 0).sum()) >= int((w == 0).sum())
    ops = [n.op_type for n in onnx.load(str(tmp_path / "q.onnx")).graph.node]
    assert ops == ["MatMulNBits"]
    x = np.random.default_rng(0).standard_normal((2, 5, 96)).astype(np.float32)
    y = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    ref = x @ wq.t().numpy()
    assert np.abs(y - ref).max() <= tol * np.abs(ref).max()


def test_graph_rewrite_refuses_a_weight_it_cannot_find_or_that_differs(tmp_path):
    from export.quant_graph import QuantizeGraphError, rewrite_quantized

    w = torch.randn(8, 32) * 0.1
    wq, s, z = rtn(w, INT8)
    _matmul_graph(tmp_path / "m.onnx", wq.t().contiguous().numpy())
    spec = {**INT8.to_dict(), "weights": ["lin.weight", "other.weight"]}
    with pytest.raises(QuantizeGraphError, match="other.weight"):
        rewrite_quantized(tmp_path / "m.onnx", tmp_path / "q.onnx", spec, {"lin.weight.scale": s, "lin.weight.zero": z})
    _matmul_graph(tmp_path / "m.onnx", w.t().contiguous().numpy())  # not the dequantized weight
    with pytest.raises(QuantizeGraphError, match="differ"):
        rewrite_quantized(tmp_path / "m.onnx", tmp_path / "q.onnx", {**INT8.to_dict(), "weights": ["lin.weight"]}, {"lin.weight.scale": s, "lin.weight.zero": z})


def test_quantized_variants_through_the_build(tiny_dirs, text_file, tmp_path):
    import onnx

    from pipeline.build import build
    from tests.test_build import tiny_recipe

    variants = [
        {"name": "m2of4", "passes": [{"magnitude": {"pattern": "2:4"}}]},
        {"name": "m2of4-int8", "passes": [{"magnitude": {"pattern": "2:4"}}, {"quantize": {"bits": 8}}]},
        {"name": "m2of4-int4-gptq", "passes": [{"magnitude": {"pattern": "2:4"}}, {"quantize": {"bits": 4, "block_size": 16, "method": "gptq", "accuracy_level": 0}}]},
        {"name": "m2of4-int4-plain", "passes": [{"magnitude": {"pattern": "2:4"}}, {"quantize": {"bits": 4, "block_size": 16, "method": "gptq", "mask_aware": False}}]},
        {"name": "int8-head", "passes": [{"quantize": {"bits": 8, "head": True, "accuracy_level": 0}}]},
        {"name": "head4-gptq", "passes": [{"quantize": {"bits": 4, "block_size": 16, "method": "gptq", "head": True, "targets": [], "accuracy_level": 0}}]},
    ]
    recipe = tiny_recipe(
        tiny_dirs["llama"], text_file, tmp_path / "q", variants=variants, export={"kv_cache": True},
        validation={"agreement_windows": 1, "parity": {"batch": 1, "length": 8}, "latency": None,
                    "decode": {"prompt": 16, "new_tokens": 4, "greedy_tokens": 6, "repeats": 1}},
    )
    s = build(recipe)
    by = {v["name"]: v for v in s.results["variants"]}
    for name in ("m2of4-int8", "m2of4-int4-gptq", "m2of4-int4-plain"):
        v = by[name]
        q = v["export"]["quantization"]
        assert q["weights"] == 14  # 2 blocks × q k v o gate up down
        assert q["zeros_preserved"]  # the graph holds what the model holds, zeros included
        r = v["engines"]["onnxruntime-cpu"]
        assert r["parity"]["passed"], r["parity"]
        assert r["size"]["onnx_bytes"] < by["m2of4"]["engines"]["onnxruntime-cpu"]["size"]["onnx_bytes"]
        nodes = [n for n in onnx.load(str(tmp_path / "q" / name / "kv" / "decode.onnx")).graph.node if n.op_type == "MatMulNBits"]
        assert len(nodes) == 14 and {a.i for n in nodes for a in n.attribute if a.name == "bits"} == {8 if "int8" in name else 4}
    for name in ("m2of4-int8", "m2of4-int4-gptq", "m2of4-int4-plain"):  # the 2:4 pass ran once, in m2of4
        started = json.loads((tmp_path / "q" / name / "model" / "stage.json").read_text())["info"]["started_from"]
        assert started == "m2of4" and [p["name"] for p in by[name]["pass_results"]] == ["magnitude", "quantize"]
    head = by["int8-head"]
    assert head["export"]["quantization"]["weights"] == 15  # the untied head too, exported afresh
    assert head["export"]["exporter"] != "rebind"
    assert head["engines"]["onnxruntime-cpu"]["parity"]["passed"] and head["engines"]["onnxruntime-cpu"]["parity"]["atol"] == 1e-3
    assert head["pass_results"][-1]["info"]["head"] == {"name": "lm_head.weight", "shape": [257, 64], "method": "rtn", "untied": True}
    alone = by["head4-gptq"]  # the head alone, by GPTQ on its own inputs: the block linears keep their weights
    assert alone["export"]["quantization"]["weights"] == 1 and alone["engines"]["onnxruntime-cpu"]["parity"]["passed"]
    facts = alone["pass_results"][-1]["info"]["head"]
    assert facts["method"] == "gptq" and facts["tokens"] > 0 and facts["untied"] and alone["pass_results"][-1]["info"]["linears"] == 1
    cfg = json.loads((tmp_path / "q" / "int8-head" / "model" / "model" / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False and "lm_head.weight" in cfg["weight_quantization"]["weights"]
    info = lambda n: by[n]["pass_results"][-1]["info"]
    assert info("m2of4-int8")["zeros"]["lost"] == 0 and info("m2of4-int4-gptq")["zeros"]["lost"] == 0
    assert info("m2of4-int4-plain")["zeros"]["lost"] > 0  # plain GPTQ fills the pruned positions
    assert by["m2of4-int4-gptq"]["engines"]["onnxruntime-cpu"]["parity"]["atol"] == 1e-3  # fp32 compute: the plain tolerance
    assert by["m2of4-int8"]["engines"]["onnxruntime-cpu"]["parity"]["tolerance_reason"].startswith("activations quantized")
    report = (tmp_path / "q" / "report.md").read_text()
    assert "Weight quantization" in report and "the pattern is lost" in report
    assert build(recipe).reused_all


def test_quantize_must_be_last_and_engines_must_run_it(tiny_dirs, text_file, tmp_path):
    from core.errors import RecipeError
    from pipeline.checks import check_recipe
    from tests.test_build import tiny_recipe

    bad_order = tiny_recipe(tiny_dirs["llama"], text_file, tmp_path / "a", variants=[
        {"name": "x", "passes": [{"quantize": {"bits": 8}}, {"magnitude": {"sparsity": 0.5}}]}])
    with pytest.raises(RecipeError, match=r"variants\[0\]\.passes\[0\]\.quantize.*must be the variant's last pass"):
        check_recipe(bad_order)
    gpu = tiny_recipe(tiny_dirs["llama"], text_file, tmp_path / "b", engines=["onnxruntime-cuda"], variants=[
        {"name": "x", "passes": [{"quantize": {"bits": 8}}]}])
    with pytest.raises(RecipeError, match="onnxruntime-cuda.*cannot run quantized weights"):
        check_recipe(gpu)
    with pytest.raises(RecipeError, match=r"quantize.*block_size"):
        tiny_recipe(tiny_dirs["llama"], text_file, tmp_path / "c", variants=[{"name": "x", "passes": [{"quantize": {"bits": 4, "block_size": 24}}]}])


def test_quantized_model_dir_roundtrip(tmp_path):
    from core.models import QUANT_FILE, load_hf_dir, save_hf_dir
    from core.errors import ModelLoadError
    from passes import PassContext, get_pass_class
    from core.adapters import adapter_for
    from tests.conftest import byte_tokenizer, tiny_model

    model = tiny_model("llama")
    cls = get_pass_class("quantize")
    cls(cls.config_class(bits=4, block_size=16)).run(model, PassContext(adapter_for(model.config)))
    save_hf_dir(model, byte_tokenizer(), tmp_path / "m")
    back, _, _ = load_hf_dir(tmp_path / "m")
    assert set(back.quantization_tensors) == set(model.quantization_tensors)
    assert json.loads((tmp_path / "m" / "config.json").read_text())["weight_quantization"]["bits"] == 4
    (tmp_path / "m" / QUANT_FILE).unlink()
    with pytest.raises(ModelLoadError, match="quantization.safetensors"):
        load_hf_dir(tmp_path / "m")


def test_graph_rewrite_through_a_transpose(tmp_path):
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from export.quant_graph import rewrite_quantized

    scheme = QuantScheme(8, 32, 0)
    w = torch.randn(40, 64, generator=torch.Generator().manual_seed(4)) * 0.1
    wq, s, z = rtn(w, scheme)
    g = helper.make_graph(
        [helper.make_node("Transpose", ["lm_head.weight"], ["wt"], perm=[1, 0]), helper.make_node("MatMul", ["x", "wt"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 64])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 40])],
        [numpy_helper.from_array(wq.numpy(), "lm_head.weight")],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = 9
    onnx.save(m, str(tmp_path / "m.onnx"))
    rewrite_quantized(tmp_path / "m.onnx", tmp_path / "q.onnx", {**scheme.to_dict(), "weights": ["lm_head.weight"]}, {"lm_head.weight.scale": s, "lm_head.weight.zero": z})
    q = onnx.load(str(tmp_path / "q.onnx"))
    assert [n.op_type for n in q.graph.node] == ["MatMulNBits"] and "lm_head.weight" not in {t.name for t in q.graph.initializer}
    x = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    y = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, x @ wq.t().numpy(), atol=1e-5)


def test_graph_rewrite_finds_a_weight_named_after_an_equal_parameter(tmp_path):
    from export.quant_graph import QuantizeGraphError, rewrite_quantized

    # an LM head whose quantized values equal the embedding: the exporter names its initializer after the embedding
    scheme = QuantScheme(8, 32, 0)
    w = torch.randn(40, 64, generator=torch.Generator().manual_seed(5)) * 0.1
    wq, s, z = rtn(w, scheme)
    _matmul_graph(tmp_path / "m.onnx", wq.t().contiguous().numpy())  # initializer 'lin.weight.T'
    spec = {**scheme.to_dict(), "weights": ["lm_head.weight"]}
    grids = {"lm_head.weight.scale": s, "lm_head.weight.zero": z}
    with pytest.raises(QuantizeGraphError, match="lm_head.weight"):
        rewrite_quantized(tmp_path / "m.onnx", tmp_path / "q.onnx", spec, grids)
    info = rewrite_quantized(tmp_path / "m.onnx", tmp_path / "q.onnx", spec, grids, lambda name: wq.numpy())
    assert info["weights"] == 1
    with pytest.raises(QuantizeGraphError, match="lm_head.weight"):  # other values: not taken for it
        rewrite_quantized(tmp_path / "m.onnx", tmp_path / "q.onnx", spec, grids, lambda name: (wq * 2).numpy())


def test_head_gptq_on_its_own_inputs_beats_rtn():
    """The head's Hessian is XᵀX of the final norm's outputs (the forward stops before the logits), and
    GPTQ on it reconstructs the head's outputs on those inputs better than round to nearest."""
    from passes.quantize import gptq_quantize, head_input_hessian
    from tests.conftest import tiny_model

    model = tiny_model("llama").eval()
    windows = torch.randint(0, model.config.vocab_size, (5, 24), generator=torch.Generator().manual_seed(0))
    h = head_input_hessian(model, model.lm_head, windows, batch_size=2)
    with torch.no_grad():
        x = model(input_ids=windows, output_hidden_states=True).hidden_states[-1].reshape(-1, model.config.hidden_size).double()
    assert h.rows == windows.numel()
    ref = x.t() @ x  # (the collector multiplies in float32, batch by batch: float32 rounding apart)
    torch.testing.assert_close(h.sum, ref, rtol=1e-4, atol=1e-5 * float(ref.diagonal().max()))
    w = model.lm_head.weight.detach().float()
    scheme = QuantScheme(4, 16, 0)
    g, _, _, facts = gptq_quantize(w, h.hessian(), scheme, None)
    r, _, _ = rtn(w, scheme)
    err = lambda q: float(((x @ (q.double() - w.double()).t()) ** 2).sum())
    assert err(g) < 0.9 * err(r), (err(g), err(r))
    assert facts["dead_inputs"] == 0


def test_head_alone_needs_the_head():
    from passes.quantize import QuantizeConfig

    assert QuantizeConfig(bits=4, method="gptq", head=True, targets=[]).targets == []
    with pytest.raises(ValueError, match="targets is empty"):
        QuantizeConfig(bits=4, targets=[])
