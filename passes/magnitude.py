"""Magnitude pruning: drop the smallest |w|, unstructured (per matrix or per row) or N:M."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from passes.base import ROLES, LayerChange, Pass, PassContext, PassResult, check_roles, register_pass
from passes.masks import nm_mask, parse_pattern, sparsity_of, unstructured_mask

log = logging.getLogger(__name__)


@dataclass
class MagnitudeConfig:
    sparsity: float | None = None
    """Fraction of weights removed (unstructured). Exclusive with ``pattern``."""
    pattern: str | None = None
    """'N:M' — keep N of every M along the input dimension, e.g. '2:4'."""
    scope: str = "matrix"
    """Unstructured ranking scope: 'matrix' (whole weight) or 'row' (each output row)."""
    targets: list[str] = field(default_factory=lambda: list(ROLES))
    blocks: list[int] | None = None
    """Block indices to prune; all when empty."""

    def __post_init__(self) -> None:
        if (self.sparsity is None) == (self.pattern is None):
            raise ValueError("set exactly one of 'sparsity' (unstructured) or 'pattern' (N:M)")
        if self.sparsity is not None and not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity {self.sparsity} is outside [0, 1)")
        if self.pattern is not None:
            parse_pattern(self.pattern)
        if self.scope not in ("matrix", "row"):
            raise ValueError(f"scope '{self.scope}' is not one of matrix, row")
        check_roles(self.targets)
        if self.blocks is not None and any(b < 0 for b in self.blocks):
            raise ValueError(f"blocks {self.blocks} has a negative index")


@register_pass
class MagnitudePass(Pass):
    name = "magnitude"
    config_class = MagnitudeConfig

    def run(self, model: torch.nn.Module, ctx: PassContext) -> PassResult:
        cfg = self.config
        t0 = time.perf_counter()
        result = PassResult(self.name, info={"pattern": cfg.pattern, "sparsity": cfg.sparsity, "scope": cfg.scope})
        refs = ctx.adapter.linears(model, roles=cfg.targets, blocks=cfg.blocks)
        if not refs:
            raise ValueError(f"pass 'magnitude': no linear matches targets {cfg.targets} and blocks {cfg.blocks}")
        with torch.no_grad():
            for ref in refs:
                w = ref.weight_out_in()
                scores = w.abs()
                if cfg.pattern is not None:
                    n, m = parse_pattern(cfg.pattern)
                    mask = nm_mask(scores, n, m)
                else:
                    mask = unstructured_mask(scores, cfg.sparsity, cfg.scope)
                w.mul_(mask)
                result.layers.append(LayerChange(ref.name, ref.role, ref.block, tuple(w.shape), sparsity_of(w)))
                log.debug("magnitude: %s → sparsity %.3f", ref.name, result.layers[-1].sparsity)
        result.seconds = time.perf_counter() - t0
        return result
