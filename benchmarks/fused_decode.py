"""Batch-1 decode of the fused contrib-op graph (``onnxruntime-fused``) against the project's plain KV
graphs, native-cpu and ONNX Runtime GenAI's model builder, interleaved in one process (issue 31's
must-show; with ``--variant`` the quantized/pruned rows of issue 29).

Runners (each repeat is one greedy run of ``--new`` tokens after a ``--prompt``-token prompt from the
Shakespeare evaluation text; the starting runner rotates per repeat):

- ``onnxruntime-cpu:dense`` — the dense variant's traced ``kv/prefill.onnx`` + ``kv/decode.onnx`` of
  ``--plain BUILD`` (per-token KV ``Concat``), spinning off, as the decode stage runs them;
- ``onnxruntime-fused:<name>`` — the fused graph built here from each model directory;
- ``native-cpu:dense`` (``--native``) — the project's own decoder;
- ``genai-graph:<name>`` — a GenAI builder output (``--genai NAME=DIR``) driven by the same loop and
  session options as the fused graph (graph against graph);
- ``genai:<name>`` — the same directory under ONNX Runtime GenAI's own generator (``og.Generator``,
  its session options overlaid to the same threads; spinning is GenAI's own default), when
  ``onnxruntime_genai`` imports.
  It is a benchmark-only peer, never a dependency of the product: run this script from an
  environment that has it (``pip install onnxruntime-genai onnx_ir`` beside the project's
  requirements) or the GenAI runtime rows are skipped.

Also: perplexity of every fused / GenAI graph on both texts (``--ppl-windows``, 512-token windows of
the Shakespeare evaluation split and of the standard library's docstrings), greedy tokens against
PyTorch's (fused) and against the fused dense graph's (GenAI), and an ONNX Runtime op profile of
``--profile-steps`` decode steps of the fused dense graph and each GenAI graph (kernel time by op
type; the share outside MatMul / MatMulNBits / Gemm).

    python benchmarks/fused_decode.py --plain build/quantized --native --genai fp32=/path/to/genai-fp32
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import ROOT, markdown_table, write_result  # noqa: E402

log = logging.getLogger("fused_decode")

MATMUL_OPS = {"MatMul", "MatMulNBits", "Gemm", "FusedMatMul", "FusedGemm"}


def matmul_weight_bytes(graph) -> int:
    """Bytes of the initializers that ``graph``'s (an ONNX GraphProto, loaded without external data)
    matrix products read (MatMul, Gemm, MatMulNBits and their fused forms: weights, scales, zero points) —
    what a decode step streams from memory; an embedding that only a ``Gather`` reads counts one row per
    token, i.e. nothing here. A tied LM head (``Gemm`` on the embedding) counts once."""
    from onnx import helper

    inits = {t.name: t for t in graph.initializer}
    used = {i for n in graph.node if n.op_type in MATMUL_OPS for i in n.input if i in inits}
    return sum(int(np.prod(inits[i].dims, dtype=np.int64)) * helper.tensor_dtype_to_np_dtype(inits[i].data_type).itemsize for i in used)


def genai_layout(genai_dir: Path):
    from engines.fused_graph import FusedLayout

    cfg = json.loads((genai_dir / "genai_config.json").read_text(encoding="utf-8"))["model"]
    d = cfg["decoder"]
    return FusedLayout(int(d["num_hidden_layers"]), (int(d["num_key_value_heads"]),) * int(d["num_hidden_layers"]), int(d["head_size"]), int(cfg["vocab_size"]), int(cfg["context_length"]))


def og_runner(genai_dir: Path, threads: int):
    """ONNX Runtime GenAI's generator on ``genai_dir`` with the given threads, or None when it does not import."""
    try:
        import onnxruntime_genai as og
    except ImportError:
        return None
    config = og.Config(str(genai_dir))
    # threads as ours; spinning stays GenAI's own choice (its config has no key for it): a spinning pool
    # after its call can only slow the runner that follows it, never GenAI itself
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    return og, og.Model(config)


