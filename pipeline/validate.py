"""Validation of a variant against the dense baseline.

Quality: perplexity (PyTorch and through the engine, same windows), top-1
next-token agreement and mean KL(dense‖variant) per token, encoder embedding
cosine similarity. Parity: engine vs the variant's own PyTorch outputs through
Polygraphy's Comparator with explicit tolerances. Latency: dense and variant
engines timed interleaved in one process, medians and ratios. Size: parameters,
non-zeros, bytes.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F

from core.progress import progress

log = logging.getLogger(__name__)

LogitsFn = Callable[[torch.Tensor], torch.Tensor]


def torch_forward(model: torch.nn.Module, task: str, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The tensor the exported graph outputs for the task (the adapters' task forward call), fp32."""
    from core.adapters.base import task_forward

    with torch.inference_mode():
        return task_forward(model, task, ids, mask).float()


def torch_outputs_fn(model: torch.nn.Module, task: str) -> LogitsFn:
    return lambda ids: torch_forward(model, task, ids, torch.ones_like(ids))


def runner_outputs_fn(runner: Any, output: str) -> LogitsFn:
    def run(ids: torch.Tensor) -> torch.Tensor:
        feeds = {"input_ids": ids.numpy().astype(np.int64), "attention_mask": np.ones(tuple(ids.shape), np.int64)}
        return torch.from_numpy(runner.infer(feeds)[output])

    return run


def _window_nll(logits: torch.Tensor, ids: torch.Tensor) -> tuple[float, int]:
    pred = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    target = ids[:, 1:].reshape(-1)
    return float(F.cross_entropy(pred, target, reduction="sum")), int(target.numel())


def perplexity(fn: LogitsFn, windows: torch.Tensor, desc: str) -> dict[str, Any]:
    """exp(mean next-token NLL) over every window (each window predicts its tokens 1..L-1)."""
    return perplexity_with_agreement(fn, None, windows, 0, desc)[0]


def _ppl_result(nll: list[float], tokens: list[int], windows: torch.Tensor, t0: float) -> dict[str, Any]:
    mean = sum(nll) / sum(tokens)
    return {
        "perplexity": math.exp(mean),
        "mean_nll": mean,
        "tokens": sum(tokens),
        "windows": len(nll),
        "window_length": int(windows.shape[1]),
        "window_nll": nll,
        "seconds": round(time.perf_counter() - t0, 2),
    }


def perplexity_of_first(ppl: dict[str, Any], k: int) -> float:
    """Perplexity over the first ``k`` windows of a :func:`perplexity` result (same token count per window)."""
    per = ppl["tokens"] // ppl["windows"]
    return math.exp(sum(ppl["window_nll"][:k]) / (per * k))


def _agreement_counts(ld: torch.Tensor, lv: torch.Tensor) -> tuple[int, float, int]:
    ld, lv = F.log_softmax(ld.float(), -1), F.log_softmax(lv.float(), -1)
    agree = int((ld.argmax(-1) == lv.argmax(-1)).sum())
    kl = float((ld.exp() * (ld - lv)).sum())
    return agree, kl, ld.shape[0] * ld.shape[1]


def agreement(dense: LogitsFn, variant: LogitsFn, windows: torch.Tensor, desc: str) -> dict[str, Any]:
    """Top-1 next-token agreement and mean per-token KL(dense‖variant) in nats."""
    agree, kl_sum, count = 0, 0.0, 0
    for i in progress(range(windows.shape[0]), desc=desc):
        w = windows[i : i + 1]
        a, k, n = _agreement_counts(dense(w), variant(w))
        agree, kl_sum, count = agree + a, kl_sum + k, count + n
    return {"top1_agreement": agree / count, "kl_dense_variant": kl_sum / count, "tokens": count, "windows": int(windows.shape[0])}


