"""Block reconstruction after masking: the kept weights of a pruned block trained (masks fixed) to
reproduce the dense model's activations — shared by the one-shot passes' ``reconstruct`` option and
SDS's dense step (which trains without masks).

Inside one block of a pre-norm decoder, h = x + attention(norm₁(x)) and y = h + mlp(norm₂(h)).
With the dense model's own stream as the target (x_d, h_d, y_d; the student runs on the pruned
stream x_s, so the reconstruction also absorbs the error earlier pruned blocks pass on):

- ``block``: every target linear of the block trained together on ‖y_s − y_d‖²;
- ``sublayer``: first the attention linears on ‖h_s − h_d‖² (h read at the input of the MLP's norm),
  then the MLP linears on ‖y_s − y_d‖² with the reconstructed attention in place — attention and
  MLP separately, each against its own target.

Each loss is divided by its batch's error when first trained on (so it starts at 1 and the learning rate
reads the same in every block); Adam with 10 % warm-up and cosine decay, one runner batch per step;
after every step the pruned positions are zeroed again, so the mask never changes. The last
``holdout`` batches are never trained on: the block's output error is measured there before and
after, and a reconstruction that made it worse is undone (the block keeps its one-shot weights).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch

from calibrate.runner import first_output, map_tensors
from core.adapters.base import LinearRef, ModelAdapter
from passes.training import lr_factor

log = logging.getLogger(__name__)

MODES = ("none", "block", "sublayer")


def plain(obj: Any) -> Any:
    """Autograd-usable fp32 copies of the runner's (inference-mode) tensors, also inside containers."""
    return map_tensors(obj, lambda t: t.detach().clone().float() if t.is_floating_point() else t.detach().clone())


def trainable_weight(ref: LinearRef) -> torch.Tensor:
    """The trainable weight as (out, in), differentiable (a transposed view where the adapter stores (in, out))."""
    return ref.module.weight.t() if ref.transposed else ref.module.weight


class BlockData:
    """One block's reconstruction problem: its fp32 inputs and output targets, split into train/holdout."""

    def __init__(self, module: torch.nn.Module, batches: list, targets: list[torch.Tensor], holdout: int):
        self.module = module
        self.inputs = [dataclasses.replace(b, hidden=plain(b.hidden), args=plain(b.args), kwargs=plain(b.kwargs)) for b in batches]
        """The runner's batches as fp32 autograd-usable copies (same type, so ``LayerwiseRunner.collect`` takes them)."""
        self.targets = [t.detach().clone().float() for t in targets]
        n = len(self.inputs)
        if not 0 < holdout < n:
            raise ValueError(f"block reconstruction: {n} calibration batches cannot hold out {holdout} and still train")
        self.train = list(range(n - holdout))
        self.hold = list(range(n - holdout, n))

    def forward(self, i: int) -> torch.Tensor:
        b = self.inputs[i]
        return first_output(self.module(b.hidden, *b.args, **b.kwargs))

    @torch.no_grad()
    def errors(self, which: list[int]) -> list[float]:
        return [float((self.forward(i) - self.targets[i]).pow(2).sum()) for i in which]


class _Capture:
    """Records the input of one module (the residual h before the MLP's norm) on every forward."""

    def __init__(self, module: torch.nn.Module):
        self.value: torch.Tensor | None = None
        self.handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, _module: torch.nn.Module, args: tuple) -> None:
        self.value = args[0]

    def close(self) -> None:
        self.handle.remove()


def residual_module(adapter: ModelAdapter, block: torch.nn.Module) -> torch.nn.Module:
    """The module whose input is the residual stream between attention and MLP (the MLP's norm)."""
    path = adapter.native.get("mlp_norm")
    if not path:
        raise ValueError(f"reconstruct 'sublayer': family '{adapter.family}' does not name the norm before its MLP; use 'block'")
    return block.get_submodule(path)


