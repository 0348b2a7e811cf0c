"""The project's native sparse kernels (C++17, ``engines/native/src``), loaded through ctypes.

``scripts/install.sh`` compiles them with the system compiler (``engines/native/build.sh``) into
``engines/native/lib/libprune_kernels.so``; the library picks AVX-512F, AVX2+FMA or its scalar
reference at run time. :func:`linear` computes ``y = x · Wᵀ`` from a
:class:`core.sparse_format.CompressedWeight`:

* up to :data:`GEMV_MAX_ROWS` rows of ``x`` (decode): the sparse kernel, which reads only the kept
  values and a bit per weight;
* more rows (prefill): the weight is decompressed a tile of :data:`TILE_ROWS` output rows at a time
  into one buffer shared by every weight (:func:`tile_buffer`) and multiplied by ONNX Runtime's GEMM,
  so no second dense copy of the model exists.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from pathlib import Path

import numpy as np

from core.errors import EngineUnavailable
from core.sparse_format import INT4_FORMATS, CompressedWeight, compress, exact_half, int4_offset_key, two_four_int4_codes, two_four_offsets

log = logging.getLogger(__name__)

LIB_PATH = Path(__file__).resolve().parent / "lib" / "libprune_kernels.so"
ISA_NAMES = {0: "scalar", 1: "avx2+fma", 2: "avx512f"}
GEMV_MAX_ROWS = 8
"""Rows of x up to which the sparse kernel runs (it reads the weight once per 4 rows)."""
TILE_ROWS = 4096
"""Output rows decompressed per tile on the prefill path, into the one shared buffer of at most
4096 × K floats (SmolLM2's largest tile, gate/up's 3072 × 576: 7 MB). The 128-token prefill of the
bundled model took 273 / 236 / 216 / 213 / 202 ms with 256 / 512 / 1024 / 2048 / 4096 rows (ad-hoc
interleaved rounds on a 2-core Xeon, not kept): fewer, larger GEMM calls."""

_lib = None
_lock = threading.Lock()
_f32 = ctypes.POINTER(ctypes.c_float)
_i64 = ctypes.c_int64


def _ptr(a: np.ndarray, ctype=ctypes.c_float):
    return a.ctypes.data_as(ctypes.POINTER(ctype))


def lib() -> ctypes.CDLL:
    """The loaded library; :class:`EngineUnavailable` naming the fix when it was not built."""
    global _lib
    with _lock:
        if _lib is None:
            if not LIB_PATH.is_file():
                raise EngineUnavailable(
                    "onnxruntime-sparse",
                    f"the native sparse kernels are not built ({LIB_PATH} is missing): run scripts/install.sh, "
                    "which compiles them with the system C++17 compiler (g++ or clang++)",
                )
            L = ctypes.CDLL(str(LIB_PATH))
            L.pk_best_isa.restype = ctypes.c_int
            L.pk_isa.restype = ctypes.c_int
            L.pk_set_isa.restype = ctypes.c_int
            L.pk_set_isa.argtypes = [ctypes.c_int]
            L.pk_threads.restype = ctypes.c_int
            L.pk_set_threads.argtypes = [ctypes.c_int]
            L.pk_set_spin_us.argtypes = [ctypes.c_int]
            vp = ctypes.c_void_p
            L.pk_gemv.argtypes = [_i64, _i64, vp, vp, vp, vp, _i64, vp, vp, vp, _i64, vp]
            L.pk_int8_activations.restype = ctypes.c_int
            L.pk_int8_activations.argtypes = [ctypes.c_int]
            L.pk_int4_int8_activations.restype = ctypes.c_int
            L.pk_int4_int8_activations.argtypes = [_i64, ctypes.c_int]
            L.pk_int16_activations.restype = ctypes.c_int
            L.pk_int16_activations.argtypes = [ctypes.c_int]
            L.pk_decompress.argtypes = [_i64, _i64, vp, vp, vp, vp, _i64, _i64, _i64, vp]
            L.pk_gemv_24.argtypes = [_i64, _i64, vp, vp, vp, _i64, vp, _i64, vp]
            L.pk_decompress_24.argtypes = [_i64, _i64, vp, vp, vp, _i64, _i64, _i64, vp]
            L.pk_gemv_24_int4.argtypes = [_i64, _i64, vp, vp, vp, vp, _i64, _i64, _i64, vp, vp, vp, _i64, vp]
            L.pk_decompress_24_int4.argtypes = [_i64, _i64, vp, vp, vp, vp, _i64, _i64, _i64, _i64, _i64, vp]
            L.pk_gemv_bitmask_int4.argtypes = [_i64, _i64, vp, vp, vp, vp, vp, _i64, vp, vp, _i64, vp]
            L.pk_bitmask_int4_int16.restype = ctypes.c_int
            L.pk_bitmask_int4_int16.argtypes = [_i64]
            L.pk_twofour_int4_int16.restype = ctypes.c_int
            L.pk_twofour_int4_int16.argtypes = [_i64]
            L.pk_x16_kernels.restype = ctypes.c_int
            L.pk_decompress_bitmask_int4.argtypes = [_i64, _i64, vp, vp, vp, vp, vp, _i64, _i64, _i64, vp]
            L.pk_gemv_int4.argtypes = [_i64, _i64, vp, vp, vp, ctypes.c_int, _i64, ctypes.c_int, vp, _i64, vp]
            L.pk_decompress_int4.argtypes = [_i64, _i64, vp, vp, vp, ctypes.c_int, _i64, _i64, _i64, vp]
            L.pk_prefill_attention.argtypes = [_i64, _i64, _i64, _i64, vp, vp, vp, vp, vp, vp, vp, _i64, vp]
            L.pk_gemv_int4_rows.argtypes = [_i64, vp, vp, vp, ctypes.c_int, _i64, vp, _i64, ctypes.c_int, vp, vp]
            L.pk_gemv_sparse_x.argtypes = [_i64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, _i64, ctypes.c_void_p]
            L.pk_gemv_int4_x.restype = _i64
            L.pk_gemv_int4_x.argtypes = [_i64, _i64, vp, _i64, ctypes.c_int, vp, ctypes.c_double, vp]
            L.pk_decompress_int4_x.argtypes = [_i64, _i64, vp, _i64, ctypes.c_int, _i64, _i64, vp]
            L.pk_round_int8_blocks.argtypes = [vp, _i64, _i64, vp, vp]
            L.pk_topk_threshold.restype = ctypes.c_double
            L.pk_topk_threshold.argtypes = [vp, _i64, _i64]
            L.pk_decode_layers.restype = ctypes.c_int
            L.pk_decode_layers.argtypes = [_i64, ctypes.c_void_p, _i64, ctypes.c_void_p, _i64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_float,
                                           ctypes.POINTER(_i64), ctypes.POINTER(_i64)]
            L.pk_copy_bandwidth.restype = ctypes.c_double
            L.pk_copy_bandwidth.argtypes = [_i64, ctypes.c_int]
            _lib = L
            log.debug("native kernels loaded: %s, %d threads", ISA_NAMES[L.pk_isa()], L.pk_threads())
    return _lib


def available() -> bool:
    try:
        lib()
        return True
    except EngineUnavailable:
        return False


def isa() -> str:
    return ISA_NAMES[lib().pk_isa()]


def best_isa() -> str:
    return ISA_NAMES[lib().pk_best_isa()]


def topk_threshold(x: np.ndarray, keep: int) -> float:
    """The decode step's top-k threshold of a float32 vector: its (keep+1)-th largest |x| (-1.0 when
    keep >= its length). Needs AVX2, as the decode step does."""
    x = np.ascontiguousarray(x, np.float32).reshape(-1)
    if best_isa() == "scalar":
        raise RuntimeError("native.topk_threshold: this CPU lacks AVX2 + FMA")
    return float(lib().pk_topk_threshold(x.ctypes.data, x.size, int(keep)))


def set_isa(name: str) -> None:
    """Force an instruction set (tests compare every path with the scalar reference)."""
    code = {v: k for k, v in ISA_NAMES.items()}.get(name)
    if code is None or lib().pk_set_isa(code) < 0:
        raise ValueError(f"instruction set '{name}' is not available here (best: {best_isa()}; known: {', '.join(ISA_NAMES.values())})")


def int8_activations(on: bool | None = None) -> bool:
    """Whether dense int8 weights of an ``accuracy_level`` 4 model (or with the ``int8_activations``
    option) run with int8 activations on the chosen instruction set (x quantized per block of 32 at run
    time, as ONNX Runtime's MatMulNBits does): AVX-512 on a CPU with VNNI, or AVX2; False otherwise (for
    ``int4`` weights see :func:`int4_int8_activations`). ``on`` switches the use of int8 activations by
    every kernel (tests compare both paths)."""
    return bool(lib().pk_int8_activations(-1 if on is None else int(bool(on))))


def int16_activations(on: bool | None = None) -> bool:
    """Whether input-major 4-bit weights (activation sparsity) multiply 16-bit activations by the AVX-512
    VNNI kernel (``int4_x_vnni_avx512.cpp``: each active input rounded to 1/32639 of its block's largest
    |x|) instead of the float kernel, and so do dense int8 weights in blocks of 32 with K % 64 == 0 (a
    Q8_0 LM head, INT8 linears: ``vnni_avx512.cpp``, each input rounded to 1/32639 of the row's largest
    |x|): False on a CPU without VNNI or when another instruction set is forced. ``on`` switches it
    (tests and benchmarks compare both); the sparse 4-bit formats' 16-bit kernels follow it too."""
    return bool(lib().pk_int16_activations(-1 if on is None else int(bool(on)))) and isa() == "avx512f"


