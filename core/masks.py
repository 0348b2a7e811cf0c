"""Sparsity masks shared by every pruning pass.

Conventions: a weight is viewed as ``(out_features, in_features)``; N:M groups run
along the *input* (reduction) dimension, which is the axis TensorRT and cuSPARSELt
require for 2:4 (MatMul B axis 0 once the weight is transposed for export).
A mask is a bool tensor, ``True`` = keep.
"""

from __future__ import annotations

import re

import torch

_PATTERN_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def parse_pattern(pattern: str) -> tuple[int, int]:
    """``"2:4"`` → ``(2, 4)``: keep N of every M consecutive input weights. Requires 0 < N < M."""
    m = _PATTERN_RE.match(str(pattern))
    if not m:
        raise ValueError(f"pattern '{pattern}' is not of the form 'N:M' (e.g. '2:4')")
    n, mm = int(m.group(1)), int(m.group(2))
    if not 0 < n < mm:
        raise ValueError(f"pattern '{pattern}' needs 0 < N < M (N weights kept in every group of M)")
    return n, mm


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` highest-scoring entries of every group of ``m`` along the last dimension.

    >>> nm_mask(torch.arange(1., 9.)[None], 2, 4).int().tolist()
    [[0, 0, 1, 1, 0, 0, 1, 1]]
    """
    if scores.dim() != 2:
        raise ValueError(f"N:M mask needs a 2-D (out, in) score matrix, got shape {tuple(scores.shape)}")
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"input dimension {cols} is not a multiple of M={m} for an {n}:{m} pattern")
    groups = scores.reshape(rows, cols // m, m)
    keep = groups.topk(n, dim=-1, largest=True, sorted=False).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
    return mask.reshape(rows, cols)


def unstructured_mask(scores: torch.Tensor, sparsity: float, scope: str = "matrix") -> torch.Tensor:
    """Drop exactly ``round(sparsity * count)`` lowest-scoring entries per matrix or per output row."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity {sparsity} is outside [0, 1)")
    if scores.dim() != 2:
        raise ValueError(f"mask needs a 2-D (out, in) score matrix, got shape {tuple(scores.shape)}")
    if scope == "matrix":
        flat = scores.reshape(-1)
        k = int(round(sparsity * flat.numel()))
        mask = torch.ones_like(flat, dtype=torch.bool)
        if k:
            mask[flat.topk(k, largest=False, sorted=False).indices] = False
        return mask.reshape(scores.shape)
    if scope == "row":
        k = int(round(sparsity * scores.shape[1]))
        mask = torch.ones_like(scores, dtype=torch.bool)
        if k:
            mask.scatter_(1, scores.topk(k, dim=1, largest=False, sorted=False).indices, False)
        return mask
    raise ValueError(f"scope '{scope}' is not one of matrix, row")


def is_nm_sparse(weight: torch.Tensor, n: int, m: int) -> bool:
    """True when every group of ``m`` along the last dimension has at most ``n`` non-zeros."""
    if weight.shape[-1] % m:
        return False
    nz = (weight.reshape(-1, weight.shape[-1] // m, m) != 0).sum(-1)
    return bool((nz <= n).all())


def sparsity_of(weight: torch.Tensor) -> float:
    return float((weight == 0).sum()) / max(weight.numel(), 1)


# --- pattern sets: the constraint sets of pattern pruning, as Euclidean projections ---------------

_TILE_RE = re.compile(r"^\s*tile\s*(\d+)\s*x\s*(\d+)\s*:\s*(\d+)\s*$")


class PatternSet:
    """A set of pattern-sparse (out, in) matrices, with the Euclidean projection onto it.

    ``"N:M"`` — at most N non-zeros in every M consecutive weights along the input (reduction)
    axis (2:4 is what sparse tensor cores run; 4:8 is a looser set holding every 2:4 matrix);
    ``"tileRxC:K"`` — at most K non-zeros in every R × C tile (R output rows by C inputs), a
    block pattern for block-sparse kernels.

    The projection keeps the largest magnitudes of every group (the nearest member in Frobenius
    norm), so it is idempotent: a member projects onto itself.
    """

    def __init__(self, spec: str):
        self.spec = str(spec).strip()
        tile = _TILE_RE.match(self.spec)
        if tile:
            self.rows, self.cols, self.keep = (int(g) for g in tile.groups())
            if self.rows < 1 or self.cols < 1 or not 0 < self.keep < self.rows * self.cols:
                raise ValueError(f"pattern '{spec}' needs tiles of at least 1 × 1 and 0 < K < R·C kept per tile")
        else:
            try:
                self.keep, self.cols = parse_pattern(self.spec)
            except ValueError:
                raise ValueError(f"pattern '{spec}' is neither 'N:M' (e.g. '2:4') nor 'tileRxC:K' (e.g. 'tile4x4:8')") from None
            self.rows = 1

    @property
    def nm(self) -> tuple[int, int] | None:
        """(N, M) for an N:M set, None for a tile set."""
        return (self.keep, self.cols) if self.rows == 1 else None

    @property
    def density(self) -> float:
        return self.keep / (self.rows * self.cols)

    def check_shape(self, shape: tuple[int, ...], name: str = "weight") -> None:
        if len(shape) != 2 or shape[0] % self.rows or shape[1] % self.cols:
            raise ValueError(f"{name} of shape {tuple(shape)} does not split into {self.rows} × {self.cols} groups for pattern '{self.spec}'")

    def _groups(self, t: torch.Tensor) -> torch.Tensor:
        """(out, in) → (groups, R·C): one row per tile/group."""
        self.check_shape(tuple(t.shape))
        r, c = self.rows, self.cols
        o, i = t.shape
        return t.reshape(o // r, r, i // c, c).permute(0, 2, 1, 3).reshape(-1, r * c)

    def _ungroup(self, g: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
        r, c = self.rows, self.cols
        o, i = shape
        return g.reshape(o // r, i // c, r, c).permute(0, 2, 1, 3).reshape(o, i)

    def mask(self, scores: torch.Tensor) -> torch.Tensor:
        """Keep (True) the K highest scores of every group."""
        g = self._groups(scores)
        keep = g.topk(self.keep, dim=-1, sorted=False).indices
        return self._ungroup(torch.zeros_like(g, dtype=torch.bool).scatter_(-1, keep, True), tuple(scores.shape))

    def project(self, weight: torch.Tensor) -> torch.Tensor:
        """The nearest member of the set (a new tensor)."""
        return weight * self.mask(weight.abs())

    def contains(self, weight: torch.Tensor) -> bool:
        if len(weight.shape) != 2 or weight.shape[0] % self.rows or weight.shape[1] % self.cols:
            return False
        return bool(((self._groups(weight) != 0).sum(-1) <= self.keep).all())
