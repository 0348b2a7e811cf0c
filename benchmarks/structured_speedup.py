"""Measured vs ideal speedup of structurally pruned variants, ONNX Runtime CPU, interleaved in one run.

Reads a finished build (``python -m pipeline build structured``): each variant's PyTorch model
(for its per-layer shapes), its full-sequence ONNX graph and, for causal LMs, its KV-cache
prefill/decode graphs. Then, in one process with every session open and the order rotating
each repeat:

- prefill: batch ``--batch`` × ``--length`` tokens through the full-sequence graph;
- decode (causal LMs): a ``--prompt``-token prompt, then ``--new`` greedy tokens, ms per token.

Ideal speedup = whole-model FLOPs of dense / of the variant at the same shape
(``pipeline.flops``: all block linears, attention scores over the full key length, the output head).
For decode the FLOPs are summed over the measured steps (context grows by one each step).

    python benchmarks/structured_speedup.py build/structured --variants ffn50-kv1 --repeats 10
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import write_result  # noqa: E402

from engines.onnxruntime import OnnxRuntimeCpuEngine  # noqa: E402
from export.kv_export import cache_layout, compare_with_generate, decode_timing, export_kv_graphs, greedy_generate  # noqa: E402
from pipeline.validate import round_robin  # noqa: E402
from pipeline.flops import FlopsModel  # noqa: E402
from core.models import count_parameters, load_hf_dir  # noqa: E402

log = logging.getLogger("structured_speedup")


def kv_graphs(build: Path, name: str, model, adapter) -> Path:
    """The variant's KV-cache graphs: the build's ``kv`` stage when it has one, else exported here once
    (into ``<variant>/kv-bench/``, keyed by the model stage's key) and checked against PyTorch ``generate``."""
    stage = build / name / "kv"
    if (stage / "decode.onnx").is_file():
        return stage
    out = build / name / "kv-bench"
    source = json.loads((build / name / "model" / "stage.json").read_text())["key"]
    made_from = out / "model_stage_key"
    if not (out / "decode.onnx").is_file() or not made_from.is_file() or made_from.read_text() != source:
        out.mkdir(parents=True, exist_ok=True)
        export_kv_graphs(model, adapter, out)
        made_from.write_text(source)  # re-exported whenever the variant's model stage is rebuilt
        prompt = np.random.default_rng(1).integers(3, int(model.config.vocab_size), (1, 32)).astype(np.int64)
        eng = OnnxRuntimeCpuEngine({})
        with eng.open(out / "prefill.onnx") as pre, eng.open(out / "decode.onnx") as dec:
            cmp = compare_with_generate(greedy_generate(pre, dec, cache_layout(model, adapter), prompt, 16), model, prompt)
        cmp.pop("max_abs_logit_delta_per_step")
        (out / "parity.json").write_text(json.dumps(cmp, indent=2), encoding="utf-8")
        log.info("%s: KV graphs exported; 16 greedy tokens identical to generate: %s (max |Δlogit| %.2e)", name, cmp["tokens_identical"], cmp["max_abs_logit_delta"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("build", type=Path)
    ap.add_argument("--variants", nargs="+", required=True)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    names = ["dense", *args.variants]
    models, adapter = {}, None
    for n in names:
        d = args.build / n / "model" / "model"
        if not d.is_dir():
            raise SystemExit(f"{d} is not a finished model stage; run the build first")
        models[n], _, adapter = load_hf_dir(d)
    causal = adapter.task == "causal-lm"
    flops = {n: FlopsModel.of(m, adapter) for n, m in models.items()}
    vocab = int(models["dense"].config.vocab_size)
    rng = np.random.default_rng(0)
    ids = rng.integers(3, vocab, (args.batch, args.length)).astype(np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    prompt = rng.integers(3, vocab, (1, args.prompt)).astype(np.int64)
    eng = OnnxRuntimeCpuEngine({})
    with ExitStack() as stack:
        full, kv = {}, {}
        for n in names:
            full[n] = stack.enter_context(eng.open(args.build / n / "onnx" / "model.onnx", args.threads, spinning=False, name=n))
            if causal:
                k = kv_graphs(args.build, n, models[n], adapter)
                kv[n] = (
                    stack.enter_context(eng.open(k / "prefill.onnx", args.threads, spinning=False, name=f"{n}:prefill")),
                    stack.enter_context(eng.open(k / "decode.onnx", args.threads, spinning=False, name=f"{n}:decode")),
                    cache_layout(models[n], adapter),
                )
        for n in names:  # warm-up
            full[n].infer(feeds)
            if causal:
                greedy_generate(kv[n][0], kv[n][1], kv[n][2], prompt, 4)
        def run(n: str) -> dict[str, float]:
            t = time.perf_counter()
            full[n].infer(feeds)
            out = {"prefill_ms": (time.perf_counter() - t) * 1e3}
            if causal:
                out["decode_ms_per_token"] = decode_timing(*kv[n], prompt, args.new)["decode_ms_per_token"]
            return out

        samples = round_robin(names, args.repeats, run)

    def decode_flops(f: FlopsModel) -> float:
        # steps 1..new-1 each add one token to a context of prompt + step tokens
        return sum(f.forward(1, 1, args.prompt + s)["total"] for s in range(1, args.new))

    base = {m: statistics.median(v) for m, v in samples["dense"].items() if v}
    out = {
        "build": str(args.build),
        "prefill_shape": [args.batch, args.length],
        "decode": {"prompt": args.prompt, "new_tokens": args.new} if causal else None,
        "repeats": args.repeats,
        "runtime": "onnxruntime-cpu",
        "flops_counted": "block linears + attention scores (QK^T, PV over the full key length) + output head",
        "variants": {},
    }
    for n in names:
        med = {m: statistics.median(v) for m, v in samples[n].items() if v}
        parity_file = args.build / n / "kv-bench" / "parity.json"
        row = {
            "kv_decode_parity": json.loads(parity_file.read_text()) if parity_file.is_file() else "from the build's decode stage",
            "parameters": count_parameters(models[n]),
            "layers": [s.to_dict() for s in flops[n].layers],
            "prefill_flops": flops[n].forward(args.batch, args.length),
            "prefill_ms": round(med["prefill_ms"], 2),
            "samples": samples[n],
        }
        if n != "dense":
            ideal = flops["dense"].forward(args.batch, args.length)["total"] / row["prefill_flops"]["total"]
            got = base["prefill_ms"] / med["prefill_ms"]
            row.update({"prefill_speedup": round(got, 4), "prefill_ideal": round(ideal, 4), "prefill_fraction_of_ideal": round(got / ideal, 4)})
        if causal:
            row["decode_ms_per_token"] = round(med["decode_ms_per_token"], 3)
            if n != "dense":
                ideal = decode_flops(flops["dense"]) / decode_flops(flops[n])
                got = base["decode_ms_per_token"] / med["decode_ms_per_token"]
                row.update({"decode_speedup": round(got, 4), "decode_ideal": round(ideal, 4), "decode_fraction_of_ideal": round(got / ideal, 4)})
        out["variants"][n] = row
    dst = args.out or Path(__file__).parent / "results" / f"structured_speedup_{args.build.name}.json"
    write_result(dst, out)
    print(f"{'variant':<16}{'params':>12}{'prefill ms':>12}{'speedup':>9}{'ideal':>8}{'frac':>7}{'decode ms':>11}{'speedup':>9}{'ideal':>8}{'frac':>7}")
    for n, r in out["variants"].items():
        print(
            f"{n:<16}{r['parameters']:>12,}{r['prefill_ms']:>12.1f}{r.get('prefill_speedup', 1):>9.3f}{r.get('prefill_ideal', 1):>8.3f}{r.get('prefill_fraction_of_ideal', 1):>7.3f}"
            + (f"{r['decode_ms_per_token']:>11.2f}{r.get('decode_speedup', 1):>9.3f}{r.get('decode_ideal', 1):>8.3f}{r.get('decode_fraction_of_ideal', 1):>7.3f}" if causal else "")
        )
    print(f"written to {dst}")


if __name__ == "__main__":
    main()
