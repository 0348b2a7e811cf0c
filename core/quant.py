"""Weight quantization maths shared by the ``quantize`` pass, the ONNX rewrite and the tests.

Two schemes, both chosen so that a weight that is exactly zero stays exactly zero (a pruned
pattern survives quantization by construction, whatever the grid):

- **int8**: one scale per output channel (row of the ``(out, in)`` weight), symmetric:
  ``scale = max|w| / 127``, ``q = clamp(round(w / scale), -127, 127)``, ``w' = q · scale``.
  0 → q = 0 → 0.
- **int4**: one scale and one zero point per block of ``block_size`` input columns of a row,
  asymmetric over a range that always contains 0: ``lo = min(min w, 0)``, ``hi = max(max w, 0)``,
  ``scale = (hi − lo) / 15``, ``zero = clamp(round(−lo / scale), 0, 15)``,
  ``q = clamp(round(w / scale) + zero, 0, 15)``, ``w' = (q − zero) · scale``. 0 → q = zero → 0.
  This is ONNX Runtime's ``MatMulNBits`` layout (uint4 codes with a uint4 zero point per block).

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
    """Input columns per scale for 4-bit; 0 for 8-bit (one scale per output channel)."""
    accuracy_level: int = 0
    """For 4-bit on ONNX Runtime: the ``MatMulNBits`` compute precision (4 = int8 activations)."""

    def __post_init__(self) -> None:
        if self.bits not in BITS:
            raise ValueError(f"bits {self.bits} is not one of {', '.join(map(str, BITS))}")
        if self.bits == 8 and self.block_size != 0:
            raise ValueError(f"block_size {self.block_size}: 8-bit weights have one scale per output channel (block_size 0)")
        if self.bits == 4 and (self.block_size < 16 or self.block_size & (self.block_size - 1)):
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
        return "int8" if self.bits == 8 else f"int4 (block {self.block_size})"

    def group(self, in_features: int) -> int:
        """Input columns sharing one scale."""
        return in_features if self.bits == 8 else self.block_size


def grid(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of each row of ``w`` ``(rows, cols)`` (one group per row): float32 ``(rows,)`` each."""
    w = w.float()
    if bits == 8:
        scale = w.abs().amax(dim=1) / 127.0
        zero = torch.zeros_like(scale)
    else:
        lo = w.amin(dim=1).clamp(max=0.0)
        hi = w.amax(dim=1).clamp(min=0.0)
        scale = (hi - lo) / 15.0
        zero = torch.zeros_like(scale)
        nz = scale > 0
        zero[nz] = torch.round(-lo[nz] / scale[nz]).clamp(0, 15)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero group: any scale works
    return scale, zero


def quantize_dequantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """``w' = (q − zero) · scale`` with ``q`` the rounded, clamped code; ``scale``/``zero`` broadcast against ``w``."""
    if bits == 8:
        q = torch.round(w / scale).clamp(-127, 127)
    else:
        q = (torch.round(w / scale) + zero).clamp(0, 15)
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
    g = scheme.group(w.shape[1])
    b, cols = _blocks(w.float(), g)
    rows, n, _ = b.shape
    scale, zero = grid(b.reshape(rows * n, g), scheme.bits)
    scale, zero = scale.reshape(rows, n), zero.reshape(rows, n)
    deq = quantize_dequantize(b, scale[..., None], zero[..., None], scheme.bits)
    return deq.reshape(rows, n * g)[:, :cols].contiguous(), scale, zero


def expand(t: torch.Tensor, group: int, cols: int) -> torch.Tensor:
    """A per-group ``(rows, n_groups)`` tensor repeated over each group's columns: ``(rows, cols)``."""
    return t.repeat_interleave(group, dim=1)[:, :cols]


def codes_of(w: np.ndarray, scale: np.ndarray, zero: np.ndarray, scheme: QuantScheme) -> np.ndarray:
    """The integer codes of dequantized weights ``w`` ``(rows, cols)`` on their grid — exact, since
    ``w = (q − zero) · scale`` in float32 and ``|q − zero| ≤ 127``. int8: int8 codes; int4: uint8 in [0, 15]."""
    g = scheme.group(w.shape[1])
    s = np.repeat(scale, g, axis=1)[:, : w.shape[1]]
    z = np.repeat(zero, g, axis=1)[:, : w.shape[1]]
    q = np.rint(w.astype(np.float64) / s) + z
    if scheme.bits == 8:
        return np.clip(q, -127, 127).astype(np.int8)
    return np.clip(q, 0, 15).astype(np.uint8)


def pack_matmul_nbits(codes: np.ndarray, zero: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """4-bit codes ``(N, K)`` (uint8 in [0, 15]) and zero points ``(N, n_blocks)`` in ONNX Runtime's
    ``MatMulNBits`` layout: B ``(N, n_blocks, block/2)`` uint8, two codes a byte, the first in the low
    nibble; zero points ``(N · ⌈n_blocks/2⌉,)`` uint8 packed the same way per row."""
    n, k = codes.shape
    nb = -(-k // block)
    padded = np.zeros((n, nb * block), np.uint8)
    padded[:, :k] = codes
    padded[:, k:] = np.repeat(zero.astype(np.uint8), block, axis=1)[:, k : nb * block]  # padding decodes to 0
    pairs = padded.reshape(n, nb, block // 2, 2)
    b = (pairs[..., 0] | (pairs[..., 1] << 4)).astype(np.uint8)
    zp = np.zeros((n, nb + (nb & 1)), np.uint8)
    zp[:, :nb] = zero.astype(np.uint8)
    zp = zp.reshape(n, -1, 2)
    zpacked = (zp[..., 0] | (zp[..., 1] << 4)).astype(np.uint8).reshape(-1)
    return b, zpacked


def unpack_matmul_nbits(b: np.ndarray, zpacked: np.ndarray, scales: np.ndarray, k: int, block: int) -> np.ndarray:
    """Dequantized ``(N, K)`` float32 weights of a ``MatMulNBits`` B / zero points / scales triple."""
    n, nb, _ = b.shape
    codes = np.stack([b & 0x0F, b >> 4], axis=-1).reshape(n, nb * block).astype(np.float32)
    zp = np.stack([zpacked & 0x0F, zpacked >> 4], axis=-1).reshape(n, -1)[:, :nb].astype(np.float32)
    s = scales.reshape(n, nb).astype(np.float32)
    w = (codes - np.repeat(zp, block, axis=1)) * np.repeat(s, block, axis=1)
    return w[:, :k]


def parity_tolerance(spec: dict[str, Any]) -> tuple[float, float, str]:
    """(atol, rtol, why) for comparing a quantized variant's engine with its own PyTorch model, which
    holds the same dequantized weights: what differs is only what the engine's kernels quantize at run
    time. Values measured on SmolLM2's logits (docs/quantization.md)."""
    scheme = QuantScheme.from_dict(spec)
    if scheme.bits == 8 or scheme.accuracy_level == 4:
        return ACTIVATION_QUANT_ATOL, ACTIVATION_QUANT_RTOL, "activations quantized to int8 at run time by the engine's kernel"
    return 1e-3, 1e-3, "weights equal PyTorch's bit for bit; the kernel computes in fp32"


ACTIVATION_QUANT_ATOL = 0.5
ACTIVATION_QUANT_RTOL = 0.1
