"""Contextual sparsity: gather execution equals dense-with-mask execution, the predictor learns,
recall@k, threshold calibration, options."""

import copy

import pytest
import torch

from calibrate.contextual import collect_context_stats, mass_share, recall_at_k
from core.adapters import adapter_for
from passes import PassContext
from core.contextual import ContextualMLP, full_mode
from passes.contextual import ContextualConfig, ContextualPass, train_predictor
from tests.conftest import VOCAB, byte_tokenizer, tiny_model

IDS = torch.randint(0, VOCAB, (16, 48), generator=torch.Generator().manual_seed(11))


def _ctx(model):
    return PassContext(adapter_for(model.config), calibration=lambda: IDS, progress=False)


def test_recall_at_k_on_a_hand_made_case():
    act = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0, 5.0]])
    scores = torch.tensor([[9.0, 0.0, 8.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0, 2.0]])
    # row 0: picks {0, 2}, true top-2 {0, 1} → 1/2; row 1: picks {3, 4} = true {3, 4} → 1
    assert recall_at_k(scores, act, 2) == pytest.approx(0.75)
    assert recall_at_k(act, act, 3) == 1.0
    with pytest.raises(ValueError, match="outside"):
        recall_at_k(scores, act, 6)
    # one unit holds all the mass: 1 of 4 units for 90 %
    assert mass_share(torch.tensor([[10.0, 0.0, 0.0, 0.0]])) == pytest.approx(0.25)


@pytest.mark.parametrize("selector", ["oracle", "threshold", "predictor"])
def test_gathered_single_token_equals_the_masked_dense_computation(selector):
    model = tiny_model("llama")
    mlp = model.model.layers[1].mlp
    g = torch.Generator().manual_seed(3)
    pred = None
    if selector == "predictor":
        from passes.contextual import Predictor

        pred = Predictor(64, 16, 128)
        torch.nn.init.normal_(pred.up.weight, generator=g)
    from core.adapters import LLAMA

    cm = ContextualMLP(mlp, LLAMA.gated_mlp_names(), selector, 40, 1, threshold=0.05, predictor=pred, predictor_input="mlp")
    x = torch.randn(3, 5, 64, generator=g)
    with torch.no_grad():
        masked = cm(x)  # multi-token: each token's own selection, as a mask
        for t in range(5):
            one = cm(x[:, t : t + 1])  # single token: gathers
            assert torch.allclose(one[:, 0], masked[:, t], atol=1e-5, rtol=1e-4), (selector, t)
        # and the selection really drops units: the masked output differs from the dense MLP's
        assert not torch.allclose(masked, mlp(x), atol=1e-4)


def test_keep_one_is_the_dense_model_and_dense_blocks_stay_dense():
    model = tiny_model("llama")
    ref = copy.deepcopy(model)
    res = ContextualPass(ContextualConfig(keep=1.0, selector="oracle", dense_blocks=[0])).run(model, _ctx(model))
    assert isinstance(model.model.layers[1].mlp, ContextualMLP) and not isinstance(model.model.layers[0].mlp, ContextualMLP)
    assert res.info["blocks"]["0"]["keep"] == 1.0
    with torch.no_grad():
        a = model(input_ids=IDS[:2], use_cache=False).logits
        b = ref(input_ids=IDS[:2], use_cache=False).logits
    assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("selector, inp", [("predictor", "prev"), ("predictor", "block"), ("threshold", "mlp"), ("oracle", "mlp")])
def test_kv_decode_with_gathers_equals_the_masked_full_sequence(selector, inp):
    """Token by token through the KV cache (gather path, the predictor reading the captured block
    inputs) gives the logits of the full-sequence masked forward."""
    model = tiny_model("llama")
    ContextualPass(ContextualConfig(keep=0.25, selector=selector, predictor_input=inp, dense_blocks=[], predictor_steps=20, tokens_per_window=8)).run(model, _ctx(model))
    ids = IDS[:2, :12]
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits
        out = model(input_ids=ids[:, :1], use_cache=True)
        steps = [out.logits[:, -1]]
        past = out.past_key_values
        for t in range(1, ids.shape[1]):
            out = model(input_ids=ids[:, t : t + 1], past_key_values=past, use_cache=True)
            past = out.past_key_values
            steps.append(out.logits[:, -1])
    assert torch.allclose(torch.stack(steps, 1), full, atol=1e-4, rtol=1e-4)
    with full_mode(model, "dense"), torch.no_grad():
        dense_prefill = model(input_ids=ids, use_cache=False).logits
    assert not torch.allclose(dense_prefill, full, atol=1e-4)  # the dense prefill mode is another function


