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
module in ``pipeline/stages/`` and one line in :meth:`Builder.run`.
"""

from __future__ import annotations

import json
import logging
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from core.artifacts import atomic_write_json, file_lock, load_stage
from core.errors import PipelineError
from pipeline import __version__
from pipeline.recipe import Recipe, VariantSpec
from pipeline.stages import decode, engine, kv, latency, model, onnx, validate
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


class Builder:
    def __init__(self, recipe: Recipe, out_dir: Path | None = None):
        self.recipe = recipe
        self.ctx = BuildContext(recipe, out_dir)
        self.out = self.ctx.out

    # --- the whole build ------------------------------------------------------------------------

    def run(self) -> BuildSummary:
        self.out.mkdir(parents=True, exist_ok=True)
        with file_lock(self.out / ".build.lock", f"build directory {self.out}", wait=False):
            return self._run()

    def _run(self) -> BuildSummary:
        t0 = time.perf_counter()
        log.info("build '%s' → %s (%d variants, engines: %s)", self.recipe.name, self.out, len(self.recipe.variants), ", ".join(e.backend for e in self.recipe.engines))
        dense_v = next(v for v in self.recipe.variants if v.name == "dense")
        ordered = [dense_v] + [v for v in self.recipe.variants if v.name != "dense"]
        validated: dict[tuple[str, str], Path] = {}
        # Models and exports for every variant first (a variant may reuse the dense graph), then
        # engines, then per-variant validation, then one latency stage per backend that times
        # every variant's engine interleaved with the dense one.
        ctx = self.ctx
        self._preflight(ordered)
        for v in ordered:
            model.run(ctx, v)
            onnx.run(ctx, v)
            if self.recipe.export.kv_cache:
                kv.run(ctx, v)
        available = [e for e in self.recipe.engines if all(engine.run(ctx, v, e) is not None for v in ordered)]
        timings: dict[str, Path] = {}
        for e in available:
            for v in ordered:
                validated[(v.name, e.backend)] = validate.run(ctx, v, e).path / "validation.json"
            lat = latency.run(ctx, e, ordered)
            if lat is not None:
                timings[e.backend] = lat.path / "latency.json"
        decoded = decode.run(ctx, ordered).path / "decode.json" if self.recipe.validation.decode else None
        from pipeline.report import write_reports

        results = self._results(ordered, validated, timings)
        if decoded is not None:
            per = json.loads(decoded.read_text(encoding="utf-8"))
            results["decode"] = {k: val for k, val in per.items() if k != "variants"}
            for v in results["variants"]:
                v["decode"] = per["variants"].get(v["name"])
        write_reports(self.out, results)
        seconds = time.perf_counter() - t0
        reused = sum(s["reused"] for s in ctx.stages)
        log.info("build finished in %.1f s: %d stages reused, %d built", seconds, reused, len(ctx.stages) - reused)
        self._write_manifest(seconds)
        return BuildSummary(self.out, results, ctx.stages, seconds)

    def _preflight(self, ordered: list[VariantSpec]) -> None:
        """Refuse a build that would not fit in memory or on disk, before its expensive stages."""
        from passes import get_pass_class

        from pipeline import preflight

        todo = [v for v in ordered if not (self.out / v.name / "onnx" / "stage.json").is_file()]
        if not todo:
            return  # everything exported already: the rest is validation of finished stages
        found = self.ctx.model_config()
        if found is None:  # a GGUF not dequantised yet: checked as soon as the model cache is built
            self.ctx.after_dense_load.append(lambda: self._preflight(ordered))
            return
        config, weights_bytes = found
        uses = [get_pass_class(p.name) for v in todo for p in v.passes]
        trains = any(getattr(c, "trains", False) for c in uses)
        calibrates = any(getattr(c, "uses_calibration", False) for c in uses)
        copies = max((getattr(c, "state_copies", 0) for c in uses), default=0)
        est = preflight.estimate(self.recipe, config, weights_bytes, todo, trains, calibrates, copies)
        preflight.check(est, self.out)

    def _results(self, ordered: list[VariantSpec], validated: dict[tuple[str, str], Path], timings: dict[str, Path]) -> dict[str, Any]:
        lat = {b: json.loads(p.read_text(encoding="utf-8")) for b, p in timings.items()}

        variants = []
        for v in ordered:
            mrec = load_stage(self.out / v.name / "model")
            orec = load_stage(self.out / v.name / "onnx")
            engines = {}
            for e in self.recipe.engines:
                path = validated.get((v.name, e.backend))
                if path is None:
                    skip = next((s for s in self.ctx.skips if s["backend"] == e.backend), None)
                    engines[e.backend] = {"status": "skipped", "reason": skip["reason"] if skip else "not built"}
                else:
                    engines[e.backend] = {"status": "ok", **json.loads(path.read_text(encoding="utf-8"))}
                    if e.backend in lat:
                        L = lat[e.backend]
                        engines[e.backend]["latency"] = {
                            "points": L["variants"][v.name],
                            **{k: L[k] for k in ("warmup", "repeats", "threads", "order")},
                        }
            variants.append({"name": v.name, "passes": v.to_dict()["passes"], "pass_results": mrec.info.get("passes", []), "export": orec.info, "engines": engines})
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
