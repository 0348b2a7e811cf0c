"""SparseGPT (Frantar & Alistarh 2023): OBS-style pruning with error compensation.

For a linear with weight W (rows = outputs, columns = inputs) and input Hessian
H = (2/n) XᵀX:

1. dead inputs (H_jj = 0) get H_jj = 1 and W[:, j] = 0;
2. damping λ = ``damp`` × mean(diag H) is added to the diagonal; if the Cholesky
   factorisation fails, λ is multiplied by 10 and retried (logged), up to
   ``max_damp_steps`` times; the λ used is recorded;
3. U = the upper Cholesky factor of H⁻¹;
4. columns are processed in blocks of ``blocksize``: an unstructured mask is
   chosen per block from w²/U_jj² (the OBS saliency) over the whole block, an
   N:M mask every M columns from the same saliency of the already-updated
   weights; each pruned column's error (w − q)/U_jj is propagated to the
   remaining columns of the block, and the block's accumulated errors to every
   later column (one GEMM).

Every step is vectorised over rows; the only Python loop is over the columns
of a block, which the sequential OBS update requires.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch

from calibrate.stats import Collector, HessianCollector
from passes.allocation import ALLOCATION_TITLE, allocation_report
from passes.base import PassContext, PassResult, register_pass
from passes.oneshot import OneShotConfig, OneShotPass, PruneFn, run_oneshot
from core.adapters.base import LinearRef

log = logging.getLogger(__name__)

SOLVE_DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class SparseGPTConfig(OneShotConfig):
    blocksize: int = 128
    damp: float = 0.01
    """Relative damping: fraction of the mean Hessian diagonal added to it."""
    max_damp_steps: int = 6
    solve_dtype: str = "float32"
    """Precision of the Hessian factorisation and the column updates: 'float32' (the reference
    implementations') or 'float64' (the weights are stored in float32 either way; on SmolLM2 2:4 it
    was no better, benchmarks/results/sparsegpt_peer_hypotheses.json)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.solve_dtype not in SOLVE_DTYPES:
            raise ValueError(f"solve_dtype '{self.solve_dtype}' is not one of {', '.join(SOLVE_DTYPES)}")
        if not 1 <= self.blocksize <= 65536:
            raise ValueError(f"blocksize {self.blocksize} is outside [1, 65536]")
        if not 0.0 < self.damp < 10.0:
            raise ValueError(f"damp {self.damp} is outside (0, 10)")
        if not 0 <= self.max_damp_steps <= 20:
            raise ValueError(f"max_damp_steps {self.max_damp_steps} is outside [0, 20]")


@dataclass
class SolveInfo:
    damping: float
    """Absolute damping λ added to diag(H)."""
    damp_relative: float
    damp_steps: int
    dead_inputs: int

    def to_dict(self) -> dict:
        return {"damping": self.damping, "damp_relative": self.damp_relative, "damp_steps": self.damp_steps, "dead_inputs": self.dead_inputs}


def inverse_cholesky_upper(H: torch.Tensor, damp: float, max_steps: int, name: str = "layer") -> tuple[torch.Tensor, float, int, float]:
    """Upper Cholesky factor of (H + λI)⁻¹, raising λ ×10 on failure. Returns (U, λ, steps, relative damp)."""
    mean_diag = float(torch.diagonal(H).mean())
    rel = damp
    eye = torch.eye(H.shape[0], dtype=H.dtype)
    for step in range(max_steps + 1):
        lam = rel * mean_diag
        L, info = torch.linalg.cholesky_ex(H + lam * eye)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info2 = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info2) == 0:
                return U, lam, step, rel
        log.warning("%s: Cholesky failed with damping %.3g × mean diag; raising it ×10", name, rel)
        rel *= 10
    raise RuntimeError(f"{name}: Hessian is not positive definite even with damping {rel / 10:.3g} × mean diag")


