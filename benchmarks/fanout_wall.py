"""Issue 30's Ray fan-out, measured: one recipe built serially and with ``--executor ray`` (a local Ray with
this machine's CPUs), each into a fresh build directory, one after the other, nothing else running. Records
both wall times, whether the two results.json agree on every field that does not measure time, and each
variant's task seconds on Ray (the per-variant cost that sizes a cluster).

    python benchmarks/fanout_wall.py benchmarks/recipes/fanout6.yaml --out benchmarks/results/fanout_wall.json

The model's fp32 cache (the GGUF dequantized once per machine) is built before either build is timed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, write_result  # noqa: E402

def _differences(a, b, path=""):
    if type(a) is not type(b):
        return [path]
    if isinstance(a, dict):
        return [d for k in sorted(set(a) | set(b)) for d in (_differences(a[k], b[k], f"{path}/{k}") if k in a and k in b else [f"{path}/{k}"])]
    if isinstance(a, list):
        return [path] if len(a) != len(b) else [d for i, (u, v) in enumerate(zip(a, b)) for d in _differences(u, v, f"{path}[{i}]")]
    return [] if a == b else [path]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipe")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "fanout_wall.json")
    args = ap.parse_args()
    from pipeline.build import build
    from pipeline.cli import _setup_logging
    from pipeline.fanout import build_on_ray, untimed
    from pipeline.recipe import load_recipe

    _setup_logging(False)
    recipe = load_recipe(args.recipe)
    from core.models import load_model

    load_model(recipe.model.source)  # the fp32 cache, outside both timings
    dirs = {"serial": ROOT / "build" / f"{recipe.name}-serial", "ray": ROOT / "build" / f"{recipe.name}-ray"}
    walls, results = {}, {}
    for mode, out in dirs.items():
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        summary = build(recipe, out) if mode == "serial" else build_on_ray(recipe, out)
        walls[mode] = round(time.perf_counter() - t0, 1)
        results[mode] = json.loads((out / "results.json").read_text())
        results[mode]["recipe"].pop("output", None)
        print(f"{mode}: {walls[mode]} s", flush=True)
    diffs = _differences(untimed(results["serial"]), untimed(results["ray"]))
    tasks = results["ray"]["fanout"]["tasks"]
    write_result(args.out, {
        "recipe": args.recipe,
        "variants": [v["name"] for v in results["serial"]["variants"]],
        "wall_seconds": walls,
        "ray_over_serial": round(walls["ray"] / walls["serial"], 3),
        "ray_fanout_seconds": results["ray"]["fanout"]["seconds"],
        "results_identical_apart_from_timing": not diffs,
        "differences": diffs[:50],
        "per_variant_task_seconds": {t["variant"]: t["seconds"] for t in tasks},
        "per_variant_stage_seconds": {t["variant"]: {s["stage"]: s["seconds"] for s in t["stages"]} for t in tasks},
    })
    print(json.dumps({"wall_seconds": walls, "identical": not diffs, "tasks": {t["variant"]: t["seconds"] for t in tasks}}, indent=1))


if __name__ == "__main__":
    main()
