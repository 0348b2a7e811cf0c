"""Stage ``<variant>/validate-<backend>/``: quality, parity and size of one variant against the
dense baseline (``validation.json``). Latency has its own stage (all variants interleaved)."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from core.artifacts import stable_hash
from pipeline.schema import check
from pipeline.stages import engine as engine_stage
from pipeline.stages.base import Scope, Stage, variant_entry
from pipeline.stages.context import STAGE_SCHEMA, BuildContext
from pipeline.stages.decode import DecodeSpec
from pipeline.stages.latency import LatencySpec

log = logging.getLogger(__name__)


@dataclass
class ParitySpec:
    atol: float = 1e-3
    rtol: float = 1e-3
    batch: int = 2
    length: int = 64

    def validate(self, where: str) -> None:
        check(self.atol >= 0, f"{where}.atol", f"{self.atol} is negative")
        check(self.rtol >= 0, f"{where}.rtol", f"{self.rtol} is negative")
        check(1 <= self.batch <= 64, f"{where}.batch", f"{self.batch} is outside [1, 64]")
        check(1 <= self.length <= 8192, f"{where}.length", f"{self.length} is outside [1, 8192]")


@dataclass
class ValidationSpec:
    perplexity: bool = True
    """Perplexity of the engine over every evaluation window (causal LMs)."""
    agreement_windows: int = 8
    """Evaluation windows on which top-1 agreement and KL(dense‖variant) are measured (engine
    logits of the variant against the dense engine's, computed once per build)."""
    torch_windows: int = 4
    """Evaluation windows on which PyTorch perplexity is also computed and compared with the
    engine's on the same windows (the engine-vs-PyTorch check; 0 = every window)."""
    parity: ParitySpec = field(default_factory=ParitySpec)
    latency: LatencySpec | None = field(default_factory=LatencySpec)
    decode: DecodeSpec | None = None
    """Greedy-decode parity and decode latency through the KV-cache graphs (needs export.kv_cache)."""

    def validate(self, where: str) -> None:
        check(self.agreement_windows >= 0, f"{where}.agreement_windows", f"{self.agreement_windows} is negative")
        check(self.torch_windows >= 0, f"{where}.torch_windows", f"{self.torch_windows} is negative")
        self.parity.validate(f"{where}.parity")
        if self.latency is not None:
            self.latency.validate(f"{where}.latency")
        if self.decode is not None:
            self.decode.validate(f"{where}.decode")


class ValidateStage(Stage):
    kind = "validate"
    scope = Scope.VARIANT_ENGINE

    def options(self, ctx: BuildContext, v: Any = None, e: Any = None) -> dict[str, Any]:
        """Validation options a per-variant stage depends on (latency and decode have their own stages)."""
        return {k: val for k, val in asdict(ctx.recipe.validation).items() if k not in ("latency", "decode")}

    def key(self, ctx: BuildContext, v: Any, e: Any) -> str:
        stage = f"engine-{e.backend}"
        return stable_hash(
            "validate",
            ctx.content(v.name, "model"),
            ctx.content(v.name, stage),
            ctx.content("dense", "model"),
            ctx.content("dense", stage),
            ctx.data_key("evaluation"),
            self.options(ctx),
            STAGE_SCHEMA,
        )

    def build(self, ctx: BuildContext, tmp: Path, v: Any, e: Any) -> dict[str, Any]:
        result = validate_variant(ctx, v, e)
        (tmp / "validation.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
        return {"summary": _summary(result)}

    def contribute(self, ctx: BuildContext, results: dict[str, Any], v: Any, e: Any) -> None:
        path = self.path(ctx, v, e) / "validation.json"
        variant_entry(results, v.name)["engines"][e.backend] = {"status": "ok", **json.loads(path.read_text(encoding="utf-8"))}


STAGE = ValidateStage()


def validate_variant(ctx: BuildContext, v: Any, e: Any) -> dict[str, Any]:
    """Quality, parity and size of one variant on one engine, everything run through the engine's own runner."""
    engine = ctx.engine(e)
    spec = ctx.recipe.validation
    import numpy as np

    from pipeline import validate as V

    dense = ctx.dense()
    task = dense.task
    output = dense.adapter.output_name
    model = dense.model if v.name == "dense" else ctx.variant_model(v.name)
    windows = ctx.eval_windows()
    art = engine_stage.artifact(ctx, v.name, e.backend)
    result: dict[str, Any] = {"variant": v.name, "backend": e.backend, "task": task}
    result["size"] = V.size_stats(model, dense.adapter)
    result["size"]["onnx_bytes"] = _dir_bytes(ctx.out / v.name / "onnx", "model.onnx*")
    result["size"]["engine_bytes"] = art.path.stat().st_size
    torch_fn = V.torch_outputs_fn(model, task)
    n_agree = min(spec.agreement_windows, windows.shape[0]) if v.name != "dense" else 0
    if task == "causal-lm" and spec.perplexity:
        # The engine is what ships, so its perplexity covers every window; PyTorch runs on the
        # first `torch_windows` only, compared with the engine on those same windows (parity
        # below checks the outputs element by element as well).
        with engine.runner(art) as runner:
            engine_fn = V.runner_outputs_fn(runner, output)
            dense_fn = _dense_reference(ctx, e, engine, n_agree) if n_agree else None
            if v.name == "dense":
                engine_fn = _remembering(ctx, e, engine_fn, spec.agreement_windows)
            result["perplexity_engine"], agr = V.perplexity_with_agreement(engine_fn, dense_fn, windows, n_agree, f"{v.name} ppl ({e.backend})")
        if agr is not None:
            result["agreement"] = {**agr, "logits": f"{e.backend} engine, variant vs dense"}
        k = windows.shape[0] if spec.torch_windows == 0 else min(spec.torch_windows, windows.shape[0])
        result["perplexity_torch"] = V.perplexity(torch_fn, windows[:k], f"{v.name} ppl (torch)")
        pt, pe = result["perplexity_torch"]["perplexity"], V.perplexity_of_first(result["perplexity_engine"], k)
        result["perplexity_engine_vs_torch"] = pe / pt - 1
        result["perplexity_engine_vs_torch_windows"] = k
        log.info(
            "%s: perplexity %s %.3f (%d windows); on the first %d: torch %.3f, engine %.3f (%+.4f%%)",
            v.name, e.backend, result["perplexity_engine"]["perplexity"], windows.shape[0], k, pt, pe, 100 * (pe / pt - 1),
        )
    elif n_agree:
        dense_fn = V.torch_outputs_fn(dense.model, task)
        if task == "causal-lm":
            result["agreement"] = V.agreement(dense_fn, torch_fn, windows[:n_agree], f"{v.name} agreement")
        else:
            result["agreement"] = V.embedding_similarity(dense_fn, torch_fn, windows[:n_agree], f"{v.name} similarity")
    p = spec.parity
    ids = windows[: p.batch, : p.length] if windows.shape[0] >= p.batch else windows[:1, : p.length].repeat(p.batch, 1)
    feeds = [
        {"input_ids": ids.numpy().copy(), "attention_mask": np.ones(tuple(ids.shape), np.int64)},
        {"input_ids": ids[:1, :1].numpy().copy(), "attention_mask": np.ones((1, 1), np.int64)},
    ]
    atol, rtol, why = p.atol, p.rtol, None
    quant = getattr(model.config, "weight_quantization", None)
    if quant is not None:  # the engine quantizes activations too: the tolerance of that precision
        from core.quant import parity_tolerance

        qa, qr, why = parity_tolerance(quant)
        atol, rtol = max(atol, qa), max(rtol, qr)
    result["parity"] = V.parity(model, task, lambda: engine.runner(art), output, feeds, atol, rtol)
    if why is not None:
        result["parity"]["tolerance_reason"] = why
    if not result["parity"]["passed"]:
        floor = result["parity"].get("fp64_reference", {})
        if "within_floor" in floor:
            log.warning(
                "%s: engine/PyTorch parity FAILED (max |Δ| %.3g); against the model in float64: PyTorch fp32 %.3g, engine %.3g (%s)",
                v.name, result["parity"]["max_absdiff"], floor["torch_fp32_vs_fp64"], floor["engine_vs_fp64"],
                "within the model's own fp32 floor" if floor["within_floor"] else "the engine is farther from fp64 than PyTorch fp32",
            )
        else:
            log.warning("%s: engine/PyTorch parity FAILED (max |Δ| %.3g)", v.name, result["parity"]["max_absdiff"])
    return result




def _dense_reference(ctx: BuildContext, e: Any, engine: Any, n: int) -> Any:
    """Logits function of the dense engine for the first ``n`` evaluation windows, memoised for the
    build: the dense variant's own validation leaves them in memory; when that stage was reused,
    the dense engine computes them once here."""
    import torch

    from pipeline import validate as V

    memo = ctx.memo.setdefault(f"dense-logits/{e.backend}", {})
    windows = ctx.eval_windows()
    missing = [i for i in range(n) if i not in memo]
    if missing:
        with engine.runner(engine_stage.artifact(ctx, "dense", e.backend)) as runner:
            fn = V.runner_outputs_fn(runner, "logits")
            for i in missing:
                memo[i] = fn(windows[i : i + 1])
        log.info("dense %s logits for agreement: %d windows computed once for this build", e.backend, len(missing))

    def lookup(w: Any) -> Any:
        for i in range(n):
            if torch.equal(windows[i : i + 1], w):
                return memo[i]
        raise KeyError("window is not one of the agreement windows")

    return lookup


def _remembering(ctx: BuildContext, e: Any, fn: Any, n: int) -> Any:
    """Wrap the dense engine's logits function so the first ``n`` windows' logits stay in memory for
    the other variants' agreement."""
    import torch

    memo = ctx.memo.setdefault(f"dense-logits/{e.backend}", {})
    windows = ctx.eval_windows()

    def run(w: Any) -> Any:
        out = fn(w)
        for i in range(min(n, windows.shape[0])):
            if i not in memo and torch.equal(windows[i : i + 1], w):
                memo[i] = out
        return out

    return run


def _dir_bytes(d: Path, pattern: str) -> int:
    return sum(p.stat().st_size for p in d.glob(pattern) if p.is_file())


def _summary(r: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "perplexity_engine" in r:
        out["perplexity_engine"] = r["perplexity_engine"]["perplexity"]
        out["perplexity_engine_vs_torch"] = r["perplexity_engine_vs_torch"]
    if "parity" in r:
        out["parity_passed"] = r["parity"]["passed"]
    return out
