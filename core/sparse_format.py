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

A group of a 2:4 row that keeps fewer than two stores a zero value at an unused position, so the
format holds any weight whose groups have at most two non-zeros. The functions here are pure NumPy:
the native kernels (``engines/native``) read these arrays as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FORMATS = ("2:4", "bitmask")


@dataclass
class CompressedWeight:
    format: str
    shape: tuple[int, int]
    """(N, K) of the dense weight."""
    arrays: dict[str, np.ndarray]

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


def compress(w: np.ndarray, fmt: str = "auto") -> CompressedWeight:
    """``w`` (N, K) float32 in the given format; ``auto`` takes 2:4 where it holds, else bitmask."""
    if w.ndim != 2:
        raise ValueError(f"compress: weight of shape {w.shape} is not 2-D (N outputs, K inputs)")
    w = np.ascontiguousarray(w, dtype=np.float32)
    if fmt == "auto":
        fmt = "2:4" if is_two_four(w) else "bitmask"
    if fmt == "2:4":
        return _compress_two_four(w)
    if fmt == "bitmask":
        return _compress_bitmask(w)
    raise ValueError(f"compress: format '{fmt}' is not one of auto, {', '.join(FORMATS)}")


def _compress_bitmask(w: np.ndarray) -> CompressedWeight:
    n, k = w.shape
    kw = (k + 15) // 16
    keep = np.zeros((n, kw * 16), dtype=bool)
    keep[:, :k] = w != 0
    masks = np.packbits(keep.reshape(n, kw, 16), axis=-1, bitorder="little").reshape(n, kw * 2)
    masks = np.ascontiguousarray(masks).view("<u2").reshape(n, kw).astype(np.uint16)
    values = np.ascontiguousarray(w[keep[:, :k]], dtype=np.float32)
    row_offsets = np.concatenate([[0], np.cumsum(keep.sum(1), dtype=np.int64)]).astype(np.int64)
    return CompressedWeight("bitmask", (n, k), {"masks": masks, "values": values, "row_offsets": row_offsets})


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
    if c.format == "bitmask":
        kw = (k + 15) // 16
        bits = np.unpackbits(c.arrays["masks"].astype("<u2").view(np.uint8).reshape(n, kw * 2), axis=-1, bitorder="little")
        keep = bits.reshape(n, kw * 16)[:, :k].astype(bool)
        out = np.zeros((n, k), np.float32)
        out[keep] = c.arrays["values"]
        return out
    if c.format == "2:4":
        g = k // 4
        b = c.arrays["positions"]
        nib = np.stack([b & 0x0F, b >> 4], axis=-1).reshape(n, -1)[:, :g]
        pos = np.stack([nib & 3, (nib >> 2) & 3], axis=-1).astype(np.int64)  # (n, g, 2)
        out = np.zeros((n, g, 4), np.float32)
        np.put_along_axis(out, pos, c.arrays["values"].reshape(n, g, 2), axis=-1)
        return out.reshape(n, k)
    raise ValueError(f"decompress: format '{c.format}' is not one of {', '.join(FORMATS)}")
