"""Stage ``<variant>/engine-<backend>/``: the backend's artifact built from the variant's ONNX
(e.g. ONNX Runtime's optimised model). An unavailable backend is recorded as a skip."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, TYPE_CHECKING

from core.artifacts import StageOutcome, run_stage, stable_hash
from core.errors import EngineUnavailable
from pipeline.stages.context import STAGE_SCHEMA, BuildContext

if TYPE_CHECKING:
    from pipeline.recipe import EngineSpec

log = logging.getLogger(__name__)


def key(ctx: BuildContext, v: Any, e: EngineSpec, engine: Any) -> str:
    return stable_hash("engine", ctx.content(v.name, "onnx"), e.to_dict(), engine.version_info(), STAGE_SCHEMA)


def artifact(ctx: BuildContext, variant: str, backend: str) -> Any:
    """The finished engine artifact of ``variant`` for ``backend``."""
    from engines import EngineArtifact

    d = ctx.out / variant / f"engine-{backend}"
    info = json.loads((d / "stage.json").read_text(encoding="utf-8"))["info"]
    return EngineArtifact(backend, d / info["artifact"], info)


def run(ctx: BuildContext, v: Any, e: EngineSpec) -> StageOutcome | None:
    from engines import get_engine

    engine = get_engine(e.backend, e.options)
    try:
        engine.check_available()
    except EngineUnavailable as exc:
        log.warning("%s: %s — recorded as a skip", v.name, exc)
        ctx.skips.append({"variant": v.name, "backend": e.backend, "reason": exc.reason})
        return None

    def build(tmp: Path) -> dict[str, Any]:
        art = engine.build(ctx.out / v.name / "onnx" / "model.onnx", tmp)
        return {"artifact": art.path.name, **art.info}

    out = run_stage(ctx.out / v.name / f"engine-{e.backend}", f"{v.name}/engine-{e.backend}", key(ctx, v, e, engine), e.to_dict(), build)
    return ctx.record(v.name, out)
