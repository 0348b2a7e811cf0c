"""Everything a recipe can be checked for is checked before the first model load (``pipeline check`` and
the build's preflight), and every failure inside a build reaches the user as one line naming the
variant, the stage and the pass — no traceback unless ``-v``."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import yaml

from pipeline.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _recipe(tmp_path: Path, model: Path | str, text: Path, variants: list, **over) -> Path:
    doc = {
        "name": "probe",
        "model": {"source": str(model)},
        "data": {"source": str(text), "eval_fraction": 0.25, "calibration": {"windows": 4, "length": 32}, "evaluation": {"windows": 4, "length": 64}},
        "variants": variants,
        "validation": {"agreement_windows": 1, "parity": {"batch": 1, "length": 16}, "latency": {"batch_sizes": [1], "sequence_lengths": [16], "warmup": 0, "repeats": 1}},
    }
    for k, v in over.items():
        doc[k] = v if not isinstance(v, dict) or k not in doc else {**doc[k], **v}
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return p


def _check(path: Path, caplog) -> tuple[int, str]:
    caplog.clear()
    with caplog.at_level(logging.INFO), mock.patch("core.models.load_model", side_effect=AssertionError("a model was loaded")), mock.patch(
        "core.models.load_hf_dir", side_effect=AssertionError("a model was loaded")
    ):
        rc = main(["check", str(path)])
    return rc, "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)


MAG = [{"name": "a", "passes": [{"magnitude": {"sparsity": 0.5}}]}]

PROBES = {
    # name: (recipe overrides, variants, the key the error must name, a phrase of the reason)
    "engine option of the wrong type": ({"engines": [{"backend": "onnxruntime-cpu", "options": {"threads": "banana"}}]}, MAG, "engines[0].options.threads", "expected an integer"),
    "unknown engine option": ({"engines": [{"backend": "onnxruntime-cpu", "options": {"bogus_key": 1}}]}, MAG, "engines[0].options.bogus_key", "unknown key"),
    "engine option out of range": ({"engines": [{"backend": "onnxruntime-cpu", "options": {"optimization": "max"}}]}, MAG, "engines[0].options.optimization", "not one of"),
    "blocks beyond the model": ({}, [{"name": "a", "passes": [{"magnitude": {"sparsity": 0.5, "blocks": [40]}}]}], "variants[0].passes[0].magnitude.blocks", "outside the model's 2 blocks"),
    "N:M that does not divide": ({}, [{"name": "a", "passes": [{"wanda": {"pattern": "2:3"}}]}], "variants[0].passes[0].wanda.pattern", "divisible by 3"),
    "ADMM N:M that does not divide": ({}, [{"name": "a", "passes": [{"admm": {"pattern": "1:3", "init": "magnitude"}}]}], "variants[0].passes[0].admm.pattern", "divisible by 3"),
    "one-shot reconstruct holdout >= batches": ({}, [{"name": "a", "passes": [{"wanda": {"pattern": "2:4", "reconstruct": "block"}}]}], "variants[0].passes[0].wanda.reconstruct_holdout", "leaves none to reconstruct"),
    "SDS holdout >= windows": ({}, [{"name": "a", "passes": [{"sds": {"sparsity": 0.5, "holdout_batches": 2}}]}], "variants[0].passes[0].sds.holdout_batches", "leaves none to reconstruct"),
    "calibration longer than the context": ({"data": {"calibration": {"windows": 4, "length": 4096}}}, MAG, "data.calibration.length", "longer than the model's context of 512"),
    "latency longer than the context": ({"validation": {"latency": {"sequence_lengths": [1024]}}}, MAG, "validation.latency.sequence_lengths", "context of 512"),
    "contextual dense_blocks beyond the model": ({}, [{"name": "a", "passes": [{"contextual": {"dense_blocks": [5]}}]}], "variants[0].passes[0].contextual.dense_blocks", "outside the model's 2 blocks"),
}


@pytest.mark.parametrize("probe", sorted(PROBES))
def test_probe_fails_at_check_naming_the_key(probe, tiny_dirs, text_file, tmp_path, caplog):
    over, variants, key, reason = PROBES[probe]
    rc, err = _check(_recipe(tmp_path, tiny_dirs["llama"], text_file, variants, **over), caplog)
    assert rc == 1, err
    assert f"recipe key '{key}'" in err and reason in err, err


def test_kv_cache_on_an_encoder_fails_at_check(tiny_dirs, text_file, tmp_path, caplog):
    rc, err = _check(_recipe(tmp_path, tiny_dirs["bert"], text_file, MAG, export={"kv_cache": True}), caplog)
    assert rc == 1 and "recipe key 'export.kv_cache'" in err and "encoder" in err, err


def test_contextual_on_an_encoder_fails_at_check(tiny_dirs, text_file, tmp_path, caplog):
    rc, err = _check(_recipe(tmp_path, tiny_dirs["bert"], text_file, [{"name": "c", "passes": [{"contextual": {}}]}]), caplog)
    assert rc == 1 and "variants[0].passes[0].contextual" in err and "encoder" in err, err


def test_a_valid_recipe_passes_check_with_the_resource_estimate(tiny_dirs, text_file, tmp_path, caplog, capsys):
    rc, err = _check(_recipe(tmp_path, tiny_dirs["llama"], text_file, [{"name": "a", "passes": [{"sds": {"pattern": "2:4", "holdout_batches": 1}}]}]), caplog)
    assert rc == 0, err
    out = capsys.readouterr().out
    assert "is valid" in out and "preflight: about" in out and "GiB of disk" in out


def test_check_reads_the_bundled_gguf_config_without_dequantising(tmp_path):
    """The bundled SmolLM2 (a GGUF): ``blocks: [40]`` is refused from the GGUF header's block count."""
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump({"name": "p", "variants": [{"name": "a", "passes": [{"magnitude": {"sparsity": 0.5, "blocks": [40]}}]}]}), encoding="utf-8")
    env = {"PIPELINE_CACHE_DIR": str(tmp_path / "empty-cache")}  # no fp32 cache entry: the header is all there is
    import os

    r = subprocess.run([sys.executable, "-m", "pipeline", "check", str(p)], capture_output=True, text=True, cwd=ROOT, timeout=120, env={**os.environ, **env})
    assert r.returncode == 1
    assert "recipe key 'variants[0].passes[0].magnitude.blocks': blocks [40] are outside the model's 30 blocks" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "empty-cache").exists()


