"""Recovery by distillation from the dense teacher, after a pass that removed or zeroed weights.

The student (the model as the previous passes left it) is trained on calibration windows
to match the dense teacher: KL(teacher ‖ student) on next-token distributions (temperature
``temperature``, scaled by T²) for causal LMs, or MSE on the final hidden states for
encoders; optionally plus ``hidden_mse`` × the mean over blocks of the hidden-state MSE,
normalised by the teacher's mean square. Embeddings (and a tied output head) stay frozen.
Weights that are exactly zero when recovery starts stay zero (``keep_zeros``), so it
also serves sparse models.

Budget: ``steps`` optimizer steps of ``batch_size`` windows, or fewer when ``max_minutes``
runs out (the result says which). Every ``checkpoint_every`` steps the trainable weights,
the optimizer and the data position are written atomically to the stage's work directory;
an interrupted build resumes from the last checkpoint when the same recipe runs again.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from calibrate.runner import resolve_compute_dtype
from passes.base import LayerChange, Pass, PassContext, PassResult, register_pass
from pipeline.artifacts import stable_hash
from pipeline.progress import progress

log = logging.getLogger(__name__)

CHECKPOINT = "distill-checkpoint.pt"


@dataclass
class DistillConfig:
    steps: int = 200
    batch_size: int = 1
    """Calibration windows per optimizer step."""
    lr: float = 1e-4
    warmup_steps: int = 10
    weight_decay: float = 0.0
    temperature: float = 1.0
    hidden_mse: float = 0.0
    """Weight of the per-block hidden-state MSE term (0 = logits only)."""
    keep_zeros: bool = True
    max_minutes: float | None = None
    """Stop early (and say so) once this much training time has been spent."""
    checkpoint_every: int = 25
    compute_dtype: str = "auto"
    """Autocast precision of the forward/backward passes ('auto' = bfloat16 where the CPU has fast bf16)."""
    max_grad_norm: float = 1.0

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps {self.steps} must be at least 1")
        if not 1 <= self.batch_size <= 256:
            raise ValueError(f"batch_size {self.batch_size} is outside [1, 256]")
        if not 0 < self.lr < 1:
            raise ValueError(f"lr {self.lr} is outside (0, 1)")
        if self.warmup_steps < 0 or self.checkpoint_every < 1:
            raise ValueError("warmup_steps must be ≥ 0 and checkpoint_every ≥ 1")
        if self.temperature <= 0:
            raise ValueError(f"temperature {self.temperature} must be positive")
        if self.hidden_mse < 0 or self.weight_decay < 0:
            raise ValueError("hidden_mse and weight_decay must be ≥ 0")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise ValueError(f"max_minutes {self.max_minutes} must be positive")
        if self.compute_dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"compute_dtype '{self.compute_dtype}' is not one of auto, float32, bfloat16")


def _trainable(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    frozen = {id(model.get_input_embeddings().weight)}
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out_emb is not None:
        frozen.add(id(out_emb.weight))
    return [(n, p) for n, p in model.named_parameters() if id(p) not in frozen]


def _lr_factor(step: int, cfg: DistillConfig) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - cfg.warmup_steps) / span)))


def _forward(model: torch.nn.Module, ids: torch.Tensor, causal: bool, hidden: bool) -> Any:
    kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "output_hidden_states": hidden or not causal}
    if causal:
        kwargs["use_cache"] = False
    return model(**kwargs)


def distill_loss(student_out: Any, teacher_out: Any, causal: bool, temperature: float, hidden_mse: float) -> tuple[torch.Tensor, dict[str, float]]:
    parts: dict[str, float] = {}
    if causal:
        t = temperature
        log_s = F.log_softmax(student_out.logits.float() / t, dim=-1)
        log_t = F.log_softmax(teacher_out.logits.float() / t, dim=-1)
        main = (log_t.exp() * (log_t - log_s)).sum(-1).mean() * t * t
        parts["kl"] = float(main.detach())
    else:
        s, te = student_out.last_hidden_state.float(), teacher_out.last_hidden_state.float()
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


def _resume(ckpt: Path | None, fingerprint: str, params: dict[str, torch.nn.Parameter], opt: torch.optim.Optimizer) -> tuple[int, float, list]:
    """(step, seconds spent, loss history) of a matching checkpoint, loaded into ``params`` and ``opt``; else a fresh start."""
    if ckpt is None:
        return 0, 0.0, []
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    if not ckpt.exists():
        return 0, 0.0, []
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    if state.get("fingerprint") != fingerprint:
        log.warning("distill: ignoring checkpoint %s written for other settings", ckpt)
        return 0, 0.0, []
    with torch.no_grad():
        for n, t in state["params"].items():
            params[n].copy_(t)
    opt.load_state_dict(state["optimizer"])
    log.info("distill: resuming from the checkpoint at step %d (%s)", state["step"], ckpt)
    return state["step"], state["seconds"], state["history"]


def _save_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


@register_pass
class DistillPass(Pass):
    name = "distill"
    config_class = DistillConfig
    uses_calibration = True

    def run(self, model: torch.nn.Module, ctx: PassContext) -> PassResult:
        cfg = self.config
        if ctx.calibration is None or ctx.teacher is None:
            raise ValueError("pass 'distill' needs calibration data and the dense teacher, and the context lacks them")
        causal = ctx.adapter.task == "causal-lm"
        windows = ctx.calibration()
        teacher = ctx.teacher()
        if teacher is model:
            raise ValueError("pass 'distill': the student is the teacher itself; it must run after a pruning pass")
        dtype = resolve_compute_dtype(cfg.compute_dtype)
        autocast = dict(device_type="cpu", dtype=dtype, enabled=dtype != torch.float32)
        params = dict(_trainable(model))
        masks = {n: p.data != 0 for n, p in params.items() if cfg.keep_zeros and p.dim() >= 2 and bool((p.data == 0).any())}
        fingerprint = stable_hash("distill", asdict(cfg), [(n, list(p.shape)) for n, p in params.items()], list(windows.shape), ctx.seed)
        opt = torch.optim.AdamW(list(params.values()), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
        order = torch.randperm(windows.shape[0], generator=torch.Generator().manual_seed(ctx.seed))
        ckpt = ctx.work_dir / CHECKPOINT if ctx.work_dir is not None else None
        start, spent, history = _resume(ckpt, fingerprint, params, opt)
        for p in model.parameters():
            p.requires_grad_(id(p) in {id(q) for q in params.values()})
        model.train()
        for m in model.modules():  # dropout off: the student matches the teacher's deterministic outputs
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        done, stopped_early = start, False
        t_start = time.perf_counter() - spent
        steps = range(start, cfg.steps)
        bar = progress(steps, desc="distill steps", initial=start, total=cfg.steps) if ctx.progress else steps
        try:
            for step in bar:
                if cfg.max_minutes is not None and time.perf_counter() - t_start > cfg.max_minutes * 60:
                    stopped_early = True
                    break
                ids = windows[[int(order[(step * cfg.batch_size + i) % len(order)]) for i in range(cfg.batch_size)]]
                for group in opt.param_groups:
                    group["lr"] = cfg.lr * _lr_factor(step, cfg)
                with torch.no_grad(), torch.autocast(**autocast):
                    t_out = _forward(teacher, ids, causal, cfg.hidden_mse > 0)
                with torch.autocast(**autocast):
                    s_out = _forward(model, ids, causal, cfg.hidden_mse > 0)
                loss, parts = distill_loss(s_out, t_out, causal, cfg.temperature, cfg.hidden_mse)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.max_grad_norm)
                opt.step()
                with torch.no_grad():
                    for n, m in masks.items():
                        params[n].mul_(m)
                done = step + 1
                value = float(loss.detach())
                history.append({"step": done, "loss": round(value, 5), **{k: round(v, 5) for k, v in parts.items()}})
                if hasattr(bar, "set_postfix"):
                    bar.set_postfix(loss=f"{value:.4f}")
                if done % 10 == 0:
                    log.info("distill step %d/%d: loss %.4f", done, cfg.steps, value)
                if ckpt is not None and (done % cfg.checkpoint_every == 0 or done == cfg.steps):
                    _save_atomic(
                        {"fingerprint": fingerprint, "step": done, "seconds": time.perf_counter() - t_start, "history": history,
                         "params": {n: p.detach().clone() for n, p in params.items()}, "optimizer": opt.state_dict()},
                        ckpt,
                    )
        finally:
            for p in model.parameters():
                p.requires_grad_(False)
            model.eval()
        seconds = time.perf_counter() - t_start
        result = PassResult(self.name, seconds=seconds, layers=[LayerChange.of(ref) for ref in ctx.adapter.linears(model)])
        first, last = history[:10], history[-10:]
        result.info = {
            "steps": done,
            "steps_planned": cfg.steps,
            "stopped_early": stopped_early,
            "budget": {"steps": cfg.steps, "max_minutes": cfg.max_minutes},
            "tokens": int(done * cfg.batch_size * windows.shape[1]),
            "train_seconds": round(seconds, 1),
            "compute_dtype": str(dtype).replace("torch.", ""),
            "loss_first10": round(sum(h["loss"] for h in first) / max(1, len(first)), 5),
            "loss_last10": round(sum(h["loss"] for h in last) / max(1, len(last)), 5),
            "resumed_from_step": start,
            "history": history[:: max(1, len(history) // 50)],
        }
        log.info("distill: %d steps in %.1f s, loss %.4f → %.4f", done, seconds, result.info["loss_first10"], result.info["loss_last10"])
        return result
