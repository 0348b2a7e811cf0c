"""One-shot pruning options, ablated on both texts (issue 32) on the bundled SmolLM2-135M-Instruct.

Each row is ``method:pattern`` optionally followed by pass options in brackets, e.g.
``wanda:2:4``, ``wanda:2:4[dsnot=true]``, ``sparsegpt:0.5[solve_dtype=float64]``. Every row is
pruned from the same dense model on the same calibration windows (128 × 512 tokens of the
Shakespeare calibration split, seed 0, fp32 calibration) and scored on the Shakespeare evaluation
split (40 × 512) and on the second text the calibration never saw (stdlib docstrings). Options are
chosen on the second text, never on the evaluation split.

Hypothesis rows (``experiment=NAME`` in the brackets) change one thing the pass does not expose as
an option, to test why two SparseGPT implementations differ (issue 32, item 1):

- ``peer_hessian``: H accumulated the way llm-compressor 0.14 does it — float32, per sequence,
  running rescale ``H *= n/(n+k)`` then ``H += (√(2/(n+k)) x)ᵀ(√(2/(n+k)) x)`` with n counting
  sequences — instead of float64 sums scaled once by 2/tokens.

Pruning time is the pass's wall time; ``solver_s`` is its solver-only part. Rows run one after
another in one process on an otherwise idle machine; the ratio is to the first row of the same
``method:pattern`` without options.

    python benchmarks/oneshot_options.py --rows wanda:2:4 "wanda:2:4[dsnot=true]"
    python benchmarks/oneshot_options.py --rows sparsegpt:2:4 "sparsegpt:2:4[experiment=peer_hessian]" \\
        "sparsegpt:2:4[batch_size=4]" --out benchmarks/results/sparsegpt_peer_hypotheses.json
    python benchmarks/oneshot_options.py --blocks 0-3 --no-eval --rows "wanda:2:4[reconstruct=block,reconstruct_lr=1e-4]" \\
        "wanda:2:4[reconstruct=block,reconstruct_lr=3e-4]" --out benchmarks/results/reconstruct_lr_search.json
        # an option search on held-out calibration batches only (no evaluation text is read)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import markdown_table, parse_spec, write_result  # noqa: E402

from calibrate.data import STDLIB_PROSE, calibration_windows, evaluation_windows, shakespeare_splits, stdlib_text, tokenize  # noqa: E402
from calibrate.stats import Collector  # noqa: E402
from core.models import load_model  # noqa: E402
from passes import PassContext, get_pass_class  # noqa: E402
from pipeline.validate import perplexity, torch_outputs_fn  # noqa: E402


class PeerHessianCollector(Collector):
    """llm-compressor 0.14's Hessian accumulation (see the module docstring), for the hypothesis row."""

    def __init__(self, columns: int):
        self.columns = columns
        self.H = torch.zeros(columns, columns, dtype=torch.float32)
        self.samples = 0
        self.rows = 0

    def add(self, x: torch.Tensor) -> None:
        seqs = x.reshape(-1, x.shape[-2], self.columns) if x.dim() >= 3 else x.reshape(1, -1, self.columns)
        for seq in seqs:  # the peer calibrates one sequence per forward pass
            self.H *= self.samples / (self.samples + 1)
            self.samples += 1
            inp = math.sqrt(2 / self.samples) * seq.float()
            self.H += inp.t() @ inp
            self.rows += seq.shape[0]

    def hessian(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.H.to(dtype)  # float32 accumulation either way (the hypothesis under test)

    def sq_norms(self) -> torch.Tensor:
        return torch.diagonal(self.H).double() * (self.rows / 2.0)


@contextlib.contextmanager
def experiment(name: str | None):
    if name is None:
        yield
        return
    if name != "peer_hessian":
        raise SystemExit(f"experiment '{name}' is not one of: peer_hessian")
    import passes.sparsegpt as sg

    saved = sg.HessianCollector
    sg.HessianCollector = PeerHessianCollector
    try:
        yield
    finally:
        sg.HessianCollector = saved


def dsnot_summary(info: dict, weights: list[torch.Tensor]) -> dict:
    """Totals of the per-linear DSnoT facts a Wanda pass records (nothing for a row without DSnoT)."""
    facts = [f for group in info.get("layers", {}).values() for f in group.get("dsnot", {}).values()]
    if not facts:
        return {}
    kept = sum(int((w != 0).sum()) for w in weights)
    swaps = sum(f["dsnot_swaps"] for f in facts)
    return {
        "dsnot_swaps": swaps,
        "dsnot_swapped_of_kept": round(swaps / kept, 5),
        "dsnot_error_before_mean": round(sum(f["dsnot_error_before"] for f in facts) / len(facts), 5),
        "dsnot_error_after_mean": round(sum(f["dsnot_error_after"] for f in facts) / len(facts), 5),
    }


def allocation_summary(info: dict, refs: list) -> dict:
    """An allocation's block sparsities and, measured from the pruned weights, the mean sparsity per role."""
    by_role: dict[str, list[float]] = {}
    for r in refs:
        w = r.weight_out_in()
        by_role.setdefault(r.role, []).append(float((w == 0).float().mean()))
    out = {k: info[k] for k in ("method", "measure", "unit", "bounds", "block_sparsity", "seconds_measuring", "seconds") if k in info}
    out["role_sparsity"] = {role: round(sum(v) / len(v), 4) for role, v in by_role.items()}
    return out


def parse_row(row: str) -> tuple[str, str, dict, str | None]:
    """'wanda:2:4[dsnot=true]' → ('wanda', '2:4', {'pattern': '2:4', 'dsnot': True}, None)."""
    head, options = parse_spec(row)
    method, _, what = head.partition(":")
    opts = {"pattern": what} if ":" in what else {"sparsity": float(what)}
    exp = options.pop("experiment", None)
    opts.update(options)
    return method, what, opts, exp


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", nargs="+", required=True, help="method:pattern[option=value,...]")
    ap.add_argument("--calibration-windows", type=int, default=128)
    ap.add_argument("--eval-windows", type=int, default=40)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--calibration-dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--blocks", default=None, help="prune only blocks FIRST-LAST (an option search on a few blocks)")
    ap.add_argument("--no-eval", action="store_true", help="skip both texts (choose options on held-out calibration error only)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "oneshot_options.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("calibrate.runner").setLevel(logging.WARNING)
    parsed = [parse_row(r) for r in args.rows]  # bad rows fail before any pruning
    if args.blocks:
        first, _, last = args.blocks.partition("-")
        for _, _, opts, _ in parsed:
            opts["blocks"] = list(range(int(first), int(last or first) + 1))
    for method, _, opts, _ in parsed:
        cls = get_pass_class(method)
        cls.config_class(**opts, calibration_dtype=args.calibration_dtype)
    torch.manual_seed(0)
    loaded = load_model("smollm2-135m")
    tok = loaded.tokenizer
    splits = shakespeare_splits()
    ev = evaluation_windows(tokenize(tok, splits.evaluation), args.length, args.eval_windows)
    ev2_ids = tokenize(tok, stdlib_text())
    ev2 = evaluation_windows(ev2_ids, args.length, min(args.eval_windows, ev2_ids.numel() // args.length))
    cal = calibration_windows(tokenize(tok, splits.calibration), args.calibration_windows, args.length, 0)

    def ppl(model: torch.nn.Module, windows: torch.Tensor, desc: str) -> float | None:
        if args.no_eval:
            return None
        return round(perplexity(torch_outputs_fn(model, "causal-lm"), windows, desc)["perplexity"], 3)

    rows: list[dict] = [{"row": "dense", "ppl_shakespeare": ppl(loaded.model, ev, "dense"), "ppl_second": ppl(loaded.model, ev2, "dense 2nd")}]
    plain_seconds: dict[str, float] = {}

    def save(complete: bool) -> None:
        write_result(args.out, {
            "benchmark": "oneshot_options",
            "complete": complete,
            "model": "smollm2-135m (Q4_1 GGUF dequantised to fp32)",
            "calibration": [args.calibration_windows, args.length],
            "calibration_dtype": args.calibration_dtype,
            "blocks": args.blocks or "all",
            "evaluation": {"shakespeare": list(ev.shape), "second": list(ev2.shape), "second_text": "stdlib docstrings: " + ", ".join(STDLIB_PROSE)},
            "rows": rows,
        })

    for row, (method, what, opts, exp) in zip(args.rows, parsed):
        cls = get_pass_class(method)
        model = copy.deepcopy(loaded.model)
        t0 = time.perf_counter()
        with experiment(exp):
            result = cls(cls.config_class(**opts, calibration_dtype=args.calibration_dtype)).run(model, PassContext(loaded.adapter, calibration=lambda: cal, progress=False))
        seconds = time.perf_counter() - t0
        key = f"{method}:{what}"
        if row == key:
            plain_seconds.setdefault(key, seconds)
        lin = [x.weight_out_in() for x in loaded.adapter.linears(model)]
        zeros = sum(int((w == 0).sum()) for w in lin) / sum(w.numel() for w in lin)
        rows.append({
            "row": row,
            "ppl_shakespeare": ppl(model, ev, row),
            "ppl_second": ppl(model, ev2, row + " 2nd"),
            "measured_sparsity": round(zeros, 5),
            "prune_seconds": round(seconds, 1),
            "solver_seconds": result.info.get("solver_seconds"),
            "time_vs_plain": round(seconds / plain_seconds[key], 3) if key in plain_seconds else None,
            **dsnot_summary(result.info, lin),
            **({"reconstruct": result.info["reconstruct_summary"]} if "reconstruct_summary" in result.info else {}),
            **({"sds": {"holdout_error_ratio": result.info["holdout_error_ratio"], "seconds": result.info["seconds"]}}
               if "holdout_error_ratio" in result.info else {}),
            **({"allocation": allocation_summary(result.info["allocation"], loaded.adapter.linears(model))} if "allocation" in result.info else {}),
        })
        logging.info("%s", rows[-1])
        save(complete=False)
        del model
    save(complete=True)
    print(markdown_table(
        ["row", "ppl Shakespeare", "ppl second text", "sparsity", "prune s", "solver s", "time vs plain"],
        [[r["row"], r["ppl_shakespeare"], r["ppl_second"], r.get("measured_sparsity", "—"), r.get("prune_seconds", "—"),
          r.get("solver_seconds", "—"), r.get("time_vs_plain", "—")] for r in rows],
    ))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