def test_gguf_header_gives_the_config(tmp_path):
    from core.models import config_without_weights, read_gguf_header, resolve_source

    src = resolve_source("smollm2-135m")
    meta, elements = read_gguf_header(src.path)
    assert meta["general.architecture"] == "llama" and meta["llama.block_count"] == 30
    assert 130e6 < elements < 140e6  # SmolLM2-135M
    with pytest.raises(Exception, match="not a GGUF file"):
        bad = tmp_path / "x.gguf"
        bad.write_bytes(b"nope" * 10)
        read_gguf_header(bad)
    with mock.patch("core.models.cached_dir_if_built", return_value=None):
        config, weights = config_without_weights(src)
    assert config["num_hidden_layers"] == 30 and config["num_key_value_heads"] == 3 and config["max_position_embeddings"] == 8192
    assert weights == 4 * elements


# --- one error path ------------------------------------------------------------------------------

VALID_OPTIONS = {
    "magnitude": {"sparsity": 0.5},
    "wanda": {"sparsity": 0.5},
    "sparsegpt": {"sparsity": 0.5},
    "structured": {"ffn": 0.5},
    "distill": {"steps": 1},
    "sds": {"sparsity": 0.5, "holdout_batches": 1, "recon_steps": 1},
    "admm": {"steps": 2, "init": "magnitude"},
    "contextual": {},
    "activation": {"sparsity": 0.4},
    "quantize": {"bits": 4, "method": "gptq"},
}


def test_every_registered_pass_is_probed():
    from passes import registry

    assert set(registry()) == set(VALID_OPTIONS), "add the new pass to VALID_OPTIONS"


@pytest.mark.parametrize("name", sorted(VALID_OPTIONS))
def test_a_pass_failing_at_run_time_is_one_line_naming_variant_stage_and_pass(name, tiny_dirs, text_file, tmp_path_factory, caplog, capsys, monkeypatch):
    from passes import registry

    out = tmp_path_factory.getbasetemp() / "error-path-build"  # shared: the dense stages are built once
    cls = registry()[name]
    monkeypatch.setattr(cls, "run", lambda self, model, ctx: (_ for _ in ()).throw(ValueError(f"{name} broke on purpose")))
    recipe = _recipe(tmp_path_factory.mktemp(name), tiny_dirs["llama"], text_file, [{"name": "v", "passes": [{name: VALID_OPTIONS[name]}]}], output=str(out))
    caplog.clear()
    with caplog.at_level(logging.INFO):
        rc = main(["build", str(recipe)])
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert rc == 1
    assert [r.getMessage() for r in errors] == [f"variant 'v', stage model, pass '{name}': {name} broke on purpose"]
    assert all(r.exc_info is None for r in errors) and "Traceback" not in capsys.readouterr().err
    assert not (out / "v" / "model").exists()  # nothing half-built left in place


def test_a_real_run_time_error_names_variant_stage_and_pass_and_v_adds_the_traceback(tiny_dirs, text_file, tmp_path, caplog):
    # a text whose calibration part is shorter than one window: a DataError at the pass's first use of the data
    short = tmp_path / "short.txt"
    short.write_text("\n\n".join(f"Line {i} of a short text." for i in range(8)), encoding="utf-8")
    recipe = _recipe(tmp_path, tiny_dirs["llama"], short, [{"name": "w", "passes": [{"wanda": {"sparsity": 0.5}}]}], data={"calibration": {"windows": 4, "length": 500}})
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert main(["build", str(recipe), "-o", str(tmp_path / "b")]) == 1
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].getMessage().startswith("variant 'w', stage model, pass 'wanda': "), errors[0].getMessage()
    assert errors[0].exc_info is None
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert main(["build", str(recipe), "-o", str(tmp_path / "b"), "-v"]) == 1
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors[0].exc_info is not None  # -v: the traceback is logged with the line
