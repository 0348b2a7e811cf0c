"""Recovery by distillation from the dense teacher, after a pass that removed or zeroed weights.

The student (the model as the previous passes left it) is trained on calibration windows
to match the dense teacher: KL(teacher ‖ student) on next-token distributions (temperature
``temperature``, scaled by T²) for causal LMs, or MSE on the final hidden states for
encoders; optionally plus ``hidden_mse`` × the mean over blocks of the hidden-state MSE,
normalised by the teacher's mean square. Embeddings (and a tied output head) stay frozen.
Weights that are exactly zero when recovery starts stay zero (``keep_zeros``), so it
also serves sparse models.

Budget, schedule, precision, checkpoints and resume are the shared training loop's
(:mod:`passes.training`): ``steps`` optimizer steps of ``batch_size`` windows, or fewer when
``max_minutes`` runs out; an interrupted build resumes from the last checkpoint in the
stage's work directory when the same recipe runs again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from core.adapters.base import task_output_name, task_outputs
from passes.base import LayerChange, Pass, PassContext, PassResult, register_pass
from passes.training import Checkpoint, TrainConfig, train, train_config_of

log = logging.getLogger(__name__)

CHECKPOINT = "distill-checkpoint"


@dataclass
class DistillConfig(TrainConfig):
    """The training loop's options (steps, batch_size, lr, warmup_steps, weight_decay, max_minutes,
    checkpoint_every, compute_dtype, max_grad_norm, log_every; see :class:`TrainConfig`) and:"""

    temperature: float = 1.0
    hidden_mse: float = 0.0
    """Weight of the per-block hidden-state MSE term (0 = logits only)."""
    keep_zeros: bool = True
    """Weights that are exactly zero when recovery starts stay zero."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.temperature <= 0:
            raise ValueError(f"temperature {self.temperature} must be positive")
        if self.hidden_mse < 0:
            raise ValueError(f"hidden_mse {self.hidden_mse} must be ≥ 0")


def trainable_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """Every parameter but the input embeddings and a (tied) output head."""
    frozen = {id(model.get_input_embeddings().weight)}
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out_emb is not None:
        frozen.add(id(out_emb.weight))
    return [(n, p) for n, p in model.named_parameters() if id(p) not in frozen]


class KeepZeros:
    """Training hook: weights that were exactly zero stay zero after every optimizer step."""

    def __init__(self, params: dict[str, torch.nn.Parameter]):
        self.params = params
        self.masks = {n: p.data != 0 for n, p in params.items() if p.dim() >= 2 and bool((p.data == 0).any())}

    def after_step(self, step: int) -> None:
        with torch.no_grad():
            for n, m in self.masks.items():
                self.params[n].mul_(m)


def model_outputs(model: torch.nn.Module, ids: torch.Tensor, causal: bool, hidden: bool) -> Any:
    """The model's outputs on ``ids`` for distillation (hidden states too when ``hidden`` or for an encoder)."""
    return task_outputs(model, "causal-lm" if causal else "encoder", ids, torch.ones_like(ids), output_hidden_states=hidden or not causal)


def distill_loss(student_out: Any, teacher_out: Any, causal: bool, temperature: float, hidden_mse: float) -> tuple[torch.Tensor, dict[str, float]]:
    parts: dict[str, float] = {}
    if causal:
        t = temperature
        log_s = F.log_softmax(student_out.logits.float() / t, dim=-1)
        log_t = F.log_softmax(teacher_out.logits.float() / t, dim=-1)
        main = (log_t.exp() * (log_t - log_s)).sum(-1).mean() * t * t
        parts["kl"] = float(main.detach())
    else:
        name = task_output_name("encoder")
        s, te = getattr(student_out, name).float(), getattr(teacher_out, name).float()
        main = F.mse_loss(s, te) / te.pow(2).mean().clamp(min=1e-12)
        parts["final_mse"] = float(main.detach())
    loss = main
    if hidden_mse > 0:
        terms = [
            F.mse_loss(hs.float(), ht.float()) / ht.float().pow(2).mean().clamp(min=1e-12)
            for hs, ht in zip(student_out.hidden_states[1:], teacher_out.hidden_states[1:])
        ]
        h = torch.stack(terms).mean()
        parts["hidden_mse"] = float(h.detach())
        loss = loss + hidden_mse * h
    return loss, parts


@register_pass
class DistillPass(Pass):
    name = "distill"
    config_class = DistillConfig
    uses_calibration = True
    trains = True
    report_title = "Recovery training"

    @classmethod
    def report_section(cls, variant: dict[str, Any], result: dict[str, Any]) -> list[Any]:
        """Steps run of those planned, tokens, time, and the loss at the start and the end."""
        from core.document import Paragraph

        info = result.get("info") or {}
        if "steps" not in info:
            return []
        budget = info.get("budget", {})
        minutes = f", {budget['max_minutes']} min" if budget.get("max_minutes") else ""
        return [Paragraph(
            f"**{variant['name']}** recovery: {info['steps']} of {info['steps_planned']} steps"
            f"{' (stopped at the time budget)' if info.get('stopped_early') else ''}, {info['tokens']} tokens, "
            f"{info['train_seconds']:.0f} s ({info['compute_dtype']}); budget {budget.get('steps')} steps{minutes}; "
            f"loss {info['loss_first10']:.4f} (first 10 steps) → {info['loss_last10']:.4f} (last 10)"
        )]

    def run(self, model: torch.nn.Module, ctx: PassContext) -> PassResult:
        cfg = self.config
        if ctx.calibration is None or ctx.teacher is None:
            raise ValueError("pass 'distill' needs calibration data and the dense teacher, and the context lacks them")
        causal = ctx.adapter.task == "causal-lm"
        windows = ctx.calibration()
        teacher = ctx.teacher()
        if teacher is model:
            raise ValueError("pass 'distill': the student is the teacher itself; it must run after a pruning pass")
        params = dict(trainable_parameters(model))
        hidden = cfg.hidden_mse > 0

        def loss_fn(ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
            with torch.no_grad():
                t_out = model_outputs(teacher, ids, causal, hidden)
            s_out = model_outputs(model, ids, causal, hidden)
            return distill_loss(s_out, t_out, causal, cfg.temperature, cfg.hidden_mse)

        hooks = [KeepZeros(params)] if cfg.keep_zeros else []
        ckpt = Checkpoint(ctx.work_dir, CHECKPOINT) if ctx.work_dir is not None else None
        tr = train(
            model, params, loss_fn, windows, train_config_of(cfg),
            seed=ctx.seed, checkpoint=ckpt, fingerprint_extra=[cfg.temperature, cfg.hidden_mse, cfg.keep_zeros],
            hooks=hooks, desc="distill", show_progress=ctx.progress,
        )
        result = PassResult(self.name, seconds=tr.seconds, layers=[LayerChange.of(ref) for ref in ctx.adapter.linears(model)])
        result.info = {"budget": {"steps": cfg.steps, "max_minutes": cfg.max_minutes}, **tr.summary(cfg.batch_size * windows.shape[1])}
        log.info("distill: %d steps in %.1f s, loss %.4f → %.4f", tr.steps, tr.seconds, result.info["loss_first10"], result.info["loss_last10"])
        return result