@torch.no_grad()
def residual_targets(adapter: ModelAdapter, block: torch.nn.Module, batches: list) -> list[torch.Tensor]:
    """h = x + attention(norm₁(x)) of ``block`` on each batch (the block must still be dense)."""
    cap = _Capture(residual_module(adapter, block))
    out = []
    try:
        with torch.inference_mode():
            for b in batches:  # fp32, whatever precision the calibration forwards ran in
                block(plain(b.hidden), *plain(b.args), **plain(b.kwargs))
                out.append(cap.value.detach().clone().float())
    finally:
        cap.close()
    return out


def _train(data: BlockData, refs: list[LinearRef], read, targets: list[torch.Tensor], steps: int, lr: float) -> dict[str, float]:
    """Adam on the kept weights of ``refs`` against ``targets`` of ``read(i)`` (a function of the batch index)."""
    module = data.module
    saved_flags = {n: p.requires_grad for n, p in module.named_parameters()}
    for p in module.parameters():
        p.requires_grad_(False)
    params = [ref.module.weight for ref in refs]
    keep = [(p.detach() != 0) for p in params]
    for p in params:
        p.requires_grad_(True)
    scale: dict[int, float] = {}  # each batch's error when first trained on
    opt = torch.optim.Adam(params, lr=lr)
    warmup = max(1, steps // 10)
    first = last = 0.0
    try:
        for step in range(steps):
            i = data.train[step % len(data.train)]
            for g in opt.param_groups:
                g["lr"] = lr * lr_factor(step, warmup, steps)
            err = (read(i) - targets[i]).pow(2).sum()
            loss = err / scale.setdefault(i, max(float(err.detach()), 1e-30))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                for p, k in zip(params, keep):
                    p.mul_(k)
            last = float(loss.detach())
            first = first or last
    finally:
        for p in params:
            p.grad = None
        for n, p in module.named_parameters():
            p.requires_grad_(saved_flags[n])
    return {"loss_first": round(first, 5), "loss_last": round(last, 5)}


def reconstruct_masked(
    adapter: ModelAdapter, data: BlockData, refs: list[LinearRef], mode: str, steps: int, lr: float,
    residual: list[torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Train the pruned block's kept weights (see the module docstring); returns what happened.
    ``residual``: the dense stream's h per batch (``sublayer`` only, from :func:`residual_targets`)."""
    if mode not in MODES or mode == "none":
        raise ValueError(f"reconstruct '{mode}' is not one of block, sublayer")
    before_hold = data.errors(data.hold)
    saved = [ref.module.weight.detach().clone() for ref in refs]
    record: dict[str, Any] = {"holdout_before": float(f"{sum(before_hold):.6g}")}
    if mode == "block":
        record["block"] = _train(data, refs, data.forward, data.targets, steps, lr)
    else:
        if residual is None:
            raise ValueError("reconstruct 'sublayer' needs the dense stream's residual targets")
        prefix = adapter.attention_path + "."
        attn = [r for r in refs if adapter.linear_paths[r.role].startswith(prefix)]
        rest = [r for r in refs if r not in attn]
        cap = _Capture(residual_module(adapter, data.module))
        try:
            def read_h(i: int) -> torch.Tensor:
                data.forward(i)
                return cap.value

            if attn:
                record["attention"] = _train(data, attn, read_h, residual, steps, lr)
        finally:
            cap.close()
        if rest:
            record["mlp"] = _train(data, rest, data.forward, data.targets, steps, lr)
    after_hold = data.errors(data.hold)
    record["holdout_after"] = float(f"{sum(after_hold):.6g}")
    if sum(after_hold) > sum(before_hold):
        with torch.no_grad():
            for ref, w in zip(refs, saved):
                ref.module.weight.copy_(w)
        record["undone"] = True
        log.info("reconstruction made the held-out block error worse (%.4g → %.4g): undone", sum(before_hold), sum(after_hold))
    return record
