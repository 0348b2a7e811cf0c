"""Weight quantization after pruning: INT8 or 4-bit weights in blocks of input columns (``core.quant``),
by round-to-nearest or by GPTQ (Frantar et al. 2022), which quantizes one input column at a time
and moves each column's rounding error onto the columns not yet quantized through the inverse
Hessian of the layer's inputs (the OBS update SparseGPT uses for pruning).

**Mask-aware GPTQ.** Plain GPTQ updates every later weight, the pruned zeros too, so a 2:4 model
comes out dense. With ``mask_aware`` (the default) a weight that was zero before quantization is
held at zero: when its column is reached it is quantized to 0 (its error (w − 0)/d goes on to the
later columns, the SparseGPT step that pruned it in the first place), and at the end every such
weight is exactly zero. RTN needs nothing of the kind: both grids map 0 to 0 exactly.

The pass must be the last of its variant (it quantizes what the passes before it left). The model
keeps its dequantized weights in fp32 (the PyTorch reference for validation) and the grids in the
model's ``quantization_tensors``; ``core.models.save_hf_dir`` writes them to ``quantization.safetensors``
and the config's ``weight_quantization``, from which the ONNX rewrite (``export/quantize.py``)
builds ONNX Runtime ``MatMulNBits`` nodes (8- or 4-bit).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from calibrate.stats import HessianCollector
from core.quant import QuantScheme, grid, quantize_dequantize, rtn
from core.errors import OptionError
from passes.base import ROLES, DataFacts, LayerChange, Pass, PassContext, PassResult, SpeedupNeed, check_roles, register_pass

log = logging.getLogger(__name__)

METHODS = ("rtn", "gptq")


@dataclass
class QuantizeConfig:
    bits: int = 8
    """8 (INT8, symmetric) or 4 (with a zero point), one scale per block of input columns."""
    method: str = "rtn"
    """'rtn' (round to nearest) or 'gptq' (error compensation on calibration data)."""
    block_size: int = 32
    """Input columns per scale (a power of two ≥ 16)."""
    accuracy_level: int = 4
    """ONNX Runtime MatMulNBits' compute precision: 4 = int8 activations per block (the fast CPU path),
    0 = fp32 compute (slower: docs/quantization.md). It can change greedy tokens: validation's decode
    parity says whether it did."""
    mask_aware: bool = True
    """GPTQ: weights that are zero before quantization stay exactly zero (the pattern survives)."""
    targets: list[str] = field(default_factory=lambda: list(ROLES))
    """The block linears' roles to quantize; empty (``[]``) with ``head`` quantizes the LM head alone
    (the block linears keep their weights, e.g. a GGUF model's own 4-bit grid)."""
    head: bool = False
    """Also quantize the LM head, by ``method``: GPTQ's Hessian is that of the head's inputs (the final
    norm's outputs over the calibration windows, after the block linears are quantized). A head tied
    to the input embedding gets its own quantized copy; the embedding stays fp32, so the saved model
    holds one more vocab × hidden matrix and the variant's graph is exported afresh."""
    damp: float = 0.01
    """GPTQ: relative damping of the Hessian diagonal."""
    blocksize: int = 128
    """GPTQ: columns per lazy-update batch (a multiple of block_size for 4-bit)."""
    batch_size: int = 8
    """GPTQ: calibration windows per forward pass of a block."""
    calibration_dtype: str = "auto"

    def __post_init__(self) -> None:
        if self.bits not in (8, 4):
            raise ValueError(f"bits {self.bits} is not one of 8, 4")
        if self.method not in METHODS:
            raise ValueError(f"method '{self.method}' is not one of {', '.join(METHODS)}")
        self.scheme()  # block size and accuracy level
        if self.targets or not self.head:  # empty targets: the head alone
            check_roles(self.targets)
        if not 0.0 < self.damp < 10.0:
            raise ValueError(f"damp {self.damp} is outside (0, 10)")
        if self.blocksize < 1 or self.blocksize % self.block_size:
            raise ValueError(f"blocksize {self.blocksize} is not a positive multiple of block_size {self.block_size}")
        if not 1 <= self.batch_size <= 1024:
            raise ValueError(f"batch_size {self.batch_size} is outside [1, 1024]")
        if self.calibration_dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"calibration_dtype '{self.calibration_dtype}' is not one of auto, float32, bfloat16")

    def scheme(self) -> QuantScheme:
        return QuantScheme(self.bits, self.block_size, self.accuracy_level)


