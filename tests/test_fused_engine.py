"""The onnxruntime-fused engine (ONNX Runtime contrib ops written from the saved model) against
PyTorch on tiny Llama-family models built in-process: logits, greedy decoding with the in-place KV
buffer, structured shapes that differ per block, quantized weights (MatMulNBits, zeros kept), the
ops the graph is made of, refusals with the reason, and a build through every stage."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.conftest import byte_tokenizer, tiny_model

ort = pytest.importorskip("onnxruntime")

from engines.onnxruntime_fused import OnnxRuntimeFusedEngine  # noqa: E402


def _engine() -> OnnxRuntimeFusedEngine:
    return OnnxRuntimeFusedEngine({"threads": 2, "max_positions": 256})


def _save_and_build(model, root):
    from core.models import save_hf_dir

    save_hf_dir(model, byte_tokenizer(), root / "model")
    (root / "engine").mkdir()
    return _engine().build(root / "model", root / "engine")


def _reference_generate(model, prompt, n):
    with torch.no_grad():
        return model.generate(
            torch.from_numpy(prompt), attention_mask=torch.ones(prompt.shape, dtype=torch.long), max_new_tokens=n, do_sample=False,
            output_logits=True, return_dict_in_generate=True, pad_token_id=0, eos_token_id=None,
        )


def _structured(seed: int = 3):
    from core.adapters import adapter_for
    from core.structure import record_shapes, slice_block

    model = tiny_model("llama", seed=seed)
    adapter = adapter_for(model.config)
    slice_block(model, adapter, 0, [0, 1], list(range(0, 128, 2)))  # block 0: 2 of 4 heads (one KV group), half the FFN
    slice_block(model, adapter, 1, None, list(range(96)))  # block 1: every head, 96 of 128 channels
    record_shapes(model, adapter)
    return model


def _quantized(bits: int, level: int, pattern_2of4: bool):
    """A tiny Llama whose block linears are RTN-quantized (optionally 2:4-pruned first), as the quantize pass leaves it."""
    from core.quant import QuantScheme, rtn

    model = tiny_model("llama", seed=5)
    scheme = QuantScheme(bits, 16, level)
    tensors, names = {}, []
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and "layers" in name:
                w = mod.weight
                if pattern_2of4:
                    groups = w.view(w.shape[0], -1, 4)
                    groups.scatter_(-1, groups.abs().argsort(-1)[..., :2], 0.0)
                wq, s, z = rtn(w, scheme)
                w.copy_(wq)
                tensors[f"{name}.weight.scale"], tensors[f"{name}.weight.zero"] = s, z
                names.append(f"{name}.weight")
    model.config.weight_quantization = {**scheme.to_dict(), "method": "rtn", "weights": sorted(names)}
    model.quantization_tensors = tensors
    return model


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = {}
    for kind, make in (("dense", lambda: tiny_model("llama", seed=1)), ("structured", _structured), ("int4-2of4", lambda: _quantized(4, 0, True)), ("int8-l4", lambda: _quantized(8, 4, False))):
        model = make()
        out[kind] = (model, _save_and_build(model, tmp_path_factory.mktemp(f"fused-{kind}")))
    return out


@pytest.mark.parametrize("kind", ["dense", "structured", "int4-2of4"])
def test_logits_match_pytorch(built, kind):
    model, art = built[kind]
    ids = np.random.default_rng(0).integers(0, 257, (2, 24)).astype(np.int64)
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids)).logits.numpy()
    with _engine().runner(art) as r:
        got = r.infer({"input_ids": ids, "attention_mask": np.ones_like(ids)})["logits"]
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["dense", "structured", "int4-2of4"])
def test_greedy_decode_matches_pytorch_generate(built, kind):
    model, art = built[kind]
    prompt = np.random.default_rng(1).integers(0, 257, (1, 20)).astype(np.int64)
    with _engine().runner(art) as r:
        g = r.generate(prompt, 32)
    ref = _reference_generate(model, prompt, 32)
    np.testing.assert_array_equal(g.tokens, ref.sequences[:, 20:].numpy())
    assert len(g.logits) == 32 and len(g.decode_ms) == 31 and g.prefill_ms > 0
    for a, b in zip(g.logits, ref.logits):
        np.testing.assert_allclose(a, b.numpy(), atol=2e-4, rtol=1e-4)


def test_activation_quantized_int8_stays_close(built):
    model, art = built["int8-l4"]  # accuracy_level 4 quantizes activations per block: not exact, close
    ids = np.random.default_rng(2).integers(0, 257, (1, 16)).astype(np.int64)
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids)).logits.numpy()
    with _engine().runner(art) as r:
        got = r.infer({"input_ids": ids, "attention_mask": np.ones_like(ids)})["logits"]
    assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max()


def test_graph_is_made_of_fused_ops(built):
    import onnx

    for kind, (model, art) in built.items():
        ops = [n.op_type for n in onnx.load(str(art.path), load_external_data=False).graph.node]
        layers = model.config.num_hidden_layers
        assert ops.count("GroupQueryAttention") == layers, kind
        assert ops.count("SkipSimplifiedLayerNormalization") == 2 * layers, kind  # after attention and after the MLP (and the final norm)
        for decomposed in ("Pow", "ReduceMean", "Sqrt", "Expand", "Transpose", "Softmax"):
            assert decomposed not in ops, (kind, decomposed)
        linears = 5 * layers  # q/k/v packed, o, gate, up, down
        if kind.startswith("int"):
            assert ops.count("MatMulNBits") == linears and ops.count("MatMul") == 0, kind
        else:
            assert ops.count("MatMul") == linears, kind
        assert "Split" not in ops, kind  # gate and up are separate products: nothing to split
        assert ops.count("Gemm") == 1  # the tied head reads the embedding itself (one copy in the file)


def test_quantized_graph_keeps_zeros_and_shrinks(built):
    dense_bytes = built["dense"][1].info["bytes"]
    q = built["int4-2of4"][1].info["quantization"]
    assert q["zeros_preserved"] and q["zeros_before"] > 0  # every pruned weight is still exactly 0
    assert q["weights"] == 14  # 2 blocks × q k v o gate up down
    assert built["int4-2of4"][1].info["bytes"] < dense_bytes


def test_cache_is_appended_in_place(built):
    """The runner binds each layer's past and present to one buffer: after generating, the buffer rows
    hold the keys of every position (a copying graph would leave the bound buffer as it was)."""
    model, art = built["dense"]
    prompt = np.random.default_rng(3).integers(0, 257, (1, 12)).astype(np.int64)
    with _engine().runner(art) as r:
        sess = r.session
        io = sess.io_binding()
        lay = r.layout
        bufs = []
        for j in range(lay.layers):
            for kind in ("key", "value"):
                v = ort.OrtValue.ortvalue_from_numpy(np.zeros((1, lay.kv_heads[j], 16, lay.head_dim), np.float32))
                io.bind_ortvalue_input(lay.past_name(j, kind), v)
                io.bind_ortvalue_output(lay.present_name(j, kind), v)
                bufs.append(v)
        io.bind_cpu_input("input_ids", prompt)
        io.bind_cpu_input("attention_mask", np.ones((1, 12), np.int64))
        io.bind_cpu_input("logits_to_keep", np.array([1], np.int64))
        io.bind_output("logits")
        sess.run_with_iobinding(io)
        k0 = bufs[0].numpy()
    assert np.abs(k0[:, :, :12]).sum() > 0 and np.all(k0[:, :, 12:] == 0)


def test_bad_inputs_are_refused_with_the_reason(built):
    from core.errors import PipelineError

    _, art = built["dense"]
    ids = np.ones((1, 8), np.int64)
    with _engine().runner(art) as r:
        mask = np.ones_like(ids)
        mask[0, :2] = 0
        with pytest.raises(PipelineError, match="attention_mask"):
            r.infer({"input_ids": ids, "attention_mask": mask})
        with pytest.raises(PipelineError, match="max_positions"):
            r.generate(np.ones((1, 250), np.int64), 10)
        with pytest.raises(PipelineError, match=r"\(1, T\)"):
            r.generate(np.ones((2, 4), np.int64), 2)


def test_options_are_checked():
    from core.errors import OptionError

    with pytest.raises(OptionError, match="max_positions"):
        OnnxRuntimeFusedEngine({"max_positions": 4})
    with pytest.raises(OptionError, match="threads"):
        OnnxRuntimeFusedEngine({"threads": -1})


def test_families_and_variants_it_cannot_run_are_refused(tiny_dirs, text_file, tmp_path):
    from core.errors import RecipeError
    from pipeline.checks import check_recipe
    from tests.test_build import tiny_recipe

    bert = tiny_recipe(tiny_dirs["bert"], text_file, tmp_path / "a", engines=[{"backend": "onnxruntime-fused"}])
    with pytest.raises(RecipeError, match=r"engines\[0\]\.backend.*onnxruntime-fused.*fused decoder graph"):
        check_recipe(bert)
    ctx = tiny_recipe(tiny_dirs["llama"], text_file, tmp_path / "b", engines=[{"backend": "onnxruntime-fused"}], variants=[
        {"name": "dv", "passes": [{"contextual": {}}]}])
    with pytest.raises(RecipeError, match=r"variants\[0\]\.passes\[0\]\.contextual.*onnxruntime-fused.*contextual"):
        check_recipe(ctx)


def test_saved_model_names_its_architecture(tmp_path):
    """Tools that read Hugging Face directories (ONNX Runtime GenAI's builder) pick the class from this."""
    from core.models import save_hf_dir

    model = tiny_model("llama")
    model.config.architectures = None
    save_hf_dir(model, None, tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]


@pytest.mark.slow
def test_fused_engine_through_the_build(tiny_dirs, text_file, tmp_path):
    from pipeline.build import build
    from tests.test_build import tiny_recipe

    variants = [
        {"name": "m2of4", "passes": [{"magnitude": {"pattern": "2:4"}}]},
        {"name": "m2of4-int4", "passes": [{"magnitude": {"pattern": "2:4"}}, {"quantize": {"bits": 4, "block_size": 16, "accuracy_level": 0}}]},
    ]
    recipe = tiny_recipe(
        tiny_dirs["llama"], text_file, tmp_path / "f", variants=variants, export={"kv_cache": True},
        engines=[{"backend": "onnxruntime-cpu"}, {"backend": "onnxruntime-fused", "options": {"max_positions": 512}}],
        validation={"agreement_windows": 1, "parity": {"batch": 1, "length": 8}, "latency": None,
                    "decode": {"prompt": 16, "new_tokens": 4, "greedy_tokens": 8, "repeats": 1}},
    )
    s = build(recipe)
    by = {v["name"]: v for v in s.results["variants"]}
    for name in ("dense", "m2of4", "m2of4-int4"):
        e = by[name]["engines"]["onnxruntime-fused"]
        assert e["parity"]["passed"], (name, e["parity"])
        assert abs(e["perplexity_engine_vs_torch"]) < 1e-3, name
        d = by[name]["decode"]["engines"]["onnxruntime-fused"]
        assert d["tokens_identical"] and d["decode_ms_per_token"] > 0, (name, d)
    art = json.loads((tmp_path / "f" / "m2of4-int4" / "engine-onnxruntime-fused" / "stage.json").read_text())["info"]
    assert art["quantization"]["zeros_preserved"] and art["op_counts"]["MatMulNBits"] == 10  # 2 blocks × qkv (packed), o, gate, up, down
    assert "onnxruntime-fused" in (tmp_path / "f" / "report.md").read_text()


def _family_model(kind: str):
    from transformers import AutoModelForCausalLM, MistralConfig, Qwen2Config

    common = dict(vocab_size=257, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=512, tie_word_embeddings=False)
    cfg = Qwen2Config(**common) if kind == "qwen2" else MistralConfig(**common, sliding_window=8)
    torch.manual_seed(7)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
            elif name.endswith("proj.bias"):
                p.normal_(0, 0.05)  # Qwen2's q/k/v biases: non-zero, so the graph must add them
    return model


@pytest.mark.parametrize("kind", ["qwen2", "mistral-window-8"])
def test_other_llama_style_families(kind, tmp_path):
    """Qwen2 (q/k/v biases, untied head) and Mistral with a sliding window shorter than the sequence."""
    model = _family_model(kind.split("-")[0])
    art = _save_and_build(model, tmp_path)
    ids = np.random.default_rng(4).integers(0, 257, (2, 24)).astype(np.int64)
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids)).logits.numpy()
    prompt = ids[:1, :20]
    gen_ref = _reference_generate(model, prompt, 16)
    with _engine().runner(art) as r:
        got = r.infer({"input_ids": ids, "attention_mask": np.ones_like(ids)})["logits"]
        g = r.generate(prompt, 16)
    np.testing.assert_allclose(got, ref, atol=2e-4, rtol=1e-4)
    np.testing.assert_array_equal(g.tokens, gen_ref.sequences[:, 20:].numpy())


