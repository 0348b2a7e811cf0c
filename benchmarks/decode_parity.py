"""KV-cache decode on the bundled SmolLM2: ONNX Runtime prefill+decode vs PyTorch generate.

For the dense model and a magnitude 2:4 variant: export prefill/decode graphs
(the variant's rebound into the dense graphs), generate greedily with ONNX
Runtime, and compare with ``model.generate`` (same prompt, same number of new
tokens): tokens must be identical, per-step max |Δlogit| is reported. Then
decode latency (ms/token, batch 1, ``--new`` tokens after a ``--prompt``-token
prompt) and prefill latency, dense and variant interleaved (ABAB…) in one process.

    python benchmarks/decode_parity.py [--tokens 32] [--prompt 128] [--new 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import write_result  # noqa: E402

from calibrate.data import shakespeare_splits, tokenize  # noqa: E402
from engines.onnxruntime import OnnxRuntimeCpuEngine  # noqa: E402
from export.kv_export import cache_layout, compare_with_generate, decode_timing, export_kv_graphs, greedy_generate  # noqa: E402
from pipeline.validate import round_robin  # noqa: E402
from export.onnx_export import rebind_weights  # noqa: E402
from passes import PassContext  # noqa: E402
from passes.magnitude import MagnitudeConfig, MagnitudePass  # noqa: E402
from core.models import load_model  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=32, help="greedy tokens compared with PyTorch generate")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=64, help="new tokens per latency run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "decode_parity.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    loaded = load_model("smollm2-135m")
    dense = loaded.model
    variant = copy.deepcopy(dense)
    MagnitudePass(MagnitudeConfig(pattern="2:4")).run(variant, PassContext(loaded.adapter))
    lay = cache_layout(dense, loaded.adapter)
    prompt = tokenize(loaded.tokenizer, shakespeare_splits().evaluation)[: args.prompt][None].numpy()
    results: dict = {"model": "smollm2-135m", "prompt_tokens": args.prompt, "variants": {}}
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "dense"
        v = Path(tmp) / "magnitude-2of4"
        d.mkdir()
        v.mkdir()
        results["export"] = export_kv_graphs(dense, loaded.adapter, d)
        required = [f"{r.name}.weight" for r in loaded.adapter.linears(variant)]
        for g in ("prefill", "decode"):
            rebind_weights(d / f"{g}.onnx", variant, required, v / f"{g}.onnx", dense=dense)
        runners = {}
        ort_cpu = OnnxRuntimeCpuEngine({})
        for name, path, model in (("dense", d, dense), ("magnitude-2of4", v, variant)):
            pre = ort_cpu.open(path / "prefill.onnx", spinning=False)
            dec = ort_cpu.open(path / "decode.onnx", spinning=False)
            pre.activate()
            dec.activate()
            runners[name] = (pre, dec)
            res = greedy_generate(pre, dec, lay, prompt, args.tokens)
            cmp = compare_with_generate(res, model, prompt)
            results["variants"][name] = cmp | {"text": loaded.tokenizer.decode(res.tokens[0])}
            logging.info("%s: tokens identical %s, worst per-step max |Δlogit| %.2e", name, cmp["tokens_identical"], cmp["max_abs_logit_delta"])
        # latency: dense and variant alternate, decode ms/token over --new tokens and prefill ms
        for n in runners:  # warm-up
            greedy_generate(*runners[n], lay, prompt, 4)
        lat = round_robin(list(runners), args.repeats, lambda n: decode_timing(*runners[n], lay, prompt, args.new))
        for n, L in lat.items():
            results["variants"][n]["decode_ms_per_token_median"] = round(statistics.median(L["decode_ms_per_token"]), 3)
            results["variants"][n]["prefill_ms_median"] = round(statistics.median(L["prefill_ms"]), 3)
            results["variants"][n]["samples"] = L
        dv, vv = results["variants"]["dense"], results["variants"]["magnitude-2of4"]
        results["decode_ratio"] = round(vv["decode_ms_per_token_median"] / dv["decode_ms_per_token_median"], 4)
        results["prefill_ratio"] = round(vv["prefill_ms_median"] / dv["prefill_ms_median"], 4)
        for pre, dec in runners.values():
            pre.deactivate()
            dec.deactivate()
    results["latency_setup"] = {"batch": 1, "prompt": args.prompt, "new_tokens": args.new, "repeats": args.repeats, "order": "alternating"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_result(args.out, results)
    for n, r in results["variants"].items():
        print(f"{n:16} tokens identical: {r['tokens_identical']}  worst |Δlogit|: {r['max_abs_logit_delta']:.2e}  "
              f"decode {r['decode_ms_per_token_median']:.1f} ms/token  prefill {r['prefill_ms_median']:.1f} ms")
    print(f"variant/dense: decode ×{results['decode_ratio']}, prefill ×{results['prefill_ratio']}  → {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
