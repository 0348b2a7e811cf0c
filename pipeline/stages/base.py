"""The one stage protocol every stage kind follows.

A stage declares

- its ``kind`` (the directory name: ``model``, ``onnx``, ``engine-<backend>``, …) and its
  ``scope``: once per variant, per variant × engine, per engine, or once per build;
- ``enabled(ctx)`` — whether the recipe asks for it at all, and ``applies(ctx, v, e)`` — whether it
  runs for this variant/engine (an engine recorded as unavailable is skipped downstream);
- ``key(ctx, v, e)`` — a hash of everything its output depends on, computed before any work;
- ``options(ctx, v, e)`` — what ``stage.json`` records as its options;
- ``build(ctx, tmp, v, e)`` — writes its outputs into ``tmp`` and returns the info stored in
  ``stage.json``;
- ``contribute(ctx, results, v, e)`` — what it adds to ``results.json``, read back from its
  finished outputs (so a reused stage contributes exactly what a fresh one does).

:class:`pipeline.build.Builder` loops over one list of stages (``pipeline.build.STAGES``): adding
a stage kind is one module with a :class:`Stage` subclass and one entry in that list. Stage modules
never import the recipe module (the recipe imports their option classes), so the two stay out of
each other's way.
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Any, ClassVar

from core.artifacts import StageOutcome, run_stage
from pipeline.stages.context import BuildContext


class Scope(enum.Enum):
    VARIANT = "variant"
    VARIANT_ENGINE = "variant × engine"
    ENGINE = "engine"
    BUILD = "build"


class Stage:
    kind: ClassVar[str]
    """Directory name of the stage's output (an engine-scoped stage appends ``-<backend>``)."""
    scope: ClassVar[Scope]

    def enabled(self, ctx: BuildContext) -> bool:
        return True

    def applies(self, ctx: BuildContext, v: Any, e: Any) -> bool:
        return e is None or e.backend not in ctx.unavailable

    def name(self, e: Any) -> str:
        """The output directory's name: ``kind``, or ``kind-<backend>`` for an engine-scoped stage."""
        return f"{self.kind}-{e.backend}" if e is not None else self.kind

    def path(self, ctx: BuildContext, v: Any, e: Any) -> Path:
        return ctx.out / v.name / self.name(e) if v is not None else ctx.out / self.name(e)

    def owner(self, v: Any) -> str:
        """The record's variant: the variant's name, or 'all' for a stage that covers every variant."""
        return v.name if v is not None else "all"

    def key(self, ctx: BuildContext, v: Any, e: Any) -> str:
        raise NotImplementedError

    def options(self, ctx: BuildContext, v: Any, e: Any) -> dict[str, Any]:
        return {}

    def build(self, ctx: BuildContext, tmp: Path, v: Any, e: Any) -> dict[str, Any]:
        raise NotImplementedError

    def contribute(self, ctx: BuildContext, results: dict[str, Any], v: Any, e: Any) -> None:
        """Add this stage's figures to ``results`` (the dict written as results.json)."""

    def run(self, ctx: BuildContext, v: Any = None, e: Any = None) -> StageOutcome | None:
        """Reuse the finished stage or build it, and record it; None when it was skipped."""
        out = run_stage(
            self.path(ctx, v, e), f"{self.owner(v)}/{self.name(e)}", self.key(ctx, v, e), self.options(ctx, v, e),
            lambda tmp: self.build(ctx, tmp, v, e),
        )
        return ctx.record(self.owner(v), out)


def variant_entry(results: dict[str, Any], name: str) -> dict[str, Any]:
    """The ``results['variants']`` entry of variant ``name``."""
    return next(x for x in results["variants"] if x["name"] == name)
