"""What every stage of a build shares: the recipe, the build directory, lazily loaded inputs,
the records of finished stages, and the keys derived from them.

Each stage kind (one module beside this file, a :class:`pipeline.stages.base.Stage`) computes its
key from what is recorded here and records its outcome here. This module does not import the
recipe module: the recipe imports the stages' option classes, never the other way round.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Generic, TypeVar

from core.artifacts import StageOutcome, stable_hash
from core.resources import peak_rss_bytes

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


def variant_uses_calibration(variant: Any) -> bool:
    from passes import get_pass_class

    return any(getattr(get_pass_class(p.name), "uses_calibration", False) for p in variant.passes)


class BuildContext:
    def __init__(self, recipe: Any, out_dir: Path | None = None):
        from core.models import resolve_source

        self.recipe = recipe
        self.out = Path(out_dir or recipe.output or Path("build") / recipe.name).resolve()
        self.stages: list[dict[str, Any]] = []
        self.records: dict[tuple[str, str], Any] = {}
        self.skips: list[dict[str, Any]] = []
        self.ordered: list[Any] = []
        """The recipe's variants, dense first (set by the builder)."""
        self.unavailable: set[str] = set()
        """Backends whose engine could not be built here (recorded in ``skips``); their stages are skipped."""
        self.source = resolve_source(recipe.model.source)
        self.model_key = stable_hash("source", self.source.fingerprint, STAGE_SCHEMA)
        self.dense = Lazy(self._load_dense)
        self.tokenizer = Lazy(self._load_tokenizer)
        self.dense_dir = Lazy(self._dense_dir)
        self.facts = Lazy(self._model_facts)
        self.splits = Lazy(self._load_splits)
        self.eval_windows = Lazy(self._make_eval_windows)
        self.calib_windows = Lazy(self._make_calib_windows)
        self.memo: dict[str, Any] = {}
        """Shared between the variants of this build (e.g. importance scores a pass computed once)."""
        self._variant_models: dict[str, Any] = {}
        self._streams: dict[str, bool] = {}
        self._engines: dict[str, Any] = {}

    # --- lazily loaded inputs ---------------------------------------------------------------

    def _load_dense(self) -> Any:
        from core.models import load_model

        return load_model(self.recipe.model.source)

    def _dense_dir(self) -> Path:
        """The source model's fp32 Hugging Face directory (the GGUF's cache entry, built once)."""
        from core.models import cached_fp32_dir

        return cached_fp32_dir(self.source)

    def _model_facts(self) -> tuple[Any, int]:
        """(ModelFacts, float32 weight bytes) from the model's config alone."""
        from pipeline.checks import model_facts

        return model_facts(self.recipe, self.source)

    def _load_tokenizer(self) -> Any:
        """The dense model's tokenizer; read from its directory alone when the model is not loaded."""
        if self.dense.ready:
            return self.dense().tokenizer
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.dense_dir())

    def streams(self, v: Any) -> bool:
        """Whether variant ``v``'s passes run block-streamed (``model.stream``; see :mod:`passes.streamed`);
        decided once per variant per build."""
        if v.name not in self._streams:
            self._streams[v.name] = self._decide_streaming(v)
        return self._streams[v.name]

    def _decide_streaming(self, v: Any) -> bool:
        mode = self.recipe.model.stream
        if mode == "never" or not v.passes:
            return False
        from pipeline.preflight import stream_refusal_of, streaming_needed

        why = stream_refusal_of(v)
        if mode == "always":
            if why:
                from core.errors import RecipeError

                raise RecipeError(f"recipe key 'model.stream': 'always', but variant '{v.name}' cannot stream: {why}")
            return True
        if why is not None:
            return False
        facts, weights = self.facts()
        return streaming_needed(self.recipe, facts, weights, v)

    def _load_splits(self) -> Any:
        from calibrate.data import load_splits

        d = self.recipe.data
        return load_splits(d.source, d.eval_source, d.eval_fraction)

    def _make_eval_windows(self) -> Any:
        from calibrate.data import evaluation_windows, tokenize

        ev = self.recipe.data.evaluation
        ids = tokenize(self.tokenizer(), self.splits().evaluation)
        w = evaluation_windows(ids, ev.length, ev.windows)
        log.info("evaluation: %d windows × %d tokens (%s)", w.shape[0], w.shape[1], self.splits().description)
        return w

    def _make_calib_windows(self) -> Any:
        from calibrate.data import calibration_windows, tokenize

        c = self.recipe.data.calibration
        t0 = time.perf_counter()
        ids = tokenize(self.tokenizer(), self.splits().calibration)
        w = calibration_windows(ids, c.windows, c.length, c.seed)
        log.info("calibration: %d windows × %d tokens, seed %d (%.1f s)", w.shape[0], w.shape[1], c.seed, time.perf_counter() - t0)
        return w

    def variant_model(self, name: str) -> Any:
        """The variant's PyTorch model: the dense one, one held in memory, or one loaded from its model stage."""
        if name == "dense" and self.dense.ready:
            return self.dense().model
        if name not in self._variant_models:
            from core.models import load_hf_dir

            model, _, _ = load_hf_dir(self.out / name / "model" / "model")
            self.hold_model(name, model)
        return self._variant_models[name]

    def engine(self, e: Any) -> Any:
        """The :class:`engines.Engine` of a recipe's engine entry (one instance per backend per build)."""
        if e.backend not in self._engines:
            from engines import get_engine

            self._engines[e.backend] = get_engine(e.backend, e.options)
        return self._engines[e.backend]

    def hold_model(self, name: str, model: Any) -> None:
        self._variant_models = {name: model}  # one variant at a time

    # --- keys -----------------------------------------------------------------------------------

    def data_key(self, part: str) -> str:
        d = self.recipe.data
        return stable_hash("data", d.source, d.eval_source, d.eval_fraction, asdict(getattr(d, part)), self.model_key)

    def rebinds(self, v: Any) -> bool:
        """Whether the variant's ONNX reuses the dense graph with its own weights (no shape-changing pass)."""
        from passes import get_pass_class

        return v.name != "dense" and self.recipe.export.reuse_dense_graph and not any(get_pass_class(p.name).shapes_change(p.options) for p in v.passes)

    def content(self, variant: str, stage: str) -> str:
        """Digest of a finished stage's files: downstream keys hash what their inputs really hold."""
        rec = self.records[(variant, stage)]
        return stable_hash({k: m["sha256"] for k, m in rec.files.items()})

    # --- records --------------------------------------------------------------------------------

    def record(self, variant: str, outcome: StageOutcome) -> StageOutcome:
        self.records[(variant, outcome.path.name)] = outcome.record
        self.stages.append(
            {
                "variant": variant,
                "stage": outcome.record.stage,
                "path": str(outcome.path.relative_to(self.out)),
                "key": outcome.record.key,
                "reused": outcome.reused,
                "seconds": outcome.record.seconds,
                "peak_rss_bytes": peak_rss_bytes(),  # the process's peak so far: the stage that raised it shows
            }
        )
        return outcome
