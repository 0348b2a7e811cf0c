"""Native sparse kernels against a dense reference: every instruction-set path the CPU has, random
shapes including odd sizes, all-zero and all-kept rows, 1–4 decode rows and the tiled prefill path
(property tests), and the compressed formats' round trip with hand-worked expectations."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.sparse_format import CompressedWeight, compress, decompress, is_two_four

native = pytest.importorskip("engines.native")
if not native.available():  # pragma: no cover - install.sh builds it; say how when it did not
    pytest.skip("native kernels not built: run scripts/install.sh (needs a C++17 compiler)", allow_module_level=True)

ISAS = [i for i in ("scalar", "avx2+fma", "avx512f") if list(native.ISA_NAMES.values()).index(i) <= list(native.ISA_NAMES.values()).index(native.best_isa())]


@pytest.fixture(autouse=True)
def _restore_isa():
    best = native.best_isa()
    yield
    native.set_isa(best)


def prune_two_four(w: np.ndarray) -> np.ndarray:
    n, k = w.shape
    g = w.reshape(n, k // 4, 4).copy()
    np.put_along_axis(g, np.argsort(np.abs(g), -1)[..., :2], 0, -1)
    return g.reshape(n, k)


def test_two_four_format_by_hand():
    # weights 1..8 in one row, 2:4 keeps [3,4] and [7,8]: positions (2,3) and (2,3) -> one byte 0b1110_1110
    w = np.array([[0, 0, 3, 4, 0, 0, 7, 8]], np.float32)
    c = compress(w)
    assert c.format == "2:4"
    assert c.arrays["values"].tolist() == [[3, 4, 7, 8]]
    assert c.arrays["positions"].tolist() == [[0b1110_1110]]
    assert c.nbytes == 4 * 4 + 1


def test_bitmask_format_by_hand():
    w = np.zeros((2, 17), np.float32)
    w[0, 0], w[0, 16], w[1, 3] = 1.0, 2.0, 3.0
    c = compress(w, "bitmask")
    assert c.arrays["masks"].tolist() == [[1, 1], [8, 0]]
    assert c.arrays["values"].tolist() == [1.0, 2.0, 3.0]
    assert c.arrays["row_offsets"].tolist() == [0, 2, 3]


def test_compress_refuses_what_it_cannot_hold():
    with pytest.raises(ValueError, match="not 2:4"):
        compress(np.ones((2, 8), np.float32), "2:4")
    with pytest.raises(ValueError, match="K % 4"):
        compress(np.ones((2, 6), np.float32), "2:4")
    with pytest.raises(ValueError, match="not one of"):
        compress(np.ones((2, 8), np.float32), "csr")


def random_pruned(n: int, groups: int, sparsity: float, seed: int) -> tuple[np.ndarray, np.random.Generator]:
    """An (n, K) weight at ``sparsity`` (2:4 at 0.5 when K allows; K odd-sized for the bitmask cases)
    with an all-zero first row and an all-kept last one."""
    rng = np.random.default_rng(seed)
    k = 4 * groups + (seed % 4 if sparsity != 0.5 else 0)
    w = rng.standard_normal((n, k)).astype(np.float32)
    if sparsity == 0.5 and k % 4 == 0:
        w = prune_two_four(w)
    else:
        w[rng.random((n, k)) < sparsity] = 0.0
    w[0] = 0.0
    if n > 1:
        w[-1] = rng.standard_normal(k)
    return w, rng


def check_every_isa(weight, w: np.ndarray, x: np.ndarray, label: str) -> None:
    """``weight`` (a NativeWeight of ``w``) on every instruction set: within float32 rounding of a
    float64 dense reference, and its decompressed rows exactly ``w``."""
    ref = x.astype(np.float64) @ w.T.astype(np.float64)
    n, k = w.shape
    for isa in ISAS:
        native.set_isa(isa)
        y = weight(x)
        tol = 1e-5 * (np.abs(x).sum(1, keepdims=True) * np.abs(w).max(initial=1.0) + 1)
        assert (np.abs(y - ref) <= tol).all(), f"{label} {isa} n={n} k={k} rows={x.shape[0]}: max err {np.abs(y - ref).max()}"
        tile = np.empty((min(native.TILE_ROWS, n), k), np.float32)
        np.testing.assert_array_equal(weight.decompress_rows(0, min(n, tile.shape[0]), tile), w[: tile.shape[0]])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 70),
    groups=st.integers(1, 80),
    rows=st.sampled_from([1, 2, 3, 4, 5, 9, 17, 40]),
    sparsity=st.sampled_from([0.0, 0.3, 0.5, 0.7, 0.95, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_kernels_match_dense_reference(n, groups, rows, sparsity, seed):
    w, rng = random_pruned(n, groups, sparsity, seed)
    x = rng.standard_normal((rows, w.shape[1])).astype(np.float32)
    for fmt in ["bitmask", "dense"] + (["2:4"] if is_two_four(w) else []):
        if fmt == "dense":
            weight = native.NativeWeight(w)
        else:
            c = compress(w, fmt)
            np.testing.assert_array_equal(decompress(c), w)
            weight = native.NativeWeight(c)
        check_every_isa(weight, w, x, fmt)


def on_int8_grid(w: np.ndarray, block: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``w`` moved onto an int8 grid the way ``core.quant`` builds one (codes −127..127 times a float32
    scale per row and block of inputs, zeros kept): (dequantized weight, scales)."""
    n, k = w.shape
    nb = -(-k // block)
    scales = (rng.random((n, nb)) * 0.05 + 1e-3).astype(np.float32)
    s = np.repeat(scales, block, axis=1)[:, :k]
    codes = np.clip(np.rint(w / s * 40), -127, 127).astype(np.float32)
    codes[w == 0] = 0  # the pattern stays
    return (codes * s).astype(np.float32), scales


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 70),
    groups=st.integers(1, 80),
    rows=st.sampled_from([1, 2, 3, 4, 5, 9, 17, 40]),
    sparsity=st.sampled_from([0.0, 0.3, 0.5, 0.7, 1.0]),
    block=st.sampled_from([16, 32, 64, 128]),
    seed=st.integers(0, 2**16),
)
def test_int8_kernels_match_dense_reference(n, groups, rows, sparsity, block, seed):
    """Int8 values with a scale per block: every format and ISA computes with code × scale, which is
    the dequantized weight bit for bit (decompression is exact), against a float64 dense reference."""
    w, rng = random_pruned(n, groups, sparsity, seed)
    w, scales = on_int8_grid(w, block, rng)
    x = rng.standard_normal((rows, w.shape[1])).astype(np.float32)
    native.int16_activations(False)  # (dense int8 in blocks of 32 would round x to 16 bits: its own test below)
    try:
        for fmt in ["bitmask", "dense"] + (["2:4"] if is_two_four(w) else []):
            c = compress(w, fmt, grid=(scales, block))
            assert c.int8 and c.arrays["values"].dtype == np.int8
            np.testing.assert_array_equal(decompress(c), w)
            check_every_isa(native.NativeWeight(c), w, x, f"int8 {fmt} block {block}")
    finally:
        native.int16_activations(True)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 40), chunks=st.integers(1, 10), rows=st.sampled_from([1, 2, 3, 4, 5, 9]), seed=st.integers(0, 2**16))
