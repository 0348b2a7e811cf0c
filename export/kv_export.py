"""Prefill and decode graphs with an explicit KV cache, for causal LMs.

- ``prefill.onnx``: ``input_ids`` [batch, sequence], ``attention_mask`` [batch, sequence]
  → ``logits`` [batch, sequence, vocab] and ``present_key_<i>`` / ``present_value_<i>``
  [batch, kv_heads, sequence, head_dim] for every layer i.
- ``decode.onnx``: ``input_ids`` [batch, 1], ``attention_mask`` [batch, past + 1],
  ``past_key_<i>`` / ``past_value_<i>`` [batch, kv_heads, past, head_dim]
  → ``logits`` [batch, 1, vocab] and the presents [batch, kv_heads, past + 1, head_dim].

Batch and past length are dynamic. The cache carries only the KV heads (GQA
models: SmolLM2 has 3 for 9 query heads). Position ids are derived from the
attention mask (cumulative sum − 1), so left-padded batches decode correctly.
"""

from __future__ import annotations

import logging
import statistics
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from core.adapters.base import task_output_name

from export.onnx_export import _eager_attention, name_initializers_after_parameters, save_onnx

log = logging.getLogger(__name__)

LOGITS = task_output_name("causal-lm")
"""The graphs' first output (the causal-LM task output of every exported graph)."""


@dataclass(frozen=True)
class CacheLayout:
    layers: int
    kv_heads: tuple[int, ...]
    """KV heads of every layer (they differ between layers after structured pruning)."""
    head_dim: int

    @property
    def past_names(self) -> list[str]:
        return [f"past_{kind}_{i}" for i in range(self.layers) for kind in ("key", "value")]

    @property
    def present_names(self) -> list[str]:
        return [n.replace("past_", "present_", 1) for n in self.past_names]

    def empty(self, batch: int, dtype: Any = np.float32) -> dict[str, np.ndarray]:
        return {n: np.zeros((batch, self.kv_heads[i // 2], 0, self.head_dim), dtype) for i, n in enumerate(self.past_names)}


def cache_layout(model: torch.nn.Module, adapter: Any) -> CacheLayout:
    from core.structure import head_dim, layer_shapes

    shapes = layer_shapes(model, adapter)
    return CacheLayout(len(shapes), tuple(s.kv_heads for s in shapes), head_dim(adapter, model.config))


def _presents(cache: Any, layers: int) -> list[torch.Tensor]:
    out = []
    for i in range(layers):
        layer = cache.layers[i]
        out += [layer.keys, layer.values]
    return out


class _Prefill(torch.nn.Module):
    def __init__(self, model: torch.nn.Module, layers: int):
        super().__init__()
        self.model, self.layers = model, layers

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from transformers import DynamicCache

        pos = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        # a full-length cache in every layer (no config: no sliding-window layers that drop old positions):
        # the presents keep one shape rule, and a sliding window (Gemma, Mistral) is applied by the attention mask
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos, past_key_values=DynamicCache(), use_cache=True)
        return (out.logits, *_presents(out.past_key_values, self.layers))


class _Decode(torch.nn.Module):
    def __init__(self, model: torch.nn.Module, layers: int):
        super().__init__()
        self.model, self.layers = model, layers

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, past: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        from transformers import DynamicCache

        cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(self.layers)])  # full layers, as in _Prefill
        pos = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, -input_ids.shape[1] :]
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos, past_key_values=cache, use_cache=True)
        return (out.logits, *_presents(out.past_key_values, self.layers))


