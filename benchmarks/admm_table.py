"""ADMM + SR-STE (issue 13) against one-shot and one-shot + masked distillation at the same budget.

Three variants on copies of the same model, the same calibration/training windows, the same loss
(KL to the dense teacher for SmolLM2; final-hidden MSE + embedding cosine for MiniLM) and the same
number of optimizer steps and tokens:

- ``oneshot``: SparseGPT (or ``--init``) at the pattern, no training;
- ``oneshot+kd``: the same, then ``passes.distill`` with the zeros kept (masked distillation);
- ``admm``: ``passes.admm`` from the same one-shot start (``--init``), ADMM then SR-STE.

SmolLM2: perplexity on the Shakespeare evaluation split and on a second text the training never
saw (default: the standard-library docstrings of ``benchmarks/allocation_table.py``). MiniLM:
mean cosine of mean-pooled sentence embeddings to the dense model's on held-out lines of the
evaluation split. Wall time of each variant; ADMM's residual history is in the JSON.

    python benchmarks/admm_table.py --steps 400                      # SmolLM2 2:4, the issue's table
    python benchmarks/admm_table.py --model minilm-l6 --steps 300 --batch-size 16 --length 32
    python benchmarks/admm_table.py --steps 40 --blocks 0 1 --variants "admm[rho=0.05]" "admm[rho=0.01]"   # choosing options
                                                                         # (on --holdout calibration windows only)

A variant is ``oneshot``, ``oneshot+kd``, or ``admm`` optionally with ADMM options in brackets
(``admm[rho=0.05,srste_decay=0.01]``). ``admm[init=...]`` starts from the dense model and runs
that initialisation itself (``admm[init=dense]`` is the paper's start).
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
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import markdown_table, parse_spec, write_result  # noqa: E402
from calibrate.data import STDLIB_PROSE, stdlib_text  # noqa: E402
from benchmarks.common import sentence_embeddings  # noqa: E402
from calibrate.data import calibration_windows, evaluation_windows, shakespeare_splits, tokenize  # noqa: E402
from core.masks import PatternSet  # noqa: E402
from core.models import load_model  # noqa: E402
from passes import PassContext, get_pass_class  # noqa: E402
from passes.admm import ADMMConfig, ADMMPass  # noqa: E402
from passes.distill import DistillConfig, DistillPass  # noqa: E402
from pipeline.build import cpu_info  # noqa: E402
from pipeline.validate import perplexity, torch_outputs_fn  # noqa: E402

log = logging.getLogger("admm_table")


def parse_variant(spec: str) -> tuple[str, dict]:
    name, options = parse_spec(spec)
    unknown = [k for k in options if k not in ADMMConfig.__dataclass_fields__]
    if name not in ("oneshot", "oneshot+kd", "admm") or unknown or (options and name != "admm"):
        raise SystemExit(f"variant '{spec}': expected oneshot, oneshot+kd, or admm[key=value,...] with ADMM option names" + (f"; unknown {unknown}" if unknown else ""))
    return name, options


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", choices=["smollm2-135m", "minilm-l6"])
    ap.add_argument("--pattern", default="2:4")
    ap.add_argument("--init", default="sparsegpt", choices=["sparsegpt", "wanda", "magnitude"])
    ap.add_argument("--variants", nargs="*", default=["oneshot", "oneshot+kd", "admm"])
    ap.add_argument("--steps", type=int, default=400, help="optimizer steps of every trained variant")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--max-minutes", type=float, default=None, help="wall-time cap of every trained variant")
    ap.add_argument("--calibration-windows", type=int, default=128)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=40)
    ap.add_argument("--holdout", type=int, default=0, help="evaluate on this many held-out calibration windows instead of the texts (option choice)")
    ap.add_argument("--blocks", nargs="*", type=int, default=None)
    ap.add_argument("--lines", type=int, default=500, help="MiniLM: held-out evaluation lines")
    ap.add_argument("--second-text", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "admm_table.json")
    args = ap.parse_args()
    PatternSet(args.pattern)
    specs = [parse_variant(v) for v in args.variants]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("calibrate.runner").setLevel(logging.WARNING)
    loaded = load_model(args.model)
    dense, tok, adapter = loaded.model, loaded.tokenizer, loaded.adapter
    causal = adapter.task == "causal-lm"
    splits = shakespeare_splits()
    if causal:
        windows = calibration_windows(tokenize(tok, splits.calibration), args.calibration_windows + args.holdout, args.length, 0)
    else:  # sentence-shaped windows, as benchmarks/minilm_heads.py
        cal_lines = [ln.strip() for ln in splits.calibration.splitlines() if len(ln.split()) >= 4]
        packed = torch.tensor([t for ids in tok(cal_lines)["input_ids"] for t in ids], dtype=torch.long)
        windows = calibration_windows(packed, args.calibration_windows + args.holdout, args.length, 0)
    train_windows, held = windows[: args.calibration_windows], windows[args.calibration_windows :]
    evals: dict[str, torch.Tensor] = {}
    lines: list[str] = []
    if causal and args.holdout:
        evals["holdout"] = held
    elif causal:
        evals["shakespeare"] = evaluation_windows(tokenize(tok, splits.evaluation), args.length, args.eval_windows)
        ids2 = tokenize(tok, args.second_text.read_text(encoding="utf-8") if args.second_text else stdlib_text())
        evals["second"] = evaluation_windows(ids2, args.length, min(args.eval_windows, ids2.numel() // args.length))
    else:
        lines = [ln.strip() for ln in splits.evaluation.splitlines() if len(ln.split()) >= 4][: args.lines]
    ref = sentence_embeddings(dense, tok, lines) if lines else None

    def quality(model: torch.nn.Module, desc: str) -> dict:
        if not causal:
            cos = F.cosine_similarity(sentence_embeddings(model, tok, lines), ref, dim=-1)
            return {"mean_cosine": round(float(cos.mean()), 5), "min_cosine": round(float(cos.min()), 5)}
        return {f"ppl_{k}": round(perplexity(torch_outputs_fn(model, "causal-lm"), w, f"{desc} {k}")["perplexity"], 3) for k, w in evals.items()}

    pattern = PatternSet(args.pattern)
    rows = [{"variant": "dense", **quality(dense, "dense")}]
    write_result(args.out, _result(args, evals, lines, rows))
    train_opts = dict(steps=args.steps, batch_size=args.batch_size, lr=args.lr, max_minutes=args.max_minutes)
    ctx = PassContext(adapter, calibration=lambda: train_windows, progress=True, teacher=lambda: dense)
    # A variant that names its own init (admm[init=dense], the paper's start) starts from the dense
    # model and lets ADMM initialise; every other variant starts from the one-shot result
    # (``--init`` at the pattern), computed once, copied into each, its time added to each row.
    own_inits = [name == "admm" and "init" in options for name, options in specs]
    start, start_seconds = None, 0.0
    if not all(own_inits):
        t0 = time.perf_counter()
        start = copy.deepcopy(dense)
        cls = get_pass_class(args.init)
        cls(cls.config_class(pattern=args.pattern, blocks=args.blocks)).run(start, ctx)
        start_seconds = time.perf_counter() - t0
        log.info("one-shot start (%s %s): %.1f s", args.init, args.pattern, start_seconds)
    for (name, options), own_init in zip(specs, own_inits):
        model = copy.deepcopy(dense if own_init else start)
        t0 = time.perf_counter()
        info: dict = {}
        if name == "oneshot+kd":
            r = DistillPass(DistillConfig(**train_opts, hidden_mse=0.0 if causal else 1.0)).run(model, ctx)
            info = {k: r.info[k] for k in ("steps", "tokens", "train_seconds", "loss_first10", "loss_last10", "stopped_early")}
        elif name == "admm":
            # Without its own init, "dense" on the one-shot result: W⁰ = the one-shot weights,
            # Z⁰ = Π_S(W⁰) = W⁰ — the same start as ADMM's init=args.init, not pruned a second time.
            opts = {"pattern": args.pattern, "init": "dense", "blocks": args.blocks, **train_opts, **({} if causal else {"hidden_mse": 1.0}), **options}
            acfg = ADMMConfig(**opts)
            r = ADMMPass(acfg).run(model, ctx)
            settings = ("rho", "rho_growth", "rho_max", "admm_interval", "admm_fraction", "srste_decay", "mask_every", "train_rest", "lm_weight")
            info = {"admm": r.info["admm"], "srste": r.info["srste"], "budget": r.info["budget"], "options": options,
                    "settings": {k: getattr(acfg, k) for k in settings}, "start": options["init"] if own_init else args.init}
        seconds = time.perf_counter() - t0 + (0.0 if own_init else start_seconds)
        lin = [x.weight_out_in() for x in adapter.linears(model, blocks=args.blocks)]
        row = {
            "variant": args.variants[len(rows) - 1],
            "measured_sparsity": round(sum(int((w == 0).sum()) for w in lin) / sum(w.numel() for w in lin), 5),
            "pattern_valid": all(pattern.contains(w) for w in lin),
            **quality(model, name),
            "seconds": round(seconds, 1),
            "train": info,
        }
        rows.append(row)
        log.info("%s", {k: v for k, v in row.items() if k != "train"})
        del model
        write_result(args.out, _result(args, evals, lines, rows))  # partial results survive an interruption
    keys = [k for k in rows[0] if k != "variant"]
    print(markdown_table(["variant", *keys, "sparsity", "seconds"], [[r["variant"], *[r.get(k) for k in keys], r.get("measured_sparsity", "—"), r.get("seconds", "—")] for r in rows]))
    return 0


def _result(args: argparse.Namespace, evals: dict, lines: list[str], rows: list) -> dict:
    return {
        "benchmark": "admm_table",
        "model": args.model,
        "pattern": args.pattern,
        "init": args.init,
        "budget": {"steps": args.steps, "batch_size": args.batch_size, "length": args.length, "lr": args.lr, "max_minutes": args.max_minutes},
        "calibration": [args.calibration_windows, args.length],
        "blocks": args.blocks,
        "evaluation": {k: list(w.shape) for k, w in evals.items()} | (
            {"second_text": str(args.second_text or "stdlib docstrings: " + ", ".join(STDLIB_PROSE))} if "second" in evals else {}
        ) | ({"lines": len(lines)} if lines else {}),
        "machine": {**cpu_info(), "threads": torch.get_num_threads(), "platform": platform.machine()},
        "rows": rows,
    }


if __name__ == "__main__":
    raise SystemExit(main())
