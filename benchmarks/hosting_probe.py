"""Why the sparse kernels are hosted by the project's own native-cpu engine (docs/native.md):
measures the two hosts the issue proposed besides a header-built ONNX Runtime custom op.

1. ONNX Runtime Python custom ops (onnxruntime-extensions ``PyOp``; install it in the benchmark's
   environment only: ``pip install onnxruntime-extensions``): the cost of one call of an identity op,
   and of one call whose second input is a 100 MB weight (does ORT hand the buffer over, or copy it?).
2. PyTorch eager as the host: Hugging Face SmolLM2 decode ms/token against ONNX Runtime's KV-cache
   graphs of the same model (from a finished build with ``export.kv_cache: true``), interleaved.

    python benchmarks/hosting_probe.py --build build/sparse-cpu
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import ROOT, write_result  # noqa: E402


def pyop_costs(threads: int) -> dict:
    try:
        from onnxruntime_extensions import PyCustomOpDef, get_library_path, onnx_op
    except ImportError:
        return {"skipped": "onnxruntime-extensions is not installed in this environment"}
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    seen: dict = {}

    @onnx_op(op_type="ProbeIdentity", inputs=[PyCustomOpDef.dt_float], outputs=[PyCustomOpDef.dt_float])
    def _identity(x):
        return x

    @onnx_op(op_type="ProbeWeight", inputs=[PyCustomOpDef.dt_float, PyCustomOpDef.dt_float], outputs=[PyCustomOpDef.dt_float])
    def _weight(x, w):
        seen["owns_data"] = bool(w.flags.owndata)
        return x

    def session(nodes, inits, out):
        g = helper.make_graph(nodes, "probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 576])],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, [1, 576])], inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.contrib", 1)])
        so = ort.SessionOptions()
        so.register_custom_ops_library(get_library_path())
        so.intra_op_num_threads = threads
        return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])

    x = np.random.default_rng(0).standard_normal((1, 576)).astype(np.float32)
    chain = [helper.make_node("ProbeIdentity", ["x" if i == 0 else f"y{i - 1}"], [f"y{i}"], domain="ai.onnx.contrib") for i in range(200)]
    s1 = session(chain, [], "y199")
    w = np.random.default_rng(1).standard_normal(25_000_000).astype(np.float32)
    s2 = session([helper.make_node("ProbeWeight", ["x", "w"], ["y"], domain="ai.onnx.contrib")], [numpy_helper.from_array(w, "w")], "y")
    for s in (s1, s2):
        s.run(None, {"x": x})
    t0 = time.perf_counter()
    for _ in range(20):
        s1.run(None, {"x": x})
    identity_us = (time.perf_counter() - t0) / 20 / 200 * 1e6
    t0 = time.perf_counter()
    for _ in range(20):
        s2.run(None, {"x": x})
    weight_ms = (time.perf_counter() - t0) / 20 * 1e3
    return {"identity_call_us": round(identity_us, 2), "call_with_100MB_weight_input_ms": round(weight_ms, 2),
            "weight_input_is_a_copy": seen.get("owns_data"), "output_path": "onnxruntime_extensions._ocos: rv.flatten().tolist() per call"}


def torch_host(build: Path, threads: int, repeats: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from core.adapters import adapter_for
    from engines.onnxruntime import OnnxRuntimeCpuEngine
    from export.kv_export import cache_layout, decode_timing
    from pipeline.validate import round_robin

    torch.set_num_threads(threads)
    md = build / "dense" / "model" / "model"
    model = AutoModelForCausalLM.from_pretrained(str(md), dtype=torch.float32).eval()
    layout = cache_layout(model, adapter_for(model.config))
    prompt = np.random.default_rng(0).integers(0, model.config.vocab_size, (1, 128)).astype(np.int64)
    ort = OnnxRuntimeCpuEngine({"threads": threads})
    pre = ort.open(build / "dense" / "kv" / "prefill.onnx", spinning=False).__enter__()
    dec = ort.open(build / "dense" / "kv" / "decode.onnx", spinning=False).__enter__()

    @torch.inference_mode()
    def hf(new: int = 64) -> dict:
        out = model(input_ids=torch.from_numpy(prompt), use_cache=True)
        past, nxt, times = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True), []
        for _ in range(new - 1):
            t0 = time.perf_counter()
            out = model(input_ids=nxt, past_key_values=past, use_cache=True)
            times.append((time.perf_counter() - t0) * 1e3)
            past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        return {"decode_ms_per_token": statistics.mean(times)}

    runs = {"onnxruntime-cpu": lambda: {"decode_ms_per_token": decode_timing(pre, dec, layout, prompt, 64)["decode_ms_per_token"]}, "pytorch-eager": hf}
    for f in runs.values():
        f()
    samples = round_robin(list(runs), repeats, lambda n: runs[n]())
    med = {n: statistics.median(s["decode_ms_per_token"]) for n, s in samples.items()}
    return {"decode_ms_per_token": {n: round(v, 2) for n, v in med.items()},
            "pytorch_speed_vs_onnxruntime": round(med["onnxruntime-cpu"] / med["pytorch-eager"], 3), "samples": samples}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--build", type=Path, required=True, help="a finished build with KV-cache graphs")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "hosting_probe.json")
    args = ap.parse_args()
    result = {"threads": args.threads, "pyop": pyop_costs(args.threads), "pytorch_host": torch_host(args.build, args.threads, args.repeats)}
    write_result(args.out, result)
    print({k: v for k, v in result["pyop"].items()}, result["pytorch_host"]["decode_ms_per_token"], result["pytorch_host"]["pytorch_speed_vs_onnxruntime"])


if __name__ == "__main__":
    main()
