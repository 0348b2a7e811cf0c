"""SDS (sparse → dense → sparse, issue 12) against its own step 1 on the bundled SmolLM2-135M-Instruct.

For each base method (SparseGPT, Wanda) and each pattern (2:4, 50 % unstructured): the plain
one-shot pass (SDS's step 1) and each SDS variant, run back to back on copies of the same model
with the same calibration windows; perplexity on the Shakespeare evaluation split and on a second
text the calibration never saw (default: the standard-library docstrings of
``benchmarks/allocation_table.py``); pruning wall time with the ratio to step 1; SDS's per-block
reconstruction error on its held-out calibration windows (the figure options are chosen on —
never the evaluation texts).

    python benchmarks/sds_table.py                                  # the issue's table, 128×512 calibration
    python benchmarks/sds_table.py --methods sparsegpt --patterns 2:4 --calibration-windows 32 \\
        --blocks 0 1 2 3 --no-eval --variants "sds" "sds[regularizer=none]" "sds[recon_lr=0.0003]"   # choosing options

A variant is ``sds`` optionally with SDS options in brackets by their field names
(``sds[regularizer=l2,reg_weight=0.5]``).
"""

from __future__ import annotations

import argparse
import copy
import logging
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import markdown_table, parse_spec, write_result  # noqa: E402
from calibrate.data import STDLIB_PROSE, stdlib_text  # noqa: E402
from calibrate.data import calibration_windows, evaluation_windows, shakespeare_splits, tokenize  # noqa: E402
from core.masks import is_nm_sparse  # noqa: E402
from core.models import load_model  # noqa: E402
from passes import PassContext, get_pass_class  # noqa: E402
from passes.sds import SDSConfig, SDSPass  # noqa: E402
from pipeline.build import cpu_info  # noqa: E402
from pipeline.validate import perplexity, torch_outputs_fn  # noqa: E402


def parse_variant(spec: str) -> dict:
    name, options = parse_spec(spec)
    unknown = [k for k in options if k not in SDSConfig.__dataclass_fields__]
    if name != "sds" or unknown:
        raise SystemExit(f"variant '{spec}': expected sds or sds[key=value,...] with SDS option names" + (f"; unknown {unknown}" if unknown else ""))
    return options


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="*", default=["sparsegpt", "wanda"])
    ap.add_argument("--patterns", nargs="*", default=["2:4", "0.5"], help="N:M patterns or unstructured sparsities")
    ap.add_argument("--variants", nargs="*", default=["sds"])
    ap.add_argument("--calibration-windows", type=int, default=128)
    ap.add_argument("--eval-windows", type=int, default=40)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--blocks", nargs="*", type=int, default=None, help="prune only these blocks (option choice)")
    ap.add_argument("--no-eval", action="store_true", help="skip the perplexities (option choice on the holdout error)")
    ap.add_argument("--second-text", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "sds_table.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("calibrate.runner").setLevel(logging.WARNING)
    loaded = load_model("smollm2-135m")
    tok, adapter = loaded.tokenizer, loaded.adapter
    splits = shakespeare_splits()
    cal = calibration_windows(tokenize(tok, splits.calibration), args.calibration_windows, args.length, 0)
    ev = ev2 = None
    if not args.no_eval:
        ev = evaluation_windows(tokenize(tok, splits.evaluation), args.length, args.eval_windows)
        second = args.second_text.read_text(encoding="utf-8") if args.second_text else stdlib_text()
        ids2 = tokenize(tok, second)
        ev2 = evaluation_windows(ids2, args.length, min(args.eval_windows, ids2.numel() // args.length))

    def ppl(model: torch.nn.Module, windows: torch.Tensor | None, desc: str) -> float | None:
        if windows is None:
            return None
        return round(perplexity(torch_outputs_fn(model, "causal-lm"), windows, desc)["perplexity"], 3)

    rows = []
    if not args.no_eval:
        rows.append({"method": "dense", "pattern": "—", "variant": "—", "ppl_shakespeare": ppl(loaded.model, ev, "dense"), "ppl_second": ppl(loaded.model, ev2, "dense 2nd")})
    for method in args.methods:
        for pat in args.patterns:
            target = {"pattern": pat} if ":" in pat else {"sparsity": float(pat)}
            step1_seconds = None
            for spec in ["step1", *args.variants]:
                model = copy.deepcopy(loaded.model)
                ctx = PassContext(adapter, calibration=lambda: cal, progress=False)
                t0 = time.perf_counter()
                if spec == "step1":
                    cls = get_pass_class(method)
                    r = cls(cls.config_class(**target, blocks=args.blocks)).run(model, ctx)
                else:
                    r = SDSPass(SDSConfig(base=method, **target, blocks=args.blocks, **parse_variant(spec))).run(model, ctx)
                seconds = time.perf_counter() - t0
                step1_seconds = step1_seconds or seconds
                lin = [x.weight_out_in() for x in adapter.linears(model, blocks=args.blocks)]
                row = {
                    "method": method, "pattern": pat, "variant": spec,
                    "measured_sparsity": round(sum(int((w == 0).sum()) for w in lin) / sum(w.numel() for w in lin), 5),
                    "nm_valid": all(is_nm_sparse(w, *map(int, pat.split(":"))) for w in lin) if ":" in pat else None,
                    "ppl_shakespeare": ppl(model, ev, f"{method} {pat} {spec}"), "ppl_second": ppl(model, ev2, f"{method} {pat} {spec} 2nd"),
                    "prune_seconds": round(seconds, 1), "time_vs_step1": round(seconds / step1_seconds, 3),
                }
                if spec != "step1":
                    row["holdout_error_ratio"] = r.info["holdout_error_ratio"]
                    row["sds_seconds"] = r.info["seconds"]
                    row["blocks"] = r.info["blocks"]
                rows.append(row)
                logging.info("%s", {k: v for k, v in row.items() if k != "blocks"})
                del model
                write_result(args.out, _result(args, ev, ev2, rows))  # partial results survive an interruption
    header = ["method", "pattern", "variant", "sparsity", "ppl Shakespeare", "ppl second text", "prune s", "× step 1 time", "holdout block error × step 1"]
    print(markdown_table(header, [
        [r["method"], r["pattern"], r["variant"], r.get("measured_sparsity", "—"), r["ppl_shakespeare"], r["ppl_second"],
         r.get("prune_seconds", "—"), r.get("time_vs_step1", "—"), r.get("holdout_error_ratio", "—")]
        for r in rows
    ]))
    return 0


def _result(args: argparse.Namespace, ev: torch.Tensor | None, ev2: torch.Tensor | None, rows: list) -> dict:
    return {
        "benchmark": "sds_table",
        "calibration": [args.calibration_windows, args.length],
        "blocks": args.blocks,
        "evaluation": None if ev is None else {
            "shakespeare": list(ev.shape), "second": list(ev2.shape),
            "second_text": str(args.second_text or "stdlib docstrings: " + ", ".join(STDLIB_PROSE)),
        },
        "machine": {**cpu_info(), "threads": torch.get_num_threads(), "platform": platform.machine()},
        "rows": rows,
    }


if __name__ == "__main__":
    raise SystemExit(main())
