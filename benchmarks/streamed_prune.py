"""Block-streamed pruning (issue 30): the same masks and perplexities as in memory, and a model twice
the size of an enforced memory cap pruned within it.

1. SmolLM2: ``python -m pipeline prune RECIPE --perplexity`` with ``model.stream: never`` and
   ``always``, each in its own process (its peak RSS is that process's VmHWM), SparseGPT 2:4; then
   every weight of the two pruned directories compared, and the two streamed perplexities (dense and
   pruned, on the Shakespeare evaluation split and the second text) compared.
2. A random Llama-architecture model (bf16 on disk, float32 in the pipeline) whose float32 weights are
   ≥ 2 × the cap: the same command inside a cgroup (v1) whose ``memory.limit_in_bytes`` is the cap —
   the kernel reclaims page cache and OOM-kills the process when its memory passes the cap; there is
   no swap — with ``model.stream: auto`` (the preflight reads the cgroup's limit and chooses
   streaming), and, to show the cap binds, ``never`` (in memory) under the same cap (expected to be
   killed). Needs a writable cgroup v1 memory controller (root in this container).

Usage: python benchmarks/streamed_prune.py [--cap-gib 3] [--layers 34] [--calibration 32] [--skip-smollm2]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import ROOT, synthetic_llama_dir, write_result  # noqa: E402

RESULT = ROOT / "benchmarks" / "results" / "streamed_prune.json"


def recipe_yaml(path: Path, source: str, stream: str, calibration: int, length: int, evaluation: int, eval_source: str | None) -> Path:
    data = {
        "name": path.stem,
        "model": {"source": source, "stream": stream},
        "data": {
            "calibration": {"windows": calibration, "length": length, "seed": 0},
            "evaluation": {"windows": evaluation, "length": length, "seed": 0},
            **({"eval_source": eval_source} if eval_source else {}),
        },
        "variants": [{"name": "sparsegpt-2of4", "passes": [{"sparsegpt": {"pattern": "2:4", "calibration_dtype": "float32"}}]}],
    }
    path.write_text(json.dumps(data), encoding="utf-8")  # JSON is YAML
    return path


CGROUP = Path("/sys/fs/cgroup/memory")


def prune(recipe: Path, out: Path, cap_bytes: int | None = None, perplexity: bool = True) -> dict:
    cmd = [sys.executable, "-m", "pipeline", "prune", str(recipe), "--output", str(out)] + (["--perplexity"] if perplexity else [])
    shown = "python " + " ".join(cmd[1:])
    cg = None
    if cap_bytes is not None:
        if not (CGROUP / "memory.limit_in_bytes").is_file():
            raise SystemExit(f"the memory cap needs a cgroup v1 memory controller at {CGROUP} (writable: root)")
        cg = CGROUP / f"streamed-prune-{out.name}"
        cg.mkdir(exist_ok=True)
        (cg / "memory.limit_in_bytes").write_text(str(cap_bytes))
        cmd = ["sh", "-c", f'echo $$ > {cg}/cgroup.procs && exec "$@"', "sh", *cmd]
        shown = f"(cgroup memory.limit_in_bytes={cap_bytes}) " + shown
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    row = {"command": shown, "exit": p.returncode, "wall_s": round(wall, 1)}
    if cg is not None:
        stat = {line.split()[0]: int(line.split()[1]) for line in (cg / "memory.oom_control").read_text().splitlines()}
        row["cgroup"] = {
            "limit_bytes": cap_bytes,
            "max_usage_bytes_incl_page_cache": int((cg / "memory.max_usage_in_bytes").read_text()),
            "limit_hits": int((cg / "memory.failcnt").read_text()),
            "oom_kills": stat.get("oom_kill"),
        }
        cg.rmdir()
    if p.returncode == 0:
        res = json.loads((out / "prune.json").read_text())
        row.update(peak_rss_bytes=res["peak_rss_bytes"], peak_address_space_bytes=res.get("peak_address_space_bytes"), variants=res["variants"])
    else:
        row["error_tail"] = p.stderr.strip().splitlines()[-3:]
    return row


def compare_weights(a: Path, b: Path) -> dict:
    from core.streaming import SafetensorsIndex

    ia, ib = SafetensorsIndex(a), SafetensorsIndex(b)
    names = sorted(set(ia.entries) & set(ib.entries))
    differ = [n for n in names if not bool((ia.read(n) == ib.read(n)).all())]
    return {"tensors": len(names), "only_in_one": sorted(set(ia.entries) ^ set(ib.entries)), "differ": differ}


def smollm2(args, tmp: Path) -> dict:
    out = {}
    for text, eval_source in (("shakespeare", None), ("stdlib-docstrings", "stdlib-docstrings")):
        runs = {}
        for mode in ("never", "always"):
            r = recipe_yaml(tmp / f"smollm2-{mode}-{text}.yaml", "smollm2-135m", mode, args.calibration, 512, args.evaluation, eval_source)
            runs[mode] = prune(r, tmp / f"out-{mode}-{text}")
            print(mode, text, {k: v for k, v in runs[mode].items() if k != "variants"}, flush=True)
        same = compare_weights(tmp / f"out-never-{text}" / "sparsegpt-2of4" / "model" / "model", tmp / f"out-always-{text}" / "sparsegpt-2of4" / "model" / "model") if all(r["exit"] == 0 for r in runs.values()) else None
        out[text] = {"runs": runs, "weights": same}
    return out


def capped(args, tmp: Path) -> dict:
    cap = int(args.cap_gib * 2**30)
    model_dir = tmp / "synthetic"
    spec = synthetic_llama_dir(model_dir, args.hidden, args.ffn, args.layers)
    print("synthetic", spec, flush=True)
    rows = {}
    for mode in ("auto", "never"):  # auto: the preflight sees the cgroup's cap and streams
        r = recipe_yaml(tmp / f"synthetic-{mode}.yaml", str(model_dir), mode, args.synthetic_calibration, 128, 4, None)
        rows[mode] = prune(r, tmp / f"syn-{mode}", cap_bytes=cap, perplexity=mode == "auto")
        print(mode, {k: v for k, v in rows[mode].items() if k != "variants"}, flush=True)
        shutil.rmtree(tmp / f"syn-{mode}", ignore_errors=True)
    return {"cap_bytes": cap, "cap_how": "cgroup v1 memory.limit_in_bytes on the process (no swap): past it the kernel reclaims page cache, then OOM-kills", "model": spec,
            "weights_over_cap": round(spec["float32_bytes"] / cap, 2), "runs": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cap-gib", type=float, default=3.0)
    ap.add_argument("--calibration", type=int, default=32, help="SmolLM2 calibration windows of 512 tokens")
    ap.add_argument("--evaluation", type=int, default=16, help="SmolLM2 evaluation windows of 512 tokens")
    ap.add_argument("--synthetic-calibration", type=int, default=8, help="synthetic model: calibration windows of 128 tokens")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--ffn", type=int, default=5632)
    ap.add_argument("--layers", type=int, default=34)
    ap.add_argument("--skip-smollm2", action="store_true")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="streamed-prune-", dir=ROOT / "build"))
    try:
        result = {"smollm2": None if args.skip_smollm2 else smollm2(args, tmp), "capped": capped(args, tmp)}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    write_result(RESULT, result)
    print(json.dumps(result, indent=1)[:4000])


if __name__ == "__main__":
    main()
