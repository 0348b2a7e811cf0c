"""Stage ``decode-onnxruntime-cpu/``: greedy-decode parity of every variant's KV-cache graphs with
PyTorch ``generate``, then decode ms/token and prefill ms of every variant, round-robin
interleaved (``decode.json``)."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from core.artifacts import stable_hash
from pipeline.schema import check
from pipeline.stages.base import Scope, Stage
from pipeline.stages.context import STAGE_SCHEMA, BuildContext

log = logging.getLogger(__name__)


@dataclass
class DecodeSpec:
    prompt: int = 128
    """Prompt tokens (from the evaluation text) before decoding."""
    new_tokens: int = 64
    """Tokens generated per latency run (ms/token is their mean)."""
    greedy_tokens: int = 32
    """Greedy tokens compared with PyTorch generate (identical tokens, per-step max |Δlogit|)."""
    repeats: int = 3

    def validate(self, where: str) -> None:
        check(1 <= self.prompt <= 8192, f"{where}.prompt", f"{self.prompt} is outside [1, 8192]")
        check(2 <= self.new_tokens <= 4096, f"{where}.new_tokens", f"{self.new_tokens} is outside [2, 4096]")
        check(1 <= self.greedy_tokens <= 4096, f"{where}.greedy_tokens", f"{self.greedy_tokens} is outside [1, 4096]")
        check(1 <= self.repeats <= 100, f"{where}.repeats", f"{self.repeats} is outside [1, 100]")


class DecodeStage(Stage):
    kind = "decode-onnxruntime-cpu"
    scope = Scope.BUILD

    def enabled(self, ctx: BuildContext) -> bool:
        return ctx.recipe.validation.decode is not None

    def options(self, ctx: BuildContext, v: Any = None, e: Any = None) -> dict[str, Any]:
        return asdict(ctx.recipe.validation.decode)

    @staticmethod
    def generating_engines(ctx: BuildContext) -> list[Any]:
        """The recipe's engines that decode with their own KV cache (``Engine.generates``) and are available."""
        return [e for e in ctx.recipe.engines if getattr(ctx.engine(e), "generates", False) and e.backend not in ctx.unavailable]

    def key(self, ctx: BuildContext, v: Any = None, e: Any = None) -> str:
        # an engine's runtime (e.g. native-cpu's kernel library) decides its timings as much as its artifacts do
        engines = [
            (g.backend, ctx.engine(g).version_info(), [ctx.content(x.name, f"engine-{g.backend}") for x in ctx.ordered])
            for g in self.generating_engines(ctx)
        ]
        return stable_hash(
            "decode", [(x.name, ctx.content(x.name, "kv"), ctx.content(x.name, "model")) for x in ctx.ordered], self.options(ctx),
            ctx.data_key("evaluation"), engines, STAGE_SCHEMA,
        )

    def contribute(self, ctx: BuildContext, results: dict[str, Any], v: Any = None, e: Any = None) -> None:
        per = json.loads((self.path(ctx, v, e) / "decode.json").read_text(encoding="utf-8"))
        results["decode"] = {k: val for k, val in per.items() if k != "variants"}
        for x in results["variants"]:
            x["decode"] = per["variants"].get(x["name"])

    def build(self, ctx: BuildContext, tmp: Path, v: Any = None, e: Any = None) -> dict[str, Any]:
        spec = ctx.recipe.validation.decode
        ordered = ctx.ordered
        import statistics
        from contextlib import ExitStack

        from engines.onnxruntime import OnnxRuntimeCpuEngine
        from export.kv_export import GreedyResult, cache_layout, compare_with_generate, decode_timing, greedy_generate
        from core.resources import HostLoad
        from pipeline.stages import engine as engine_stage
        from pipeline.validate import round_robin

        dense = ctx.dense()
        windows = ctx.eval_windows()
        prompt = windows.reshape(-1)[: spec.prompt][None].numpy()
        ort_cpu = OnnxRuntimeCpuEngine({})
        result: dict[str, Any] = {"prompt_tokens": int(prompt.shape[1]), "batch": 1, "runtime": "onnxruntime-cpu", "variants": {}}
        with ExitStack() as stack:
            runners, layouts = {}, {}
            for v in ordered:
                kv = ctx.out / v.name / "kv"
                # no intra-op spinning: the sessions alternate, as in the prefill latency stage
                pre = stack.enter_context(ort_cpu.open(kv / "prefill.onnx", spinning=False, name=f"{v.name}:prefill"))
                dec = stack.enter_context(ort_cpu.open(kv / "decode.onnx", spinning=False, name=f"{v.name}:decode"))
                runners[v.name] = (pre, dec)
                model = dense.model if v.name == "dense" else ctx.variant_model(v.name)
                layouts[v.name] = lay = cache_layout(model, dense.adapter)
                cmp = compare_with_generate(greedy_generate(pre, dec, lay, prompt, spec.greedy_tokens), model, prompt)
                cmp.pop("max_abs_logit_delta_per_step")
                result["variants"][v.name] = cmp
                log.info("%s: greedy decode tokens identical %s, max |Δlogit| %.2e", v.name, cmp["tokens_identical"], cmp["max_abs_logit_delta"])
                f64 = cmp.get("fp64_reference", {})
                if "engine_tokens_equal_fp64" in f64:
                    log.warning(
                        "%s: greedy tokens differ from PyTorch; leading tokens equal to the model in float64: engine %d, PyTorch fp32 %d",
                        v.name, f64["engine_tokens_equal_fp64"], f64["torch_fp32_tokens_equal_fp64"],
                    )
            # engines with their own decoder (e.g. native-cpu): the same prompt, timed in the same rounds
            own: dict[str, tuple[str, str, Any]] = {}
            for g in self.generating_engines(ctx):
                for v in ordered:
                    art = engine_stage.artifact(ctx, v.name, g.backend)
                    r = stack.enter_context(ctx.engine(g).runner(art))
                    key = f"{v.name}@{g.backend}"
                    own[key] = (v.name, g.backend, r)
                    run = r.generate(prompt, spec.greedy_tokens)
                    model = dense.model if v.name == "dense" else ctx.variant_model(v.name)
                    cmp = compare_with_generate(GreedyResult(run.tokens, run.logits, run.prefill_ms, run.decode_ms), model, prompt)
                    cmp.pop("max_abs_logit_delta_per_step")
                    cmp["runtime"] = r.describe()
                    result["variants"][v.name].setdefault("engines", {})[g.backend] = cmp
                    log.info("%s on %s: greedy decode tokens identical %s, max |Δlogit| %.2e", v.name, g.backend, cmp["tokens_identical"], cmp["max_abs_logit_delta"])

            def timed(n: str) -> dict[str, float]:
                if n in own:
                    run = own[n][2].generate(prompt, spec.new_tokens)
                    return {"decode_ms_per_token": statistics.mean(run.decode_ms), "prefill_ms": run.prefill_ms}
                return decode_timing(*runners[n], layouts[n], prompt, spec.new_tokens)

            for name in runners:  # warm-up
                greedy_generate(*runners[name], layouts[name], prompt, 4)
            for key in own:
                own[key][2].generate(prompt, 4)
            load = HostLoad().start()
            samples = round_robin(list(runners) + list(own), spec.repeats, timed)
            load.stop("decode timing")
            result.update(load.record())
        # every ratio is to the fastest dense decode (and, separately, prefill) measured in this run
        dense_runs = {"onnxruntime-cpu": samples["dense"], **{b: samples[k] for k, (vn, b, _) in own.items() if vn == "dense"}}
        baseline = {}
        for m in ("decode_ms_per_token", "prefill_ms"):
            engine_name = min(dense_runs, key=lambda e: statistics.median(dense_runs[e][m]))
            baseline[m] = {"engine": engine_name, "median": round(statistics.median(dense_runs[engine_name][m]), 3), "samples": dense_runs[engine_name][m]}
        result["baseline"] = baseline
        base = {m: statistics.median(baseline[m]["samples"]) for m in baseline}
        for key, (vname, backend, _) in own.items():
            smp = samples.pop(key)
            med = {m: statistics.median(smp[m]) for m in smp}
            result["variants"][vname]["engines"][backend].update(
                {
                    "new_tokens": spec.new_tokens,
                    "decode_ms_per_token": round(med["decode_ms_per_token"], 3),
                    "prefill_ms": round(med["prefill_ms"], 3),
                    "decode_ratio": round(med["decode_ms_per_token"] / base["decode_ms_per_token"], 4),
                    "prefill_ratio": round(med["prefill_ms"] / base["prefill_ms"], 4),
                    "baseline": {m: baseline[m]["engine"] for m in baseline},
                    "samples": smp,
                }
            )
        for n, smp in samples.items():
            med = {m: statistics.median(smp[m]) for m in smp}
            result["variants"][n].update(
                {
                    "new_tokens": spec.new_tokens,
                    "decode_ms_per_token": round(med["decode_ms_per_token"], 3),
                    "prefill_ms": round(med["prefill_ms"], 3),
                    "decode_ratio": round(med["decode_ms_per_token"] / base["decode_ms_per_token"], 4),
                    "prefill_ratio": round(med["prefill_ms"] / base["prefill_ms"], 4),
                    "samples": smp,
                }
            )
        (tmp / "decode.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
        return {"variants": list(samples)}


STAGE = DecodeStage()
