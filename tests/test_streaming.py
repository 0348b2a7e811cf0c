"""Block-streamed pruning (issue 30): one block in memory at a time, from disk to disk — the same
weights as in memory, for every family and one-shot pass; refusals where a pass needs the whole model."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import byte_tokenizer, tiny_model
from core.models import load_hf_dir, save_hf_dir, weight_arrays
from core.streaming import BlockStream, SafetensorsIndex, SafetensorsWriter
from passes import PassContext, get_pass_class
from passes.streamed import run_streamed
from test_build import tiny_recipe

PASSES = [
    ("magnitude", {"pattern": "2:4"}),
    ("wanda", {"sparsity": 0.5, "batch_size": 2, "calibration_dtype": "float32"}),
    ("sparsegpt", {"pattern": "2:4", "batch_size": 2, "calibration_dtype": "float32"}),
]
MORE_PASSES = [  # two sweeps (measure, then prune) and per-block training
    ("wanda", {"sparsity": 0.5, "allocation": "owl", "owl_lambda": 0.1, "batch_size": 2, "calibration_dtype": "float32"}),
    ("sparsegpt", {"sparsity": 0.5, "allocation": "sensitivity", "sensitivity_measure": "relative", "sensitivity_unit": "matrix",
                   "batch_size": 2, "calibration_dtype": "float32"}),
    ("sds", {"pattern": "2:4", "batch_size": 2, "recon_steps": 4, "holdout_batches": 1, "calibration_dtype": "float32"}),
]


def _windows():
    return torch.randint(0, 256, (6, 40), generator=torch.Generator().manual_seed(0))


def _pass(name, opts):
    cls = get_pass_class(name)
    return cls, cls.config_class(**opts)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2", "phi3"])
def test_streamed_passes_write_the_in_memory_weights(family, tmp_path):
    """Every streamed pass leaves bit-identical weights to the same pass in memory — also Gemma 2,
    whose windows (40) pass its sliding window (16), so each block's own mask matters."""
    src = tmp_path / "src"
    save_hf_dir(tiny_model(family), byte_tokenizer(), src)
    windows = _windows()
    for name, opts in PASSES + (MORE_PASSES if family in ("llama", "gemma2") else []):
        model, _, adapter = load_hf_dir(src)
        ctx = PassContext(adapter, calibration=lambda: windows, progress=False)
        cls, cfg = _pass(name, opts)
        cls(cfg).run(model, ctx)
        out = tmp_path / name
        results = run_streamed(src, [(cls, cfg)], out, ctx, tmp_path / "work")
        streamed = weight_arrays(out)
        state = model.state_dict()
        assert set(streamed) <= set(state)
        for key, value in streamed.items():
            assert torch.equal(torch.from_numpy(value), state[key]), (family, name, key)
        layers = results[0]["layers"]
        sizes = [c["shape"][0] * c["shape"][1] for c in layers]
        assert layers and abs(sum(c["sparsity"] * n for c, n in zip(layers, sizes)) / sum(sizes) - 0.5) < 0.02, (family, name)
        assert results[0]["info"]["stream"]["blocks"] == 2
        reloaded, _, _ = load_hf_dir(out)  # a valid Hugging Face directory with the pruned weights
        assert torch.equal(reloaded(windows[:2]).logits, model(windows[:2]).logits)


def test_streamed_logits_equal_the_models(tmp_path):
    from calibrate.streamed import streamed_logits_fn

    for family in ("llama", "gemma2", "opt"):
        src = tmp_path / family
        model = tiny_model(family)
        save_hf_dir(model, byte_tokenizer(), src)
        windows = _windows()
        fn = streamed_logits_fn(src, windows, batch_size=4, show_progress=False)
        with torch.inference_mode():
            assert torch.allclose(fn(windows[2:4]), model(windows[2:4]).logits, rtol=0, atol=1e-5), family
        with pytest.raises(ValueError, match="given up front"):
            fn(torch.zeros(1, 40, dtype=torch.long))


