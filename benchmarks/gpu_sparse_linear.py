"""Dense vs 2:4 semi-structured Linear layers on a CUDA GPU (cuSPARSELt/CUTLASS via PyTorch).

Times ``F.linear`` with a dense fp16 weight and with the same weight pruned 2:4
and converted by ``torch.sparse.to_sparse_semi_structured``, interleaved
(dense, sparse, dense, …) with CUDA events, for SmolLM2-135M's Linear shapes
and a Llama-7B MLP shape (4096×11008 and 11008×4096), at token counts
1, 16, 128, 512, 2048, 8192. Then end-to-end prefill of SmolLM2 (bundled
weights) dense vs magnitude 2:4 with its Linears converted. Weights of the
layer-level rows are random (latency only, labelled so); the end-to-end rows use
the real model. Results go to ``benchmarks/results/gpu_sparse_linear-<gpu>.json``.

    python benchmarks/gpu_sparse_linear.py [--repeats 50] [--dtype float16]
"""

from __future__ import annotations

import argparse
import copy
import re
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import write_result  # noqa: E402

SMOLLM2_SHAPES = {  # (out_features, in_features)
    "smollm2 q/o 576x576": (576, 576),
    "smollm2 k/v 192x576": (192, 576),
    "smollm2 gate/up 1536x576": (1536, 576),
    "smollm2 down 576x1536": (576, 1536),
}
LLAMA7B_SHAPES = {"llama-7b up 11008x4096": (11008, 4096), "llama-7b down 4096x11008": (4096, 11008)}
TOKENS = (1, 16, 128, 512, 2048, 8192)


def prune_2of4(w: torch.Tensor) -> torch.Tensor:
    from core.masks import nm_mask

    return w * nm_mask(w.abs().float(), 2, 4).to(w.dtype)


def time_pair(fa, fb, repeats: int, warmup: int = 10) -> tuple[float, float]:
    for _ in range(warmup):
        fa()
        fb()
    ta, tb = [], []
    for r in range(repeats):
        for f, sink in ((fa, ta), (fb, tb)) if r % 2 == 0 else ((fb, tb), (fa, ta)):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            f()
            end.record()
            torch.cuda.synchronize()
            sink.append(start.elapsed_time(end))
    return statistics.median(ta), statistics.median(tb)


def layer_rows(dtype: torch.dtype, repeats: int) -> list[dict]:
    from torch.sparse import to_sparse_semi_structured

    rows = []
    g = torch.Generator(device="cuda").manual_seed(0)
    for label, (out_f, in_f) in {**SMOLLM2_SHAPES, **LLAMA7B_SHAPES}.items():
        w = prune_2of4(torch.randn(out_f, in_f, device="cuda", dtype=dtype, generator=g))
        ws = to_sparse_semi_structured(w)
        for t in TOKENS:
            x = torch.randn(t, in_f, device="cuda", dtype=dtype, generator=g)
            try:
                torch.testing.assert_close(F.linear(x, ws), F.linear(x, w), rtol=2e-2, atol=2e-2)
                d, s = time_pair(lambda: F.linear(x, w), lambda: F.linear(x, ws), repeats)
                rows.append({"layer": label, "weights": "random (latency only)", "tokens": t, "dense_ms": d, "sparse_ms": s, "speedup": d / s})
            except (RuntimeError, AssertionError) as exc:  # a shape the sparse kernels reject is recorded, not hidden
                rows.append({"layer": label, "tokens": t, "error": str(exc).splitlines()[0]})
            print(rows[-1], flush=True)
    return rows


def e2e_rows(dtype: torch.dtype, repeats: int) -> list[dict]:
    from engines.torch_cuda import convert_2of4_linears
    from passes import PassContext
    from passes.magnitude import MagnitudeConfig, MagnitudePass
    from core.models import load_model

    loaded = load_model("smollm2-135m")
    dense = loaded.model.to("cuda", dtype).eval()
    sparse = copy.deepcopy(loaded.model)
    MagnitudePass(MagnitudeConfig(pattern="2:4")).run(sparse, PassContext(loaded.adapter))
    sparse = sparse.to("cuda", dtype).eval()
    converted = convert_2of4_linears(sparse, loaded.adapter)
    rows = []
    for b, s in [(1, 128), (1, 512), (4, 512), (16, 512), (8, 2048)]:
        ids = torch.randint(0, 49152, (b, s), device="cuda")
        with torch.inference_mode():
            d, sp = time_pair(lambda: dense(input_ids=ids, use_cache=False), lambda: sparse(input_ids=ids, use_cache=False), repeats)
        rows.append({"model": "smollm2-135m prefill", "batch": b, "sequence": s, "dense_ms": d, "sparse_ms": sp, "speedup": d / sp, "sparse_linears": len(converted)})
        print(rows[-1], flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16")
    ap.add_argument("--skip-e2e", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU is visible: this benchmark measures 2:4 sparse tensor cores and cannot run here", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    gpu = torch.cuda.get_device_name(0)
    result = {"gpu": gpu, "torch": torch.__version__, "dtype": args.dtype, "repeats": args.repeats, "timing": "CUDA events, medians, dense/sparse interleaved"}
    result["layers"] = layer_rows(dtype, args.repeats)
    if not args.skip_e2e:
        result["end_to_end"] = e2e_rows(dtype, max(5, args.repeats // 5))
    out = Path(__file__).parent / "results" / f"gpu_sparse_linear-{re.sub(r'[^A-Za-z0-9]+', '-', gpu).strip('-')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_result(out, result)
    print(f"→ {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
