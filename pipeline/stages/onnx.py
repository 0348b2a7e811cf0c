"""Stage ``<variant>/onnx/``: the variant exported to ONNX (``model.onnx``), or, for a variant whose
passes keep every shape, the dense graph with this variant's weights rebound; then the recipe's
graph passes. The dense variant keeps the exporter's graph as ``raw.onnx`` when graph passes run,
so shape-preserving variants can rebind into it before their own rewrite."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from core.artifacts import stable_hash
from pipeline.schema import check
from pipeline.stages.base import Scope, Stage, variant_entry
from pipeline.stages.context import STAGE_SCHEMA, BuildContext

log = logging.getLogger(__name__)

@dataclass
class ExportSpec:
    opset: int = 18
    exporter: str = "dynamo"
    """'dynamo' (torch.export based) or 'torchscript' (tracing; faster, older)."""
    reuse_dense_graph: bool = True
    """Variants whose passes keep every shape reuse the dense ONNX graph with their own weights
    instead of re-running the exporter (same computation; engine/PyTorch parity still checked)."""
    kv_cache: bool = False
    """Also export prefill + decode graphs with an explicit KV cache (causal LMs)."""
    graph_passes: list[str] = field(default_factory=list)
    """ONNX rewrites applied to every variant's graph, in order: cleanup, sparse_layout, fp16, shrink."""

    def validate(self, where: str) -> None:
        from export.graph import GRAPH_PASSES

        check(17 <= self.opset <= 23, f"{where}.opset", f"{self.opset} is outside [17, 23]")
        for i, name in enumerate(self.graph_passes):
            check(name in GRAPH_PASSES, f"{where}.graph_passes[{i}]", f"'{name}' is not one of {', '.join(GRAPH_PASSES)}")
        check(self.exporter in ("dynamo", "torchscript"), f"{where}.exporter", f"'{self.exporter}' is not one of dynamo, torchscript")


def quantization_of(model: Any) -> tuple[dict[str, Any], dict[str, Any], Any] | None:
    """(scheme, grids, weight values by name) of a model a quantizing pass left with quantized weights, else None."""
    spec = getattr(model.config, "weight_quantization", None)
    if spec is None:
        return None
    return spec, model.quantization_tensors, lambda name: model.get_parameter(name).detach().float().numpy()


class OnnxStage(Stage):
    kind = "onnx"
    scope = Scope.VARIANT

    def options(self, ctx: BuildContext, v: Any = None, e: Any = None) -> dict[str, Any]:
        return {k: val for k, val in asdict(ctx.recipe.export).items() if k != "kv_cache"}

    def key(self, ctx: BuildContext, v: Any, e: Any = None) -> str:
        dense_graph = ctx.content("dense", "onnx") if ctx.rebinds(v) else None
        return stable_hash("export", ctx.content(v.name, "model"), self.options(ctx), dense_graph, STAGE_SCHEMA)

    def build(self, ctx: BuildContext, tmp: Path, v: Any, e: Any = None) -> dict[str, Any]:
        from export.graph import make_passes, rewrite_file
        from export.onnx_export import RebindError, export_onnx, rebind_weights

        spec = ctx.recipe.export
        model = ctx.variant_model(v.name)
        raw = tmp / ("raw.onnx" if spec.graph_passes else "model.onnx")
        info: dict[str, Any] | None = None
        if ctx.rebinds(v):
            required = [f"{r.name}.weight" for r in ctx.dense().adapter.linears(model)]
            src = ctx.out / "dense" / "onnx" / ("raw.onnx" if spec.graph_passes else "model.onnx")
            try:
                info = rebind_weights(src, model, required, raw, dense=ctx.dense().model)
            except RebindError as exc:
                log.warning("%s: cannot reuse the dense graph (%s); exporting afresh", v.name, exc)
        if info is None:
            info = export_onnx(model, ctx.dense().task, raw, spec.opset, spec.exporter)
        if spec.graph_passes:
            from core.structure import head_dim

            hd = head_dim(ctx.dense().adapter, model.config)
            info["graph_passes"] = rewrite_file(raw, tmp / "model.onnx", make_passes(spec.graph_passes, hd))
            info["onnx_bytes"] = (tmp / "model.onnx").stat().st_size
            if v.name != "dense":
                raw.unlink()
        quant = quantization_of(model)
        if quant is not None:
            from export.quant_graph import rewrite_quantized

            info["quantization"] = rewrite_quantized(tmp / "model.onnx", tmp / "model.onnx", *quant)
            info["onnx_bytes"] = info["quantization"]["onnx_bytes"]
        return info

    def contribute(self, ctx: BuildContext, results: dict[str, Any], v: Any, e: Any = None) -> None:
        variant_entry(results, v.name)["export"] = ctx.records[(v.name, self.kind)].info


STAGE = OnnxStage()
