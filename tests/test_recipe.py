import re
from pathlib import Path

import pytest
import yaml

from core.errors import RecipeError
from pipeline.recipe import load_recipe, recipe_from_dict


def base(**over):
    d = {
        "name": "t",
        "model": {"source": "smollm2-135m"},
        "variants": [{"name": "m50", "passes": [{"magnitude": {"sparsity": 0.5}}]}],
    }
    d.update(over)
    return d


def test_default_recipe_is_valid_and_includes_dense():
    r = load_recipe(None)
    names = [v.name for v in r.variants]
    assert names[0] == "dense"
    two4 = next(v for v in r.variants if v.name == "sparsegpt-2of4")
    assert two4.passes[0].name == "sparsegpt" and two4.passes[0].options["pattern"] == "2:4"
    # a structured variant, so the default report shows a real CPU speed-up next to its cost
    assert any(p.name == "structured" for v in r.variants for p in v.passes)
    assert r.data.evaluation.windows == 40 and r.data.evaluation.length == 512


def test_latency_recipe_keeps_the_full_sweep_and_every_one_shot_method():
    r = load_recipe("latency")
    assert {"magnitude-50", "magnitude-2of4", "wanda-2of4", "sparsegpt-2of4", "sparsegpt-50"} <= {v.name for v in r.variants}
    options = {v.name: v.passes[0].options for v in r.variants if v.passes}  # issue 32's one-shot options ship here
    assert options["wanda-2of4-permute"]["permute"] and options["wanda-2of4-dsnot"]["dsnot"]
    assert options["sparsegpt-2of4-permute-recon"]["reconstruct"] == "block"
    assert options["wanda-2of4-permute-recon"]["permute"] and options["wanda-2of4-permute-recon"]["reconstruct"] == "block"
    assert r.validation.latency.batch_sizes == [1, 4] and r.validation.latency.sequence_lengths == [128, 512]


def test_sparse_cpu_recipe_ships_sparse_int8_and_int4_on_the_native_engine():
    r = load_recipe("sparse-cpu")
    assert "native-cpu" in [e.backend for e in r.engines]
    quantized = {v.name: v.passes for v in r.variants if v.passes and v.passes[-1].name == "quantize"}
    assert set(quantized) == {"dense-int8-head", "sds-sparsegpt-2of4-int8", "sds-sparsegpt-50-int8", "sds-sparsegpt-2of4-int4", "head4-gptq", "ffn40-int4",
                              "sds-sparsegpt-50-int4", "sparsegpt-70-sens-int4"}
    # the frontier's structured companion of teal-30: FFN widths the 4-bit blocks of 32 divide
    ffn = quantized.pop("ffn40-int4")
    assert ffn[0].name == "structured" and ffn[0].options["round_to"] == 32 and ffn[-1].options["bits"] == 4
    forms = {v.name: (v.passes[0].options.get("form", "threshold"), v.passes[0].options.get("groups")) for v in r.variants
             if v.passes and v.passes[0].name == "activation"}
    assert forms == {"teal-30": ("threshold", None), "topk-30": ("topk", None), "cats-30": ("threshold", ["gate_out"])}
    head = quantized.pop("head4-gptq")[-1].options  # the head alone, by GPTQ: the block linears keep the model's own 4-bit grid
    assert (head["bits"], head["method"], head["head"], head["targets"]) == (4, "gptq", True, [])
    for name, passes in quantized.items():
        q = passes[-1].options
        assert (q["bits"], q.get("head", False)) == ((4, False) if name.endswith("int4") else (8, True))
    assert quantized["sds-sparsegpt-2of4-int8"][0].options["pattern"] == "2:4" and quantized["sds-sparsegpt-50-int8"][0].options["sparsity"] == 0.5
    # 2:4 in 4 bits: mask-aware GPTQ in blocks of 64, read by native-cpu as 2:4-int4
    int4 = quantized["sds-sparsegpt-2of4-int4"]
    assert int4[0].options["pattern"] == "2:4" and int4[-1].options["method"] == "gptq" and int4[-1].options["block_size"] == 64
    # unstructured in 4 bits (bitmask-int4, the 16-bit kernel): 50 % SDS at blocks of 64, 70 % sensitivity at 128
    sds50, sens70 = quantized["sds-sparsegpt-50-int4"], quantized["sparsegpt-70-sens-int4"]
    assert (sds50[0].name, sds50[0].options["sparsity"], sds50[-1].options["method"], sds50[-1].options["block_size"]) == ("sds", 0.5, "gptq", 64)
    assert (sens70[0].name, sens70[0].options["sparsity"], sens70[0].options["allocation"], sens70[-1].options["block_size"]) == ("sparsegpt", 0.7, "sensitivity", 128)


def test_recipe_file_round_trip(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(base()))
    r = load_recipe(str(p))
    assert [v.name for v in r.variants] == ["dense", "m50"]
    assert r.variants[1].passes[0].options["sparsity"] == 0.5


