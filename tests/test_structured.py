"""Structured pruning: slicing, GQA bookkeeping, allocation, save/reload, the pass and recovery."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import FAMILIES, VOCAB, byte_tokenizer, tiny_model
from passes.base import PassContext
from passes.distill import DistillConfig, DistillPass
from core.structure import LayerShape, kv_heads_for, layer_shapes, mask_block, slice_block
from passes.structured import StructuredConfig, StructuredPass, allocate, plan_heads
from core.adapters import adapter_for


def _out(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _ids(n=2, length=24, seed=0):
    return torch.randint(3, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


# For each family: kept query heads per block and kept FFN channels per block (heterogeneous layers).
KEEP = {
    "llama": ([[2, 3], [0, 2]], [list(range(0, 128, 2)), list(range(40))]),  # block 0: one KV group; block 1: one head per group
    "gpt2": ([[0, 3], [1, 2, 3]], [list(range(0, 256, 3)), list(range(100))]),
    "opt": ([[1], [0, 1, 2]], [list(range(64)), list(range(1, 128, 2))]),
    "bert": ([[0, 1], [3]], [list(range(50)), list(range(0, 128, 4))]),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_slicing_is_exact_when_removed_units_are_zero(family):
    model = tiny_model(family)
    adapter = adapter_for(model.config)
    heads, ffn = KEEP[family]
    for b in range(2):
        mask_block(model, adapter, b, heads[b], ffn[b])
    ids = _ids()
    masked = _out(model, ids)
    sliced_model = copy.deepcopy(model)
    shapes = [slice_block(sliced_model, adapter, b, heads[b], ffn[b]) for b in range(2)]
    sliced = _out(sliced_model, ids)
    assert [s.heads for s in shapes] == [len(h) for h in heads]
    assert [s.ffn for s in shapes] == [len(f) for f in ffn]
    assert layer_shapes(sliced_model, adapter) == shapes
    torch.testing.assert_close(sliced, masked, atol=2e-5, rtol=0)
    assert sum(p.numel() for p in sliced_model.parameters()) < sum(p.numel() for p in model.parameters())


def test_slicing_changes_outputs_when_units_were_not_zero():
    model = tiny_model("llama")
    adapter = adapter_for(model.config)
    ids = _ids()
    dense = _out(model, ids)
    slice_block(model, adapter, 0, [0, 1], None)
    assert (dense - _out(model, ids)).abs().max() > 1e-3


def test_gqa_bookkeeping():
    model = tiny_model("llama")  # 4 query heads, 2 KV heads: group of 2
    adapter = adapter_for(model.config)
    attn = adapter.blocks(model)[0].self_attn
    shape = slice_block(model, adapter, 0, [2, 3], [0, 1, 2])
    assert shape == LayerShape(heads=2, kv_heads=1, ffn=3)
    assert attn.k_proj.weight.shape == (16, 64) and attn.v_proj.weight.shape == (16, 64)
    assert attn.q_proj.weight.shape == (32, 64) and attn.o_proj.weight.shape == (64, 32)
    assert attn.num_key_value_groups == 2
    shape = slice_block(model, adapter, 1, [1, 3], None)  # one query head per group: k/v stay
    assert shape == LayerShape(heads=2, kv_heads=2, ffn=128)
    assert adapter.blocks(model)[1].self_attn.num_key_value_groups == 1
    with pytest.raises(ValueError, match="unequal sizes"):
        kv_heads_for([0, 1, 2], heads=4, kv_heads=2)
    assert kv_heads_for([0, 1, 4, 5], heads=6, kv_heads=3) == [0, 2]
    _out(model, _ids())  # the family's own forward runs with the new counts
    # planning: kv-group units keep whole groups; query units keep equal counts per group
    scores = [torch.tensor([1.0, 2.0, 9.0, 8.0, 0.5, 0.1])]
    assert plan_heads(scores, [3], 1 / 3, "kv-group", "uniform", 0.1) == [[0, 1, 2, 3]]
    assert plan_heads(scores, [3], 0.5, "query", "uniform", 0.1) == [[1, 2, 4]]
    assert plan_heads(scores, [6], 0.5, "query", "uniform", 0.1) == [[1, 2, 3]]  # no GQA: any heads


def test_allocation_uniform_global_floor_and_rounding():
    s = [torch.arange(16.0), torch.arange(16.0) * 100]
    assert [len(k) for k in allocate(s, 0.5, "uniform")] == [8, 8]
    assert allocate(s, 0.25, "uniform")[0] == list(range(4, 16))
    # global with per-layer normalisation: equal shapes → equal counts
    assert [len(k) for k in allocate(s, 0.5, "global")] == [8, 8]
    skew = [torch.cat([torch.full((15,), 1e-3) + torch.arange(15.0) * 1e-5, torch.ones(1)]), torch.ones(16)]
    kept = allocate(skew, 0.5, "global", min_keep=0.25)
    assert len(kept[0]) == 4 and len(kept[1]) == 15  # global ranking would leave layer 0 one unit; the floor keeps 4
    assert kept[0] == [12, 13, 14, 15]
    assert [len(k) for k in allocate([torch.rand(100)], 0.5, "uniform", multiple=16)] == [48]
    assert [len(k) for k in allocate([torch.rand(100)], 0.95, "uniform", multiple=16)] == [16]


def test_save_and_reload_with_per_layer_shapes(tmp_path):
    from core.models import load_hf_dir, save_hf_dir
    from core.structure import record_shapes

    model = tiny_model("llama")
    adapter = adapter_for(model.config)
    slice_block(model, adapter, 0, [0, 1], list(range(48)))
    slice_block(model, adapter, 1, [1, 3], list(range(96)))
    shapes = record_shapes(model, adapter)
    save_hf_dir(model, byte_tokenizer(), tmp_path / "m")
    loaded, tok, _ = load_hf_dir(tmp_path / "m")
    assert layer_shapes(loaded, adapter) == shapes
    ids = _ids()
    torch.testing.assert_close(_out(loaded, ids), _out(model, ids), atol=0, rtol=0)
    prompt = tok("Now is the winter", return_tensors="pt")
    gen = loaded.generate(**prompt, max_new_tokens=8, do_sample=False)
    ref = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert gen.shape[1] == prompt["input_ids"].shape[1] + 8 and torch.equal(gen, ref)
    # a config whose shapes do not fit its weights is refused
    import json

    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["pruned_layers"][0]["ffn"] = 40
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    from core.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="pruned_layers"):
        load_hf_dir(tmp_path / "m")


def _ctx(model, windows, teacher=None, work_dir=None):
    return PassContext(adapter_for(model.config), calibration=lambda: windows, progress=False, teacher=teacher, work_dir=work_dir)


@pytest.mark.parametrize("importance", ["activation", "taylor"])
def test_structured_pass_shrinks_and_reports(importance):
    model = tiny_model("llama")
    windows = _ids(8, 32, seed=1)
    cfg = StructuredConfig(heads=0.5, ffn=0.5, importance=importance, round_to=8)
    r = StructuredPass(cfg).run(model, _ctx(model, windows))
    kept = r.info["kept"]
    assert [k["kv_heads"] for k in kept] == [1, 1] and [k["heads"] for k in kept] == [2, 2]
    assert [k["ffn"] for k in kept] == [64, 64]
    assert r.info["parameters_after"] < r.info["parameters_before"]
    assert model.config.pruned_layers[0] == {"heads": 2, "kv_heads": 1, "ffn": 64}
    # multiply-adds per token of the block linears (hidden 64, head width 16): q and o hidden·16·heads
    # each, k and v hidden·16·kv_heads each, gate, up and down hidden·ffn each
    def macs(heads: int, kv: int, ffn: int) -> int:
        return 2 * (64 * 16 * (2 * heads + 2 * kv) + 3 * 64 * ffn)

    assert r.info["linear_macs_per_token"] == {"before": macs(4, 2, 128), "after": macs(2, 1, 64)}
    _out(model, windows[:2])


def test_structured_pass_removes_heads_of_an_encoder():
    model = tiny_model("bert")
    r = StructuredPass(StructuredConfig(heads=0.5)).run(model, _ctx(model, _ids(4, 16)))
    assert r.info["head_unit"] == "query"
    assert [k["heads"] for k in r.info["kept"]] == [2, 2] and [k["kv_heads"] for k in r.info["kept"]] == [2, 2]
    assert model.encoder.layer[0].attention.self.query.weight.shape == (32, 64)
    assert model.encoder.layer[0].attention.self.num_attention_heads == 2
    _out(model, _ids())


def test_activation_importance_ranks_a_zeroed_head_and_channel_last():
    from calibrate.importance import activation_importance

    model = tiny_model("bert")
    adapter = adapter_for(model.config)
    mask_block(model, adapter, 0, [0, 1, 3], list(range(1, 128)))  # head 2 and channel 0 are dead
    imp = activation_importance(model, adapter, _ids(4, 16), hd=16, show_progress=False)
    assert int(imp.heads[0].argmin()) == 2 and float(imp.heads[0][2]) == 0.0
    assert float(imp.ffn[0][0]) == 0.0 and float(imp.ffn[0][1:].min()) > 0


def test_taylor_importance_refuses_encoders():
    from calibrate.importance import taylor_importance

    model = tiny_model("bert")
    with pytest.raises(ValueError, match="activation"):
        taylor_importance(model, adapter_for(model.config), _ids(2, 8), hd=16, show_progress=False)


def test_mask_mode_keeps_shapes():
    model = tiny_model("llama")
    r = StructuredPass(StructuredConfig(ffn=0.5, apply="mask")).run(model, _ctx(model, _ids(4, 16)))
    assert model.model.layers[0].mlp.down_proj.weight.shape == (64, 128)
    assert r.info["kept"][0]["ffn"] == 64
    assert float((model.model.layers[0].mlp.down_proj.weight == 0).all(0).sum()) == 64
    macs = r.info["linear_macs_per_token"]
    assert macs["after"] == macs["before"]  # masked channels are still computed
    assert StructuredPass.shapes_change({"apply": "mask"}) is False and StructuredPass.shapes_change({}) is True


def test_structured_config_errors():
    with pytest.raises(ValueError, match="both 0"):
        StructuredConfig()
    with pytest.raises(ValueError, match="ffn 1.0"):
        StructuredConfig(ffn=1.0)
    with pytest.raises(ValueError, match="round_to 7"):
        StructuredConfig(ffn=0.5, round_to=7)
    with pytest.raises(ValueError, match="head_unit 'groups'"):
        StructuredConfig(heads=0.5, head_unit="groups")


def _kl(student, teacher, ids):
    from passes.distill import distill_loss

    with torch.no_grad():
        s = student(input_ids=ids, use_cache=False)
        t = teacher(input_ids=ids, use_cache=False)
    return float(distill_loss(s, t, True, 1.0, 0.0)[0])


@pytest.mark.slow
def test_distill_reduces_kl_and_keeps_zeros():
    teacher = tiny_model("llama")
    student = copy.deepcopy(teacher)
    windows = _ids(8, 32, seed=2)
    StructuredPass(StructuredConfig(ffn=0.5, apply="mask")).run(student, _ctx(student, windows))
    zeros = student.model.layers[0].mlp.down_proj.weight == 0
    before = _kl(student, teacher, windows)
    r = DistillPass(DistillConfig(steps=40, batch_size=4, lr=3e-4, warmup_steps=2, compute_dtype="float32", hidden_mse=0.5)).run(student, _ctx(student, windows, teacher=lambda: teacher))
    after = _kl(student, teacher, windows)
    assert after < 0.7 * before, (before, after)
    assert bool((student.model.layers[0].mlp.down_proj.weight[zeros] == 0).all())
    assert r.info["steps"] == 40 and not r.info["stopped_early"]


def _interrupt_distill_at_step(monkeypatch, step):
    """Make the ``step``-th distillation loss raise KeyboardInterrupt; returns the real loss function."""
    import passes.distill as distill_mod

    real = distill_mod.distill_loss
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == step:
            raise KeyboardInterrupt("simulated interruption")
        return real(*a, **k)

    monkeypatch.setattr(distill_mod, "distill_loss", flaky)
    return real


def test_distill_resumes_from_checkpoint(tmp_path, monkeypatch):
    import passes.distill as distill_mod

    teacher = tiny_model("llama")
    windows = _ids(6, 16, seed=3)
    pruned = copy.deepcopy(teacher)
    slice_block(pruned, adapter_for(pruned.config), 0, None, list(range(64)))
    cfg = DistillConfig(steps=6, lr=1e-3, warmup_steps=1, checkpoint_every=2, compute_dtype="float32")

    straight = copy.deepcopy(pruned)
    DistillPass(cfg).run(straight, _ctx(straight, windows, lambda: teacher, tmp_path / "a"))

    (tmp_path / "b").mkdir()
    interrupted = copy.deepcopy(pruned)
    real = _interrupt_distill_at_step(monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt):
        DistillPass(cfg).run(interrupted, _ctx(interrupted, windows, lambda: teacher, tmp_path / "b"))
    monkeypatch.setattr(distill_mod, "distill_loss", real)
    resumed = copy.deepcopy(pruned)
    r = DistillPass(cfg).run(resumed, _ctx(resumed, windows, lambda: teacher, tmp_path / "b"))
    assert r.info["resumed_from_step"] == 4 and r.info["steps"] == 6
    for (n, a), (_, b) in zip(straight.named_parameters(), resumed.named_parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=n)


@pytest.mark.slow
def test_pruned_model_exports_and_decodes_with_per_layer_kv_heads(tmp_path):
    import numpy as np

    from engines.onnxruntime import OnnxRuntimeCpuEngine
    from export.kv_export import cache_layout, compare_with_generate, export_kv_graphs, greedy_generate
    from export.onnx_export import export_onnx

    model = tiny_model("llama")
    adapter = adapter_for(model.config)
    slice_block(model, adapter, 0, [0, 1], list(range(48)))  # one KV head left in block 0, two in block 1
    lay = cache_layout(model, adapter)
    assert lay.kv_heads == (1, 2)
    export_onnx(model, "causal-lm", tmp_path / "model.onnx", 18, "torchscript")
    ids = _ids(2, 20).numpy()
    with OnnxRuntimeCpuEngine({}).open(tmp_path / "model.onnx") as r:
        got = r.infer({"input_ids": ids, "attention_mask": np.ones_like(ids)})["logits"]
    assert np.abs(got - _out(model, torch.from_numpy(ids)).numpy()).max() <= 1e-4
    export_kv_graphs(model, adapter, tmp_path)
    prompt = ids[:1, :9]
    eng = OnnxRuntimeCpuEngine({})
    with eng.open(tmp_path / "prefill.onnx") as pre, eng.open(tmp_path / "decode.onnx") as dec:
        cmp = compare_with_generate(greedy_generate(pre, dec, lay, prompt, 6), model, prompt)
    assert cmp["tokens_identical"] and cmp["max_abs_logit_delta"] <= 1e-4


@pytest.mark.slow
def test_build_with_structured_and_recovery_variants(tiny_dirs, text_file, tmp_path, caplog):
    import logging

    from test_build import tiny_recipe

    caplog.set_level(logging.INFO, logger="passes.structured")
    from pipeline.build import build

    variants = [
        {"name": "ffn50", "passes": [{"structured": {"ffn": 0.5, "heads": 0.5}}]},
        {"name": "ffn50-kd", "passes": [{"structured": {"ffn": 0.5, "heads": 0.5}}, {"distill": {"steps": 3, "checkpoint_every": 1}}]},
        {"name": "ffn50-masked", "passes": [{"structured": {"ffn": 0.5, "heads": 0.5, "apply": "mask"}}]},
    ]
    out = tmp_path / "b"
    recipe = tiny_recipe(tiny_dirs["llama"], text_file, out, variants=variants)
    recipe.export.graph_passes = ["shrink"]
    summary = build(recipe)
    res = {v["name"]: v for v in summary.results["variants"]}
    assert set(res) == {"dense", "ffn50", "ffn50-kd", "ffn50-masked"}
    # the masked variant reuses the dense graph, and the shrink pass then removes the zeroed units from it
    masked = res["ffn50-masked"]
    assert masked["export"]["exporter"] == "rebind"
    shrink = masked["export"]["graph_passes"]["ShrinkPass.report"]
    assert [f["kept"] for f in shrink["ffn"]] == [64, 64] and [a["kept_kv"] for a in shrink["attention"]] == [1, 1]
    ort = {n: res[n]["engines"]["onnxruntime-cpu"] for n in res}
    assert ort["ffn50-masked"]["size"]["onnx_bytes"] < 0.8 * ort["dense"]["size"]["onnx_bytes"]
    assert ort["ffn50-masked"]["parity"]["passed"]
    assert abs(ort["ffn50-masked"]["perplexity_engine_vs_torch"]) < 1e-4
    for name in ("ffn50", "ffn50-kd"):
        assert ort[name]["parity"]["passed"]
        params = res[name]["engines"]["onnxruntime-cpu"]["size"]["parameters"]
        assert params < res["dense"]["engines"]["onnxruntime-cpu"]["size"]["parameters"]
        assert not list((out / name).glob("model.work-*"))  # recovery checkpoints removed once the stage is done
    assert "reusing activation importance" in caplog.text  # the second variant prunes the same model the same way
    report = (out / "report.md").read_text()
    assert "Structured pruning" in report and "| 0–1 | 2 / 4 | 1 / 2 | 64 / 128 |" in report  # both blocks keep the same shape: one row


@pytest.mark.slow
def test_interrupted_build_resumes_recovery_from_its_checkpoint(tiny_dirs, text_file, tmp_path, monkeypatch):
    import passes.distill as distill_mod
    from test_build import tiny_recipe

    from pipeline.build import build

    variants = [{"name": "kd", "passes": [{"structured": {"ffn": 0.5}}, {"distill": {"steps": 6, "checkpoint_every": 2}}]}]
    out = tmp_path / "b"
    recipe = tiny_recipe(tiny_dirs["llama"], text_file, out, variants=variants)
    real = _interrupt_distill_at_step(monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt):
        build(recipe)
    assert len(list((out / "kd").glob("model.work-*/distill-checkpoint.json"))) == 1
    assert not (out / "kd" / "model" / "stage.json").exists()
    monkeypatch.setattr(distill_mod, "distill_loss", real)
    summary = build(recipe)
    info = next(p for p in summary.results["variants"][1]["pass_results"] if p["name"] == "distill")["info"]
    assert info["resumed_from_step"] == 4 and info["steps"] == 6
    assert not list((out / "kd").glob("model.work-*"))


@pytest.mark.slow
def test_build_decode_stage_with_per_layer_kv_heads(tiny_dirs, text_file, tmp_path):
    """KV-cache graphs and the decode stage for a variant whose blocks keep different KV head counts."""
    from test_build import tiny_recipe

    from pipeline.build import build
    from pipeline.recipe import DecodeSpec

    variants = [{"name": "kv1", "passes": [{"structured": {"heads": 0.25, "allocation": "global", "min_keep": 0.5}}]}]
    recipe = tiny_recipe(tiny_dirs["llama"], text_file, tmp_path / "b", variants=variants)
    recipe.export.kv_cache = True
    recipe.validation.decode = DecodeSpec(prompt=8, new_tokens=4, greedy_tokens=4, repeats=2)
    summary = build(recipe)
    res = {v["name"]: v for v in summary.results["variants"]}
    kept = next(p for p in res["kv1"]["pass_results"] if p["name"] == "structured")["info"]["kept"]
    assert sorted(k["kv_heads"] for k in kept) == [1, 2]  # one block lost its weaker KV group, the other kept both
    for name in ("dense", "kv1"):
        d = res[name]["decode"]
        assert d["tokens_identical"] and d["max_abs_logit_delta"] <= 1e-4
        assert len(d["samples"]["decode_ms_per_token"]) == 2 and d["decode_ms_per_token"] > 0
    assert "decode_ratio" in res["kv1"]["decode"]
