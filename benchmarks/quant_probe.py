"""How far ONNX Runtime's quantized MatMul kernels move SmolLM2's logits from the same dequantized
weights run in fp32 by PyTorch: the measurement behind the rewrite's choice of ``MatMulNBits`` for
8-bit weights (not ``DynamicQuantizeMatMul``) and behind the parity tolerance at ``accuracy_level`` 4.

For each scheme the dense model's block linears are quantized by RTN (the ``quantize`` pass), the
model exported (torchscript) and rewritten; then, on 2 × 64 tokens of the evaluation text, the
engine's logits are compared with PyTorch's on the same dequantized weights: max and 99.9th
percentile of |Δ|, and top-1 agreement. ``dynamic-int8`` is the graph ONNX Runtime's own
``quantize_dynamic`` makes of per-channel INT8 weights (``DynamicQuantizeMatMul``: activations
quantized per tensor at run time), built here by hand on the same codes. Accuracy only: nothing
is timed.

    python benchmarks/quant_probe.py
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import ROOT, markdown_table, write_result  # noqa: E402

SCHEMES = {
    "matmulnbits-int8-l4": {"bits": 8, "block_size": 32, "accuracy_level": 4},
    "matmulnbits-int4-l4": {"bits": 4, "block_size": 32, "accuracy_level": 4},
    "matmulnbits-int4-l0": {"bits": 4, "block_size": 32, "accuracy_level": 0},
}


def dynamic_int8(src: Path, dst: Path, weights: set[str]) -> None:
    """Every ``<w>.T`` MatMul of ``weights`` (on a per-channel INT8 grid already) as DynamicQuantizeMatMul."""
    import onnx
    from onnx import helper, numpy_helper

    proto = onnx.load(str(src))
    g = proto.graph
    inits = {t.name: t for t in g.initializer}
    nodes, new = [], []
    for n in g.node:
        base = n.input[1][:-2] if n.op_type == "MatMul" and n.input[1].endswith(".T") and n.input[1] in inits else None
        if base is not None and base not in weights and base.startswith("model."):
            base = base[len("model."):]
        if base not in weights:
            nodes.append(n)
            continue
        w_t = numpy_helper.to_array(inits[n.input[1]])  # [in, out] on the grid: the codes below are exact
        scale = np.abs(w_t).max(axis=0) / 127.0
        scale[scale == 0] = 1.0
        q = np.clip(np.rint(w_t / scale), -127, 127).astype(np.int8)
        tag = n.input[1][:-2]
        new += [numpy_helper.from_array(q, f"{tag}.i8"), numpy_helper.from_array(scale.astype(np.float32), f"{tag}.s"),
                numpy_helper.from_array(np.zeros(q.shape[1], np.int8), f"{tag}.z")]
        nodes.append(helper.make_node("DynamicQuantizeMatMul", [n.input[0], f"{tag}.i8", f"{tag}.s", f"{tag}.z"], list(n.output), domain="com.microsoft"))
    del g.node[:]
    g.node.extend(nodes)
    g.initializer.extend(new)
    proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    onnx.save(proto, str(dst))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "quant_probe.json")
    args = ap.parse_args()

    import onnxruntime as ort
    import torch

    from calibrate.data import load_splits, tokenize
    from core.models import cached_fp32_dir, load_hf_dir, resolve_source
    from export.onnx_export import export_onnx
    from export.quant_graph import rewrite_quantized
    from passes import PassContext, get_pass_class

    model, tok, adapter = load_hf_dir(cached_fp32_dir(resolve_source("smollm2-135m")))
    ids = torch.as_tensor(tokenize(tok, load_splits("shakespeare").evaluation)[:128]).reshape(2, 64)
    cls = get_pass_class("quantize")
    runs = {**SCHEMES, "dynamic-int8": {}}
    out: dict = {"model": "smollm2-135m", "tokens": list(ids.shape), "schemes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, opts in runs.items():
            m = copy.deepcopy(model)
            if name == "dynamic-int8":
                with torch.no_grad():  # its reference: the per-channel INT8 weights it runs
                    for ref in adapter.linears(m):
                        w = ref.weight_out_in()
                        s = w.abs().amax(dim=1, keepdim=True) / 127.0
                        s[s == 0] = 1.0
                        w.copy_(torch.round(w / s).clamp(-127, 127) * s)
                export_onnx(m, "causal-lm", Path(tmp) / "m.onnx", 18, "torchscript")
                dynamic_int8(Path(tmp) / "m.onnx", Path(tmp) / "q.onnx", {f"{r.name}.weight" for r in adapter.linears(m)})
            else:
                cls(cls.config_class(**opts)).run(m, PassContext(adapter, progress=False))
                export_onnx(m, "causal-lm", Path(tmp) / "m.onnx", 18, "torchscript")
                rewrite_quantized(Path(tmp) / "m.onnx", Path(tmp) / "q.onnx", m.config.weight_quantization, m.quantization_tensors)
            so = ort.SessionOptions()
            so.intra_op_num_threads = 2
            sess = ort.InferenceSession(str(Path(tmp) / "q.onnx"), so, providers=["CPUExecutionProvider"])
            y = sess.run(["logits"], {"input_ids": ids.numpy(), "attention_mask": np.ones(tuple(ids.shape), np.int64)})[0]
            with torch.no_grad():
                r = m(ids).logits.numpy()
            d = np.abs(y - r)
            out["schemes"][name] = {
                "options": opts if name != "dynamic-int8" else "per-channel symmetric INT8 weights, DynamicQuantizeMatMul",
                "max_abs_logit_delta": float(d.max()), "p999_abs_logit_delta": float(np.quantile(d, 0.999)),
                "max_abs_logit": float(np.abs(r).max()), "top1_agreement": float((y.argmax(-1) == r.argmax(-1)).mean()),
            }
    write_result(args.out, out)
    print(markdown_table(["scheme", "max abs Δlogit", "p99.9 abs Δlogit", "top-1 agreement"],
                         [[k, f"{v['max_abs_logit_delta']:.4g}", f"{v['p999_abs_logit_delta']:.4g}", f"{v['top1_agreement']:.3f}"] for k, v in out["schemes"].items()]))


if __name__ == "__main__":
    main()
