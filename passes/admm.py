"""ADMM pattern pruning with SR-STE (T. Wang, "ADMM Based Semi-Structured Pattern Pruning Framework
For Transformer", arXiv 2407.08334; SR-STE: Zhou et al., ICLR 2021), on the shared training loop.

Pattern pruning as a constrained problem: minimise the task loss f(W) subject to every target
weight lying in a pattern set S (2:4, 4:8, tile patterns; :class:`core.masks.PatternSet`).
ADMM splits it with a copy Z ∈ S and a scaled dual U:

- **W-step**: ``admm_interval`` optimizer steps on the task loss f(W), each followed by the
  proximal step of the penalty ρ/2 ‖W − Z + U‖²: W ← W − ρ/(1 + ρ) · (W − Z + U) (decoupled
  from Adam the way AdamW decouples weight decay: Adam rescales every gradient element, so a
  penalty inside the loss would pull a weight by ±lr whatever its distance; the proximal step pulls
  each weight the same fraction of the way to Z − U, whatever the layer's scale);
- **Z-step**: Zₗ = Π_S(Wₗ + Uₗ) — the Euclidean projection (largest magnitudes of every group);
- **U-step**: Uₗ ← Uₗ + Wₗ − Zₗ;
- ρ ← min(ρ · ``rho_growth``, ``rho_max``) after every Z/U update (U rescaled by ρ_old/ρ_new so
  the unscaled dual ρU is unchanged). The primal residual ‖W − Z‖/‖W‖ and the dual residual
  ρ‖Zₖ − Zₖ₋₁‖/‖W‖ of every layer are recorded at every update and saved in the result.

Then **hard pruning + SR-STE**: masks M from Z; training goes on with the forward on W ⊙ M,
the gradient passed straight through to the dense W (STE) and the sparse-refined decay of the
pruned weights, W ← W − ``srste_decay`` · (1 − M) ⊙ W after every optimizer step (SR-STE's
γλ(1 − M) ⊙ W term, decoupled from Adam as above); the masks are recomputed from |W| within the
pattern set every ``mask_every`` steps. The final projection W ← W ⊙ Π_S-mask(|W|) is exact.

Task loss: distillation from the dense teacher (KL on next-token distributions for causal LMs,
normalised final-hidden MSE plus ``cosine_weight`` × (1 − cosine) of mean-pooled sentence
embeddings for encoders; ``hidden_mse`` adds per-block hidden MSE) plus ``lm_weight`` × the
next-token cross-entropy on the calibration windows for causal LMs (default 0: the same loss as
the ``distill`` pass, so a comparison with one-shot + masked distillation isolates ADMM).

What trains: the target linears' weights under the constraint and, with ``train_rest`` (default),
every other parameter but the embeddings without one (norms, biases: what ``distill`` trains);
embeddings stay frozen. Memory (fp32): per trained weight, its gradient and two Adam moments, plus
Z and U of the targets (ADMM phase) — about 6× the linears — and the frozen dense teacher; about
3.5 GB for SmolLM2-135M, activations aside.

Budget: ``steps`` in all (``admm_fraction`` of them ADMM, the rest SR-STE), or fewer when
``max_minutes`` runs out (split in the same proportion). The two phases run one learning-rate
schedule: the warm-up and the first part of the cosine in the ADMM phase, the rest in the SR-STE
phase, one AdamW state (the SR-STE phase continues the ADMM phase's moments), and one order of the
training windows: the SR-STE phase draws the batches after the ADMM phase's, so
the two phases see the windows that one distillation run of the same steps sees. Both phases checkpoint through the
training loop (weights, optimizer, Z, U, ρ, the residual history, the masks) and an interrupted
build resumes from the last checkpoint.

Initialisation (``init``): ``dense`` (W⁰ = the model; Z⁰ = Π_S(W⁰)), ``magnitude`` (W⁰ = Π_S of
the model), or a one-shot result, ``sparsegpt`` or ``wanda`` (N:M only; W⁰ = Z⁰ = its result,
pruned weights free to grow back in the W-step).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.utils import parametrize

from core.adapters.base import task_output_name
from core.masks import PatternSet
from passes.base import ROLES, DataFacts, LayerChange, Pass, PassContext, PassResult, check_blocks, check_nm_divides, check_roles, register_pass
from passes.distill import distill_loss, model_outputs, trainable_parameters
from passes.training import Checkpoint, TrainConfig, train, train_config_of

log = logging.getLogger(__name__)

INITS = ("dense", "magnitude", "sparsegpt", "wanda")


@dataclass
class ADMMConfig(TrainConfig):
    """The training loop's options (``steps`` = both phases together, batch_size, lr, warmup_steps,
    weight_decay, max_minutes, checkpoint_every, compute_dtype, max_grad_norm, log_every) and:"""

    pattern: str = "2:4"
    """The pattern set: 'N:M' along the input axis (2:4, 4:8) or 'tileRxC:K' (K kept per R × C tile)."""
    targets: list[str] = field(default_factory=lambda: list(ROLES))
    blocks: list[int] | None = None
    init: str = "sparsegpt"
    """Where W starts: 'dense', 'magnitude' (projected model), 'sparsegpt' or 'wanda' (one-shot, N:M only)."""
    init_batch_size: int = 8
    """Calibration windows per runner batch of a one-shot initialisation."""
    admm_fraction: float = 0.5
    """Share of ``steps`` spent in the ADMM phase; the rest is hard-masked SR-STE training."""
    admm_interval: int = 8
    """W-step optimizer steps between Z/U updates (one ADMM iteration)."""
    rho: float = 0.02
    """Initial penalty ρ: each W-step's proximal step moves W the fraction ρ/(1 + ρ) of the way to Z − U."""
    rho_growth: float = 1.3
    rho_max: float = 1.0
    srste_decay: float = 0.02
    """SR-STE: the pruned weights shrink by this fraction after every optimizer step (γλ)."""
    mask_every: int = 8
    """SR-STE: recompute the masks from |W| within the pattern set every this many steps."""
    temperature: float = 1.0
    hidden_mse: float = 0.0
    lm_weight: float = 0.0
    """Causal LMs: weight of the next-token cross-entropy added to the distillation loss."""
    cosine_weight: float = 1.0
    """Encoders: weight of 1 − cosine between mean-pooled student and teacher embeddings."""
    train_rest: bool = True
    """Also train, unconstrained, every parameter that is neither a target nor an embedding (norms,
    biases, untargeted linears) — what the ``distill`` pass trains — so that ADMM and one-shot +
    masked distillation differ in the method, not in what may learn."""

    def __post_init__(self) -> None:
        super().__post_init__()
        PatternSet(self.pattern)
        check_roles(self.targets)
        if self.blocks is not None and any(b < 0 for b in self.blocks):
            raise ValueError(f"blocks {self.blocks} has a negative index")
        if self.init not in INITS:
            raise ValueError(f"init '{self.init}' is not one of {', '.join(INITS)}")
        if self.init in ("sparsegpt", "wanda") and PatternSet(self.pattern).nm is None:
            raise ValueError(f"init '{self.init}' prunes N:M only; pattern '{self.pattern}' needs init 'dense' or 'magnitude'")
        if not 1 <= self.init_batch_size <= 1024:
            raise ValueError(f"init_batch_size {self.init_batch_size} is outside [1, 1024]")
        if not 0.0 < self.admm_fraction < 1.0:
            raise ValueError(f"admm_fraction {self.admm_fraction} is outside (0, 1)")
        if self.steps < 2:
            raise ValueError(f"steps {self.steps} must be at least 2 (an ADMM phase and an SR-STE phase)")
        if self.admm_interval < 1 or self.mask_every < 1:
            raise ValueError("admm_interval and mask_every must be at least 1")
        if not 0.0 < self.rho <= self.rho_max:
            raise ValueError(f"rho {self.rho} must be positive and at most rho_max {self.rho_max}")
        if self.rho_max > 1e6:
            raise ValueError(f"rho_max {self.rho_max} is above 1e6")
        if self.rho_growth < 1.0:
            raise ValueError(f"rho_growth {self.rho_growth} must be ≥ 1")
        if not 0.0 <= self.srste_decay < 1.0:
            raise ValueError(f"srste_decay {self.srste_decay} is outside [0, 1)")
        for name in ("hidden_mse", "lm_weight", "cosine_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} {getattr(self, name)} must be ≥ 0")
        if self.temperature <= 0:
            raise ValueError(f"temperature {self.temperature} must be positive")

    @property
    def admm_steps(self) -> int:
        return max(1, min(self.steps - 1, round(self.steps * self.admm_fraction)))


