"""Compressed storage of a pruned linear's weight, for kernels that read only the kept weights.

A weight ``W`` is ``(N, K)``: N outputs, K inputs (the reduction axis). Two formats:

``2:4`` (every group of four consecutive inputs of a row keeps at most two)
    ``values`` float32 ``(N, K/2)``: the two kept values of each group, in input order;
    ``positions`` uint8 ``(N, ceil(K/8))``: per group its two positions (2 bits each, the first
    group of a byte in bits 0-3, the second in bits 4-7). 4 bits per 4 weights: 0.5625× the dense
    bytes in fp32.
``bitmask`` (any pattern)
    ``masks`` uint16 ``(N, ceil(K/16))``: bit j of word w set when input 16w + j is kept;
    ``values`` float32 ``(nnz,)``: the kept values, row by row in input order;
    ``row_offsets`` int64 ``(N + 1,)``: where each row's values start.
    A bit per weight plus the kept values: at 50 % 0.53× the dense bytes, at 70 % 0.33×. It is
    chosen over CSR (a 16-bit column index per kept value) because below 94 % sparsity a bit per
    weight is fewer bytes than 16 bits per kept one (at 50 %: 2.125 against 3 bytes per weight), and
    the kernel expands a 16-input word of values with one instruction instead of 16 gathers.

``dense``
    ``values`` ``(N, K)``: every weight (a layer left unpruned, stored int8 below).
``int4`` (dense, 4-bit codes, lossless for a weight on such a grid)
    ``values`` uint8 ``(N, K/2)``: per block of 32 inputs 16 bytes, byte j holding input j in its low
    nibble and input j + 16 in its high one (GGUF's Q4_1 order); ``scales`` and ``offsets`` float32
    ``(N, K/32)``: weight = ``fma(code, scale, offset)`` rounded once to float32 — or, in the
    zero-point form (the ``quantize`` pass's 4-bit grid), ``scales`` and ``zeros``: weight =
    ``(code − zero) · scale``. A weight dequantized
    from an asymmetric 4-bit block format (Q4_1: a scale and a minimum per 32 weights, as the bundled
    SmolLM2's block linears are in its GGUF) is on such a grid exactly (:func:`exact_int4_grid`), so
    the codes are the same weights bit for bit: 0.75 bytes per weight, 0.19× dense fp32. Q4_1's
    scales and minima are fp16 numbers: :func:`half_grid_form` holds such a grid as fp16 (0.625 bytes
    per weight), the same weights.

``2:4-int4`` (2:4 with 4-bit values: a 2:4 weight the ``quantize`` pass put on its 4-bit grid)
    ``positions`` as ``2:4``; ``values`` uint8 ``(N, K/4)``: per window of 32 inputs (16 kept values)
    8 bytes, read as a little-endian 64-bit word whose nibble ``8·(j % 2) + j // 2`` is the window's
    kept value j (even values in the low 32 bits, odd ones in the high: a kernel broadcasts the word
    and shifts each lane by its value's place); ``scales`` float32 and ``zeros`` uint8 ``(N, ceil(K/block))``: a value is
    ``(code − zero) · scale`` rounded once to float32, the grid's own value bit for bit. K % 32 == 0,
    ``block`` a power of two ≥ 32. 4.25 bits per weight at block 32, 3.6 at block 64 (``int4``: 6).

``bitmask-int4`` (an unstructured weight the ``quantize`` pass put on its 4-bit grid)
    ``masks`` as ``bitmask``; ``values`` uint8: row by row, per group of 64 inputs (four mask words)
    its kept values' codes two a byte (the group's kept value 2i in the low nibble, 2i + 1 in the high
    one), ``ceil(c/2)`` bytes for c kept, so each group starts on a byte and a word's codes start at
    the nibble after the previous word's; ``row_offsets`` int64 ``(N + 1,)`` in bytes;
    ``scales`` float32 and ``zeros`` uint8 ``(N, ceil(K/block))``, a value ``(code − zero) · scale``
    rounded once, ``block`` a power of two ≥ 16. At 50 %: about 3.7 bits per weight at block 64.

A group of a 2:4 row that keeps fewer than two stores a zero value at an unused position, so the
format holds any weight whose groups have at most two non-zeros.

**Int8 values.** A weight quantized to int8 (``core.quant``: symmetric, one scale per output row and
block of ``block`` inputs) is stored with int8 ``values`` (its codes, in the same places as the float
values) and ``scales`` float32 ``(N, ceil(K/block))``; ``block`` is recorded on the
:class:`CompressedWeight`. ``code · scale`` in float32 is the model's dequantized weight bit for bit
(checked when compressing), so a kernel reading the codes computes with exactly the model's weights
while reading a quarter of the value bytes: 2:4 becomes 0.156×, bitmask at 50 % 0.156×, dense 0.25×
of the fp32 dense bytes (scales aside). The functions here are pure NumPy: the native kernels
(``engines/native``) read these arrays as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FORMATS = ("2:4", "bitmask", "dense", "int4", "2:4-int4", "bitmask-int4")
INT4_FORMATS = ("int4", "2:4-int4", "bitmask-int4")
"""Formats whose values are 4-bit codes (``block`` is then their grid's block, not an int8 scale block)."""
BITMASK_INT4_GROUP = 64
"""Inputs per group of ``bitmask-int4`` codes (each group starts on a byte): one 64-bit mask, one byte vector
of the AVX-512 kernel."""
INT4_BLOCK = 32
"""Inputs per scale and offset of the ``int4`` format (GGUF's Q4_1 block)."""


@dataclass
class CompressedWeight:
    format: str
    shape: tuple[int, int]
    """(N, K) of the dense weight."""
    arrays: dict[str, np.ndarray]
    block: int = 0
    """Int8 values with ``scales`` per row and block of this many inputs; 0: float32 values."""

    @property
    def int8(self) -> bool:
        return self.block > 0 and self.format not in INT4_FORMATS

    @property
    def value_type(self) -> str:
        """How the values are stored: float32, int8 or int4."""
        return "int4" if self.format in INT4_FORMATS else "int8" if self.block else "float32"

    @property
    def nbytes(self) -> int:
        return int(sum(a.nbytes for a in self.arrays.values()))

    @property
    def dense_nbytes(self) -> int:
        return int(self.shape[0] * self.shape[1] * 4)

    def to_dense(self) -> np.ndarray:
        return decompress(self)


def is_two_four(w: np.ndarray) -> bool:
    """True when every group of four consecutive inputs of every row has at most two non-zeros."""
    n, k = w.shape
    if k % 4:
        return False
    return bool(((w.reshape(n, k // 4, 4) != 0).sum(-1) <= 2).all())


def compress(w: np.ndarray, fmt: str = "auto", grid: tuple[np.ndarray, ...] | None = None, name: str = "weight") -> CompressedWeight:
    """``w`` (N, K) float32 in the given format; ``auto`` takes 2:4 where it holds, else bitmask.
    ``grid`` = (scales (N, ceil(K/block)), block): store int8 codes of ``w``, which must lie on that
    int8 grid exactly (a quantized model's dequantized weight); ``name`` names it in the error. For
    ``int4``, no grid: the weight's own exact scale-and-offset grid is found (:func:`exact_int4_grid`);
    or ``grid`` = (scales, zeros, block), the quantize pass's 4-bit grid (``(code − zero) · scale``,
    block a multiple of 32), stored in the zero-point form."""
    if w.ndim != 2:
        raise ValueError(f"compress: weight of shape {w.shape} is not 2-D (N outputs, K inputs)")
    w = np.ascontiguousarray(w, dtype=np.float32)
    if fmt == "auto":
        fmt = "2:4" if is_two_four(w) else "bitmask"
    if fmt == "2:4":
        c = _compress_two_four(w)
    elif fmt == "bitmask":
        c = _compress_bitmask(w)
    elif fmt == "dense":
        c = CompressedWeight("dense", w.shape, {"values": w})
    elif fmt == "2:4-int4":
        if grid is None or len(grid) != 3:
            raise ValueError(f"compress: '{name}': the 2:4-int4 format needs its 4-bit grid (scales, zeros, block)")
        return _compress_two_four_int4(w, *grid, name=name)
    elif fmt == "bitmask-int4":
        if grid is None or len(grid) != 3:
            raise ValueError(f"compress: '{name}': the bitmask-int4 format needs its 4-bit grid (scales, zeros, block)")
        return _compress_bitmask_int4(w, *grid, name=name)
    elif fmt == "int4":
        if grid is None:
            return _compress_int4(w, name)
        if len(grid) != 3:
            raise ValueError(f"compress: '{name}': an int4 grid is (scales, zeros, block), got {len(grid)} items")
        return _compress_int4_zero_point(w, *grid, name=name)
    else:
        raise ValueError(f"compress: format '{fmt}' is not one of auto, {', '.join(FORMATS)}")
    return c if grid is None else _to_int8(c, *grid, name=name)


def exact_int8_grid(w: np.ndarray, block: int = 32) -> np.ndarray | None:
    """The scales ``(N, K/block)`` of the symmetric int8 grid on which ``w`` lies exactly (``scale =
    max|w| / 127`` per row and block of ``block`` inputs, every weight ``code · scale`` in float32 bit
    for bit, as :func:`compress` checks), or None when it does not. A weight dequantized from a
    symmetric 8-bit block format is on one — GGUF's Q8_0 (blocks of 32, an fp16 scale) puts its
    largest magnitude at code ±127 — so storing its codes is lossless. K must be a multiple of
    ``block``."""
    if w.ndim != 2 or w.shape[1] % block or w.size == 0:
        return None
    w = np.asarray(w, np.float32)
    n, k = w.shape
    for rows in (w[:1], w):  # one row first: most weights are off any such grid, and it shows at once
        b = rows.reshape(rows.shape[0], k // block, block)
        scales = (np.abs(b).max(-1).astype(np.float64) / 127.0).astype(np.float32)
        s = scales[..., None]
        codes = np.rint(b / np.where(s > 0, s, np.float32(1.0)))
        if np.abs(codes).max(initial=0) > 127 or not np.array_equal((codes.astype(np.float32) * s).astype(np.float32), b):
            return None
    return scales


def _int4_fit(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """``(scales, offsets, codes)`` of the exact asymmetric 4-bit grid of ``w`` (see
    :func:`exact_int4_grid`), codes uint8 ``(N, K/32, 32)``; None when ``w`` is off such a grid."""
    if w.ndim != 2 or w.shape[1] % INT4_BLOCK or w.size == 0:
        return None
    w = np.asarray(w, np.float32)
    n, k = w.shape
    for rows in (w[:1], w):  # one row first: most weights are off any such grid, and it shows at once
        b = rows.reshape(rows.shape[0], k // INT4_BLOCK, INT4_BLOCK).astype(np.float64)
        lo, hi = b.min(-1), b.max(-1)
        scales = ((hi - lo) / 15.0).astype(np.float32)
        offsets = lo.astype(np.float32)
        s = scales.astype(np.float64)[..., None]
        codes = np.rint((b - offsets[..., None]) / np.where(s > 0, s, 1.0))
        if codes.min(initial=0) < 0 or codes.max(initial=0) > 15:
            return None
        if not np.array_equal((codes * s + offsets[..., None]).astype(np.float32), b.astype(np.float32)):
            return None
    return scales, offsets, codes.astype(np.uint8)


def exact_int4_grid(w: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """``(scales, offsets)`` ``(N, K/32)`` of an asymmetric 4-bit grid on which ``w`` lies exactly — per
    row and block of 32 inputs, ``offset`` = the block's minimum, ``scale`` = (max − min) / 15, every
    weight ``code · scale + offset`` (codes 0..15) rounded once to float32 bit for bit — or None. A
    weight dequantized from GGUF's Q4_1 is on one: its minimum has code 0 and its maximum code 15, so
    the block's own min and max give back the fp16 scale and minimum exactly. K must be a multiple of 32."""
    fit = _int4_fit(w)
    return None if fit is None else fit[:2]


def exact_half(a: np.ndarray) -> bool:
    """Whether every value of the float array ``a`` is an fp16 number exactly, normal or zero (the
    native kernels widen fp16 grids without subnormals or infinities: ``half_to_float`` in kernels.h)."""
    h = a.astype(np.float16)
    if not np.array_equal(h.astype(np.float32), a.astype(np.float32)):
        return False
    mag = np.abs(h)
    return bool(np.all((mag == 0) | ((mag >= np.finfo(np.float16).tiny) & np.isfinite(mag))))


def half_grid_form(c: CompressedWeight) -> CompressedWeight:
    """An ``int4`` weight with its scales and offsets (or zero points) as fp16 where every one of them
    is an fp16 number (:func:`exact_half`: GGUF's Q4_1 grids are), else ``c`` itself: the same weights
    in 4 bytes fewer per 32 (native-cpu's artifact)."""
    if c.format != "int4":
        return c
    second = int4_offset_key(c.arrays)
    if not all(exact_half(c.arrays[k]) for k in ("scales", second)):
        return c
    return CompressedWeight("int4", c.shape, {**c.arrays, "scales": c.arrays["scales"].astype(np.float16), second: c.arrays[second].astype(np.float16)}, c.block)


def int4_offset_key(arrays: dict[str, np.ndarray]) -> str:
    """Which second grid an ``int4`` weight's arrays hold: ``offsets`` (code · scale + offset) or
    ``zeros`` (the zero-point form, (code − zero) · scale)."""
    return "zeros" if "zeros" in arrays else "offsets"


def _pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """Codes ``(N, K/32, 32)`` (0..15) → the ``int4`` format's bytes ``(N, K/2)``: per block, byte j holds
    code j in its low nibble and code j + 16 in its high one."""
    n, nb, _ = codes.shape
    return np.ascontiguousarray((codes[..., :16] | (codes[..., 16:] << 4)).astype(np.uint8).reshape(n, nb * 16))


def _compress_int4(w: np.ndarray, name: str) -> CompressedWeight:
    fit = _int4_fit(w)
    if fit is None:
        raise ValueError(f"compress: '{name}' is not on an exact 4-bit grid (a scale and offset per 32 inputs, codes 0..15; K = {w.shape[1]})")
    scales, offsets, codes = fit
    return CompressedWeight("int4", w.shape, {"values": _pack_nibbles(codes), "scales": scales, "offsets": offsets}, INT4_BLOCK)


def _compress_int4_zero_point(w: np.ndarray, scales: np.ndarray, zeros: np.ndarray, block: int, name: str) -> CompressedWeight:
    """The int4 format's zero-point form from a 4-bit grid with a scale and zero point per ``block``
    inputs (repeated to the format's 32 when the block is larger); every weight must be
    ``(code − zero) · scale`` in float32 bit for bit."""
    n, k = w.shape
    if block % INT4_BLOCK or k % block:
        raise ValueError(f"compress: '{name}': the int4 format needs blocks that are a multiple of {INT4_BLOCK} inputs dividing K = {k}; the grid's block is {block}")
    if scales.shape != (n, k // block) or zeros.shape != (n, k // block):
        raise ValueError(f"compress: '{name}': scales {scales.shape} / zeros {zeros.shape} do not fit a ({n}, {k}) weight in blocks of {block}")
    rep = block // INT4_BLOCK
    s = np.repeat(np.asarray(scales, np.float32), rep, axis=1)
    z = np.repeat(np.asarray(zeros, np.float32), rep, axis=1)
    codes = _codes_on_grid(w.reshape(n, k // INT4_BLOCK, INT4_BLOCK), s[..., None], z[..., None], name)
    return CompressedWeight("int4", (n, k), {"values": _pack_nibbles(codes), "scales": np.ascontiguousarray(s), "zeros": np.ascontiguousarray(z)}, INT4_BLOCK)


def _compress_two_four_int4(w: np.ndarray, scales: np.ndarray, zeros: np.ndarray, block: int, name: str) -> CompressedWeight:
    """``w`` (2:4, on the 4-bit grid ``(code − zero) · scale`` per row and ``block`` inputs) as the
    ``2:4-int4`` format; every kept value must be on its grid bit for bit."""
    n, k = w.shape
    if k % 32:
        raise ValueError(f"compress: '{name}': the 2:4-int4 format needs K % 32 == 0; K = {k}")
    z = _grid_zeros(scales, zeros, w.shape, block, 32, name)
    c = _compress_two_four(w)
    blk = (4 * (np.arange(k // 2) // 2)) // block  # each value's grid block (a group of four is inside one block)
    q = _codes_on_grid(c.arrays["values"], np.asarray(scales, np.float32)[:, blk], z[:, blk], name).reshape(n, k // 32, 16)
    nib = np.concatenate([q[..., 0::2], q[..., 1::2]], axis=-1)  # by nibble: the even values, then the odd ones
    packed = np.ascontiguousarray((nib[..., 0::2] | (nib[..., 1::2] << 4)).reshape(n, k // 4))
    return CompressedWeight("2:4-int4", (n, k), {"values": packed, "positions": c.arrays["positions"], "scales": np.ascontiguousarray(scales, np.float32),
                                                  "zeros": np.ascontiguousarray(z.astype(np.uint8))}, int(block))


def _grid_zeros(scales: np.ndarray, zeros: np.ndarray, shape: tuple[int, int], block: int, smallest: int, name: str) -> np.ndarray:
    """The zero points of a 4-bit grid as float32 integers, after checking the grid's shape and block."""
    n, k = shape
    if block < smallest or block & (block - 1):
        raise ValueError(f"compress: '{name}': the block of a 4-bit sparse format must be a power of two >= {smallest}, got {block}")
    nb = -(-k // block)
    if np.shape(scales) != (n, nb) or np.shape(zeros) != (n, nb):
        raise ValueError(f"compress: '{name}': scales {np.shape(scales)} / zeros {np.shape(zeros)} do not fit a ({n}, {k}) weight in blocks of {block}")
    z = np.asarray(zeros, np.float32)
    if not np.array_equal(z, np.rint(z)) or z.min(initial=0) < 0 or z.max(initial=0) > 15:
        raise ValueError(f"compress: '{name}': zero points must be integers in 0..15 for 4-bit codes")
    return z


def _codes_on_grid(values: np.ndarray, s: np.ndarray, z: np.ndarray, name: str) -> np.ndarray:
    """The uint8 codes of ``values`` on the grid ``(code − z) · s`` (each value's own s and z), or an error
    naming the weight when a value is off it."""
    codes = np.rint(values / np.where(s > 0, s, 1.0)) + z
    if codes.size and (codes.min() < 0 or codes.max() > 15 or not np.array_equal(((codes - z).astype(np.float32) * s).astype(np.float32), values)):
        raise ValueError(f"compress: '{name}' is not on its 4-bit grid: not every value is (code − zero) · scale with a code in 0..15")
    return codes.astype(np.uint8)


def _bitmask_int4_layout(keep: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Where each kept value of a ``(N, K)`` keep mask goes in the ``bitmask-int4`` code bytes: (rows,
    cols, byte, high nibble, row byte offsets), values in row-major order. Codes are packed per group of
    ``BITMASK_INT4_GROUP`` inputs, each group starting on a byte."""
    n, k = keep.shape
    g = BITMASK_INT4_GROUP
    kg = -(-k // g)
    rows, cols = np.nonzero(keep)
    padded = np.zeros((n, kg * g), bool)
    padded[:, :k] = keep
    group_bytes = (padded.reshape(n, kg, g).sum(-1) + 1) // 2
    group_start = np.concatenate([[0], np.cumsum(group_bytes.reshape(-1))])[:-1].astype(np.int64)
    group = rows.astype(np.int64) * kg + cols // g
    rank = np.arange(group.size) - np.searchsorted(group, group, side="left")
    row_offsets = np.concatenate([[0], np.cumsum(group_bytes.sum(1))]).astype(np.int64)
    return rows, cols, group_start[group] + rank // 2, (rank % 2).astype(bool), row_offsets


def _compress_bitmask_int4(w: np.ndarray, scales: np.ndarray, zeros: np.ndarray, block: int, name: str) -> CompressedWeight:
    z = _grid_zeros(scales, zeros, w.shape, block, 16, name)
    keep = w != 0
    rows, cols, byte, high, row_offsets = _bitmask_int4_layout(keep)
    blk = cols // block
    codes = _codes_on_grid(w[rows, cols], np.asarray(scales, np.float32)[rows, blk], z[rows, blk], name)
    out = np.zeros(int(row_offsets[-1]), np.uint8)
    out[byte[~high]] = codes[~high]
    out[byte[high]] |= codes[high] << 4
    return CompressedWeight("bitmask-int4", w.shape, {"masks": _masks_of(keep), "values": out, "row_offsets": row_offsets,
                                                      "scales": np.ascontiguousarray(scales, np.float32), "zeros": z.astype(np.uint8)}, int(block))


def _bitmask_int4_dense(c: CompressedWeight) -> np.ndarray:
    n, k = c.shape
    rows, cols, byte, high, _ = _bitmask_int4_layout(_keep_of(c.arrays["masks"], c.shape))
    b = c.arrays["values"][byte]
    codes = np.where(high, b >> 4, b & 15).astype(np.float32)
    blk = cols // c.block
    out = np.zeros((n, k), np.float32)
    out[rows, cols] = ((codes - c.arrays["zeros"].astype(np.float32)[rows, blk]) * c.arrays["scales"].astype(np.float32)[rows, blk]).astype(np.float32)
    return out


def two_four_int4_codes(values: np.ndarray, n: int, k: int) -> np.ndarray:
    """A ``2:4-int4`` weight's codes (its ``values`` bytes) as one uint8 per kept value, ``(N, K/2)`` in
    input order (per 32-input window the format keeps the even values in the low nibbles, the odd ones
    in the high)."""
    packed = values.reshape(n, k // 32, 8)
    nib = np.stack([packed & 15, packed >> 4], axis=-1).reshape(n, k // 32, 16)  # by nibble
    codes = np.empty_like(nib)
    codes[..., 0::2], codes[..., 1::2] = nib[..., :8], nib[..., 8:]
    return codes.reshape(n, k // 2)


def two_four_offsets(positions: np.ndarray, n: int, k: int) -> np.ndarray:
    """A 2:4 weight's 2-bit positions as each kept value's input within its group of four, ``(N, K/4, 2)``
    uint8 (a nibble per group, two groups a byte, the low nibble first)."""
    g = k // 4
    nib = np.stack([positions & 0x0F, positions >> 4], axis=-1).reshape(n, -1)[:, :g]
    return np.stack([nib & 3, (nib >> 2) & 3], axis=-1).astype(np.uint8)


def _two_four_int4_values(c: CompressedWeight) -> np.ndarray:
    """The float32 kept values ``(N, K/2)`` of a ``2:4-int4`` weight (what the kernels compute with)."""
    n, k = c.shape
    codes = two_four_int4_codes(c.arrays["values"], n, k).astype(np.float32)
    blk = (4 * (np.arange(k // 2) // 2)) // c.block
    s = c.arrays["scales"].astype(np.float32)[:, blk]
    z = c.arrays["zeros"].astype(np.float32)[:, blk]
    return ((codes - z) * s).astype(np.float32)


def _value_scales(c: CompressedWeight, scales: np.ndarray, block: int) -> np.ndarray:
    """The scale of each stored value of ``c`` (shaped like ``c.arrays['values']``)."""
    n, k = c.shape
    if c.format == "2:4":
        cols = 4 * (np.arange(k // 2) // 2)  # a value's group start: a group of four is inside one block
        return scales[:, cols // block]
    if c.format == "dense":
        return scales[:, np.arange(k) // block]
    rows, cols = np.nonzero(_keep_of(c.arrays["masks"], c.shape))  # row-major: the values' order
    return scales[rows, cols // block]


def _to_int8(c: CompressedWeight, scales: np.ndarray, block: int, name: str) -> CompressedWeight:
    n, k = c.shape
    if block < 16 or block & (block - 1):
        raise ValueError(f"compress: block {block} of '{name}' is not a power of two >= 16")
    scales = np.ascontiguousarray(scales, np.float32)
    if scales.shape != (n, -(-k // block)):
        raise ValueError(f"compress: scales of '{name}' have shape {scales.shape}, expected {(n, -(-k // block))} for a ({n}, {k}) weight in blocks of {block}")
    values = c.arrays["values"]
    s = _value_scales(c, scales, block)
    codes = np.rint(values / np.where(s > 0, s, 1.0))
    if np.abs(codes).max(initial=0) > 127 or not np.array_equal((codes.astype(np.float32) * s).astype(np.float32), values):
        bad = int(((codes.astype(np.float32) * s) != values).sum() + (np.abs(codes) > 127).sum())
        raise ValueError(f"compress: '{name}' is not on its int8 grid: {bad} values are not code × scale with |code| ≤ 127 (was it quantized with these scales?)")
    return CompressedWeight(c.format, c.shape, {**c.arrays, "values": codes.astype(np.int8), "scales": scales}, block)


def _masks_of(keep: np.ndarray) -> np.ndarray:
    """The ``bitmask`` format's uint16 words ``(N, ceil(K/16))`` of a keep mask ``(N, K)``."""
    n, k = keep.shape
    kw = (k + 15) // 16
    padded = np.zeros((n, kw * 16), dtype=bool)
    padded[:, :k] = keep
    masks = np.packbits(padded.reshape(n, kw, 16), axis=-1, bitorder="little").reshape(n, kw * 2)
    return np.ascontiguousarray(masks).view("<u2").reshape(n, kw).astype(np.uint16)


def _keep_of(masks: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The keep mask ``(N, K)`` of the ``bitmask`` format's words (the inverse of :func:`_masks_of`)."""
    n, k = shape
    kw = (k + 15) // 16
    bits = np.unpackbits(masks.astype("<u2").view(np.uint8).reshape(n, kw * 2), axis=-1, bitorder="little")
    return bits.reshape(n, kw * 16)[:, :k].astype(bool)


def _compress_bitmask(w: np.ndarray) -> CompressedWeight:
    n, k = w.shape
    keep = w != 0
    values = np.ascontiguousarray(w[keep], dtype=np.float32)
    row_offsets = np.concatenate([[0], np.cumsum(keep.sum(1), dtype=np.int64)]).astype(np.int64)
    return CompressedWeight("bitmask", (n, k), {"masks": _masks_of(keep), "values": values, "row_offsets": row_offsets})


def _compress_two_four(w: np.ndarray) -> CompressedWeight:
    n, k = w.shape
    if k % 4:
        raise ValueError(f"compress: 2:4 needs K % 4 == 0, the weight has K = {k}")
    groups = w.reshape(n, k // 4, 4)
    nz = groups != 0
    if (nz.sum(-1) > 2).any():
        raise ValueError("compress: the weight is not 2:4 (a group of four inputs keeps more than two)")
    # the non-zero positions first (stable: in input order), zeros after; keep the first two, ascending
    order = np.argsort(~nz, axis=-1, kind="stable")[..., :2]
    pos = np.sort(order, axis=-1).astype(np.uint8)  # (n, G, 2)
    values = np.take_along_axis(groups, pos.astype(np.int64), axis=-1).reshape(n, k // 2)
    nibble = (pos[..., 0] | (pos[..., 1] << 2)).astype(np.uint8)  # (n, G)
    g = k // 4
    if g % 2:
        nibble = np.concatenate([nibble, np.zeros((n, 1), np.uint8)], axis=1)
    positions = (nibble[:, 0::2] | (nibble[:, 1::2] << 4)).astype(np.uint8)
    return CompressedWeight("2:4", (n, k), {"values": np.ascontiguousarray(values, np.float32), "positions": np.ascontiguousarray(positions)})


def decompress(c: CompressedWeight) -> np.ndarray:
    """The dense (N, K) float32 weight (a NumPy reference of what the kernels compute with)."""
    n, k = c.shape
    if c.format == "int4":
        packed = c.arrays["values"].reshape(n, k // INT4_BLOCK, 16)
        codes = np.concatenate([packed & 15, packed >> 4], axis=-1).astype(np.float64)
        s = c.arrays["scales"].astype(np.float64)[..., None]
        if "zeros" in c.arrays:  # the zero-point form: (code − zero) · scale, one float32 rounding
            return ((codes - c.arrays["zeros"].astype(np.float64)[..., None]).astype(np.float32) * s.astype(np.float32)).astype(np.float32).reshape(n, k)
        w = codes * s + c.arrays["offsets"].astype(np.float64)[..., None]
        return w.astype(np.float32).reshape(n, k)
    if c.format == "bitmask-int4":
        return _bitmask_int4_dense(c)
    if c.format == "2:4-int4":
        return decompress(CompressedWeight("2:4", c.shape, {"values": _two_four_int4_values(c), "positions": c.arrays["positions"]}))
    if c.int8:
        values = (c.arrays["values"].astype(np.float32) * _value_scales(c, c.arrays["scales"], c.block)).astype(np.float32)
        plain = {key: a for key, a in c.arrays.items() if key != "scales"}
        return decompress(CompressedWeight(c.format, c.shape, {**plain, "values": values}))
    if c.format == "dense":
        return np.array(c.arrays["values"], np.float32).reshape(n, k)
    if c.format == "bitmask":
        keep = _keep_of(c.arrays["masks"], c.shape)
        out = np.zeros((n, k), np.float32)
        out[keep] = c.arrays["values"]
        return out
    if c.format == "2:4":
        g = k // 4
        pos = two_four_offsets(c.arrays["positions"], n, k).astype(np.int64)  # (n, g, 2)
        out = np.zeros((n, g, 4), np.float32)
        np.put_along_axis(out, pos, c.arrays["values"].reshape(n, g, 2), axis=-1)
        return out.reshape(n, k)
    raise ValueError(f"decompress: format '{c.format}' is not one of {', '.join(FORMATS)}")
