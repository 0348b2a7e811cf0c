"""The build orchestrator: variants → pruned models → ONNX → engines → validation → report.

Stages and where they live under the build directory (one module per stage kind in
``pipeline/stages/``, each with the key function that decides when it is reused)::

    <variant>/model/                 pruned PyTorch model (safetensors + config + tokenizer), passes.json
    <variant>/onnx/                  model.onnx (+ export facts)
    <variant>/kv/                    prefill.onnx + decode.onnx with a KV cache (export.kv_cache)
    <variant>/engine-<backend>/      the backend's artifact (e.g. model.ort.onnx)
    <variant>/validate-<backend>/    validation.json
    latency-<backend>/               latency.json (every variant, interleaved)
    decode-onnxruntime-cpu/          decode.json (validation.decode)
    manifest.json, results.json, report.md, report.html, accuracy_latency.png

Each stage's key is a hash of its inputs' content and its own options, computed before any
work, so a finished and intact stage is reused without loading a model (see
:mod:`core.artifacts`). The report is rebuilt on every run. Adding a stage kind means one
module in ``pipeline/stages/`` (a :class:`pipeline.stages.base.Stage`) and one entry in :data:`STAGES`.
"""

from __future__ import annotations

import logging
import math
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from core.artifacts import atomic_write_json, file_lock
from core.errors import LockedError, PipelineError, ResourceError, StageError
from pipeline import __version__
from pipeline.recipe import Recipe, VariantSpec
from pipeline.stages import decode, engine, kv, latency, model, onnx, validate
from pipeline.stages.base import Scope, Stage
from pipeline.stages.context import BuildContext, variant_uses_calibration

log = logging.getLogger(__name__)


@dataclass
class BuildSummary:
    out_dir: Path
    results: dict[str, Any]
    stages: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def report_path(self) -> Path:
        return self.out_dir / "report.html"

    @property
    def reused_all(self) -> bool:
        return all(s["reused"] for s in self.stages)


STAGES: list[Stage] = [model.STAGE, onnx.STAGE, kv.STAGE, engine.STAGE, validate.STAGE, latency.STAGE, decode.STAGE]
"""Every stage kind, in the order the builder runs them. Consecutive per-variant stages run variant by
variant (a variant's model stays in memory for its export); the others run stage by stage."""


