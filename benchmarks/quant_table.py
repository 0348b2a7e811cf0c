"""Prune-then-quantize table (issue 29's must-show) from a finished ``quantized`` build.

Per variant: perplexity on the build's evaluation text (ONNX Runtime, from results.json) and on the
second text (the standard library's docstrings, never used for calibration or any choice), measured
here with the variant's ONNX Runtime engine; batch-1 decode ms/token (``--new`` tokens after a
``--prompt``-token prompt) and prefill ms of every variant's KV-cache graphs on ONNX Runtime and of the
dense model on native-cpu, and of every variant's fused contrib-op graph where the build's
``onnxruntime-fused`` engine built one (``build/<variant>/engine-onnxruntime-fused``), all interleaved round-robin in one process (the starting runner rotates),
with ratios to ONNX Runtime dense and to the fastest dense decode of the run, and the min–max of the
per-round ratios; ONNX file size against dense; the zeros the quantization kept (model and graph);
the build's greedy-decode agreement with the variant's own PyTorch model.

    python benchmarks/quant_table.py build/quantized --repeats 5
    python benchmarks/quant_table.py build/quantized --variants dense-int8,dense-int8-head --out …
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import ROOT, markdown_table, write_result  # noqa: E402

log = logging.getLogger("quant_table")


def onnx_bytes(path: Path) -> int:
    data = Path(str(path) + ".data")
    return path.stat().st_size + (data.stat().st_size if data.is_file() else 0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("build", type=Path, help="a finished build of the 'quantized' recipe (or any build with KV-cache graphs)")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--windows", type=int, default=20, help="second-text windows of 512 tokens")
    ap.add_argument("--no-native", action="store_true", help="do not time native-cpu dense")
    ap.add_argument("--no-fused", action="store_true", help="do not time the onnxruntime-fused graphs (built by the build's onnxruntime-fused engine)")
    ap.add_argument("--variants", default="", help="comma-separated variants to measure (default: all; dense is always added)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "quant_table.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", datefmt="%H:%M:%S")

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from calibrate.data import evaluation_windows, load_splits, stdlib_text, tokenize
    from core.adapters import adapter_for
    from engines.onnxruntime import OnnxRuntimeCpuEngine
    from export.kv_export import cache_layout, greedy_generate
    from pipeline.validate import perplexity, round_robin, runner_outputs_fn

    build = args.build
    results = json.loads((build / "results.json").read_text(encoding="utf-8"))
    variants = {v["name"]: v for v in results["variants"]}
    names = [v for v in args.variants.split(",") if v] or list(variants)
    if "dense" not in names:
        names.insert(0, "dense")
    unknown = [v for v in names if not (build / v / "kv" / "decode.onnx").is_file()]
    if unknown:
        raise SystemExit(f"--variants: {unknown} have no KV-cache graphs in {build}")
    dense_dir = build / "dense" / "model" / "model"
    tok = AutoTokenizer.from_pretrained(str(dense_dir))
    prompt = np.asarray(tokenize(tok, load_splits("shakespeare").evaluation)[: args.prompt], np.int64)[None]
    second = evaluation_windows(tokenize(tok, stdlib_text()), 512, args.windows)
    shakespeare = evaluation_windows(tokenize(tok, load_splits("shakespeare").evaluation), 512, 40) if any(v not in variants for v in names) else None
    dense_torch = AutoModelForCausalLM.from_pretrained(str(dense_dir), dtype=torch.float32).eval()
    layout = cache_layout(dense_torch, adapter_for(AutoConfig.from_pretrained(str(dense_dir))))
    del dense_torch
    ort = OnnxRuntimeCpuEngine({"threads": args.threads})

    table: dict = {}
    for v in names:  # second-text perplexity through each variant's ONNX Runtime engine
        eng = build / v / "engine-onnxruntime-cpu"
        if v in variants:
            art = eng / json.loads((eng / "stage.json").read_text(encoding="utf-8"))["info"]["artifact"]
        else:  # a variant whose build has not validated it yet: its KV prefill graph gives the same logits
            art = build / v / "kv" / "prefill.onnx"
        with ort.open(art, name=f"ort:{v}") as r:
            fn = runner_outputs_fn(r, "logits")
            table[v] = {"second_text_perplexity": perplexity(fn, second, f"{v} second text")["perplexity"]}
            if v not in variants:
                table[v]["perplexity"] = perplexity(fn, shakespeare, f"{v} Shakespeare")["perplexity"]

    out: dict = {"build": str(build), "prompt_tokens": args.prompt, "new_tokens": args.new, "threads": args.threads, "repeats": args.repeats,
                 "second_text": {"name": "stdlib-docstrings", "windows": int(second.shape[0]), "length": 512}}
    with ExitStack() as stack, tempfile.TemporaryDirectory() as tmp:
        runners: dict = {}
        for v in names:
            kv = build / v / "kv"
            runners[f"onnxruntime-cpu:{v}"] = ("ort", (
                stack.enter_context(ort.open(kv / "prefill.onnx", spinning=False, name=f"ort:{v}:prefill")),
                stack.enter_context(ort.open(kv / "decode.onnx", spinning=False, name=f"ort:{v}:decode")),
            ))
        if not args.no_fused:  # the fused contrib-op graph of every variant the build built it for
            from engines.base import EngineArtifact
            from engines.onnxruntime_fused import OnnxRuntimeFusedEngine

            fused = OnnxRuntimeFusedEngine({"threads": args.threads})
            for v in names:
                art = build / v / "engine-onnxruntime-fused" / "model.fused.onnx"
                if art.is_file():
                    runners[f"onnxruntime-fused:{v}"] = ("generates", stack.enter_context(fused.runner(EngineArtifact(fused.name, art), threads=args.threads)))
        if not args.no_native:
            from engines.native_cpu import NativeCpuEngine

            native = NativeCpuEngine({"threads": args.threads})
            art = native.build(dense_dir, Path(tmp))
            runners["native-cpu:dense"] = ("generates", stack.enter_context(native.runner(art, threads=args.threads)))

        def run(key: str) -> dict:
            kind, r = runners[key]
            g = greedy_generate(*r, layout, prompt, args.new) if kind == "ort" else r.generate(prompt, args.new)
            return {"decode_ms_per_token": statistics.mean(g.decode_ms), "prefill_ms": g.prefill_ms}

        for key in runners:  # warm-up
            run(key)
        samples = round_robin(list(runners), args.repeats, run)
    med = {k: {m: statistics.median(x) for m, x in s.items()} for k, s in samples.items()}
    base_key = "onnxruntime-cpu:dense"
    fastest_key = min((k for k in med if k.endswith(":dense")), key=lambda k: med[k]["decode_ms_per_token"])
    out["fastest_dense_decode"] = {"engine": fastest_key, "ms_per_token": round(med[fastest_key]["decode_ms_per_token"], 3)}

    def ratio(key: str, ref: str, m: str) -> dict:
        per_round = [a / b for a, b in zip(samples[ref][m], samples[key][m])]  # round i of both ran in one pass
        return {"median": round(med[ref][m] / med[key][m], 4), "range": [round(min(per_round), 4), round(max(per_round), 4)]}

    dense_ppl = variants["dense"]["engines"]["onnxruntime-cpu"]["perplexity_engine"]["perplexity"]
    dense_ppl2 = table["dense"]["second_text_perplexity"]
    dense_bytes = onnx_bytes(build / "dense" / "onnx" / "model.onnx")
    for key in runners:
        engine, v = key.split(":", 1)
        row = {"engine": engine, "variant": v, "decode_ms_per_token": round(med[key]["decode_ms_per_token"], 3),
               "prefill_ms": round(med[key]["prefill_ms"], 2),
               "decode_vs_ort_dense": ratio(key, base_key, "decode_ms_per_token"),
               "decode_vs_fastest_dense": ratio(key, fastest_key, "decode_ms_per_token"),
               "prefill_vs_ort_dense": ratio(key, base_key, "prefill_ms"),
               "samples": samples[key]}
        if engine == "onnxruntime-cpu" and v not in variants:
            row.update({
                "perplexity": round(table[v]["perplexity"], 3), "perplexity_ratio": round(table[v]["perplexity"] / dense_ppl, 4),
                "perplexity_from": "kv/prefill.onnx on ONNX Runtime (the build had not validated this variant)",
                "second_text_perplexity": round(table[v]["second_text_perplexity"], 3),
                "second_text_ratio": round(table[v]["second_text_perplexity"] / dense_ppl2, 4),
                "onnx_bytes": onnx_bytes(build / v / "onnx" / "model.onnx"),
                "onnx_ratio": round(onnx_bytes(build / v / "onnx" / "model.onnx") / dense_bytes, 4),
            })
        elif engine == "onnxruntime-cpu":
            r = variants[v]["engines"]["onnxruntime-cpu"]
            ppl = r["perplexity_engine"]["perplexity"]
            q = next((p["info"] for p in variants[v].get("pass_results", []) if p["name"] == "quantize"), None)
            gq = variants[v].get("export", {}).get("quantization")
            dec = variants[v].get("decode") or {}
            row.update({
                "perplexity": round(ppl, 3), "perplexity_ratio": round(ppl / dense_ppl, 4),
                "second_text_perplexity": round(table[v]["second_text_perplexity"], 3),
                "second_text_ratio": round(table[v]["second_text_perplexity"] / dense_ppl2, 4),
                "onnx_bytes": onnx_bytes(build / v / "onnx" / "model.onnx"),
                "onnx_ratio": round(onnx_bytes(build / v / "onnx" / "model.onnx") / dense_bytes, 4),
                "quantization": None if q is None else {"label": q["label"], "method": q["method"], "mask_aware": q["mask_aware"], "zeros_before": q["zeros"]["before"], "zeros_lost": q["zeros"]["lost"]},
                "graph_zeros_preserved": None if gq is None else gq["zeros_preserved"],
                "parity": {k: r["parity"].get(k) for k in ("passed", "atol", "max_absdiff")},
                "greedy_vs_own_torch": {k: dec.get(k) for k in ("tokens_identical", "leading_tokens_identical", "max_abs_logit_delta", "fp64_reference") if k in dec},
            })
        if engine == "onnxruntime-fused":
            art = build / v / "engine-onnxruntime-fused"
            info = json.loads((art / "stage.json").read_text(encoding="utf-8"))["info"]
            dense_info = json.loads((build / "dense" / "engine-onnxruntime-fused" / "stage.json").read_text(encoding="utf-8"))["info"]
            dec = ((variants.get(v) or {}).get("decode") or {}).get("engines", {}).get("onnxruntime-fused", {})
            row.update({
                "fused_bytes": info["bytes"], "fused_ratio": round(info["bytes"] / dense_info["bytes"], 4),
                "greedy_vs_own_torch": {k: dec.get(k) for k in ("tokens_identical", "leading_tokens_identical", "max_abs_logit_delta") if k in dec},
            })
        out.setdefault("rows", []).append(row)
    write_result(args.out, out)
    rows = []
    for r in out["rows"]:
        dv, dp = r["decode_vs_fastest_dense"], r["decode_vs_ort_dense"]
        q = r.get("quantization")
        rows.append([
            f"{r['variant']} ({r['engine']})",
            f"{r['perplexity']:.2f} (×{r['perplexity_ratio']:.3f})" if "perplexity" in r else "—",
            f"{r['second_text_perplexity']:.2f} (×{r['second_text_ratio']:.3f})" if "second_text_perplexity" in r else "—",
            f"{r['decode_ms_per_token']:.2f}", f"×{dv['median']:.2f} [{dv['range'][0]:.2f}–{dv['range'][1]:.2f}]",
            f"×{dp['median']:.2f}", f"×{r['prefill_vs_ort_dense']['median']:.2f}",
            f"{r['onnx_ratio']:.3f}" if "onnx_ratio" in r else (f"{r['fused_ratio']:.3f} (fused)" if "fused_ratio" in r else "—"),
            "—" if not q else ("kept" if q["zeros_lost"] == 0 and r["graph_zeros_preserved"] else f"{q['zeros_lost']:,} lost"),
        ])
    print(markdown_table(["variant (engine)", "ppl Shakespeare", "ppl 2nd text", "ms/token", "decode vs fastest dense", "vs ORT dense", "prefill vs ORT dense", "ONNX / dense", "zeros"], rows))
    print(f"fastest dense decode: {out['fastest_dense_decode']}; wrote {args.out}")


if __name__ == "__main__":
    main()
