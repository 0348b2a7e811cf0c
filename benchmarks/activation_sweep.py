"""Activation sparsity (TEAL thresholds, the ``activation`` pass) on the bundled SmolLM2: perplexity
at several target sparsities on both texts — the Shakespeare evaluation split and the second text
(stdlib docstrings) — and the share of weight rows the native engine's decode reads. The sparsity a
recipe ships is chosen on the second text (never on the evaluation split); both are reported.

    python benchmarks/activation_sweep.py --sparsities 0.25,0.35,0.45 --windows 16
    python benchmarks/activation_sweep.py --groups mlp_in --sparsities 0.4,0.5,0.6 --out benchmarks/results/activation_sweep_mlp_in.json
    python benchmarks/activation_sweep.py --forms threshold,topk --sparsities 0.3,0.4,0.5 --out benchmarks/results/activation_sweep_topk.json
    python benchmarks/activation_sweep.py --groups gate_out --sparsities 0.4,0.5,0.6,0.7 --out benchmarks/results/activation_sweep_cats.json
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import ROOT, markdown_table, write_result  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sparsities", default="0.25,0.35,0.45,0.55")
    ap.add_argument("--calibration", type=int, default=16, help="calibration windows of 512 tokens (the recipe's)")
    ap.add_argument("--windows", type=int, default=16, help="evaluation windows of 512 tokens per text")
    ap.add_argument("--groups", default="", help="comma-separated groups to sparsify (default: every input group; e.g. mlp_in, or gate_out for CATS)")
    ap.add_argument("--forms", default="threshold", help="comma-separated forms of the pass: threshold (TEAL), topk")
    ap.add_argument("--budget", type=float, default=1.10, help="perplexity budget (× dense) the choice must meet on the second text")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "activation_sweep.json")
    args = ap.parse_args()

    from calibrate.data import calibration_windows, evaluation_windows, shakespeare_splits, stdlib_text, tokenize
    from core.models import load_model
    from passes import PassContext
    from passes.activation import ActivationConfig, ActivationSparsityPass
    from pipeline.validate import perplexity, torch_outputs_fn

    loaded = load_model("smollm2-135m")
    s = shakespeare_splits()
    texts = {
        "shakespeare_eval": evaluation_windows(tokenize(loaded.tokenizer, s.evaluation), 512, args.windows),
        "second_text": evaluation_windows(tokenize(loaded.tokenizer, stdlib_text()), 512, args.windows),
    }
    cal = calibration_windows(tokenize(loaded.tokenizer, s.calibration), args.calibration, 512, 0)

    def ppl(model) -> dict[str, float]:
        return {t: round(perplexity(torch_outputs_fn(model, "causal-lm"), w, t)["perplexity"], 3) for t, w in texts.items()}

    groups = [g for g in args.groups.split(",") if g] or None
    dense = ppl(loaded.model)
    rows = [{"sparsity": 0.0, **dense, "ratio_shakespeare": 1.0, "ratio_second": 1.0}]
    forms = [f for f in args.forms.split(",") if f]
    for sp, form in [(float(x), f) for x in args.sparsities.split(",") if x for f in forms]:
        model = copy.deepcopy(loaded.model)
        t0 = time.perf_counter()
        res = ActivationSparsityPass(ActivationConfig(sparsity=sp, groups=groups, form=form)).run(
            model, PassContext(loaded.adapter, calibration=lambda: cal, progress=False))
        p = ppl(model)
        rows.append({
            "sparsity": sp, "form": form, "pass_form": res.info["form"], **p,
            "ratio_shakespeare": round(p["shakespeare_eval"] / dense["shakespeare_eval"], 4),
            "ratio_second": round(p["second_text"] / dense["second_text"], 4),
            "measured_sparsity": res.info["measured_sparsity"],
            "work_share": round(res.info["linear_macs_per_token"]["after"] / res.info["linear_macs_per_token"]["before"], 4),
            "calibrate_seconds": round(time.perf_counter() - t0, 1),
        })
        print(rows[-1], flush=True)
    choices = {}
    for form in forms:
        fits = [r for r in rows[1:] if r["form"] == form and r["ratio_second"] <= args.budget]
        choices[form] = max(fits, key=lambda r: r["sparsity"])["sparsity"] if fits else None
    choice = choices[forms[0]] if len(forms) == 1 else choices
    result = {
        "model": "smollm2-135m", "groups": groups or "all", "calibration_windows": args.calibration, "evaluation_windows": args.windows,
        "budget": args.budget, "chosen_on": "second_text", "chosen_sparsity": choice, "rows": rows,
    }
    write_result(args.out, result)
    print(markdown_table(["target sparsity", "form", "work / dense", "ppl Shakespeare", "× dense", "ppl second text", "× dense"],
                         [[r["sparsity"], r.get("form", "—"), r.get("work_share", 1.0), r["shakespeare_eval"], r["ratio_shakespeare"], r["second_text"],
                           r["ratio_second"]] for r in rows]))
    print(f"chosen on the second text within ×{args.budget}: {choice}; wrote {args.out}")


if __name__ == "__main__":
    main()
