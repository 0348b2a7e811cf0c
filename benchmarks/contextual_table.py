"""Contextual MLP sparsity (issue 14, Deja Vu) on the bundled SmolLM2-135M-Instruct.

Quality: perplexity vs the share of MLP units computed per token for the oracle, threshold and
predictor selectors (each token's own selection, i.e. exactly what KV-cache decoding computes), on
the Shakespeare evaluation split and on a second text the calibration never saw (stdlib docstrings,
as in the allocation table); next to static FFN-channel removal (the ``structured`` pass, no recovery)
at the same MLP multiply-accumulates per token, predictor included.

Speed: KV-cache graphs of the dense model and of predictor variants, ONNX Runtime CPU, batch 1,
``--new-tokens`` after a ``--prompt``-token prompt, the variants' runs interleaved round robin
(ratios to dense per round); greedy tokens through ORT compared with the PyTorch contextual model.

    python benchmarks/contextual_table.py                                # the issue's table
    python benchmarks/contextual_table.py --keeps 0.5 --selectors threshold --calibration-windows 8 \\
        --eval-windows 4 --decode-keeps 0.5 --decode-repeats 1          # a quick look

Options (rank, recall weight, dense blocks) are chosen on recall@k over held-out calibration tokens
(``recall_at_k`` in the JSON), never on either evaluation text.
"""

from __future__ import annotations

import argparse
import copy
import logging
import platform
import statistics
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import write_result  # noqa: E402

from benchmarks.common import markdown_table  # noqa: E402
from calibrate.data import STDLIB_PROSE, stdlib_text  # noqa: E402
from calibrate.data import calibration_windows, evaluation_windows, shakespeare_splits, tokenize  # noqa: E402
from core.models import load_model  # noqa: E402
from passes import PassContext, get_pass_class  # noqa: E402
from pipeline.build import cpu_info  # noqa: E402
from pipeline.validate import perplexity, round_robin, torch_outputs_fn  # noqa: E402

