"""A variant's passes run block-streamed: each pass one sweep from a saved directory to a new one.

Pass *i* reads the directory pass *i − 1* wrote (the first reads the source model), loads one block
at a time into a skeleton of the model (:class:`core.streaming.BlockStream`), and writes a complete
``model.safetensors`` + config + tokenizer under ``work_dir``; the last pass's directory then moves to
``out_dir``. Every pass's directory stays under ``work_dir`` until the variant is done (a resumed run
skips the passes that finished). Only passes
whose :meth:`passes.base.Pass.stream_refusal` is None run here; the first refusal stops the variant
before anything is read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from core.artifacts import atomic_write_json, stable_hash
from core.errors import PassFailure
from core.resources import peak_rss_bytes
from core.streaming import BlockStream
from passes.base import Pass, PassContext

log = logging.getLogger(__name__)

DONE_FILE = "stream-result.json"
"""Beside a finished pass's output under the work directory: its key and result (a resumed variant skips it)."""


def stream_refusal(passes: list[tuple[type[Pass], Any]]) -> str | None:
    """The first reason one of ``passes`` (class, config) cannot run block-streamed; None when all can."""
    for cls, cfg in passes:
        why = cls.stream_refusal(cfg)
        if why:
            return why
    return None


def run_streamed(source: Path, passes: list[tuple[type[Pass], Any]], out_dir: Path, ctx: PassContext, work_dir: Path) -> list[dict[str, Any]]:
    """Run ``passes`` (class, config) block-streamed from ``source`` into ``out_dir``; returns each
    pass's result as a dict, with a ``stream`` section (blocks, seconds, this process's peak RSS so far).

    Every pass writes under ``work_dir`` (``stream-<i>/``), which survives a killed run: a pass that
    finished is not run again (its result is kept beside its output), and a pass killed mid-sweep
    continues from its last checkpoint when it can (:meth:`core.streaming.BlockStream.checkpoint`);
    the last pass's directory then moves to ``out_dir``."""
    why = stream_refusal(passes)
    if why:
        raise ValueError(why)
    if not passes:
        raise ValueError("a streamed variant needs at least one pass")
    results: list[dict[str, Any]] = []
    current = Path(source)
    work_dir = Path(work_dir)
    calib = ctx.calibration_windows("streamed") if any(cls.uses_calibration for cls, _ in passes) else None
    data_key = hashlib.sha256(calib.numpy().tobytes()).hexdigest() if calib is not None else None
    for i, (cls, cfg) in enumerate(passes):
        target = work_dir / f"stream-{i}"
        key = stable_hash("stream", str(current), cls.name, dataclasses.asdict(cfg), data_key, i)
        done_file = target / DONE_FILE
        done = json.loads(done_file.read_text(encoding="utf-8")) if done_file.is_file() else {}
        if done.get("key") == key:
            results.append(done["result"])
            log.info("%s: its streamed sweep finished before; kept", cls.name)
            current = target
            continue
        t0 = time.perf_counter()
        stream = BlockStream(current, target, checkpoint_key=key)
        try:
            result = cls(cfg).run(stream.model, dataclasses.replace(ctx, stream=stream))
            stream.finish()
        except Exception as exc:
            stream.abort()
            raise PassFailure(cls.name, exc) from exc
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
            **({"resumed_at_block": stream.resume["next_block"]} if stream.resume else {}),
        }
        log.info("%s: streamed over %d blocks in %.1f s (peak RSS %s)", cls.name, stream.layers, time.perf_counter() - t0,
                 f"{peak / 2**30:.2f} GiB" if peak else "unknown")
        atomic_write_json(done_file, {"key": key, "result": r})
        results.append(r)
        current = target
    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    shutil.move(str(current), str(out_dir))
    (out_dir / DONE_FILE).unlink(missing_ok=True)
    for stale in work_dir.glob("stream-*"):
        shutil.rmtree(stale, ignore_errors=True)
    return results
