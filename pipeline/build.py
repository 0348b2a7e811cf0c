"""The build orchestrator: variants → pruned models → ONNX → engines → validation → report.

Stages and where they live under the build directory::

    <variant>/model/                 pruned PyTorch model (safetensors + config + tokenizer), passes.json
    <variant>/onnx/                  model.onnx (+ export facts)
    <variant>/engine-<backend>/      the backend's artifact (e.g. model.ort.onnx)
    <variant>/validate-<backend>/    validation.json
    manifest.json, results.json, report.md, report.html, accuracy_latency.png

Each stage's key is a hash of its inputs' keys and its own options, computed
before any work, so a finished and intact stage is reused without loading a
model (see :mod:`pipeline.artifacts`). The report is rebuilt on every run.
"""

from __future__ import annotations

import copy
import json
import logging
import platform
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Generic, TypeVar

from pipeline import __version__
from pipeline.artifacts import StageOutcome, atomic_write_json, run_stage, stable_hash
from pipeline.errors import EngineUnavailable, PipelineError
from pipeline.recipe import EngineSpec, Recipe, VariantSpec

log = logging.getLogger(__name__)

STAGE_SCHEMA = 2
"""Bump when a stage's outputs change meaning; every cached stage is then rebuilt."""

T = TypeVar("T")


class Lazy(Generic[T]):
    """A value computed on first use (so a fully cached build never loads a model)."""

    def __init__(self, make: Callable[[], T]):
        self._make = make
        self._value: T | None = None
        self._done = False

    def __call__(self) -> T:
        if not self._done:
            self._value = self._make()
            self._done = True
        return self._value  # type: ignore[return-value]

    @property
    def ready(self) -> bool:
        return self._done


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


def _variant_uses_calibration(variant: VariantSpec) -> bool:
    from passes import get_pass_class

    return any(getattr(get_pass_class(p.name), "uses_calibration", False) for p in variant.passes)


