"""Tests that try to break the build: concurrent builds, shared caches, a full disk, corrupted files,
pickles where weights should be, and recipes too big for the machine."""

from __future__ import annotations

import ast
import errno
import json
import multiprocessing as mp
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from core.artifacts import check_stage, file_lock, run_stage
from core.errors import ArtifactError, LockedError, ModelLoadError, ResourceError

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "calibrate", "passes", "export", "engines", "pipeline")


# --- concurrency ----------------------------------------------------------------------------------


def _hold_lock(path: str, ready: str, seconds: float) -> None:
    with file_lock(Path(path), "test", wait=False):
        Path(ready).write_text("held")
        time.sleep(seconds)


def test_second_build_into_one_directory_refuses_naming_the_holder(tiny_dirs, text_file, tmp_path):
    from test_build import tiny_recipe

    from pipeline.build import build

    out = tmp_path / "b"
    out.mkdir()
    ready = tmp_path / "ready"
    holder = mp.get_context("spawn").Process(target=_hold_lock, args=(str(out / ".build.lock"), str(ready), 30))
    holder.start()
    try:
        for _ in range(300):
            if ready.exists():
                break
            time.sleep(0.1)
        with pytest.raises(LockedError, match=rf"build directory .* is in use by another process \(PID {holder.pid},"):
            build(tiny_recipe(tiny_dirs["llama"], text_file, out))
        assert not (out / "dense").exists()  # refused before any stage
    finally:
        holder.kill()
        holder.join()
    # the holder died by SIGKILL: its lock file stays, holding a dead PID, and is simply taken over
    assert (out / ".build.lock").read_text().strip() == str(holder.pid)
    summary = build(tiny_recipe(tiny_dirs["llama"], text_file, out, variants=[]))
    assert summary.results["variants"][0]["name"] == "dense"


def _cache_writer(path: str, counter: str) -> None:
    def build(tmp: Path) -> dict:
        with open(counter, "a") as f:
            f.write("x")
        time.sleep(1.0)  # a slow writer: the other process must wait, not write again
        (tmp / "weights.bin").write_bytes(os.urandom(1 << 16))
        return {}

    p = Path(path)
    with file_lock(p.parent / f".{p.name}.lock", "cache entry", wait=True):
        run_stage(p, "cache", "k", {}, build)


def test_two_processes_sharing_a_cache_entry_write_it_once(tmp_path):
    entry, counter = tmp_path / "models" / "entry", tmp_path / "count"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_cache_writer, args=(str(entry), str(counter))) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert counter.read_text() == "x"  # written once
    assert check_stage(entry, "k")[0] is not None  # and whole


# --- a full disk ------------------------------------------------------------------------------------


def test_full_disk_during_a_stage_keeps_the_previous_result(tmp_path):
    d = tmp_path / "stage"
    run_stage(d, "s", "k1", {}, lambda tmp: (tmp / "a.bin").write_bytes(b"old") and None)

    def full(tmp: Path) -> dict:
        (tmp / "a.bin").write_bytes(b"part")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(ArtifactError, match=r"s: no space left on the device .* the previous result at .* is kept"):
        run_stage(d, "s", "k2", {}, full)
    assert (d / "a.bin").read_bytes() == b"old" and check_stage(d, "k1")[0] is not None
    assert not list(tmp_path.glob(".stage.tmp-*"))


# --- corruption ---------------------------------------------------------------------------------------


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _zero(p: Path) -> None:
    p.write_bytes(bytes(p.stat().st_size))