def _revive_dead_inputs(H: torch.Tensor, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """A copy of H in ``dtype`` with H_jj = 1 where an input was never active, and that mask."""
    H = H.to(dtype).clone()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    return H, dead


def obs_saliency(
    weights: list[torch.Tensor], H: torch.Tensor, damp: float = 0.01, max_damp_steps: int = 6, name: str = "layer"
) -> list[torch.Tensor]:
    """The OBS saliency w²/[H⁻¹]_jj of every weight of the matrices sharing H, from the solver's own
    factorisation (dead inputs, damping with retries): [H⁻¹]_jj is the squared norm of column j of
    its upper Cholesky factor U (H⁻¹ = UᵀU). Dead inputs cost nothing. One factorisation per group."""
    H, dead = _revive_dead_inputs(H)
    U, *_ = inverse_cholesky_upper(H, damp, max_damp_steps, name)
    hinv_diag = U.double().pow(2).sum(0)
    out = []
    for w in weights:
        sal = w.double().pow(2) / hinv_diag[None, :]
        sal[:, dead] = 0.0
        out.append(sal)
    return out


def sparsegpt_prune(
    weight: torch.Tensor,
    H: torch.Tensor,
    sparsity: float | None = None,
    nm: tuple[int, int] | None = None,
    blocksize: int = 128,
    damp: float = 0.01,
    max_damp_steps: int = 6,
    name: str = "layer",
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, SolveInfo]:
    """Return the pruned (and error-compensated) copy of ``weight`` (out, in) and solver facts."""
    (out,), info = sparsegpt_prune_group([weight], H, sparsity, nm, blocksize, damp, max_damp_steps, name, dtype)
    return out, info


def sparsegpt_prune_group(
    weights: list[torch.Tensor],
    H: torch.Tensor,
    sparsity: float | list[float] | None = None,
    nm: tuple[int, int] | None = None,
    blocksize: int = 128,
    damp: float = 0.01,
    max_damp_steps: int = 6,
    name: str = "layer",
    dtype: torch.dtype = torch.float32,
) -> tuple[list[torch.Tensor], SolveInfo]:
    """Prune several weights that share one input (and so one Hessian), e.g. q/k/v, in one solve.

    OBS treats rows independently given H, so stacking the matrices' rows is exact;
    unstructured masks are still chosen per matrix (each matrix gets exactly its
    sparsity — one for all, or one per matrix — in every column block), as if each were
    solved alone. One Cholesky and one column loop serve the whole group. ``dtype`` is the
    precision of the factorisation and the updates; the result is returned in float32.
    """
    if (sparsity is None) == (nm is None):
        raise ValueError("give exactly one of sparsity or nm")
    sizes = [w.shape[0] for w in weights]
    if isinstance(sparsity, (list, tuple)):
        if len(sparsity) != len(weights):
            raise ValueError(f"{name}: {len(sparsity)} sparsities for {len(weights)} matrices")
        each = [float(x) for x in sparsity]
    else:
        each = [sparsity] * len(weights)
    if len({w.shape[1] for w in weights}) != 1:
        raise ValueError(f"{name}: grouped weights must share their input dimension, got {[tuple(w.shape) for w in weights]}")
    W = torch.cat([w.detach().to(dtype) for w in weights], 0).contiguous()
    rows, cols = W.shape
    if H.shape != (cols, cols):
        raise ValueError(f"{name}: Hessian shape {tuple(H.shape)} does not match {cols} input columns")
    if nm is not None and cols % nm[1]:
        raise ValueError(f"{name}: {cols} input columns are not a multiple of M={nm[1]}")
    if nm is not None and blocksize % nm[1]:
        raise ValueError(f"{name}: blocksize {blocksize} is not a multiple of M={nm[1]}")
    H, dead = _revive_dead_inputs(H, dtype)
    W[:, dead] = 0.0
    U, lam, steps, rel = inverse_cholesky_upper(H, damp, max_damp_steps, name)
    del H
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        W1 = W[:, i1:i2].clone(memory_format=torch.contiguous_format)
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        d = torch.diagonal(U1)
        if nm is None:
            saliency = W1.pow(2) / d.pow(2)[None, :]
            prune1 = torch.zeros_like(W1, dtype=torch.bool)
            start = 0
            for size, sp in zip(sizes, each):  # each matrix of the group gets its own mask selection
                seg = saliency[start : start + size].reshape(-1)
                k = int(seg.numel() * sp)
                if k:
                    prune1[start : start + size].view(-1)[seg.topk(k, largest=False, sorted=False).indices] = True
                start += size
        else:
            n, m = nm
            prune1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(count):
            if nm is not None and i % nm[1] == 0:
                sal = W1[:, i : i + m].pow(2) / d[i : i + m].pow(2)[None, :]
                idx = sal.topk(m - n, dim=1, largest=False, sorted=False).indices
                prune1[:, i : i + m].scatter_(1, idx, True)
            w = W1[:, i]
            err = torch.where(prune1[:, i], w, torch.zeros((), dtype=w.dtype)) / d[i]
            # remaining columns of the block absorb the error; column i becomes its quantised value
            W1[:, i:].addr_(err, U1[i, i:], alpha=-1.0)
            Err1[:, i] = err
        W1[prune1] = 0.0
        W[:, i1:i2] = W1
        if i2 < cols:
            W[:, i2:].addmm_(Err1, U[i1:i2, i2:], alpha=-1.0)
    return [w.float() for w in W.split(sizes, 0)], SolveInfo(lam, rel, steps, int(dead.sum()))


def sparsegpt_pruner(cfg: SparseGPTConfig) -> tuple[Callable[[LinearRef], Collector], PruneFn]:
    """The collector factory and the in-place prune function of SparseGPT with ``cfg``'s solver
    options (shared by this pass and the passes that wrap it, like SDS)."""

    def prune(refs: list[LinearRef], col: Collector, sparsity: float | list[float] | None) -> dict:
        ws = [r.weight_out_in() for r in refs]
        news, info = sparsegpt_prune_group(
            ws, col.hessian(SOLVE_DTYPES[cfg.solve_dtype]), sparsity, cfg.nm, cfg.blocksize, cfg.damp, cfg.max_damp_steps, name="+".join(r.name for r in refs),
            dtype=SOLVE_DTYPES[cfg.solve_dtype],
        )
        for w, new in zip(ws, news):
            w.copy_(new.to(w.dtype))
        return info.to_dict()

    return (lambda ref: HessianCollector(ref.in_features)), prune


@register_pass
class SparseGPTPass(OneShotPass):
    name = "sparsegpt"
    config_class = SparseGPTConfig
    report_title = ALLOCATION_TITLE

    @classmethod
    def report_section(cls, variant: dict, result: dict) -> list:
        return allocation_report(variant, result)

    uses_calibration = True

    def run(self, model: torch.nn.Module, ctx: PassContext) -> PassResult:
        cfg = self.config
        make_collector, prune = sparsegpt_pruner(cfg)

        def saliency(weights: list[torch.Tensor], col: Collector) -> tuple[list[torch.Tensor], torch.Tensor, str]:
            H = col.hessian()
            return obs_saliency(weights, H, cfg.damp, cfg.max_damp_steps), torch.diagonal(H).double(), "matrix"

        return run_oneshot(self.name, cfg, model, ctx, make_collector, prune, saliency)
