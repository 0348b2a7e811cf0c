"""Export a (pruned) PyTorch model to ONNX.

Graph contract: inputs ``input_ids`` (int64, [batch, sequence]) and ``attention_mask`` (int64,
[batch, sequence]); one float32 output named for the task (``core.adapters.base.TASK_OUTPUT``):
a causal LM's logits [batch, sequence, vocab], an encoder's final hidden states
[batch, sequence, hidden].
Batch and sequence are dynamic. Weight initialisers are renamed after the
PyTorch parameters they hold (``<param>`` as stored, ``<param>.T`` when the
exporter folded a transpose into them), so reports can name layers.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
import warnings
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import onnx
import torch

from core.adapters.base import task_forward, task_output_name

log = logging.getLogger(__name__)

INPUT_NAMES = ("input_ids", "attention_mask")
EXTERNAL_DATA_THRESHOLD = 1_800_000_000  # protobuf's 2 GiB limit, with room for the graph


class _TaskOutput(torch.nn.Module):
    """``input_ids, attention_mask → the task's one output tensor`` (the adapters' task forward call)."""

    def __init__(self, model: torch.nn.Module, task: str):
        super().__init__()
        self.model = model
        self.task = task

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return task_forward(self.model, self.task, input_ids, attention_mask)


def wrap_for_export(model: torch.nn.Module, task: str) -> torch.nn.Module:
    task_output_name(task)  # a ValueError naming the tasks for an unknown one
    return _TaskOutput(model, task).eval()


def export_onnx(
    model: torch.nn.Module,
    task: str,
    path: Path,
    opset: int = 18,
    exporter: str = "dynamo",
    vocab_size: int | None = None,
) -> dict[str, Any]:
    """Export, rename weights, run ``onnx.checker`` and save to ``path``. Returns facts for the manifest."""
    path = Path(path)
    wrapper = wrap_for_export(model, task)
    vocab = vocab_size or int(getattr(model.config, "vocab_size", 1000))
    ids = torch.randint(3, max(vocab, 4), (2, 16), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    out_name = task_output_name(task)
    t0 = time.perf_counter()
    with warnings.catch_warnings(), torch.no_grad(), _eager_attention(model):
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            program = torch.onnx.export(
                wrapper,
                (ids, mask),
                dynamo=True,
                opset_version=opset,
                input_names=list(INPUT_NAMES),
                output_names=[out_name],
                dynamic_shapes={"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}},
                verbose=False,
            )
            proto = program.model_proto
        elif exporter == "torchscript":
            tmp = path.with_suffix(".ts.onnx")
            torch.onnx.export(
                wrapper,
                (ids, mask),
                str(tmp),
                dynamo=False,
                opset_version=opset,
                input_names=list(INPUT_NAMES),
                output_names=[out_name],
                dynamic_axes={n: {0: "batch", 1: "sequence"} for n in (*INPUT_NAMES, out_name)},
            )
            proto = onnx.load(str(tmp))
            tmp.unlink()
        else:
            raise ValueError(f"exporter '{exporter}' is not one of dynamo, torchscript")
    export_s = time.perf_counter() - t0
    renamed = name_initializers_after_parameters(proto, model)
    save_onnx(proto, path)
    onnx.checker.check_model(str(path), full_check=False)
    log.info("exported %s with %s exporter in %.1f s (%d weights named after parameters)", path.name, exporter, export_s, renamed)
    return {
        "exporter": exporter,
        "opset": opset,
        "export_seconds": round(export_s, 2),
        "onnx_bytes": path.stat().st_size + sum(p.stat().st_size for p in path.parent.glob(path.name + ".data")),
        "nodes": len(proto.graph.node),
        "initializers": len(proto.graph.initializer),
        "torch": torch.__version__,
        "onnx": onnx.__version__,
    }


@contextlib.contextmanager
def _eager_attention(model: torch.nn.Module) -> Iterator[None]:
    """Export the eager attention (MatMul, Add mask, Softmax, MatMul) instead of SDPA.

    The exporters decompose SDPA with a NaN-guarded softmax (IsNaN + Where per
    layer; in one ONNX Runtime CPU profile of SmolLM2 they took a sizeable share of a prefill —
    an ad-hoc measurement, not a benchmark in this repository); the eager form is
    the plain pattern runtimes (and TensorRT's MHA fusion) recognise. Restored afterwards.
    """
    before = getattr(model.config, "_attn_implementation", None)
    switch = hasattr(model, "set_attn_implementation") and before not in (None, "eager")
    if switch:
        model.set_attn_implementation("eager")
    try:
        yield
    finally:
        if switch:
            model.set_attn_implementation(before)


def save_onnx(proto: onnx.ModelProto, path: Path) -> None:
    path = Path(path)
    size = sum(t.ByteSize() for t in proto.graph.initializer)
    if size > EXTERNAL_DATA_THRESHOLD:
        onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=path.name + ".data")
    else:
        onnx.save_model(proto, str(path))


def _digest(arr: np.ndarray) -> tuple[tuple[int, ...], str]:
    return tuple(arr.shape), hashlib.sha1(np.ascontiguousarray(arr).tobytes()).hexdigest()


def name_initializers_after_parameters(proto: onnx.ModelProto, model: torch.nn.Module) -> int:
    """Rename initialisers whose bytes equal a parameter (or its transpose). Returns how many were renamed."""
    index: dict[tuple[tuple[int, ...], str], str] = {}
    for name, p in model.named_parameters():
        if p.dim() != 2:
            continue
        a = p.detach().float().numpy()
        index.setdefault(_digest(a), name)
        index.setdefault(_digest(a.T), name + ".T")
    from onnx import numpy_helper

    renames: dict[str, str] = {}
    taken = {t.name for t in proto.graph.initializer}
    for t in proto.graph.initializer:
        if len(t.dims) != 2 or t.data_type != onnx.TensorProto.FLOAT:
            continue
        target = index.get(_digest(numpy_helper.to_array(t)))
        if target and target != t.name and target not in taken:
            renames[t.name] = target
            taken.add(target)
    if not renames:
        return 0
    for t in proto.graph.initializer:
        if t.name in renames:
            t.name = renames[t.name]
    for node in proto.graph.node:
        for i, name in enumerate(node.input):
            if name in renames:
                node.input[i] = renames[name]
    for vi in list(proto.graph.input) + list(proto.graph.value_info):
        if vi.name in renames:
            vi.name = renames[vi.name]
    return len(renames)


class RebindError(ValueError):
    """The dense graph cannot carry this model's weights (shapes differ or a weight is not found)."""


def changed_parameters(dense: torch.nn.Module, model: torch.nn.Module) -> list[str]:
    """Names of ``model``'s parameters whose values differ from ``dense``'s (same architecture)."""
    ref = dict(dense.named_parameters())
    out = []
    for n, p in model.named_parameters():
        d = ref.get(n)
        if d is None or d.shape != p.shape or not torch.equal(d.detach(), p.detach()):
            out.append(n)
    return out


def rebind_weights(dense_onnx: Path, model: torch.nn.Module, required: list[str], path: Path, *, dense: torch.nn.Module) -> dict[str, Any]:
    """Write a copy of ``dense_onnx`` whose parameter-named weights hold ``model``'s values.

    Valid when ``model`` has the dense architecture (unstructured or N:M pruning
    changes values, not shapes): the graph is the same computation, so
    re-running the exporter would only reproduce it. Every name in ``required``
    (the parameters a pass may have changed) must be found as ``<name>`` or
    ``<name>.T`` (or with the exporter's extra ``model.`` prefix), else :class:`RebindError`.
    ``dense`` is the model the graph was exported from: every parameter whose value differs
    from it is required too — a distillation that trained the norms must find them — and one
    whose dense value another parameter shares is refused: the exporter may have merged such
    tensors into one initialiser (a model whose norms are all ones), which cannot hold two values.
    """
    from onnx import numpy_helper

    t0 = time.perf_counter()
    params = {n: p.detach().float() for n, p in model.named_parameters()}
    ref = dict(dense.named_parameters())
    for n in (c for c in changed_parameters(dense, model) if c not in required):  # the linears are their own initialisers
        d = ref.get(n)
        twins = [m for m, q in ref.items() if d is not None and m != n and q.shape == d.shape and torch.equal(q, d)]
        if twins:
            raise RebindError(f"parameter '{n}' changed, and its dense value equals '{twins[0]}': the dense graph may hold both as one initialiser")
        required = [*required, n]
    proto = onnx.load(str(dense_onnx))
    found: set[str] = set()
    for i, t in enumerate(proto.graph.initializer):
        base, transposed = (t.name[:-2], True) if t.name.endswith(".T") else (t.name, False)
        if base not in params and base.startswith("model.") and base[len("model."):] in params:
            base = base[len("model."):]  # the exporter's wrapper prefixes some names
        if base not in params:
            continue
        value = params[base].t() if transposed else params[base]
        if tuple(value.shape) != tuple(t.dims):
            raise RebindError(f"weight '{t.name}' has shape {tuple(t.dims)} in the dense graph but {tuple(value.shape)} in the model")
        proto.graph.initializer[i].CopyFrom(numpy_helper.from_array(value.contiguous().numpy(), t.name))
        found.add(base)
    missing = sorted(set(required) - found)
    if missing:
        raise RebindError(f"{len(missing)} weights are not initialisers of the dense graph (first: '{missing[0]}')")
    save_onnx(proto, path)
    onnx.checker.check_model(str(path), full_check=False)
    seconds = time.perf_counter() - t0
    log.info("rebound %d weights into the dense graph in %.1f s", len(found), seconds)
    return {
        "exporter": "rebind",
        "graph_from": "dense",
        "rebound_weights": len(found),
        "export_seconds": round(seconds, 2),
        "onnx_bytes": path.stat().st_size + sum(p.stat().st_size for p in path.parent.glob(path.name + ".data")),
        "nodes": len(proto.graph.node),
        "initializers": len(proto.graph.initializer),
        "torch": torch.__version__,
        "onnx": onnx.__version__,
    }