def export_kv_graphs(model: torch.nn.Module, adapter: Any, out_dir: Path, opset: int = 18) -> dict[str, Any]:
    """Write ``prefill.onnx`` and ``decode.onnx`` (dynamo exporter) into ``out_dir``."""
    if adapter.task != "causal-lm":
        raise ValueError(f"KV-cache graphs are for causal LMs; '{adapter.family}' is an {adapter.task}")
    lay = cache_layout(model, adapter)
    out_dir = Path(out_dir)
    vocab = int(model.config.vocab_size)
    g = torch.Generator().manual_seed(0)
    info: dict[str, Any] = {"layers": lay.layers, "kv_heads": list(lay.kv_heads), "head_dim": lay.head_dim, "opset": opset}
    with warnings.catch_warnings(), torch.no_grad(), _eager_attention(model):
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        ids = torch.randint(3, vocab, (2, 8), generator=g)
        prefill = torch.onnx.export(
            _Prefill(model, lay.layers).eval(),
            (ids, torch.ones_like(ids)),
            dynamo=True,
            opset_version=opset,
            input_names=["input_ids", "attention_mask"],
            output_names=[LOGITS, *lay.present_names],
            dynamic_shapes=({0: "batch", 1: "sequence"}, {0: "batch", 1: "sequence"}),
            verbose=False,
        )
        info["prefill_export_seconds"] = round(time.perf_counter() - t0, 2)
        t0 = time.perf_counter()
        past = tuple(torch.randn(2, lay.kv_heads[i // 2], 5, lay.head_dim, generator=g) for i in range(len(lay.past_names)))
        new = torch.randint(3, vocab, (2, 1), generator=g)
        decode = torch.onnx.export(
            _Decode(model, lay.layers).eval(),
            (new, torch.ones(2, 6, dtype=torch.long), past),
            dynamo=True,
            opset_version=opset,
            input_names=["input_ids", "attention_mask", *lay.past_names],
            output_names=[LOGITS, *lay.present_names],
            dynamic_shapes=({0: "batch"}, {0: "batch", 1: "total"}, tuple({0: "batch", 2: "past"} for _ in lay.past_names)),
            verbose=False,
        )
        info["decode_export_seconds"] = round(time.perf_counter() - t0, 2)
    for name, program in (("prefill", prefill), ("decode", decode)):
        proto = program.model_proto
        name_initializers_after_parameters(proto, model)
        path = out_dir / f"{name}.onnx"
        save_onnx(proto, path)
        onnx.checker.check_model(str(path), full_check=False)
        info[f"{name}_bytes"] = path.stat().st_size
    log.info("exported prefill/decode graphs in %.1f s", info["prefill_export_seconds"] + info["decode_export_seconds"])
    return info


@dataclass
class GreedyResult:
    tokens: np.ndarray
    """(batch, new) generated token ids."""
    step_logits: list[np.ndarray]
    """Last-position logits (batch, vocab) of every step, the prefill's first."""
    prefill_ms: float
    decode_ms: list[float]


def greedy_generate(prefill: Any, decode: Any, layout: CacheLayout, input_ids: np.ndarray, new_tokens: int) -> GreedyResult:
    """Greedy decoding with a prefill runner and a decode runner (``infer(feeds) -> dict``)."""
    ids = np.asarray(input_ids, np.int64)
    mask = np.ones_like(ids)
    t0 = time.perf_counter()
    out = prefill.infer({"input_ids": ids, "attention_mask": mask})
    prefill_ms = (time.perf_counter() - t0) * 1e3
    past = {p: out[q] for p, q in zip(layout.past_names, layout.present_names)}
    logits = out[LOGITS][:, -1]
    steps, tokens, times = [logits], [], []
    for _ in range(new_tokens):
        nxt = logits.argmax(-1).astype(np.int64)[:, None]
        tokens.append(nxt)
        if len(tokens) == new_tokens:
            break
        mask = np.concatenate([mask, np.ones_like(nxt)], 1)
        t0 = time.perf_counter()
        out = decode.infer({"input_ids": nxt, "attention_mask": mask, **past})
        times.append((time.perf_counter() - t0) * 1e3)
        past = {p: out[q] for p, q in zip(layout.past_names, layout.present_names)}
        logits = out[LOGITS][:, -1]
        steps.append(logits)
    return GreedyResult(np.concatenate(tokens, 1), steps, prefill_ms, times)


def decode_timing(prefill: Any, decode: Any, layout: CacheLayout, prompt: np.ndarray, new_tokens: int) -> dict[str, float]:
    """One greedy run, timed: prefill ms and mean decode ms per token."""
    res = greedy_generate(prefill, decode, layout, prompt, new_tokens)
    return {"decode_ms_per_token": statistics.mean(res.decode_ms), "prefill_ms": res.prefill_ms}


def compare_with_generate(result: GreedyResult, model: torch.nn.Module, prompt: np.ndarray) -> dict[str, Any]:
    """Greedy ``model.generate`` for as many tokens as ``result`` holds, compared token by token and
    step by step (max |Δlogit| of each step's last-position logits). EOS does not stop the
    reference; the model's generation config is restored afterwards. (A copied config passed to
    ``generate`` does not do: transformers refills its unset ``eos_token_id`` from the model's.)"""
    n = result.tokens.shape[1]
    cfg = model.generation_config
    eos = cfg.eos_token_id
    cfg.eos_token_id = None
    try:
        with torch.no_grad():
            ref = model.generate(
                torch.from_numpy(prompt), attention_mask=torch.ones(prompt.shape, dtype=torch.long),
                max_new_tokens=n, do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0,
            )
    finally:
        cfg.eos_token_id = eos
    deltas = [float(np.abs(a - b.numpy()).max()) for a, b in zip(result.step_logits, ref.logits)]
    ref_tokens = ref.sequences[:, prompt.shape[1] :].numpy()
    out = {
        "greedy_tokens": n,
        "tokens_identical": bool(np.array_equal(result.tokens, ref_tokens)),
        "leading_tokens_identical": _leading_equal(result.tokens, ref_tokens),
        "max_abs_logit_delta": max(deltas),
        "max_abs_logit_delta_per_step": deltas,
    }
    if not out["tokens_identical"]:
        out["fp64_reference"] = _fp64_decode(result, model, prompt, ref_tokens, ref.logits[0].numpy())
    return out


def _leading_equal(a: np.ndarray, b: np.ndarray) -> int:
    """How many leading tokens two (batch, n) generations share in every row."""
    same = (a == b).all(axis=0)
    return int(same.argmin()) if not same.all() else int(same.size)


def _fp64_decode(result: GreedyResult, model: torch.nn.Module, prompt: np.ndarray, torch_tokens: np.ndarray, torch_first: np.ndarray) -> dict[str, Any]:
    """Diagnose differing greedy tokens against the same model run in float64: how many leading
    tokens the engine and PyTorch fp32 each share with it, and each one's distance from its
    first-step (prefill) logits. When PyTorch fp32 strays from float64 as early as the engine does,
    the tokens differ at the model's rounding floor (a per-token top-k flips on an ulp), not
    because the graph computes something else."""
    from core.models import float64_copy

    n = result.tokens.shape[1]
    try:
        ref = float64_copy(model)
    except ValueError as e:
        return {"skipped": str(e)}
    cfg = ref.generation_config
    cfg.eos_token_id = None  # the copy's config: the caller's model is untouched
    with torch.no_grad():
        out = ref.generate(
            torch.from_numpy(prompt), attention_mask=torch.ones(prompt.shape, dtype=torch.long),
            max_new_tokens=n, do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0,
        )
    tokens64, first64 = out.sequences[:, prompt.shape[1] :].numpy(), out.logits[0].double().numpy()
    del ref
    return {
        "engine_tokens_equal_fp64": _leading_equal(result.tokens, tokens64),
        "torch_fp32_tokens_equal_fp64": _leading_equal(torch_tokens, tokens64),
        "engine_first_step_vs_fp64": float(np.abs(result.step_logits[0] - first64).max()),
        "torch_fp32_first_step_vs_fp64": float(np.abs(torch_first - first64).max()),
    }
