"""Wanda (Sun et al. 2023): score |W_ij| · ‖X_j‖₂, pruned per output row or per N:M group."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from calibrate.sensitivity import diag_saliency
from calibrate.stats import Collector, InputNormCollector
from passes.allocation import ALLOCATION_TITLE, allocation_report
from passes.base import Pass, PassContext, PassResult, register_pass
from core.masks import nm_mask, unstructured_mask
from passes.oneshot import OneShotConfig, PruneFn, run_oneshot
from core.adapters.base import LinearRef


@dataclass
class WandaConfig(OneShotConfig):
    pass


def wanda_scores(weight: torch.Tensor, input_norms: torch.Tensor) -> torch.Tensor:
    """|W| scaled by each input channel's activation norm; weight is (out, in), norms (in,)."""
    return weight.abs().float() * input_norms.float()[None, :]


def wanda_mask(weight: torch.Tensor, input_norms: torch.Tensor, sparsity: float | None, nm: tuple[int, int] | None) -> torch.Tensor:
    scores = wanda_scores(weight, input_norms)
    if nm is not None:
        return nm_mask(scores, *nm)
    return unstructured_mask(scores, sparsity, scope="row")


def wanda_pruner(cfg: OneShotConfig) -> tuple[Callable[[LinearRef], Collector], PruneFn]:
    """The collector factory and the in-place prune function of Wanda with ``cfg``'s pattern
    (shared by this pass and the passes that wrap it, like SDS)."""

    def prune(refs: list[LinearRef], col: Collector, sparsity: float | list[float] | None) -> dict:
        norms = col.norms()
        each = sparsity if isinstance(sparsity, list) else [sparsity] * len(refs)
        for ref, s in zip(refs, each):
            w = ref.weight_out_in()
            w.mul_(wanda_mask(w, norms, s, cfg.nm))
        return {}

    return (lambda ref: InputNormCollector(ref.in_features)), prune


@register_pass
class WandaPass(Pass):
    name = "wanda"
    config_class = WandaConfig
    report_title = ALLOCATION_TITLE

    @classmethod
    def report_section(cls, variant: dict, result: dict) -> list:
        return allocation_report(variant, result)

    uses_calibration = True

    def run(self, model: torch.nn.Module, ctx: PassContext) -> PassResult:
        cfg = self.config
        make_collector, prune = wanda_pruner(cfg)

        def saliency(weights: list[torch.Tensor], col: Collector) -> tuple[list[torch.Tensor], torch.Tensor, str]:
            h_diag = col.sq_norms().double() * (2.0 / max(col.rows, 1))
            return [diag_saliency(w, h_diag) for w in weights], h_diag, "row"

        return run_oneshot(self.name, cfg, model, ctx, make_collector, prune, saliency)
