"""Throughput of the native kernels alone, per storage (dense / 2:4 / 50 % bitmask) and value type
(fp32, int8, int8 weights × int8 activations; dense int4, 2:4 int4), on SmolLM2-shaped weights, batch-1 (one row of x).

Two settings, each kind timed in the same run, the kinds interleaved round-robin (the starting kind
rotates per repeat):

* ``stream``: ``--layers`` decoder layers of distinct random weights (q/k/v stacked 1536×576, o
  576×576, gate/up stacked 3072×576, down 576×1536), one GEMV each, back to back — a decode step's
  block linears, read from memory; reported with the bytes read per step and the GB/s reached, against
  this machine's copy bandwidth measured in the same run;
* ``cached``: one 768×576 weight called repeatedly — the kernel's compute speed (weights in cache).

Weights are random (a quarter of each row's blocks of 32 scaled up, so int8 scales differ), pruned to
2:4 (magnitude) or 50 % (random), and quantized by ``core.quant.rtn`` (INT8, a scale per 32 inputs) for the int8 kinds.

    python benchmarks/kernel_throughput.py --repeats 7
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import ROOT, markdown_table, write_result  # noqa: E402

SHAPES = [(1536, 576), (576, 576), (3072, 576), (576, 1536)]
KINDS = ["dense", "dense-int4", "dense-int4-f32grid", "dense-int4x", "dense-int8", "dense-int8-f", "dense-int8x", "2:4", "2:4-int8", "2:4-int4", "2:4-int4-f", "2:4-int4-b64", "2:4-int4-b64-f", "2:4-int4-b128", "2:4-int4-b128-f", "2:4-int4x", "2:4-int4-b64x", "2:4-int4-b128x", "50", "50-int8", "50-int4", "50-int4-f", "50-int4-b64", "70-int4-b64", "70-int4-b128", "70-int4-b128-f",
         "int4-act0", "int4-act10", "int4-act30", "int4-act50", "int4-act30c", "int4-act50c", "int4-act30-f32grid", "int4-act0x", "int4-act30x", "int4-act50x"]
"""``-int8``: int8 values (dense ones, blocks of 32: 16-bit activations by the VNNI kernel where the CPU has it,
else fp32; sparse ones: fp32 activations); ``-int8x``: int8 activations too (AVX-512 VNNI, or AVX2); ``-int4``:
the int4 format (4-bit codes, a scale and an offset per 32 inputs: weights on a Q4_1 grid, whose fp16
scales and minima the kernel reads as fp16); ``-int4-f32grid``: the same with the grid read as float32; ``-int4x``: the
same with int8 activations (AVX-512 VNNI, or AVX2 on that path); ``int4-actNN``: the same dense 4-bit weights stored input-major
for activation sparsity (:class:`engines.native.InputMajorInt4Weight`, its grid as fp16), NN % of each x's
entries zero (random positions) and skipped — by the 16-bit kernel on AVX-512 VNNI, else the float one;
``int4-actNNc``: the same share of zeros in whole blocks of 32 inputs (random blocks: the bytes a skip could
save if zeros clustered; real activations do not); ``int4-actNN-f32grid``: the same with the grid as float32;
``int4-actNNx``: the same with int8 activations (the AVX2 path: pairs of active inputs by vpmaddubsw);
``2:4-int4`` / ``2:4-int4-b64`` / ``2:4-int4-b128``: magnitude 2:4, 4-bit RTN in blocks of 32 / 64 / 128, ``2:4-int4`` (by the 16-bit
kernel where the CPU has AVX-512 VNNI + VBMI, ``engines.native.twofour_int4_int16``);
``2:4-int4x`` / ``2:4-int4-b64x`` / ``2:4-int4-b128x``: the same weights with int8 activations (the AVX2 path only: the
nibble layout and ``vpshufb``, twofour_int4_int8x_avx2.cpp);
``50-int4`` / ``50-int4-b64`` / ``70-int4-b64`` / ``70-int4-b128``: 50 % / 70 % random zeros, 4-bit RTN in blocks of 32 / 64 / 128, ``bitmask-int4`` (by the
16-bit kernel where the CPU has AVX-512 VNNI + VBMI2, ``engines.native.bitmask_int4_int16``); ``-f``: the same
weights by the float kernel (``engines.native.int16_activations`` switched off while that kind is timed)."""


class ActivationSparse:
    """An input-major 4-bit weight with its own x, NN % of whose entries are zero (the kernel reads the
    rows of the others): ``gemv_into`` multiplies that x whatever x it is handed, so the kind is timed
    on the same loop as the others; ``nbytes`` counts what it reads (the active rows' codes and the
    scales and offsets of the blocks with an active input)."""

    def __init__(self, w, zero_share: float, rng: np.random.Generator, whole_blocks: bool = False):
        from engines import native

        self.w, self.n, self.k = w, w.n, w.k
        self.x = rng.standard_normal(w.k).astype(np.float32)
        if whole_blocks:
            self.x[np.repeat(rng.permutation(w.k // 32) < round(zero_share * (w.k // 32)), 32)] = 0.0
        else:
            self.x[rng.random(w.k) < zero_share] = 0.0
        self.nbytes = w.bytes_read(self.x != 0)
        self._call = native.lib().pk_gemv_int4_x
        self._args = (*w._args, self.x.ctypes.data, 0.0)

    def gemv_into(self, _x_ptr: int, _m: int, y_ptr: int) -> None:
        self._call(*self._args, y_ptr)


def make_weight(kind: str, n: int, k: int, rng: np.random.Generator):
    import torch

    from core.quant import QuantScheme, rtn
    from core.sparse_format import compress
    from engines import native

    kind = kind.removesuffix("-f")  # (the same weights; the float kernel is a switch while timing)

    w = rng.standard_normal((n, k)).astype(np.float32)
    w *= np.repeat(np.where(rng.random((n, -(-k // 32))) < 0.25, 4.0, 1.0), 32, axis=1)[:, :k].astype(np.float32)
    fmt = "dense"
    if kind.startswith("2:4"):
        g = w.reshape(n, k // 4, 4)
        np.put_along_axis(g, np.argsort(np.abs(g), -1)[..., :2], 0.0, -1)
        w, fmt = g.reshape(n, k), "2:4"
    elif kind[:2] in ("50", "70"):  # unstructured: that share of random zeros
        w[rng.random((n, k)) < int(kind[:2]) / 100] = 0.0
        fmt = "bitmask"
    if "int4" in kind and fmt != "dense":  # the quantize pass's 4-bit RTN (zeros stay zero), stored as 2:4-int4 / bitmask-int4
        block = int(kind.rsplit("-b", 1)[1].rstrip("x")) if "-b" in kind else 32
        deq, scales, zeros = rtn(torch.from_numpy(w), QuantScheme(4, block))
        deq = np.where(w == 0, np.float32(0), deq.numpy())
        return native.NativeWeight(compress(deq, f"{fmt}-int4", grid=(scales.numpy(), zeros.numpy(), block)), int8_activations=kind.endswith("x"))
    if kind.startswith("int4-act"):  # the int4 weight below, input-major, its x NN % zeros
        c = make_weight("dense-int4", n, k, rng).compressed()
        share = int(kind[len("int4-act"):].split("-")[0].rstrip("xc")) / 100
        return ActivationSparse(native.InputMajorInt4Weight([c], half_grid=not kind.endswith("f32grid"), int8_activations=kind.endswith("x")), share, rng,
                                whole_blocks=kind.endswith("c"))
    if "int4" in kind:  # the weights put on a Q4_1 grid (fp16 scale and minimum per 32), stored as int4
        b = w.reshape(n, k // 32, 32)
        lo, hi = b.min(-1, keepdims=True), b.max(-1, keepdims=True)
        d, m = ((hi - lo) / 15).astype(np.float16).astype(np.float32), lo.astype(np.float16).astype(np.float32)
        q = np.clip(np.rint((b - m) / np.where(d > 0, d, 1)), 0, 15)
        return native.NativeWeight(compress((q * d + m).astype(np.float32).reshape(n, k), "int4"), int8_activations=kind.endswith("x"),
                                   half_grid=not kind.endswith("f32grid"))
    if "int8" not in kind:
        return native.NativeWeight(compress(w, fmt))
    deq, scales, _ = rtn(torch.from_numpy(w), QuantScheme(8, 32))  # the quantize pass's own INT8 (zeros stay zero)
    return native.NativeWeight(compress(deq.numpy(), fmt, grid=(scales.numpy(), 32)), int8_activations=kind.endswith("x"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--isa", default=None, help="force an instruction set no better than the CPU's (scalar, avx2+fma, avx512f): "
                    "the AVX2 path's speed on an AVX-512 machine, not an AVX2-only machine's")
    ap.add_argument("--kinds", default="", help="comma-separated kinds to time (default: all; 'dense' is always timed, the ratios' base)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "kernel_throughput.json")
    args = ap.parse_args()
    chosen = [k for k in args.kinds.split(",") if k]
    unknown = [k for k in chosen if k not in KINDS]
    if unknown:
        ap.error(f"--kinds: {', '.join(unknown)} not among {', '.join(KINDS)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from engines import native

    native.set_threads(args.threads)
    if args.isa:
        native.set_isa(args.isa)
    def runs_here(kind: str) -> bool:  # the int8-activation kinds: int4 and int8 on AVX-512 VNNI or AVX2, input-major int4 and 2:4-int4 on AVX2
        if not kind.endswith("x"):
            return True
        if kind.startswith("2:4"):
            return native.isa() == "avx2+fma"
        if kind.startswith("int4-act"):
            return native.isa() != "avx512f"
        return native.int4_int8_activations() if "int4" in kind else native.int8_activations()

    kinds = [k for k in KINDS if (not chosen or k == "dense" or k in chosen) and runs_here(k)]
    rng = np.random.default_rng(0)
    stream = {kind: [make_weight(kind, n, k, rng) for _ in range(args.layers) for n, k in SHAPES] for kind in kinds}
    cached = {kind: make_weight(kind, 768, 576, rng) for kind in kinds}
    xs = {k: rng.standard_normal((1, k)).astype(np.float32) for k in {576, 1536}}
    y = {n: np.empty((1, n), np.float32) for n in {n for n, _ in SHAPES} | {768}}

    def step(ws: list) -> float:
        t0 = time.perf_counter()
        for w in ws:
            w.gemv_into(xs[w.k].ctypes.data, 1, y[w.n].ctypes.data)
        return time.perf_counter() - t0

    samples: dict[str, dict[str, list[float]]] = {k: {"stream_ms": [], "cached_us": []} for k in kinds}
    int16 = native.int16_activations()
    for kind in kinds:  # warm-up
        native.int16_activations(int16 and not kind.endswith("-f"))
        step(stream[kind])
        step([cached[kind]] * 200)
    for rep in range(args.repeats):
        order = kinds[rep % len(kinds):] + kinds[: rep % len(kinds)]
        for kind in order:
            native.int16_activations(int16 and not kind.endswith("-f"))
            samples[kind]["stream_ms"].append(step(stream[kind]) * 1e3)
            samples[kind]["cached_us"].append(step([cached[kind]] * 500) / 500 * 1e6)
    native.int16_activations(int16)
    bw = native.copy_bandwidth()
    result: dict = {"threads": args.threads, "layers": args.layers, "repeats": args.repeats, "isa": native.isa(),
                    "int8_activations": native.int8_activations(), "input_major_int16_kernel": native.int16_activations(), "bitmask_int4_int16_kernel": native.bitmask_int4_int16(), "twofour_int4_int16_kernel": native.twofour_int4_int16(), "copy_bandwidth_gb_s": round(bw / 1e9, 2), "shapes": SHAPES, "kinds": {}}
    weights = args.layers * sum(n * k for n, k in SHAPES)
    dense_ms = statistics.median(samples["dense"]["stream_ms"])
    rows = []
    for kind in kinds:
        s_ms = statistics.median(samples[kind]["stream_ms"])
        c_us = statistics.median(samples[kind]["cached_us"])
        nbytes = sum(w.nbytes for w in stream[kind])
        entry = {
            "stream_ms": round(s_ms, 3), "stream_ms_range": [round(min(samples[kind]["stream_ms"]), 3), round(max(samples[kind]["stream_ms"]), 3)],
            "stream_speedup_vs_dense_fp32": round(dense_ms / s_ms, 3), "bytes_per_step": int(nbytes),
            "stream_gb_s": round(nbytes / s_ms / 1e6, 2), "fraction_of_copy_bandwidth": round(nbytes / s_ms / 1e6 / (bw / 1e9), 3),
            "stream_dense_weights_per_s_g": round(weights / s_ms / 1e6, 2),
            "cached_us": round(c_us, 2), "cached_dense_weights_per_s_g": round(768 * 576 / c_us / 1e3, 2),
            "samples": samples[kind],
        }
        result["kinds"][kind] = entry
        rows.append([kind, f"{s_ms:.2f}", f"×{entry['stream_speedup_vs_dense_fp32']:.2f}", f"{nbytes / 1e6:.1f}", f"{entry['stream_gb_s']:.1f}",
                     f"{entry['fraction_of_copy_bandwidth']:.2f}", f"{entry['cached_dense_weights_per_s_g']:.1f}"])
    write_result(args.out, result)
    print(markdown_table(["kind", "step ms (stream)", "vs dense fp32", "MB read", "GB/s", "of copy bw", "G weights/s (cached)"], rows))
    print(f"copy bandwidth {result['copy_bandwidth_gb_s']} GB/s; {result['isa']}; int8 activations: {result['int8_activations']}; wrote {args.out}")


if __name__ == "__main__":
    main()
