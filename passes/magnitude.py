"""Magnitude pruning: drop the smallest |w|, unstructured (per matrix or per row) or N:M."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from passes.base import LayerChange, Pass, PassContext, PassResult, SparsityTarget, register_pass
from core.masks import nm_mask, unstructured_mask

log = logging.getLogger(__name__)


@dataclass
class MagnitudeConfig(SparsityTarget):
    scope: str = "matrix"
    """Unstructured ranking scope: 'matrix' (whole weight) or 'row' (each output row)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.scope not in ("matrix", "row"):
            raise ValueError(f"scope '{self.scope}' is not one of matrix, row")


@register_pass
class MagnitudePass(Pass):
    name = "magnitude"
    config_class = MagnitudeConfig
    streams = True

    def run(self, model: torch.nn.Module, ctx: PassContext) -> PassResult:
        cfg = self.config
        t0 = time.perf_counter()
        result = PassResult(self.name, info={"pattern": cfg.pattern, "sparsity": cfg.sparsity, "scope": cfg.scope})
        if ctx.stream is None:
            self._prune(ctx.adapter.linears(model, roles=cfg.targets, blocks=cfg.blocks), result)
        else:  # one block in memory at a time; blocks not targeted are copied by the stream's finish
            chosen = set(cfg.blocks) if cfg.blocks else None
            for b in ctx.stream.blocks():
                if chosen is None or b in chosen:
                    ctx.stream.load(b)
                    self._prune(ctx.adapter.linears(model, roles=cfg.targets, blocks=[b]), result)
                    ctx.stream.done(b)
        if not result.layers:
            raise ValueError(f"pass 'magnitude': no linear matches targets {cfg.targets} and blocks {cfg.blocks}")
        result.seconds = time.perf_counter() - t0
        return result

    def _prune(self, refs: list, result: PassResult) -> None:
        cfg = self.config
        with torch.no_grad():
            for ref in refs:
                w = ref.weight_out_in()
                scores = w.abs()
                if cfg.nm is not None:
                    mask = nm_mask(scores, *cfg.nm)
                else:
                    mask = unstructured_mask(scores, cfg.sparsity, cfg.scope)
                w.mul_(mask)
                result.layers.append(LayerChange.of(ref))
                log.debug("magnitude: %s → sparsity %.3f", ref.name, result.layers[-1].sparsity)
