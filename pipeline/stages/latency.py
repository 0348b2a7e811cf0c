"""Stage ``latency-<backend>/``: prefill latency of every variant's engine, interleaved round-robin
in one process (``latency.json``, raw samples included)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from core.artifacts import stable_hash
from pipeline.schema import check
from pipeline.stages import engine as engine_stage
from pipeline.stages.base import Scope, Stage
from pipeline.stages.context import STAGE_SCHEMA, BuildContext


@dataclass
class LatencySpec:
    batch_sizes: list[int] = field(default_factory=lambda: [1, 4])
    sequence_lengths: list[int] = field(default_factory=lambda: [128, 512])
    warmup: int = 2
    repeats: int = 5
    threads: int = 0
    """Intra-op threads for the latency sessions; 0 = all cores."""

    def validate(self, where: str) -> None:
        check(len(self.batch_sizes) > 0, f"{where}.batch_sizes", "is empty")
        check(len(self.sequence_lengths) > 0, f"{where}.sequence_lengths", "is empty")
        for b in self.batch_sizes:
            check(isinstance(b, int) and 1 <= b <= 256, f"{where}.batch_sizes", f"{b!r} is outside [1, 256]")
        for s in self.sequence_lengths:
            check(isinstance(s, int) and 1 <= s <= 32768, f"{where}.sequence_lengths", f"{s!r} is outside [1, 32768]")
        check(0 <= self.warmup <= 100, f"{where}.warmup", f"{self.warmup} is outside [0, 100]")
        check(1 <= self.repeats <= 1000, f"{where}.repeats", f"{self.repeats} is outside [1, 1000]")
        check(self.threads >= 0, f"{where}.threads", f"{self.threads} is negative")


class LatencyStage(Stage):
    kind = "latency"
    scope = Scope.ENGINE

    def enabled(self, ctx: BuildContext) -> bool:
        return ctx.recipe.validation.latency is not None

    def options(self, ctx: BuildContext, v: Any = None, e: Any = None) -> dict[str, Any]:
        return asdict(ctx.recipe.validation.latency)

    def key(self, ctx: BuildContext, v: Any, e: Any) -> str:
        stage = f"engine-{e.backend}"
        return stable_hash(
            "latency", [(x.name, ctx.content(x.name, stage)) for x in ctx.ordered], self.options(ctx), ctx.engine(e).version_info(), STAGE_SCHEMA
        )

    def build(self, ctx: BuildContext, tmp: Path, v: Any, e: Any) -> dict[str, Any]:
        from contextlib import ExitStack

        from core.resources import HostLoad
        from pipeline import validate as V

        lat = ctx.recipe.validation.latency
        engine = ctx.engine(e)
        shapes = [(b, s) for b in lat.batch_sizes for s in lat.sequence_lengths]
        vocab = int(json.loads((ctx.out / "dense" / "model" / "model" / "config.json").read_text()).get("vocab_size", 1000))
        with ExitStack() as stack:
            runners = {}
            for x in ctx.ordered:
                art = engine_stage.artifact(ctx, x.name, e.backend)
                runners[x.name] = stack.enter_context(engine.runner(art, threads=lat.threads, spinning=False))
            load = HostLoad().start()
            points = V.interleaved_latency(runners, shapes, vocab, lat.warmup, lat.repeats, baseline="dense")
            load.stop(f"{e.backend} latency")
        out = {
            **load.record(),
            "backend": e.backend,
            "warmup": lat.warmup,
            "repeats": lat.repeats,
            "threads": lat.threads,
            "order": "round-robin over all variants, starting runner rotating per repeat",
            "variants": {n: [p.to_dict() for p in pts] for n, pts in points.items()},
        }
        (tmp / "latency.json").write_text(json.dumps(out, indent=2), encoding="utf-8")
        return {"variants": list(points)}

    def contribute(self, ctx: BuildContext, results: dict[str, Any], v: Any, e: Any) -> None:
        L = json.loads((self.path(ctx, v, e) / "latency.json").read_text(encoding="utf-8"))
        for x in results["variants"]:
            entry = x["engines"].get(e.backend, {})
            if entry.get("status") == "ok" and x["name"] in L["variants"]:
                entry["latency"] = {"points": L["variants"][x["name"]], **{k: L[k] for k in ("warmup", "repeats", "threads", "order", "host_busy",
                                                                                          "host_others_cpu_share") if k in L}}


STAGE = LatencyStage()