def perplexity_with_agreement(
    variant: LogitsFn, dense: LogitsFn | None, windows: torch.Tensor, agreement_windows: int, desc: str
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Perplexity over every window and, on the first ``agreement_windows``, agreement with ``dense``,
    from one forward of the variant per window (the same logits serve both)."""
    nll: list[float] = []
    tokens: list[int] = []
    agree, kl_sum, acount = 0, 0.0, 0
    n_agree = min(agreement_windows, windows.shape[0]) if dense is not None else 0
    t0 = time.perf_counter()
    for i in progress(range(windows.shape[0]), desc=desc):
        w = windows[i : i + 1]
        lv = variant(w)
        s, n = _window_nll(lv, w)
        nll.append(s)
        tokens.append(n)
        if i < n_agree:
            a, k, n = _agreement_counts(dense(w), lv)
            agree, kl_sum, acount = agree + a, kl_sum + k, acount + n
    ppl = _ppl_result(nll, tokens, windows, t0)
    agr = None
    if n_agree:
        agr = {"top1_agreement": agree / acount, "kl_dense_variant": kl_sum / acount, "tokens": acount, "windows": n_agree}
    return ppl, agr


def embedding_similarity(dense: LogitsFn, variant: LogitsFn, windows: torch.Tensor, desc: str) -> dict[str, Any]:
    """Mean cosine similarity of mean-pooled encoder embeddings (the sentence-transformers pooling)."""
    sims = []
    for i in progress(range(windows.shape[0]), desc=desc):
        w = windows[i : i + 1]
        a, b = dense(w).mean(1), variant(w).mean(1)
        sims.append(float(F.cosine_similarity(a, b, dim=-1).mean()))
    return {"mean_cosine": sum(sims) / len(sims), "min_cosine": min(sims), "windows": len(sims)}


# --- parity through Polygraphy -----------------------------------------------------------


def as_polygraphy_runner(runner: Any, output: str, name: str = "engine") -> Any:
    """The project's :class:`engines.Runner` (any backend) behind Polygraphy's runner interface, so
    Polygraphy's ``Comparator`` runs the engine that was built, whatever its artifact is."""
    from polygraphy.backend.base import BaseRunner
    from polygraphy.common import TensorMetadata

    class EngineRunner(BaseRunner):
        def __init__(self) -> None:
            super().__init__(name=name, prefix="engine-runner")
            self.description: str | None = None
            """``runner.describe()`` while it was active: what the comparison really ran on."""

        def activate_impl(self) -> None:
            runner.activate()
            self.description = runner.describe()

        def deactivate_impl(self) -> None:
            runner.deactivate()

        def get_input_metadata_impl(self) -> Any:
            meta = TensorMetadata()
            for m in runner.input_metadata():
                meta.add(m.name, m.dtype, tuple(d if isinstance(d, int) and d >= 0 else None for d in m.shape))
            return meta

        def infer_impl(self, feed_dict: dict[str, np.ndarray]) -> Any:
            t0 = time.perf_counter()
            out = runner.infer(dict(feed_dict))
            self.inference_time = time.perf_counter() - t0
            return OrderedDict([(output, np.asarray(out[output]))])

    return EngineRunner()


def parity(
    model: torch.nn.Module,
    task: str,
    open_runner: Callable[[], Any],
    output: str,
    feeds: list[dict[str, np.ndarray]],
    atol: float,
    rtol: float,
) -> dict[str, Any]:
    """Compare the engine (a runner of the project's engine interface, opened by ``open_runner``) with
    PyTorch using Polygraphy's Comparator, elementwise."""
    from polygraphy.backend.base import BaseRunner
    from polygraphy.common import TensorMetadata
    from polygraphy.comparator import Comparator, CompareFunc
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.ERROR

    class PytorchRunner(BaseRunner):
        def __init__(self) -> None:
            super().__init__(name="pytorch", prefix="pytorch-runner")

        def activate_impl(self) -> None:
            pass

        def deactivate_impl(self) -> None:
            pass

        def get_input_metadata_impl(self) -> Any:
            meta = TensorMetadata()
            for n in ("input_ids", "attention_mask"):
                meta.add(n, np.int64, (None, None))
            return meta

        def infer_impl(self, feed_dict: dict[str, np.ndarray]) -> Any:
            t0 = time.perf_counter()
            out = torch_forward(model, task, torch.from_numpy(feed_dict["input_ids"]), torch.from_numpy(feed_dict["attention_mask"]))
            self.inference_time = time.perf_counter() - t0
            return OrderedDict([(output, out.numpy())])

    runners = [PytorchRunner(), as_polygraphy_runner(open_runner(), output)]
    results = Comparator.run(runners, data_loader=feeds)
    ran_on = runners[1].description
    acc = Comparator.compare_accuracy(results, compare_func=CompareFunc.simple(atol=atol, rtol=rtol))
    worst_abs, worst_rel = 0.0, 0.0
    # Polygraphy ≥ 0.53 returns AccuracyResults (one AccuracyResult per compare function); older ones one AccuracyResult.
    per_func = [acc] if hasattr(acc, "values") else list(acc)
    for result in per_func:
        for iterations in result.values():
            for it in iterations:
                for r in it.values():
                    worst_abs = max(worst_abs, float(r.max_absdiff))
                    worst_rel = max(worst_rel, float(r.max_reldiff))
    out = {
        "passed": bool(acc),
        "atol": atol,
        "rtol": rtol,
        "max_absdiff": worst_abs,
        "max_reldiff": worst_rel,
        "feeds": [{k: list(v.shape) for k, v in f.items()} for f in feeds],
        "tool": "polygraphy Comparator (CompareFunc.simple, elementwise)",
        "engine_runner": ran_on,
    }
    if not out["passed"]:
        out["fp64_reference"] = fp64_floor(model, task, open_runner, output, feeds)
    return out


FLOOR_FACTOR = 10.0
"""An engine counts as at the model's fp32 floor when it is no more than this many times farther
from float64 than PyTorch fp32 is: two fp32 implementations round differently, so either may be
the farther one; a wrong engine is off by powers of ten on a continuous model."""


def fp64_floor(model: torch.nn.Module, task: str, open_runner: Callable[[], Any], output: str, feeds: list[dict[str, np.ndarray]]) -> dict[str, Any]:
    """Diagnose a failed parity: the same model in float64 is the exact-arithmetic reference.

    Returns max |PyTorch fp32 − fp64| (the model's own fp32 floor) and max |engine − fp64|, the
    engine run through its own runner. A model whose output is discontinuous in its inputs
    (a per-token top-k selection: a unit at the k-th boundary flips on a rounding
    difference) can amplify an ulp into a visible logit change; when the engine is about as far
    from fp64 as PyTorch fp32 is (``FLOOR_FACTOR``), the engine/PyTorch gap is that floor, not an
    export error. ``within_floor`` says which; the elementwise verdict stands.
    """
    from core.models import float64_copy

    try:
        ref = float64_copy(model)
    except ValueError as e:
        return {"skipped": str(e)}
    torch32 = engine = 0.0
    with open_runner() as runner:
        for f in feeds:
            ids, mask = torch.from_numpy(f["input_ids"]), torch.from_numpy(f["attention_mask"])
            y64 = torch_forward(ref, task, ids, mask).double()  # computed in fp64, rounded once at the end
            y32 = torch_forward(model, task, ids, mask).double()
            ye = torch.from_numpy(np.asarray(runner.infer(dict(f))[output])).double()
            torch32 = max(torch32, float((y32 - y64).abs().max()))
            engine = max(engine, float((ye - y64).abs().max()))
    del ref
    return {"torch_fp32_vs_fp64": torch32, "engine_vs_fp64": engine, "within_floor": engine <= FLOOR_FACTOR * torch32, "floor_factor": FLOOR_FACTOR}


# --- latency --------------------------------------------------------------------------------


@dataclass
class LatencyPoint:
    batch: int
    sequence: int
    dense_ms: float
    variant_ms: float | None
    dense_samples: list[float]
    variant_samples: list[float]

    def to_dict(self) -> dict[str, Any]:
        return {
            "batch": self.batch,
            "sequence": self.sequence,
            "dense_median_ms": round(self.dense_ms, 3),
            "variant_median_ms": None if self.variant_ms is None else round(self.variant_ms, 3),
            "ratio": None if self.variant_ms is None else round(self.variant_ms / self.dense_ms, 4),
            "dense_samples_ms": [round(x, 3) for x in self.dense_samples],
            "variant_samples_ms": [round(x, 3) for x in self.variant_samples],
        }


def round_robin(names: list[str], repeats: int, run: Callable[[str], dict[str, float]]) -> dict[str, dict[str, list[float]]]:
    """Call ``run(name)`` for every name, ``repeats`` times, the starting name rotating from repeat to
    repeat (drift and position effects spread evenly); returns each name's samples of each metric
    ``run`` reports."""
    samples: dict[str, dict[str, list[float]]] = {n: {} for n in names}
    for r in range(repeats):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            for metric, value in run(n).items():
                samples[n].setdefault(metric, []).append(value)
    return samples


def _time_once(runner: Any, feeds: dict[str, np.ndarray]) -> float:
    t0 = time.perf_counter()
    runner.infer(feeds)
    return (time.perf_counter() - t0) * 1e3


def interleaved_latency(
    runners: dict[str, Any],
    shapes: Iterable[tuple[int, int]],
    vocab: int,
    warmup: int,
    repeats: int,
    baseline: str = "dense",
) -> dict[str, list[LatencyPoint]]:
    """Prefill latency of every runner, interleaved round-robin in one process.

    For each shape, every runner is warmed up, then each repeat runs every runner
    once, the starting runner rotating from repeat to repeat, so drift and
    position effects spread evenly over all of them. Each runner's median is
    reported with its ratio to ``baseline``'s median on the same shape.
    """
    if baseline not in runners:
        raise ValueError(f"baseline runner '{baseline}' is not among {sorted(runners)}")
    names = list(runners)
    points: dict[str, list[LatencyPoint]] = {n: [] for n in names}
    gen = torch.Generator().manual_seed(1234)
    for b, s in shapes:
        ids = torch.randint(0, vocab, (b, s), generator=gen).numpy()
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        for _ in range(warmup):
            for n in names:
                runners[n].infer(feeds)
        timed = round_robin(names, repeats, lambda n: {"ms": _time_once(runners[n], feeds)})
        samples = {n: timed[n]["ms"] for n in names}
        base = samples[baseline]
        base_ms = statistics.median(base)
        for n in names:
            own = None if n == baseline else statistics.median(samples[n])
            points[n].append(LatencyPoint(b, s, base_ms, own, base, [] if n == baseline else samples[n]))
        log.info(
            "latency b=%d s=%d: %s",
            b,
            s,
            ", ".join(f"{n} {statistics.median(samples[n]):.1f} ms" for n in names),
        )
    return points


# --- size -----------------------------------------------------------------------------------


def size_stats(model: torch.nn.Module, adapter: Any) -> dict[str, Any]:
    from core.models import count_parameters

    total = count_parameters(model)
    nonzero = 0
    seen = set()
    for p in model.parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        nonzero += int((p != 0).sum())
    lin_total = lin_nz = 0
    for ref in adapter.linears(model):
        w = ref.weight_out_in()
        lin_total += w.numel()
        lin_nz += int((w != 0).sum())
    return {
        "parameters": total,
        "nonzero_parameters": nonzero,
        "block_linear_parameters": lin_total,
        "block_linear_nonzero": lin_nz,
        "block_linear_sparsity": 1 - lin_nz / max(lin_total, 1),
    }
