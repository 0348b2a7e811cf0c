"""Rewrite a quantized variant's ONNX graph so it stores and runs its weights quantized.

The variant's graph arrives with the dequantized fp32 weights (rebound into the dense graph or
exported); its model carries the grids (``passes/quantize.py``, ``core/quant.py``). Rules:

1. A ``MatMul`` whose B input is the initializer ``<w>.T`` (``[in, out]``) of a quantized weight ``<w>``,
   or ``Transpose(perm=[1, 0])`` of the initializer ``<w>`` (the Transpose is removed when nothing else
   reads it), becomes ``com.microsoft.MatMulNBits(A, B uint8 [out, blocks, block·bits/8], scales [out·blocks],
   zero_points)`` with ``K``, ``N``, ``bits``, ``block_size`` and ``accuracy_level``; the output keeps
   its name, so nothing downstream changes. (Not ``DynamicQuantizeMatMul`` for 8 bits: it quantizes
   the activations per tensor, and SmolLM2's outlier channels then flip 42 % of next-token choices
   against 6 % per block — ``benchmarks/quant_probe.py``; MatMulNBits quantizes them per block.)
2. The packed weight is decoded back and must equal the model's dequantized weight bit for bit
   (``(q − zero) · scale`` in float32 on both sides); in particular every weight that is zero in the
   model (a pruned position) is zero in the graph. A mismatch is an error, never a silent change.
3. The fp32 initializer is removed when no other node reads it.

A quantized weight the graph does not hold as ``<w>.T`` under a MatMul (another layout, a Gemm, a
shared initializer) is an error naming it: the graph would otherwise ship that weight in fp32.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from core.quant import PackMismatch, QuantScheme, pack_exact

log = logging.getLogger(__name__)

MS_DOMAIN = "com.microsoft"


class QuantizeGraphError(ValueError):
    """The graph cannot carry the model's quantized weights as the rules above require."""


def _param_name(init_name: str, weights: set[str]) -> str | None:
    if not init_name.endswith(".T"):
        return None
    base = init_name[:-2]
    if base in weights:
        return base
    if base.startswith("model.") and base[len("model."):] in weights:
        return base[len("model."):]  # the exporter's wrapper prefixes some names
    return None


def _weight_of(node: onnx.NodeProto, inits: dict[str, int], producers: dict[str, onnx.NodeProto], weights: set[str]) -> tuple[str, str, onnx.NodeProto | None] | None:
    """(weight, initializer, Transpose node or None) when ``node`` is a MatMul whose B is a quantized weight:
    the initializer ``<w>.T`` itself, or ``Transpose(perm=[1, 0])`` of the initializer ``<w>`` (how the
    dynamo exporter leaves an untied LM head)."""
    if node.op_type != "MatMul" or len(node.input) != 2:
        return None
    b = node.input[1]
    if b in inits:
        base = _param_name(b, weights)
        return None if base is None else (base, b, None)
    t = producers.get(b)
    if t is None or t.op_type != "Transpose" or t.input[0] not in inits:
        return None
    perm = next((list(a.ints) for a in t.attribute if a.name == "perm"), [1, 0])
    base = _param_name(t.input[0] + ".T", weights)
    return None if base is None or perm != [1, 0] else (base, t.input[0], t)


def _found_by_value(g: onnx.GraphProto, inits: dict[str, int], producers: dict[str, onnx.NodeProto], weights: set[str], value_of: Any) -> dict[int, tuple[str, str, None]]:
    """MatMuls whose B initializer holds, under another parameter's name, the transposed values of a quantized
    weight that no initializer is named after (rule 1 by value): {id(node): (weight, initializer, None)}."""
    named = {f[0] for n in g.node if (f := _weight_of(n, inits, producers, weights)) is not None}
    missing = sorted(weights - named)
    out: dict[int, tuple[str, str, None]] = {}
    if not missing or value_of is None:
        return out
    for w in missing:
        want = np.ascontiguousarray(np.asarray(value_of(w), np.float32).T)
        for n in g.node:
            b = n.input[1] if n.op_type == "MatMul" and len(n.input) == 2 else None
            if b in inits and id(n) not in out and tuple(g.initializer[inits[b]].dims) == want.shape:
                if np.array_equal(numpy_helper.to_array(g.initializer[inits[b]]), want):
                    out[id(n)] = (w, b, None)
                    break
    return out


