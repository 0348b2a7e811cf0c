"""Statistics for contextual (Deja Vu) sparsity of gated MLPs: per block, over sampled calibration
tokens, the predictor inputs and the labels.

For every block l and every sampled token position (``tokens_per_window`` per window, seeded):

- ``prev``: the hidden state entering block l − 1 (block 0: its own input) — the lookahead input
  a Deja Vu predictor reads, available before block l − 1 runs;
- ``block``: the hidden state entering block l;
- ``mlp``: the MLP's own input (after the block's attention and its norm);
- ``act``: |act(gate(x)) · up(x)| of every MLP unit — how much each unit contributes this token,
  whose top units are the labels.

Memory is bounded by ``max_tokens``: tokens × (3 · hidden + units) × 2 B (float16) × blocks
(4096 tokens of SmolLM2: 26 MB per block, 0.8 GB for 30). With ``directory`` each block is saved
as ``block<l>.safetensors`` (atomically) and dropped from memory; :func:`load_block` reads it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from core.adapters.base import GatedMLP, ModelAdapter
from core.progress import progress

log = logging.getLogger(__name__)

KEYS = ("prev", "block", "mlp", "act")


def gated_mlp(adapter: ModelAdapter, block: torch.nn.Module) -> GatedMLP:
    """The gated MLP of a block and its parts (the adapter names them)."""
    if not adapter.gated_mlp:
        raise ValueError(f"contextual sparsity needs a gated MLP (act(gate) · up); '{adapter.family}' has none")
    return adapter.gated_mlp_parts(block)


@dataclass
class ContextStats:
    blocks: int
    tokens: int
    directory: Path | None
    data: dict[int, dict[str, torch.Tensor]]
    """Block → key → (tokens, features) float16, when not on disk."""

    def block(self, l: int) -> dict[str, torch.Tensor]:
        if l in self.data:
            return self.data[l]
        if self.directory is None:
            raise KeyError(f"no statistics for block {l}")
        return load_block(self.directory, l)


def load_block(directory: Path, l: int) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = Path(directory) / f"block{l}.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"contextual statistics {path} are missing; collect them again")
    return load_file(str(path))


def collect_context_stats(
    model: torch.nn.Module,
    adapter: ModelAdapter,
    windows: torch.Tensor,
    tokens_per_window: int = 32,
    max_tokens: int = 4096,
    batch_size: int = 4,
    seed: int = 0,
    directory: Path | None = None,
    show_progress: bool = True,
) -> ContextStats:
    """Run the (dense) model over ``windows`` and keep the statistics of sampled tokens (see the module doc)."""
    blocks = adapter.blocks(model)
    mlps = [gated_mlp(adapter, b) for b in blocks]
    n_windows = min(windows.shape[0], max(1, max_tokens // max(1, tokens_per_window)))
    per = min(tokens_per_window, windows.shape[1])
    g = torch.Generator().manual_seed(seed)
    positions = torch.stack([torch.randperm(windows.shape[1], generator=g)[:per].sort().values for _ in range(n_windows)])
    store: dict[int, dict[str, list[torch.Tensor]]] = {l: {k: [] for k in KEYS} for l in range(len(blocks))}
    current: dict[str, Any] = {}

    def pick(t: torch.Tensor) -> torch.Tensor:  # (B, L, d) → (B·per, d) at the sampled positions
        idx = current["pos"]
        return torch.gather(t, 1, idx[..., None].expand(-1, -1, t.shape[-1])).reshape(-1, t.shape[-1])

    def block_hook(l: int):
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            h = args[0] if args else kwargs["hidden_states"]
            current[l] = pick(h).to(torch.float16)
            store[l]["block"].append(current[l])
            store[l]["prev"].append(current[l - 1] if l > 0 else current[l])
        return hook

    def mlp_hook(l: int):
        def hook(module: torch.nn.Module, args: tuple) -> None:
            x = pick(args[0])
            store[l]["mlp"].append(x.to(torch.float16))
            store[l]["act"].append(mlps[l].unit_activity(x).to(torch.float16))
        return hook

    handles = [b.register_forward_pre_hook(block_hook(l), with_kwargs=True) for l, b in enumerate(blocks)]
    handles += [m.module.register_forward_pre_hook(mlp_hook(l)) for l, m in enumerate(mlps)]
    causal = adapter.task == "causal-lm"
    try:
        with torch.no_grad():
            starts = range(0, n_windows, batch_size)
            for s in progress(starts, desc="contextual stats", total=len(starts)) if show_progress else starts:
                ids = windows[s : s + batch_size].long()
                current.clear()
                current["pos"] = positions[s : s + batch_size]
                kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
                if causal:
                    kwargs["use_cache"] = False
                model(**kwargs)
    finally:
        for h in handles:
            h.remove()
    stats = ContextStats(len(blocks), n_windows * per, Path(directory) if directory else None, {})
    for l in range(len(blocks)):
        tensors = {k: torch.cat(v).contiguous() for k, v in store[l].items()}
        del store[l]
        if directory is not None:
            _save_block(Path(directory), l, tensors)
        else:
            stats.data[l] = tensors
    log.info("contextual stats: %d tokens × %d blocks%s", stats.tokens, len(blocks), f" in {directory}" if directory else "")
    return stats


def _save_block(directory: Path, l: int, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"block{l}.safetensors"
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp))
    tmp.replace(path)


def mass_share(act: torch.Tensor, share: float = 0.9) -> float:
    """Mean over tokens of the fraction of units needed to hold ``share`` of the L2 mass of ``act``."""
    sq = act.float().pow(2).sort(dim=-1, descending=True).values
    cum = sq.cumsum(-1) / sq.sum(-1, keepdim=True).clamp(min=1e-30)
    return float(((cum < share).sum(-1) + 1).float().mean() / act.shape[-1])


def recall_at_k(scores: torch.Tensor, act: torch.Tensor, k: int) -> float:
    """Mean over tokens of |top-k(scores) ∩ top-k(act)| / k: the share of the true top-k units a
    selector with these scores picks when it keeps k."""
    if not 0 < k <= act.shape[-1]:
        raise ValueError(f"k {k} is outside [1, {act.shape[-1]}]")
    picked = torch.zeros_like(act, dtype=torch.bool).scatter_(-1, scores.topk(k, dim=-1).indices, True)
    true = torch.zeros_like(act, dtype=torch.bool).scatter_(-1, act.topk(k, dim=-1).indices, True)
    return float((picked & true).sum(-1).float().mean() / k)