def bitmask_int4_int16(block: int = 64) -> bool:
    """Whether ``bitmask-int4`` weights with grid blocks of ``block`` inputs multiply 16-bit activations
    (``bitmask_int4_vnni_avx512.cpp``: x rounded to 1/32639 of its largest |x|) instead of running the
    float kernel: a CPU with AVX-512 VNNI and VBMI2, AVX-512 chosen, :func:`int16_activations` on, and
    blocks of 32 or a multiple of 64 (the library's own rule, ``pk_bitmask_int4_int16``)."""
    return bool(lib().pk_bitmask_int4_int16(int(block)))


X16_BITMASK_INT4, X16_TWOFOUR_INT4, X16_DENSE_INT8 = 1, 2, 4
"""Bits of ``pk_x16_kernels()``: the CPU can run the 16-bit bitmask-int4 / 2:4-int4 / dense int8 kernel."""


def twofour_int4_int16(block: int = 64) -> bool:
    """Whether ``2:4-int4`` weights with grid blocks of ``block`` inputs multiply 16-bit activations
    (``twofour_int4_vnni_avx512.cpp``: x rounded to 1/32639 of its largest |x|) instead of running the
    float kernel: a CPU with AVX-512 VNNI and VBMI, AVX-512 chosen, :func:`int16_activations` on, and
    blocks of at most 512 inputs (the library's own rule, ``pk_twofour_int4_int16``)."""
    return bool(lib().pk_twofour_int4_int16(int(block)))


def int4_int8_activations(k: int = 64, half_grid: bool = False) -> bool:
    """Whether an ``int4`` weight of ``k`` inputs with the int8_activations option multiplies int8
    activations on the chosen instruction set: by the VNNI kernel on AVX-512 (float grids, k % 64 ==
    0) or by the AVX2 kernel (``int4_int8x_avx2.cpp``); else fp32 activations."""
    return bool(lib().pk_int4_int8_activations(int(k), int(bool(half_grid))))


def set_threads(n: int) -> None:
    if n < 1:
        raise ValueError(f"threads {n} must be >= 1")
    lib().pk_set_threads(int(n))


def threads() -> int:
    return int(lib().pk_threads())


def copy_bandwidth(nbytes: int = 256 << 20, reps: int = 5) -> float:
    """The machine's copy bandwidth with the kernels' threads: bytes read + written per second (best of reps)."""
    return float(lib().pk_copy_bandwidth(int(nbytes), int(reps)))


VALUE_PAD = 16
"""Values (floats or int8 codes) of zeros after the last kept value: the AVX-512 kernels load 16 at a time."""
BITMASK_INT4_PAD = 40
"""Bytes after a ``bitmask-int4`` weight's codes: a group's codes are read up to 40 bytes from its start (kernels.h)."""


def numpy_blas_threads(n: int | None) -> int | None:
    """Set the thread count of NumPy's bundled OpenBLAS (returns the previous count; None where it cannot
    be found). The native engine runs NumPy's small attention matmuls single-threaded: OpenBLAS's
    threads spin after each call and would steal the cores that ONNX Runtime's GEMM and the kernels
    use during prefill."""
    import glob

    libs = glob.glob(str(Path(np.__file__).resolve().parent.parent / "numpy.libs" / "libscipy_openblas*.so"))
    if not libs:
        return None
    try:
        blas = ctypes.CDLL(libs[0])
        get, set_ = blas.scipy_openblas_get_num_threads64_, blas.scipy_openblas_set_num_threads64_
    except (OSError, AttributeError):
        return None
    get.restype = ctypes.c_int
    previous = int(get())
    if n is not None:
        set_.argtypes = [ctypes.c_int]
        set_(int(n))
    return previous


class PkWeight(ctypes.Structure):
    """A layer's linear for the native decode step (``PkWeight`` in api.cpp)."""

    _fields_ = [("kind", _i64), ("N", _i64), ("K", _i64), ("a", ctypes.c_void_p), ("b", ctypes.c_void_p), ("c", ctypes.c_void_p), ("threshold", ctypes.c_double),
                ("scales", ctypes.c_void_p), ("block", _i64), ("corr", ctypes.c_void_p), ("d", ctypes.c_void_p), ("stride", _i64),
                ("keep", _i64), ("layout", _i64)]


class PkLayer(ctypes.Structure):
    """One decoder layer for the native decode step (``PkLayer`` in api.cpp)."""

    _fields_ = [
        ("heads", _i64), ("kv_heads", _i64), ("head_dim", _i64), ("ffn", _i64),
        ("attn_norm", ctypes.c_void_p), ("mlp_norm", ctypes.c_void_p), ("qkv_bias", ctypes.c_void_p),
        ("qkv", PkWeight), ("o", PkWeight), ("gate_up", PkWeight), ("down", PkWeight),
        ("k_cache", ctypes.c_void_p), ("v_cache", ctypes.c_void_p), ("capacity", _i64),
        ("gate_threshold", ctypes.c_double),
    ]


def pk_weight(w: "NativeWeight | InputMajorWeight | InputMajorInt4Weight", threshold: float | None = None, keep: int | None = None) -> PkWeight:
    """The decode step's view of a weight; an input-major one skips inputs with |x| ≤ ``threshold``, or,
    with ``keep``, all but each token's ``keep`` largest |x| (the top-k form)."""
    t = -1.0 if threshold is None else float(threshold)
    if isinstance(w, InputMajorInt4Weight):
        return PkWeight(7, w.n, w.k, w.data.ctypes.data, None, None, t, None, w.grid_flags, None, None, w.ld, int(keep or 0))
    if isinstance(w, InputMajorWeight):
        return PkWeight(2, w.n, w.k, w.wt.ctypes.data, None, None, t, None, 0, None, None, 0, int(keep or 0))
    if keep is not None or threshold is not None:
        raise ValueError("pk_weight: only an input-major weight skips inputs (threshold / keep)")
    if w.format == "int4":
        codes, scales, second, grid_flags, stride = w._args
        return PkWeight(4 if w.int8_activations else 3, w.n, w.k, codes, scales, second, -1.0, None, grid_flags, None, None, stride)
    if w.format == "2:4-int4":
        codes, positions, scales, zeros, block, stride, paired = w._args
        return PkWeight(5, w.n, w.k, codes, positions, zeros, -1.0, scales, block, w.row_sums_ptr(), w.nibbles_ptr(), stride, 0, paired)
    if w.format == "bitmask-int4":
        masks, codes, offsets, scales, zeros, block = w._args
        return PkWeight(6, w.n, w.k, masks, codes, offsets, -1.0, scales, block, w.row_sums_ptr(), zeros)
    if w.format == "2:4":
        return PkWeight(1, w.n, w.k, w.arrays["values"].ctypes.data, w.arrays["positions"].ctypes.data, None, -1.0, *w._q, None)
    return PkWeight(0, w.n, w.k, *w._args, -1.0, *w._q, w._corr, w.row_sums_ptr())


