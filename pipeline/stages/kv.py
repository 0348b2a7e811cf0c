"""Stage ``<variant>/kv/``: prefill + decode graphs with an explicit KV cache (causal LMs);
shape-preserving variants rebind their weights into the dense graphs."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from core.artifacts import stable_hash
from pipeline.stages.base import Scope, Stage
from pipeline.stages.context import STAGE_SCHEMA, BuildContext
from pipeline.stages.onnx import quantization_of

log = logging.getLogger(__name__)


class KvStage(Stage):
    kind = "kv"
    scope = Scope.VARIANT

    def enabled(self, ctx: BuildContext) -> bool:
        return ctx.recipe.export.kv_cache

    def key(self, ctx: BuildContext, v: Any, e: Any = None) -> str:
        dense_graphs = ctx.content("dense", "kv") if ctx.rebinds(v) else None
        return stable_hash("kv", ctx.content(v.name, "model"), ctx.recipe.export.opset, dense_graphs, STAGE_SCHEMA)

    def options(self, ctx: BuildContext, v: Any = None, e: Any = None) -> dict[str, Any]:
        return {"opset": ctx.recipe.export.opset}

    def build(self, ctx: BuildContext, tmp: Path, v: Any, e: Any = None) -> dict[str, Any]:
        model = ctx.dense().model if v.name == "dense" else ctx.variant_model(v.name)
        info = self._graphs(ctx, tmp, v, model)
        quant = quantization_of(model)
        if quant is not None:
            from export.quant_graph import rewrite_quantized

            for g in ("prefill", "decode"):
                info[f"{g}_quantization"] = rewrite_quantized(tmp / f"{g}.onnx", tmp / f"{g}.onnx", *quant)
        return info

    @staticmethod
    def _graphs(ctx: BuildContext, tmp: Path, v: Any, model: Any) -> dict[str, Any]:
        from export.kv_export import export_kv_graphs
        from export.onnx_export import RebindError, rebind_weights

        adapter = ctx.dense().adapter
        if ctx.rebinds(v):
            required = [f"{r.name}.weight" for r in adapter.linears(model)]
            try:
                return {g: rebind_weights(ctx.out / "dense" / "kv" / f"{g}.onnx", model, required, tmp / f"{g}.onnx", dense=ctx.dense().model) for g in ("prefill", "decode")}
            except RebindError as exc:
                log.warning("%s: cannot reuse the dense KV graphs (%s); exporting afresh", v.name, exc)
        return export_kv_graphs(model, adapter, tmp, ctx.recipe.export.opset)


STAGE = KvStage()
