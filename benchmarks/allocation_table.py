"""Per-block sparsity allocation (issue 11) on the bundled SmolLM2-135M-Instruct: one-shot Wanda and
SparseGPT at several unstructured sparsities, each with every allocation, perplexity on the
Shakespeare evaluation split and on a second text the calibration never saw, and pruning wall time
with the allocations of one method/sparsity run back to back (so their time ratios compare like
with like).

The second text (``--second-text``, default: the docstrings of a fixed list of Python
standard-library modules, English technical prose far from Shakespeare) catches an allocation
that only fits the calibration domain. Options are not tuned on either evaluation text.

    python benchmarks/allocation_table.py                                   # 128×512 calibration, the issue's table
    python benchmarks/allocation_table.py --methods wanda --sparsities 0.7 --calibration-windows 16   # a quick look
    python benchmarks/allocation_table.py --methods wanda --sparsities 0.7 --calibration-windows 16 \
        --allocations uniform owl "sensitivity[measure=relative,unit=matrix]" "sensitivity[measure=relative]" \
        "sensitivity[measure=hutchinson,unit=matrix]" "sensitivity[resolve=false]" sensitivity   # the ablation

An allocation is ``uniform``, ``owl`` or ``sensitivity``, optionally with pass options in brackets
(``sensitivity[measure=hutchinson,deviation=0.2]`` sets ``sensitivity_measure`` and
``sensitivity_deviation``), so ablations run with the same data in the same process.
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

from calibrate.data import STDLIB_PROSE, calibration_windows, evaluation_windows, shakespeare_splits, stdlib_text, tokenize  # noqa: E402
from core.models import load_model  # noqa: E402
from passes import PassContext, get_pass_class  # noqa: E402
from pipeline.build import cpu_info  # noqa: E402
from pipeline.validate import perplexity, torch_outputs_fn  # noqa: E402

def parse_allocation(spec: str) -> tuple[str, dict]:
    """'sensitivity[measure=hutchinson,unit=matrix]' → ('sensitivity', {'sensitivity_measure': 'hutchinson', ...})."""
    name, options = parse_spec(spec)
    return name, {(k if k.startswith(("owl_", "hutchinson_", "sensitivity_")) else f"{name}_{k}"): v for k, v in options.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="*", default=["sparsegpt", "wanda"])
    ap.add_argument("--sparsities", nargs="*", type=float, default=[0.5, 0.6, 0.7])
    ap.add_argument("--allocations", nargs="*", default=["uniform", "owl", "sensitivity"])
    ap.add_argument("--owl-lambda", type=float, default=0.08)
    ap.add_argument("--owl-m", type=float, default=5.0)
    ap.add_argument("--calibration-windows", type=int, default=128)
    ap.add_argument("--eval-windows", type=int, default=40)
    ap.add_argument("--second-text", type=Path, default=None, help="a .txt file the calibration never saw (default: stdlib docstrings)")
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--calibration-dtype", choices=["auto", "float32", "bfloat16"], default="auto")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "allocation_table.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("calibrate.runner").setLevel(logging.WARNING)
    loaded = load_model("smollm2-135m")
    tok = loaded.tokenizer
    splits = shakespeare_splits()
    ev = evaluation_windows(tokenize(tok, splits.evaluation), args.length, args.eval_windows)
    second = args.second_text.read_text(encoding="utf-8") if args.second_text else stdlib_text()
    ev2_ids = tokenize(tok, second)
    ev2 = evaluation_windows(ev2_ids, args.length, min(args.eval_windows, ev2_ids.numel() // args.length))
    cal = calibration_windows(tokenize(tok, splits.calibration), args.calibration_windows, args.length, 0)
    adapter = loaded.adapter

    def ppl(model: torch.nn.Module, windows: torch.Tensor, desc: str) -> float:
        return round(perplexity(torch_outputs_fn(model, "causal-lm"), windows, desc)["perplexity"], 3)


    def save(rows: list[dict], complete: bool) -> None:
        """Write the table so far: a stopped run keeps the rows it finished (``complete`` says whether it ended)."""
        write_result(args.out, {
            "benchmark": "allocation_table",
            "complete": complete,
            "calibration": [args.calibration_windows, args.length],
            "evaluation": {"shakespeare": list(ev.shape), "second": list(ev2.shape), "second_text": str(args.second_text or "stdlib docstrings: " + ", ".join(STDLIB_PROSE))},
            "owl": {"lambda": args.owl_lambda, "m": args.owl_m},
            "machine": {**cpu_info(), "threads": torch.get_num_threads(), "platform": platform.machine()},
            "rows": rows,
        })

    rows = [{"method": "dense", "allocation": "—", "sparsity": 0.0, "ppl_shakespeare": ppl(loaded.model, ev, "dense"), "ppl_second": ppl(loaded.model, ev2, "dense 2nd")}]
    for method in args.methods:
        cls = get_pass_class(method)
        for s in args.sparsities:
            base_seconds = None
            for spec in args.allocations:
                alloc, extra = parse_allocation(spec)
                model = copy.deepcopy(loaded.model)
                opts = {"sparsity": s, "allocation": alloc, "calibration_dtype": args.calibration_dtype, **extra}
                if alloc == "owl":
                    opts.update(owl_lambda=args.owl_lambda, owl_m=args.owl_m)
                t0 = time.perf_counter()
                r = cls(cls.config_class(**opts)).run(model, PassContext(adapter, calibration=lambda: cal, progress=False))
                seconds = time.perf_counter() - t0
                base_seconds = base_seconds or seconds
                lin = [x.weight_out_in() for x in adapter.linears(model)]
                exact = sum(int((w == 0).sum()) for w in lin) / sum(w.numel() for w in lin)
                row = {
                    "method": method, "allocation": spec, "sparsity": s, "measured_sparsity": round(exact, 5),
                    "ppl_shakespeare": ppl(model, ev, f"{method} {alloc} {s}"), "ppl_second": ppl(model, ev2, f"{method} {alloc} {s} 2nd"),
                    "prune_seconds": round(seconds, 1), "time_vs_uniform": round(seconds / base_seconds, 3),
                    "block_sparsity": (r.info.get("allocation") or {}).get("block_sparsity"),
                }
                rows.append(row)
                save(rows, complete=False)
                logging.info("%s", {k: v for k, v in row.items() if k != "block_sparsity"})
                del model
    save(rows, complete=True)
    header = ["method", "allocation", "sparsity (measured)", "ppl Shakespeare", "ppl second text", "prune s", "time vs uniform"]
    print(markdown_table(header, [
        [r["method"], r["allocation"], f"{r['sparsity']} ({r.get('measured_sparsity', 0)})", r["ppl_shakespeare"], r["ppl_second"],
         r.get("prune_seconds", "—"), r.get("time_vs_uniform", "—")]
        for r in rows
    ]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
