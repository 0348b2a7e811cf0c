"""Batch-1 decode and prefill of sparse variants on the native-cpu engine against ONNX Runtime dense,
interleaved in one process (issue 28's must-show).

Takes a finished build directory whose recipe exported KV-cache graphs (``export.kv_cache: true``):
ONNX Runtime runs the dense variant's ``kv/prefill.onnx`` + ``kv/decode.onnx`` (the fastest dense
decode the project has), the native-cpu engine runs every variant (dense included, to show the
host's own overhead) from an artifact built here from the variant's saved model; where the build's
``onnxruntime-fused`` engine built the dense variant's fused graph it runs too, else that graph is
written here (the fastest dense baseline may be either ONNX Runtime graph or native dense: ratios to
the fastest are reported). Each repeat is one
greedy run of ``--new`` tokens after a ``--prompt``-token prompt from the evaluation text; the
starting runner rotates per repeat. Reported: ms/token and prefill ms (medians, with min–max), their
ratios to ONNX Runtime dense, the artifact size against native dense and the dense fp32 ONNX file, tokens identical to
ONNX Runtime's / PyTorch's greedy tokens, and a roofline line: bytes of the block linears read per
token divided by their share of the step time, against this machine's copy bandwidth measured in the
same run. With ``--ppl-windows N``, each native variant's perplexity on N × 512-token windows of the
Shakespeare evaluation split and of the second text (the standard library's docstrings), run by the
native engine itself.

    python benchmarks/native_decode.py build/sparse-cpu --variants dense,sds-sparsegpt-2of4 --repeats 5
    python benchmarks/native_decode.py build/default --variants dense,dense-int8-head --ppl-windows 20 --out …
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import ROOT, markdown_table, write_result  # noqa: E402

log = logging.getLogger("native_decode")


def prompt_tokens(model_dir: Path, n: int) -> np.ndarray:
    from transformers import AutoTokenizer

    from calibrate.data import load_splits, tokenize

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    ids = tokenize(tok, load_splits("shakespeare").evaluation)
    return np.asarray(ids[:n], np.int64)[None]


def linear_step(runner, share: float, reps: int = 5) -> tuple[float, int]:
    """(milliseconds, bytes) per decode step spent in the block linears alone: the same kernels on the
    same weights, called back to back with the step's input sizes. An input-skipping (activation-sparse)
    linear gets an input with ``share`` of its entries non-zero — the share its decoding read — and
    counts that share of its bytes."""
    from engines import native

    dec = runner.decoder
    rng = np.random.default_rng(0)
    calls = []
    for L in dec.layers:
        for w in (L.qkv, L.o, L.gate_up, L.down):
            x = rng.standard_normal((1, w.k)).astype(np.float32)
            if isinstance(w, native.InputMajorInt4Weight):  # the active rows' 4-bit codes + the active blocks' scales and offsets
                x[0, rng.random(w.k) >= share] = 0.0
                calls.append((lambda w=w, x=x: w.gemv_sparse(x, 0.0), w.bytes_read(x[0] != 0)))
            elif isinstance(w, native.InputMajorWeight):
                x[0, rng.random(w.k) >= share] = 0.0
                calls.append((lambda w=w, x=x: w.gemv_sparse(x, 0.0), int(w.nbytes * float((x != 0).mean()))))
            else:
                calls.append((lambda w=w, x=x: w.gemv(x), int(w.nbytes)))
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        for f, _b in calls:
            f()
        best = min(best, (time.perf_counter() - t0) * 1e3)
    return best, sum(b for _f, b in calls)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("build", type=Path, help="a build directory with KV-cache graphs (export.kv_cache: true)")
    ap.add_argument("--variants", default="", help="comma-separated variants (default: every variant of the build)")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-fused", action="store_true", help="do not run dense on onnxruntime-fused (built here when the build has none)")
    ap.add_argument("--ppl-windows", type=int, default=0, help="perplexity of each native variant on this many 512-token windows of both texts (0: none)")
    ap.add_argument("--dense-with", action="append", default=[], metavar="OPTION=VALUE",
                    help="also run dense on native-cpu built with this engine option (a YAML value), as 'dense[OPTION=VALUE]'; "
                         "repeatable: e.g. exact_grids=false (its Q4_1 linears and Q8_0 head as float32), int8_activations=true")
    ap.add_argument("--variants-with", action="append", default=[], metavar="OPTION=VALUE",
                    help="also run every other variant on native-cpu built with this engine option, as 'VARIANT[OPTION=VALUE]' "
                         "(e.g. int8_activations=true beside --dense-with int8_activations=true)")
    ap.add_argument("--float-kernel-too", action="store_true",
                    help="also run every variant other than dense with the float kernels of input-major 4-bit weights and of bitmask-int4 "
                         "weights instead of the 16-bit ones (AVX-512 VNNI, + VBMI2 for bitmask-int4; engines.native.int16_activations "
                         "switched before each of its runs), as 'VARIANT[float-kernel]'")
    ap.add_argument("--isa", default=None, help="force native-cpu's instruction set, no better than the CPU's (scalar, avx2+fma, avx512f): "
                    "the AVX2 path's speed on an AVX-512 machine, not an AVX2-only machine's")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "native_decode.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", datefmt="%H:%M:%S")

    from engines import native
    from engines.native_cpu import NativeCpuEngine
    from engines.onnxruntime import OnnxRuntimeCpuEngine
    from export.kv_export import cache_layout, greedy_generate
    from core.adapters import adapter_for
    from pipeline.validate import round_robin
    from transformers import AutoConfig, AutoModelForCausalLM

    if args.isa:
        native.set_isa(args.isa)
    build = args.build
    names = [v for v in args.variants.split(",") if v] or sorted(p.name for p in build.iterdir() if (p / "model" / "model").is_dir())
    if "dense" not in names:
        names.insert(0, "dense")
    dense_model = build / "dense" / "model" / "model"
    prompt = prompt_tokens(dense_model, args.prompt)
    native_engine = NativeCpuEngine({"threads": args.threads})
    ort = OnnxRuntimeCpuEngine({"threads": args.threads})
    dense_torch = AutoModelForCausalLM.from_pretrained(str(dense_model), dtype="float32").eval()
    layout = cache_layout(dense_torch, adapter_for(AutoConfig.from_pretrained(str(dense_model))))
    del dense_torch

    result: dict = {"build": str(build), "prompt_tokens": int(prompt.shape[1]), "new_tokens": args.new, "threads": args.threads, "repeats": args.repeats, "variants": {}}
    texts = {}
    if args.ppl_windows:
        from transformers import AutoTokenizer

        from calibrate.data import evaluation_windows, load_splits, stdlib_text, tokenize
        from pipeline.validate import perplexity, runner_outputs_fn

        tok = AutoTokenizer.from_pretrained(str(dense_model))
        texts = {"shakespeare": evaluation_windows(tokenize(tok, load_splits("shakespeare").evaluation), 512, args.ppl_windows),
                 "stdlib-docstrings": evaluation_windows(tokenize(tok, stdlib_text()), 512, args.ppl_windows)}
        result["perplexity_windows"] = {"length": 512, "windows": args.ppl_windows}
    with ExitStack() as stack, tempfile.TemporaryDirectory() as tmp:
        pre = stack.enter_context(ort.open(build / "dense" / "kv" / "prefill.onnx", spinning=False, name="ort:prefill"))
        dec = stack.enter_context(ort.open(build / "dense" / "kv" / "decode.onnx", spinning=False, name="ort:decode"))
        runners = {"onnxruntime-cpu:dense": ("ort", (pre, dec))}
        if not args.no_fused:  # ONNX Runtime's fused contrib-op graph of dense: the build's, or written here
            from engines.base import EngineArtifact
            from engines.onnxruntime_fused import OnnxRuntimeFusedEngine

            fused = OnnxRuntimeFusedEngine({"threads": args.threads})
            fused_art = EngineArtifact(fused.name, build / "dense" / "engine-onnxruntime-fused" / "model.fused.onnx")
            if not Path(fused_art.path).is_file():
                (Path(tmp) / "fused-dense").mkdir()
                fused_art = fused.build(dense_model, Path(tmp) / "fused-dense")
            runners["onnxruntime-fused:dense"] = ("generates", stack.enter_context(fused.runner(fused_art, threads=args.threads)))
        sizes = {}
        builds = [(v, v, native_engine) for v in names]
        for i, spec in enumerate(args.dense_with, start=1):
            key, _, value = spec.partition("=")
            builds.insert(i, (f"dense[{key}={value}]", "dense", NativeCpuEngine({"threads": args.threads, key: yaml.safe_load(value)})))
        for spec in args.variants_with:
            key, _, value = spec.partition("=")
            engine = NativeCpuEngine({"threads": args.threads, key: yaml.safe_load(value)})
            builds += [(f"{v}[{key}={value}]", v, engine) for v in names if v != "dense"]
        if args.float_kernel_too:
            builds += [(f"{v}[float-kernel]", v, native_engine) for v in names if v != "dense"]

        def kernel_for(key: str) -> None:  # the input-major 4-bit kernel this key runs (a global switch of the library)
            native.int16_activations(not key.endswith("[float-kernel]"))

        for v, model_of, engine in builds:
            out = Path(tmp) / v
            out.mkdir()
            art = engine.build(build / model_of / "model" / "model", out)
            sizes[v] = {"native_artifact_bytes": art.info["bytes"], "formats": art.info["formats"], "linear_bytes_ratio": art.info["linear_bytes_ratio"],
                        "exact_grids": art.info["exact_grids"], **({"quantized_weights": art.info["quantized_weights"]} if "quantized_weights" in art.info else {})}
            onnx = build / model_of / "onnx" / "model.onnx"
            if onnx.is_file():
                data = Path(str(onnx) + ".data")
                sizes[v]["onnx_bytes"] = onnx.stat().st_size + (data.stat().st_size if data.is_file() else 0)
            runners[f"native-cpu:{v}"] = ("native", stack.enter_context(engine.runner(art, threads=args.threads)))
        ref_tokens = greedy_generate(pre, dec, layout, prompt, 32).tokens

        def run(key: str) -> dict:
            kind, r = runners[key]
            if kind == "ort":
                g = greedy_generate(*r, layout, prompt, args.new)
                return {"decode_ms_per_token": statistics.mean(g.decode_ms), "prefill_ms": g.prefill_ms}
            kernel_for(key)
            g = r.generate(prompt, args.new)  # native and fused runners generate themselves
            return {"decode_ms_per_token": statistics.mean(g.decode_ms), "prefill_ms": g.prefill_ms}

        for key in runners:  # warm-up
            run(key)
        samples = round_robin(list(runners), args.repeats, run)
        bw = native.copy_bandwidth()
        base = {m: statistics.median(samples["onnxruntime-cpu:dense"][m]) for m in ("decode_ms_per_token", "prefill_ms")}
        # the fastest dense decode of the run (ONNX Runtime's graphs or native-cpu's dense): the ratio that counts
        fastest_key = min((k for k in samples if k.endswith(":dense") or ":dense[" in k), key=lambda k: statistics.median(samples[k]["decode_ms_per_token"]))
        fastest = statistics.median(samples[fastest_key]["decode_ms_per_token"])
        result["fastest_dense_decode"] = {"engine": fastest_key, "ms_per_token": round(fastest, 3)}
        dense_native_bytes = None
        for key, smp in samples.items():
            kind, r = runners[key]
            v = key.split(":", 1)[1]
            med = {m: statistics.median(x) for m, x in smp.items()}
            entry = {
                "engine": key.split(":")[0],
                "decode_ms_per_token": round(med["decode_ms_per_token"], 3),
                "decode_ms_range": [round(min(smp["decode_ms_per_token"]), 3), round(max(smp["decode_ms_per_token"]), 3)],
                "decode_speedup_vs_ort_dense": round(base["decode_ms_per_token"] / med["decode_ms_per_token"], 4),
                "decode_speedup_range": [round(base["decode_ms_per_token"] / max(smp["decode_ms_per_token"]), 4), round(base["decode_ms_per_token"] / min(smp["decode_ms_per_token"]), 4)],
                "decode_speedup_vs_fastest_dense": round(fastest / med["decode_ms_per_token"], 4),
                "prefill_ms": round(med["prefill_ms"], 2),
                "prefill_speedup_vs_ort_dense": round(base["prefill_ms"] / med["prefill_ms"], 4),
                "samples": smp,
            }
            if kind == "native":
                kernel_for(key)
                entry["input_major_kernel"] = "16-bit (AVX-512 VNNI)" if native.int16_activations() else "float"
                if "bitmask-int4" in sizes[v]["formats"]:
                    entry["bitmask_int4_kernel"] = "16-bit (AVX-512 VNNI + VBMI2; blocks of 32 or 64k inputs)" if native.bitmask_int4_int16() else "float"
                if "2:4-int4" in sizes[v]["formats"]:
                    nibbles = any(getattr(W, "format", None) == "2:4-int4" and W.nibbles_ptr() is not None
                                  for L in r.decoder.layers for W in (L.qkv, L.o, L.gate_up, L.down))
                    if nibbles and native.isa() == "avx2+fma" and native.int8_activations():
                        entry["twofour_int4_kernel"] = "int8 activations (AVX2: the nibble layout, x rounded per grid block)"
                    else:
                        entry["twofour_int4_kernel"] = "16-bit (AVX-512 VNNI + VBMI; blocks of at most 512 inputs)" if native.twofour_int4_int16() else "float"
                entry.update(sizes[v])
                if args.ppl_windows:
                    entry["perplexity"] = {name: round(perplexity(runner_outputs_fn(r, "logits"), w, f"{v} {name}")["perplexity"], 4) for name, w in texts.items()}
                g = r.generate(prompt, 32)
                entry["greedy_tokens_equal_ort_dense_leading"] = int(np.argmin(np.append(g.tokens[0] == ref_tokens[0], False)))
                d = r.decoder
                share = d.inputs_read / d.inputs_total if d.inputs_total else 1.0
                lin_ms, lin_bytes = linear_step(r, share)
                if d.inputs_total:
                    entry["activation_inputs_read_share"] = round(share, 4)
                entry["roofline"] = {
                    "linear_bytes_per_token": int(lin_bytes),
                    "linear_ms_per_token": round(lin_ms, 3),
                    "linear_read_gb_s": round(lin_bytes / lin_ms / 1e6, 2),
                    "copy_bandwidth_gb_s": round(bw / 1e9, 2),
                    "fraction_of_copy_bandwidth": round(lin_bytes / lin_ms / 1e6 / (bw / 1e9), 3),
                }
                if v == "dense":
                    dense_native_bytes = sizes[v]["native_artifact_bytes"]
            result["variants"][key] = entry
        dense_ppl = result["variants"]["native-cpu:dense"].get("perplexity")
        dense_onnx_bytes = sizes["dense"].get("onnx_bytes")
        for key, entry in result["variants"].items():
            if "native_artifact_bytes" in entry and dense_native_bytes:
                entry["file_ratio_vs_dense"] = round(entry["native_artifact_bytes"] / dense_native_bytes, 4)
            if "native_artifact_bytes" in entry and dense_onnx_bytes:  # against the dense fp32 ONNX model file too
                entry["file_ratio_vs_dense_onnx"] = round(entry["native_artifact_bytes"] / dense_onnx_bytes, 4)
            if "perplexity" in entry and dense_ppl:
                entry["perplexity_vs_dense"] = {t: round(entry["perplexity"][t] / dense_ppl[t], 4) for t in dense_ppl}
    result["copy_bandwidth_gb_s"] = round(bw / 1e9, 2)
    result["isa"] = native.isa()
    result["cpu_best_isa"] = native.best_isa()
    result["baseline"] = "onnxruntime-cpu dense KV-cache graphs (kv/prefill.onnx + kv/decode.onnx), spinning off"
    write_result(args.out, result)
    rows = []
    for key, e in result["variants"].items():
        rows.append([key, f"{e['decode_ms_per_token']:.2f}", f"×{e['decode_speedup_vs_ort_dense']:.2f} [{e['decode_speedup_range'][0]:.2f}–{e['decode_speedup_range'][1]:.2f}]",
                     f"×{e['decode_speedup_vs_fastest_dense']:.2f}",
                     f"{e['prefill_ms']:.1f}", f"×{e['prefill_speedup_vs_ort_dense']:.2f}", f"{e.get('file_ratio_vs_dense', '—')} / {e.get('file_ratio_vs_dense_onnx', '—')}",
                     f"{e['roofline']['fraction_of_copy_bandwidth']:.2f}" if "roofline" in e else "—",
                     " / ".join(f"×{r:.3f}" for r in e["perplexity_vs_dense"].values()) if "perplexity_vs_dense" in e else "—"])
    print(markdown_table(["engine:variant", "ms/token", "decode speed-up vs ORT dense", "vs fastest dense", "prefill ms", "prefill speed-up", "file / native dense / dense ONNX", "roofline (of copy bw)",
                          "perplexity / dense (Shakespeare / second text)"], rows))
    print(f"copy bandwidth {result['copy_bandwidth_gb_s']} GB/s; kernels {result['isa']}; wrote {args.out}")


if __name__ == "__main__":
    main()
