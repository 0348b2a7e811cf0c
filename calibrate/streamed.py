"""Logits of a saved model computed block-streamed, for perplexity on a model larger than memory.

Every evaluation window runs through blocks 0 … L−2 one block at a time (each read from disk, run
over all windows, released); the inputs of the last block are kept. A window's logits are then the
model's own forward with its block list replaced by the last block fed those inputs (so the final
norm, any projection and the output head are the family's own code). Memory: the embeddings and
head, one block, and the windows' hidden states.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable

import torch

from calibrate.runner import LayerwiseRunner, PassThrough
from calibrate.sensitivity import _Inject
from core.progress import progress
from core.streaming import BlockStream

log = logging.getLogger(__name__)


def streamed_logits_fn(directory: Path, windows: torch.Tensor, batch_size: int = 8, show_progress: bool = True) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function ids → logits for the rows of ``windows`` (asked in any order, one or more rows at a
    time), computed from ``directory`` block-streamed; the block sweep runs here, once."""
    t0 = time.perf_counter()
    stream = BlockStream(directory, None, head=True)
    if stream.adapter.task != "causal-lm":
        raise ValueError(f"streamed logits are for causal LMs; '{directory}' holds an {stream.adapter.task}")
    runner = LayerwiseRunner(stream.model, stream.adapter, windows, batch_size=batch_size, show_progress=False, stream=stream)
    batches = runner.capture()
    last = stream.layers - 1
    it = range(last)
    for b in progress(it, desc="streamed blocks") if show_progress else it:
        block = stream.load(b)
        batches = runner.next_inputs(block, runner.for_block(b, batches))
        stream.done(b)
    hidden = torch.cat([x.hidden for x in batches])
    del batches
    block = stream.load(last)
    model, adapter = stream.model, stream.adapter
    parent_path, _, attr = adapter.blocks_path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    rows = {tuple(w.tolist()): i for i, w in enumerate(windows)}
    # the blocks before the last as stand-ins, so the last sits at its own index (its own attention mask)
    skeleton_blocks = stream.adapter.blocks(model)
    stand_ins = [PassThrough(skeleton_blocks[i], tuple_out=runner.tuple_out) for i in range(last)]
    log.info("streamed %d blocks over %d windows in %.1f s", last, windows.shape[0], time.perf_counter() - t0)

    def logits(ids: torch.Tensor) -> torch.Tensor:
        try:
            idx = [rows[tuple(r.tolist())] for r in ids]
        except KeyError:
            raise ValueError("streamed logits are computed for the windows given up front only") from None
        original = getattr(parent, attr)
        try:
            setattr(parent, attr, torch.nn.ModuleList([*stand_ins, _Inject(block, hidden[idx])]))
            with torch.inference_mode():
                return model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
        finally:
            setattr(parent, attr, original)

    return logits