class Builder:
    def __init__(self, recipe: Recipe, out_dir: Path | None = None, stages: list[Stage] | None = None):
        self.recipe = recipe
        self.ctx = BuildContext(recipe, out_dir)
        self.out = self.ctx.out
        self.stages = list(STAGES if stages is None else stages)

    # --- the whole build ------------------------------------------------------------------------

    def run(self) -> BuildSummary:
        self.out.mkdir(parents=True, exist_ok=True)
        with file_lock(self.out / ".build.lock", f"build directory {self.out}", wait=False):
            return self._run()

    def _run(self) -> BuildSummary:
        t0 = time.perf_counter()
        log.info("build '%s' → %s (%d variants, engines: %s)", self.recipe.name, self.out, len(self.recipe.variants), ", ".join(e.backend for e in self.recipe.engines))
        ctx = self.ctx
        ctx.ordered = self._dense_first()
        self._preflight(ctx.ordered)
        done: list[tuple[Stage, Any, Any]] = []
        for group in self._groups():
            for v, e in self._items(group[0]):
                for stage in group:
                    if stage.applies(ctx, v, e) and self._run_stage(stage, v, e) is not None:
                        done.append((stage, v, e))
        from pipeline.report import write_reports

        results = self._results(ctx.ordered)
        for stage, v, e in done:
            stage.contribute(ctx, results, v, e)
        write_reports(self.out, results)
        seconds = time.perf_counter() - t0
        reused = sum(s["reused"] for s in ctx.stages)
        log.info("build finished in %.1f s: %d stages reused, %d built", seconds, reused, len(ctx.stages) - reused)
        self._write_manifest(seconds)
        return BuildSummary(self.out, results, ctx.stages, seconds)

    # --- pruning only (python -m pipeline prune) -------------------------------------------------

    def prune(self, perplexity: bool = False) -> dict[str, Any]:
        """Only the model stage of every variant (block-streamed where ``model.stream`` says so): the pruned
        Hugging Face directories, without ONNX, engines or the report — for a model whose export and
        validation do not fit here. With ``perplexity``, each (and the dense model) is evaluated
        block-streamed on the evaluation windows. Writes and returns ``prune.json``."""
        from pipeline.checks import check_passes, check_streaming
        from pipeline.stages.model import STAGE as MODEL_STAGE

        self.out.mkdir(parents=True, exist_ok=True)
        with file_lock(self.out / ".build.lock", f"build directory {self.out}", wait=False):
            ctx = self.ctx
            ctx.ordered = self._dense_first()
            facts, weights = ctx.facts()
            check_passes(self.recipe, facts)
            check_streaming(self.recipe)
            from pipeline.preflight import check_prune

            check_prune(self.recipe, facts, weights, ctx.ordered, {v.name: ctx.streams(v) for v in ctx.ordered})
            rows = []
            for v in ctx.ordered:
                row: dict[str, Any] = {"variant": v.name}
                if v.passes:
                    self._run_stage(MODEL_STAGE, v, None)
                    rec = ctx.records[(v.name, MODEL_STAGE.kind)]
                    directory = self.out / v.name / "model" / "model"
                    layers = (rec.info.get("passes") or [{}])[-1].get("layers", [])
                    numel = sum(math.prod(c["shape"]) for c in layers)
                    row.update(
                        directory=str(directory), streamed=bool(rec.info.get("streamed")), seconds=rec.seconds,
                        sparsity=round(sum(math.prod(c["shape"]) * c["sparsity"] for c in layers) / max(1, numel), 6),
                    )
                else:
                    directory = ctx.dense_dir()
                    row["directory"] = str(directory)
                if perplexity:
                    row["perplexity"] = _streamed_perplexity(directory, ctx.eval_windows(), v.name)
                rows.append(row)
            from core.resources import peak_rss_bytes

            result = {"recipe": self.recipe.to_dict(), "variants": rows, "peak_rss_bytes": peak_rss_bytes(), "peak_address_space_bytes": peak_rss_bytes("VmPeak"), "environment": _environment()}
            atomic_write_json(self.out / "prune.json", result)
            return result

    # --- one worker's share of a fanned-out build (pipeline/fanout.py) ---------------------------

    def run_variant_stages(self, names: list[str]) -> list[dict[str, Any]]:
        """Only the per-variant stages (model, ONNX, KV graphs, engines, validation) of the named variants,
        into the same content-keyed stage store as a whole build; no timing stage, no report, no build lock
        (the driver of the fan-out holds it, and no two workers are given the same variant). A stage that is
        finished and intact is reused, so a retried worker resumes where its killed attempt stopped.
        Returns the stage records of this call."""
        ctx = self.ctx
        ctx.ordered = self._dense_first()
        unknown = sorted(set(names) - {v.name for v in ctx.ordered})
        if unknown:
            raise PipelineError(f"variants {unknown} are not in recipe '{self.recipe.name}'")
        for group in self._groups():
            if group[0].scope not in (Scope.VARIANT, Scope.VARIANT_ENGINE):
                continue
            for v, e in self._items(group[0]):
                if v.name in names:
                    for stage in group:
                        if stage.applies(ctx, v, e):
                            self._run_stage(stage, v, e)
        return ctx.stages

    def _dense_first(self) -> list[VariantSpec]:
        """The recipe's variants, dense first (every other variant's stages build on dense's)."""
        dense_v = next(v for v in self.recipe.variants if v.name == "dense")
        return [dense_v] + [v for v in self.recipe.variants if v.name != "dense"]

    def _groups(self) -> list[list[Stage]]:
        """The enabled stages in order; consecutive per-variant ones grouped (run variant by variant)."""
        groups: list[list[Stage]] = []
        for s in (s for s in self.stages if s.enabled(self.ctx)):
            if groups and s.scope is Scope.VARIANT and groups[-1][0].scope is Scope.VARIANT:
                groups[-1].append(s)
            else:
                groups.append([s])
        return groups

    def _items(self, stage: Stage) -> list[tuple[Any, Any]]:
        """(variant, engine) pairs a stage of this scope runs for, dense first, engines in recipe order."""
        vs, es = self.ctx.ordered, self.recipe.engines
        return {
            Scope.VARIANT: [(v, None) for v in vs],
            Scope.VARIANT_ENGINE: [(v, e) for e in es for v in vs],
            Scope.ENGINE: [(None, e) for e in es],
            Scope.BUILD: [(None, None)],
        }[stage.scope]

    def _run_stage(self, stage: Stage, v: Any, e: Any) -> Any:
        """Run one stage; any failure becomes one :class:`StageError` naming the variant, stage, engine and pass."""
        try:
            return stage.run(self.ctx, v, e)
        except StageError:
            raise
        except (LockedError, ResourceError):
            raise
        except Exception as exc:
            raise StageError(stage.kind, exc, variant=v.name if v is not None else None, engine=e.backend if e is not None else None) from exc

    def _preflight(self, ordered: list[VariantSpec]) -> None:
        """Before any stage: every check that needs no model (the same as ``pipeline check``), and the
        memory/disk estimate for the variants not exported yet."""
        from pipeline.checks import check_recipe

        check_recipe(self.recipe, self.out, source=self.ctx.source)  # the source is hashed once per build

    def _results(self, ordered: list[VariantSpec]) -> dict[str, Any]:
        """The skeleton of results.json; every stage adds its figures to it (``Stage.contribute``)."""
        skipped = {s["backend"]: s["reason"] for s in self.ctx.skips}
        variants = [
            {
                "name": v.name,
                "passes": v.to_dict()["passes"],
                "engines": {e.backend: {"status": "skipped", "reason": skipped.get(e.backend, "not built")} for e in self.recipe.engines},
            }
            for v in ordered
        ]
        return {
            "schema_version": 1,
            "tool": {"name": "prune-pipeline", "version": __version__},
            "recipe": self.recipe.to_dict(),
            "model": {"source": self.ctx.source.label, "kind": self.ctx.source.kind, "fingerprint": self.ctx.source.fingerprint},
            "data": {
                "evaluation": asdict(self.recipe.data.evaluation),
                "calibration": asdict(self.recipe.data.calibration),
                "calibration_used_by": [v.name for v in ordered if variant_uses_calibration(v)],
            },
            "environment": _environment(),
            "variants": variants,
            "skips": self.ctx.skips,
        }

    def _write_manifest(self, seconds: float) -> None:
        atomic_write_json(
            self.out / "manifest.json",
            {
                "schema_version": 1,
                "recipe": self.recipe.to_dict(),
                "model_fingerprint": self.ctx.source.fingerprint,
                "stages": self.ctx.stages,
                "skips": self.ctx.skips,
                "seconds": round(seconds, 2),
                "finished": time.time(),
                "environment": _environment(),
            },
        )