class _Target:
    """One constrained weight: the parameter, and how to see it as (out, in)."""

    def __init__(self, name: str, module: torch.nn.Module, transposed: bool):
        self.name = name
        self.module = module
        self.transposed = transposed

    @property
    def param(self) -> torch.nn.Parameter:
        if parametrize.is_parametrized(self.module, "weight"):
            return self.module.parametrizations.weight.original
        return self.module.weight

    def oi(self, t: torch.Tensor) -> torch.Tensor:
        return t.t() if self.transposed else t


def project(pattern: PatternSet, tgt: _Target, t: torch.Tensor) -> torch.Tensor:
    """Π_S of a tensor in the parameter's layout."""
    return tgt.oi(pattern.project(tgt.oi(t)))


def pattern_mask(pattern: PatternSet, tgt: _Target, t: torch.Tensor) -> torch.Tensor:
    return tgt.oi(pattern.mask(tgt.oi(t).abs()))


class ADMMHook:
    """The Z- and U-steps and the ρ schedule (a training-loop hook), and the W-step's penalty."""

    def __init__(self, targets: list[_Target], pattern: PatternSet, cfg: ADMMConfig, norms: dict[str, float]):
        self.targets = targets
        self.pattern = pattern
        self.cfg = cfg
        self.norms = norms
        with torch.no_grad():
            self.z = {t.name: project(pattern, t, t.param.detach()) for t in targets}
            self.u = {t.name: torch.zeros_like(t.param) for t in targets}
        self.rho = torch.tensor(float(cfg.rho), dtype=torch.float64)
        self.residuals = torch.zeros(0, 2 + 2 * len(targets), dtype=torch.float64)
        """One row per ADMM iteration: step, ρ, then every layer's primal and dual residual."""

    def penalty(self) -> float:
        """ρ/2 Σₗ ‖Wₗ − Zₗ + Uₗ‖² / ‖Wₗ⁰‖² (logged; the W-step applies it as a proximal step)."""
        with torch.no_grad():
            total = sum(float((t.param - self.z[t.name] + self.u[t.name]).pow(2).sum()) / self.norms[t.name] for t in self.targets)
        return 0.5 * float(self.rho) * total

    def after_step(self, step: int) -> None:
        rho = float(self.rho)
        with torch.no_grad():  # the penalty's proximal step
            for t in self.targets:
                t.param.sub_(rho / (1 + rho) * (t.param - self.z[t.name] + self.u[t.name]))
        if (step + 1) % self.cfg.admm_interval:
            return
        primal, dual = [], []
        with torch.no_grad():
            for t in self.targets:
                w = t.param.detach()
                z_new = project(self.pattern, t, w + self.u[t.name])
                wn = float(w.norm()) or 1.0
                dual.append(rho * float((z_new - self.z[t.name]).norm()) / wn)
                self.z[t.name] = z_new
                self.u[t.name] += w - z_new
                primal.append(float((w - z_new).norm()) / wn)
            new_rho = min(rho * self.cfg.rho_growth, self.cfg.rho_max)
            for u in self.u.values():
                u.mul_(rho / new_rho)
        row = torch.tensor([[step + 1, rho, *primal, *dual]], dtype=torch.float64)
        self.residuals = torch.cat([self.residuals, row])
        self.rho = torch.tensor(new_rho, dtype=torch.float64)
        log.debug("admm step %d: ρ %.4g, primal residual mean %.4g max %.4g", step + 1, rho, sum(primal) / len(primal), max(primal))

    def masks(self) -> dict[str, torch.Tensor]:
        return {n: z != 0 for n, z in self.z.items()}

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {f"z.{n}": z for n, z in self.z.items()}
        out.update({f"u.{n}": u for n, u in self.u.items()})
        return {**out, "rho": self.rho.reshape(1), "residuals": self.residuals}

    def load_state_dict(self, d: dict[str, torch.Tensor]) -> None:
        for t in self.targets:
            self.z[t.name] = d[f"z.{t.name}"].to(self.z[t.name].dtype)
            self.u[t.name] = d[f"u.{t.name}"].to(self.u[t.name].dtype)
        self.rho = d["rho"].reshape(()).double()
        self.residuals = d["residuals"].double()

    def summary(self) -> dict[str, Any]:
        r = self.residuals
        k = len(self.targets)
        names = [t.name for t in self.targets]
        primal, dual = r[:, 2 : 2 + k], r[:, 2 + k :]
        return {
            "iterations": int(r.shape[0]),
            "step": [int(s) for s in r[:, 0].tolist()],
            "rho": [float(f"{v:.6g}") for v in r[:, 1].tolist()],
            "primal_mean": [round(v, 6) for v in primal.mean(1).tolist()] if k else [],
            "primal_max": [round(v, 6) for v in primal.max(1).values.tolist()] if k and len(r) else [],
            "dual_mean": [round(v, 6) for v in dual.mean(1).tolist()] if k else [],
            "primal_by_layer": {n: [round(v, 6) for v in primal[:, i].tolist()] for i, n in enumerate(names)},
            "dual_by_layer": {n: [round(v, 6) for v in dual[:, i].tolist()] for i, n in enumerate(names)},
        }


