"""Stage ``<variant>/model/``: the variant's passes run on a copy of the dense model; the pruned
model is saved as safetensors + config + tokenizer, with ``passes.json`` (each pass's result)."""

from __future__ import annotations

import copy
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from core.artifacts import StageOutcome, stable_hash
from core.errors import PassFailure
from pipeline.stages.base import Scope, Stage, variant_entry
from pipeline.stages.context import STAGE_SCHEMA, BuildContext, variant_uses_calibration

log = logging.getLogger(__name__)


class ModelStage(Stage):
    kind = "model"
    scope = Scope.VARIANT

    def key(self, ctx: BuildContext, v: Any, e: Any = None) -> str:
        # not whether it streams: streamed and in-memory passes write the same weights (tests/test_streaming.py),
        # and with model.stream: auto that choice depends on the memory free now, which must not change a key
        calib = ctx.data_key("calibration") if variant_uses_calibration(v) else None
        return stable_hash("model", ctx.model_key, v.to_dict()["passes"], calib, STAGE_SCHEMA)

    def options(self, ctx: BuildContext, v: Any, e: Any = None) -> dict[str, Any]:
        return {"passes": v.to_dict()["passes"], "streamed": ctx.streams(v)}

    def work_dir(self, ctx: BuildContext, v: Any) -> Path:
        """Survives an interrupted stage (e.g. recovery checkpoints); keyed so other settings never resume it."""
        return ctx.out / v.name / f"model.work-{self.key(ctx, v)[:12]}"

    def build(self, ctx: BuildContext, tmp: Path, v: Any, e: Any = None) -> dict[str, Any]:
        if ctx.streams(v):
            return self._build_streamed(ctx, tmp, v)
        from core.models import save_hf_dir
        from passes import PassContext, get_pass_class

        dense = ctx.dense()
        base, results, start = self._start_point(ctx, v)
        model = copy.deepcopy(dense.model if base is None else ctx.variant_model(base.name))
        pctx = PassContext(
            dense.adapter,
            calibration=ctx.calib_windows,
            seed=ctx.recipe.data.calibration.seed,
            teacher=lambda: dense.model,
            work_dir=self.work_dir(ctx, v),
            memo=ctx.memo,
        )
        calib = ctx.data_key("calibration")
        for i, p in enumerate(v.passes):
            if i < start:
                continue
            pctx.prefix_key = stable_hash("prefix", ctx.model_key, calib, [q.to_dict() for q in v.passes[:i]])
            t0 = time.perf_counter()
            try:
                cls = get_pass_class(p.name)
                r = cls(cls.config_class(**p.options)).run(model, pctx)
            except Exception as exc:  # named by the builder with the variant and stage
                raise PassFailure(p.name, exc) from exc
            log.info("%s: pass '%s' took %.1f s", v.name, p.name, time.perf_counter() - t0)
            results.append(r.to_dict())
        save_hf_dir(model, dense.tokenizer, tmp / "model")
        (tmp / "passes.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
        ctx.hold_model(v.name, model)
        # each pass's result, with the per-linear shapes and sparsities it measured from the weights
        return {"passes": results, **({"started_from": base.name} if base is not None else {})}

    def _build_streamed(self, ctx: BuildContext, tmp: Path, v: Any) -> dict[str, Any]:
        """The variant's passes block by block from disk (:mod:`passes.streamed`): the dense model is
        never loaded whole; a variant whose passes extend another's starts from that one's saved model."""
        from transformers import AutoConfig

        from core.adapters import adapter_for
        from passes import PassContext, get_pass_class
        from passes.streamed import run_streamed

        base, results, start = self._start_point(ctx, v)
        source = ctx.dense_dir() if base is None else ctx.out / base.name / "model" / "model"
        pctx = PassContext(
            adapter_for(AutoConfig.from_pretrained(source)),
            calibration=ctx.calib_windows,
            seed=ctx.recipe.data.calibration.seed,
            work_dir=self.work_dir(ctx, v),
        )
        todo = [(get_pass_class(p.name), get_pass_class(p.name).config_class(**p.options)) for p in v.passes[start:]]
        results += run_streamed(source, todo, tmp / "model", pctx, self.work_dir(ctx, v))  # a failure names its pass
        if not (tmp / "model" / "tokenizer_config.json").is_file():
            ctx.tokenizer().save_pretrained(str(tmp / "model"))
        (tmp / "passes.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
        return {"passes": results, "streamed": True, **({"started_from": base.name} if base is not None else {})}

    def _start_point(self, ctx: BuildContext, v: Any) -> tuple[Any, list[dict[str, Any]], int]:
        """(the variant this one starts from or None for dense, the results of the passes it already ran,
        how many of this variant's passes that is)."""
        base = self._base_variant(ctx, v)
        if base is None:
            return None, [], 0
        start = len(base.passes)  # its passes are this variant's first ones: start from its saved model, not from dense
        log.info("%s: starts from variant '%s' (its %d passes done), runs the remaining %d", v.name, base.name, start, len(v.passes) - start)
        return base, list(ctx.records[(base.name, self.kind)].info.get("passes", [])), start

    def _base_variant(self, ctx: BuildContext, v: Any) -> Any:
        """The variant built before this one in this build whose passes (options included) are the longest
        proper prefix of this variant's, e.g. a pruned variant for its quantized copy; None if there is none.
        Its model is what this variant's first passes would compute again (same source and calibration)."""
        mine = v.to_dict()["passes"]
        best = None
        for o in ctx.ordered:
            theirs = o.to_dict()["passes"]
            if o.name == v.name or not 0 < len(theirs) < len(mine) or mine[: len(theirs)] != theirs:
                continue
            if (o.name, self.kind) in ctx.records and (best is None or len(theirs) > len(best.passes)):
                best = o
        return best

    def run(self, ctx: BuildContext, v: Any = None, e: Any = None) -> StageOutcome | None:
        out = super().run(ctx, v, e)
        shutil.rmtree(self.work_dir(ctx, v), ignore_errors=True)
        return out

    def contribute(self, ctx: BuildContext, results: dict[str, Any], v: Any, e: Any = None) -> None:
        variant_entry(results, v.name)["pass_results"] = ctx.records[(v.name, self.kind)].info.get("passes", [])


STAGE = ModelStage()