def test_dense_int8_int16_activation_kernel_computes_the_rounded_product(n, chunks, rows, seed):
    """Dense int8 in blocks of 32 with K % 64 == 0 (a Q8_0 LM head, INT8 linears) × 16-bit activations
    (vnni_avx512.cpp, AVX-512 VNNI): the float64 product of x rounded to 1/32639 of each row's largest |x|
    within float32 summation error, within 2e-5 of the unrounded product, a zero row of x gives zeros,
    all-zero rows of w too; K % 64 == 32, another block, AVX2 forced or the switch off: the float
    kernel's exact fp32 result (code × scale is the dequantized weight), bit for bit the float32 weight's."""
    if not native.int16_activations():
        pytest.skip(f"the 16-bit dense int8 kernel needs AVX-512 VNNI (this CPU's best: {native.best_isa()})")
    rng = np.random.default_rng(seed)
    k = 64 * chunks
    w, scales = on_int8_grid(rng.standard_normal((n, k)).astype(np.float32), 32, rng)
    if n > 2:
        w[1] = 0.0
    x = (rng.standard_normal((rows, k)) * rng.uniform(0.1, 5.0, k)).astype(np.float32)
    x[rows // 2] = 0.0
    nw = native.NativeWeight(compress(w, "dense", grid=(scales, 32)))
    y = _x16_product_checked(nw, w, x)
    assert np.array_equal(native.NativeWeight.stacked([nw, nw]).gemv(x), np.concatenate([y, y], axis=1))
    fw = native.NativeWeight(np.ascontiguousarray(w))
    _float_kernel_when_16_bit_is_off(nw, fw, x, native.int16_activations)
    for kk, block in ((k + 32, 32), (k, 64)):
        wo, so = on_int8_grid(rng.standard_normal((n, kk)).astype(np.float32), block, rng)
        xo = rng.standard_normal((rows, kk)).astype(np.float32)
        assert np.array_equal(native.NativeWeight(compress(wo, "dense", grid=(so, block))).gemv(xo), native.NativeWeight(wo).gemv(xo))


def test_int8_format_by_hand_and_its_errors():
    # one row, K = 32, blocks of 16: codes 3, -2 at inputs 2, 3 (scale 0.5) and 7 at input 17 (scale 0.25)
    w = np.zeros((1, 32), np.float32)
    w[0, 2], w[0, 3], w[0, 17] = 1.5, -1.0, 1.75
    scales = np.array([[0.5, 0.25]], np.float32)
    c = compress(w, "bitmask", grid=(scales, 16))
    assert c.arrays["values"].tolist() == [3, -2, 7] and c.block == 16
    assert c.nbytes == 3 + 2 * 2 + 2 * 8 + 2 * 4  # int8 values, two mask words, row offsets, two scales
    two_four = compress(w, "2:4", grid=(scales, 16))
    assert two_four.arrays["values"][0, :2].tolist() == [3, -2] and two_four.arrays["values"][0, 8:10].tolist() == [0, 7]
    for c in (two_four, compress(w, "dense", grid=(scales, 16))):
        y = native.NativeWeight(c)(np.ones((1, 32), np.float32))
        assert y.tolist() == [[1.5 - 1.0 + 1.75]]
    with pytest.raises(ValueError, match="'q_proj' is not on its int8 grid: 1 values"):
        compress(w + np.eye(1, 32, 5, dtype=np.float32) * 0.3, "bitmask", grid=(scales, 16), name="q_proj")
    with pytest.raises(ValueError, match=r"scales of 'weight' have shape \(1, 1\), expected \(1, 2\)"):
        compress(w, "bitmask", grid=(scales[:, :1], 16))
    with pytest.raises(ValueError, match="expected int8"):
        native.NativeWeight(CompressedWeight("dense", (1, 32), {"values": w, "scales": scales}, 16))


def test_stacking_keeps_int8_and_falls_back_to_fp32_on_mixed_precisions():
    rng = np.random.default_rng(5)
    a = prune_two_four(rng.standard_normal((8, 64)).astype(np.float32))
    a, sa = on_int8_grid(a, 32, rng)
    b, sb = on_int8_grid(rng.standard_normal((4, 64)).astype(np.float32), 32, rng)
    x = rng.standard_normal((1, 64)).astype(np.float32)
    ref = x.astype(np.float64) @ np.concatenate([a, b]).T.astype(np.float64)
    parts = [native.NativeWeight(compress(a, "2:4", grid=(sa, 32))), native.NativeWeight(compress(b, "dense", grid=(sb, 32)))]
    stacked = native.NativeWeight.stacked(parts)
    assert stacked.block == 32 and stacked.stored_values.dtype == np.int8 and stacked.format == "2:4+dense"
    np.testing.assert_allclose(stacked(x), ref, atol=1e-4)
    mixed = native.NativeWeight.stacked([parts[0], native.NativeWeight(b)])
    assert mixed.block == 0 and mixed.stored_values.dtype == np.float32
    np.testing.assert_allclose(mixed(x), ref, atol=1e-4)


@pytest.mark.parametrize("isa", ["avx512f", "avx2+fma"])
@pytest.mark.parametrize("rows", [1, 3, 6])
def test_int8_activation_kernel_computes_the_block_quantized_product(rows, isa):
    """accuracy_level 4 (dense int8 in blocks of 32): x is quantized per block of 32 (symmetric, round to
    nearest even) and multiplied in int8 by VNNI, or on AVX2 by `vpmaddubsw` (|w| times x with w's sign)
    — equal to that computation done in float64; with int8 activations (and 16-bit ones) switched off
    the same weight gives the exact fp32 result."""
    if isa not in ISAS:
        pytest.skip(f"this CPU has no {isa}")
    if isa == "avx512f" and not native.int8_activations():
        pytest.skip("this CPU has no AVX-512 VNNI: the int8-activation kernel does not run here")
    best = native.isa()
    native.set_isa(isa)
    try:
        _int8_activation_product(rows)
    finally:
        native.set_isa(best)


def _int8_activation_product(rows: int) -> None:
    rng = np.random.default_rng(rows)
    n, k = 37, 192
    w, scales = on_int8_grid(rng.standard_normal((n, k)).astype(np.float32), 32, rng)
    weight = native.NativeWeight(compress(w, "dense", grid=(scales, 32)), int8_activations=True)
    assert weight.int8_activations
    x = (rng.standard_normal((rows, k)) * np.where(rng.random(k) < 0.05, 20.0, 1.0)).astype(np.float32)  # a few outliers
    x[0, :32] = 0.0  # an all-zero block
    xb = x.reshape(rows, k // 32, 32).astype(np.float64)
    sx = np.abs(x.reshape(rows, k // 32, 32)).max(-1).astype(np.float32) / np.float32(127)
    sx = np.where(sx > 0, sx, 1.0)
    qx = np.clip(np.rint(x.reshape(rows, k // 32, 32) * (np.float32(1) / sx[..., None]).astype(np.float32)), -127, 127).astype(np.float64)
    codes = np.rint(w.reshape(n, k // 32, 32) / scales[..., None]).astype(np.float64)
    emulated = np.einsum("mbk,nbk,nb,mb->mn", qx, codes, scales.astype(np.float64), sx.astype(np.float64))
    exact = xb.reshape(rows, k) @ w.T.astype(np.float64)
    got = weight(x)
    np.testing.assert_allclose(got, emulated, atol=1e-4 * (1 + np.abs(emulated).max()), rtol=0)
    assert np.abs(got - exact).max() > 1e-6  # the activations really were quantized
    np.testing.assert_allclose(got, exact, atol=0.02 * (1 + np.abs(exact).max()), rtol=0)
    try:
        native.int8_activations(False)
        native.int16_activations(False)  # (else the 16-bit kernel: tested below)
        np.testing.assert_allclose(weight(x), exact, atol=1e-5 * (1 + np.abs(exact).max()), rtol=0)
    finally:
        native.int8_activations(True)
        native.int16_activations(True)
    plain = native.NativeWeight(compress(w, "dense", grid=(scales, 32)))  # accuracy_level 0: fp32 (or 16-bit) activations
    assert not plain.int8_activations
    native.int16_activations(False)
    try:
        np.testing.assert_allclose(plain(x), exact, atol=1e-5 * (1 + np.abs(exact).max()), rtol=0)
    finally:
        native.int16_activations(True)


def test_every_isa_gives_the_scalar_result_bit_for_bit_on_sums_of_one_term():
    # one kept weight per row: every path must return exactly w * x (no rounding differences)
    rng = np.random.default_rng(1)
    w = np.zeros((33, 64), np.float32)
    w[np.arange(33), rng.integers(0, 64, 33)] = rng.standard_normal(33)
    x = rng.standard_normal((3, 64)).astype(np.float32)
    weight = native.NativeWeight(compress(w, "bitmask"))
    outs = []
    for isa in ISAS:
        native.set_isa(isa)
        outs.append(weight(x))
    for o in outs:
        np.testing.assert_array_equal(o, (x @ w.T).astype(np.float32))


def test_threads_and_shape_errors():
    native.set_threads(1)
    assert native.threads() == 1
    native.set_threads(2)
    assert native.threads() == 2
    weight = native.NativeWeight(compress(np.eye(8, dtype=np.float32)))
    with pytest.raises(ValueError, match="expects 8"):
        weight(np.ones((1, 9), np.float32))
    with pytest.raises(ValueError, match="not available"):
        native.set_isa("neon")


def test_copy_bandwidth_is_measured():
    bw = native.copy_bandwidth(8 << 20, 2)
    assert 1e8 < bw < 1e13  # bytes/s: a real measurement, not a constant


def test_build_script_names_a_missing_compiler(tmp_path):
    import subprocess
    from pathlib import Path

    script = Path(native.__file__).parent / "build.sh"
    out = subprocess.run(["bash", str(script)], env={"PATH": "/usr/bin:/bin", "CXX": str(tmp_path / "no-such-c++")}, capture_output=True, text=True)
    assert out.returncode == 1
    assert "no C++17 compiler found" in out.stderr and "apt-get install g++" in out.stderr


def _on_q4_grid(w: np.ndarray) -> np.ndarray:
    """``w`` dequantized from GGUF's Q4_1 (blocks of 32: fp16 scale (max − min) / 15 and minimum, codes 0..15)."""
    n, k = w.shape
    b = w.reshape(n, k // 32, 32).astype(np.float32)
    lo, hi = b.min(-1, keepdims=True), b.max(-1, keepdims=True)
    d = ((hi - lo) / 15).astype(np.float16).astype(np.float32)
    m = lo.astype(np.float16).astype(np.float32)
    q = np.clip(np.rint((b - m) / np.where(d > 0, d, 1)), 0, 15)
    return (q * d + m).astype(np.float32).reshape(n, k)


@pytest.mark.parametrize("isa", ["scalar", "avx2+fma", "avx512f"])
def test_int4_kernel_matches_dense_reference_and_the_float32_kernel(isa):
    """The 4-bit format on random Q4_1-grid weights (a constant block, a block of one value and zero
    blocks included), 1-40 rows, M = 1..6: the codes decompress to the weight bit for bit, the GEMV
    equals a float64 dense product, and equals the float32 dense kernel's result bit for bit (the
    weights are rebuilt exactly and summed in its order)."""
    from core.sparse_format import compress, decompress, exact_int4_grid

    if isa not in ISAS:
        pytest.skip(f"this CPU has no {isa}")
    best = native.isa()
    rng = np.random.default_rng(7)
    try:
        native.set_isa(isa)
        for n, k in [(1, 32), (5, 64), (17, 96), (40, 576), (8, 1536)]:
            w = _on_q4_grid(rng.standard_normal((n, k)).astype(np.float32) * rng.uniform(0.01, 2.0, (n, 1)).astype(np.float32))
            w[0, :32] = 0.0  # a zero block: scale 0
            if k >= 64:
                w[-1, 32:64] = np.float32(0.375)  # a constant block: scale 0, offset the value
            assert exact_int4_grid(w) is not None
            c = compress(w, "int4")
            assert c.nbytes == n * k // 2 + 2 * 4 * n * k // 32 and c.value_type == "int4"
            assert np.array_equal(decompress(c), w)
            nw, fw = native.NativeWeight(c), native.NativeWeight(w)
            # Q4_1's scales and minima are fp16: the kernel reads them so (2 bytes each), exactly
            assert nw.half_grid and nw.nbytes == n * k // 2 + 2 * 2 * n * k // 32
            assert np.array_equal(nw.to_dense(), w)
            assert np.array_equal(decompress(nw.compressed()), w) and nw.compressed().arrays["scales"].dtype == np.float32
            for m in (1, 2, 3, 4, 6):
                x = rng.standard_normal((m, k)).astype(np.float32)
                y = nw.gemv(x)
                ref = x.astype(np.float64) @ w.T.astype(np.float64)
                np.testing.assert_allclose(y, ref, atol=1e-4 * (1 + np.abs(ref).max()), rtol=0)
                assert np.array_equal(y, fw.gemv(x))
                # the same half grid as separate arrays (stride 0), by the C API: the same result
                half = {key: np.ascontiguousarray(c.arrays[key], np.float16) for key in ("scales", "offsets")}
                y2 = np.empty((m, n), np.float32)
                ptr = lambda a: a.ctypes.data_as(ctypes.c_void_p)  # noqa: E731
                native.lib().pk_gemv_int4(n, k, ptr(c.arrays["values"]), ptr(half["scales"]), ptr(half["offsets"]), 2, 0, 0, ptr(x), m, ptr(y2))
                assert np.array_equal(y2, y)
    finally:
        native.set_isa(best)


@given(n=st.integers(1, 70), kb=st.integers(1, 6), pick=st.sampled_from(["none", "one", "some", "all", "repeat"]), int8x=st.booleans(),
       seed=st.integers(0, 2**16))
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_int4_row_subset_is_those_rows_of_the_full_product(n, kb, pick, int8x, seed):
    """The CATS decode's up projection: a row subset of a 4-bit weight (``gemv_rows``, any listed rows in
    any order, none, all, repeats; fp16 grids interleaved, on every instruction set, with and without
    int8 activations) equals those rows of the full GEMV bit for bit."""
    rng = np.random.default_rng(seed)
    k = 32 * kb * 2
    w = _on_q4_grid(rng.standard_normal((n, k)).astype(np.float32))
    x = rng.standard_normal((1, k)).astype(np.float32)
    rows = {"none": np.zeros(0, np.int64), "one": rng.integers(0, n, 1), "some": rng.permutation(n)[: max(1, n // 3)],
            "all": np.arange(n), "repeat": rng.integers(0, n, 2 * n)}[pick]
    for isa in ISAS:
        native.set_isa(isa)
        nw = native.NativeWeight(compress(w, "int4"), int8_activations=int8x)
        assert nw.half_grid or int8x  # (the int8-activation option widens the grids to float32)
        full = nw.gemv(x)[0]
        assert np.array_equal(nw.gemv_rows(x, rows), full[rows]), (isa, pick)
    with pytest.raises(ValueError, match=r"rows must be in \[0, "):
        nw.gemv_rows(x, np.array([n]))
    with pytest.raises(ValueError, match="row subsets run on int4"):
        native.NativeWeight(w).gemv_rows(x, np.array([0]))


def test_int4_grid_that_is_not_fp16_stays_float32():
    """A grid value that fp16 cannot hold exactly (or only as a subnormal, outside the kernels' exact
    widening) keeps the weight's grid in float32; the result is the float32 kernel's either way."""
    from core.sparse_format import compress

    rng = np.random.default_rng(11)
    w = _on_q4_grid(rng.standard_normal((4, 64)).astype(np.float32))
    c = compress(w, "int4")
    for row, value in ((1, np.float32(0.1)), (2, np.float32(2.0**-20))):  # 0.1: not an fp16; 2^-20: an fp16 subnormal
        odd = {k: v.copy() for k, v in c.arrays.items()}
        odd["scales"][row, 0] = value
        cw = type(c)("int4", c.shape, odd, c.block)
        nw = native.NativeWeight(cw)
        assert not nw.half_grid and nw.nbytes == cw.nbytes
        x = rng.standard_normal((2, 64)).astype(np.float32)
        dense = nw.to_dense()
        assert np.array_equal(nw.gemv(x), native.NativeWeight(dense).gemv(x))


def test_int4_format_errors_and_stacking():
    from core.sparse_format import compress, exact_int4_grid

    rng = np.random.default_rng(8)
    w = _on_q4_grid(rng.standard_normal((6, 64)).astype(np.float32))
    off = w.copy()
    off[2, 5] = np.nextafter(off[2, 5], np.float32(10))  # a float step off its code
    assert exact_int4_grid(off) is None and exact_int4_grid(w[:, :48]) is None
    with pytest.raises(ValueError, match="'blk.2.q' is not on an exact 4-bit grid"):
        compress(off, "int4", name="blk.2.q")
    assert exact_int4_grid(rng.standard_normal((6, 64)).astype(np.float32)) is None
    # q, k and v stacked: int4 parts stay int4; with a float32 part they run as float32, same result
    parts = [native.NativeWeight(compress(_on_q4_grid(rng.standard_normal((r, 64)).astype(np.float32)), "int4")) for r in (8, 4, 4)]
    x = rng.standard_normal((1, 64)).astype(np.float32)
    ref = np.concatenate([p.gemv(x) for p in parts], axis=1)
    st = native.NativeWeight.stacked(parts)
    assert st.format == "int4" and st.half_grid and np.array_equal(st.gemv(x), ref)
    floats = [native.NativeWeight(p.compressed(), half_grid=False) for p in parts]  # grids kept float32: the same result
    assert not any(p.half_grid for p in floats) and np.array_equal(np.concatenate([p.gemv(x) for p in floats], axis=1), ref)
    assert not native.NativeWeight.stacked(floats).half_grid
    mixed = native.NativeWeight.stacked(parts[:2] + [native.NativeWeight(parts[2].to_dense())])
    assert mixed.format == "dense" and np.array_equal(mixed.gemv(x), ref)


@pytest.mark.parametrize("isa", ["avx512f", "avx2+fma"])
def test_int4_int8_activation_kernel_computes_the_block_quantized_product(isa):
    """int4 weights with int8 activations (AVX-512 VNNI, or AVX2's maddubs): equal to the same
    per-block activation quantization done in float64 (scale max|x|/127 per 32 inputs, round to
    nearest even, Σ offset · Σx in float), not exactly the float32 result; on AVX2 an fp16 grid gives
    the float grid's result bit for bit; K % 64 != 0 and the switch off give the exact path."""
    from core.sparse_format import compress

    if isa not in ISAS:
        pytest.skip(f"this CPU has no {isa}")
    if isa == "avx512f" and not native.int8_activations():
        pytest.skip("this CPU has no AVX-512 VNNI: its int4 × int8-activation kernel does not run here")
    best = native.isa()
    rng = np.random.default_rng(9)
    ptr = lambda a: a.ctypes.data_as(ctypes.c_void_p)  # noqa: E731
    try:
        native.set_isa(isa)
        assert native.int4_int8_activations(64)
        assert native.int4_int8_activations(64, half_grid=True) == (isa == "avx2+fma")  # the VNNI kernel reads float grids only
        for n, k, m in [(7, 128, 1), (40, 576, 1), (9, 1536, 3), (5, 256, 6), (3, 64, 2), (6, 192, 5)]:
            w = _on_q4_grid(rng.standard_normal((n, k)).astype(np.float32))
            c = compress(w, "int4")
            nw = native.NativeWeight(c, int8_activations=True)
            assert nw.int8_activations
            x = (rng.standard_normal((m, k)) * rng.uniform(0.1, 3.0, (m, 1))).astype(np.float32)
            xb = x.reshape(m, k // 32, 32)
            sx = (np.abs(xb).max(-1) / np.float32(127)).astype(np.float32)
            qx = np.clip(np.rint(xb * (np.float32(1) / sx)[..., None]), -127, 127)
            packed = c.arrays["values"].reshape(n, k // 32, 16)
            codes = np.concatenate([packed & 15, packed >> 4], axis=-1).astype(np.float64)  # (n, nb, 32)
            dots = np.einsum("nbj,mbj->mnb", codes, qx.astype(np.float64))
            ref = (dots * c.arrays["scales"].astype(np.float64)[None] * sx.astype(np.float64)[:, None, :]).sum(-1)
            ref += xb.astype(np.float32).sum(-1).astype(np.float64) @ c.arrays["offsets"].astype(np.float64).T
            y = nw.gemv(x)
            np.testing.assert_allclose(y, ref, atol=2e-5 * (1 + np.abs(ref).max()), rtol=0)
            exact = native.NativeWeight(c).gemv(x)
            assert not np.array_equal(y, exact)  # really int8 activations
            np.testing.assert_allclose(y, exact, atol=0.05 * (1 + np.abs(exact).max()), rtol=0)
            if isa == "avx2+fma":  # the grid as fp16 (separate arrays, by the C API): the same result
                half = {key: np.ascontiguousarray(c.arrays[key], np.float16) for key in ("scales", "offsets")}
                y2 = np.empty((m, n), np.float32)
                native.lib().pk_gemv_int4(n, k, ptr(c.arrays["values"]), ptr(half["scales"]), ptr(half["offsets"]), 2, 0, 1, ptr(x), m, ptr(y2))
                assert np.array_equal(y2, y)
            native.int8_activations(False)
            try:
                assert np.array_equal(nw.gemv(x), exact)
            finally:
                native.int8_activations(True)
        odd = native.NativeWeight(compress(_on_q4_grid(rng.standard_normal((4, 96)).astype(np.float32)), "int4"), int8_activations=True)
        assert not odd.int8_activations  # K % 64 != 0: fp32 activations
    finally:
        native.set_isa(best)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(1, 23), windows=st.one_of(st.integers(1, 12), st.just(32)), rows=st.integers(1, 6), block=st.sampled_from([32, 64, 128, 1024]),
       seed=st.integers(0, 2**16))
def test_two_four_int4_int8_activation_kernel_on_avx2(n, windows, rows, block, seed):
    """2:4-int4 with the int8_activations option on the AVX2 path: the engine holds the nibble layout
    and the kernel computes the product with x rounded to int8 per block of the weight's grid (scale
    max|x| / 127; equal to that product in float64), odd row counts (a padding row), groups with one or no
    kept value, an all-zero row, a zero row of x and a block of 1024 inputs included; the layout
    gives back the format's arrays; with the switch off, AVX-512 forced, or without the option: the
    float kernels' exact result."""
    import torch

    from core.quant import QuantScheme, rtn

    if "avx2+fma" not in ISAS:
        pytest.skip("this CPU has no AVX2")
    best = native.isa()
    rng = np.random.default_rng(seed)
    k = 32 * windows
    w = prune_two_four(rng.standard_normal((n, k)).astype(np.float32))
    w[rng.random((n, k)) < 0.2] = 0.0
    if n > 2:
        w[1] = 0.0
    blk = block if k % block == 0 else 32  # (the quantizer's blocks divide K)
    deq, scales, zeros = (t.numpy() for t in rtn(torch.from_numpy(w), QuantScheme(4, blk)))
    c = compress(deq, "2:4-int4", grid=(scales, zeros, blk), name="blk.0.up")
    x = (rng.standard_normal((rows, k)) * rng.uniform(0.1, 5.0, k)).astype(np.float32)
    x[rows // 2] = 0.0
    try:
        native.set_isa("avx2+fma")
        nw = native.NativeWeight(c, int8_activations=True)
        assert nw.nibbles_ptr() is not None and nw.int8_activations
        assert all(np.array_equal(nw.compressed().arrays[key], c.arrays[key]) for key in c.arrays)
        exact = native.NativeWeight(c).gemv(x)
        assert native.NativeWeight(c).nibbles_ptr() is None  # only with the option
        y = nw.gemv(x)
        xb = x.reshape(rows, k // blk, blk)  # x rounded per block of the grid: sx = max|x| / 127, round half to even
        amax = np.abs(xb).max(-1, keepdims=True)
        sx = np.where(amax > 0, amax / np.float32(127), np.float32(1)).astype(np.float32)
        xq = (np.clip(np.rint(xb * (np.float32(1) / sx)), -127, 127) * sx).reshape(rows, k)
        ref = xq.astype(np.float64) @ deq.astype(np.float64).T
        np.testing.assert_allclose(y, ref, atol=2e-5 * (1 + np.abs(ref).max()), rtol=0)
        assert not (rows > 1 and np.any(deq)) or not np.array_equal(y, exact)  # really int8 activations
        assert not np.any(y[rows // 2])
        if n > 2:
            assert not np.any(y[:, 1])
        native.int8_activations(False)
        try:
            assert np.array_equal(nw.gemv(x), exact)
        finally:
            native.int8_activations(True)
        if "avx512f" in ISAS:
            native.set_isa("avx512f")
            assert np.array_equal(nw.gemv(x), native.NativeWeight(c).gemv(x))  # the layout is read on AVX2 only
    finally:
        native.set_isa(best)


def test_int8_block_rounding_is_numpys_round_half_even():
    """The prefill path's rounding of x (C, per row and block of 32): q · scale with scale = max|x| / 127
    and q NumPy's round-half-to-even of x · (1 / scale), clipped to ±127, bit for bit — halves included
    (x = (j + 0.5) · scale) and an all-zero block (scale 1) — and d = Σx − Σ q · scale per block."""
    rng = np.random.default_rng(13)
    x = (rng.standard_normal((5, 96)) * rng.uniform(0.01, 30.0, (5, 1))).astype(np.float32)
    x[1, 32:64] = 0.0
    x[2, :32] = (np.arange(32) - 16 + 0.5).astype(np.float32) * np.float32(0.25)  # halves of the step 0.25 · 17 / 127 … exactly
    x[2, 0] = np.float32(127 * 0.25)  # the block's largest |x|: scale 0.25 exactly
    xq, d = native.int8_block_activations(x)
    b = x.reshape(5, 3, 32)
    amax = np.abs(b).max(-1, keepdims=True)
    sx = np.where(amax > 0, amax / np.float32(127), np.float32(1)).astype(np.float32)
    ref = (np.clip(np.rint(b * (np.float32(1) / sx)), -127, 127) * sx).astype(np.float32)
    assert np.array_equal(xq, ref.reshape(5, 96))
    assert np.array_equal(xq[2, 1:32], np.rint(x[2, 1:32] / np.float32(0.25)) * np.float32(0.25))  # halves to even
    np.testing.assert_allclose(d, (b.astype(np.float64).sum(-1) - ref.astype(np.float64).sum(-1)), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="blocks of 32"):
        native.int8_block_activations(x[:, :40])


def test_int4_int8_activation_prefill_on_avx2_is_the_kernels_result():
    """Prefill (more than GEMV_MAX_ROWS rows) of an int4 weight with int8 activations on the AVX2 path:
    the activations rounded as the kernel rounds them, by the decompressed tiles and the dense GEMM,
    plus the offsets times the float sums' remainder — each row equal to the kernel's own result for
    that row (float rounding apart), in both grid forms; not the fp32-activation result."""
    import torch

    from core.quant import QuantScheme, rtn
    from core.sparse_format import compress

    if "avx2+fma" not in ISAS:
        pytest.skip("this CPU has no AVX2")
    rng = np.random.default_rng(12)
    best = native.isa()
    try:
        native.set_isa("avx2+fma")
        for n, k, zp in [(40, 576, False), (33, 192, True), (1536, 576, False)]:
            w = rng.standard_normal((n, k)).astype(np.float32)
            if zp:
                deq, scales, zeros = (t.numpy() for t in rtn(torch.from_numpy(w), QuantScheme(4, 32)))
                c = compress(deq, "int4", grid=(scales, zeros, 32))
            else:
                c = compress(_on_q4_grid(w), "int4")
            nw = native.NativeWeight(c, int8_activations=True)
            x = (rng.standard_normal((native.GEMV_MAX_ROWS + 9, k)) * rng.uniform(0.1, 3.0, (native.GEMV_MAX_ROWS + 9, 1))).astype(np.float32)
            x[2, :32] = 0.0  # an all-zero block
            y = nw(x)
            rows = np.concatenate([nw.gemv(x[i : i + 1]) for i in range(x.shape[0])])
            np.testing.assert_allclose(y, rows, atol=3e-5 * (1 + np.abs(rows).max()), rtol=0)
            exact = native.NativeWeight(c)(x)
            assert np.abs(y - exact).max() > 10 * np.abs(y - rows).max()  # the int8 result, not the fp32 one
    finally:
        native.set_isa(best)


@pytest.mark.parametrize("block", [32, 64])
def test_int4_zero_point_form_is_the_quantize_pass_grid_bit_for_bit(block):
    """The quantize pass's 4-bit grid ((code − zero) · scale, blocks of 32 or 64) in the int4 format's
    zero-point form: decompresses to the weight bit for bit, and every ISA's GEMV equals the float32
    dense kernel's bit for bit; with int8 activations (VNNI) close to it; a weight off the grid and a
    block of 16 are refused by name."""
    import torch

    from core.quant import QuantScheme, rtn
    from core.sparse_format import compress, decompress

    rng = np.random.default_rng(10)
    w = rng.standard_normal((24, 192)).astype(np.float32)
    w[3, :64] = 0.0
    deq, scales, zeros = (t.numpy() for t in rtn(torch.from_numpy(w), QuantScheme(4, block)))
    c = compress(deq, "int4", grid=(scales, zeros, block), name="blk.0.up")
    assert "zeros" in c.arrays and c.arrays["scales"].shape == (24, 6) and np.array_equal(decompress(c), deq)
    x = rng.standard_normal((3, 192)).astype(np.float32)
    best = native.isa()
    try:
        for isa in ISAS:
            native.set_isa(isa)
            nw, fw = native.NativeWeight(c), native.NativeWeight(deq)
            assert np.array_equal(nw.to_dense(), deq)
            assert np.array_equal(nw.gemv(x), fw.gemv(x))
    finally:
        native.set_isa(best)
    if native.int8_activations():
        y = native.NativeWeight(c, int8_activations=True).gemv(x)
        exact = native.NativeWeight(c).gemv(x)
        assert not np.array_equal(y, exact)
        np.testing.assert_allclose(y, exact, atol=0.05 * (1 + np.abs(exact).max()), rtol=0)
    off = deq.copy()
    off[1, 1] = np.nextafter(off[1, 1], np.float32(9))
    with pytest.raises(ValueError, match="'blk.0.up' is not on its 4-bit grid"):
        compress(off, "int4", grid=(scales, zeros, block), name="blk.0.up")
    d16, s16, z16 = (t.numpy() for t in rtn(torch.from_numpy(w), QuantScheme(4, 16)))
    with pytest.raises(ValueError, match="multiple of 32"):
        compress(d16, "int4", grid=(s16, z16, 16), name="blk.0.up")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 40),
    windows=st.integers(1, 20),
    rows=st.sampled_from([1, 2, 3, 4, 5, 6, 9]),
    block=st.sampled_from([32, 64, 128]),
    seed=st.integers(0, 2**16),
)
def test_two_four_int4_matches_the_float32_two_four_kernel_bit_for_bit(n, windows, rows, block, seed):
    """2:4 weights on the quantize pass's 4-bit grid (RTN, blocks of 32-128, a partial last block when K is
    not a multiple of it, all-zero rows): ``2:4-int4`` decompresses to the weight bit for bit (NumPy and
    every ISA), its GEMV equals a float64 dense product on every ISA and the float32 2:4 kernel's result
    bit for bit on the SIMD ones (same values, same order); the tiled prefill path agrees."""
    import torch

    from core.quant import QuantScheme, rtn

    rng = np.random.default_rng(seed)
    k = 32 * windows
    w = prune_two_four(rng.standard_normal((n, k)).astype(np.float32))
    if n > 2:
        w[1] = 0.0
    deq, scales, zeros = (t.numpy() for t in rtn(torch.from_numpy(w), QuantScheme(4, block)))
    assert np.array_equal(deq == 0, (deq == 0) | (w == 0)) and not (deq[w == 0]).any()  # RTN keeps the zeros
    c = compress(deq, "2:4-int4", grid=(scales, zeros, block), name="blk.0.up")
    assert c.value_type == "int4" and c.arrays["values"].shape == (n, k // 4) and c.arrays["zeros"].dtype == np.uint8
    assert np.array_equal(decompress(c), deq)
    _float_kernels_match(c, deq, "2:4", rng.standard_normal((rows, k)).astype(np.float32))  # (the 16-bit kernel: test_two_four_int4_int16_...)


def _float_kernels_match(c: CompressedWeight, deq: np.ndarray, float_format: str, x: np.ndarray) -> None:
    """The 16-bit kernels switched off, on every instruction set: the 4-bit weight ``c`` decompresses to
    ``deq``, its GEMV is within float32 error of the float64 product and, on the SIMD paths, bit for bit
    the float32 ``float_format`` kernel's result (same values, same order); the tiled prefill agrees."""
    ref = x.astype(np.float64) @ deq.T.astype(np.float64)
    bound = 1e-5 * (np.abs(x).astype(np.float64) @ np.abs(deq).T.astype(np.float64)) + 1e-6
    native.int16_activations(False)
    try:
        for isa in ISAS:
            native.set_isa(isa)
            nw, fw = native.NativeWeight(c), native.NativeWeight(compress(deq, float_format))
            assert np.array_equal(nw.to_dense(), deq), isa
            y = nw.gemv(x)
            assert (np.abs(y - ref) <= bound).all(), (isa, float(np.abs(y - ref).max()))
            if isa != "scalar":
                assert np.array_equal(y, fw.gemv(x)), isa
            assert (np.abs(nw.gemm_tiled(np.repeat(x, 4, 0)) - np.repeat(ref, 4, 0)) <= np.repeat(bound, 4, 0)).all(), isa
    finally:
        native.int16_activations(True)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 40),
    windows=st.integers(1, 25),
    rows=st.sampled_from([1, 2, 3, 4, 5, 9]),
    block=st.sampled_from([32, 64, 128, 256, 512]),
    seed=st.integers(0, 2**16),
)
def test_two_four_int4_int16_activation_kernel_computes_the_rounded_product(n, windows, rows, block, seed):
    """The 2:4-int4 × 16-bit kernel (twofour_int4_vnni_avx512.cpp; AVX-512 VNNI + VBMI): any K of whole
    windows (a partial last step of 1-3 windows, a partial last block), all-zero rows and groups holding
    fewer than two non-zeros, 1-9 rows of x, a zero row of x, blocks of 32-512 (a grid per lane or per
    step): equals the float64 product of x rounded to 1/32639 of each row's largest |x| within float32
    summation error; within 2e-5 of the unrounded product (relative to the row's largest |x| · Σ|w|);
    the paired layout the engine holds gives back the format's arrays and its dense weight; separate
    arrays (stride 0, not paired) run the float kernel (the float32 2:4 kernel's result bit for bit);
    stacked parts agree."""
    import torch

    from core.quant import QuantScheme, rtn

    if not native.twofour_int4_int16():
        pytest.skip(f"the 16-bit 2:4-int4 kernel needs AVX-512 VNNI and VBMI (this CPU's best: {native.best_isa()})")
    rng = np.random.default_rng(seed)
    k = 32 * windows
    w = prune_two_four(rng.standard_normal((n, k)).astype(np.float32))
    w[rng.random((n, k)) < 0.2] = 0.0  # groups with one or no kept value
    if n > 2:
        w[1] = 0.0
    deq, scales, zeros = (t.numpy() for t in rtn(torch.from_numpy(w), QuantScheme(4, block)))
    c = compress(deq, "2:4-int4", grid=(scales, zeros, block), name="blk.0.up")
    x = (rng.standard_normal((rows, k)) * rng.uniform(0.1, 5.0, k)).astype(np.float32)
    x[rows // 2] = 0.0
    nw = native.NativeWeight(c)
    y = _x16_product_checked(nw, deq, x)
    a = {key: np.ascontiguousarray(v) for key, v in c.arrays.items()}
    xs = np.ascontiguousarray(x)
    back = nw.compressed().arrays
    assert all(np.array_equal(back[key], a[key]) for key in a) and np.array_equal(nw.to_dense(), deq)
    separate = np.empty((rows, n), np.float32)
    native.lib().pk_gemv_24_int4(n, k, _ptr(a["values"]), _ptr(a["positions"]), _ptr(a["scales"]), _ptr(a["zeros"]), block, 0, 0, nw.row_sums_ptr(), None, _ptr(xs), rows,
                                 _ptr(separate))
    assert np.array_equal(separate, native.NativeWeight(compress(deq, "2:4")).gemv(x))
    both = native.NativeWeight.stacked([nw, native.NativeWeight(c)])
    assert np.array_equal(both.gemv(x), np.concatenate([y, y], axis=1))


def test_two_four_int4_int16_kernel_is_used_only_where_it_applies():
    """Grid blocks over 512 inputs, another instruction set forced, the switch off, or no row sums given:
    the float kernel (bit for bit the float32 2:4 kernel's result); otherwise not (the rounding shows)."""
    import torch

    from core.quant import QuantScheme, rtn

    if not native.twofour_int4_int16():
        pytest.skip(f"the 16-bit 2:4-int4 kernel needs AVX-512 VNNI and VBMI (this CPU's best: {native.best_isa()})")
    rng = np.random.default_rng(5)
    w = prune_two_four(rng.standard_normal((24, 1024)).astype(np.float32))
    x = rng.standard_normal((1, 1024)).astype(np.float32)
    assert native.twofour_int4_int16(32) and native.twofour_int4_int16(512) and not native.twofour_int4_int16(1024)
    for block in (64, 1024):
        deq, scales, zeros = (t.numpy() for t in rtn(torch.from_numpy(w), QuantScheme(4, block)))
        c = compress(deq, "2:4-int4", grid=(scales, zeros, block))
        nw, fw = native.NativeWeight(c), native.NativeWeight(compress(deq, "2:4"))
        assert np.array_equal(nw.gemv(x), fw.gemv(x)) == (block == 1024)
        a = {key: np.ascontiguousarray(v) for key, v in c.arrays.items()}
        y = np.empty((1, 24), np.float32)
        native.lib().pk_gemv_24_int4(24, 1024, _ptr(a["values"]), _ptr(a["positions"]), _ptr(a["scales"]), _ptr(a["zeros"]), block, 0, 0, None, None, _ptr(x), 1, _ptr(y))
        assert np.array_equal(y, fw.gemv(x))  # no row sums: the float kernel
        _float_kernel_when_16_bit_is_off(nw, fw, x, native.twofour_int4_int16)


def test_two_four_int4_format_errors_and_stacking():
    """The format refuses what it cannot hold, naming the weight: a value off the grid, K not a multiple
    of 32, a block under 32, a pattern that is not 2:4; q, k and v stack into one ``2:4-int4`` weight,
    and with a float32 2:4 part the stack falls back to float32 2:4 values (bit for bit the same)."""
    import torch

    from core.quant import QuantScheme, rtn

    rng = np.random.default_rng(3)
    parts, deqs = [], []
    for n in (8, 4, 4):
        w = prune_two_four(rng.standard_normal((n, 64)).astype(np.float32))
        deq, s, z = (t.numpy() for t in rtn(torch.from_numpy(w), QuantScheme(4, 32)))
        parts.append(native.NativeWeight(compress(deq, "2:4-int4", grid=(s, z, 32), name="q")))
        deqs.append(deq)
    grid0 = parts[0].compressed().arrays
    off = deqs[0].copy()
    off[0, np.flatnonzero(off[0])[0]] *= 1.0001
    with pytest.raises(ValueError, match="'blk.3.q' is not on its 4-bit grid"):
        compress(off, "2:4-int4", grid=(grid0["scales"], grid0["zeros"].astype(np.float32), 32), name="blk.3.q")
    w48 = prune_two_four(rng.standard_normal((2, 48)).astype(np.float32))
    with pytest.raises(ValueError, match="K % 32 == 0"):
        compress(w48, "2:4-int4", grid=(np.ones((2, 2), np.float32), np.zeros((2, 2), np.float32), 32), name="blk.0.o")
    with pytest.raises(ValueError, match="power of two >= 32"):
        compress(deqs[1], "2:4-int4", grid=(np.ones((4, 4), np.float32), np.zeros((4, 4), np.float32), 16), name="blk.0.o")
    dense = rng.standard_normal((2, 64)).astype(np.float32)
    with pytest.raises(ValueError, match="not 2:4"):
        compress(dense, "2:4-int4", grid=(np.ones((2, 2), np.float32), np.full((2, 2), 8, np.float32), 32), name="blk.0.o")
    with pytest.raises(ValueError, match="needs its 4-bit grid"):
        compress(deqs[1], "2:4-int4", name="blk.0.o")
    x = rng.standard_normal((2, 64)).astype(np.float32)
    stacked = native.NativeWeight.stacked(parts)
    assert stacked.format == "2:4-int4" and stacked.n == 16
    assert np.array_equal(stacked.gemv(x), np.concatenate([p.gemv(x) for p in parts], axis=1))
    mixed = native.NativeWeight.stacked([parts[0], native.NativeWeight(compress(deqs[1], "2:4"))])
    assert mixed.format == "2:4" and np.array_equal(mixed.to_dense(), np.concatenate(deqs[:2]))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 40),
    k=st.integers(1, 300),
    rows=st.sampled_from([1, 2, 3, 4, 5, 6, 9]),
    sparsity=st.sampled_from([0.0, 0.3, 0.5, 0.7, 0.95, 1.0]),
    block=st.sampled_from([16, 32, 64, 128]),
    seed=st.integers(0, 2**16),
)
def test_bitmask_int4_matches_the_float32_bitmask_kernel_bit_for_bit(n, k, rows, sparsity, block, seed):
    """Unstructured weights (any K, a partial last word and block, empty and full words) on the quantize
    pass's 4-bit grid stored as ``bitmask-int4``: decompresses to the weight bit for bit (NumPy and every
    ISA); the GEMV equals a float64 dense product on every ISA and the float32 bitmask kernel's result
    bit for bit on the SIMD ones; the tiled prefill path agrees."""
    import torch

    from core.quant import QuantScheme, rtn

    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k)).astype(np.float32)
    w[rng.random((n, k)) < sparsity] = 0.0
    deq, scales, zeros = (t.numpy() for t in rtn(torch.from_numpy(w), QuantScheme(4, block)))
    deq = np.where(w == 0, np.float32(0), deq)  # the pattern is the pruned one (a kept weight may also round to 0)
    c = compress(deq, "bitmask-int4", grid=(scales, zeros, block), name="blk.0.down")
    assert c.value_type == "int4" and c.arrays["row_offsets"][-1] == c.arrays["values"].size
    assert np.array_equal(decompress(c), deq)
    _float_kernels_match(c, deq, "bitmask", rng.standard_normal((rows, k)).astype(np.float32))  # (the 16-bit kernel: the next test)


def _float_kernel_when_16_bit_is_off(nw, fw, x: np.ndarray, runs) -> None:
    """AVX2 forced, then the 16-bit switch off: ``runs()`` (whether the 16-bit kernel runs) is False and the
    4-bit weight ``nw`` gives the float32 weight ``fw``'s result bit for bit (the float kernel)."""
    native.set_isa("avx2+fma")
    try:
        assert not runs() and np.array_equal(nw.gemv(x), fw.gemv(x))
    finally:
        native.set_isa(native.best_isa())
    native.int16_activations(False)
    try:
        assert not runs() and np.array_equal(nw.gemv(x), fw.gemv(x))
    finally:
        native.int16_activations(True)


def _ptr(a: np.ndarray) -> ctypes.c_void_p:
    return a.ctypes.data_as(ctypes.c_void_p)


def _x16_product_checked(nw, deq: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``nw.gemv(x)`` by a 16-bit kernel, checked: equal to the float64 product of x rounded as the kernel
    rounds it within float32 summation error, within 2e-5 of the unrounded product (both relative to
    each row's largest |x| · Σ|w|, the scale of the rounding and of the offset term's cancellation), and
    0 for the zero row of x at ``len(x) // 2``. Returns the result."""
    scale = np.abs(x).max(1, keepdims=True).astype(np.float64) * np.abs(deq).sum(1, dtype=np.float64)[None]
    y = nw.gemv(x)
    ref = _x16_rounded(x) @ deq.T.astype(np.float64)
    assert (np.abs(y - ref) <= 2e-6 * scale + 1e-7).all(), float(np.abs(y - ref).max())
    exact = x.astype(np.float64) @ deq.T.astype(np.float64)
    assert (np.abs(y - exact) <= 2e-5 * scale + 1e-7).all()
    assert not y[len(x) // 2].any()
    return y


def _x16_rounded(x: np.ndarray) -> np.ndarray:
    """x as the 16-bit 4-bit sparse kernels round it: per row, to the nearest multiple of 1/32639 of its
    largest |x| (float32 arithmetic, ties to even), as float64."""
    top = np.abs(x).max(1, keepdims=True)
    inv = np.where(top > 0, np.float32(32639) / np.where(top > 0, top, 1), 0).astype(np.float32)
    q = np.clip(np.rint((x * inv).astype(np.float32)), -32639, 32639).astype(np.float64)
    return q * (top / np.float32(32639)).astype(np.float32).astype(np.float64)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 40),
    k=st.integers(1, 400),
    rows=st.sampled_from([1, 2, 3, 4, 5, 9]),
    sparsity=st.sampled_from([0.0, 0.3, 0.5, 0.7, 0.95, 1.0]),
    block=st.sampled_from([32, 64, 128, 256]),
    seed=st.integers(0, 2**16),
)
def test_bitmask_int4_int16_activation_kernel_computes_the_rounded_product(n, k, rows, sparsity, block, seed):
    """The bitmask-int4 × 16-bit kernel (bitmask_int4_vnni_avx512.cpp; grid blocks of 32 or 64k inputs,
    AVX-512 VNNI + VBMI2): any K (a partial last group whose mask words run into the next row's), empty and full
    groups, 1-9 rows of x, zero rows of x: equals the float64 product of x rounded to 1/32639 of each
    row's largest |x| within float32 summation error; within 2e-5 of the unrounded product (relative to
    the row's largest |x| · Σ|w|); not the float kernel's result where the rounding shows; stacked parts
    agree."""
    import torch

    from core.quant import QuantScheme, rtn

    if not native.bitmask_int4_int16():
        pytest.skip(f"the 16-bit bitmask-int4 kernel needs AVX-512 VNNI and VBMI2 (this CPU's best: {native.best_isa()})")
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k)).astype(np.float32)
    w[rng.random((n, k)) < sparsity] = 0.0
    deq, scales, zeros = (t.numpy() for t in rtn(torch.from_numpy(w), QuantScheme(4, block)))
    deq = np.where(w == 0, np.float32(0), deq)
    c = compress(deq, "bitmask-int4", grid=(scales, zeros, block), name="blk.0.down")
    x = (rng.standard_normal((rows, k)) * rng.uniform(0.1, 5.0, k)).astype(np.float32)
    x[rows // 2] = 0.0  # a row of x that is all zero
    nw = native.NativeWeight(c)
    y = _x16_product_checked(nw, deq, x)
    ref, exact = _x16_rounded(x) @ deq.T.astype(np.float64), x.astype(np.float64) @ deq.T.astype(np.float64)
    native.int16_activations(False)
    try:
        floats = nw.gemv(x)
    finally:
        native.int16_activations(True)
    if (np.abs(ref - exact) > 1e-5 * np.abs(exact) + 1e-5).any():  # the rounding shows: the float kernel's result is not this one
        assert not np.array_equal(y, floats)
    both = native.NativeWeight.stacked([nw, native.NativeWeight(c)])
    assert np.array_equal(both.gemv(x), np.concatenate([y, y], axis=1))


def test_bitmask_int4_int16_kernel_is_used_only_where_it_applies():
    """Grid blocks of 16 inputs, another instruction set forced, or the switch off: the float kernels
    (bit for bit the float32 bitmask kernel's result)."""
    import torch

    from core.quant import QuantScheme, rtn

    if not native.bitmask_int4_int16():
        pytest.skip(f"the 16-bit bitmask-int4 kernel needs AVX-512 VNNI and VBMI2 (this CPU's best: {native.best_isa()})")
    rng = np.random.default_rng(3)
    w = rng.standard_normal((24, 200)).astype(np.float32)
    w[rng.random(w.shape) < 0.6] = 0.0
    x = rng.standard_normal((1, 200)).astype(np.float32)
    assert native.bitmask_int4_int16(32) and native.bitmask_int4_int16(128) and not native.bitmask_int4_int16(16) and not native.bitmask_int4_int16(96)
    for block in (16, 32, 64):
        deq, scales, zeros = (t.numpy() for t in rtn(torch.from_numpy(w), QuantScheme(4, block)))
        deq = np.where(w == 0, np.float32(0), deq)
        nw, fw = native.NativeWeight(compress(deq, "bitmask-int4", grid=(scales, zeros, block))), native.NativeWeight(compress(deq, "bitmask"))
        assert np.array_equal(nw.gemv(x), fw.gemv(x)) == (block == 16)
        _float_kernel_when_16_bit_is_off(nw, fw, x, native.bitmask_int4_int16)


def test_bitmask_int4_by_hand_stacking_and_errors():
    """One row by hand (per group of 64 inputs its codes two a byte, a word's codes from the nibble after
    the previous word's, an odd count padded to a whole byte per group), stacking keeps the format (and
    falls back to float32 bitmask values beside another format), and values off the grid or a block
    under 16 are refused by name."""
    w = np.zeros((1, 80), np.float32)
    w[0, [0, 3, 5]] = [1.0, -1.0, 2.0]  # group 0, word 0: three kept
    w[0, 17] = 0.5                       # group 0, word 1: one kept, from the fourth nibble → 2 bytes in all
    w[0, 70] = -0.5                      # group 1 (inputs 64-79): one kept → 1 byte
    scales, zeros = np.full((1, 1), 0.5, np.float32), np.full((1, 1), 8.0, np.float32)
    with pytest.raises(ValueError, match="do not fit"):
        compress(w, "bitmask-int4", grid=(scales, zeros, 32), name="w")
    scales, zeros = np.full((1, 3), 0.5, np.float32), np.full((1, 3), 8.0, np.float32)
    c = compress(w, "bitmask-int4", grid=(scales, zeros, 32), name="w")
    # codes: 1.0 → 10, -1.0 → 6, 2.0 → 12, 0.5 → 9, -0.5 → 7
    assert c.arrays["values"].tolist() == [10 | (6 << 4), 12 | (9 << 4), 7] and c.arrays["row_offsets"].tolist() == [0, 3]
    assert np.array_equal(decompress(c), w)
    x = np.arange(80, dtype=np.float32)[None]
    expected = 1.0 * 0 - 3.0 + 2.0 * 5 + 0.5 * 17 - 0.5 * 70
    native.int16_activations(False)  # the float kernels: exact here
    try:
        for isa in ISAS:
            native.set_isa(isa)
            assert native.NativeWeight(c).gemv(x)[0, 0] == expected, isa
            assert np.array_equal(native.NativeWeight(c).to_dense(), w), isa
    finally:
        native.int16_activations(True)
    native.set_isa(native.best_isa())
    # (the 16-bit kernel where the CPU has it: each x rounded to 1/32639 of its largest, half a step at most)
    assert abs(native.NativeWeight(c).gemv(x)[0, 0] - expected) <= 0.5 * 79 / 32639 * np.abs(w).sum() * 1.001
    both = native.NativeWeight.stacked([native.NativeWeight(c), native.NativeWeight(c)])
    assert both.format == "bitmask-int4" and np.array_equal(both.to_dense(), np.concatenate([w, w]))
    mixed = native.NativeWeight.stacked([native.NativeWeight(c), native.NativeWeight(compress(w, "bitmask"))])
    assert mixed.format == "bitmask" and np.array_equal(mixed.to_dense(), np.concatenate([w, w]))
    off = w.copy()
    off[0, 0] = 1.1
    with pytest.raises(ValueError, match="'blk.2.down' is not on its 4-bit grid"):
        compress(off, "bitmask-int4", grid=(scales, zeros, 32), name="blk.2.down")
    with pytest.raises(ValueError, match="power of two >= 16"):
        compress(w, "bitmask-int4", grid=(np.ones((1, 4), np.float32), np.zeros((1, 4), np.float32), 8), name="blk.2.down")


def test_4bit_kernels_read_separate_arrays_and_interleaved_rows_alike():
    """The engine lays a 4-bit matrix's rows out in one buffer (dense int4: row by row; 2:4-int4: two rows
    at a time, the paired layout); the float kernels also take the format's separate arrays (stride 0):
    both give the same result bit for bit, for dense int4 and 2:4-int4 (with an odd row count: the
    paired layout's padding row)."""

    import torch

    from core.quant import QuantScheme, rtn

    rng = np.random.default_rng(12)
    w = prune_two_four(rng.standard_normal((21, 160)).astype(np.float32))
    x = rng.standard_normal((3, 160)).astype(np.float32)
    deq, scales, zeros = (t.numpy() for t in rtn(torch.from_numpy(w), QuantScheme(4, 64)))
    L = native.lib()
    ptr = lambda a: a.ctypes.data_as(ctypes.c_void_p)  # noqa: E731
    native.int16_activations(False)  # (the 16-bit kernel reads the paired layout only)
    try:
        for isa in ISAS:
            native.set_isa(isa)
            c = compress(deq, "2:4-int4", grid=(scales, zeros, 64))
            a = {k: np.ascontiguousarray(v) for k, v in c.arrays.items()}
            y = np.empty((3, 21), np.float32)
            nw = native.NativeWeight(c)
            L.pk_gemv_24_int4(21, 160, ptr(a["values"]), ptr(a["positions"]), ptr(a["scales"]), ptr(a["zeros"]), 64, 0, 0, nw.row_sums_ptr(), None, ptr(x), 3, ptr(y))
            assert np.array_equal(y, nw.gemv(x)), isa
    finally:
        native.int16_activations(True)
    x, y = np.ascontiguousarray(x[:, :128]), np.empty((3, 20), np.float32)
    for isa in ISAS:
        native.set_isa(isa)
        dense, s, z = (t.numpy() for t in rtn(torch.from_numpy(rng.standard_normal((20, 128)).astype(np.float32)), QuantScheme(4, 32)))
        c4 = compress(dense, "int4", grid=(s, z, 32))
        a = {k: np.ascontiguousarray(v) for k, v in c4.arrays.items()}
        L.pk_gemv_int4(20, 128, ptr(a["values"]), ptr(a["scales"]), ptr(a["zeros"]), 1, 0, 0, ptr(x), 3, ptr(y))
        assert np.array_equal(y, native.NativeWeight(c4).gemv(x)), isa


def test_prefill_tiles_share_one_buffer(monkeypatch):
    """The prefill path (more rows than the kernel takes) decompresses tile by tile into one buffer all
    weights share: with tiles of 16 rows (several per weight) and slabs of input rows, two weights
    multiplied in turn each give the float64 reference, and the buffer holds one tile, not a copy of
    each weight."""
    import threading

    rng = np.random.default_rng(21)
    monkeypatch.setattr(native, "TILE_ROWS", 16)
    monkeypatch.setattr(native, "_tiles", threading.local())  # a fresh buffer: other tests' tiles may be larger
    w24 = prune_two_four(rng.standard_normal((70, 96)).astype(np.float32))
    w4 = _on_q4_grid(rng.standard_normal((45, 128)).astype(np.float32))
    weights = [(native.NativeWeight(compress(w24, "2:4")), w24), (native.NativeWeight(compress(w4, "int4")), w4),
               (native.InputMajorInt4Weight([compress(w4, "int4")]), w4)]
    for _ in range(2):
        for weight, w in weights:
            x = rng.standard_normal((native.GEMV_MAX_ROWS + 5, w.shape[1])).astype(np.float32)
            ref = x.astype(np.float64) @ w.T.astype(np.float64)
            np.testing.assert_allclose(weight(x), ref, atol=1e-4 * (1 + np.abs(ref).max()), rtol=0)
    # the largest tile: the input-major weight's one slab of 128 input rows × 45 outputs
    assert native.tile_buffer(0).size == max(16 * 96, 16 * 128, 128 * 45)


def test_topk_threshold_is_the_kth_largest_magnitude():
    """The decode step's top-k threshold (bisection on the magnitudes' bits) against a sort, on odd
    lengths, ties, zeros of both signs, a constant vector and heavy tails: the (keep+1)-th largest |x|."""
    if native.best_isa() == "scalar":
        pytest.skip("the top-k threshold is AVX2 code; this CPU lacks AVX2 + FMA")
    rng = np.random.default_rng(0)
    cases = [rng.standard_normal(576).astype(np.float32), rng.standard_cauchy(1537).astype(np.float32),
             np.round(rng.standard_normal(67) * 2).astype(np.float32),  # many ties, +0 and -0
             np.full(9, -3.5, np.float32), np.zeros(33, np.float32), rng.standard_normal(7).astype(np.float32) * 1e-40]
    for x in cases:
        mags = np.sort(np.abs(x))[::-1]
        for keep in sorted({1, 2, x.size // 3, x.size // 2, x.size - 1}):
            t = native.topk_threshold(x, keep)
            assert t == float(mags[keep]), (x.size, keep)
            assert int((np.abs(x) > t).sum()) <= keep
        assert native.topk_threshold(x, x.size) == -1.0


def test_sparse_4bit_weights_hold_no_row_sums_where_no_16_bit_kernel_runs(monkeypatch):
    """On a CPU without the 16-bit kernels (``pk_x16_kernels`` 0, simulated), a 2:4-int4 or
    bitmask-int4 weight computes no row sums at load (no decompression of the weight) and its GEMV is the
    float kernel's — bit for bit the float32 format's on a SIMD instruction set."""
    import torch

    from core.quant import QuantScheme, rtn

    rng = np.random.default_rng(8)
    x = rng.standard_normal((1, 256)).astype(np.float32)
    w24 = prune_two_four(rng.standard_normal((12, 256)).astype(np.float32))
    wbm = rng.standard_normal((12, 256)).astype(np.float32)
    wbm[rng.random(wbm.shape) < 0.6] = 0.0
    monkeypatch.setattr(native.lib(), "pk_x16_kernels", lambda: 0)
    for w, fmt, float_fmt in ((w24, "2:4-int4", "2:4"), (wbm, "bitmask-int4", "bitmask")):
        deq, scales, zeros = (t.numpy() for t in rtn(torch.from_numpy(w), QuantScheme(4, 64)))
        deq = np.where(w == 0, np.float32(0), deq)
        nw = native.NativeWeight(compress(deq, fmt, grid=(scales, zeros, 64)))
        assert nw.row_sums_ptr() is None, fmt
        y = nw.gemv(x)
        if native.best_isa() != "scalar":
            assert np.array_equal(y, native.NativeWeight(compress(deq, float_fmt)).gemv(x)), fmt
        ref = x.astype(np.float64) @ deq.T.astype(np.float64)
        assert np.allclose(y, ref, rtol=1e-5, atol=1e-4), fmt
