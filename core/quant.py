"""Weight quantization maths shared by the ``quantize`` pass, the ONNX rewrite and the tests.

Both schemes store one scale (and a zero point) per block of ``block_size`` input columns of each
output row — ONNX Runtime's ``MatMulNBits`` layout, whose CPU kernel with ``accuracy_level`` 4 reads
the weights packed and quantizes the activations per block too — and both keep an exact zero exactly
zero, so a pruned pattern survives quantization by construction, whatever the grid:

- **int8**: symmetric, ``scale = max|w| / 127``, ``q = clamp(round(w / scale), −127, 127) + 128``
  (uint8 with zero point 128), ``w' = (q − 128) · scale``. 0 → 128 → 0.
- **int4**: asymmetric over a range that always contains 0: ``lo = min(min w, 0)``,
  ``hi = max(max w, 0)``, ``scale = (hi − lo) / 15`` rounded up to an fp16 number (where that is a
  normal fp16 number: as GGUF's Q4 grids, so ``native-cpu`` holds the grid in 2 bytes per value, not
  4; rounding up keeps ``hi − lo ≤ 15 · scale``), ``zero = clamp(round(−lo / scale), 0, 15)``,
  ``q = clamp(round(w / scale) + zero, 0, 15)``, ``w' = (q − zero) · scale``. 0 → zero → 0.

A quantized model keeps its dequantized weights ``w'`` in fp32 (the PyTorch reference the engine is
compared with) and the grids (``scale``, ``zero``) beside them; the codes are recomputed exactly from
``w'`` and the grid (:func:`codes_of`), so they are not stored twice.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

BITS = (8, 4)
ACCURACY_LEVELS = (0, 1, 2, 3, 4)
"""``MatMulNBits`` ``accuracy_level``: 0 unset (fp32 compute here), 1 fp32, 2 fp16, 3 bf16, 4 int8 activations."""
GRID_SUFFIXES = (".scale", ".zero")
"""Each quantized weight ``<param>`` has ``<param>.scale`` and ``<param>.zero`` beside it."""


@dataclass(frozen=True)
class QuantScheme:
    """How the weights of a model were quantized (saved in its config as ``weight_quantization``)."""

    bits: int
    block_size: int
    """Input columns per scale (and zero point)."""
    accuracy_level: int = 0
    """ONNX Runtime's ``MatMulNBits`` compute precision (4 = int8 activations, the fast CPU path)."""

    def __post_init__(self) -> None:
        if self.bits not in BITS:
            raise ValueError(f"bits {self.bits} is not one of {', '.join(map(str, BITS))}")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size {self.block_size} is not a power of two ≥ 16 (ONNX Runtime's MatMulNBits needs one)")
        if self.accuracy_level not in ACCURACY_LEVELS:
            raise ValueError(f"accuracy_level {self.accuracy_level} is not one of {', '.join(map(str, ACCURACY_LEVELS))}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QuantScheme":
        return cls(int(d["bits"]), int(d["block_size"]), int(d.get("accuracy_level", 0)))

    @property
    def label(self) -> str:
        return f"int{self.bits} (block {self.block_size})"

    @property
    def code_range(self) -> tuple[int, int]:
        return code_range(self.bits)


def code_range(bits: int) -> tuple[int, int]:
    """The codes used: int8 symmetric around 128 (1–255), int4 all 16."""
    return (1, 255) if bits == 8 else (0, 15)


HALF_MIN_NORMAL = 2.0**-14
HALF_MAX = 65504.0


def half_up(x: torch.Tensor) -> torch.Tensor:
    """Each value of float32 ``x`` in fp16's normal range rounded up to the nearest fp16 number at or
    above it (exact, so the value is the same read as fp16 or float32); values outside that range
    (zero and subnormal scales included) unchanged."""
    h = x.half()
    h = torch.where(h.float() < x, torch.nextafter(h, torch.full_like(h, float("inf"))), h).float()
    return torch.where((x >= HALF_MIN_NORMAL) & (h <= HALF_MAX), h, x)


def grid(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of each row of ``w`` ``(rows, cols)`` (one group per row): float32 ``(rows,)`` each."""
    w = w.float()
    if bits == 8:
        scale = w.abs().amax(dim=1) / 127.0
        zero = torch.full_like(scale, 128.0)
    else:
        lo = w.amin(dim=1).clamp(max=0.0)
        hi = w.amax(dim=1).clamp(min=0.0)
        scale = half_up((hi - lo) / 15.0)
        zero = torch.zeros_like(scale)
        nz = scale > 0
        zero[nz] = torch.round(-lo[nz] / scale[nz]).clamp(0, 15)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero group: any scale works
    return scale, zero


def quantize_dequantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """``w' = (q − zero) · scale`` with ``q`` the rounded, clamped code; ``scale``/``zero`` broadcast against ``w``."""
    lo, hi = code_range(bits)
    q = (torch.round(w / scale) + zero).clamp(lo, hi)
    return (q - zero) * scale


def _blocks(w: torch.Tensor, group: int) -> tuple[torch.Tensor, int]:
    """``w`` ``(rows, cols)`` as ``(rows, n_groups, group)``, zero-padded on the right (zeros never move a grid)."""
    rows, cols = w.shape
    n = -(-cols // group)
    if n * group != cols:
        w = torch.nn.functional.pad(w, (0, n * group - cols))
    return w.reshape(rows, n, group), cols


def rtn(w: torch.Tensor, scheme: QuantScheme) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest: ``(w', scale, zero)`` with ``scale``/``zero`` float32 ``(rows, n_groups)``."""
    g = scheme.block_size
    b, cols = _blocks(w.float(), g)
    rows, n, _ = b.shape
    scale, zero = grid(b.reshape(rows * n, g), scheme.bits)
    scale, zero = scale.reshape(rows, n), zero.reshape(rows, n)
    deq = quantize_dequantize(b, scale[..., None], zero[..., None], scheme.bits)
    return deq.reshape(rows, n * g)[:, :cols].contiguous(), scale, zero


def codes_of(w: np.ndarray, scale: np.ndarray, zero: np.ndarray, scheme: QuantScheme) -> np.ndarray:
    """The uint8 codes of dequantized weights ``w`` ``(rows, cols)`` on their grid — exact, since
    ``w = (q − zero) · scale`` in float32 and ``|q − zero| ≤ 255``."""
    g = scheme.block_size
    s = np.repeat(scale, g, axis=1)[:, : w.shape[1]]
    z = np.repeat(zero, g, axis=1)[:, : w.shape[1]]
    q = np.rint(w.astype(np.float64) / s) + z
    lo, hi = scheme.code_range
    return np.clip(q, lo, hi).astype(np.uint8)


def pack_matmul_nbits(codes: np.ndarray, zero: np.ndarray, block: int, bits: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Codes ``(N, K)`` (uint8) and zero points ``(N, n_blocks)`` in ONNX Runtime's ``MatMulNBits`` layout:
    B ``(N, n_blocks, block·bits/8)`` uint8 and zero points ``(N · ⌈n_blocks·bits/8⌉,)`` uint8; 4-bit
    values go two a byte, the first in the low nibble. K is padded to whole blocks with the zero point
    (codes that decode to 0)."""
    n, k = codes.shape
    nb = -(-k // block)
    padded = np.repeat(zero.astype(np.uint8), block, axis=1)
    padded[:, :k] = codes
    if bits == 8:
        return padded.reshape(n, nb, block), zero.astype(np.uint8).reshape(-1)
    pairs = padded.reshape(n, nb, block // 2, 2)
    b = (pairs[..., 0] | (pairs[..., 1] << 4)).astype(np.uint8)
    zp = np.zeros((n, nb + (nb & 1)), np.uint8)
    zp[:, :nb] = zero.astype(np.uint8)
    zp = zp.reshape(n, -1, 2)
    return b, (zp[..., 0] | (zp[..., 1] << 4)).astype(np.uint8).reshape(-1)


def unpack_matmul_nbits(b: np.ndarray, zpacked: np.ndarray, scales: np.ndarray, k: int, block: int, bits: int = 4) -> np.ndarray:
    """Dequantized ``(N, K)`` float32 weights of a ``MatMulNBits`` B / zero points / scales triple."""
    n, nb, _ = b.shape
    if bits == 8:
        codes = b.reshape(n, nb * block).astype(np.float32)
        zp = zpacked.reshape(n, nb).astype(np.float32)
    else:
        codes = np.stack([b & 0x0F, b >> 4], axis=-1).reshape(n, nb * block).astype(np.float32)
        zp = np.stack([zpacked & 0x0F, zpacked >> 4], axis=-1).reshape(n, -1)[:, :nb].astype(np.float32)
    s = scales.reshape(n, nb).astype(np.float32)
    w = (codes - np.repeat(zp, block, axis=1)) * np.repeat(s, block, axis=1)
    return w[:, :k]


class PackMismatch(ValueError):
    """A packed weight does not decode to the model's dequantized weight."""


@dataclass
class PackedWeight:
    """A weight in ``MatMulNBits`` layout (``b`` (N, blocks, block·bits/8), ``scales`` (N·blocks,),
    ``zero_points``), with the zeros it had and the zeros the packed codes decode to."""

    b: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray
    zeros_before: int
    zeros_kept: int


def pack_exact(name: str, w: np.ndarray, scale: Any, zero: Any, scheme: QuantScheme) -> PackedWeight:
    """Pack the dequantized weight ``w`` (out, in) on its grid and decode it back: every value, each
    zero included, must come back bit for bit, or :class:`PackMismatch` names the weight. What every
    writer of ``MatMulNBits`` weights (the traced graphs' rewrite, the fused graph) goes through."""
    w = np.asarray(w, np.float32)
    scale = np.asarray(scale, np.float32)
    zero = np.asarray(zero).astype(np.float32)
    b, zp = pack_matmul_nbits(codes_of(w, scale, zero, scheme), zero, scheme.block_size, scheme.bits)
    decoded = unpack_matmul_nbits(b, zp, scale, w.shape[1], scheme.block_size, scheme.bits)
    if not np.array_equal(decoded, w):
        raise PackMismatch(f"weight '{name}': {int((decoded != w).sum())} values of the packed weight differ from the model's dequantized weight")
    was_zero = w == 0
    return PackedWeight(b, scale.reshape(-1), zp, int(was_zero.sum()), int((decoded[was_zero] == 0).sum()))


def parity_tolerance(spec: dict[str, Any]) -> tuple[float, float, str]:
    """(atol, rtol, why) for comparing a quantized variant's engine with its own PyTorch model, which
    holds the same dequantized weights: what differs is only what the engine's kernels quantize at run
    time. At ``accuracy_level`` 4 that is every activation entering a quantized linear, rounded to int8
    per block (ONNX Runtime's own scheme, which a PyTorch emulation did not reproduce): on SmolLM2 the
    logits then differ from the fp32-activation model's by up to 1.7 (8-bit) / 1.9 (4-bit) of
    |logit| ≤ 36 on 2 × 64 evaluation tokens, top-1 agreeing on 94 % / 97 % of them
    (``benchmarks/quant_probe.py``), so the elementwise check is coarse and the perplexity and
    greedy-decode agreement are the measures of that precision."""
    scheme = QuantScheme.from_dict(spec)
    if scheme.accuracy_level == 4:
        return ACTIVATION_QUANT_ATOL, ACTIVATION_QUANT_RTOL, "activations quantized to int8 per block at run time by the engine's kernel"
    return 1e-3, 1e-3, "weights equal PyTorch's bit for bit; the kernel computes in fp32"


ACTIVATION_QUANT_ATOL = 4.0
ACTIVATION_QUANT_RTOL = 0.1