class _STEMask(torch.nn.Module):
    """Parametrization: the forward sees W ⊙ M, the gradient reaches all of W (straight through)."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w - (w * ~self.mask).detach()


class SRSTEHook:
    """Hard-masked training: the masks live in the parametrizations; recomputed every ``mask_every`` steps."""

    def __init__(self, targets: list[_Target], pattern: PatternSet, cfg: ADMMConfig, norms: dict[str, float], masks: dict[str, torch.Tensor]):
        self.targets = targets
        self.pattern = pattern
        self.cfg = cfg
        self.norms = norms
        self.flips: list[float] = []
        for t in targets:
            parametrize.register_parametrization(t.module, "weight", _STEMask(masks[t.name].clone()))

    def _mask(self, t: _Target) -> torch.Tensor:
        return t.module.parametrizations.weight[0].mask

    def pruned_share(self) -> float:
        """Σ‖(1 − M) ⊙ W‖² / Σ‖W‖² (logged)."""
        with torch.no_grad():
            return sum(float((t.param * ~self._mask(t)).pow(2).sum()) for t in self.targets) / max(sum(float(t.param.pow(2).sum()) for t in self.targets), 1e-30)

    def after_step(self, step: int) -> None:
        with torch.no_grad():  # SR-STE's decay of the pruned weights
            for t in self.targets:
                t.param.sub_(self.cfg.srste_decay * t.param * ~self._mask(t))
        if (step + 1) % self.cfg.mask_every:
            return
        changed = total = 0
        with torch.no_grad():
            for t in self.targets:
                new = pattern_mask(self.pattern, t, t.param)
                old = self._mask(t)
                changed += int((new != old).sum())
                total += new.numel()
                old.copy_(new)
        self.flips.append(changed / max(total, 1))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"mask.{t.name}": self._mask(t).to(torch.uint8) for t in self.targets}

    def load_state_dict(self, d: dict[str, torch.Tensor]) -> None:
        for t in self.targets:
            self._mask(t).copy_(d[f"mask.{t.name}"].bool())

    def finish(self) -> None:
        """Remove the parametrizations and project exactly: W ← W ⊙ mask(|W|) within the pattern set."""
        with torch.no_grad():
            for t in self.targets:
                parametrize.remove_parametrizations(t.module, "weight", leave_parametrized=False)
                w = t.module.weight
                w.mul_(pattern_mask(self.pattern, t, w))


def task_loss(cfg: ADMMConfig, causal: bool, student: torch.nn.Module, teacher: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    hidden = cfg.hidden_mse > 0
    with torch.no_grad():
        t_out = model_outputs(teacher, ids, causal, hidden)
    s_out = model_outputs(student, ids, causal, hidden)
    loss, parts = distill_loss(s_out, t_out, causal, cfg.temperature, cfg.hidden_mse)
    if causal and cfg.lm_weight > 0:
        ce = F.cross_entropy(s_out.logits[:, :-1].float().reshape(-1, s_out.logits.shape[-1]), ids[:, 1:].reshape(-1))
        parts["lm"] = float(ce.detach())
        loss = loss + cfg.lm_weight * ce
    if not causal and cfg.cosine_weight > 0:
        name = task_output_name("encoder")
        cos = F.cosine_similarity(getattr(s_out, name).float().mean(1), getattr(t_out, name).float().mean(1), dim=-1).mean()
        parts["cosine"] = float(cos.detach())
        loss = loss + cfg.cosine_weight * (1 - cos)
    return loss, parts


def _initialise(cfg: ADMMConfig, model: torch.nn.Module, ctx: PassContext, pattern: PatternSet, targets: list[_Target]) -> dict[str, Any]:
    t0 = time.perf_counter()
    if cfg.init == "magnitude":
        with torch.no_grad():
            for t in targets:
                t.param.copy_(project(pattern, t, t.param))
    elif cfg.init in ("sparsegpt", "wanda"):
        from passes.base import registry

        cls = registry()[cfg.init]
        inner = cls(cls.config_class(pattern=cfg.pattern, targets=list(cfg.targets), blocks=cfg.blocks, batch_size=cfg.init_batch_size))
        inner.run(model, ctx)
    return {"init": cfg.init, "seconds": round(time.perf_counter() - t0, 2)}


@register_pass
class ADMMPass(Pass):
    name = "admm"
    config_class = ADMMConfig
    uses_calibration = True
    trains = True
    state_copies = 2
    report_title = "ADMM + SR-STE"

    @classmethod
    def report_section(cls, variant: dict[str, Any], result: dict[str, Any]) -> list[Any]:
        """Budget, the residual at the hard projection, mask churn, and the primal residual per iteration."""
        from core.document import Figure, Paragraph, new_figure, png_of, safe_name

        info = result.get("info") or {}
        if "admm" not in info:
            return []
        a, s, b = info["admm"], info["srste"], info["budget"]
        res = a["residuals"]
        first = f"{res['primal_mean'][0]:.4f} → " if res["primal_mean"] else ""
        flips = s.get("mask_flip_share") or []
        churn = f"; SR-STE mask changes per refresh {min(flips):.4f}–{max(flips):.4f} of the weights" if flips else ""
        early = " (stopped early: time budget)" if a["stopped_early"] or s["stopped_early"] else ""
        blocks: list[Any] = [Paragraph(
            f"**{variant['name']}**: ADMM + SR-STE ({info['pattern']}, init {info['initialisation']['init']}): "
            f"{a['steps']} ADMM steps ({res['iterations']} Z/U updates, ρ {res['rho'][0] if res['rho'] else '—'} → {res['rho'][-1] if res['rho'] else '—'}) + "
            f"{s['steps']} SR-STE steps, {b['tokens']} tokens, {a['train_seconds'] + s['train_seconds']:.0f} s{early}; primal residual "
            f"‖W − Z‖/‖W‖ (mean over layers) {first}{a['final_primal_mean']:.4f} at the hard projection{churn}."
        )]
        if res["primal_mean"]:
            fig, ax = new_figure()
            it = list(range(1, len(res["primal_mean"]) + 1))
            ax.plot(it, res["primal_mean"], marker=".", lw=1, label="primal, mean over layers")
            ax.plot(it, res["primal_max"], marker=".", lw=1, ls=":", label="primal, max over layers")
            if any(v > 0 for v in res["dual_mean"]):
                ax.plot(it, res["dual_mean"], lw=1, ls="--", label="dual ρ‖ΔZ‖/‖W‖, mean")
            ax.set_yscale("log")
            ax.set_xlabel("ADMM iteration (Z/U update)")
            ax.set_ylabel("‖W − Z‖ / ‖W‖")
            ax.set_title(f"{variant['name']}: ADMM residuals ({info['pattern']})", fontsize=9)
            ax.grid(True, alpha=0.3, which="both")
            ax.legend(fontsize=7)
            blocks.append(Figure(f"admm_residual_{safe_name(variant['name'])}.png", f"ADMM primal residual: {variant['name']}", png_of(fig)))
        return blocks

    @classmethod
    def check(cls, config: Any, model: Any, data: DataFacts) -> None:
        check_blocks("blocks", config.blocks, model)
        check_nm_divides("pattern", PatternSet(config.pattern).nm, config.targets, model)

    def run(self, model: torch.nn.Module, ctx: PassContext) -> PassResult:
        cfg = self.config
        if ctx.calibration is None or ctx.teacher is None:
            raise ValueError("pass 'admm' needs calibration data and the dense teacher, and the context lacks them")
        t0 = time.perf_counter()
        pattern = PatternSet(cfg.pattern)
        refs = ctx.adapter.linears(model, roles=cfg.targets, blocks=cfg.blocks)
        if not refs:
            raise ValueError(f"pass 'admm': no linear matches targets {cfg.targets} and blocks {cfg.blocks}")
        for ref in refs:
            pattern.check_shape(tuple(ref.weight_out_in().shape), ref.name)
        causal = ctx.adapter.task == "causal-lm"
        windows = ctx.calibration()
        teacher = ctx.teacher()
        if teacher is model:
            raise ValueError("pass 'admm': the model is the dense teacher itself; the pass needs its own copy")
        targets = [_Target(r.name, r.module, r.transposed) for r in refs]
        info: dict[str, Any] = {"pattern": cfg.pattern, "initialisation": _initialise(cfg, model, ctx, pattern, targets)}
        norms = {t.name: float(t.param.detach().pow(2).sum()) or 1.0 for t in targets}
        target_ids = {id(t.param) for t in targets}
        rest = {n: p for n, p in trainable_parameters(model) if id(p) not in target_ids} if cfg.train_rest else {}
        params = {**{t.name: t.param for t in targets}, **rest}
        base = train_config_of(cfg)
        admm_steps = cfg.admm_steps
        split = admm_steps / cfg.steps  # the two phases share one warm-up + cosine schedule, split here
        minutes = (lambda share: None if cfg.max_minutes is None else cfg.max_minutes * share)
        tokens_per_step = cfg.batch_size * windows.shape[1]
        extra = [cfg.pattern, cfg.init, cfg.train_rest, cfg.rho, cfg.rho_growth, cfg.rho_max, cfg.admm_interval, cfg.temperature, cfg.hidden_mse, cfg.lm_weight, cfg.cosine_weight]

        # --- phase 1: ADMM ---
        admm = ADMMHook(targets, pattern, cfg, norms)

        def admm_loss(ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
            loss, parts = task_loss(cfg, causal, model, teacher, ids)
            parts["penalty"] = admm.penalty()
            return loss, parts

        ckpt = (lambda name: Checkpoint(ctx.work_dir, name) if ctx.work_dir is not None else None)
        tr1 = train(
            model, params, admm_loss, windows, TrainConfig(**{**vars(base), "steps": admm_steps, "max_minutes": minutes(cfg.admm_fraction)}),
            seed=ctx.seed, checkpoint=ckpt("admm-checkpoint"), fingerprint_extra=extra, hooks=[admm], desc="admm", show_progress=ctx.progress,
            schedule_span=(0.0, split),
        )
        info["admm"] = {**tr1.summary(tokens_per_step), "residuals": admm.summary()}
        with torch.no_grad():  # the hard projection's loss: how far W still is from Z
            info["admm"]["final_primal_mean"] = round(sum(float((t.param - admm.z[t.name]).norm() / (t.param.norm() + 1e-12)) for t in targets) / len(targets), 6)

        # --- phase 2: hard masks from Z, SR-STE ---
        srste = SRSTEHook(targets, pattern, cfg, norms, admm.masks())
        admm.z, admm.u = {}, {}  # free Z and U: the masks are all phase 2 needs
        params = {**{t.name: t.param for t in targets}, **rest}

        def srste_loss(ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
            loss, parts = task_loss(cfg, causal, model, teacher, ids)
            parts["pruned_share"] = srste.pruned_share()
            return loss, parts

        try:
            tr2 = train(
                model, params, srste_loss, windows,
                TrainConfig(**{**vars(base), "steps": cfg.steps - admm_steps, "max_minutes": minutes(1 - cfg.admm_fraction)}),
                seed=ctx.seed, data_offset=tr1.steps, optimizer_state=tr1.optimizer_state, checkpoint=ckpt("srste-checkpoint"), fingerprint_extra=[*extra, cfg.srste_decay, cfg.mask_every, tr1.steps], hooks=[srste],
                desc="sr-ste", show_progress=ctx.progress, schedule_span=(split, 1.0),
            )
        finally:
            srste.finish()
        info["srste"] = {**tr2.summary(tokens_per_step), "mask_flip_share": [round(f, 6) for f in srste.flips]}
        result = PassResult(self.name, seconds=time.perf_counter() - t0, info=info)
        for ref in refs:
            w = ref.weight_out_in()
            if not pattern.contains(w):
                raise RuntimeError(f"pass 'admm': {ref.name} is not in pattern set '{cfg.pattern}' after the final projection")
            result.layers.append(LayerChange.of(ref))
        info["budget"] = {"steps": cfg.steps, "admm_steps": admm_steps, "srste_steps": cfg.steps - admm_steps, "max_minutes": cfg.max_minutes, "tokens": (tr1.steps + tr2.steps) * tokens_per_step}
        log.info(
            "admm: %d ADMM + %d SR-STE steps in %.1f s; primal residual %.4f at the hard projection; sparsity %.3f",
            tr1.steps, tr2.steps, result.seconds, info["admm"]["final_primal_mean"], sum(c.sparsity for c in result.layers) / len(result.layers),
        )
        return result
