"""Stage reuse and corruption detection (artifacts), and the GGUF → fp32 model cache."""

import json

import pytest

from core import models
from core.artifacts import STAGE_FILE, check_stage, run_stage


def _writer(calls):
    def build(tmp):
        calls.append(1)
        (tmp / "a.bin").write_bytes(b"x" * 1000)
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.txt").write_text("hello")
        return {"n": len(calls)}

    return build


def test_stage_is_reused_then_rebuilt_when_corrupt_or_key_changes(tmp_path):
    calls = []
    d = tmp_path / "stage"
    first = run_stage(d, "s", "k1", {}, _writer(calls))
    assert not first.reused and len(calls) == 1
    again = run_stage(d, "s", "k1", {}, _writer(calls))
    assert again.reused and len(calls) == 1 and again.record.info == {"n": 1}
    # same size, different bytes: detected by the hash
    (d / "sub" / "b.txt").write_text("HELLO")
    rec, why = check_stage(d, "k1")
    assert rec is None and "does not match its recorded SHA-256" in why
    rebuilt = run_stage(d, "s", "k1", {}, _writer(calls))
    assert not rebuilt.reused and len(calls) == 2 and (d / "sub" / "b.txt").read_text() == "hello"
    (d / "a.bin").unlink()
    assert "missing" in check_stage(d, "k1")[1]
    run_stage(d, "s", "k1", {}, _writer(calls))
    assert len(calls) == 3
    run_stage(d, "s", "k2", {}, _writer(calls))
    assert len(calls) == 4
    assert json.loads((d / STAGE_FILE).read_text())["key"] == "k2"


def test_interrupted_stage_leaves_previous_result_and_no_partial_files(tmp_path):
    d = tmp_path / "stage"
    run_stage(d, "s", "k1", {}, _writer([]))

    def boom(tmp):
        (tmp / "a.bin").write_bytes(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_stage(d, "s", "k2", {}, boom)
    assert (d / "a.bin").read_bytes() == b"x" * 1000  # the finished stage is untouched
    assert not list(tmp_path.glob(".stage.tmp-*"))
    assert check_stage(d, "k1")[0] is not None


def test_gguf_cache_reused_and_corruption_rebuilt(tmp_path, cache_dir, monkeypatch, tiny_dirs):
    """The GGUF dequantisation is replaced by a tiny model writer; the cache logic is the real one."""
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF-not-really" * 10)
    calls = []

    def fake_dequantize(src, out):
        calls.append(src.path)
        import shutil

        shutil.copytree(tiny_dirs["llama"], out, dirs_exist_ok=True)
        return {}

    monkeypatch.setattr(models, "_dequantize_gguf", fake_dequantize)
    src = models.resolve_source(str(gguf))
    assert src.kind == "gguf"
    d1 = models.cached_fp32_dir(src)
    assert d1.is_relative_to(cache_dir) and len(calls) == 1
    assert models.cached_fp32_dir(src) == d1 and len(calls) == 1  # reused
    weights = d1 / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))  # corrupt one byte
    assert models.cached_fp32_dir(src) == d1 and len(calls) == 2  # detected and rebuilt
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated
    assert models.cached_fp32_dir(src) == d1 and len(calls) == 3
    weights.write_bytes(bytes(weights.stat().st_size))  # zeroed, same size
    assert models.cached_fp32_dir(src) == d1 and len(calls) == 4
    loaded = models.load_model(str(gguf))
    assert loaded.adapter.family == "llama"
    # another GGUF (different bytes) gets its own entry
    gguf.write_bytes(b"other")
    assert models.cached_fp32_dir(models.resolve_source(str(gguf))) != d1


def test_bad_model_sources(tmp_path):
    from core.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="does not exist"):
        models.resolve_source(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="has no config.json"):
        models.resolve_source(str(tmp_path / "empty"))
    (tmp_path / "w.bin").write_bytes(b"0")
    with pytest.raises(ModelLoadError, match="not a .gguf file"):
        models.resolve_source(str(tmp_path / "w.bin"))