def _flip(p: Path) -> None:
    b = bytearray(p.read_bytes())
    b[len(b) // 2] ^= 0x01
    p.write_bytes(bytes(b))


@pytest.mark.parametrize("damage", [_truncate, _zero, _flip], ids=["truncated", "zeroed", "byte-flipped"])
def test_corrupt_stage_files_and_manifest_are_detected_and_rebuilt(tiny_dirs, text_file, tmp_path, caplog, damage):
    import logging

    from test_build import tiny_recipe

    from pipeline.build import build

    out = tmp_path / "b"
    recipe = lambda: tiny_recipe(tiny_dirs["llama"], text_file, out, variants=[{"name": "m50", "passes": [{"magnitude": {"sparsity": 0.5}}]}])  # noqa: E731
    first = build(recipe())
    victim = out / "m50" / "model" / "model" / "model.safetensors"
    damage(victim)
    damage(out / "manifest.json")
    caplog.set_level(logging.INFO)
    second = build(recipe())
    assert f"m50/model: building (corrupt: {victim}" in caplog.text  # the log names the file and why
    rebuilt = {s["stage"] for s in second.stages if not s["reused"]}
    assert "m50/model" in rebuilt and "dense/model" not in rebuilt
    assert json.loads((out / "manifest.json").read_text())["stages"]  # rewritten whole
    ppl = lambda s: [v["engines"]["onnxruntime-cpu"]["perplexity_engine"]["perplexity"] for v in s.results["variants"]]  # noqa: E731
    assert ppl(second) == ppl(first)


# --- untrusted files -------------------------------------------------------------------------------------


def _calls(tree: ast.AST, dotted: str) -> list[ast.Call]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and isinstance(node.func.value, ast.Name):
            if f"{node.func.value.id}.{node.func.attr}" == dotted:
                out.append(node)
    return out


def test_no_module_unpickles():
    bad = []
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            for node in ast.walk(tree):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
                    if any(n and n.split(".")[0] in ("pickle", "dill", "cloudpickle", "joblib") for n in names):
                        bad.append(f"{path.relative_to(ROOT)}:{node.lineno} imports a pickle module")
            for call in _calls(tree, "torch.load"):
                kw = {k.arg: k.value for k in call.keywords}
                if not (isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True):
                    bad.append(f"{path.relative_to(ROOT)}:{call.lineno} torch.load without weights_only=True")
    assert not bad, "\n".join(bad)


def test_a_model_directory_with_only_a_pickled_checkpoint_is_refused(tiny_dirs, tmp_path):
    import shutil

    import torch

    from core.models import load_hf_dir

    d = tmp_path / "pickled"
    shutil.copytree(tiny_dirs["llama"], d)
    (d / "model.safetensors").unlink()
    torch.save({"w": torch.zeros(1)}, d / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="has no .safetensors weights; pickled checkpoints"):
        load_hf_dir(d)


# --- resources ------------------------------------------------------------------------------------------


def test_a_recipe_too_big_for_memory_is_refused_before_any_model_work(tiny_dirs, text_file, tmp_path, monkeypatch):
    from test_build import tiny_recipe

    from pipeline import preflight
    from pipeline.build import build

    monkeypatch.setattr(preflight, "available_memory", lambda: 1 << 30)
    out = tmp_path / "b"
    recipe = tiny_recipe(tiny_dirs["llama"], text_file, out, variants=[{"name": "w", "passes": [{"wanda": {"sparsity": 0.5}}]}])
    recipe.data.calibration.windows = 100_000
    recipe.data.calibration.length = 512  # the tiny model's whole context (a longer one is refused before this estimate)
    with pytest.raises(ResourceError, match=r"needs about \d+\.\d GiB of memory but 1\.0 GiB is available: calibration activations \(100000 windows × 512 tokens × hidden 64\)"):
        build(recipe)
    assert not (out / "dense" / "model").exists()


def test_a_build_too_big_for_the_disk_is_refused(tiny_dirs, text_file, tmp_path, monkeypatch):
    from test_build import tiny_recipe

    from pipeline import preflight
    from pipeline.build import build

    monkeypatch.setattr(preflight, "free_disk", lambda path: 1000)
    with pytest.raises(ResourceError, match=r"of disk under .* but 0\.0 GiB is free: 3 variants × 3 copies of the weights"):
        build(tiny_recipe(tiny_dirs["llama"], text_file, tmp_path / "b"))


def test_cli_reports_a_lock_as_an_error_not_a_traceback(tmp_path):
    out = tmp_path / "b"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", f"import fcntl,os,time; fd=os.open('{out}/.build.lock', os.O_RDWR|os.O_CREAT); fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, b'4242'); print('ok', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ok"
        r = subprocess.run([sys.executable, "-m", "pipeline", "build", "--output", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert r.returncode == 1 and "PID 4242" in r.stderr and "Traceback" not in r.stderr
    finally:
        holder.kill()
