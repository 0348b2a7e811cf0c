"""Statistics collectors: they read layer inputs, never change weights.

- :class:`HessianCollector`: H = (2/n) Σ x xᵀ over n input rows (tokens). Each
  chunk's product is taken in float32 (one GEMM), and chunks are summed into a
  float64 accumulator, so rounding error does not grow with the number of
  calibration tokens.
- :class:`InputNormCollector`: per input channel j, ‖X_j‖₂² and Σ X_j summed over rows, in float64
  (norms for Wanda; means and variances for DSnoT).
"""

from __future__ import annotations

import torch


class Collector:
    rows: int = 0

    def add(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def permute(self, order: torch.Tensor) -> None:
        raise NotImplementedError(f"{type(self).__name__} cannot reorder its input channels")


class HessianCollector(Collector):
    def __init__(self, columns: int):
        self.columns = columns
        self.sum = torch.zeros(columns, columns, dtype=torch.float64)
        self.rows = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, self.columns).float()
        self.sum += (x.t() @ x).double()
        self.rows += x.shape[0]

    def hessian(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(2/n) XᵀX in ``dtype`` (float32: the reference implementations' precision and scaling)."""
        if self.rows == 0:
            raise ValueError("Hessian requested before any calibration rows were seen")
        return (self.sum * (2.0 / self.rows)).to(dtype)

    def sq_norms(self) -> torch.Tensor:
        return torch.diagonal(self.sum).clone()

    def permute(self, order: torch.Tensor) -> None:
        """The statistics of the inputs reordered (new channel i = old channel order[i])."""
        self.sum = self.sum[order][:, order].contiguous()


class InputNormCollector(Collector):
    def __init__(self, columns: int):
        self.columns = columns
        self.sq = torch.zeros(columns, dtype=torch.float64)
        self.sum = torch.zeros(columns, dtype=torch.float64)
        self.rows = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, self.columns).float()
        self.sq += x.pow(2).sum(0).double()
        self.sum += x.sum(0).double()
        self.rows += x.shape[0]

    def sq_norms(self) -> torch.Tensor:
        return self.sq.clone()

    def permute(self, order: torch.Tensor) -> None:
        """The statistics of the inputs reordered (new channel i = old channel order[i])."""
        self.sq = self.sq[order].contiguous()
        self.sum = self.sum[order].contiguous()

    def norms(self) -> torch.Tensor:
        """‖X_j‖₂ per input channel over every calibration row."""
        return self.sq.sqrt().float()

    def means(self) -> torch.Tensor:
        """E[X_j] per input channel (float64)."""
        if self.rows == 0:
            raise ValueError("input means requested before any calibration rows were seen")
        return self.sum / self.rows

    def variances(self) -> torch.Tensor:
        """Var[X_j] per input channel (float64, population variance, never negative)."""
        mean = self.means()
        return (self.sq / self.rows - mean.pow(2)).clamp_min(0.0)
