"""The training loop that passes share (recovery distillation today; SDS, ADMM and SR-STE next).

A pass supplies the parameters to train, a loss on a batch of token windows and optional
hooks; :func:`train` supplies everything else:

- budget: ``steps`` optimizer steps of ``batch_size`` windows, or fewer when ``max_minutes``
  runs out (the result says which);
- AdamW with linear warm-up and cosine decay (annealed by the time spent too when ``max_minutes``
  binds first), gradient clipping;
- autocast to bfloat16 where the CPU has fast bf16 (``compute_dtype: auto``), fp32 otherwise;
- atomic checkpoints every ``checkpoint_every`` steps into the pass's work directory
  (safetensors for tensors, JSON for the rest: nothing is unpickled), and resume from the
  last one when the same settings run again; a checkpoint written for other settings is
  ignored, with a warning;
- a progress bar on a terminal and a log line every ``log_every`` steps.

Hooks (any object; each method is optional): ``before_step(step)``, ``after_step(step)``
(after the optimizer step: mask projection, ADMM dual updates, SR-STE decay...),
``state_dict() -> dict[str, Tensor]`` and ``load_state_dict(d)`` (hook state that must survive
an interruption, e.g. ADMM's Z and U).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from calibrate.runner import resolve_compute_dtype
from core.artifacts import atomic_write_json, stable_hash
from core.progress import progress

log = logging.getLogger(__name__)

LossFn = Callable[[torch.Tensor], "tuple[torch.Tensor, dict[str, float]]"]
"""``loss_fn(ids) -> (loss, parts)``: ids is a (batch, length) tensor of token ids; ``parts`` are
named floats logged in the history."""


@dataclass
class TrainConfig:
    steps: int = 200
    batch_size: int = 1
    """Windows per optimizer step."""
    lr: float = 1e-4
    warmup_steps: int = 10
    weight_decay: float = 0.0
    max_minutes: float | None = None
    """Stop early (and say so) once this much training time has been spent."""
    checkpoint_every: int = 25
    compute_dtype: str = "auto"
    """Autocast precision of the forward/backward passes ('auto' = bfloat16 where the CPU has fast bf16)."""
    max_grad_norm: float = 1.0
    log_every: int = 10

    def __post_init__(self) -> None:
        check_train_options(self)


def check_train_options(cfg: Any) -> None:
    """Range checks of the training fields (raises ValueError); pass configs inherit TrainConfig."""
    if cfg.steps < 1:
        raise ValueError(f"steps {cfg.steps} must be at least 1")
    if not 1 <= cfg.batch_size <= 256:
        raise ValueError(f"batch_size {cfg.batch_size} is outside [1, 256]")
    if not 0 < cfg.lr < 1:
        raise ValueError(f"lr {cfg.lr} is outside (0, 1)")
    if cfg.warmup_steps < 0 or cfg.checkpoint_every < 1:
        raise ValueError("warmup_steps must be ≥ 0 and checkpoint_every ≥ 1")
    if cfg.weight_decay < 0:
        raise ValueError(f"weight_decay {cfg.weight_decay} must be ≥ 0")
    if cfg.max_minutes is not None and cfg.max_minutes <= 0:
        raise ValueError(f"max_minutes {cfg.max_minutes} must be positive")
    if cfg.compute_dtype not in ("auto", "float32", "bfloat16"):
        raise ValueError(f"compute_dtype '{cfg.compute_dtype}' is not one of auto, float32, bfloat16")
    if getattr(cfg, "log_every", 1) < 1:
        raise ValueError(f"log_every {cfg.log_every} must be at least 1")
    if cfg.max_grad_norm <= 0:
        raise ValueError(f"max_grad_norm {cfg.max_grad_norm} must be positive")


def train_config_of(cfg: Any) -> TrainConfig:
    """The :class:`TrainConfig` fields of a pass config that carries them."""
    names = TrainConfig.__dataclass_fields__
    return TrainConfig(**{k: v for k, v in asdict(cfg).items() if k in names})


@dataclass
class TrainResult:
    steps: int
    steps_planned: int
    stopped_early: bool
    seconds: float
    resumed_from_step: int
    compute_dtype: str
    history: list[dict[str, float]] = field(default_factory=list)
    optimizer_state: dict[str, Any] | None = field(default=None, repr=False)
    """AdamW's state at the end (for a run that continues this one: ``train(optimizer_state=...)``)."""

    def summary(self, tokens_per_step: int) -> dict[str, Any]:
        first, last = self.history[:10], self.history[-10:]
        return {
            "steps": self.steps,
            "steps_planned": self.steps_planned,
            "stopped_early": self.stopped_early,
            "tokens": int(self.steps * tokens_per_step),
            "train_seconds": round(self.seconds, 1),
            "compute_dtype": self.compute_dtype,
            "loss_first10": round(sum(h["loss"] for h in first) / max(1, len(first)), 5),
            "loss_last10": round(sum(h["loss"] for h in last) / max(1, len(last)), 5),
            "resumed_from_step": self.resumed_from_step,
            "history": self.history[:: max(1, len(self.history) // 50)],
        }


def lr_factor(step: int, warmup_steps: int, steps: int, *, time_share: float = 0.0, span: tuple[float, float] = (0.0, 1.0)) -> float:
    """Linear warm-up to 1 over ``warmup_steps``, then cosine decay to 0 at the end of the budget.

    Progress through the budget is the larger of the step share and ``time_share`` (the share of
    ``max_minutes`` spent), so a run that a wall-time cap stops early has still annealed its rate
    instead of ending at a rate the cap chose by accident. ``span`` is the stretch [a, b] of one
    longer schedule that this run covers: a run that continues another's schedule (ADMM's SR-STE
    phase after its ADMM phase) passes (a, b) with a > 0 and has no warm-up of its own."""
    lo, hi = span
    warm = warmup_steps if lo == 0.0 else 0
    if step < warm:
        return (step + 1) / warm
    local = max((step - warm) / max(1, steps - warm), time_share)
    return 0.5 * (1 + math.cos(math.pi * (lo + (hi - lo) * min(1.0, local))))


def autocast_for(compute_dtype: str) -> tuple[torch.dtype, dict[str, Any]]:
    dtype = resolve_compute_dtype(compute_dtype)
    return dtype, dict(device_type="cpu", dtype=dtype, enabled=dtype != torch.float32)


# --- checkpoints: safetensors + JSON, never pickle ------------------------------------------------


class Checkpoint:
    """``<dir>/<name>.json`` (fingerprint, step, history, optimizer groups, the tensor file's SHA-256)
    pointing at ``<dir>/<name>-<step>.safetensors``. The tensor file is written first, the JSON
    last (atomically), then older tensor files are removed, so the JSON always names a complete
    file; a file that does not hash to the recorded digest is ignored."""

    def __init__(self, directory: Path, name: str):
        self.dir = Path(directory)
        self.name = name
        self.meta = self.dir / f"{name}.json"

    def save(self, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"{self.name}-{meta['step']}.safetensors"
        tmp = path.with_name(path.name + ".tmp")
        save_file({k: t.detach().contiguous().cpu() for k, t in tensors.items()}, str(tmp))
        tmp.replace(path)
        atomic_write_json(self.meta, {**meta, "tensors": path.name, "sha256": _sha256(path)})
        for old in self.dir.glob(f"{self.name}-*.safetensors"):
            if old != path:
                old.unlink(missing_ok=True)

    def load(self, fingerprint: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
        """(meta, tensors) of an intact checkpoint written with ``fingerprint``; else None (and why, logged)."""
        from safetensors.torch import load_file

        if not self.meta.is_file():
            return None
        try:
            meta = json.loads(self.meta.read_text(encoding="utf-8"))
            path = self.dir / meta["tensors"]
            if meta.get("fingerprint") != fingerprint:
                log.warning("ignoring checkpoint %s: written for other settings", self.meta)
                return None
            if not path.is_file() or _sha256(path) != meta["sha256"]:
                log.warning("ignoring checkpoint %s: %s is missing or does not match its SHA-256", self.meta, path.name)
                return None
        except (ValueError, KeyError, OSError) as exc:
            log.warning("ignoring unreadable checkpoint %s: %s", self.meta, exc)
            return None
        try:
            return meta, load_file(str(path))
        except Exception as exc:  # safetensors raises its own error type for a file that is not safetensors
            log.warning("ignoring checkpoint %s: %s is not a safetensors file (%s)", self.meta, path.name, exc)
            return None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"opt.{idx}.{k}"] = v
            else:
                scalars[f"{idx}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, t in tensors.items():
        if name.startswith("opt."):
            _, idx, k = name.split(".", 2)
            state.setdefault(int(idx), {})[k] = t
    for name, v in meta["scalars"].items():
        idx, k = name.split(".", 1)
        state.setdefault(int(idx), {})[k] = v
    groups = meta["param_groups"]
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    opt.load_state_dict({"state": state, "param_groups": groups})


# --- the loop ---------------------------------------------------------------------------------------


def train(
    model: torch.nn.Module,
    params: dict[str, torch.nn.Parameter],
    loss_fn: LossFn,
    windows: torch.Tensor,
    cfg: TrainConfig,
    *,
    seed: int = 0,
    checkpoint: Checkpoint | None = None,
    fingerprint_extra: Any = None,
    hooks: Sequence[Any] = (),
    desc: str = "train",
    show_progress: bool = True,
    schedule_span: tuple[float, float] = (0.0, 1.0),
    data_offset: int = 0,
    optimizer_state: dict[str, Any] | None = None,
) -> TrainResult:
    """Train ``params`` of ``model`` on ``loss_fn`` over ``windows`` (N, L), batches drawn in a seeded
    order; every other parameter is frozen for the duration. Returns what happened; the model is
    left in eval mode with no parameter requiring grad. ``schedule_span``: see :func:`lr_factor`;
    ``data_offset``: batches of the seeded order already drawn by an earlier run that this one
    continues (ADMM's SR-STE phase), so the two together see the windows one run would;
    ``optimizer_state``: that run's final AdamW state (``TrainResult.optimizer_state``; the same
    parameters in the same order), loaded unless this run resumes from its own checkpoint.
    Under ``max_minutes`` the rate depends on the time spent, so such a run is not bit-reproducible."""
    if data_offset < 0:
        raise ValueError(f"data_offset {data_offset} must be ≥ 0")
    if not 0.0 <= schedule_span[0] < schedule_span[1] <= 1.0:
        raise ValueError(f"schedule_span {schedule_span} is not a stretch [a, b] with 0 ≤ a < b ≤ 1")
    dtype, autocast = autocast_for(cfg.compute_dtype)
    fingerprint = stable_hash(desc, asdict(cfg), [(n, list(p.shape)) for n, p in params.items()], list(windows.shape), seed, fingerprint_extra, list(schedule_span), data_offset)
    opt = torch.optim.AdamW(list(params.values()), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    order = torch.randperm(windows.shape[0], generator=torch.Generator().manual_seed(seed))
    start, spent, history = 0, 0.0, []
    loaded = checkpoint.load(fingerprint) if checkpoint is not None else None
    if loaded is not None:
        meta, tensors = loaded
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(tensors[f"param.{n}"])
        _load_optimizer(opt, tensors, meta["optimizer"])
        for i, h in enumerate(hooks):
            if hasattr(h, "load_state_dict"):
                h.load_state_dict({k.split(".", 2)[2]: t for k, t in tensors.items() if k.startswith(f"hook.{i}.")})
        start, spent, history = meta["step"], meta["seconds"], meta["history"]
        optimizer_state = None
        log.info("%s: resuming from the checkpoint at step %d (%s)", desc, start, checkpoint.meta)
    if optimizer_state is not None:
        if len(optimizer_state["param_groups"][0]["params"]) != len(params):
            raise ValueError(f"optimizer_state holds {len(optimizer_state['param_groups'][0]['params'])} parameters, this run trains {len(params)}")
        opt.load_state_dict(optimizer_state)
    trainable = {id(p) for p in params.values()}
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)
    model.train()
    for m in model.modules():  # dropout off: the losses compare deterministic outputs
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    done, stopped_early = start, False
    t_start = time.perf_counter() - spent
    steps = range(start, cfg.steps)
    bar = progress(steps, desc=desc, initial=start, total=cfg.steps) if show_progress else steps
    try:
        for step in bar:
            if cfg.max_minutes is not None and time.perf_counter() - t_start > cfg.max_minutes * 60:
                stopped_early = True
                break
            for h in hooks:
                if hasattr(h, "before_step"):
                    h.before_step(step)
            ids = windows[[int(order[((data_offset + step) * cfg.batch_size + i) % len(order)]) for i in range(cfg.batch_size)]]
            time_share = 0.0 if cfg.max_minutes is None else (time.perf_counter() - t_start) / (cfg.max_minutes * 60)
            for group in opt.param_groups:
                group["lr"] = cfg.lr * lr_factor(step, cfg.warmup_steps, cfg.steps, time_share=time_share, span=schedule_span)
            with torch.autocast(**autocast):
                loss, parts = loss_fn(ids)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.max_grad_norm)
            opt.step()
            for h in hooks:
                if hasattr(h, "after_step"):
                    h.after_step(step)
            done = step + 1
            value = float(loss.detach())
            history.append({"step": done, "loss": round(value, 5), **{k: round(v, 5) for k, v in parts.items()}})
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{value:.4f}")
            if done % cfg.log_every == 0:
                log.info("%s step %d/%d: loss %.4f", desc, done, cfg.steps, value)
            if checkpoint is not None and (done % cfg.checkpoint_every == 0 or done == cfg.steps):
                tensors = {f"param.{n}": p for n, p in params.items()}
                opt_tensors, opt_meta = _optimizer_tensors(opt)
                tensors.update(opt_tensors)
                for i, h in enumerate(hooks):
                    if hasattr(h, "state_dict"):
                        tensors.update({f"hook.{i}.{k}": t for k, t in h.state_dict().items()})
                meta = {"fingerprint": fingerprint, "step": done, "seconds": time.perf_counter() - t_start, "history": history, "optimizer": opt_meta}
                checkpoint.save(meta, tensors)
    finally:
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()
    return TrainResult(done, cfg.steps, stopped_early, time.perf_counter() - t_start, start, str(dtype).replace("torch.", ""), history, opt.state_dict())
