"""FP16 graph vs FP32 graph: perplexity on the evaluation split through ONNX Runtime CPU.

Takes an exported fp32 ONNX (default: the dense model of the default build),
applies the graph passes Fp16GemmPass + CleanupPass, and measures both graphs'
perplexity on the same evaluation windows (and their per-window time), so the
cost of fp16 GEMMs in accuracy is measured, not assumed.

    python benchmarks/fp16_perplexity.py [--onnx build/default/dense/onnx/model.onnx] [--windows 40]
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import write_result  # noqa: E402

from calibrate.data import evaluation_windows, shakespeare_splits, tokenize  # noqa: E402
from engines.onnxruntime import OnnxRuntimeCpuEngine  # noqa: E402
from export.graph import rewrite_file  # noqa: E402
from export.graph.cleanup import CleanupPass  # noqa: E402
from export.graph.precision import Fp16GemmPass  # noqa: E402
from core.models import load_model  # noqa: E402
from pipeline.validate import perplexity, runner_outputs_fn  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--onnx", type=Path, default=Path("build/default/dense/onnx/model.onnx"))
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "fp16_perplexity.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not args.onnx.is_file():
        raise SystemExit(f"{args.onnx} does not exist; run 'python -m pipeline build' first or pass --onnx")
    tok = load_model("smollm2-135m").tokenizer
    windows = evaluation_windows(tokenize(tok, shakespeare_splits().evaluation), args.length, args.windows)
    ort_cpu = OnnxRuntimeCpuEngine({})
    out: dict = {"onnx": str(args.onnx), "windows": list(windows.shape), "runtime": "onnxruntime CPUExecutionProvider"}
    with tempfile.TemporaryDirectory() as tmp:
        fp16 = Path(tmp) / "model.fp16.onnx"
        out["passes"] = rewrite_file(args.onnx, fp16, [Fp16GemmPass(), CleanupPass()])
        out["fp16_bytes"], out["fp32_bytes"] = fp16.stat().st_size, args.onnx.stat().st_size
        for name, path in (("fp32", args.onnx), ("fp16", fp16)):
            with ort_cpu.open(path) as r:
                out[name] = perplexity(runner_outputs_fn(r, "logits"), windows, name)
            logging.info("%s perplexity %.4f (%.1f s)", name, out[name]["perplexity"], out[name]["seconds"])
    out["relative_difference"] = out["fp16"]["perplexity"] / out["fp32"]["perplexity"] - 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_result(args.out, out)
    print(f"fp32 {out['fp32']['perplexity']:.4f}  fp16 {out['fp16']['perplexity']:.4f}  Δ {100 * out['relative_difference']:+.3f}%  "
          f"(ONNX Runtime CPU; {out['fp32']['seconds']} s vs {out['fp16']['seconds']} s)  → {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
