"""Activation sparsity, TEAL-style (training-free, magnitude-based; Liu et al. 2024): every input
entry of a decoder linear whose magnitude is at or below its layer's threshold is set to zero. The
thresholds are calibrated per block and per input group (q/k/v's input, o's, gate/up's, down's —
:data:`core.activation.GROUPS`) as the ``sparsity`` quantile of |x| over calibration tokens of the
model as it is when the pass runs, so each input is zero on about ``sparsity`` of its entries.
With ``form: topk`` each token instead keeps the round((1 − sparsity) · K) largest magnitudes of each
group's K inputs (no thresholds to calibrate; every token reads the same share).

CATS-style (Lee et al. 2024): ``groups: [gate_out]`` thresholds the gate's SiLU activation instead of an
input — the ``sparsity`` quantile of |SiLU(gate(x))| per block — so an engine skips both the up
projection's rows and the down projection's inputs of the entries that are zero (threshold form; not
with ``mlp_in`` or ``down_in``, which sparsify the same MLP; ``attn_in`` and ``o_in`` may join it).

The model computes the same function everywhere (forward pre-hooks, saved in the config, exported
in the graph), so perplexity on any engine is the quality of sparse decoding: the thresholding is
per token, so applying it at every position of a window is what decoding each token does. Only an
engine whose kernels skip the zero inputs turns it into speed: ``native-cpu`` stores these linears
input-major and, at decode, reads only the rows of the inputs that remain (its prefill is dense).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

from core.activation import ALL_GROUPS, CONFIG_KEY, GATE_OUT, GATE_OUT_EXCLUDES, GROUPS, apply_activation_spec, check_gate_out, group_of, remove_activation_hooks
from core.progress import progress
from core.structure import linear_macs
from passes.base import DataFacts, OptionError, Pass, PassContext, PassResult, SpeedupNeed, register_pass

log = logging.getLogger(__name__)

NEEDS_INPUT_SKIPPING_KERNEL = SpeedupNeed(
    33, "needs a kernel that skips the weight rows of zero inputs (native-cpu has one; ONNX Runtime computes them)", "an input-skipping kernel", True
)


@dataclass
class ActivationConfig:
    sparsity: float = 0.4
    """Target share of zero input entries of every hooked linear (per block and input group)."""
    form: str = "threshold"
    """``threshold`` (TEAL: one calibrated magnitude threshold per block and group) or ``topk`` (each token
    keeps the round((1 - sparsity) · K) largest magnitudes of each group's K inputs; no calibration of
    thresholds — the calibration windows only measure the result)."""
    groups: list[str] | None = None
    """Input groups to sparsify (default: all of attn_in, o_in, mlp_in, down_in), or ``gate_out`` (CATS:
    the gate's SiLU activation; with attn_in / o_in at most)."""
    dense_blocks: list[int] | None = None
    """Blocks left dense."""
    samples_per_window: int = 8192
    """|x| values sampled per window, block and group to estimate the quantile."""

    def __post_init__(self) -> None:
        if not isinstance(self.sparsity, (int, float)) or not 0.0 < float(self.sparsity) < 1.0:
            raise OptionError("sparsity", f"sparsity {self.sparsity!r} is outside (0, 1)")
        if self.form not in ("threshold", "topk"):
            raise OptionError("form", f"form {self.form!r} is not 'threshold' or 'topk'")
        unknown = [g for g in self.groups or [] if g not in ALL_GROUPS]
        if unknown:
            raise OptionError("groups", f"groups {unknown} are not among {', '.join(ALL_GROUPS)}")
        if GATE_OUT in (self.groups or []):
            clash = [g for g in GATE_OUT_EXCLUDES if g in self.groups]
            if clash:
                raise OptionError("groups", f"'{GATE_OUT}' and {clash} both sparsify the MLP; choose one")
            if self.form != "threshold":
                raise OptionError("form", f"group '{GATE_OUT}' has the threshold form only, not {self.form!r}")
        if not isinstance(self.samples_per_window, int) or self.samples_per_window < 256:
            raise OptionError("samples_per_window", f"samples_per_window {self.samples_per_window!r} must be an integer >= 256")


@register_pass
class ActivationSparsityPass(Pass):
    name = "activation"
    config_class = ActivationConfig
    uses_calibration = True
    report_title = "Activation sparsity (TEAL, top-k, CATS)"

    @classmethod
    def speedup_need(cls, options: dict[str, Any]) -> SpeedupNeed | None:
        return NEEDS_INPUT_SKIPPING_KERNEL

    @classmethod
    def shapes_change(cls, options: dict[str, Any]) -> bool:
        return True  # the graph gains the thresholds: the dense graph cannot be reused with new weights

    @classmethod
    def check(cls, config: Any, model: Any, data: DataFacts) -> None:
        if model.task != "causal-lm":
            raise OptionError("sparsity", f"activation sparsity speeds up decoding of causal LMs; this {model.family} model is an {model.task}")
        if GATE_OUT in (config.groups or []) and not model.gated_mlp:
            raise OptionError("groups", f"'{GATE_OUT}' (CATS) thresholds the gate of a gated MLP; this {model.family} model's MLP has no gate")
        outside = [b for b in config.dense_blocks or [] if not 0 <= b < model.layers]
        if outside:
            raise OptionError("dense_blocks", f"blocks {outside} are outside the model's {model.layers} blocks (0–{model.layers - 1})")

    @classmethod
    def report_section(cls, variant: dict[str, Any], result: dict[str, Any]) -> list[Any]:
        from core.document import Paragraph

        info = result.get("info") or {}
        if "measured_sparsity" not in info:
            return []
        parts = ", ".join(f"{g} {s:.3f}" for g, s in info["measured_sparsity"].items())
        dec = variant.get("decode") or {}
        eng = (dec.get("engines") or {}).get("native-cpu") or {}
        speed = f"; decode on native-cpu ×{eng['decode_ratio']:.3f} of the fastest dense decode's ms/token" if "decode_ratio" in eng else ""
        how = {"topk": "top-k per token",
               "cats": "CATS thresholds on the gate's activation" + (" and TEAL on inputs" if len(info.get("groups", [])) > 1 else "")}.get(
            info.get("form"), "TEAL thresholds")
        macs = info.get("linear_macs_per_token")
        work = (f"; an input-skipping kernel does {macs['after'] / macs['before']:.3f} of the decoder linears' multiply-adds "
                "at those shares" if macs else "")
        return [Paragraph(
            f"**{variant['name']}**: {how} for {info['sparsity']:.2f} zero inputs in {info['blocks']} blocks; zero share on "
            f"held-out calibration tokens by input group: {parts}{work}{speed}."
        )]

    def run(self, model: torch.nn.Module, ctx: PassContext) -> PassResult:
        cfg = self.config
        adapter = ctx.adapter
        windows = ctx.calibration_windows(self.name)
        if adapter.task != "causal-lm":
            raise ValueError(f"pass 'activation' speeds up decoding of causal LMs; '{adapter.family}' is an {adapter.task}")
        t0 = time.perf_counter()
        groups = cfg.groups or list(GROUPS)
        blocks = adapter.blocks(model)
        dense = set(cfg.dense_blocks or [])
        remove_activation_hooks(model, adapter)
        held = max(1, windows.shape[0] // 4)  # the last quarter of the windows measures the result
        calib, check = windows[:-held], windows[-held:]
        if cfg.form == "topk":
            return self._topk(model, adapter, groups, dense, check, t0)
        if GATE_OUT in groups:
            check_gate_out(model, adapter)
        samples: dict[tuple[int, str], list[torch.Tensor]] = {}
        gen = torch.Generator().manual_seed(ctx.seed)
        hooks = []
        seen: set[tuple[int, str]] = set()

        def sampler(block: int, group: str):
            def hook(module: torch.nn.Module, args: tuple) -> None:
                key = (block, group)
                if key in seen:  # q, k and v read the same input: sample it once per forward
                    return
                seen.add(key)
                x = args[0].detach().reshape(-1).abs().float()
                pick = torch.randint(0, x.numel(), (min(cfg.samples_per_window, x.numel()),), generator=gen)
                samples.setdefault(key, []).append(x[pick])

            return hook

        def gate_sampler(block: int):
            pre = sampler(block, GATE_OUT)

            def hook(module: torch.nn.Module, args: tuple, out: torch.Tensor) -> None:
                pre(module, (torch.nn.functional.silu(out),))

            return hook

        for ref in adapter.linears(model):
            g = group_of(ref.role)
            if g in groups and ref.block not in dense:
                hooks.append(ref.module.register_forward_pre_hook(sampler(ref.block, g)))
            if GATE_OUT in groups and ref.role == "gate" and ref.block not in dense:
                hooks.append(ref.module.register_forward_hook(gate_sampler(ref.block)))
        try:
            with torch.no_grad():
                steps = range(calib.shape[0])
                for w in progress(steps, desc="activation thresholds") if ctx.progress else steps:
                    seen.clear()
                    model(input_ids=calib[w : w + 1], use_cache=False)
        finally:
            for h in hooks:
                h.remove()
        if not samples:
            raise ValueError(f"pass 'activation': no linear of groups {groups} outside dense_blocks {sorted(dense)}")
        thresholds: dict[str, dict[str, float]] = {}
        for (b, g), xs in sorted(samples.items()):
            thresholds.setdefault(str(b), {})[g] = float(torch.quantile(torch.cat(xs), cfg.sparsity))
        measured, macs = self._install(model, adapter, {"method": "teal", "sparsity": float(cfg.sparsity), "thresholds": thresholds}, check, groups, dense)
        result = PassResult(
            self.name,
            info={"sparsity": float(cfg.sparsity), "form": "cats" if GATE_OUT in groups else "threshold", "groups": groups, "blocks": len(blocks) - len(dense), "thresholds": thresholds,
                  "measured_sparsity": measured, "linear_macs_per_token": macs, "calibration_windows": int(calib.shape[0]), "held_out_windows": int(held)},
        )
        result.seconds = time.perf_counter() - t0
        log.info("activation (%s): thresholds for %.2f zero entries in %d blocks; held-out zero share %s (%.1f s)",
                 result.info["form"], cfg.sparsity, len(blocks) - len(dense), {g: round(s, 3) for g, s in measured.items()}, result.seconds)
        return result

    def _topk(self, model: torch.nn.Module, adapter: Any, groups: list[str], dense: set[int], check: torch.Tensor, t0: float) -> PassResult:
        """The top-k form: every hooked group keeps round((1 - sparsity) · K) of its K inputs per token."""
        cfg = self.config
        keep: dict[str, dict[str, int]] = {}
        for ref in adapter.linears(model):
            g = group_of(ref.role)
            if g in groups and ref.block not in dense:
                keep.setdefault(str(ref.block), {})[g] = min(ref.in_features - 1, max(1, round((1.0 - cfg.sparsity) * ref.in_features)))
        if not keep:
            raise ValueError(f"pass 'activation': no linear of groups {groups} outside dense_blocks {sorted(dense)}")
        measured, macs = self._install(model, adapter, {"method": "topk", "sparsity": float(cfg.sparsity), "keep": keep}, check, groups, dense)
        result = PassResult(
            self.name,
            info={"sparsity": float(cfg.sparsity), "form": "topk", "groups": groups, "blocks": len(keep), "keep": keep,
                  "measured_sparsity": measured, "linear_macs_per_token": macs, "held_out_windows": int(check.shape[0])},
        )
        result.seconds = time.perf_counter() - t0
        log.info("activation (top-k): %.2f of each group's inputs zero per token in %d blocks; held-out zero share %s (%.1f s)",
                 cfg.sparsity, len(keep), {g: round(s, 3) for g, s in measured.items()}, result.seconds)
        return result

    def _install(self, model: torch.nn.Module, adapter: Any, spec: dict[str, Any], check: torch.Tensor, groups: list[str],
                 dense: set[int]) -> tuple[dict[str, float], dict[str, float]]:
        """Hook ``spec`` into the model and its config; (zero share by group on the held-out windows, multiply-adds)."""
        apply_activation_spec(model, adapter, spec)
        setattr(model.config, CONFIG_KEY, spec)
        measured = self._measure(model, adapter, check, groups, dense)
        return measured, self._macs(model, adapter, measured, groups, dense)

    @staticmethod
    def _macs(model: torch.nn.Module, adapter: Any, measured: dict[str, float], groups: list[str], dense: set[int]) -> dict[str, float]:
        """Block-linear multiply-adds per token before, and after as an input-skipping kernel does them: a
        hooked linear's in × out times the share of its inputs left nonzero (held-out calibration tokens);
        with ``gate_out``, up's and down's times the share of gate activations left nonzero."""
        after = 0.0
        for ref in adapter.linears(model):
            m = ref.in_features * ref.out_features
            g = group_of(ref.role)
            if GATE_OUT in measured and ref.role in ("up", "down") and ref.block not in dense:
                after += m * (1.0 - measured[GATE_OUT])
            else:
                after += m * (1.0 - measured[g]) if g in groups and ref.block not in dense and g in measured else m
        return {"before": linear_macs(model, adapter), "after": after}

    @staticmethod
    def _measure(model: torch.nn.Module, adapter: Any, windows: torch.Tensor, groups: list[str], dense: set[int]) -> dict[str, float]:
        """Share of zero input entries per group after the thresholds, on held-out calibration windows."""
        zeros: dict[str, list[float]] = {g: [] for g in groups}
        hooks = []

        def counter(group: str):
            def hook(module: torch.nn.Module, args: tuple, output: Any = None) -> None:
                zeros[group].append(float((args[0] == 0).float().mean()))

            return hook

        def gate_counter(module: torch.nn.Module, args: tuple, out: torch.Tensor) -> None:
            zeros[GATE_OUT].append(float((out == 0).float().mean()))

        for ref in adapter.linears(model):
            g = group_of(ref.role)
            if g in groups and ref.block not in dense:
                # a pre-hook registered after the threshold hook sees the thresholded input
                hooks.append(ref.module.register_forward_pre_hook(counter(g)))
            if GATE_OUT in groups and ref.role == "gate" and ref.block not in dense:
                hooks.append(ref.module.register_forward_hook(gate_counter))  # after the threshold hook: its output
        try:
            with torch.no_grad():
                for w in range(windows.shape[0]):
                    model(input_ids=windows[w : w + 1], use_cache=False)
        finally:
            for h in hooks:
                h.remove()
        return {g: sum(v) / len(v) for g, v in zeros.items() if v}
