"""A decoder graph of ONNX Runtime's fused CPU contrib ops, written straight from a saved model's
weights (no tracing): one graph for prompt and decode steps, the KV cache in preallocated buffers.

Per block (Llama-style families: those whose adapter fills ``native``)::

    x ── SkipSimplifiedLayerNormalization(·, residual, attn_norm) ──┬── residual'
         └─ MatMul [H, (n + 2·kv)·hd] (q, k, v packed; + Add of Qwen2's biases)
            └─ GroupQueryAttention(do_rotary=1, shared past/present buffers) ── MatMul o ─┐
    SkipSimplifiedLayerNormalization(·, residual', mlp_norm) ──┬── residual''            │
         └─ MatMul gate, MatMul up ── Sigmoid, Mul, Mul ── MatMul down ─────────────┘

against the traced graph's decomposed RMSNorm (Pow/ReduceMean/Add/Sqrt/Reciprocal/Mul), rotary
embedding (Slice/Neg/Concat), ``repeat_kv`` (Expand/Reshape) and per-token KV ``Concat``. The
final norm feeds only the last position into the LM head, a ``Gemm(transB=1)`` on the embedding
itself when the head is tied (the file holds one copy). A quantized model's linears are written as
``MatMulNBits`` from its grids (q/k/v packed row-wise, which the per-row blocks allow), decoded back
and checked bit for bit against the model's dequantized weights.

Inputs: ``input_ids`` [batch, sequence] int64; ``attention_mask`` [batch, total] int64 (all ones:
rows are unpadded — ``seqlens_k`` and the total length come from it); ``logits_to_keep`` [1] int64
(how many last positions get logits: 1 when generating, the sequence for perplexity);
``past_key_values.<i>.key`` / ``.value`` [batch, kv_heads_i, capacity, head_dim]. Outputs:
``logits`` [batch, logits_to_keep, vocab] and ``present.<i>.key`` / ``.value``, which a caller binds
to the same buffers as the pasts (``GroupQueryAttention`` then appends in place: no per-token copy
of the cache).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import PipelineError
from engines.base import sliding_window

log = logging.getLogger(__name__)

MS = "com.microsoft"
GRAPH = "model.fused.onnx"


class FusedGraphError(PipelineError):
    """The model cannot be written as a fused graph (the message says why)."""


@dataclass(frozen=True)
class FusedLayout:
    """What a caller needs to drive the graph."""

    layers: int
    kv_heads: tuple[int, ...]
    """KV heads of every block that has attention (structured removal can change them per block)."""
    head_dim: int
    vocab: int
    max_positions: int
    """Rows of the rotary caches: prompt + generated tokens may not exceed it."""

    def past_name(self, i: int, kind: str) -> str:
        return f"past_key_values.{i}.{kind}"

    def present_name(self, i: int, kind: str) -> str:
        return f"present.{i}.{kind}"

    def to_dict(self) -> dict[str, Any]:
        return {"layers": self.layers, "kv_heads": list(self.kv_heads), "head_dim": self.head_dim, "vocab": self.vocab, "max_positions": self.max_positions}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FusedLayout":
        return cls(int(d["layers"]), tuple(int(k) for k in d["kv_heads"]), int(d["head_dim"]), int(d["vocab"]), int(d["max_positions"]))


CONTEXTUAL = "a contextual-sparsity variant picks heads/neurons per input with predictors, which the fused graph does not run; use onnxruntime-cpu or native-cpu"
ACTIVATION = "an activation-sparsity variant thresholds its activations, which the fused graph does not; use native-cpu"


def unsupported(adapter: Any, config: Any) -> str | None:
    """None when the model can be written as a fused graph, else the reason it cannot."""
    from engines.base import llama_style_unsupported

    why = llama_style_unsupported(adapter, config, "fused decoder graph")
    if why is None and getattr(config, "contextual", None) is not None:
        why = CONTEXTUAL
    if why is None and getattr(config, "activation_sparsity", None) is not None:
        why = ACTIVATION
    return why


def _rope_caches(theta: float, head_dim: int, positions: int) -> tuple[np.ndarray, np.ndarray]:
    """cos / sin [positions, head_dim / 2] as transformers computes them (float32 inverse frequencies)."""
    import torch

    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    freqs = torch.outer(torch.arange(positions, dtype=torch.float32), inv)
    return freqs.cos().numpy().astype(np.float32), freqs.sin().numpy().astype(np.float32)


def load_weights(model_dir: Path) -> dict[str, np.ndarray]:
    from core.errors import ModelLoadError
    from core.models import weight_arrays

    try:
        return weight_arrays(model_dir)
    except ModelLoadError as exc:
        raise FusedGraphError(str(exc)) from None


class _Builder:
    def __init__(self) -> None:
        from onnx import helper

        self.h = helper
        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        self.n = 0

    def init(self, name: str, arr: np.ndarray) -> str:
        from onnx import numpy_helper

        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
        return name

    def node(self, op: str, inputs: list[str], outputs: int | list[str] = 1, domain: str = "", name: str | None = None, **attrs: Any) -> list[str]:
        self.n += 1
        tag = name or f"{op}_{self.n}"
        outs = outputs if isinstance(outputs, list) else [f"{tag}/out{j}" for j in range(outputs)]
        self.nodes.append(self.h.make_node(op, inputs, outs, name=tag, domain=domain, **attrs))
        return outs


class _Linears:
    """Writes a (possibly row-stacked) linear as MatMul on [in, out] fp32, or MatMulNBits from the grids."""

    def __init__(self, b: _Builder, quant: dict[str, Any] | None, grids: dict[str, np.ndarray]):
        self.b, self.quant, self.grids = b, quant, grids
        self.quantized = set(quant["weights"]) if quant else set()
        self.zeros = {"before": 0, "kept": 0}
        self.nbits = 0

    def __call__(self, x: str, names: list[str], weights: list[np.ndarray], tag: str) -> str:
        q = [n in self.quantized for n in names]
        if any(q) and not all(q):
            raise FusedGraphError(f"'{tag}': {[n for n, f in zip(names, q) if not f]} are fp32 beside quantized {[n for n, f in zip(names, q) if f]}; they cannot share one MatMulNBits")
        if not all(q):
            w = weights[0] if len(weights) == 1 else np.concatenate(weights, axis=0)  # (out, in)
            return self.b.node("MatMul", [x, self.b.init(f"{tag}.weight.T", np.ascontiguousarray(w.T, np.float32))], name=f"{tag}/MatMul")[0]
        from core.quant import PackMismatch, QuantScheme, pack_exact

        scheme = QuantScheme.from_dict(self.quant)
        try:
            packs = [pack_exact(n, part, self.grids[f"{n}.scale"], self.grids[f"{n}.zero"], scheme) for n, part in zip(names, weights)]
        except PackMismatch as exc:
            raise FusedGraphError(str(exc)) from None
        for p in packs:
            self.zeros["before"] += p.zeros_before
            self.zeros["kept"] += p.zeros_kept
        self.nbits += len(names)
        ins = [
            x,
            self.b.init(f"{tag}.q{scheme.bits}", np.concatenate([p.b for p in packs], 0)),
            self.b.init(f"{tag}.scales", np.concatenate([p.scales for p in packs], 0)),
            self.b.init(f"{tag}.zero_points", np.concatenate([p.zero_points for p in packs], 0)),
        ]
        return self.b.node(
            "MatMulNBits", ins, domain=MS, name=f"{tag}/MatMulNBits", K=int(weights[0].shape[1]), N=sum(int(w.shape[0]) for w in weights),
            bits=scheme.bits, block_size=scheme.block_size, accuracy_level=scheme.accuracy_level,
        )[0]


def build_fused_graph(model_dir: Path, out_path: Path, max_positions: int | None = None) -> dict[str, Any]:
    """Write the fused graph of the saved model in ``model_dir`` to ``out_path`` (weights in
    ``<name>.data`` beside it, the :class:`FusedLayout` in ``layout.json``). The rotary tables get
    ``max_positions`` rows, at most the model's context (the context when None). Returns facts for the
    artifact record, ``layout`` among them."""
    import onnx
    from onnx import TensorProto, helper
    from transformers import AutoConfig

    from core.adapters import adapter_for
    from core.structure import head_dim as head_dim_of

    t0 = time.perf_counter()
    model_dir, out_path = Path(model_dir), Path(out_path)
    config = AutoConfig.from_pretrained(str(model_dir))
    adapter = adapter_for(config)
    why = unsupported(adapter, config)
    if why:
        raise FusedGraphError(why)
    t = load_weights(model_dir)
    quant = getattr(config, "weight_quantization", None)
    grids: dict[str, np.ndarray] = {}
    if quant:
        from core.errors import ModelLoadError
        from core.models import quantization_arrays

        try:
            grids = quantization_arrays(model_dir, quant)
        except ModelLoadError as exc:
            raise FusedGraphError(str(exc)) from None
    a, c = adapter, config
    hd = int(head_dim_of(a, c))
    eps = float(getattr(c, "rms_norm_eps", 1e-6))
    layers = int(a.config_value(c, "layers"))
    hidden = int(a.config_value(c, "hidden"))
    vocab = int(c.vocab_size)
    try:
        context: int | None = a.config_value(c, "context")
    except ValueError:  # a config without a context length: the cap alone bounds the tables
        context = None
    if max_positions is None and context is None:
        raise FusedGraphError(f"'{model_dir}/config.json' gives no context length; pass max_positions")
    positions = min(p for p in (max_positions, context) if p is not None)
    window = sliding_window(c)
    b = _Builder()
    lin = _Linears(b, quant, grids)

    def weight(name: str) -> np.ndarray:
        if name not in t:
            raise FusedGraphError(f"weight '{name}' is missing from '{model_dir}'")
        return np.asarray(t[name], np.float32)

    embed_name = a.native["embed"] + ".weight"
    head_name = f"{a.head_path}.weight"
    if embed_name not in t and head_name in t and getattr(c, "tie_word_embeddings", False):
        embed_name = head_name
    embed = weight(embed_name)
    b.init("embed.weight", embed)
    from core.models import rope_theta

    cos, sin = _rope_caches(rope_theta(c), hd, positions)
    b.init("cos_cache", cos)
    b.init("sin_cache", sin)

    # seqlens_k = Σ mask − 1 (int32, per row); total_sequence_length = mask columns (int32 scalar)
    b.init("one_i64", np.array([1], np.int64))
    s = b.node("ReduceSum", ["attention_mask", "one_i64"], keepdims=0, name="seqlens/ReduceSum")[0]
    s = b.node("Sub", [s, "one_i64"], name="seqlens/Sub")[0]
    seqlens = b.node("Cast", [s], to=TensorProto.INT32, name="seqlens/Cast")[0]
    shape = b.node("Shape", ["attention_mask"], name="total/Shape")[0]
    b.init("one_idx", np.array(1, np.int64))
    total = b.node("Gather", [shape, "one_idx"], axis=0, name="total/Gather")[0]
    total = b.node("Cast", [total], to=TensorProto.INT32, name="total/Cast")[0]

    x = b.node("Gather", ["embed.weight", "input_ids"], name="embed/Gather")[0]
    residual: str | None = None
    pending: str | None = None  # the last linear's output, not yet added to the residual
    kv_heads: list[int] = []
    cache_io: list[tuple[int, int]] = []

    def norm(w_name: str, tag: str) -> str:
        nonlocal residual, pending
        gamma = b.init(f"{w_name}", weight(w_name))
        if pending is None:
            y = b.node("SimplifiedLayerNormalization", [x, gamma], outputs=[f"{tag}/out"], name=tag, epsilon=eps, axis=-1, stash_type=1)[0]
            residual = x
        else:
            outs = b.node("SkipSimplifiedLayerNormalization", [pending, residual, gamma], outputs=[f"{tag}/out", "", "", f"{tag}/residual"], domain=MS, name=tag, epsilon=eps)
            y, residual = outs[0], outs[3]
        pending = None
        return y

    for i in range(layers):
        p = f"{a.blocks_path}.{i}."
        lp = {role: p + path for role, path in a.linear_paths.items()}
        wq, wk, wv = (weight(lp[r] + ".weight") for r in ("q", "k", "v"))
        heads, kv = wq.shape[0] // hd, wk.shape[0] // hd
        if heads:
            if kv == 0 or heads % kv:
                raise FusedGraphError(f"block {i}: {heads} query heads for {kv} KV heads; GroupQueryAttention needs a whole number of query heads per KV head")
            h = norm(p + a.native["attn_norm"] + ".weight", f"layers.{i}/attn_norm")
            qkv = lin(h, [lp["q"] + ".weight", lp["k"] + ".weight", lp["v"] + ".weight"], [wq, wk, wv], f"layers.{i}.qkv")
            biases = [t.get(lp[r] + ".bias") for r in ("q", "k", "v")]
            if any(bb is not None for bb in biases):
                if not all(bb is not None for bb in biases):
                    raise FusedGraphError(f"block {i}: q/k/v biases must all be present or all absent")
                qkv = b.node("Add", [qkv, b.init(f"layers.{i}.qkv.bias", np.concatenate(biases).astype(np.float32))], name=f"layers.{i}.qkv/Add")[0]
            j = len(kv_heads)
            kv_heads.append(kv)
            cache_io.append((i, kv))
            attn = b.node(
                "GroupQueryAttention",
                [qkv, "", "", f"past_key_values.{j}.key", f"past_key_values.{j}.value", seqlens, total, "cos_cache", "sin_cache"],
                outputs=[f"layers.{i}/attn/out", f"present.{j}.key", f"present.{j}.value"],
                domain=MS, name=f"layers.{i}/attn/GroupQueryAttention", num_heads=heads, kv_num_heads=kv, do_rotary=1, rotary_interleaved=0,
                scale=1.0 / math.sqrt(hd), local_window_size=window,
            )[0]
            pending = lin(attn, [lp["o"] + ".weight"], [weight(lp["o"] + ".weight")], f"layers.{i}.o")
        wg, wu = weight(lp["gate"] + ".weight"), weight(lp["up"] + ".weight")
        if wg.shape[0]:
            h = norm(p + a.native["mlp_norm"] + ".weight", f"layers.{i}/mlp_norm")
            # gate and up as two products: packed into one [H, 2·F] product they needed a Split after it
            # (1.7 % of a decode step's kernel time on SmolLM2) and read the same bytes (ONNX Runtime 1.32
            # has a SwiGLU contrib op that would take the pair unsplit, but no CPU kernel for it)
            g = lin(h, [lp["gate"] + ".weight"], [wg], f"layers.{i}.gate")
            u = lin(h, [lp["up"] + ".weight"], [wu], f"layers.{i}.up")
            sg = b.node("Sigmoid", [g], name=f"layers.{i}/mlp/Sigmoid")[0]
            act = b.node("Mul", [g, sg], name=f"layers.{i}/mlp/SiLU")[0]
            act = b.node("Mul", [act, u], name=f"layers.{i}/mlp/Mul")[0]
            pending = lin(act, [lp["down"] + ".weight"], [weight(lp["down"] + ".weight")], f"layers.{i}.down")
    y = norm(a.native["final_norm"] + ".weight", "final_norm")
    # only the last ``logits_to_keep`` positions reach the LM head (1 when generating)
    b.init("max_i64", np.array([np.iinfo(np.int64).max], np.int64))
    start = b.node("Neg", ["logits_to_keep"], name="last/Neg")[0]
    last = b.node("Slice", [y, start, "max_i64", "one_i64"], name="last/Slice")[0]  # [B, k, H]
    tied = head_name not in t or np.array_equal(np.asarray(t[head_name]), embed)
    if head_name in (quant or {}).get("weights", []):
        tied = False
    if tied:
        b.init("hidden_shape", np.array([-1, hidden], np.int64))
        flat = b.node("Reshape", [last, "hidden_shape"], name="head/Reshape")[0]
        logits2 = b.node("Gemm", [flat, "embed.weight"], transB=1, name="head/Gemm")[0]
        b.init("zero_i64", np.array([0], np.int64))
        b.init("two_i64", np.array([2], np.int64))
        b.init("vocab_i64", np.array([vocab], np.int64))
        lead = b.node("Slice", [b.node("Shape", [last], name="head/Shape")[0], "zero_i64", "two_i64"], name="head/SliceShape")[0]
        shape3 = b.node("Concat", [lead, "vocab_i64"], axis=0, name="head/Concat")[0]
        b.node("Reshape", [logits2, shape3], outputs=["logits"], name="head/ReshapeOut")
    else:
        out = lin(last, [head_name], [weight(head_name)], "head")
        b.node("Identity", [out], outputs=["logits"], name="head/Identity")

    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    inputs = [
        helper.make_tensor_value_info("input_ids", i64, ["batch", "sequence"]),
        helper.make_tensor_value_info("attention_mask", i64, ["batch", "total"]),
        helper.make_tensor_value_info("logits_to_keep", i64, [1]),
    ]
    outputs = [helper.make_tensor_value_info("logits", f32, ["batch", "kept", vocab])]
    for j, (i, kv) in enumerate(cache_io):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{j}.{kind}", f32, ["batch", kv, "capacity", hd]))
            outputs.append(helper.make_tensor_value_info(f"present.{j}.{kind}", f32, ["batch", kv, "capacity", hd]))
    graph = helper.make_graph(b.nodes, "fused_decoder", inputs, outputs, b.inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS, 1)], producer_name="prune-pipeline fused graph")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    data = out_path.with_name(out_path.name + ".data")
    data.unlink(missing_ok=True)
    onnx.save_model(proto, str(out_path), save_as_external_data=True, all_tensors_to_one_file=True, location=data.name, size_threshold=1024)
    layout = FusedLayout(len(cache_io), tuple(kv_heads), hd, vocab, positions)
    (out_path.parent / "layout.json").write_text(json.dumps(layout.to_dict(), indent=2), encoding="utf-8")
    info = {
        "layout": layout.to_dict(),
        "nodes": len(b.nodes),
        "op_counts": _op_counts(b.nodes),
        "tied_head": bool(tied),
        "bytes": out_path.stat().st_size + data.stat().st_size,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    if quant:
        info["quantization"] = {"label": f"int{quant['bits']}", "weights": lin.nbits, "zeros_before": lin.zeros["before"], "zeros_kept": lin.zeros["kept"], "zeros_preserved": lin.zeros["kept"] == lin.zeros["before"]}
    log.info("fused graph: %d nodes, %.1f MB, in %.1f s", info["nodes"], info["bytes"] / 1e6, info["seconds"])
    return info


def _op_counts(nodes: list[Any]) -> dict[str, int]:
    out: dict[str, int] = {}
    for n in nodes:
        out[n.op_type] = out.get(n.op_type, 0) + 1
    return dict(sorted(out.items()))


def read_layout(artifact_dir: Path) -> FusedLayout:
    return FusedLayout.from_dict(json.loads((Path(artifact_dir) / "layout.json").read_text(encoding="utf-8")))
