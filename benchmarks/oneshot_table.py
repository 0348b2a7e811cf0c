"""Reproduce the one-shot pruning table (issue 3) on the bundled SmolLM2-135M-Instruct.

Convention (the reference runs'): calibration = 128 random windows of 512 tokens (seed 0)
from the Shakespeare calibration split; evaluation = the first 40 non-overlapping
512-token windows of the evaluation split; every decoder-block linear pruned, embeddings
and lm_head kept. Perplexity is measured in PyTorch fp32. Pruning wall time covers the
whole pass (calibration forward passes, statistics, solver), not data loading.

    python benchmarks/oneshot_table.py                      # every row
    python benchmarks/oneshot_table.py --rows sparsegpt:2:4 sparsegpt:0.5
"""

from __future__ import annotations

import argparse
import copy
import logging
import platform
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import write_result  # noqa: E402

from calibrate.runner import resolve_compute_dtype  # noqa: E402
from calibrate.data import calibration_windows, evaluation_windows, shakespeare_splits, tokenize  # noqa: E402
from passes import PassContext, get_pass_class  # noqa: E402
from core.models import load_model  # noqa: E402
from pipeline.validate import perplexity, torch_outputs_fn  # noqa: E402

REFERENCE = {  # method:pattern → (perplexity, pruning seconds on 2 cores), from issue 3
    "dense": (41.49, None),
    "magnitude:0.5": (487.15, 8),
    "magnitude:4:8": (588.68, 3),
    "magnitude:2:4": (1114.13, 3),
    "wanda:0.5": (74.39, 150),
    "wanda:4:8": (104.28, 143),
    "wanda:2:4": (145.48, 152),
    "sparsegpt:0.5": (61.58, 227),
    "sparsegpt:4:8": (69.24, 214),
    "sparsegpt:2:4": (82.37, 223),
}


def options(row: str) -> tuple[str, dict]:
    method, _, what = row.partition(":")
    return method, ({"pattern": what} if ":" in what else {"sparsity": float(what)})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", nargs="*", default=list(REFERENCE), help="rows as method:pattern (default: all)")
    ap.add_argument("--calibration-windows", type=int, default=128)
    ap.add_argument("--eval-windows", type=int, default=40)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument(
        "--calibration-dtype", choices=["auto", "float32", "bfloat16"], default="float32",
        help="precision of the calibration forwards (default float32: 'auto' picks bfloat16 on CPUs with AVX512-BF16/AMX, "
             "which moves the rows — Wanda 2:4 148.07 bf16 vs 154.19 fp32 on an AVX-512 EPYC — so a table must say which)",
    )
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "oneshot_table.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("calibrate.runner",):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    torch.manual_seed(0)
    loaded = load_model("smollm2-135m")
    splits = shakespeare_splits()
    evw = evaluation_windows(tokenize(loaded.tokenizer, splits.evaluation), args.length, args.eval_windows)
    calw = calibration_windows(tokenize(loaded.tokenizer, splits.calibration), args.calibration_windows, args.length, 0)
    rows = []
    for row in args.rows:
        model = copy.deepcopy(loaded.model)
        seconds = 0.0
        dtype = None
        if row != "dense":
            method, opts = options(row)
            if method != "magnitude":
                opts["calibration_dtype"] = args.calibration_dtype
                dtype = str(resolve_compute_dtype(args.calibration_dtype)).removeprefix("torch.")
            cls = get_pass_class(method)
            t0 = time.perf_counter()
            cls(cls.config_class(**opts)).run(model, PassContext(loaded.adapter, calibration=lambda: calw))
            seconds = time.perf_counter() - t0
        ppl = perplexity(torch_outputs_fn(model, "causal-lm"), evw, row)["perplexity"]
        ref_ppl, ref_s = REFERENCE.get(row, (None, None))
        rows.append(
            {
                "row": row,
                "calibration_dtype": dtype,
                "perplexity": round(ppl, 2),
                "reference_perplexity": ref_ppl,
                "perplexity_vs_reference": None if ref_ppl is None else round(ppl / ref_ppl - 1, 4),
                "prune_seconds": round(seconds, 1),
                "reference_seconds": ref_s,
                "time_vs_reference": None if not ref_s else round(seconds / ref_s, 3),
            }
        )
        logging.info("%s", rows[-1])
        del model
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    result = {
        "benchmark": "oneshot_table",
        "model": "smollm2-135m (Q4_1 GGUF dequantised to fp32)",
        "calibration": [args.calibration_windows, args.length],
        "evaluation": list(evw.shape),
        "machine": {"cpus": torch.get_num_threads(), "processor": platform.processor() or platform.machine()},
        "torch": torch.__version__,
        "peak_rss_gib": round(peak_gib, 2),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_result(args.out, result)
    print("| row | perplexity | reference | Δ vs ref | prune s | ref s | time ratio |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        d = "—" if r["perplexity_vs_reference"] is None else f"{100 * r['perplexity_vs_reference']:+.1f}%"
        print(f"| {r['row']} | {r['perplexity']} | {r['reference_perplexity']} | {d} | {r['prune_seconds']} | {r['reference_seconds'] or '—'} | {r['time_vs_reference'] or '—'} |")
    print(f"peak RSS {peak_gib:.2f} GiB; results → {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
