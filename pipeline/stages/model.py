"""Stage ``<variant>/model/``: the variant's passes run on a copy of the dense model; the pruned
model is saved as safetensors + config + tokenizer, with ``passes.json`` (each pass's result)."""

from __future__ import annotations

import copy
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any, TYPE_CHECKING

from core.artifacts import StageOutcome, run_stage, stable_hash
from pipeline.stages.context import STAGE_SCHEMA, BuildContext, variant_uses_calibration

if TYPE_CHECKING:
    from pipeline.recipe import VariantSpec

log = logging.getLogger(__name__)


def key(ctx: BuildContext, v: VariantSpec) -> str:
    calib = ctx.data_key("calibration") if variant_uses_calibration(v) else None
    return stable_hash("model", ctx.model_key, v.to_dict()["passes"], calib, STAGE_SCHEMA)


def run(ctx: BuildContext, v: VariantSpec) -> StageOutcome:
    k = key(ctx, v)
    # survives an interrupted stage (e.g. recovery checkpoints); keyed so other settings never resume it
    work_dir = ctx.out / v.name / f"model.work-{k[:12]}"

    def build(tmp: Path) -> dict[str, Any]:
        from core.models import save_hf_dir
        from passes import PassContext, get_pass_class

        dense = ctx.dense()
        model = copy.deepcopy(dense.model)
        pctx = PassContext(
            dense.adapter,
            calibration=ctx.calib_windows,
            seed=ctx.recipe.data.calibration.seed,
            teacher=lambda: dense.model,
            work_dir=work_dir,
            memo=ctx.memo,
        )
        results = []
        calib = ctx.data_key("calibration")
        for i, p in enumerate(v.passes):
            pctx.prefix_key = stable_hash("prefix", ctx.model_key, calib, [q.to_dict() for q in v.passes[:i]])
            cls = get_pass_class(p.name)
            ps = cls(cls.config_class(**p.options))
            t0 = time.perf_counter()
            r = ps.run(model, pctx)
            log.info("%s: pass '%s' took %.1f s", v.name, p.name, time.perf_counter() - t0)
            results.append(r.to_dict())
        save_hf_dir(model, dense.tokenizer, tmp / "model")
        (tmp / "passes.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
        ctx.hold_model(v.name, model)
        # per-linear sparsities (measured from the weights) go into results.json where a pass mixed them
        return {"passes": [{"name": r["name"], "seconds": r["seconds"], "info": r["info"], **({"layers": r["layers"]} if "allocation" in r["info"] else {})} for r in results]}

    out = run_stage(ctx.out / v.name / "model", f"{v.name}/model", k, {"passes": v.to_dict()["passes"]}, build)
    shutil.rmtree(work_dir, ignore_errors=True)
    return ctx.record(v.name, out)