def og_generate(og_model, prompt: np.ndarray, new: int) -> dict:
    og, model = og_model
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=int(prompt.shape[1] + new), do_sample=False)
    gen = og.Generator(model, params)
    t0 = time.perf_counter()
    gen.append_tokens(prompt.astype(np.int32))
    prefill_ms = (time.perf_counter() - t0) * 1e3
    steps, tokens = [], []
    for _ in range(new):
        t0 = time.perf_counter()
        gen.generate_next_token()
        steps.append((time.perf_counter() - t0) * 1e3)
        tokens.append(int(gen.get_next_tokens()[0]))
    # the first call selects from the prompt's logits (computed by append_tokens); the other new − 1 each run the model once
    return {"decode_ms_per_token": sum(steps) / (new - 1), "prefill_ms": prefill_ms, "tokens": tokens, "first_call_ms": steps[0]}


def op_profile(model_dir: Path, graph: str, layout, prompt: np.ndarray, steps: int, threads: int, spinning: bool = False) -> dict:
    """Kernel time by op type over ``steps`` decode steps: a profiled run of prefill + steps, minus a
    profiled run of the prefill alone."""
    import onnxruntime as ort

    from engines.onnxruntime_fused import OnnxRuntimeFusedRunner

    def profile(n_new: int) -> dict[str, float]:
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        so.enable_profiling = True
        with tempfile.TemporaryDirectory() as tmp:
            so.profile_file_prefix = str(Path(tmp) / "p")
            with OnnxRuntimeFusedRunner(model_dir, so, graph=graph, layout=layout) as r:
                r.generate(prompt, n_new)
                path = r.session.end_profiling()
            events = json.loads(Path(path).read_text(encoding="utf-8"))
        out: dict[str, float] = {}
        for e in events:
            if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
                op = e.get("args", {}).get("op_name", "?")
                out[op] = out.get(op, 0.0) + e["dur"] / 1e3
        return out

    base, full = profile(1), profile(steps + 1)
    per = {op: (full.get(op, 0.0) - base.get(op, 0.0)) / steps for op in full}
    total = sum(per.values())
    non_mm = sum(v for op, v in per.items() if op not in MATMUL_OPS)
    return {
        "steps": steps,
        "kernel_ms_per_step": round(total, 3),
        "non_matmul_ms_per_step": round(non_mm, 3),
        "non_matmul_share": round(non_mm / total, 4),
        "by_op_ms_per_step": {op: round(v, 4) for op, v in sorted(per.items(), key=lambda kv: -kv[1])},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=None, help="dense model directory (default: the bundled SmolLM2's fp32 cache entry)")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=DIR", help="another saved model directory to build a fused graph of (repeatable)")
    ap.add_argument("--plain", type=Path, default=None, help="a build directory whose dense/kv graphs are the project's plain ONNX Runtime decode")
    ap.add_argument("--native", action="store_true", help="also time native-cpu on the dense model")
    ap.add_argument("--genai", action="append", default=[], metavar="NAME=DIR", help="an ONNX Runtime GenAI builder output directory (repeatable)")
    ap.add_argument("--spinning", action="store_true", help="also time the dense fused, plain and GenAI graphs with intra-op spinning on (GenAI's runtime spins)")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ppl-windows", type=int, default=20, help="512-token windows per text for perplexity (0: skip)")
    ap.add_argument("--profile-steps", type=int, default=32)
    ap.add_argument("--work", type=Path, default=ROOT / "build" / "fused-decode", help="where the fused graphs are written (git-ignored)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "fused_decode.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", datefmt="%H:%M:%S")

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from calibrate.data import evaluation_windows, load_splits, stdlib_text, tokenize
    from core.adapters import adapter_for
    from core.models import cached_fp32_dir, resolve_source
    from engines.onnxruntime_fused import OnnxRuntimeFusedEngine, OnnxRuntimeFusedRunner
    from export.kv_export import GreedyResult, cache_layout, compare_with_generate, greedy_generate
    from pipeline.validate import perplexity, round_robin, runner_outputs_fn

    dense_dir = args.model or cached_fp32_dir(resolve_source("smollm2-135m"))
    models = {"dense": Path(dense_dir)}
    for spec in args.variant:
        name, _, d = spec.partition("=")
        models[name] = Path(d)
    genai = {}
    for spec in args.genai:
        name, _, d = spec.partition("=")
        genai[name] = Path(d)
    tok = AutoTokenizer.from_pretrained(str(dense_dir))
    prompt = np.asarray(tokenize(tok, load_splits("shakespeare").evaluation)[: args.prompt], np.int64)[None]
    engine = OnnxRuntimeFusedEngine({"threads": args.threads})
    result: dict = {
        "prompt_tokens": int(prompt.shape[1]), "new_tokens": args.new, "threads": args.threads, "repeats": args.repeats,
        "models": {k: str(v) for k, v in models.items()}, "genai_dirs": {k: str(v) for k, v in genai.items()},
        "spinning": "off for every ONNX Runtime session (they alternate in one process) except the '+spin' rows; GenAI's runtime uses its own default",
        "fused": {}, "genai": {},
    }
    import onnx

    arts = {}
    for name, d in models.items():
        out = args.work / name
        out.mkdir(parents=True, exist_ok=True)
        arts[name] = engine.build(d, out)
        info = arts[name].info
        graph = onnx.load(str(arts[name].path), load_external_data=False).graph
        result["fused"][name] = {"matmul_weight_bytes": matmul_weight_bytes(graph), "nodes": info["nodes"], "op_counts": info["op_counts"], "bytes": info["bytes"], **({"quantization": info["quantization"]} if "quantization" in info else {})}
    for name, d in genai.items():
        g = onnx.load(str(d / "model.onnx"), load_external_data=False).graph
        counts: dict[str, int] = {}
        for n in g.node:
            counts[n.op_type] = counts.get(n.op_type, 0) + 1
        size = sum(p.stat().st_size for p in d.glob("model.onnx*"))
        result["genai"][name] = {"matmul_weight_bytes": matmul_weight_bytes(g), "nodes": len(g.node), "op_counts": dict(sorted(counts.items())), "bytes": size}

    with ExitStack() as stack:
        runners: dict = {}
        for name in models:
            runners[f"onnxruntime-fused:{name}"] = ("gen", stack.enter_context(engine.runner(arts[name], threads=args.threads)))
        if args.spinning:
            runners["onnxruntime-fused+spin:dense"] = ("gen", stack.enter_context(engine.runner(arts["dense"], threads=args.threads, spinning=True)))
        for name, d in genai.items():
            r = OnnxRuntimeFusedRunner(d, engine._session_options(args.threads), name=f"genai-graph:{name}", graph="model.onnx", layout=genai_layout(d))
            runners[f"genai-graph:{name}"] = ("gen", stack.enter_context(r))
            if args.spinning and name == "fp32":
                r = OnnxRuntimeFusedRunner(d, engine._session_options(args.threads, True), name="genai-graph+spin:fp32", graph="model.onnx", layout=genai_layout(d))
                runners["genai-graph+spin:fp32"] = ("gen", stack.enter_context(r))
            og_model = og_runner(d, args.threads)
            if og_model is not None:
                runners[f"genai:{name}"] = ("og", og_model)
        plain_layout = None
        if args.plain is not None:
            from engines.onnxruntime import OnnxRuntimeCpuEngine

            ort_engine = OnnxRuntimeCpuEngine({"threads": args.threads})
            kv = args.plain / "dense" / "kv"
            pre = stack.enter_context(ort_engine.open(kv / "prefill.onnx", spinning=False, name="ort:prefill"))
            dec = stack.enter_context(ort_engine.open(kv / "decode.onnx", spinning=False, name="ort:decode"))
            m = AutoModelForCausalLM.from_pretrained(str(dense_dir), dtype=torch.float32).eval()
            plain_layout = cache_layout(m, adapter_for(AutoConfig.from_pretrained(str(dense_dir))))
            del m
            runners["onnxruntime-cpu:dense"] = ("plain", (pre, dec))
            if args.spinning:
                runners["onnxruntime-cpu+spin:dense"] = ("plain", (
                    stack.enter_context(ort_engine.open(kv / "prefill.onnx", spinning=True, name="ort:prefill+spin")),
                    stack.enter_context(ort_engine.open(kv / "decode.onnx", spinning=True, name="ort:decode+spin")),
                ))
        if args.native:
            from engines.native_cpu import NativeCpuEngine

            native = NativeCpuEngine({"threads": args.threads})
            nd = args.work / "native-dense"
            nd.mkdir(parents=True, exist_ok=True)
            runners["native-cpu:dense"] = ("gen", stack.enter_context(native.runner(native.build(dense_dir, nd), threads=args.threads)))

        def run(key: str) -> dict:
            kind, r = runners[key]
            if kind == "plain":
                g = greedy_generate(*r, plain_layout, prompt, args.new)
            elif kind == "og":
                o = og_generate(r, prompt, args.new)
                return {"decode_ms_per_token": o["decode_ms_per_token"], "prefill_ms": o["prefill_ms"]}
            else:
                g = r.generate(prompt, args.new)
            return {"decode_ms_per_token": statistics.mean(g.decode_ms), "prefill_ms": g.prefill_ms}

        # greedy tokens: fused against PyTorch, GenAI against the fused dense graph and its own fp32 row
        checks: dict = {}
        fused_dense_tokens = runners["onnxruntime-fused:dense"][1].generate(prompt, 64).tokens
        for key, (kind, r) in runners.items():
            if kind == "plain":
                continue
            if kind == "og":
                toks = np.asarray(og_generate(r, prompt, 64)["tokens"], np.int64)[None]
            else:
                g = r.generate(prompt, 64)
                toks = g.tokens
                if key.startswith("onnxruntime-fused:"):
                    model = AutoModelForCausalLM.from_pretrained(str(models[key.split(":", 1)[1]]), dtype=torch.float32).eval()
                    cmp = compare_with_generate(GreedyResult(g.tokens, g.logits, g.prefill_ms, g.decode_ms), model, prompt)
                    cmp.pop("max_abs_logit_delta_per_step")
                    checks.setdefault(key, {})["vs_pytorch"] = cmp
                    del model
            same = toks[0] == fused_dense_tokens[0]
            checks.setdefault(key, {})["leading_tokens_equal_fused_dense"] = int(same.argmin()) if not same.all() else int(same.size)
        result["greedy_64"] = checks
        log.info("greedy checks: %s", {k: v.get("leading_tokens_equal_fused_dense") for k, v in checks.items()})

        for key in runners:  # warm-up
            run(key)
        from engines import native as native_lib

        bandwidth = [native_lib.copy_bandwidth()]  # the roofline: the machine's copy bandwidth before and after the timed rounds
        samples = round_robin(list(runners), args.repeats, run)
        bandwidth.append(native_lib.copy_bandwidth())
        result["copy_bandwidth_gb_s"] = {"before": round(bandwidth[0] / 1e9, 2), "after": round(bandwidth[1] / 1e9, 2)}

        if args.ppl_windows:
            texts = {
                "shakespeare": evaluation_windows(tokenize(tok, load_splits("shakespeare").evaluation), 512, args.ppl_windows),
                "stdlib-docstrings": evaluation_windows(tokenize(tok, stdlib_text()), 512, args.ppl_windows),
            }
            ppl: dict = {}
            for key, (kind, r) in runners.items():
                if kind != "gen" or key.startswith("native"):
                    continue
                fn = runner_outputs_fn(r, "logits")
                ppl[key] = {t: round(perplexity(fn, w, f"{key} {t}")["perplexity"], 4) for t, w in texts.items()}
            result["perplexity"] = {"windows": args.ppl_windows, "length": 512, "runners": ppl}

    if args.profile_steps:
        lay = arts["dense"]
        from engines.fused_graph import GRAPH, read_layout

        prof = {}
        for spin in (False, True) if args.spinning else (False,):
            tag = "+spin" if spin else ""
            prof[f"onnxruntime-fused{tag}:dense"] = op_profile(Path(lay.path).parent, GRAPH, read_layout(Path(lay.path).parent), prompt, args.profile_steps, args.threads, spin)
            for name, d in genai.items():
                prof[f"genai-graph{tag}:{name}"] = op_profile(d, "model.onnx", genai_layout(d), prompt, args.profile_steps, args.threads, spin)
        result["op_profile"] = prof

    med = {k: {m: statistics.median(x) for m, x in s.items()} for k, s in samples.items()}
    dense_keys = [k for k in med if k.endswith(":dense") and "+spin" not in k]  # the baseline at the protocol's setting (spinning off)
    fastest = min(dense_keys, key=lambda k: med[k]["decode_ms_per_token"])
    result["fastest_dense_decode"] = {"runner": fastest, "ms_per_token": round(med[fastest]["decode_ms_per_token"], 3)}
    rows = []
    result["runners"] = {}
    for key, smp in samples.items():
        d = smp["decode_ms_per_token"]
        entry = {
            "decode_ms_per_token": round(med[key]["decode_ms_per_token"], 3),
            "decode_ms_range": [round(min(d), 3), round(max(d), 3)],
            "prefill_ms": round(med[key]["prefill_ms"], 2),
            "speedup_vs_fastest_dense": round(med[fastest]["decode_ms_per_token"] / med[key]["decode_ms_per_token"], 4),
            "samples": smp,
        }
        for ref in ("onnxruntime-cpu:dense", "onnxruntime-fused:dense", "genai:fp32", "genai-graph:fp32"):
            if ref in med and ref != key:
                entry[f"speedup_vs_{ref}"] = round(med[ref]["decode_ms_per_token"] / med[key]["decode_ms_per_token"], 4)
                entry[f"prefill_speedup_vs_{ref}"] = round(med[ref]["prefill_ms"] / med[key]["prefill_ms"], 4)
        kind, _, name = key.partition(":")
        graphs = result["fused"] if kind.startswith("onnxruntime-fused") else result["genai"] if kind.startswith("genai") else {}
        wbytes = graphs.get(name, {}).get("matmul_weight_bytes")
        if wbytes:  # weight bytes read per decode step / its time, against the copy bandwidth of the same run
            gbs = wbytes / med[key]["decode_ms_per_token"] / 1e6
            entry["roofline"] = {"matmul_weight_bytes": wbytes, "weight_read_gb_s": round(gbs, 2),
                                 "fraction_of_copy_bandwidth": round(gbs / max(result["copy_bandwidth_gb_s"].values()), 3)}
        result["runners"][key] = entry
        p = result.get("perplexity", {}).get("runners", {}).get(key, {})
        rows.append([
            key, f"{entry['decode_ms_per_token']:.2f} [{entry['decode_ms_range'][0]:.2f}–{entry['decode_ms_range'][1]:.2f}]", f"{entry['prefill_ms']:.1f}",
            f"×{entry['speedup_vs_fastest_dense']:.2f}", f"×{entry['speedup_vs_genai:fp32']:.2f}" if "speedup_vs_genai:fp32" in entry else "—",
            f"{p['shakespeare']:.2f} / {p['stdlib-docstrings']:.2f}" if p else "—",
            f"{entry['roofline']['weight_read_gb_s']:.1f} ({entry['roofline']['fraction_of_copy_bandwidth']:.2f})" if "roofline" in entry else "—",
        ])
    write_result(args.out, result)
    print(markdown_table(["runner", "ms/token [min–max]", "prefill ms", "speed-up vs fastest dense", "vs GenAI fp32 (own runtime)", "ppl Shakespeare / docstrings", "weight GB/s (of copy)"], rows))
    for k, pr in result.get("op_profile", {}).items():
        print(f"{k}: {pr['kernel_ms_per_step']} ms kernel time per decode step, {pr['non_matmul_ms_per_step']} ms ({100 * pr['non_matmul_share']:.1f} %) outside MatMul")
    print(f"copy bandwidth {result['copy_bandwidth_gb_s']} GB/s")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
