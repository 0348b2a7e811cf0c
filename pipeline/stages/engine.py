"""Stage ``<variant>/engine-<backend>/``: the backend's artifact built from the variant's ONNX
(e.g. ONNX Runtime's optimised model). An unavailable backend is recorded as a skip, and every
later stage of that backend is skipped with it."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from core.artifacts import StageOutcome, stable_hash
from core.errors import EngineUnavailable
from pipeline.stages.base import Scope, Stage
from pipeline.stages.context import STAGE_SCHEMA, BuildContext

log = logging.getLogger(__name__)


def artifact(ctx: BuildContext, variant: str, backend: str) -> Any:
    """The finished engine artifact of ``variant`` for ``backend``."""
    from engines import EngineArtifact

    d = ctx.out / variant / f"engine-{backend}"
    info = json.loads((d / "stage.json").read_text(encoding="utf-8"))["info"]
    return EngineArtifact(backend, d / info["artifact"], info)


class EngineStage(Stage):
    kind = "engine"
    scope = Scope.VARIANT_ENGINE

    @staticmethod
    def source(ctx: BuildContext, v: Any, e: Any) -> tuple[str, Path]:
        """The stage the engine builds from and the path it is given: the ONNX graph, or the saved model."""
        if getattr(ctx.engine(e), "source", "onnx") == "model":
            return "model", ctx.out / v.name / "model" / "model"
        return "onnx", ctx.out / v.name / "onnx" / "model.onnx"

    def key(self, ctx: BuildContext, v: Any, e: Any) -> str:
        stage, _ = self.source(ctx, v, e)
        return stable_hash("engine", ctx.content(v.name, stage), e.to_dict(), ctx.engine(e).version_info(), STAGE_SCHEMA)

    def options(self, ctx: BuildContext, v: Any, e: Any) -> dict[str, Any]:
        return e.to_dict()

    def build(self, ctx: BuildContext, tmp: Path, v: Any, e: Any) -> dict[str, Any]:
        art = ctx.engine(e).build(self.source(ctx, v, e)[1], tmp)
        return {"artifact": art.path.name, **art.info}

    def run(self, ctx: BuildContext, v: Any = None, e: Any = None) -> StageOutcome | None:
        try:
            ctx.engine(e).check_available()
        except EngineUnavailable as exc:
            log.warning("%s: %s — recorded as a skip", v.name, exc)
            ctx.skips.append({"variant": v.name, "backend": e.backend, "reason": exc.reason})
            ctx.unavailable.add(e.backend)
            return None
        return super().run(ctx, v, e)


STAGE = EngineStage()