def test_predictor_training_lowers_its_loss_and_beats_chance_recall():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 32, generator=g)
    w = torch.randn(32, 96, generator=g)
    act = torch.relu(x @ w)  # units driven by a linear function of the input: learnable by a linear predictor
    cfg = ContextualConfig(keep=0.2, predictor_steps=100, predictor_lr=1e-2, predictor_batch=256)
    pred, fit = train_predictor(x[:1800], act[:1800], cfg, rank=16, seed=0)
    assert fit["loss_last"] < 0.7 * fit["loss_first"]
    with torch.no_grad():
        r = recall_at_k(pred(x[1800:]), act[1800:], 19)
    assert r > 0.5  # chance is 0.2


def test_threshold_is_calibrated_to_the_kept_share_and_stats_are_bounded(tmp_path):
    model = tiny_model("llama")
    res = ContextualPass(ContextualConfig(keep=0.3, selector="threshold", dense_blocks=[], tokens_per_window=16)).run(model, _ctx(model))
    for rec in res.info["blocks"].values():
        assert rec["kept_share_holdout"] == pytest.approx(0.3, abs=0.08)
    stats = collect_context_stats(tiny_model("llama"), adapter_for(model.config), IDS, tokens_per_window=8, max_tokens=40, directory=tmp_path, show_progress=False)
    assert stats.tokens == 40 and not stats.data  # 5 windows × 8 tokens, on disk only
    blk = stats.block(1)
    assert blk["act"].shape == (40, 128) and blk["prev"].shape == (40, 64)
    assert torch.equal(blk["prev"], stats.block(0)["block"])  # block 1's lookahead input is block 0's input


def test_options_are_validated():
    with pytest.raises(ValueError, match="selector 'topk'"):
        ContextualConfig(selector="topk")
    with pytest.raises(ValueError, match="keep 0"):
        ContextualConfig(keep=0)
    with pytest.raises(ValueError, match="predictor_input"):
        ContextualConfig(predictor_input="x")
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="dense_blocks"):
        ContextualPass(ContextualConfig(dense_blocks=[5])).run(model, _ctx(model))
    bert = tiny_model("bert")
    with pytest.raises(ValueError, match="causal LMs"):
        ContextualPass(ContextualConfig()).run(bert, _ctx(bert))
    gpt2 = tiny_model("gpt2")
    with pytest.raises(ValueError, match="gated MLP"):
        ContextualPass(ContextualConfig()).run(gpt2, _ctx(gpt2))


@pytest.mark.slow
@pytest.mark.parametrize("predictor_input", ["prev", "mlp"])
def test_onnx_decode_graph_gathers_and_equals_pytorch_contextual_decode(predictor_input, tmp_path):
    import numpy as np
    import onnx

    from engines.onnxruntime import OnnxRuntimeCpuEngine
    from export.kv_export import cache_layout, compare_with_generate, export_kv_graphs, greedy_generate

    model = tiny_model("llama")
    adapter = adapter_for(model.config)
    cfg = ContextualConfig(keep=0.25, selector="predictor", predictor_input=predictor_input, dense_blocks=[], predictor_steps=20, tokens_per_window=8)
    ContextualPass(cfg).run(model, _ctx(model))
    with full_mode(model, "dense"):  # the prefill graph is dense; decode steps gather
        export_kv_graphs(model, adapter, tmp_path)
        ops = [n.op_type for n in onnx.load(str(tmp_path / "decode.onnx")).graph.node]
        assert ops.count("TopK") == 2 and ops.count("Gather") >= 6  # selector → TopK → Gather of 3 weights, per block
        lay = cache_layout(model, adapter)
        prompt = np.random.default_rng(0).integers(0, VOCAB, (2, 9)).astype(np.int64)
        eng = OnnxRuntimeCpuEngine({})
        with eng.open(tmp_path / "prefill.onnx") as pre, eng.open(tmp_path / "decode.onnx") as de:
            res = greedy_generate(pre, de, lay, prompt, 12)
        cmp = compare_with_generate(res, model, prompt)
    assert cmp["tokens_identical"] and cmp["max_abs_logit_delta"] <= 1e-3
    # and the contextual decode is not the dense model's
    dense = tiny_model("llama")
    with torch.no_grad():
        a = model(input_ids=torch.from_numpy(prompt[:, :1])).logits
        b = dense(input_ids=torch.from_numpy(prompt[:, :1])).logits
    assert not torch.allclose(a, b, atol=1e-3)