@pytest.mark.slow
def test_bundled_smollm2_decodes_64_greedy_tokens_as_pytorch_does(tmp_path):
    from calibrate.data import shakespeare_splits, tokenize
    from core.models import load_model
    from export.kv_export import GreedyResult, compare_with_generate

    loaded = load_model("smollm2-135m")
    engine = OnnxRuntimeFusedEngine({"threads": 2, "max_positions": 512})
    art = engine.build(loaded.directory, tmp_path)
    assert art.info["op_counts"]["GroupQueryAttention"] == 30 and art.info["nodes"] < 400  # the traced decode graph has ~1,900
    prompt = np.asarray(tokenize(loaded.tokenizer, shakespeare_splits().evaluation)[:128], np.int64)[None]
    with engine.runner(art) as r:
        g = r.generate(prompt, 64)
        logits = r.infer({"input_ids": prompt[:, :64], "attention_mask": np.ones((1, 64), np.int64)})["logits"]
    cmp = compare_with_generate(GreedyResult(g.tokens, g.logits, g.prefill_ms, g.decode_ms), loaded.model, prompt)
    assert cmp["tokens_identical"], cmp.get("fp64_reference")
    assert cmp["max_abs_logit_delta"] < 1e-3
    with torch.no_grad():
        ref = loaded.model(input_ids=torch.from_numpy(prompt[:, :64])).logits.numpy()
    np.testing.assert_allclose(logits, ref, atol=1e-3, rtol=1e-3)