def decode_layers(layers: "ctypes.Array[PkLayer]", hidden: int, h: np.ndarray, pos: int, cos: np.ndarray, sin: np.ndarray, eps: float) -> tuple[int, int, int]:
    """One token through every layer in native code (h updated in place). Returns (status, inputs read,
    inputs total); status -1: this CPU lacks AVX2 + FMA, the caller runs its own path."""
    read, total = _i64(0), _i64(0)
    rc = lib().pk_decode_layers(len(layers), ctypes.addressof(layers), hidden, h.ctypes.data, pos, cos.ctypes.data, sin.ctypes.data, eps,
                                ctypes.byref(read), ctypes.byref(total))
    if rc == -2:
        raise ValueError(f"native decode step: position {pos} is beyond a layer's KV cache")
    return rc, read.value, total.value


def prefill_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, cos: np.ndarray, sin: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray,
                      heads: int, kv_heads: int) -> np.ndarray | None:
    """A prefill's causal attention in native code (``pk_prefill_attention``): q (T, heads · d) and k
    (T, kv_heads · d) rotated in place by the rotary rows cos/sin (T, d), k and v written into the caches
    (kv_heads, capacity, d) at positions 0..T-1; returns the attention output (T, heads · d), or None on
    a CPU without AVX2 + FMA (the caller runs its own path). Every array float32 and C-contiguous."""
    t, d = q.shape[0], k_cache.shape[2]
    for name, a in (("q", q), ("k", k), ("v", v), ("cos", cos), ("sin", sin), ("k_cache", k_cache), ("v_cache", v_cache)):
        if a.dtype != np.float32 or not a.flags.c_contiguous:
            raise ValueError(f"prefill_attention: {name} must be float32 and C-contiguous, got {a.dtype}{'' if a.flags.c_contiguous else ' (strided)'}")
    if q.shape != (t, heads * d) or k.shape != (t, kv_heads * d) or v.shape != k.shape or cos.shape != (t, d) or sin.shape != (t, d):
        raise ValueError(f"prefill_attention: shapes q {q.shape}, k {k.shape}, v {v.shape}, cos {cos.shape}, sin {sin.shape} do not fit "
                         f"{t} positions, {heads} heads, {kv_heads} KV heads of {d}")
    out = np.empty((t, heads * d), np.float32)
    rc = lib().pk_prefill_attention(t, heads, kv_heads, d, q.ctypes.data, k.ctypes.data, v.ctypes.data, cos.ctypes.data, sin.ctypes.data,
                                    k_cache.ctypes.data, v_cache.ctypes.data, k_cache.shape[1], out.ctypes.data)
    if rc == -2:
        raise ValueError(f"prefill_attention: {t} positions exceed the KV cache's {k_cache.shape[1]}")
    return out if rc == 0 else None