def rewrite_quantized(src: Path, dst: Path, spec: dict[str, Any], tensors: dict[str, Any], value_of: Any = None) -> dict[str, Any]:
    """Rewrite ``src`` into ``dst`` (may be the same path) with the weights ``spec['weights']`` quantized on
    the grids in ``tensors`` (``<w>.scale``, ``<w>.zero``: torch or numpy). ``value_of(name)`` (optional)
    gives a weight's ``(out, in)`` values, to find one the exporter named after another parameter with
    equal values (an LM head whose quantized values equal the embedding). Returns facts for the stage record."""
    from export.onnx_export import save_onnx

    t0 = time.perf_counter()
    scheme = QuantScheme.from_dict(spec)
    weights = set(spec["weights"])
    proto = onnx.load(str(src))
    g = proto.graph
    inits = {t.name: i for i, t in enumerate(g.initializer)}
    readers: dict[str, int] = {}
    for node in g.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    done: set[str] = set()
    zeros = {"before": 0, "kept": 0}
    new_inits: list[onnx.TensorProto] = []
    drop: set[str] = set()
    nodes = []
    producers = {o: n for n in g.node for o in n.output}
    dead_nodes: set[int] = set()
    by_value = _found_by_value(g, inits, producers, weights, value_of)
    for node in g.node:
        found = _weight_of(node, inits, producers, weights) or by_value.get(id(node))
        if found is None:
            nodes.append(node)
            continue
        base, init_name, transpose = found
        w_t = numpy_helper.to_array(g.initializer[inits[init_name]])  # [in, out], or (out, in) under a Transpose
        w = np.ascontiguousarray(w_t if transpose is not None else w_t.T).astype(np.float32)  # (out, in)
        try:
            packed = pack_exact(base, w, tensors[f"{base}.scale"], tensors[f"{base}.zero"], scheme)
        except PackMismatch as exc:
            raise QuantizeGraphError(str(exc)) from None
        n_out, k = w.shape
        q_inits = [
            numpy_helper.from_array(packed.b, f"{base}.q{scheme.bits}"),
            numpy_helper.from_array(packed.scales, f"{base}.scales"),
            numpy_helper.from_array(packed.zero_points, f"{base}.zero_points"),
        ]
        new = helper.make_node(
            "MatMulNBits", [node.input[0], *(t.name for t in q_inits)], list(node.output), name=f"{base}/MatMulNBits", domain=MS_DOMAIN,
            K=k, N=n_out, bits=scheme.bits, block_size=scheme.block_size, accuracy_level=scheme.accuracy_level,
        )
        zeros["before"] += packed.zeros_before
        zeros["kept"] += packed.zeros_kept
        if base not in done:
            new_inits.extend(q_inits)
        done.add(base)
        nodes.append(new)
        readers[node.input[1]] -= 1
        if transpose is not None and readers[node.input[1]] == 0:
            dead_nodes.add(id(transpose))
            readers[init_name] -= 1
        if readers[init_name] == 0:
            drop.add(init_name)
    missing = sorted(weights - done)
    if missing:
        raise QuantizeGraphError(
            f"{len(missing)} quantized weights are not a MatMul's '<weight>.T' initializer in '{src.name}' (first: '{missing[0]}'); "
            "the graph would keep them in fp32"
        )
    kept = [t for t in g.initializer if t.name not in drop]
    del g.initializer[:]
    g.initializer.extend(kept + new_inits)
    del g.node[:]
    g.node.extend(n for n in nodes if id(n) not in dead_nodes)
    if not any(o.domain == MS_DOMAIN for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    dst = Path(dst)  # inside a stage's temporary directory: the stage, not this write, is atomic
    dst.with_name(dst.name + ".data").unlink(missing_ok=True)  # the fp32 graph's external weights, if any
    save_onnx(proto, dst)
    seconds = time.perf_counter() - t0
    log.info("%s: %d weights quantized to %s in the graph in %.1f s; %d of %d zeros kept", dst.name, len(done), scheme.label, seconds, zeros["kept"], zeros["before"])
    return {
        "scheme": scheme.to_dict(),
        "label": scheme.label,
        "weights": len(done),
        "zeros_before": zeros["before"],
        "zeros_kept": zeros["kept"],
        "zeros_preserved": zeros["kept"] == zeros["before"],
        "onnx_bytes": dst.stat().st_size + sum(p.stat().st_size for p in dst.parent.glob(dst.name + ".data")),
        "seconds": round(seconds, 2),
    }