def _streamed_perplexity(directory: Path, windows: Any, name: str) -> float:
    from calibrate.streamed import streamed_logits_fn
    from pipeline.validate import perplexity

    return perplexity(streamed_logits_fn(directory, windows), windows, f"{name} perplexity (streamed)")["perplexity"]


def _environment() -> dict[str, Any]:
    import os

    env: dict[str, Any] = {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(), "cpu": cpu_info()}
    for mod in ("torch", "transformers", "onnx", "onnxruntime", "polygraphy"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:  # a missing optional module is just not reported
            env[mod] = None
    return env


ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8")
"""The /proc/cpuinfo flags that change CPU inference speed the most for these models."""


def cpu_info() -> dict[str, Any]:
    """CPU model name and the instruction sets that matter (Linux /proc/cpuinfo; platform elsewhere)."""
    model, flags = platform.processor() or None, set()
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and value.strip():
            model = value.strip()
        elif key.strip() == "flags":
            flags = set(value.split())
        if model and flags:
            break
    return {"model": model, "isa": [f for f in ISA_FLAGS if f in flags]}


def build(recipe: Recipe, out_dir: Path | None = None) -> BuildSummary:
    if not recipe.variants:
        raise PipelineError("recipe has no variants (the dense baseline is added by validation; call Recipe.validate())")
    return Builder(recipe, out_dir).run()
