"""What the whole build needs in memory once the pruning streams (issue 30): the process's peak RSS after
every stage, in units of the model's float32 weights W, on a random Llama-architecture model.

One ``python -m pipeline build`` with ``model.stream: always`` (a SparseGPT 2:4 variant, ONNX Runtime CPU,
perplexity on 4 × 128 tokens, latency at one shape), in its own process; the manifest records the
process's peak RSS after each stage (``manifest.json`` → ``stages[].peak_rss_bytes``), so the stage that
raised the peak shows. The model is stored in bfloat16 shards like a downloaded checkpoint.

Usage: python benchmarks/large_model_build.py [--layers 12] [--hidden 2048] [--ffn 5632]
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

RESULT = ROOT / "benchmarks" / "results" / "large_model_build.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--ffn", type=int, default=5632)
    ap.add_argument("--layers", type=int, default=12)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="large-build-", dir=ROOT / "build"))
    try:
        spec = synthetic_llama_dir(tmp / "model", args.hidden, args.ffn, args.layers)
        print("model", spec, flush=True)
        recipe = {
            "name": "large",
            "model": {"source": str(tmp / "model"), "stream": "always"},
            "data": {"calibration": {"windows": 8, "length": 128}, "evaluation": {"windows": 4, "length": 128}},
            "variants": [{"name": "sparsegpt-2of4", "passes": [{"sparsegpt": {"pattern": "2:4", "calibration_dtype": "float32"}}]}],
            "validation": {"agreement_windows": 2, "torch_windows": 2, "parity": {"batch": 1, "length": 32},
                           "latency": {"batch_sizes": [1], "sequence_lengths": [32], "warmup": 1, "repeats": 2}},
        }
        path = tmp / "large.yaml"
        path.write_text(json.dumps(recipe), encoding="utf-8")
        cmd = [sys.executable, "-m", "pipeline", "build", str(path), "--output", str(tmp / "out")]
        t0 = time.perf_counter()
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        row: dict = {"command": "python " + " ".join(cmd[1:]), "exit": p.returncode, "wall_s": round(wall, 1)}
        w = spec["float32_bytes"]
        if p.returncode == 0:
            manifest = json.loads((tmp / "out" / "manifest.json").read_text())
            row["stages"] = [
                {"variant": s["variant"], "stage": s["stage"], "seconds": s["seconds"], "peak_rss_bytes": s.get("peak_rss_bytes"),
                 "peak_rss_over_weights": round(s["peak_rss_bytes"] / w, 2) if s.get("peak_rss_bytes") else None}
                for s in manifest["stages"]
            ]
            res = json.loads((tmp / "out" / "results.json").read_text())
            row["engines"] = {v["name"]: {k: v["engines"]["onnxruntime-cpu"].get(k) for k in ("status", "perplexity_engine_vs_torch")} for v in res["variants"]}
            onnx = tmp / "out" / "dense" / "onnx"
            row["dense_onnx_files"] = {f.name: f.stat().st_size for f in onnx.iterdir() if f.is_file() and f.suffix in (".onnx", ".data")}
        else:
            row["error_tail"] = p.stderr.strip().splitlines()[-5:]
        result = {"model": spec, "build": row}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    write_result(RESULT, result)
    print(json.dumps(result, indent=1)[:6000])


if __name__ == "__main__":
    main()
