"""Wanda (Sun et al. 2023): score |W_ij| · ‖X_j‖₂, pruned per output row or per N:M group."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from calibrate.sensitivity import diag_saliency
from calibrate.stats import Collector, InputNormCollector
from passes.allocation import ALLOCATION_TITLE, allocation_report
from passes.base import PassContext, PassResult, register_pass
from core.masks import nm_mask, unstructured_mask
from passes.dsnot import dsnot_refine
from passes.oneshot import OneShotConfig, OneShotPass, PruneFn, run_oneshot
from core.adapters.base import LinearRef


@dataclass
class WandaConfig(OneShotConfig):
    dsnot: bool = False
    """Refine each mask with DSnoT's training-free prune-and-grow (see :mod:`passes.dsnot`): swaps
    that shrink each output's expected reconstruction error, the sparsity and N:M pattern kept."""
    dsnot_cycles: int = 50
    """DSnoT: at most this many swaps per output row."""
    dsnot_threshold: float = 0.1
    """DSnoT: a row stops once its expected error |Σ_pruned W_ij E[x_j]| is at most this (absolute,
    as in the reference implementation)."""
    dsnot_var_power: float = 1.0
    """DSnoT: a pruned weight's claim to grow back is |W_ij E[x_j]| / Var[x_j] to this power."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 1 <= self.dsnot_cycles <= 100000:
            raise ValueError(f"dsnot_cycles {self.dsnot_cycles} is outside [1, 100000]")
        if not 0.0 <= self.dsnot_threshold < float("inf"):
            raise ValueError(f"dsnot_threshold {self.dsnot_threshold} must be a finite number >= 0")
        if not 0.0 <= self.dsnot_var_power <= 4.0:
            raise ValueError(f"dsnot_var_power {self.dsnot_var_power} is outside [0, 4]")


def wanda_scores(weight: torch.Tensor, input_norms: torch.Tensor) -> torch.Tensor:
    """|W| scaled by each input channel's activation norm; weight is (out, in), norms (in,)."""
    return weight.abs().float() * input_norms.float()[None, :]


def wanda_mask(weight: torch.Tensor, input_norms: torch.Tensor, sparsity: float | None, nm: tuple[int, int] | None) -> torch.Tensor:
    return mask_of_scores(wanda_scores(weight, input_norms), sparsity, nm)


def mask_of_scores(scores: torch.Tensor, sparsity: float | None, nm: tuple[int, int] | None) -> torch.Tensor:
    """Wanda's selection: the N:M pattern per group, or ``sparsity`` per output row."""
    if nm is not None:
        return nm_mask(scores, *nm)
    return unstructured_mask(scores, sparsity, scope="row")


def wanda_pruner(cfg: OneShotConfig) -> tuple[Callable[[LinearRef], Collector], PruneFn]:
    """The collector factory and the in-place prune function of Wanda with ``cfg``'s pattern
    (shared by this pass and the passes that wrap it, like SDS); with ``cfg.dsnot`` each mask is
    refined by DSnoT before it is applied."""
    dsnot = bool(getattr(cfg, "dsnot", False))

    def prune(refs: list[LinearRef], col: Collector, sparsity: float | list[float] | None) -> dict:
        norms = col.norms()
        each = sparsity if isinstance(sparsity, list) else [sparsity] * len(refs)
        facts = {}
        moments = (col.means(), col.variances()) if dsnot else None  # one input, shared by the group
        for ref, s in zip(refs, each):
            w = ref.weight_out_in()
            scores = wanda_scores(w, norms)
            mask = mask_of_scores(scores, s, cfg.nm)
            if moments is not None:
                mask, stats = dsnot_refine(
                    w, mask, scores, *moments, cfg.nm, cfg.dsnot_cycles, cfg.dsnot_threshold, cfg.dsnot_var_power,
                )
                facts[ref.name] = stats.to_dict()
            w.mul_(mask)
        return {"dsnot": facts} if facts else {}

    return (lambda ref: InputNormCollector(ref.in_features)), prune


@register_pass
class WandaPass(OneShotPass):
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
