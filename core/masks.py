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
