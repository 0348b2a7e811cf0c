"""Stage ``<variant>/kv/``: prefill + decode graphs with an explicit KV cache (causal LMs);
shape-preserving variants rebind their weights into the dense graphs."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from core.artifacts import StageOutcome, run_stage, stable_hash
from core.errors import PipelineError
from pipeline.stages.context import STAGE_SCHEMA, BuildContext

log = logging.getLogger(__name__)


def key(ctx: BuildContext, v: Any) -> str:
    dense_graphs = ctx.content("dense", "kv") if ctx.rebinds(v) else None
    return stable_hash("kv", ctx.content(v.name, "model"), ctx.recipe.export.opset, dense_graphs, STAGE_SCHEMA)


def run(ctx: BuildContext, v: Any) -> StageOutcome:
    if ctx.dense_task() != "causal-lm":
        raise PipelineError("export.kv_cache is for causal LMs; this model is an encoder")

    def build(tmp: Path) -> dict[str, Any]:
        from export.kv_export import export_kv_graphs
        from export.onnx_export import RebindError, rebind_weights

        model = ctx.dense().model if v.name == "dense" else ctx.variant_model(v.name)
        adapter = ctx.dense().adapter
        if ctx.rebinds(v):
            required = [f"{r.name}.weight" for r in adapter.linears(model)]
            try:
                return {g: rebind_weights(ctx.out / "dense" / "kv" / f"{g}.onnx", model, required, tmp / f"{g}.onnx", dense=ctx.dense().model) for g in ("prefill", "decode")}
            except RebindError as exc:
                log.warning("%s: cannot reuse the dense KV graphs (%s); exporting afresh", v.name, exc)
        return export_kv_graphs(model, adapter, tmp, ctx.recipe.export.opset)

    out = run_stage(ctx.out / v.name / "kv", f"{v.name}/kv", key(ctx, v), {"opset": ctx.recipe.export.opset}, build)
    return ctx.record(v.name, out)