@pytest.mark.parametrize("selector", ["threshold", "predictor"])
def test_saved_contextual_model_reloads_to_the_same_function(selector, tmp_path):
    from core.models import load_hf_dir, save_hf_dir

    model = tiny_model("llama")
    cfg = ContextualConfig(keep=0.3, selector=selector, dense_blocks=[0], predictor_steps=10, tokens_per_window=8)
    ContextualPass(cfg).run(model, _ctx(model))
    assert model.config.contextual["blocks"] == {"1": round(0.3 * 128)} and model.config.contextual["selector"] == selector
    save_hf_dir(model, byte_tokenizer(), tmp_path)
    again, _, _ = load_hf_dir(tmp_path)
    assert isinstance(again.model.layers[1].mlp, ContextualMLP) and not isinstance(again.model.layers[0].mlp, ContextualMLP)
    with torch.no_grad():
        assert torch.allclose(model(input_ids=IDS[:2]).logits, again(input_ids=IDS[:2]).logits, atol=1e-5)
        one = IDS[:2, :1]
        assert torch.allclose(model(input_ids=one).logits, again(input_ids=one).logits, atol=1e-5)


@pytest.mark.slow
def test_contextual_variant_through_the_whole_build(tiny_dirs, text_file, tmp_path):
    """A predictor variant: calibrated, saved and reloaded, exported (full-sequence graph with masks, KV
    graphs with gathers), engine perplexity equal to PyTorch's, greedy decode through ORT equal to
    the PyTorch contextual model's, decode ms/token and its ratio in results.json and the report."""
    from test_build import tiny_recipe

    from pipeline.build import build

    out = tmp_path / "b"
    variants = [{"name": "ctx-30", "passes": [{"contextual": {"keep": 0.3, "selector": "predictor", "dense_blocks": [0], "predictor_steps": 20, "tokens_per_window": 8}}]}]
    recipe = tiny_recipe(
        tiny_dirs["llama"], text_file, out, variants=variants,
        export={"opset": 18, "exporter": "dynamo", "kv_cache": True},
        validation={
            "agreement_windows": 2, "parity": {"batch": 2, "length": 16},
            "latency": {"batch_sizes": [1], "sequence_lengths": [16], "warmup": 1, "repeats": 2},
            "decode": {"prompt": 16, "new_tokens": 4, "greedy_tokens": 8, "repeats": 2},
        },
    )
    summary = build(recipe)
    v = summary.results["variants"][1]
    eng = v["engines"]["onnxruntime-cpu"]
    assert eng["status"] == "ok" and abs(eng["perplexity_engine_vs_torch"]) < 1e-3
    (pr,) = v["pass_results"]
    assert pr["name"] == "contextual" and 0.0 <= pr["info"]["mean_recall_at_k"] <= 1.0
    dec = v["decode"]
    assert dec["tokens_identical"] and dec["max_abs_logit_delta"] <= 1e-3 and dec["decode_ratio"] > 0
    import onnx

    ops = [n.op_type for n in onnx.load(str(out / "ctx-30" / "kv" / "decode.onnx")).graph.node]
    assert ops.count("TopK") == 1  # block 1 only; block 0 stays dense
    md = (out / "report.md").read_text()
    assert "## Contextual sparsity (Deja Vu)" in md and "**ctx-30**: contextual MLP sparsity, selector predictor, 0.30" in md
    assert "decode " in md.split("## Contextual sparsity")[1] and "Contextual sparsity (Deja Vu)" in (out / "report.html").read_text()