def gptq_quantize(W: torch.Tensor, H: torch.Tensor, scheme: QuantScheme, keep: torch.Tensor | None, blocksize: int = 128, damp: float = 0.01, name: str = "layer") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any]]:
    """GPTQ of ``W`` ``(rows, cols)`` with input Hessian ``H``: returns ``(W', scale, zero, info)``,
    ``scale``/``zero`` ``(rows, n_groups)``. ``keep`` (bool, like ``W``): where it is False the weight
    ends exactly 0 (mask-aware); None lets every weight move (plain GPTQ)."""
    from passes.sparsegpt import _revive_dead_inputs, inverse_cholesky_upper

    W = W.detach().float().clone()
    rows, cols = W.shape
    g = scheme.block_size
    n_groups = -(-cols // g)
    scale = torch.ones(rows, n_groups)
    zero = torch.zeros(rows, n_groups)
    H, dead = _revive_dead_inputs(H)
    W[:, dead] = 0.0
    U, lam, steps, _ = inverse_cholesky_upper(H, damp, 6, name)
    del H
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % g == 0:  # the block's grid from its weights as updated so far
                blk = W1[:, i : i + g] if keep is None else W1[:, i : i + g] * keep[:, col : col + g]
                s, z = grid(blk, scheme.bits)  # held zeros do not widen the range
                scale[:, col // g], zero[:, col // g] = s, z
            w = W1[:, i]
            q = quantize_dequantize(w, scale[:, col // g], zero[:, col // g], scheme.bits)
            if keep is not None:
                q = torch.where(keep[:, col], q, torch.zeros((), dtype=q.dtype))
            Q1[:, i] = q
            err = (w - q) / U1[i, i]
            W1[:, i:].addr_(err, U1[i, i:], alpha=-1.0)
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        if i2 < cols:
            W[:, i2:].addmm_(Err1, U[i1:i2, i2:], alpha=-1.0)
    return W, scale, zero, {"damping": lam, "damp_steps": steps, "dead_inputs": int(dead.sum())}


class _HeadReached(Exception):
    """Raised by the head's hook: the forward has given the head its input and need go no further."""


def head_input_hessian(model: torch.nn.Module, head: torch.nn.Module, windows: torch.Tensor, batch_size: int) -> HessianCollector:
    """The Hessian statistics of ``head``'s inputs over ``windows`` (token ids ``(n, length)``), from
    forwards of the whole model in batches that stop where the head would start (its logits are never
    computed). Progress is logged per batch."""
    collector = HessianCollector(int(head.weight.shape[1]))

    def hook(_module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        collector.add(args[0].detach())
        raise _HeadReached

    handle = head.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            for i in range(0, windows.shape[0], batch_size):
                try:
                    model(input_ids=windows[i : i + batch_size], use_cache=False)
                except _HeadReached:
                    pass
                else:
                    raise ValueError("pass 'quantize': the model's forward never reached its LM head")
                log.info("quantize: head inputs, %d of %d windows", min(i + batch_size, windows.shape[0]), windows.shape[0])
    finally:
        handle.remove()
    return collector


@register_pass
class QuantizePass(Pass):
    name = "quantize"
    config_class = QuantizeConfig
    uses_calibration = True  # GPTQ's Hessians (RTN reads none, but one flag per class)
    must_be_last = True
    quantizes = True
    report_title = "Weight quantization"

    @classmethod
    def speedup_need(cls, options: dict[str, Any]) -> SpeedupNeed | None:
        return None  # ONNX Runtime's CPU kernels run both formats

    @classmethod
    def shapes_change(cls, options: dict[str, Any]) -> bool:
        return bool(options.get("head"))  # an untied head is a new initializer: the dense graph cannot hold it

    @classmethod
    def check(cls, config: Any, model: Any, data: DataFacts) -> None:
        if config.head and model.task != "causal-lm":
            raise OptionError("head", f"quantizes an LM head; this {model.family} model is an {model.task} without one")

    @classmethod
    def report_section(cls, variant: dict[str, Any], result: dict[str, Any]) -> list[Any]:
        from core.document import Paragraph

        info = result.get("info") or {}
        if "scheme" not in info:
            return []
        z = info["zeros"]
        kept = "every one still zero" if z["lost"] == 0 else f"**{z['lost']:,} of them now non-zero** (the pattern is lost)"
        head = info.get("head")
        head_text = "" if not head else f"the LM head by {head['method']}{' (untied from the embedding, which stays fp32)' if head['untied'] else ''}"
        body = info["linears"] - (1 if head else 0)
        what = " and ".join(t for t in (f"{body} block linears" if body else "", head_text) if t)
        return [Paragraph(
            f"**{variant['name']}**: {info['label']} by {info['method']}"
            f"{' (mask-aware)' if info['method'] == 'gptq' and info['mask_aware'] else ''} on {what}; "
            f"{z['before']:,} weights were zero before, {kept}; relative weight change ‖W′−W‖/‖W‖ {info['relative_error']:.4f}."
        )]

    @staticmethod
    def _quantize_head(model: torch.nn.Module, adapter: Any, cfg: QuantizeConfig, record: Any, windows: "torch.Tensor | None") -> dict[str, Any]:
        """The LM head by ``cfg.method`` (GPTQ on the Hessian of the head's inputs over ``windows``); a
        head tied to the input embedding is untied first (its own parameter)."""
        if adapter.head_path is None:
            raise ValueError(f"pass 'quantize': head: true, but the '{adapter.family}' adapter names no LM head")
        scheme = cfg.scheme()
        head = model.get_submodule(adapter.head_path)
        embed = model.get_input_embeddings()
        tied = embed is not None and head.weight is embed.weight
        if tied:
            head.weight = torch.nn.Parameter(head.weight.detach().clone())
            model.config.tie_word_embeddings = False
            if hasattr(model.config, "get_text_config"):
                model.config.get_text_config().tie_word_embeddings = False
        name = f"{adapter.head_path}.weight"
        w = head.weight.detach()
        facts: dict[str, Any] = {"name": name, "shape": list(w.shape), "method": cfg.method, "untied": tied}
        if cfg.method == "rtn":
            new, s, z = rtn(w, scheme)
        else:
            assert windows is not None
            t0 = time.perf_counter()
            H = head_input_hessian(model, head, windows, cfg.batch_size)
            new, s, z, solve = gptq_quantize(w.float(), H.hessian(), scheme, (w != 0) if cfg.mask_aware else None, cfg.blocksize, cfg.damp, name)
            facts |= solve | {"seconds": round(time.perf_counter() - t0, 2), "tokens": H.rows}
        record(name, head.weight.data, new, s, z, w == 0)
        return facts

    def run(self, model: torch.nn.Module, ctx: PassContext) -> PassResult:
        from calibrate.runner import LayerwiseRunner, resolve_compute_dtype
        from passes.oneshot import by_collector

        cfg = self.config
        scheme = cfg.scheme()
        t0 = time.perf_counter()
        if getattr(model, "quantization_tensors", None):
            raise ValueError("the model is already quantized; 'quantize' runs once, as the last pass")
        result = PassResult(self.name, info={"scheme": scheme.to_dict(), "label": scheme.label, "method": cfg.method, "mask_aware": cfg.mask_aware})
        tensors: dict[str, torch.Tensor] = {}
        stats = {"before": 0, "lost": 0, "err2": 0.0, "norm2": 0.0}

        def record(name: str, w: torch.Tensor, new: torch.Tensor, s: torch.Tensor, z: torch.Tensor, was_zero: torch.Tensor) -> None:
            """Write the dequantized ``new`` into the (out, in) weight ``w`` of parameter ``name``, keep its grid, count."""
            stats["err2"] += float((new - w.float()).double().pow(2).sum())
            stats["norm2"] += float(w.double().pow(2).sum())
            stats["before"] += int(was_zero.sum())
            stats["lost"] += int((new[was_zero] != 0).sum())
            with torch.no_grad():
                w.copy_(new.to(w.dtype))
            tensors[f"{name}.scale"] = s.float().contiguous()
            tensors[f"{name}.zero"] = z.to(torch.uint8).contiguous()

        def finish(ref: Any, new: torch.Tensor, s: torch.Tensor, z: torch.Tensor, was_zero: torch.Tensor) -> None:
            record(f"{ref.name}.weight", ref.weight_out_in(), new, s, z, was_zero)
            result.layers.append(LayerChange.of(ref))

        windows = ctx.calibration_windows(self.name) if cfg.method == "gptq" else None
        if cfg.targets and cfg.method == "rtn":  # (no targets: the head alone, checked by the config)
            for ref in ctx.adapter.linears(model, roles=cfg.targets):
                w = ref.weight_out_in().detach()
                new, s, z = rtn(w, scheme)
                finish(ref, new, s, z, w == 0)
        elif cfg.targets:
            def apply(block: int, refs: list[Any], collectors: dict[str, Any]) -> None:
                # linears fed the same input (q/k/v, gate/up) share one Hessian: GPTQ treats rows independently
                # given H, so their rows are solved stacked, one factorisation per input (as SparseGPT does)
                for group in by_collector(refs, collectors):
                    ws = [r.weight_out_in().detach() for r in group]
                    W = torch.cat([w.float() for w in ws])
                    keep = (W != 0) if cfg.mask_aware else None
                    name = "+".join(r.name for r in group)
                    new, s, z, facts = gptq_quantize(W, collectors[group[0].name].hessian(), scheme, keep, cfg.blocksize, cfg.damp, name)
                    result.info.setdefault("layers", {})[name] = facts
                    sizes = [w.shape[0] for w in ws]
                    for r, w, n1, s1, z1 in zip(group, ws, new.split(sizes), s.split(sizes), z.split(sizes)):
                        finish(r, n1, s1, z1, w == 0)

            runner = LayerwiseRunner(model, ctx.adapter, windows, batch_size=cfg.batch_size, show_progress=ctx.progress, compute_dtype=resolve_compute_dtype(cfg.calibration_dtype))
            result.info["runner"] = runner.run(lambda ref: HessianCollector(ref.in_features), apply, roles=cfg.targets).to_dict()
        if cfg.targets and not result.layers:
            raise ValueError(f"pass 'quantize': no linear matches targets {cfg.targets}")
        if cfg.head:
            result.info["head"] = self._quantize_head(model, ctx.adapter, cfg, record, windows)
        model.quantization_tensors = tensors
        model.config.weight_quantization = {**scheme.to_dict(), "method": cfg.method, "weights": sorted(k[: -len(".scale")] for k in tensors if k.endswith(".scale"))}
        result.info["linears"] = len(result.layers) + (1 if cfg.head else 0)
        result.info["zeros"] = {"before": stats["before"], "lost": stats["lost"]}
        result.info["relative_error"] = (stats["err2"] / stats["norm2"]) ** 0.5 if stats["norm2"] else 0.0
        result.seconds = time.perf_counter() - t0
        log.info("quantize: %s by %s on %d block linears%s in %.1f s; %d of %d zeros lost", scheme.label, cfg.method, len(result.layers),
                 " and the LM head" if cfg.head else "", result.seconds, stats["lost"], stats["before"])
        return result