@pytest.mark.parametrize(
    "variants, key, expected",
    [
        ([{"name": "x", "passes": [{"magnitude": {"sparsity": 1.5}}]}], "variants[0].passes[0].magnitude", r"sparsity 1.5 is outside \[0, 1\)"),
        ([{"name": "x", "passes": [{"magnitude": {"pattern": "3:2"}}]}], "variants[0].passes[0].magnitude", "pattern '3:2' needs 0 < N < M"),
        ([{"name": "x", "passes": [{"magnitude": {"sparsity": "half"}}]}], "variants[0].passes[0].magnitude.sparsity", "expected a number"),
        ([{"name": "x", "passes": [{"magnitude": {"sparsity": 0.5, "pattern": "2:4"}}]}], "variants[0].passes[0].magnitude", "exactly one"),
        ([{"name": "x", "passes": [{"magnitude": {"sparsity": 0.5, "sparsity_typo": 1}}]}], "variants[0].passes[0].magnitude.sparsity_typo", "unknown key"),
        ([{"name": "x", "passes": [{"magnitud": {"sparsity": 0.5}}]}], "variants[0].passes[0]", "unknown pass 'magnitud'"),
        ([{"name": "x", "passes": [{"magnitude": {"sparsity": 0.5, "targets": ["qq"]}}]}], "variants[0].passes[0].magnitude", "not linear roles"),
        ([{"name": "x", "passes": []}], "variants[0].passes", "is empty"),
        ([{"name": "x/y", "passes": [{"magnitude": {"sparsity": 0.5}}]}], "variants[0].name", "must match"),
        (
            [{"name": "x", "passes": [{"magnitude": {"sparsity": 0.5}}]}, {"name": "x", "passes": [{"magnitude": {"sparsity": 0.4}}]}],
            "variants[1].name",
            "used by an earlier variant",
        ),
    ],
)
def test_bad_variants_name_the_key(variants, key, expected):
    with pytest.raises(RecipeError) as err:
        recipe_from_dict(base(variants=variants))
    msg = str(err.value)
    assert f"'{key}'" in msg
    assert re.search(expected, msg), msg


@pytest.mark.parametrize(
    "over, key, expected",
    [
        ({"model": {"source": "/no/such/model.gguf"}}, "model.source", "neither a bundled model"),
        ({"model": {"source": "smollm2-135m", "dtype": "int3"}}, "model.dtype", "not supported"),
        ({"model": {"sorce": "x"}}, "model.sorce", "unknown key"),
        ({"data": {"source": "/no/such.txt"}}, "data.source", "not an existing file"),
        ({"data": {"evaluation": {"windows": "ten"}}}, "data.evaluation.windows", "expected an integer"),
        ({"data": {"evaluation": {"windows": 0}}}, "data.evaluation.windows", "outside"),
        ({"export": {"exporter": "magic"}}, "export.exporter", "not one of"),
        ({"engines": ["tensorflow-lite"]}, "engines[0].backend", "not a known backend"),
        ({"validation": {"latency": {"batch_sizes": [0]}}}, "validation.latency.batch_sizes", "outside"),
        ({"colour": "blue"}, "colour", "unknown key"),
    ],
)
def test_bad_sections_name_the_key(over, key, expected):
    with pytest.raises(RecipeError) as err:
        recipe_from_dict(base(**over))
    assert f"'{key}'" in str(err.value)
    assert expected in str(err.value)


def test_user_text_source_and_relative_paths(tmp_path, text_file):
    (tmp_path / "corpus.txt").write_text(text_file.read_text())
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(base(data={"source": "corpus.txt"})))
    r = load_recipe(str(p))
    assert Path(r.data.source) == (tmp_path / "corpus.txt").resolve()


def test_missing_recipe_file_and_bad_yaml(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(str(bad))


def test_unknown_shipped_recipe():
    with pytest.raises(RecipeError, match="neither a file nor a shipped recipe"):
        load_recipe("no-such-recipe")


def test_every_shipped_recipe_loads_with_valid_pass_options():
    from passes import get_pass_config_class
    from pipeline.schema import build_dataclass

    shipped = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "pipeline" / "recipes").glob("*.yaml"))
    assert {"default", "sds", "admm", "mixed"} <= set(shipped)
    for name in shipped:
        r = load_recipe(name)
        for v in r.variants:
            for p in v.passes:  # every option of every pass is accepted by its config class
                build_dataclass(get_pass_config_class(p.name), p.options, f"{name}: {v.name}.{p.name}")
    long = next(v for v in load_recipe("sds").variants if v.name == "sds-sparsegpt-2of4-long").passes
    assert [(p.name, p.options["iterations"], p.options["recon_steps"], p.options["reconstruct"]) for p in long] == [("sds", 2, 128, "block")]
    admm = load_recipe("admm")
    kd = next(v for v in admm.variants if v.name == "sparsegpt-2of4-kd").passes[1].options
    ad = next(v for v in admm.variants if v.name == "admm-2of4").passes[0].options
    assert kd["steps"] == ad["steps"] and kd["lr"] == ad["lr"] and kd["max_minutes"] == ad["max_minutes"]  # the same budget
