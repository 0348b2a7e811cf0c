"""A variant's passes run block-streamed: each pass one sweep from a saved directory to a new one.

Pass *i* reads the directory pass *i − 1* wrote (the first reads the source model), loads one block
at a time into a skeleton of the model (:class:`core.streaming.BlockStream`), and writes a complete
``model.safetensors`` + config + tokenizer; the last pass writes into ``out_dir``. Intermediate
directories live under ``work_dir`` and are removed once the next pass has read them. Only passes
whose :meth:`passes.base.Pass.stream_refusal` is None run here; the first refusal stops the variant
before anything is read.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from core.resources import peak_rss_bytes
from core.streaming import BlockStream
from passes.base import Pass, PassContext

log = logging.getLogger(__name__)


def stream_refusal(passes: list[tuple[type[Pass], Any]]) -> str | None:
    """The first reason one of ``passes`` (class, config) cannot run block-streamed; None when all can."""
    for cls, cfg in passes:
        why = cls.stream_refusal(cfg)
        if why:
            return why
    return None


def run_streamed(source: Path, passes: list[tuple[type[Pass], Any]], out_dir: Path, ctx: PassContext, work_dir: Path) -> list[dict[str, Any]]:
    """Run ``passes`` (class, config) block-streamed from ``source`` into ``out_dir``; returns each
    pass's result as a dict, with a ``stream`` section (blocks, seconds, this process's peak RSS so far)."""
    why = stream_refusal(passes)
    if why:
        raise ValueError(why)
    if not passes:
        raise ValueError("a streamed variant needs at least one pass")
    results: list[dict[str, Any]] = []
    current = Path(source)
    work_dir = Path(work_dir)
    for i, (cls, cfg) in enumerate(passes):
        last = i == len(passes) - 1
        target = Path(out_dir) if last else work_dir / f"stream-{i}"
        shutil.rmtree(target, ignore_errors=True)
        t0 = time.perf_counter()
        stream = BlockStream(current, target)
        try:
            result = cls(cfg).run(stream.model, dataclasses.replace(ctx, stream=stream))
            stream.finish()
        except BaseException:
            stream.abort()
            raise
        r = result.to_dict()
        peak = peak_rss_bytes()
        r.setdefault("info", {})["stream"] = {
            "blocks": stream.layers,
            "seconds": round(time.perf_counter() - t0, 2),
            "outer_bytes_loaded": stream.bytes_loaded,
            "peak_rss_bytes": peak,
        }
        log.info("%s: streamed over %d blocks in %.1f s (peak RSS %s)", cls.name, stream.layers, time.perf_counter() - t0,
                 f"{peak / 2**30:.2f} GiB" if peak else "unknown")
        results.append(r)
        if current != Path(source) and current.is_relative_to(work_dir):
            shutil.rmtree(current, ignore_errors=True)
        current = target
    return results
