"""Contextual sparsity (issue 14): which predictor input and rank, chosen on recall@k over held-out
calibration tokens only (no evaluation text is read). One calibration pass over SmolLM2, then per
block a predictor per setting; mean recall@k over the chosen blocks (default 1, 8, 15, 22, 29), next to
the |act(gate)| rule's.

    python benchmarks/contextual_predictor_ablation.py --keep 0.5 --inputs prev block mlp --ranks 128 256
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import markdown_table, write_result  # noqa: E402
from calibrate.contextual import collect_context_stats, gated_mlp, recall_at_k  # noqa: E402
from calibrate.data import calibration_windows, shakespeare_splits, tokenize  # noqa: E402
from core.models import load_model  # noqa: E402
from passes.contextual import ContextualConfig, train_predictor  # noqa: E402
from pipeline.build import cpu_info  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keep", type=float, default=0.5)
    ap.add_argument("--inputs", nargs="*", default=["prev", "block", "mlp"])
    ap.add_argument("--ranks", nargs="*", type=int, default=[128, 256])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--blocks", nargs="*", type=int, default=[1, 8, 15, 22, 29], help="blocks to fit (all would take ×6 as long)")
    ap.add_argument("--calibration-windows", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "contextual_predictor_ablation.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model("smollm2-135m")
    cal = calibration_windows(tokenize(loaded.tokenizer, shakespeare_splits().calibration), args.calibration_windows, 512, 0)
    stats = collect_context_stats(loaded.model, loaded.adapter, cal, 64, 8192, seed=0, show_progress=False)
    blocks = loaded.adapter.blocks(loaded.model)
    split_share = ContextualConfig().holdout_share
    data, thr = {}, []
    for b in args.blocks:  # per block: the labels, the held-out split, k, and the |act(gate)| rule's recall
        st = stats.block(b)
        act = st["act"].float()
        split = int(round(act.shape[0] * split_share))
        k = max(1, round(args.keep * act.shape[1]))
        data[b] = (st, act, split, k)
        mlp = gated_mlp(loaded.adapter, blocks[b])
        with torch.no_grad():
            thr.append(recall_at_k(mlp.gate_activity(st["mlp"][-split:]), act[-split:], k))
    rows = []
    for inp in args.inputs:
        for rank in args.ranks:
            cfg = ContextualConfig(keep=args.keep, predictor_rank=rank, predictor_input=inp, predictor_steps=args.steps)
            rec, t0 = [], time.perf_counter()
            for b, (st, act, split, k) in data.items():
                x = st[inp].float()
                pred, _ = train_predictor(x[:-split], act[:-split], cfg, rank, b)
                with torch.no_grad():
                    rec.append(recall_at_k(pred(x[-split:]), act[-split:], k))
            rows.append({"input": inp, "rank": rank, "recall_per_block": [round(r, 4) for r in rec], "mean_recall": round(sum(rec) / len(rec), 4),
                         "seconds": round(time.perf_counter() - t0, 1)})
            logging.info("%s", rows[-1])
    result = {"benchmark": "contextual_predictor_ablation", "keep": args.keep, "blocks": args.blocks, "steps": args.steps,
              "threshold_recall_per_block": [round(r, 4) for r in thr], "threshold_mean_recall": round(sum(thr) / len(thr), 4),
              "machine": cpu_info(), "rows": rows}
    write_result(args.out, result)
    print(markdown_table(["predictor input", "rank", "mean recall@k", "per block"],
                         [[r["input"], r["rank"], r["mean_recall"], r["recall_per_block"]] for r in rows]
                         + [["threshold |act(gate)| (top-k)", "—", result["threshold_mean_recall"], result["threshold_recall_per_block"]]]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