def test_sharded_bf16_source_streams(tmp_path):
    """A model saved in shards (with an index) and in bfloat16 streams into one float32 file."""
    model = tiny_model("llama").to(torch.bfloat16)
    src = tmp_path / "sharded"
    model.save_pretrained(src, max_shard_size="40KB")
    byte_tokenizer().save_pretrained(src)
    assert (src / "model.safetensors.index.json").is_file() and len(list(src.glob("*.safetensors"))) > 2
    index = SafetensorsIndex(src)
    assert index.read("model.norm.weight").dtype == torch.float32
    windows = _windows()
    ref, _, adapter = load_hf_dir(src)
    ctx = PassContext(adapter, calibration=lambda: windows, progress=False)
    cls, cfg = _pass(*PASSES[1])
    cls(cfg).run(ref, ctx)
    run_streamed(src, [(cls, cfg)], tmp_path / "out", ctx, tmp_path / "work")
    out = weight_arrays(tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").glob("*.safetensors")) == ["model.safetensors"]
    for k, v in out.items():
        assert torch.equal(torch.from_numpy(v), ref.state_dict()[k]), k


def test_writer_refuses_a_changed_shape_and_leaves_no_partial_file(tmp_path):
    w = SafetensorsWriter(tmp_path / "model.safetensors", {"a": (2, 3), "b": (4,)})
    w.write("a", torch.ones(2, 3))
    with pytest.raises(ValueError, match="must keep every shape"):
        w.write("b", torch.ones(5))
    with pytest.raises(ValueError, match="not in the source"):
        w.write("c", torch.ones(1))
    with pytest.raises(RuntimeError, match="never written"):
        w.close()
    w.abort()
    assert not any(tmp_path.iterdir())


def test_a_failing_pass_leaves_no_output(tmp_path):
    src = tmp_path / "src"
    save_hf_dir(tiny_model("llama"), byte_tokenizer(), src)
    stream = BlockStream(src, tmp_path / "out")
    stream.load(0)
    stream.done(0)
    with pytest.raises(RuntimeError, match="already written"):
        stream.load(0)
    stream.abort()
    assert not (tmp_path / "out" / "model.safetensors").exists()
    assert not list((tmp_path / "out").glob("*.partial"))
    from core.errors import PassFailure

    cls, cfg = _pass("magnitude", {"sparsity": 0.5, "blocks": [7]})  # no such block: the pass raises inside its sweep
    with pytest.raises(PassFailure, match="pass 'magnitude': .*no linear matches"):
        run_streamed(src, [(cls, cfg)], tmp_path / "out2", PassContext(BlockStream(src, None).adapter, progress=False), tmp_path / "work")
    assert not list((tmp_path / "work").rglob("model.safetensors*"))


def test_refusals_name_the_reason(tiny_dirs, text_file, tmp_path):
    from core.errors import RecipeError
    from pipeline.checks import check_recipe

    cls, cfg = _pass("wanda", {"sparsity": 0.5, "allocation": "sensitivity"})
    assert "sensitivity_measure 'relative'" in cls.stream_refusal(cfg)
    assert cls.stream_refusal(cls.config_class(sparsity=0.5, allocation="owl")) is None
    cls, cfg = _pass("structured", {"heads": 0.25})
    assert "whole model in memory" in cls.stream_refusal(cfg)
    recipe = tiny_recipe(
        tiny_dirs["llama"], text_file, tmp_path / "b", model={"source": str(tiny_dirs["llama"]), "stream": "always"},
        variants=[{"name": "heads", "passes": [{"structured": {"heads": 0.25}}]}],
    )
    with pytest.raises(RecipeError, match="model.stream.*'heads'.*cannot run block-streamed"):
        check_recipe(recipe, tmp_path / "b")
    with pytest.raises(RecipeError, match="model.stream"):
        tiny_recipe(tiny_dirs["llama"], text_file, tmp_path / "c", model={"source": str(tiny_dirs["llama"]), "stream": "sometimes"})


def test_build_streamed_equals_in_memory_and_prune_reports_the_same_perplexity(tiny_dirs, text_file, tmp_path):
    """The whole build with ``model.stream: always`` gives the in-memory build's weights and perplexities;
    ``pipeline prune --perplexity`` evaluates the streamed variant block by block to the same figure."""
    from pipeline.build import Builder, build
    from pipeline.validate import perplexity, torch_outputs_fn

    variants = [
        {"name": "sgpt", "passes": [{"sparsegpt": {"pattern": "2:4", "batch_size": 2, "calibration_dtype": "float32"}}]},
        {"name": "sgpt-mag", "passes": [
            {"sparsegpt": {"pattern": "2:4", "batch_size": 2, "calibration_dtype": "float32"}}, {"magnitude": {"sparsity": 0.6}},
        ]},
    ]
    res = {}
    for mode in ("never", "always"):
        recipe = tiny_recipe(tiny_dirs["llama"], text_file, tmp_path / mode, model={"source": str(tiny_dirs["llama"]), "stream": mode}, variants=variants)
        res[mode] = build(recipe).results
    for a, b in zip(res["never"]["variants"], res["always"]["variants"]):
        for key in ("perplexity_engine", "perplexity_torch"):
            assert a["engines"]["onnxruntime-cpu"][key]["perplexity"] == b["engines"]["onnxruntime-cpu"][key]["perplexity"], (a["name"], key)
    for name in ("sgpt", "sgpt-mag"):
        w_mem, w_str = weight_arrays(tmp_path / "never" / name / "model" / "model"), weight_arrays(tmp_path / "always" / name / "model" / "model")
        assert all((w_mem[k] == w_str[k]).all() for k in w_str)
        stage = json.loads((tmp_path / "always" / name / "model" / "stage.json").read_text())
        assert stage["info"]["streamed"] is True
    assert res["always"]["variants"][2]["pass_results"][1]["info"]["stream"]["blocks"] == 2  # the second pass started from sgpt's model

    recipe = tiny_recipe(tiny_dirs["llama"], text_file, tmp_path / "prune", model={"source": str(tiny_dirs["llama"]), "stream": "always"}, variants=variants[:1])
    builder = Builder(recipe)
    out = builder.prune(perplexity=True)
    row = {r["variant"]: r for r in out["variants"]}
    assert row["sgpt"]["streamed"] and abs(row["sgpt"]["sparsity"] - 0.5) < 0.01
    assert (tmp_path / "prune" / "prune.json").is_file() and not (tmp_path / "prune" / "sgpt" / "onnx").exists()
    model, _, _ = load_hf_dir(tmp_path / "never" / "sgpt" / "model" / "model")
    windows = builder.ctx.eval_windows()
    expected = perplexity(torch_outputs_fn(model, "causal-lm"), windows, "in memory")["perplexity"]
    assert row["sgpt"]["perplexity"] == pytest.approx(expected, rel=1e-5)


def test_prune_preflight_chooses_streaming_and_names_the_variant(tiny_dirs, text_file, tmp_path):
    from core.errors import ResourceError
    from pipeline.checks import model_facts
    from pipeline.preflight import check, check_prune, estimate, in_memory_pruning_bytes, streamed_pruning_bytes, streaming_needed

    recipe = tiny_recipe(tiny_dirs["llama"], text_file, tmp_path / "b", variants=[{"name": "sgpt", "passes": [{"sparsegpt": {"pattern": "2:4"}}]}])
    facts, weights = model_facts(recipe)
    v = next(x for x in recipe.variants if x.name == "sgpt")
    in_memory, streamed = in_memory_pruning_bytes(recipe, facts, weights, v), streamed_pruning_bytes(recipe, facts, weights)
    assert streamed < in_memory
    assert streaming_needed(recipe, facts, weights, v, memory_available=in_memory - 1)
    assert not streaming_needed(recipe, facts, weights, v, memory_available=in_memory)
    assert "block-streamed" in check_prune(recipe, facts, weights, recipe.variants, {"sgpt": True}, memory_available=streamed)
    with pytest.raises(ResourceError, match="variant 'sgpt'.*model.stream: always"):
        check_prune(recipe, facts, weights, recipe.variants, {"sgpt": False}, memory_available=streamed)
    est = estimate(recipe, facts, weights, recipe.variants, trains=False, calibrates=True)
    with pytest.raises(ResourceError, match="pipeline prune RECIPE"):  # the whole build cannot stream its export
        check(est, tmp_path, memory_available=2 * weights - 1, disk_available=1 << 40)


def test_available_memory_honours_a_memory_cgroup(tmp_path):
    """Inside a container whose cgroup caps memory, the preflight (and model.stream: auto) sees the cap."""
    from pipeline.preflight import cgroup_memory_left

    proc = tmp_path / "cgroup"
    v1 = tmp_path / "v1"
    (v1 / "memory" / "job").mkdir(parents=True)
    (v1 / "memory" / "job" / "memory.limit_in_bytes").write_text("3221225472\n")
    (v1 / "memory" / "job" / "memory.usage_in_bytes").write_text("1073741824\n")
    (v1 / "memory" / "job" / "memory.stat").write_text("cache 5\ntotal_inactive_file 1048576\n")
    proc.write_text("5:devices:/\n4:memory:/job\n0::/\n")
    assert cgroup_memory_left(proc, v1) == 3221225472 - 1073741824 + 1048576
    (v1 / "memory" / "job" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    assert cgroup_memory_left(proc, v1) is None  # no limit
    v2 = tmp_path / "v2"
    (v2 / "kube").mkdir(parents=True)
    (v2 / "kube" / "memory.max").write_text("2147483648\n")
    (v2 / "kube" / "memory.current").write_text("147483648\n")
    proc.write_text("0::/kube\n")
    assert cgroup_memory_left(proc, v2) == 2000000000
    (v2 / "kube" / "memory.max").write_text("max\n")
    assert cgroup_memory_left(proc, v2) is None
    proc.write_text("garbage")
    assert cgroup_memory_left(proc, v2) is None


def test_a_killed_streamed_prune_resumes_from_its_checkpoint(tiny_dirs, text_file, tmp_path):
    """SIGKILL right after the checkpoint before block 1: the rerun continues at block 1 (block 0 is not
    pruned again) and writes the weights an uninterrupted run writes."""
    import os
    import subprocess
    import sys

    from core.streaming import CHECKPOINT_SECONDS_ENV, FAULT_ENV

    variants = [{"name": "sgpt", "passes": [
        {"sparsegpt": {"pattern": "2:4", "batch_size": 2, "calibration_dtype": "float32", "reconstruct": "block", "reconstruct_steps": 2,
                       "reconstruct_holdout": 1}},
        {"wanda": {"sparsity": 0.6, "batch_size": 2, "calibration_dtype": "float32"}},
    ]}]
    outs = {}
    for name, env in (("whole", {}), ("killed", {FAULT_ENV: "1"})):
        recipe = tiny_recipe(tiny_dirs["llama"], text_file, tmp_path / name, model={"source": str(tiny_dirs["llama"]), "stream": "always"}, variants=variants)
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(recipe.to_dict()))
        cmd = [sys.executable, "-m", "pipeline", "prune", str(path), "--output", str(tmp_path / name)]
        base_env = {**os.environ, CHECKPOINT_SECONDS_ENV: "0"}
        p = subprocess.run(cmd, env={**base_env, **env}, capture_output=True, text=True)
        if name == "killed":
            assert p.returncode == -9, p.stderr[-2000:]
            work = next((tmp_path / name / "sgpt").glob("model.work-*"))
            assert (work / "stream-0" / "stream-checkpoint.json").is_file()
            p = subprocess.run(cmd, env=base_env, capture_output=True, text=True)
            assert "resuming a killed sweep at block 1" in p.stderr
        assert p.returncode == 0, p.stderr[-2000:]
        outs[name] = weight_arrays(tmp_path / name / "sgpt" / "model" / "model")
        passes = json.loads((tmp_path / name / "sgpt" / "model" / "passes.json").read_text())
        assert [len(r["layers"]) for r in passes] == [14, 14]  # 7 linears × 2 blocks, restored on resume
        if name == "killed":
            assert passes[0]["info"]["stream"]["resumed_at_block"] == 1
            assert sorted(passes[0]["info"]["reconstruct"]) == ["0", "1"]
    assert all((outs["whole"][k] == outs["killed"][k]).all() for k in outs["whole"])


def test_the_shipped_streamed_recipe_streams_every_variant():
    from pipeline.checks import check_streaming
    from pipeline.recipe import load_recipe

    recipe = load_recipe("streamed")
    assert recipe.model.stream == "always" and len(recipe.variants) == 3
    check_streaming(recipe)  # raises naming the variant if one of its passes cannot stream