log = logging.getLogger("contextual_table")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keeps", nargs="*", type=float, default=[0.7, 0.5, 0.3, 0.2])
    ap.add_argument("--selectors", nargs="*", default=["oracle", "threshold", "predictor"])
    ap.add_argument("--predictor-rank", type=int, default=128)
    ap.add_argument("--predictor-steps", type=int, default=150)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--dense-blocks", nargs="*", type=int, default=[0])
    ap.add_argument("--calibration-windows", type=int, default=128)
    ap.add_argument("--eval-windows", type=int, default=40)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--no-structured", action="store_true", help="skip the static FFN-removal comparison")
    ap.add_argument("--decode-keeps", nargs="*", type=float, default=[0.5, 0.3], help="predictor variants timed in ORT decode")
    ap.add_argument("--decode-repeats", type=int, default=5)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--greedy-tokens", type=int, default=32)
    ap.add_argument("--timing-only", nargs="*", default=None, metavar="VARIANT",
                    help="only time the KV graphs already under --work (e.g. dense predictor-0.5), interleaved, with the op profile; "
                         "no quality rows, no PyTorch parity (the full run measures those); writes --out")
    ap.add_argument("--work", type=Path, default=Path("build") / "contextual_table", help="where the KV graphs go (git-ignored)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "contextual_table.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.timing_only is not None:
        return timing_only(args)
    loaded = load_model("smollm2-135m")
    tok, adapter, dense = loaded.tokenizer, loaded.adapter, loaded.model
    splits = shakespeare_splits()
    ev = evaluation_windows(tokenize(tok, splits.evaluation), args.length, args.eval_windows)
    ev2_ids = tokenize(tok, stdlib_text())
    ev2 = evaluation_windows(ev2_ids, args.length, min(args.eval_windows, ev2_ids.numel() // args.length))
    cal = calibration_windows(tokenize(tok, splits.calibration), args.calibration_windows, args.length, 0)
    memo: dict = {}

    def ctx() -> PassContext:
        return PassContext(adapter, calibration=lambda: cal, progress=False, memo=memo, prefix_key="dense")

    def ppl(model: torch.nn.Module, windows: torch.Tensor, desc: str) -> float:
        return round(perplexity(torch_outputs_fn(model, "causal-lm"), windows, desc)["perplexity"], 3)

    dense_row = {"selector": "dense", "keep": 1.0, "ppl_shakespeare": ppl(dense, ev, "dense"), "ppl_second": ppl(dense, ev2, "dense 2nd"), "mlp_macs_share": 1.0}
    rows = [dense_row]
    models: dict[str, torch.nn.Module] = {}
    cls = get_pass_class("contextual")
    for selector in args.selectors:
        for keep in args.keeps:
            model = copy.deepcopy(dense)
            opts = {"keep": keep, "selector": selector, "predictor_rank": args.predictor_rank, "dense_blocks": args.dense_blocks,
                    "predictor_steps": args.predictor_steps}
            t0 = time.perf_counter()
            r = cls(cls.config_class(**opts)).run(model, ctx())
            seconds = time.perf_counter() - t0
            row = {
                "selector": selector, "keep": keep, "pass_seconds": round(seconds, 1),
                "mlp_macs_share": r.info["mlp_macs_share"],
                # recall@k of this selector's choice on held-out calibration tokens (the oracle's is 1 by definition);
                # the threshold rule's, measured on the same tokens, rides along for comparison
                "recall_at_k": {"oracle": 1.0, "threshold": r.info.get("mean_threshold_recall_at_k")}.get(selector, r.info.get("mean_recall_at_k")),
                "threshold_recall_at_k": r.info.get("mean_threshold_recall_at_k"),
                "predictor_macs_share_of_block": r.info.get("predictor_macs_share"),
                "ppl_shakespeare": ppl(model, ev, f"{selector} {keep}"), "ppl_second": ppl(model, ev2, f"{selector} {keep} 2nd"),
                "per_block": r.info["blocks"],
            }
            rows.append(row)
            log.info("%s", {k: v for k, v in row.items() if k != "per_block"})
            if selector == "predictor" and keep in args.decode_keeps:
                models[f"predictor-{keep:g}"] = model
            else:
                del model
    if not args.no_structured:
        scls = get_pass_class("structured")
        for row in [r for r in rows if r["selector"] == "predictor"]:
            share = row["mlp_macs_share"]
            model = copy.deepcopy(dense)
            scls(scls.config_class(ffn=round(1 - share, 4))).run(model, ctx())
            srow = {"selector": "structured (static FFN removal, no recovery)", "keep": round(share, 4), "mlp_macs_share": round(share, 4),
                    "same_macs_as": f"predictor {row['keep']}", "ppl_shakespeare": ppl(model, ev, f"structured {share:.3f}"),
                    "ppl_second": ppl(model, ev2, f"structured {share:.3f} 2nd")}
            rows.append(srow)
            log.info("%s", srow)
            del model

    decode = measure_decode(args, dense, adapter, models, ev) if models else None
    result = {
        "benchmark": "contextual_table",
        "calibration": [args.calibration_windows, args.length],
        "evaluation": {"shakespeare": list(ev.shape), "second": list(ev2.shape), "second_text": "stdlib docstrings: " + ", ".join(STDLIB_PROSE)},
        "settings": {"predictor_rank": args.predictor_rank, "predictor_steps": args.predictor_steps, "dense_blocks": args.dense_blocks},
        "machine": {**cpu_info(), "threads": torch.get_num_threads(), "platform": platform.machine()},
        "rows": rows,
        "decode": decode,
    }
    write_result(args.out, result)
    d_sh, d_2 = dense_row["ppl_shakespeare"], dense_row["ppl_second"]
    print(markdown_table(
        ["selector", "keep", "MLP MACs / dense", "recall@k", "ppl Shakespeare (× dense)", "ppl second text (× dense)"],
        [[r["selector"], r["keep"], r["mlp_macs_share"], r.get("recall_at_k", "—"), f"{r['ppl_shakespeare']} (×{r['ppl_shakespeare'] / d_sh:.3f})",
          f"{r['ppl_second']} (×{r['ppl_second'] / d_2:.3f})"] for r in rows],
    ))
    if decode:
        print()
        print(markdown_table(
            ["variant", "greedy tokens = PyTorch", "max |Δlogit|", "decode ms/token", "ratio to dense (median, per-round range)"],
            [[n, v["tokens_identical"], f"{v['max_abs_logit_delta']:.2e}", v["decode_ms_per_token"], f"{v['decode_ratio']} [{v['ratio_min']}–{v['ratio_max']}]"]
             for n, v in decode["variants"].items()],
        ))
    return 0


def measure_decode(args: argparse.Namespace, dense: torch.nn.Module, adapter, models: dict, ev: torch.Tensor) -> dict:
    """Export the KV graphs not yet under ``--work``, check greedy parity with each PyTorch model, then time."""
    from export.kv_export import cache_layout, compare_with_generate, export_kv_graphs, greedy_generate

    all_models = {"dense": dense, **models}
    for name, model in all_models.items():
        d = args.work / name
        if not (d / "decode.onnx").is_file():
            d.mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            export_kv_graphs(model, adapter, d)
            log.info("%s: KV graphs exported in %.0f s", name, time.perf_counter() - t0)

    def parity(name: str, runners: tuple, layout, prompt: np.ndarray) -> dict:
        cmp = compare_with_generate(greedy_generate(*runners, layout, prompt, args.greedy_tokens), all_models[name], prompt)
        cmp.pop("max_abs_logit_delta_per_step")
        log.info("%s: greedy tokens identical %s, max |Δlogit| %.2e", name, cmp["tokens_identical"], cmp["max_abs_logit_delta"])
        return cmp

    layouts = {n: cache_layout(m, adapter) for n, m in all_models.items()}
    return time_graphs(args, list(all_models), layouts, prompt_ids(ev, args.prompt), parity)


def prompt_ids(ev: torch.Tensor, n: int) -> np.ndarray:
    """The first ``n`` evaluation tokens as a batch-1 prompt."""
    return ev.reshape(-1)[:n][None].numpy().astype(np.int64)


def time_graphs(args: argparse.Namespace, names: list[str], layouts: dict, prompt: np.ndarray, parity=None) -> dict:
    """Open every variant's prefill/decode graphs under ``--work`` (no intra-op spinning: they alternate),
    run ``parity`` on each where given, then decode timing round robin (ratios to dense per round) and
    ONNX Runtime's per-op profile."""
    import tempfile

    from engines.onnxruntime import OnnxRuntimeCpuEngine
    from export.kv_export import decode_timing, greedy_generate

    eng = OnnxRuntimeCpuEngine({})
    out: dict = {"prompt_tokens": int(prompt.shape[1]), "new_tokens": args.new_tokens, "batch": 1, "runtime": "onnxruntime-cpu",
                 "variants": {n: {} for n in names}}
    with ExitStack() as stack:
        runners = {}
        for n in names:
            runners[n] = (stack.enter_context(eng.open(args.work / n / "prefill.onnx", spinning=False, name=f"{n}:prefill")),
                          stack.enter_context(eng.open(args.work / n / "decode.onnx", spinning=False, name=f"{n}:decode")))
            if parity is not None:
                out["variants"][n].update(parity(n, runners[n], layouts[n], prompt))
        for n in names:  # warm-up
            greedy_generate(*runners[n], layouts[n], prompt, 4)
        samples = round_robin(names, args.decode_repeats, lambda n: decode_timing(*runners[n], layouts[n], prompt, args.new_tokens))
    with tempfile.TemporaryDirectory() as tmp:
        out["op_profile_us_per_step"] = op_profile(args.work, names, layouts, prompt, min(args.new_tokens, 16), Path(tmp))
    base = samples["dense"]["decode_ms_per_token"]
    for n, smp in samples.items():
        ratios = [a / b for a, b in zip(smp["decode_ms_per_token"], base)]
        out["variants"][n].update({
            "decode_ms_per_token": round(statistics.median(smp["decode_ms_per_token"]), 3),
            "decode_ratio": round(statistics.median(ratios), 4), "ratio_min": round(min(ratios), 4), "ratio_max": round(max(ratios), 4),
            "speedup": round(1 / statistics.median(ratios), 3), "samples": smp,
        })
    return out


def graph_layout(path: Path):
    """The KV layout of a decode graph, read from its past inputs."""
    import onnx

    from export.kv_export import CacheLayout

    g = onnx.load(str(path), load_external_data=False)
    past = [i for i in g.graph.input if i.name.startswith("past_key_")]
    if not past:
        raise SystemExit(f"{path}: no past_key_* inputs; not a KV decode graph")
    dims = [i.type.tensor_type.shape.dim for i in past]
    return CacheLayout(len(past), tuple(d[1].dim_value for d in dims), dims[0][3].dim_value)


def timing_only(args: argparse.Namespace) -> int:
    names = args.timing_only or ["dense"]
    if "dense" not in names:
        names = ["dense", *names]
    for n in names:
        if not (args.work / n / "decode.onnx").is_file():
            raise SystemExit(f"{args.work / n}: no decode.onnx; run the full benchmark first")
    layouts = {n: graph_layout(args.work / n / "decode.onnx") for n in names}
    tok = load_model("smollm2-135m").tokenizer
    ev = evaluation_windows(tokenize(tok, shakespeare_splits().evaluation), args.length, 1)
    out = time_graphs(args, names, layouts, prompt_ids(ev, args.prompt))
    write_result(args.out, {"benchmark": "contextual_table --timing-only", "machine": {**cpu_info(), "platform": platform.machine()}, "decode": out})
    print(markdown_table(["variant", "decode ms/token", "ratio to dense (median, per-round range)"],
                         [[n, v["decode_ms_per_token"], f"{v['decode_ratio']} [{v['ratio_min']}–{v['ratio_max']}]"] for n, v in out["variants"].items()]))
    return 0


class _Session:
    """``infer(feeds)`` over a plain ONNX Runtime session (for the profiled runs)."""

    def __init__(self, session):
        self.session = session
        self.names = [o.name for o in session.get_outputs()]

    def infer(self, feeds: dict) -> dict:
        return dict(zip(self.names, self.session.run(self.names, feeds)))


def op_profile(work: Path, names: list[str], layouts: dict, prompt: np.ndarray, tokens: int, profile_dir: Path) -> dict:
    """Per op type, microseconds per decode step from ONNX Runtime's own profiler (the same session
    options as the timed runs), for each variant's decode graph."""
    import json

    import onnxruntime as ort

    from engines.onnxruntime import OnnxRuntimeCpuEngine
    from export.kv_export import greedy_generate

    eng = OnnxRuntimeCpuEngine({})
    out = {}
    for name in names:
        pre = _Session(ort.InferenceSession(str(work / name / "prefill.onnx"), eng._session_options(None), providers=["CPUExecutionProvider"]))
        so = eng._session_options(None)
        so.enable_profiling = True
        so.profile_file_prefix = str(profile_dir / f"decode_{name}")
        sess = ort.InferenceSession(str(work / name / "decode.onnx"), so, providers=["CPUExecutionProvider"])
        greedy_generate(pre, _Session(sess), layouts[name], prompt, tokens)
        events = json.loads(Path(sess.end_profiling()).read_text())
        per: dict[str, float] = {}
        for e in events:
            if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
                op = e.get("args", {}).get("op_name", "?")
                per[op] = per.get(op, 0.0) + e["dur"]
        steps = tokens - 1
        out[name] = {op: round(us / steps, 1) for op, us in sorted(per.items(), key=lambda kv: -kv[1])}
        out[name]["total_kernel_us_per_step"] = round(sum(per.values()) / steps, 1)
    return out


if __name__ == "__main__":
    raise SystemExit(main())
