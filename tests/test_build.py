"""End-to-end build on a tiny Llama (GQA) and a byte tokenizer: stages, cache reuse, resumption, reports."""

import json

import pytest

from pipeline.build import build
from pipeline.recipe import recipe_from_dict


def tiny_recipe(model_dir, text_file, out, **over):
    d = {
        "name": "tiny",
        "model": {"source": str(model_dir)},
        "data": {
            "source": str(text_file),
            "eval_fraction": 0.25,
            "calibration": {"windows": 4, "length": 32},
            "evaluation": {"windows": 6, "length": 64},
        },
        "variants": [
            {"name": "magnitude-50", "passes": [{"magnitude": {"sparsity": 0.5}}]},
            {"name": "magnitude-2of4", "passes": [{"magnitude": {"pattern": "2:4"}}]},
        ],
        "validation": {
            "agreement_windows": 2,
            "parity": {"batch": 2, "length": 16},
            "latency": {"batch_sizes": [1], "sequence_lengths": [16], "warmup": 1, "repeats": 3},
        },
        "output": str(out),
    }
    d.update(over)
    return recipe_from_dict(d)


@pytest.fixture(scope="module")
def built(tiny_dirs, text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("build") / "tiny"
    summary = build(tiny_recipe(tiny_dirs["llama"], text_file, out))
    return out, summary


def test_build_writes_every_artifact_and_report(built):
    out, summary = built
    for name in ("manifest.json", "results.json", "report.md", "report.html", "accuracy_latency.png", "latency-onnxruntime-cpu/latency.json"):
        assert (out / name).is_file(), name
    for v in ("dense", "magnitude-50", "magnitude-2of4"):
        assert (out / v / "model" / "model" / "model.safetensors").is_file()
        assert (out / v / "onnx" / "model.onnx").is_file()
        assert (out / v / "engine-onnxruntime-cpu" / "model.ort.onnx").is_file()
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "magnitude-2of4" in html
    assert not summary.reused_all


def test_engine_perplexity_matches_pytorch_and_parity_passes(built):
    _, summary = built
    res = summary.results
    assert res["schema_version"] == 1
    names = [v["name"] for v in res["variants"]]
    assert names == ["dense", "magnitude-50", "magnitude-2of4"]
    for v in res["variants"]:
        r = v["engines"]["onnxruntime-cpu"]
        assert r["status"] == "ok"
        assert abs(r["perplexity_engine_vs_torch"]) < 1e-3, v["name"]
        assert r["parity"]["passed"], r["parity"]
        assert r["perplexity_engine"]["windows"] == 6 and len(r["perplexity_engine"]["window_nll"]) == 6
        assert r["perplexity_torch"]["windows"] == 4 == r["perplexity_engine_vs_torch_windows"]  # the default torch_windows
        assert len(r["latency"]["points"]) == 1
    m50 = res["variants"][1]["engines"]["onnxruntime-cpu"]
    assert m50["size"]["block_linear_sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert 0 < m50["agreement"]["top1_agreement"] <= 1 and m50["agreement"]["kl_dense_variant"] > 0
    assert m50["latency"]["points"][0]["ratio"] > 0
    # pruning must cost something on a random model: perplexities differ from dense
    dense_ppl = res["variants"][0]["engines"]["onnxruntime-cpu"]["perplexity_engine"]["perplexity"]
    assert m50["perplexity_engine"]["perplexity"] != pytest.approx(dense_ppl, rel=1e-4)
    assert res["variants"][1]["export"]["exporter"] == "rebind"


def test_agreement_from_engine_logits_equals_pytorch_agreement(built, tiny_dirs, text_file):
    """Agreement/KL come from the variant's engine logits against the dense engine's (computed once
    per build); they must equal what the two PyTorch models give on the same windows."""
    from calibrate.data import evaluation_windows, load_splits, tokenize
    from core.models import load_hf_dir
    from pipeline import validate as V

    out, summary = built
    dense, tok, _ = load_hf_dir(out / "dense" / "model" / "model")
    m50, _, _ = load_hf_dir(out / "magnitude-50" / "model" / "model")
    splits = load_splits(str(text_file), None, 0.25)
    windows = evaluation_windows(tokenize(tok, splits.evaluation), 64, 6)
    want = V.agreement(V.torch_outputs_fn(dense, "causal-lm"), V.torch_outputs_fn(m50, "causal-lm"), windows[:2], "check")
    got = summary.results["variants"][1]["engines"]["onnxruntime-cpu"]["agreement"]
    assert got["windows"] == 2 and got["top1_agreement"] == pytest.approx(want["top1_agreement"], abs=1e-9)
    assert got["kl_dense_variant"] == pytest.approx(want["kl_dense_variant"], rel=1e-3, abs=1e-6)


def test_dense_reference_is_recomputed_when_dense_validation_is_reused(tiny_dirs, text_file, tmp_path, caplog):
    import logging

    out = tmp_path / "b"
    first = build(tiny_recipe(tiny_dirs["llama"], text_file, out, variants=[{"name": "m50", "passes": [{"magnitude": {"sparsity": 0.5}}]}]))
    caplog.set_level(logging.INFO)
    second = build(tiny_recipe(tiny_dirs["llama"], text_file, out, variants=[{"name": "m60", "passes": [{"magnitude": {"sparsity": 0.6}}]}]))
    dense_stage = next(s for s in second.stages if s["stage"] == "dense/validate-onnxruntime-cpu")
    assert dense_stage["reused"]
    assert "dense onnxruntime-cpu logits for agreement: 2 windows computed once" in caplog.text
    a50 = first.results["variants"][1]["engines"]["onnxruntime-cpu"]["agreement"]
    a60 = second.results["variants"][1]["engines"]["onnxruntime-cpu"]["agreement"]
    assert a60["kl_dense_variant"] > a50["kl_dense_variant"] > 0  # more pruning, further from dense


def test_2of4_onnx_passes_polygraphy_sparsity_check(built):
    import onnx
    from polygraphy.tools.sparse import SparsityPruner

    out, _ = built
    pruner = SparsityPruner(onnx.load(str(out / "magnitude-2of4" / "onnx" / "model.onnx")))
    pruner.check()
    block_weights = {n for n in pruner.prune_infos if n.startswith("model.layers.")}
    assert len(block_weights) == 2 * 7  # every decoder linear of both blocks is a MatMul weight
    assert block_weights <= pruner.sparse_tensors
    dense = SparsityPruner(onnx.load(str(out / "dense" / "onnx" / "model.onnx")))
    dense.check()
    assert not dense.sparse_tensors


def test_second_run_reuses_every_stage_and_corruption_rebuilds_only_downstream(built, tiny_dirs, text_file):
    out, first = built
    recipe = tiny_recipe(tiny_dirs["llama"], text_file, out)
    again = build(recipe)
    assert again.reused_all and len(again.stages) == len(first.stages)
    assert json.loads((out / "results.json").read_text())["variants"][2]["name"] == "magnitude-2of4"
    onnx_file = out / "magnitude-2of4" / "onnx" / "model.onnx"
    original = onnx_file.read_bytes()
    data = bytearray(original)
    data[len(data) // 2] ^= 0x01
    onnx_file.write_bytes(bytes(data))
    third = build(recipe)
    rebuilt = {(s["variant"], s["stage"].split("/")[1]) for s in third.stages if not s["reused"]}
    # the corrupt export is detected and rebuilt; it comes out byte-identical, so the engine
    # and validation keyed on its content stay valid and are reused
    assert rebuilt == {("magnitude-2of4", "onnx")}
    assert onnx_file.read_bytes() == original
    # a corrupt engine is rebuilt and, when the engine bytes differ, so is its validation
    engine_file = out / "magnitude-2of4" / "engine-onnxruntime-cpu" / "model.ort.onnx"
    engine_file.write_bytes(engine_file.read_bytes()[:-1])
    fourth = build(recipe)
    rebuilt = {(s["variant"], s["stage"].split("/")[1]) for s in fourth.stages if not s["reused"]}
    assert ("magnitude-2of4", "engine-onnxruntime-cpu") in rebuilt
    assert {v for v, _ in rebuilt} <= {"magnitude-2of4", "all"}  # "all": the joint latency stage


def test_changed_option_rebuilds_that_variant_only(built, tiny_dirs, text_file):
    out, _ = built
    recipe = tiny_recipe(
        tiny_dirs["llama"],
        text_file,
        out,
        variants=[
            {"name": "magnitude-50", "passes": [{"magnitude": {"sparsity": 0.6}}]},
            {"name": "magnitude-2of4", "passes": [{"magnitude": {"pattern": "2:4"}}]},
        ],
    )
    s = build(recipe)
    rebuilt = {s_["variant"] for s_ in s.stages if not s_["reused"]}
    assert rebuilt == {"magnitude-50", "all"}  # the variant's stages, and the latency stage that times every variant
    m = s.results["variants"][1]["engines"]["onnxruntime-cpu"]
    assert m["size"]["block_linear_sparsity"] == pytest.approx(0.6, abs=1e-3)


def test_encoder_build(tiny_dirs, text_file, tmp_path):
    recipe = tiny_recipe(
        tiny_dirs["bert"],
        text_file,
        tmp_path / "enc",
        variants=[{"name": "m2of4", "passes": [{"magnitude": {"pattern": "2:4"}}]}],
        export={"exporter": "torchscript"},
    )
    s = build(recipe)
    r = s.results["variants"][1]["engines"]["onnxruntime-cpu"]
    assert r["parity"]["passed"]
    assert "perplexity_engine" not in r
    assert 0.0 < r["agreement"]["mean_cosine"] < 1.0


@pytest.mark.slow
def test_kv_cache_decode_stage(tiny_dirs, text_file, tmp_path):
    recipe = tiny_recipe(
        tiny_dirs["llama"],
        text_file,
        tmp_path / "kv",
        variants=[{"name": "m2of4", "passes": [{"magnitude": {"pattern": "2:4"}}]}],
        export={"kv_cache": True},
        validation={
            "agreement_windows": 1,
            "parity": {"batch": 1, "length": 8},
            "latency": None,
            "decode": {"prompt": 16, "new_tokens": 6, "greedy_tokens": 8, "repeats": 2},
        },
    )
    s = build(recipe)
    for v in s.results["variants"]:
        d = v["decode"]
        assert d["tokens_identical"], v["name"]
        assert d["max_abs_logit_delta"] <= 1e-3
        assert d["decode_ms_per_token"] > 0 and len(d["samples"]["decode_ms_per_token"]) == 2
    assert s.results["variants"][0]["decode"]["decode_ratio"] == 1.0
    assert "## Decode (KV cache" in (tmp_path / "kv" / "report.md").read_text()
    assert (tmp_path / "kv" / "m2of4" / "kv" / "decode.onnx").is_file()
    assert build(recipe).reused_all


def test_decode_validation_needs_kv_export(tiny_dirs, text_file, tmp_path):
    from core.errors import RecipeError

    with pytest.raises(RecipeError, match="validation.decode.*needs export.kv_cache"):
        tiny_recipe(tiny_dirs["llama"], text_file, tmp_path, validation={"decode": {}})


def test_graph_passes_in_the_build(tiny_dirs, text_file, tmp_path):
    recipe = tiny_recipe(
        tiny_dirs["llama"],
        text_file,
        tmp_path / "gp",
        variants=[{"name": "m2of4", "passes": [{"magnitude": {"pattern": "2:4"}}]}],
        export={"graph_passes": ["cleanup", "sparse_layout", "fp16"]},
        validation={"agreement_windows": 1, "parity": {"atol": 0.05, "rtol": 0.05, "batch": 1, "length": 8}, "latency": None},
    )
    s = build(recipe)
    import onnx

    for v in s.results["variants"]:
        assert set(v["export"]["graph_passes"]) == {"CleanupPass", "SparseLayoutPass", "Fp16GemmPass"}
        assert v["export"]["graph_passes"]["Fp16GemmPass"] is True
        r = v["engines"]["onnxruntime-cpu"]
        assert r["parity"]["passed"]
        assert abs(r["perplexity_engine_vs_torch"]) < 0.01  # fp16 GEMMs vs fp32 PyTorch
    proto = onnx.load(str(tmp_path / "gp" / "m2of4" / "onnx" / "model.onnx"))
    inits = {t.name: t for t in proto.graph.initializer}
    assert inits["model.layers.0.mlp.up_proj.weight.T.fp16"].data_type == onnx.TensorProto.FLOAT16
    assert (tmp_path / "gp" / "dense" / "onnx" / "raw.onnx").is_file()
    assert not (tmp_path / "gp" / "m2of4" / "onnx" / "raw.onnx").exists()
    assert s.results["variants"][1]["export"]["exporter"] == "rebind"


def test_one_shot_options_through_the_whole_build(tiny_dirs, text_file, tmp_path):
    """Issue 32's one-shot options as recipe passes: pruned, exported, run by the engine, validated."""
    out = tmp_path / "opts"
    summary = build(tiny_recipe(tiny_dirs["llama"], text_file, out, variants=[
        {"name": "wanda-opts", "passes": [{"wanda": {"pattern": "2:4", "dsnot": True, "permute": True, "reconstruct": "sublayer",
                                                     "batch_size": 1, "reconstruct_holdout": 1, "reconstruct_steps": 4}}]},
        {"name": "sparsegpt-opts", "passes": [{"sparsegpt": {"pattern": "2:4", "blocksize": 16, "permute": True, "reconstruct": "block",
                                                             "batch_size": 1, "reconstruct_holdout": 1, "reconstruct_steps": 4}}]},
    ]))
    variants = {v["name"]: v for v in summary.results["variants"]}
    for name in ("wanda-opts", "sparsegpt-opts"):
        r = variants[name]["engines"]["onnxruntime-cpu"]
        assert r["status"] == "ok" and r["parity"]["passed"], (name, r)
        assert abs(r["perplexity_engine_vs_torch"]) < 1e-3
        assert r["size"]["block_linear_sparsity"] == pytest.approx(0.5, abs=1e-3)
    (wanda,) = variants["wanda-opts"]["pass_results"]
    assert wanda["info"]["reconstruct_summary"]["mode"] == "sublayer" and set(wanda["info"]["permute"]) == {"0", "1"}
    assert any("dsnot" in group for group in wanda["info"]["layers"].values())
    (sgpt,) = variants["sparsegpt-opts"]["pass_results"]
    assert sgpt["info"]["reconstruct_summary"]["mode"] == "block" and set(sgpt["info"]["permute"]) == {"0", "1"}
