"""Importance estimators and allocations compared at one operating point, before any recovery.

SmolLM2-135M, one KV group of three and ``--ffn`` of the FFN channels removed: perplexity on the
evaluation split (PyTorch) for activation vs Taylor importance, uniform vs global allocation.
Importance is computed once per estimator and shared by both allocations.

    python benchmarks/structured_importance.py --ffn 0.5
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import write_result  # noqa: E402

from calibrate.data import calibration_windows, evaluation_windows, load_splits, tokenize  # noqa: E402
from passes.base import PassContext  # noqa: E402
from passes.structured import StructuredConfig, StructuredPass  # noqa: E402
from core.models import load_model  # noqa: E402
from pipeline.validate import perplexity, torch_outputs_fn  # noqa: E402

log = logging.getLogger("structured_importance")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ffn", type=float, default=0.5)
    ap.add_argument("--heads", type=float, default=0.3333)
    ap.add_argument("--calibration", type=int, default=128)
    ap.add_argument("--taylor-windows", type=int, default=32)
    ap.add_argument("--eval-windows", type=int, default=40)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "structured_importance.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    loaded = load_model("smollm2-135m")
    splits = load_splits("shakespeare")
    cal = calibration_windows(tokenize(loaded.tokenizer, splits.calibration), args.calibration, 512, 0)
    ev = evaluation_windows(tokenize(loaded.tokenizer, splits.evaluation), 512, args.eval_windows)
    memo: dict = {}
    rows = [{"importance": "dense", "perplexity": perplexity(torch_outputs_fn(loaded.model, "causal-lm"), ev, "dense")["perplexity"]}]
    for importance in ("activation", "taylor"):
        for allocation in ("uniform", "global"):
            model = copy.deepcopy(loaded.model)
            ctx = PassContext(loaded.adapter, calibration=lambda: cal, progress=True, memo=memo, prefix_key="dense")
            t0 = time.perf_counter()
            cfg = StructuredConfig(heads=args.heads, ffn=args.ffn, importance=importance, allocation=allocation, taylor_windows=args.taylor_windows)
            r = StructuredPass(cfg).run(model, ctx)
            seconds = time.perf_counter() - t0
            ppl = perplexity(torch_outputs_fn(model, "causal-lm"), ev, f"{importance}/{allocation}")["perplexity"]
            rows.append(
                {
                    "importance": importance,
                    "allocation": allocation,
                    "perplexity": round(ppl, 3),
                    "parameters": r.info["parameters_after"],
                    "ffn_per_block": [k["ffn"] for k in r.info["kept"]],
                    "kv_heads_per_block": [k["kv_heads"] for k in r.info["kept"]],
                    "seconds": round(seconds, 1),
                }
            )
            log.info("%s / %s: ppl %.2f, %d parameters", importance, allocation, ppl, r.info["parameters_after"])
            del model
    out = {
        "model": "smollm2-135m",
        "heads_removed": args.heads,
        "ffn_removed": args.ffn,
        "calibration": {"activation": [args.calibration, 512], "taylor": [args.taylor_windows, 512]},
        "evaluation_windows": [int(ev.shape[0]), 512],
        "rows": rows,
    }
    write_result(args.out, out)
    for r in rows:
        print(f"{r['importance']:<11}{r.get('allocation', ''):<9}{r['perplexity']:>10.2f}  {r.get('parameters', '')}")


if __name__ == "__main__":
    main()