class DenseGemm:
    """``y = x · Wᵀ`` for dense float32 ``x`` (M, K) and ``W`` (N, K) by ONNX Runtime's MLAS GEMM, the
    fastest CPU GEMM this project has measured (≈ 400 GFLOP/s on 2 AVX-512 cores where NumPy's
    OpenBLAS gave ≈ 230 and PyTorch ≈ 200): the prefill path's dense tiles go through it. One
    session with both operands as inputs, so nothing is copied into it."""

    def __init__(self, threads: int, trans_b: bool = True):
        import onnx
        import onnxruntime as ort
        from onnx import TensorProto, helper

        node = helper.make_node("Gemm", ["x", "w"], ["y"], transB=int(trans_b))
        w_shape = ["n", "k"] if trans_b else ["k", "n"]
        graph = helper.make_graph(
            [node], "dense_gemm",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", "k"]), helper.make_tensor_value_info("w", TensorProto.FLOAT, w_shape)],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", "n"])],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.log_severity_level = 3
        self.threads = threads
        self.session = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        onnx.checker.check_model(model)

    def __call__(self, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        return self.session.run(None, {"x": np.ascontiguousarray(x, np.float32), "w": w})[0]


_gemms: dict[tuple[int, bool], DenseGemm] = {}


def dense_gemm(trans_b: bool = True) -> DenseGemm:
    """The process's DenseGemm (``x · Wᵀ`` for W (N, K), or ``x · W`` for W (K, N) when not ``trans_b``),
    with as many threads as the kernels."""
    key = (threads(), trans_b)
    if key not in _gemms:
        _gemms[key] = DenseGemm(*key)
    return _gemms[key]


_tiles = threading.local()


def int8_block_activations(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``x`` (M, K), K % 32 == 0, rounded as the int8-activation kernels round it — per row and block of
    32 inputs ``sx = max|x| / 127``, ``q = round(x / sx)`` in [−127, 127] — returned as floats ``q · sx``
    (M, K), with each block's ``Σx − Σ q · sx`` (M, K/32): the kernels multiply the offsets (the zero
    points' ``−zero · scale``) by the blocks' float sums of x, not of the rounded x. (One pass in C, ``pk_round_int8_blocks``, with
    the kernels' own rounding helper.)"""
    x = np.ascontiguousarray(x, np.float32)
    m, k = x.shape
    if k % 32:
        raise ValueError(f"int8_block_activations: {k} inputs are not a whole number of blocks of 32")
    xq = np.empty_like(x)
    d = np.empty((m, k // 32), np.float32)
    lib().pk_round_int8_blocks(x.ctypes.data, m, k, xq.ctypes.data, d.ctypes.data)
    return xq, d


def tile_buffer(floats: int) -> np.ndarray:
    """One float32 buffer of at least ``floats`` values for the calling thread, shared by every weight's
    prefill tiles (grown, never shrunk): each tile is multiplied before the next is decompressed into
    it, so the model holds one tile, not a decompressed copy of each weight, and the tile stays cached."""
    buf = getattr(_tiles, "buf", None)
    if buf is None or buf.size < floats:
        buf = _tiles.buf = np.empty(floats, np.float32)
    return buf


class InputMajorWeight:
    """A dense weight stored input-major (``Wᵀ``, K rows of N) for activation-sparse decoding: each
    non-zero input reads one contiguous row; the inputs that are zero are never read."""

    def __init__(self, w: np.ndarray):
        if w.ndim != 2:
            raise ValueError(f"input-major weight: shape {w.shape} is not 2-D (N outputs, K inputs)")
        self.n, self.k = w.shape
        self.wt = np.ascontiguousarray(w.T, np.float32)
        self.nbytes = int(self.wt.nbytes)

    def gemv_sparse(self, x: np.ndarray, threshold: float) -> tuple[np.ndarray, int]:
        """``x`` (1, K) → ((1, N), inputs read): inputs with |x| ≤ threshold are skipped."""
        idx = np.flatnonzero(np.abs(x[0]) > threshold).astype(np.int32)
        vals = np.ascontiguousarray(x[0, idx], np.float32)
        y = np.empty((1, self.n), np.float32)
        lib().pk_gemv_sparse_x(self.n, self.wt.ctypes.data, idx.ctypes.data, vals.ctypes.data, idx.size, y.ctypes.data)
        return y, int(idx.size)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Dense ``x`` (M, K) → (M, N) (prefill: every input)."""
        return dense_gemm(trans_b=False)(x, self.wt)


class InputMajorInt4Weight:
    """4-bit weights (the ``int4`` format's codes, scales and offsets or zero points) stored input-major
    for activation-sparse decoding: each active input reads its row of 4-bit codes (N/2 bytes), and a
    block of 32 inputs none of which is active is skipped with its scales — the 4-bit twin of
    :class:`InputMajorWeight`, an eighth of its code bytes. ``parts``: the ``int4`` weights stacked by
    output rows (q, k, v; gate, up), one grid form. Layout (one buffer, blocks of 32 inputs, each its
    rows of codes, line by line, then its scales and offsets): ``pk::Int4InputMajor`` (kernels.h). With ``half_grid``
    the scales and offsets are held as fp16 when every one of them is an fp16 number
    (:func:`core.sparse_format.exact_half`; GGUF Q4_1's are), exactly: 2 bytes each instead of 4."""

    @staticmethod
    def accepts(parts: "list[CompressedWeight | NativeWeight]") -> bool:
        """Whether ``parts`` can be held as one: all ``int4``, one grid form, one input width."""
        return (bool(parts) and all(p.format == "int4" for p in parts) and len({int4_offset_key(p.arrays) for p in parts}) == 1
                and len({int(p.k if isinstance(p, NativeWeight) else p.shape[1]) for p in parts}) == 1)

    def __init__(self, parts: "list[CompressedWeight]", half_grid: bool = True, int8_activations: bool = False):
        if not self.accepts(parts):
            raise ValueError(f"input-major int4 weight: parts of formats {[p.format for p in parts]}, grid forms "
                             f"{sorted({int4_offset_key(p.arrays) for p in parts if p.format == 'int4'})} and input widths "
                             f"{[p.shape[1] for p in parts]}: expected int4 parts of one grid form and one input width")
        second = int4_offset_key(parts[0].arrays)
        self.zero_point = second == "zeros"
        self.k = int(parts[0].shape[1])
        self.n = sum(int(p.shape[0]) for p in parts)
        n, k = self.n, self.k
        for p in parts:
            rows = int(p.shape[0])
            if k % 32 or any(np.shape(p.arrays[key]) != want for key, want in
                             (("values", (rows, k // 2)), ("scales", (rows, k // 32)), (second, (rows, k // 32)))):
                raise ValueError(f"input-major int4 weight: a ({rows}, {k}) part has codes {np.shape(p.arrays['values'])} / scales "
                                 f"{np.shape(p.arrays['scales'])} / {second} {np.shape(p.arrays[second])}; expected K % 32 == 0, "
                                 f"codes ({rows}, {k // 2}) and ({rows}, {k // 32}) per block")
        grids = {key: np.concatenate([np.asarray(p.arrays[key], np.float32) for p in parts]) for key in ("scales", second)}
        self.half_grid = bool(half_grid) and all(exact_half(g) for g in grids.values())
        gtype, gbytes = (np.float16, 4) if self.half_grid else (np.float32, 8)  # a block's scales: 2 · ld values, gbytes · ld bytes
        packed = np.concatenate([np.asarray(p.arrays["values"], np.uint8) for p in parts]).reshape(n, k // 32, 16)
        codes = np.concatenate([packed & 15, packed >> 4], axis=-1).reshape(n, k)  # (N, K), 0..15
        width = -(-n // 128) * 128  # outputs per stored row: a multiple of 128 (64 bytes of codes)
        self.ld = width // 2
        t = np.zeros((k, width), np.uint8)
        t[:, :n] = codes.T
        chunks = t.reshape(k, width // 32, 32)
        # one buffer, block by block of 32 inputs: their rows of codes, then the block's scales, then its
        # offsets (or zero points) — with every input active the weight is one sequential stream
        nb = k // 32
        block = (32 + 2 * gbytes) * self.ld
        self.data = np.zeros(nb * block + 64, np.uint8)
        blocks = self.data[: nb * block].reshape(nb, block)
        rows = (chunks[..., :16] | (chunks[..., 16:] << 4)).reshape(nb, 32, self.ld // 64, 64)  # (block, row, line, byte)
        blocks[:, : 32 * self.ld] = rows.transpose(0, 2, 1, 3).reshape(nb, 32 * self.ld)  # line by line: line j of every row, then j + 1
        for at, key in ((32 * self.ld, "scales"), ((32 + gbytes) * self.ld, second)):
            g = np.zeros((nb, width), gtype)
            g[:, :n] = grids[key].T
            blocks[:, at : at + gbytes * self.ld] = g.view(np.uint8)
        self._grid_value_bytes = 2 if self.half_grid else 4
        self.nbytes = int(n * k // 2 + 2 * self._grid_value_bytes * n * (k // 32))
        """Bytes of the stored weight (codes + a scale and an offset per 32 inputs), the padding aside."""
        self.int8_activations = bool(int8_activations)
        """The engine's int8_activations option: where the instruction set is AVX2 (or scalar) the kernel
        rounds the active inputs to int8 per block of 32 (:func:`int8_block_activations`) and multiplies
        pairs of them by ``vpmaddubsw``; AVX-512 multiplies float activations (see :attr:`int8_now`)."""
        self._offsets = (grids[second] if not self.zero_point else -grids["zeros"] * grids["scales"]).astype(np.float32) if int8_activations else None
        self.grid_flags = int(self.zero_point) | (2 if self.half_grid else 0) | (4 if self.int8_activations else 0)
        """The kernels' grid flags: bit 0 the zero-point form, bit 1 a half grid, bit 2 int8 activations."""
        self._args = (self.n, self.k, self.data.ctypes.data, self.ld, self.grid_flags)

    def bytes_read(self, active: np.ndarray) -> int:
        """Bytes a GEMV reads for these active inputs (a (K,) bool mask): their rows' codes and the scales
        and offsets of the blocks with an active input."""
        return int(active.sum()) * self.n // 2 + 2 * self._grid_value_bytes * self.n * int(active.reshape(-1, 32).any(-1).sum())

    def gemv_sparse(self, x: np.ndarray, threshold: float) -> tuple[np.ndarray, int]:
        """``x`` (1, K) → ((1, N), inputs read): inputs with |x| ≤ threshold are skipped (threshold < 0: none)."""
        x = np.ascontiguousarray(x, np.float32).reshape(-1)
        if x.size != self.k:
            raise ValueError(f"input-major int4 weight: input has {x.size} features, the weight expects {self.k}")
        y = np.empty((1, self.n), np.float32)
        used = lib().pk_gemv_int4_x(*self._args, x.ctypes.data, float(threshold), y.ctypes.data)
        return y, int(used)

    def decompress_inputs(self, k0: int, k1: int, out: np.ndarray) -> np.ndarray:
        """``Wᵀ`` rows [k0, k1) (float32, exact) into ``out`` (at least (k1 − k0) × N)."""
        lib().pk_decompress_int4_x(*self._args, k0, k1, out.ctypes.data)
        return out.reshape(-1)[: (k1 - k0) * self.n].reshape(k1 - k0, self.n)

    def to_dense(self) -> np.ndarray:
        """The (N, K) weight (a copy)."""
        return np.ascontiguousarray(self.decompress_inputs(0, self.k, np.empty((self.k, self.n), np.float32)).T)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Dense ``x`` (M, K) → (M, N), every input: up to :data:`GEMV_MAX_ROWS` rows by the kernel, more
        (prefill) a slab of input rows of ``Wᵀ`` at a time decompressed into the shared tile buffer (at
        most about 2 · TILE_ROWS × 1536 floats) and multiplied by the dense GEMM, summed over slabs — with
        int8 activations (:attr:`int8_now`) on x rounded as the kernel rounds it, so that every row count
        gives the kernel's result."""
        x = np.ascontiguousarray(x, np.float32)
        m = x.shape[0]
        if m <= GEMV_MAX_ROWS:
            return np.concatenate([self.gemv_sparse(x[i : i + 1], -1.0)[0] for i in range(m)]) if m else np.empty((0, self.n), np.float32)
        if self.int8_now:  # the kernel's result: its rounded activations, its offsets times the float sums
            xq, d = int8_block_activations(x)
            return self._dense(xq) + d @ self._offsets.T
        return self._dense(x)

    @property
    def int8_now(self) -> bool:
        """Whether the kernel multiplies int8 activations now: the option, on the AVX2 or scalar path."""
        return self.int8_activations and isa() != "avx512f"

    def _dense(self, x: np.ndarray) -> np.ndarray:
        slabs = -(-self.k * self.n // (2 * TILE_ROWS * 1536))  # (one slab for SmolLM2's gate/up)
        rows = -(-self.k // slabs // 32) * 32
        tile = tile_buffer(rows * self.n)
        gemm = dense_gemm(trans_b=False)
        y = None
        for k0 in range(0, self.k, rows):
            k1 = min(self.k, k0 + rows)
            part = gemm(x[:, k0:k1], self.decompress_inputs(k0, k1, tile))
            y = part if y is None else y + part
        return y


def _join_row_offsets(offsets: "list[np.ndarray]") -> np.ndarray:
    """The row offsets of weights stacked by rows: each part's offsets shifted by the values before it."""
    out, start = [np.zeros(1, np.int64)], 0
    for o in offsets:
        out.append(np.asarray(o[1:], np.int64) + start)
        start += int(o[-1])
    return np.concatenate(out)


def _interleave_rows(n: int, parts: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], int]:
    """Arrays of ``n`` rows each laid out in one buffer, row by row in the given order (each row padded
    to a multiple of 8 bytes, and 64 bytes of zeros after the last: a kernel's wide loads never leave
    it): the arrays as views of it (which keep it alive), and the row stride in bytes."""
    widths = {k: a.nbytes // n for k, a in parts.items()}
    stride = -(-sum(widths.values()) // 8) * 8
    flat = np.zeros(n * stride + 64, np.uint8)
    rows = flat[: n * stride].reshape(n, stride)
    views, at = {}, 0
    for key, a in parts.items():
        part = rows[:, at : at + widths[key]]
        part[...] = np.ascontiguousarray(a).view(np.uint8).reshape(n, widths[key])
        views[key] = part.view(a.dtype)
        at += widths[key]
    return views, stride


def _pair_geometry(n: int, k: int, nb: int) -> tuple[int, int, int, int]:
    """The paired layout's (pairs, steps, header bytes, pair stride) for an (n, k) 2:4-int4 weight of nb
    grid blocks per row: the header holds both rows' float scales and uint8 zero points, padded to 16."""
    pairs, steps = (n + 1) // 2, (k // 32 + 1) // 2
    head = 10 * nb + -(10 * nb) % 16
    return pairs, steps, head, head + 48 * steps


def _pair_rows(n: int, k: int, a: dict[str, np.ndarray]) -> tuple[np.ndarray, int]:
    """A 2:4-int4 weight's arrays (codes ``values``, ``positions``, ``scales``, ``zeros``) in the paired
    layout (kernels.h, TwoFourInt4::paired): per pair of rows (an odd ``n`` padded with a zero row) the
    scales of both rows, their zero points, padding to 16 bytes, then per step of 64 inputs the codes of
    (row, window) (0, 0), (1, 0), (0, 1), (1, 1) and the positions of row 0's two windows and row 1's (a
    last lone window's step padded with zeros). Returns the buffer (64 bytes of zeros after the last
    pair: a kernel's wide loads never leave it) and the pair stride in bytes."""
    nb = a["scales"].shape[1]
    pairs, steps, head, stride = _pair_geometry(n, k, nb)

    def padded(x: np.ndarray, width: int) -> np.ndarray:  # rows to 2 · pairs, each row to `width` bytes
        out = np.zeros((2 * pairs, width), np.uint8)
        raw = np.ascontiguousarray(x).view(np.uint8).reshape(n, -1)
        out[:n, : raw.shape[1]] = raw
        return out

    codes = padded(a["values"], 16 * steps).reshape(pairs, 2, steps, 2, 8).transpose(0, 2, 3, 1, 4).reshape(pairs, steps, 32)
    pos = padded(a["positions"], 8 * steps).reshape(pairs, 2, steps, 2, 4).transpose(0, 2, 1, 3, 4).reshape(pairs, steps, 16)
    flat = np.zeros(pairs * stride + 64, np.uint8)
    rows = flat[: pairs * stride].reshape(pairs, stride)
    rows[:, : 8 * nb] = padded(a["scales"].astype(np.float32), 4 * nb).reshape(pairs, 8 * nb)
    rows[:, 8 * nb : 10 * nb] = padded(a["zeros"].astype(np.uint8), nb).reshape(pairs, 2 * nb)
    rows[:, head:] = np.concatenate([codes, pos], -1).reshape(pairs, 48 * steps)
    return flat, stride


def _nibble_rows(n: int, k: int, a: dict[str, np.ndarray]) -> np.ndarray:
    """A 2:4-int4 weight in the nibble layout of the int8-activation AVX2 kernel (kernels.h,
    TwoFourInt4::nibbles): per pair of rows (an odd ``n`` padded with a zero row) its float scales
    [block][row], int32 ``128 · Σ (code − zero)`` of each block's kept values [block][row], uint8 zero
    points [block][row], zeros to a multiple of 32 bytes, then per 32-input window 24 bytes: the 32
    kept values o = 16·half + 8·row + j, 16 bytes of codes (value i's in the low nibble of byte i, value
    16 + i's in the high one), then a qword of each value's input within its group of four (value
    o = 4d + e at bit 32·(d & 1) + 8e + 2·(d >> 1)); 64 bytes of zeros after the last pair."""
    windows = k // 32
    codes = two_four_int4_codes(a["values"], n, k).reshape(n, windows, 16)  # kept values in input order
    offset = two_four_offsets(a["positions"], n, k).reshape(n, windows, 16)  # each one's input within its group of four
    pairs, nb, block = (n + 1) // 2, a["scales"].shape[1], -(-k // a["scales"].shape[1])
    head = (18 * nb + 31) // 32 * 32

    def by_pair(v: np.ndarray) -> np.ndarray:  # (n, windows, 16) → (pairs, windows, 32), value o = 16·half + 8·row + j
        out = np.zeros((2 * pairs, windows, 2, 8), np.uint8)
        out[:n] = v.reshape(n, windows, 2, 8)
        return out.reshape(pairs, 2, windows, 2, 8).transpose(0, 2, 3, 1, 4).reshape(pairs, windows, 32)

    c, p = by_pair(codes), by_pair(offset)
    code_bytes = c[..., :16] | (c[..., 16:] << 4)
    o = np.arange(32)
    bit = (32 * ((o // 4) & 1) + 8 * (o % 4) + 2 * ((o // 4) >> 1)).astype(np.uint64)
    q = np.bitwise_or.reduce(p.astype(np.uint64) << bit, axis=-1)  # (pairs, windows)
    win = np.concatenate([code_bytes, q.astype("<u8")[..., None].view(np.uint8)], axis=-1)  # (pairs, windows, 24)
    blk = (4 * (np.arange(k // 2) // 2)) // block  # each kept value's grid block (a block of `block` inputs keeps block / 2)
    own = codes.reshape(n, k // 2).astype(np.int64) - a["zeros"].astype(np.int64)[:, blk]
    corr = np.add.reduceat(own, np.arange(0, k // 2, block // 2), axis=1)  # Σ (code − zero) per row and block
    grid = {key: np.zeros((2 * pairs, nb), dt) for key, dt in (("scales", np.float32), ("corr", np.int32), ("zeros", np.uint8))}
    for key, v in (("scales", a["scales"]), ("corr", 128 * corr), ("zeros", a["zeros"])):
        grid[key][:n] = v  # (the padding row: zeros; its output is not stored)
    rows = np.zeros((pairs, head + 24 * windows), np.uint8)
    by_block = lambda v: v.reshape(pairs, 2, nb).transpose(0, 2, 1).copy().view(np.uint8).reshape(pairs, -1)  # noqa: E731
    rows[:, : 8 * nb] = by_block(grid["scales"])
    rows[:, 8 * nb : 16 * nb] = by_block(grid["corr"])
    rows[:, 16 * nb : 18 * nb] = by_block(grid["zeros"])
    rows[:, head:] = win.reshape(pairs, 24 * windows)
    return np.concatenate([rows.reshape(-1), np.zeros(64, np.uint8)])


def _unpair_rows(buf: np.ndarray, n: int, k: int, nb: int) -> dict[str, np.ndarray]:
    """The separate arrays of a weight held by :func:`_pair_rows` (copies)."""
    pairs, steps, head, stride = _pair_geometry(n, k, nb)
    rows = buf[: pairs * stride].reshape(pairs, stride)
    st = rows[:, head:].reshape(pairs, steps, 48)
    codes = st[..., :32].reshape(pairs, steps, 2, 2, 8).transpose(0, 3, 1, 2, 4).reshape(2 * pairs, 16 * steps)[:n, : k // 4]
    pos = st[..., 32:].reshape(pairs, steps, 2, 2, 4).transpose(0, 2, 1, 3, 4).reshape(2 * pairs, 8 * steps)[:n, : k // 8]
    scales = np.ascontiguousarray(rows[:, : 8 * nb]).view(np.float32).reshape(2 * pairs, nb)[:n]
    zeros = rows[:, 8 * nb : 10 * nb].reshape(2 * pairs, nb)[:n]
    return {k_: np.ascontiguousarray(v) for k_, v in (("values", codes), ("positions", pos), ("scales", scales), ("zeros", zeros))}


class NativeWeight:
    """A weight held in the layout the kernels read (contiguous arrays, kept alive here): a
    :class:`CompressedWeight` (2:4, bitmask or dense; float32 or int8 values with their scales), or a
    dense float32 ``(N, K)`` array (``format`` 'dense', every bit set)."""

    def __init__(self, c: CompressedWeight | np.ndarray, int8_activations: bool = False, half_grid: bool = True):
        self._corr: int | None = None
        self._row_sums: np.ndarray | None = None
        self._int4x = False
        self.half_grid = False
        """An int4 weight whose scales and offsets are held as fp16 (exactly; see the int4 branch)."""
        if isinstance(c, np.ndarray):
            if c.ndim != 2:
                raise ValueError(f"native weight: dense weight of shape {c.shape} is not 2-D")
            c = CompressedWeight("dense", c.shape, {"values": np.asarray(c, np.float32)})
        self.format = c.format
        self.n, self.k = c.shape
        self.block = int(c.block)
        """Int8 values with a scale per row and block of this many inputs; 0: float32 values."""
        self.nbytes = c.nbytes
        """Bytes of the stored format (what the file holds and the kernel reads, row offsets aside; an
        int4 weight's grid counted as held here, fp16 or float32)."""
        if c.format == "2:4-int4":  # 2:4 with 4-bit values: codes, positions, a scale and a uint8 zero point per row and block
            arrays = {"values": np.ascontiguousarray(c.arrays["values"], np.uint8), "positions": np.ascontiguousarray(c.arrays["positions"], np.uint8),
                      "scales": np.ascontiguousarray(c.arrays["scales"], np.float32), "zeros": np.ascontiguousarray(c.arrays["zeros"], np.uint8)}
            nb = -(-self.k // max(self.block, 1))
            if (self.k % 32 or self.block < 32 or self.block & (self.block - 1) or arrays["values"].shape != (self.n, self.k // 4)
                    or arrays["positions"].shape != (self.n, self.k // 8) or arrays["scales"].shape != (self.n, nb) or arrays["zeros"].shape != (self.n, nb)):
                raise ValueError(f"2:4-int4 weight: codes {arrays['values'].shape} / positions {arrays['positions'].shape} / scales {arrays['scales'].shape} / "
                                 f"zeros {arrays['zeros'].shape} in blocks of {self.block} do not fit a ({self.n}, {self.k}) weight")
            # one buffer, rows two at a time (the paired layout, kernels.h: a matrix is one sequential
            # stream, and the 16-bit kernel loads a step of both rows' codes and positions at once)
            buf, stride = _pair_rows(self.n, self.k, arrays)
            self.arrays = {"pairs": buf}
            self._q = (None, 0)
            head, at = _pair_geometry(self.n, self.k, nb)[2], buf.ctypes.data
            self._args = (at + head, at + head + 32, at, at + 8 * nb, self.block, stride, 1)
            self._row_sums = self._row_sums_by_tiles(X16_TWOFOUR_INT4)  # the 16-bit kernel's offset term, as for bitmask-int4 below
            if int8_activations and isa() == "avx2+fma":
                # the int8-activation AVX2 kernel's layout (a second copy of the weight, 3 bits a weight and
                # its grid: only with the option, on the instruction set that reads it; kernels.h)
                self.arrays["nibbles"] = _nibble_rows(self.n, self.k, arrays)
            return
        if c.format == "bitmask-int4":  # masks, 4-bit codes per word from a byte row offset, a scale and a uint8 zero point per row and block
            a = {"masks": np.ascontiguousarray(c.arrays["masks"], np.uint16), "row_offsets": np.ascontiguousarray(c.arrays["row_offsets"], np.int64),
                 "scales": np.ascontiguousarray(c.arrays["scales"], np.float32), "zeros": np.ascontiguousarray(c.arrays["zeros"], np.uint8)}
            codes = np.ascontiguousarray(c.arrays["values"], np.uint8).reshape(-1)
            nb = -(-self.k // max(self.block, 1))
            if (self.block < 16 or self.block & (self.block - 1) or a["masks"].shape != (self.n, (self.k + 15) // 16) or a["row_offsets"].shape != (self.n + 1,)
                    or int(a["row_offsets"][-1]) != codes.size or a["scales"].shape != (self.n, nb) or a["zeros"].shape != (self.n, nb)):
                raise ValueError(f"bitmask-int4 weight: masks {a['masks'].shape} / {codes.size} code bytes / row_offsets {a['row_offsets'].shape} / "
                                 f"scales {a['scales'].shape} / zeros {a['zeros'].shape} in blocks of {self.block} do not fit a ({self.n}, {self.k}) weight")
            # padding (kernels.h, BitmaskInt4): a group's codes are read 40 bytes at once at most, its four mask words as one 64-bit load
            masks = np.zeros(a["masks"].size + 4, np.uint16)
            masks[: a["masks"].size] = a["masks"].reshape(-1)
            a["masks"] = masks[: a["masks"].size].reshape(a["masks"].shape)  # a view: the 8 bytes after it are the buffer's
            self.arrays = {"values": np.concatenate([codes, np.zeros(BITMASK_INT4_PAD, np.uint8)]), **a}
            self._q = (None, 0)
            self._args = (a["masks"].ctypes.data, self.arrays["values"].ctypes.data, a["row_offsets"].ctypes.data, a["scales"].ctypes.data,
                          a["zeros"].ctypes.data, self.block)
            # each row's Σ of its values (float64, rounded once): the 16-bit kernel's offset term, from a few
            # rows at a time decompressed by the kernels (no dense copy of the whole weight)
            self._row_sums = self._row_sums_by_tiles(X16_BITMASK_INT4)
            return
        if c.format == "int4":  # 4-bit dense codes with a scale and an offset (or zero point) per row and 32 inputs
            self.block = 0  # (``block`` is the int8 scale block; int4 has its own, fixed at 32)
            codes = np.ascontiguousarray(c.arrays["values"], np.uint8)
            second = int4_offset_key(c.arrays)
            grid = {k: np.ascontiguousarray(c.arrays[k], np.float32) for k in ("scales", second)}
            if self.k % 32 or codes.shape != (self.n, self.k // 2) or any(g.shape != (self.n, self.k // 32) for g in grid.values()):
                raise ValueError(f"int4 weight: codes {codes.shape} / scales {grid['scales'].shape} / {second} {grid[second].shape} do not fit a ({self.n}, {self.k}) weight")
            self._int4x = bool(int8_activations and self.k % 64 == 0)
            # a grid every value of which is an fp16 number (GGUF's Q4_1 stores its scales and minima as
            # fp16) is held as fp16, exactly: 5 bits per weight read instead of 6. With int8 activations
            # only where the instruction set chosen now reads fp16 grids with them (AVX2; the VNNI kernel
            # reads float grids): a weight whose kernel cannot gets fp32 activations, not int8
            half_ok = not self._int4x or int4_int8_activations(self.k, True) or not int4_int8_activations(self.k, False)
            self.half_grid = half_grid and half_ok and all(exact_half(g) for g in grid.values())
            if self.half_grid:
                grid = {k: g.astype(np.float16) for k, g in grid.items()}
            self.nbytes = codes.nbytes + sum(g.nbytes for g in grid.values())
            # one buffer, row by row: scales, offsets (or zero points), codes — a matrix is one sequential
            # stream, not three (docs/native.md); the arrays are views of it
            self.arrays, stride = _interleave_rows(self.n, {"scales": grid["scales"], second: grid[second], "values": codes})
            views = self.arrays
            self._q = (None, 0)
            flags = int(second == "zeros") | (2 if self.half_grid else 0)
            self._args = (views["values"].ctypes.data, views["scales"].ctypes.data, views[second].ctypes.data, flags, stride)
            return
        vdtype = np.int8 if self.block else np.float32
        raw = c.arrays["values"]
        if raw.dtype != vdtype:
            raise ValueError(f"native weight: values are {raw.dtype}, expected {np.dtype(vdtype)} ({'int8 with scales' if self.block else 'float32'})")
        values = np.concatenate([np.ascontiguousarray(raw).reshape(-1), np.zeros(VALUE_PAD, vdtype)])
        self.arrays = {"values": values}
        self._q: tuple[int | None, int] = (None, 0)
        if self.block:
            scales = np.ascontiguousarray(c.arrays["scales"], np.float32)
            if scales.shape != (self.n, -(-self.k // self.block)):
                raise ValueError(f"native weight: scales {scales.shape} do not fit a ({self.n}, {self.k}) weight in blocks of {self.block}")
            self.arrays["scales"] = scales
            self._q = (scales.ctypes.data, self.block)
        if c.format == "dense":
            if values.size - VALUE_PAD != self.n * self.k:
                raise ValueError(f"native weight: {values.size - VALUE_PAD} dense values do not fit a ({self.n}, {self.k}) weight")
            self._args = (None, values.ctypes.data, None)
            x16 = bool(lib().pk_x16_kernels() & X16_DENSE_INT8)
            if self.block == 32 and self.k % 64 == 0 and (int8_activations or x16):
                sums = self.stored_values.reshape(self.n, self.k // 32, 32).sum(-1, dtype=np.int64)  # Σ codes per row and block
                if int8_activations:  # 128 · Σ codes · scale per row and block: the activations' +128 offset, taken back out
                    self.arrays["corr"] = np.ascontiguousarray(128.0 * sums * self.arrays["scales"], np.float32)
                    self._corr = self.arrays["corr"].ctypes.data
                if x16:  # each row's Σ of its values (float64, rounded once): the 16-bit kernel's offset term (vnni_avx512.cpp), only where this CPU can run it
                    self._row_sums = (sums * self.arrays["scales"].astype(np.float64)).sum(1).astype(np.float32)
            return
        if c.format == "2:4":  # the 2:4 kernel reads values and 2-bit positions as they are stored
            positions = np.ascontiguousarray(c.arrays["positions"], np.uint8)
            if values.size - VALUE_PAD != self.n * self.k // 2 or positions.shape != (self.n, (self.k + 7) // 8):
                raise ValueError(f"2:4 weight: values {values.size - VALUE_PAD} / positions {positions.shape} do not fit a ({self.n}, {self.k}) weight")
            self.arrays["positions"] = positions
            self._args = (values.ctypes.data, positions.ctypes.data)
            return
        if c.format != "bitmask":
            raise ValueError(f"native weight: format '{c.format}' is not 2:4, bitmask or dense")
        for name in ("masks", "row_offsets"):
            self.arrays[name] = np.ascontiguousarray(c.arrays[name])
        a = self.arrays
        if a["masks"].dtype != np.uint16 or a["row_offsets"].dtype != np.int64:
            raise ValueError("native weight: expected uint16 masks and int64 row_offsets")
        if a["masks"].shape != (self.n, (self.k + 15) // 16) or a["row_offsets"].shape != (self.n + 1,):
            raise ValueError(f"native weight: masks {a['masks'].shape} / row_offsets {a['row_offsets'].shape} do not fit a ({self.n}, {self.k}) weight")
        if int(a["row_offsets"][-1]) + VALUE_PAD != a["values"].size:
            raise ValueError(f"native weight: row_offsets end at {int(a['row_offsets'][-1])}, values hold {a['values'].size - VALUE_PAD}")
        self._args = (a["masks"].ctypes.data, a["values"].ctypes.data, a["row_offsets"].ctypes.data)

    @property
    def int8_activations(self) -> bool:
        """Its activations may be quantized to int8 per block (dense int8 in blocks of 32, K % 64 == 0,
        from an accuracy_level 4 model or when asked; int4 with K % 64 == 0 and 2:4-int4 when asked): the
        VNNI kernels do it where the CPU has them, the AVX2 kernels where the instruction set is AVX2
        (2:4-int4 only there: it holds the nibble layout, built when the weight was made on AVX2)."""
        return self._corr is not None or self._int4x or self.nibbles_ptr() is not None

    @property
    def stored_values(self) -> np.ndarray:
        """The values as stored (without the padding)."""
        if self.format == "2:4-int4":  # (a copy out of the paired layout)
            return _unpair_rows(self.arrays["pairs"], self.n, self.k, -(-self.k // self.block))["values"]
        if self.format == "int4":
            return self.arrays["values"]
        if self.format == "bitmask-int4":
            return self.arrays["values"][:-BITMASK_INT4_PAD]
        return self.arrays["values"][: self.arrays["values"].size - VALUE_PAD]

    def compressed(self) -> CompressedWeight:
        """This weight as a :class:`CompressedWeight` (sharing its arrays; a 2:4-int4 weight's copied out of
        the paired layout)."""
        if "+" in self.format:
            raise ValueError(f"native weight: a stacked weight of formats {self.format} has no single format")
        if self.format == "2:4-int4":
            return CompressedWeight(self.format, (self.n, self.k), _unpair_rows(self.arrays["pairs"], self.n, self.k, -(-self.k // self.block)), self.block)
        arrays = {k: v.astype(np.float32) if v.dtype == np.float16 else v for k, v in self.arrays.items() if k != "values"} | {"values": self.stored_values}
        if self.format in INT4_FORMATS:  # (the int4 format's block is fixed; ``self.block`` is the int8 scale block)
            return CompressedWeight(self.format, (self.n, self.k), arrays, 32 if self.format == "int4" else self.block)
        if self.format == "2:4":
            arrays["values"] = arrays["values"].reshape(self.n, self.k // 2)
        elif self.format == "dense":
            arrays["values"] = arrays["values"].reshape(self.n, self.k)
        return CompressedWeight(self.format, (self.n, self.k), arrays, self.block)

    @classmethod
    def stacked(cls, parts: "list[NativeWeight]") -> "NativeWeight":
        """One weight whose output rows are ``parts``' rows in order (e.g. q, k and v, which read the same
        input): one kernel call instead of several. Dense parts stay dense only when all are dense; int8
        parts stay int8 when all are int8 with one block size (else every part runs its fp32 values)."""
        k = parts[0].k
        if any(p.k != k for p in parts):
            raise ValueError(f"stacked weight: parts have different input widths {[p.k for p in parts]}")
        fmt = parts[0].format
        if fmt in INT4_FORMATS and all(p.format == fmt and p.block == parts[0].block and p.arrays.keys() == parts[0].arrays.keys() for p in parts):
            cs = [p.compressed() for p in parts]  # one 4-bit format, one block and grid form: the arrays stacked by rows
            arrays = {key: _join_row_offsets([c.arrays[key] for c in cs]) if key == "row_offsets" else np.concatenate([c.arrays[key] for c in cs])
                      for key in cs[0].arrays}
            return cls(CompressedWeight(fmt, (sum(p.n for p in parts), k), arrays, cs[0].block), int8_activations=all(p.int8_activations for p in parts),
                       half_grid=all(p.half_grid for p in parts))
        float_form = {"int4": "dense", "2:4-int4": "2:4", "bitmask-int4": "bitmask"}
        if any(p.format in float_form for p in parts):  # 4-bit parts beside other formats, blocks or grids: their exact float32 values
            parts = [cls(compress(p.to_dense(), float_form[p.format])) if p.format in float_form else p for p in parts]
        blocks = {p.block for p in parts}
        if len(blocks) > 1:  # mixed precisions: the dequantized values, in each part's own format
            parts = [cls(p.to_dense()) if p.format == "dense" else cls(compress(p.to_dense(), p.format)) for p in parts]
            blocks = {0}
        block = blocks.pop()
        n = sum(p.n for p in parts)
        scales = {"scales": np.concatenate([p.arrays["scales"] for p in parts])} if block else {}
        if all(p.format == "dense" for p in parts):
            return cls(CompressedWeight("dense", (n, k), {"values": np.concatenate([p.stored_values for p in parts]).reshape(n, k)} | scales, block),
                       int8_activations=all(p.int8_activations for p in parts))
        if all(p.format == "2:4" for p in parts):
            values = np.concatenate([p.stored_values for p in parts]).reshape(-1, k // 2)
            return cls(CompressedWeight("2:4", (n, k), {"values": values, "positions": np.concatenate([p.arrays["positions"] for p in parts])} | scales, block))
        masks, values, offsets = [], [], []
        for p in parts:
            if p.format == "bitmask":
                a = p.compressed().arrays
            else:
                grid = (p.arrays["scales"], block) if block else None
                a = compress(p.to_dense(), "bitmask", grid=grid).arrays
            masks.append(a["masks"])
            values.append(a["values"][: int(a["row_offsets"][-1])])
            offsets.append(a["row_offsets"])
        c = CompressedWeight("bitmask", (n, k), {"masks": np.concatenate(masks), "values": np.concatenate(values), "row_offsets": _join_row_offsets(offsets)} | scales, block)
        out = cls(c)
        out.nbytes = sum(p.nbytes for p in parts)
        out.format = "+".join(sorted({p.format for p in parts}))
        return out

    def to_dense(self) -> np.ndarray:
        """The (N, K) weight, dense (a copy for compressed weights)."""
        if self.format == "dense" and not self.block:
            return self.dense_view().copy()
        out = np.empty((self.n, self.k), np.float32)
        return self.decompress_rows(0, self.n, out)

    def dense_view(self) -> np.ndarray:
        """The (N, K) weight of a dense float32 NativeWeight, without a copy."""
        if self.format != "dense" or self.block:
            raise ValueError(f"dense_view: the weight is {self.format}{' int8' if self.block else ''}, not dense float32")
        return self.arrays["values"][: self.n * self.k].reshape(self.n, self.k)

    def gemv(self, x: np.ndarray) -> np.ndarray:
        """``x`` (M, K) float32 contiguous → (M, N), by the sparse kernel."""
        m = x.shape[0]
        y = np.empty((m, self.n), np.float32)
        self.gemv_into(x.ctypes.data, m, y.ctypes.data)
        return y

    def gemv_into(self, x_ptr: int, m: int, y_ptr: int) -> None:
        """The kernel on raw buffers (x (m, K), y (m, N), float32, contiguous): for hosts with their own tensors."""
        if self.format == "2:4":
            lib().pk_gemv_24(self.n, self.k, *self._args, *self._q, x_ptr, m, y_ptr)
        elif self.format == "2:4-int4":
            lib().pk_gemv_24_int4(self.n, self.k, *self._args, self.row_sums_ptr(), self.nibbles_ptr(), x_ptr, m, y_ptr)
        elif self.format == "bitmask-int4":
            lib().pk_gemv_bitmask_int4(self.n, self.k, *self._args, self.row_sums_ptr(), x_ptr, m, y_ptr)
        elif self.format == "int4":
            lib().pk_gemv_int4(self.n, self.k, *self._args, int(self._int4x), x_ptr, m, y_ptr)
        else:
            lib().pk_gemv(self.n, self.k, *self._args, *self._q, self._corr, self.row_sums_ptr(), x_ptr, m, y_ptr)

    def gemv_rows(self, x: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Rows ``rows`` of W times one row ``x`` (1, K) → (len(rows),): a row subset of an ``int4`` weight,
        as the CATS decode computes up's rows (only the listed rows are read)."""
        if self.format != "int4":
            raise ValueError(f"gemv_rows: the weight is {self.format}; row subsets run on int4 weights")
        rows = np.ascontiguousarray(rows, np.int32)
        if rows.size and (rows.min() < 0 or rows.max() >= self.n):
            raise ValueError(f"gemv_rows: rows must be in [0, {self.n}), got [{rows.min()}, {rows.max()}]")
        x = np.ascontiguousarray(x, np.float32)
        y = np.empty(rows.size, np.float32)
        if rows.size:
            lib().pk_gemv_int4_rows(self.k, *self._args, rows.ctypes.data, rows.size, int(self._int4x), x.ctypes.data, y.ctypes.data)
        return y

    def nibbles_ptr(self) -> int | None:
        """The address of a 2:4-int4 weight's nibble layout (the int8_activations option on AVX2), else None."""
        nib = self.arrays.get("nibbles") if self.format == "2:4-int4" else None
        return None if nib is None else nib.ctypes.data

    def row_sums_ptr(self) -> int | None:
        """The address of each row's Σ of its values (a 4-bit sparse weight's 16-bit kernel's offset term),
        None where this CPU has no such kernel (the float kernel then runs)."""
        return None if self._row_sums is None else self._row_sums.ctypes.data

    def _row_sums_by_tiles(self, kernel_bit: int) -> np.ndarray | None:
        """Each row's Σ of its values (float64 sums rounded once to float32), rows of 2^20 values at
        most decompressed at a time; None where this CPU cannot run the 16-bit kernel that reads them
        (``pk_x16_kernels``' bit ``kernel_bit``: a decompression of the whole weight saved)."""
        if not lib().pk_x16_kernels() & kernel_bit:
            return None
        rows = max(1, min(self.n, (1 << 20) // max(self.k, 1)))
        tile = np.empty((rows, self.k), np.float32)
        sums = np.empty(self.n, np.float64)
        for n0 in range(0, self.n, rows):
            n1 = min(self.n, n0 + rows)
            sums[n0:n1] = self.decompress_rows(n0, n1, tile).sum(1, dtype=np.float64)
        return sums.astype(np.float32)

    def decompress_rows(self, n0: int, n1: int, out: np.ndarray) -> np.ndarray:
        if self.format == "2:4":
            lib().pk_decompress_24(self.n, self.k, *self._args, *self._q, n0, n1, out.ctypes.data)
        elif self.format == "2:4-int4":
            lib().pk_decompress_24_int4(self.n, self.k, *self._args, n0, n1, out.ctypes.data)
        elif self.format == "bitmask-int4":
            lib().pk_decompress_bitmask_int4(self.n, self.k, *self._args, n0, n1, out.ctypes.data)
        elif self.format == "int4":
            lib().pk_decompress_int4(self.n, self.k, *self._args, n0, n1, out.ctypes.data)
        else:
            lib().pk_decompress(self.n, self.k, *self._args, *self._q, n0, n1, out.ctypes.data)
        return out[: n1 - n0]

    def gemm_tiled(self, x: np.ndarray) -> np.ndarray:
        """``x`` (M, K) → (M, N): decompress TILE_ROWS output rows at a time, multiply by ONNX Runtime's
        GEMM (a dense weight is multiplied as it is)."""
        gemm = dense_gemm()
        if self.format == "dense" and not self.block:
            return gemm(x, self.dense_view())
        m = x.shape[0]
        y = np.empty((m, self.n), np.float32)
        rows = min(TILE_ROWS, self.n)
        buf = tile_buffer(rows * self.k)[: rows * self.k].reshape(rows, self.k)
        for n0 in range(0, self.n, rows):
            n1 = min(self.n, n0 + rows)
            tile = self.decompress_rows(n0, n1, buf)
            if n0 == 0 and n1 == self.n:
                return gemm(x, tile)
            y[:, n0:n1] = gemm(x, tile)
        return y

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """``x`` (..., K) → (..., N)."""
        if x.shape[-1] != self.k:
            raise ValueError(f"sparse linear: input has {x.shape[-1]} features, the weight expects {self.k}")
        lead = x.shape[:-1]
        x2 = np.ascontiguousarray(x.reshape(-1, self.k), dtype=np.float32)
        # int8 activations (the option, where the instruction set runs them) for every row count, prefill
        # included, as ONNX Runtime's MatMulNBits does: the kernel reads the weight once per four rows of x
        int8x = int4_int8_activations(self.k, self.half_grid) if self._int4x else (self._corr is not None and int8_activations())
        if int8x and x2.shape[0] > GEMV_MAX_ROWS and isa() == "avx2+fma":
            # prefill on the AVX2 path: the kernel's result (its rounded activations; an int4 weight's
            # offsets times the float sums) by the decompressed tiles and the dense GEMM — the AVX2 int4 ×
            # int8 kernel multiplies every 32 weights by five instructions per row of x and ran prefill at
            # 0.52× of ONNX Runtime dense (benchmarks/results/native_int4x_decode_avx2_path.json); the
            # int8 × int8 one reads the weight once per four rows of x
            xq, d = int8_block_activations(x2)
            y = self.gemm_tiled(xq)
            return (y + d @ self.int4_offsets().T if self._int4x else y).reshape(*lead, self.n)
        small = x2.shape[0] <= GEMV_MAX_ROWS or int8x
        y = self.gemv(x2) if small else self.gemm_tiled(x2)
        return y.reshape(*lead, self.n)

    def int4_offsets(self) -> np.ndarray:
        """An ``int4`` weight's offset per row and block of 32 inputs (N, K/32) as float32: its offsets,
        or ``−zero · scale`` in the zero-point form (a weight is ``scale · code + offset``)."""
        if self.format != "int4":
            raise ValueError(f"int4_offsets: the weight is {self.format}, not int4")
        scales = self.arrays["scales"].astype(np.float32)
        if "zeros" in self.arrays:
            return -self.arrays["zeros"].astype(np.float32) * scales
        return self.arrays["offsets"].astype(np.float32)