class Builder:
    def __init__(self, recipe: Recipe, out_dir: Path | None = None):
        self.recipe = recipe
        self.out = Path(out_dir or recipe.output or Path("build") / recipe.name).resolve()
        self.stages: list[dict[str, Any]] = []
        self.records: dict[tuple[str, str], Any] = {}
        self.skips: list[dict[str, Any]] = []

        from pipeline.models import resolve_source

        self.source = resolve_source(recipe.model.source)
        self.model_key = stable_hash("source", self.source.fingerprint, STAGE_SCHEMA)
        self.dense = Lazy(self._load_dense)
        self.splits = Lazy(self._load_splits)
        self.eval_windows = Lazy(self._make_eval_windows)
        self.calib_windows = Lazy(self._make_calib_windows)
        self._variant_models: dict[str, Any] = {}
        self._memo: dict[str, Any] = {}
        """Shared between the variants of this build (e.g. structured-pruning importance scores)."""

    # --- lazily loaded inputs ---------------------------------------------------------------

    def _load_dense(self) -> Any:
        from pipeline.models import load_model

        return load_model(self.recipe.model.source)

    def dense_task(self) -> str:
        """The model's task from its config, without loading weights when the dense model is not in memory."""
        if self.dense.ready:
            return self.dense().task
        from transformers import AutoConfig

        from pipeline.adapters import adapter_for

        return adapter_for(AutoConfig.from_pretrained(self.out / "dense" / "model" / "model")).task

    def _load_splits(self) -> Any:
        from calibrate.data import load_splits

        d = self.recipe.data
        return load_splits(d.source, d.eval_source, d.eval_fraction)

    def _make_eval_windows(self) -> Any:
        from calibrate.data import evaluation_windows, tokenize

        ev = self.recipe.data.evaluation
        ids = tokenize(self.dense().tokenizer, self.splits().evaluation)
        w = evaluation_windows(ids, ev.length, ev.windows)
        log.info("evaluation: %d windows × %d tokens (%s)", w.shape[0], w.shape[1], self.splits().description)
        return w

    def _make_calib_windows(self) -> Any:
        from calibrate.data import calibration_windows, tokenize

        c = self.recipe.data.calibration
        t0 = time.perf_counter()
        ids = tokenize(self.dense().tokenizer, self.splits().calibration)
        w = calibration_windows(ids, c.windows, c.length, c.seed)
        log.info("calibration: %d windows × %d tokens, seed %d (%.1f s)", w.shape[0], w.shape[1], c.seed, time.perf_counter() - t0)
        return w

    # --- keys ---------------------------------------------------------------------------------

    def _data_key(self, part: str) -> str:
        d = self.recipe.data
        return stable_hash("data", d.source, d.eval_source, d.eval_fraction, asdict(getattr(d, part)), self.model_key)

    def model_stage_key(self, v: VariantSpec) -> str:
        calib = self._data_key("calibration") if _variant_uses_calibration(v) else None
        return stable_hash("model", self.model_key, v.to_dict()["passes"], calib, STAGE_SCHEMA)

    def rebinds(self, v: VariantSpec) -> bool:
        """Whether the variant's ONNX reuses the dense graph with its own weights (no shape-changing pass)."""
        from passes import get_pass_class

        return v.name != "dense" and self.recipe.export.reuse_dense_graph and not any(get_pass_class(p.name).shapes_change(p.options) for p in v.passes)

    def _content(self, variant: str, stage: str) -> str:
        """Digest of a finished stage's files: downstream keys hash what their inputs really hold."""
        rec = self.records[(variant, stage)]
        return stable_hash({k: m["sha256"] for k, m in rec.files.items()})

    def export_key(self, v: VariantSpec) -> str:
        dense_graph = self._content("dense", "onnx") if self.rebinds(v) else None
        return stable_hash("export", self._content(v.name, "model"), self._export_options(), dense_graph, STAGE_SCHEMA)

    def _export_options(self) -> dict[str, Any]:
        return {k: val for k, val in asdict(self.recipe.export).items() if k != "kv_cache"}

    def engine_key(self, v: VariantSpec, e: EngineSpec, engine: Any) -> str:
        return stable_hash("engine", self._content(v.name, "onnx"), e.to_dict(), engine.version_info(), STAGE_SCHEMA)

    # --- stages ---------------------------------------------------------------------------------

    def _record(self, variant: str, outcome: StageOutcome) -> None:
        self.records[(variant, outcome.path.name)] = outcome.record
        self.stages.append(
            {
                "variant": variant,
                "stage": outcome.record.stage,
                "path": str(outcome.path.relative_to(self.out)),
                "key": outcome.record.key,
                "reused": outcome.reused,
                "seconds": outcome.record.seconds,
            }
        )

    def variant_model(self, v: VariantSpec) -> Any:
        """The variant's PyTorch model, from memory or from its finished model stage."""
        if v.name not in self._variant_models:
            from pipeline.models import load_hf_dir

            model, _, _ = load_hf_dir(self.out / v.name / "model" / "model")
            self._variant_models = {v.name: model}  # hold one variant at a time
        return self._variant_models[v.name]

    def stage_model(self, v: VariantSpec) -> StageOutcome:
        def build(tmp: Path) -> dict[str, Any]:
            from passes import PassContext, get_pass_class
            from pipeline.models import save_hf_dir

            dense = self.dense()
            model = copy.deepcopy(dense.model)
            ctx = PassContext(
                dense.adapter,
                calibration=self.calib_windows,
                seed=self.recipe.data.calibration.seed,
                teacher=lambda: dense.model,
                work_dir=work_dir,
                memo=self._memo,
            )
            results = []
            calib = self._data_key("calibration")
            for i, p in enumerate(v.passes):
                ctx.prefix_key = stable_hash("prefix", self.model_key, calib, [q.to_dict() for q in v.passes[:i]])
                cls = get_pass_class(p.name)
                ps = cls(cls.config_class(**p.options))
                t0 = time.perf_counter()
                r = ps.run(model, ctx)
                log.info("%s: pass '%s' took %.1f s", v.name, p.name, time.perf_counter() - t0)
                results.append(r.to_dict())
            save_hf_dir(model, dense.tokenizer, tmp / "model")
            (tmp / "passes.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
            self._variant_models = {v.name: model}
            return {"passes": [{"name": r["name"], "seconds": r["seconds"], "info": r["info"]} for r in results]}

        key = self.model_stage_key(v)
        # survives an interrupted stage (e.g. recovery checkpoints); keyed so other settings never resume it
        work_dir = self.out / v.name / f"model.work-{key[:12]}"
        out = run_stage(self.out / v.name / "model", f"{v.name}/model", key, {"passes": v.to_dict()["passes"]}, build)
        shutil.rmtree(work_dir, ignore_errors=True)
        self._record(v.name, out)
        return out

    def stage_export(self, v: VariantSpec) -> StageOutcome:
        def build(tmp: Path) -> dict[str, Any]:
            from export.graph import make_passes, rewrite_file
            from export.onnx_export import RebindError, export_onnx, rebind_weights

            spec = self.recipe.export
            model = self.variant_model(v)
            # With graph passes, the exporter's graph (parameter-named weights) is kept as raw.onnx for
            # the dense variant, so shape-preserving variants can rebind into it before their own rewrite.
            raw = tmp / ("raw.onnx" if spec.graph_passes else "model.onnx")
            info: dict[str, Any] | None = None
            if self.rebinds(v):
                required = [f"{r.name}.weight" for r in self.dense().adapter.linears(model)]
                src = self.out / "dense" / "onnx" / ("raw.onnx" if spec.graph_passes else "model.onnx")
                try:
                    info = rebind_weights(src, model, required, raw)
                except RebindError as exc:
                    log.warning("%s: cannot reuse the dense graph (%s); exporting afresh", v.name, exc)
            if info is None:
                info = export_onnx(model, self.dense().task, raw, spec.opset, spec.exporter)
            if spec.graph_passes:
                from passes.structure import head_dim

                hd = head_dim(self.dense().adapter, model.config)
                info["graph_passes"] = rewrite_file(raw, tmp / "model.onnx", make_passes(spec.graph_passes, hd))
                info["onnx_bytes"] = (tmp / "model.onnx").stat().st_size
                if v.name != "dense":
                    raw.unlink()
            return info

        out = run_stage(self.out / v.name / "onnx", f"{v.name}/onnx", self.export_key(v), self._export_options(), build)
        self._record(v.name, out)
        return out

    def stage_engine(self, v: VariantSpec, e: EngineSpec) -> StageOutcome | None:
        from engines import get_engine

        engine = get_engine(e.backend, e.options)
        try:
            engine.check_available()
        except EngineUnavailable as exc:
            log.warning("%s: %s — recorded as a skip", v.name, exc)
            self.skips.append({"variant": v.name, "backend": e.backend, "reason": exc.reason})
            return None

        def build(tmp: Path) -> dict[str, Any]:
            art = engine.build(self.out / v.name / "onnx" / "model.onnx", tmp)
            return {"artifact": art.path.name, **art.info}

        out = run_stage(self.out / v.name / f"engine-{e.backend}", f"{v.name}/engine-{e.backend}", self.engine_key(v, e, engine), e.to_dict(), build)
        self._record(v.name, out)
        return out

    def validate_key(self, v: VariantSpec, e: EngineSpec, dense_v: VariantSpec) -> str:
        engine_stage = f"engine-{e.backend}"
        return stable_hash(
            "validate",
            self._content(v.name, "model"),
            self._content(v.name, engine_stage),
            self._content(dense_v.name, "model"),
            self._content(dense_v.name, engine_stage),
            self._data_key("evaluation"),
            self._validation_options(),
            STAGE_SCHEMA,
        )

    def _validation_options(self) -> dict[str, Any]:
        """Validation options a per-variant stage depends on (latency has its own stage)."""
        return {k: v for k, v in asdict(self.recipe.validation).items() if k not in ("latency", "decode")}

    def stage_validate(self, v: VariantSpec, e: EngineSpec, dense_v: VariantSpec) -> StageOutcome:
        from engines import EngineArtifact, get_engine

        engine = get_engine(e.backend, e.options)
        spec = self.recipe.validation

        def artifact(variant: VariantSpec) -> EngineArtifact:
            d = self.out / variant.name / f"engine-{e.backend}"
            info = json.loads((d / "stage.json").read_text())["info"]
            return EngineArtifact(e.backend, d / info["artifact"], info)

        def build(tmp: Path) -> dict[str, Any]:
            import numpy as np

            from pipeline import validate as V

            dense = self.dense()
            task = dense.task
            output = "logits" if task == "causal-lm" else "last_hidden_state"
            model = dense.model if v.name == "dense" else self.variant_model(v)
            windows = self.eval_windows()
            result: dict[str, Any] = {"variant": v.name, "backend": e.backend, "task": task}
            result["size"] = V.size_stats(model, dense.adapter)
            result["size"]["onnx_bytes"] = _dir_bytes(self.out / v.name / "onnx", "model.onnx*")
            result["size"]["engine_bytes"] = artifact(v).path.stat().st_size
            torch_fn = V.torch_outputs_fn(model, task)
            art = artifact(v)
            n_agree = min(spec.agreement_windows, windows.shape[0]) if v.name != "dense" else 0
            dense_fn = V.torch_outputs_fn(dense.model, task) if n_agree else None
            if task == "causal-lm" and spec.perplexity:
                result["perplexity_torch"], agr = V.perplexity_with_agreement(torch_fn, dense_fn, windows, n_agree, f"{v.name} ppl (torch)")
                if agr is not None:
                    result["agreement"] = agr
                with engine.runner(art) as runner:
                    engine_fn = V.runner_outputs_fn(runner, output)
                    result["perplexity_engine"] = V.perplexity(engine_fn, windows, f"{v.name} ppl ({e.backend})")
                pt, pe = result["perplexity_torch"]["perplexity"], result["perplexity_engine"]["perplexity"]
                result["perplexity_engine_vs_torch"] = pe / pt - 1
                log.info("%s: perplexity torch %.3f, %s %.3f (%+.4f%%)", v.name, pt, e.backend, pe, 100 * (pe / pt - 1))
            elif n_agree:
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
            result["parity"] = V.parity(model, task, art.path, output, feeds, p.atol, p.rtol)
            if not result["parity"]["passed"]:
                log.warning("%s: engine/PyTorch parity FAILED (max |Δ| %.3g)", v.name, result["parity"]["max_absdiff"])
            (tmp / "validation.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
            return {"summary": _validation_summary(result)}

        key = self.validate_key(v, e, dense_v)
        out = run_stage(self.out / v.name / f"validate-{e.backend}", f"{v.name}/validate-{e.backend}", key, self._validation_options(), build)
        self._record(v.name, out)
        return out

    def stage_latency(self, e: EngineSpec, ordered: list[VariantSpec]) -> StageOutcome | None:
        """Prefill latency of every variant's engine, interleaved round-robin in one process."""
        from engines import EngineArtifact, get_engine

        lat = self.recipe.validation.latency
        if lat is None:
            return None
        engine = get_engine(e.backend, e.options)
        stage = f"engine-{e.backend}"
        key = stable_hash("latency", [(v.name, self._content(v.name, stage)) for v in ordered], asdict(lat), STAGE_SCHEMA)

        def build(tmp: Path) -> dict[str, Any]:
            from contextlib import ExitStack

            from pipeline import validate as V

            shapes = [(b, s) for b in lat.batch_sizes for s in lat.sequence_lengths]
            vocab = int(json.loads((self.out / "dense" / "model" / "model" / "config.json").read_text()).get("vocab_size", 1000))
            with ExitStack() as stack:
                runners = {}
                for v in ordered:
                    d = self.out / v.name / stage
                    info = json.loads((d / "stage.json").read_text())["info"]
                    art = EngineArtifact(e.backend, d / info["artifact"], info)
                    runners[v.name] = stack.enter_context(engine.runner(art, threads=lat.threads, spinning=False))
                points = V.interleaved_latency(runners, shapes, vocab, lat.warmup, lat.repeats, baseline="dense")
            out = {
                "backend": e.backend,
                "warmup": lat.warmup,
                "repeats": lat.repeats,
                "threads": lat.threads,
                "order": "round-robin over all variants, starting runner rotating per repeat",
                "variants": {n: [p.to_dict() for p in pts] for n, pts in points.items()},
            }
            (tmp / "latency.json").write_text(json.dumps(out, indent=2), encoding="utf-8")
            return {"variants": list(points)}

        out = run_stage(self.out / f"latency-{e.backend}", f"all/latency-{e.backend}", key, asdict(lat), build)
        self._record("all", out)
        return out

    def stage_kv(self, v: VariantSpec) -> StageOutcome:
        """Prefill + decode graphs with a KV cache; shape-preserving variants rebind the dense ones."""
        dense_graphs = self._content("dense", "kv") if self.rebinds(v) else None
        key = stable_hash("kv", self._content(v.name, "model"), self.recipe.export.opset, dense_graphs, STAGE_SCHEMA)

        def build(tmp: Path) -> dict[str, Any]:
            from export.kv_export import export_kv_graphs
            from export.onnx_export import RebindError, rebind_weights

            model = self.dense().model if v.name == "dense" else self.variant_model(v)
            adapter = self.dense().adapter
            if self.rebinds(v):
                required = [f"{r.name}.weight" for r in adapter.linears(model)]
                try:
                    return {g: rebind_weights(self.out / "dense" / "kv" / f"{g}.onnx", model, required, tmp / f"{g}.onnx") for g in ("prefill", "decode")}
                except RebindError as exc:
                    log.warning("%s: cannot reuse the dense KV graphs (%s); exporting afresh", v.name, exc)
            return export_kv_graphs(model, adapter, tmp, self.recipe.export.opset)

        out = run_stage(self.out / v.name / "kv", f"{v.name}/kv", key, {"opset": self.recipe.export.opset}, build)
        self._record(v.name, out)
        return out

    def stage_decode(self, ordered: list[VariantSpec]) -> StageOutcome:
        """Greedy-decode parity with PyTorch generate and decode latency, every variant, ONNX Runtime CPU."""
        spec = self.recipe.validation.decode
        key = stable_hash(
            "decode", [(v.name, self._content(v.name, "kv"), self._content(v.name, "model")) for v in ordered], asdict(spec), self._data_key("evaluation"), STAGE_SCHEMA
        )

        def build(tmp: Path) -> dict[str, Any]:
            import statistics
            from contextlib import ExitStack

            from engines.onnxruntime import OnnxRuntimeCpuEngine
            from export.kv_export import cache_layout, compare_with_generate, decode_timing, greedy_generate
            from pipeline.validate import round_robin

            dense = self.dense()
            windows = self.eval_windows()
            prompt = windows.reshape(-1)[: spec.prompt][None].numpy()
            ort_cpu = OnnxRuntimeCpuEngine({})
            result: dict[str, Any] = {"prompt_tokens": int(prompt.shape[1]), "batch": 1, "runtime": "onnxruntime-cpu", "variants": {}}
            with ExitStack() as stack:
                runners, layouts = {}, {}
                for v in ordered:
                    kv = self.out / v.name / "kv"
                    # no intra-op spinning: the sessions alternate, as in the prefill latency stage
                    pre = stack.enter_context(ort_cpu.open(kv / "prefill.onnx", spinning=False, name=f"{v.name}:prefill"))
                    dec = stack.enter_context(ort_cpu.open(kv / "decode.onnx", spinning=False, name=f"{v.name}:decode"))
                    runners[v.name] = (pre, dec)
                    model = dense.model if v.name == "dense" else self.variant_model(v)
                    layouts[v.name] = lay = cache_layout(model, dense.adapter)
                    cmp = compare_with_generate(greedy_generate(pre, dec, lay, prompt, spec.greedy_tokens), model, prompt)
                    cmp.pop("max_abs_logit_delta_per_step")
                    result["variants"][v.name] = cmp
                    log.info("%s: greedy decode tokens identical %s, max |Δlogit| %.2e", v.name, cmp["tokens_identical"], cmp["max_abs_logit_delta"])
                for name in runners:  # warm-up
                    greedy_generate(*runners[name], layouts[name], prompt, 4)
                samples = round_robin(list(runners), spec.repeats, lambda n: decode_timing(*runners[n], layouts[n], prompt, spec.new_tokens))
            base = {m: statistics.median(samples["dense"][m]) for m in ("decode_ms_per_token", "prefill_ms")}
            for n, smp in samples.items():
                med = {m: statistics.median(smp[m]) for m in smp}
                result["variants"][n].update(
                    {
                        "new_tokens": spec.new_tokens,
                        "decode_ms_per_token": round(med["decode_ms_per_token"], 3),
                        "prefill_ms": round(med["prefill_ms"], 3),
                        "decode_ratio": round(med["decode_ms_per_token"] / base["decode_ms_per_token"], 4),
                        "prefill_ratio": round(med["prefill_ms"] / base["prefill_ms"], 4),
                        "samples": smp,
                    }
                )
            (tmp / "decode.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
            return {"variants": list(samples)}

        out = run_stage(self.out / "decode-onnxruntime-cpu", "all/decode-onnxruntime-cpu", key, asdict(spec), build)
        self._record("all", out)
        return out

    # --- the whole build ------------------------------------------------------------------------

    def run(self) -> BuildSummary:
        t0 = time.perf_counter()
        self.out.mkdir(parents=True, exist_ok=True)
        log.info("build '%s' → %s (%d variants, engines: %s)", self.recipe.name, self.out, len(self.recipe.variants), ", ".join(e.backend for e in self.recipe.engines))
        dense_v = next(v for v in self.recipe.variants if v.name == "dense")
        ordered = [dense_v] + [v for v in self.recipe.variants if v.name != "dense"]
        validated: dict[tuple[str, str], Path] = {}
        # Models and exports for every variant first (a variant may reuse the dense graph), then
        # engines, then per-variant validation, then one latency stage per backend that times
        # every variant's engine interleaved with the dense one.
        for v in ordered:
            self.stage_model(v)
            self.stage_export(v)
            if self.recipe.export.kv_cache:
                if self.dense_task() != "causal-lm":
                    raise PipelineError("export.kv_cache is for causal LMs; this model is an encoder")
                self.stage_kv(v)
        available = []
        for e in self.recipe.engines:
            ok = True
            for v in ordered:
                if self.stage_engine(v, e) is None:
                    ok = False
                    break
            if ok:
                available.append(e)
        latency: dict[str, Path] = {}
        for e in available:
            for v in ordered:
                validated[(v.name, e.backend)] = self.stage_validate(v, e, dense_v).path / "validation.json"
            lat = self.stage_latency(e, ordered)
            if lat is not None:
                latency[e.backend] = lat.path / "latency.json"
        decode = self.stage_decode(ordered).path / "decode.json" if self.recipe.validation.decode else None
        from pipeline.report import write_reports

        results = self._results(ordered, validated, latency)
        if decode is not None:
            per = json.loads(decode.read_text(encoding="utf-8"))
            results["decode"] = {k: val for k, val in per.items() if k != "variants"}
            for v in results["variants"]:
                v["decode"] = per["variants"].get(v["name"])
        write_reports(self.out, results)
        seconds = time.perf_counter() - t0
        reused = sum(s["reused"] for s in self.stages)
        log.info("build finished in %.1f s: %d stages reused, %d built", seconds, reused, len(self.stages) - reused)
        self._write_manifest(seconds)
        return BuildSummary(self.out, results, self.stages, seconds)

    def _results(self, ordered: list[VariantSpec], validated: dict[tuple[str, str], Path], latency: dict[str, Path]) -> dict[str, Any]:
        from pipeline.artifacts import load_stage

        lat = {b: json.loads(p.read_text(encoding="utf-8")) for b, p in latency.items()}

        variants = []
        for v in ordered:
            mrec = load_stage(self.out / v.name / "model")
            orec = load_stage(self.out / v.name / "onnx")
            engines = {}
            for e in self.recipe.engines:
                path = validated.get((v.name, e.backend))
                if path is None:
                    skip = next((s for s in self.skips if s["backend"] == e.backend), None)
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
            "model": {"source": self.source.label, "kind": self.source.kind, "fingerprint": self.source.fingerprint},
            "data": {
                "evaluation": asdict(self.recipe.data.evaluation),
                "calibration": asdict(self.recipe.data.calibration),
                "calibration_used_by": [v.name for v in ordered if _variant_uses_calibration(v)],
            },
            "environment": _environment(),
            "variants": variants,
            "skips": self.skips,
        }

    def _write_manifest(self, seconds: float) -> None:
        atomic_write_json(
            self.out / "manifest.json",
            {
                "schema_version": 1,
                "recipe": self.recipe.to_dict(),
                "model_fingerprint": self.source.fingerprint,
                "stages": self.stages,
                "skips": self.skips,
                "seconds": round(seconds, 2),
                "finished": time.time(),
                "environment": _environment(),
            },
        )


def _dir_bytes(d: Path, pattern: str) -> int:
    return sum(p.stat().st_size for p in d.glob(pattern) if p.is_file())


def _validation_summary(r: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "perplexity_engine" in r:
        out["perplexity_engine"] = r["perplexity_engine"]["perplexity"]
        out["perplexity_torch"] = r["perplexity_torch"]["perplexity"]
    if "parity" in r:
        out["parity_passed"] = r["parity"]["passed"]
    return out


def _environment() -> dict[str, Any]:
    import os

    env: dict[str, Any] = {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count()}
    for mod in ("torch", "transformers", "onnx", "onnxruntime", "polygraphy"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:  # a missing optional module is just not reported
            env[mod] = None
    return env


def build(recipe: Recipe, out_dir: Path | None = None) -> BuildSummary:
    if not recipe.variants:
        raise PipelineError("recipe has no variants (the dense baseline is added by validation; call Recipe.validate())")
    return Builder(recipe, out_dir).run()
