"""Layer-by-layer calibration runner (the sequential scheme of SparseGPT and Wanda).

1. Capture the inputs of block 0 for every calibration window — hidden states
   plus whatever the family passes its blocks (attention mask, position ids,
   rotary embeddings) — by running the model with its block list temporarily
   reduced to block 0 wrapped in a recorder and its output head replaced by an
   identity. Nothing is raised to stop the forward pass.
2. For each block: run it on the captured inputs with forward pre-hooks that feed
   each target linear's input to a statistics collector (linears fed the very
   same tensor, like q/k/v or gate/up, share one collector); hand the
   collectors to ``apply``, which may change the block's weights; re-run the
   (changed) block to produce the next block's inputs.

Memory stays one block deep plus the window activations (windows × length × hidden floats) —
with a :class:`core.streaming.BlockStream`, the *model's* memory too: each block is read from
disk when reached and written out once calibrated.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch

from calibrate.stats import Collector
from core.adapters.base import LinearRef, ModelAdapter
from core.progress import progress

if TYPE_CHECKING:
    from core.streaming import BlockStream

log = logging.getLogger(__name__)

CollectorFactory = Callable[[LinearRef], Collector]
ApplyFn = Callable[[int, list[LinearRef], dict[str, Collector]], None]


@dataclass
class _Batch:
    hidden: torch.Tensor
    args: tuple
    kwargs: dict[str, Any]


LAYER_ATTRS = ("attention_type", "layer_type", "is_sliding", "sliding_window", "layer_idx")
"""Attributes a family's model code may read off its blocks while looping over them (copied to stand-ins)."""


class _Recorder(torch.nn.Module):
    """Wraps block 0: records its inputs, then runs it so the caller sees a normal output."""

    def __init__(self, block: torch.nn.Module):
        super().__init__()
        self.block = block
        self.seen: list[_Batch] = []
        self.tuple_out = False
        _copy_layer_attrs(block, self)

    def forward(self, hidden: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        self.seen.append(_Batch(hidden.detach(), args, kwargs))
        out = self.block(hidden, *args, **kwargs)
        self.tuple_out = isinstance(out, (tuple, list))
        return out


class _ArgsRecorder(_Recorder):
    """Block 0's stand-in when its weights are not there (a resumed stream): records, runs nothing."""

    def __init__(self, block: torch.nn.Module, tuple_out: bool):
        super().__init__(block)
        self.tuple_out = tuple_out

    def forward(self, hidden: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        self.seen.append(_Batch(hidden.detach(), args, kwargs))
        return (hidden,) if self.tuple_out else hidden


class PassThrough(torch.nn.Module):
    """Stands in for a later block while block 0's inputs are captured: records the extra arguments the
    model gives that block (families with alternating sliding/global attention give each block its own
    mask) and returns its input, shaped like a real block's output."""

    def __init__(self, block: torch.nn.Module, first: "_Recorder | None" = None, tuple_out: bool = False):
        super().__init__()
        self.first = first
        self.tuple_out = tuple_out
        self.seen: list[tuple[tuple, dict[str, Any]]] = []
        _copy_layer_attrs(block, self)

    def forward(self, hidden: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        self.seen.append((args, kwargs))
        as_tuple = self.first.tuple_out if self.first is not None else self.tuple_out
        return (hidden,) if as_tuple else hidden


def _copy_layer_attrs(block: torch.nn.Module, to: torch.nn.Module) -> None:
    for a in LAYER_ATTRS:
        if a in block.__dict__ or hasattr(type(block), a):
            try:
                object.__setattr__(to, a, getattr(block, a))
            except AttributeError:
                pass


def _parent_and_attr(model: torch.nn.Module, path: str) -> tuple[torch.nn.Module, str]:
    parent_path, _, attr = path.rpartition(".")
    return (model.get_submodule(parent_path) if parent_path else model), attr


def map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``fn`` applied to every tensor, also inside tuples, lists and dicts; everything else unchanged."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple):
        return tuple(map_tensors(o, fn) for o in obj)
    if isinstance(obj, list):
        return [map_tensors(o, fn) for o in obj]
    if isinstance(obj, dict):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    return obj


def _cast(obj: Any, dtype: torch.dtype) -> Any:
    """Floating tensors (also inside containers) to ``dtype``; everything else unchanged."""
    return map_tensors(obj, lambda t: t.to(dtype) if t.is_floating_point() else t)


def cpu_has_fast_bf16() -> bool:
    """True on CPUs with AVX512-BF16 or AMX-BF16, where bf16 GEMMs beat fp32 several times over."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def resolve_compute_dtype(name: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def first_output(out: Any) -> torch.Tensor:
    """A block's hidden-state output (families return a tuple or the tensor itself)."""
    return out[0] if isinstance(out, (tuple, list)) else out


@dataclass
class RunnerReport:
    blocks: int = 0
    windows: int = 0
    tokens: int = 0
    seconds_capture: float = 0.0
    seconds_per_block: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "blocks": self.blocks,
            "windows": self.windows,
            "tokens": self.tokens,
            "seconds_capture": round(self.seconds_capture, 2),
            "seconds_per_block": [round(s, 2) for s in self.seconds_per_block],
            "seconds_total": round(self.seconds_capture + sum(self.seconds_per_block), 2),
        }


class LayerwiseRunner:
    def __init__(
        self,
        model: torch.nn.Module,
        adapter: ModelAdapter,
        windows: torch.Tensor,
        batch_size: int = 8,
        show_progress: bool = True,
        compute_dtype: torch.dtype = torch.float32,
        stream: "BlockStream | None" = None,
    ):
        if windows.dim() != 2:
            raise ValueError(f"calibration windows must be (N, L) token ids, got shape {tuple(windows.shape)}")
        self.model = model
        self.adapter = adapter
        self.windows = windows
        self.batch_size = max(1, batch_size)
        self.show_progress = show_progress
        self.compute_dtype = compute_dtype
        self.stream = stream
        """With a :class:`core.streaming.BlockStream`, each block is loaded from disk when it is reached and
        written to the output (then released) once calibrated; blocks after the last chosen one are
        left to the stream's ``finish``."""
        self.block_args: list[list[tuple[tuple, dict[str, Any]]]] = []
        """Per block, per batch: the extra arguments the model gives that block (set by ``capture``)."""
        self.tuple_out = False
        """Whether the family's blocks return a tuple (set by ``capture``)."""
        self.current_inputs: list[_Batch] = []
        """The inputs of the block being calibrated (for ``apply`` callbacks that need them)."""
        self.current_teacher_inputs: list[_Batch] = []
        """With ``run(teacher=True)``: the unchanged model's inputs of the block being calibrated."""
        self.current_targets: list[torch.Tensor] = []
        """With ``run(teacher=True)``: the unchanged model's output of the block being calibrated, per
        batch — the dense block run on the dense model's own inputs (targets for reconstruction)."""

    def capture(self, tuple_out: bool | None = None) -> list[_Batch]:
        """Inputs of block 0 for every window, in batches of ``batch_size``. ``tuple_out`` given (a resumed
        stream, whose block 0 is already written): block 0 is not run either — only every block's extra
        arguments are recorded, and the hidden states returned are the embeddings'."""
        blocks = self.adapter.blocks(self.model)
        parent, attr = _parent_and_attr(self.model, self.adapter.blocks_path)
        original = getattr(parent, attr)
        if tuple_out is None:
            recorder: Any = _Recorder(self.stream.load(0) if self.stream is not None else blocks[0])
        else:
            recorder = _ArgsRecorder(blocks[0], tuple_out)
        stand_ins = [PassThrough(blk, recorder) for blk in blocks[1:]]
        head_parent = head_attr = head = None
        if self.adapter.head_path:
            head_parent, head_attr = _parent_and_attr(self.model, self.adapter.head_path)
            head = getattr(head_parent, head_attr)
        try:
            setattr(parent, attr, torch.nn.ModuleList([recorder, *stand_ins]))
            if head is not None:
                setattr(head_parent, head_attr, torch.nn.Identity())
            with torch.inference_mode():
                for i in range(0, self.windows.shape[0], self.batch_size):
                    ids = self.windows[i : i + self.batch_size]
                    kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
                    if self.adapter.task == "causal-lm":
                        kwargs["use_cache"] = False
                    self.model(**kwargs)
        finally:
            setattr(parent, attr, original)
            if head is not None:
                setattr(head_parent, head_attr, head)
        n = -(-self.windows.shape[0] // self.batch_size)
        if len(recorder.seen) != n or any(len(s.seen) != n for s in stand_ins):
            raise RuntimeError(f"{self.adapter.family}: the blocks were not each called once per batch while capturing block 0's inputs")
        self.block_args = [[(b.args, b.kwargs) for b in recorder.seen]] + [s.seen for s in stand_ins]
        self.tuple_out = recorder.tuple_out
        return [_Batch(b.hidden.to(self.compute_dtype), _cast(b.args, self.compute_dtype), _cast(b.kwargs, self.compute_dtype)) for b in recorder.seen]

    def compute_copy(self, block: torch.nn.Module) -> torch.nn.Module:
        """The module the calibration forwards run: the block itself, or a copy in ``compute_dtype``."""
        if self.compute_dtype == torch.float32:
            return block
        return copy.deepcopy(block).to(self.compute_dtype)

    def refresh(self, work: torch.nn.Module, refs: list[LinearRef]) -> None:
        """Copy the (changed) fp32 weights and biases of ``refs`` into the compute copy."""
        if not refs:
            return
        with torch.no_grad():
            for ref in refs:
                mod = work.get_submodule(self.adapter.linear_paths[ref.role])
                mod.weight.copy_(ref.module.weight)
                if getattr(mod, "bias", None) is not None:
                    mod.bias.copy_(ref.module.bias)

    def for_block(self, b: int, batches: list[_Batch]) -> list[_Batch]:
        """``batches`` with block ``b``'s own extra arguments (its attention mask where blocks differ)."""
        if not self.block_args or b == 0:
            return batches
        own = self.block_args[b]
        return [_Batch(x.hidden, _cast(a, self.compute_dtype), _cast(k, self.compute_dtype)) for x, (a, k) in zip(batches, own)]

    def run_block(self, block: torch.nn.Module, batches: list[_Batch]) -> None:
        with torch.inference_mode():
            for b in batches:
                block(b.hidden, *b.args, **b.kwargs)

    def next_inputs(self, block: torch.nn.Module, batches: list[_Batch]) -> list[_Batch]:
        with torch.inference_mode():
            return [_Batch(first_output(block(b.hidden, *b.args, **b.kwargs)).detach(), b.args, b.kwargs) for b in batches]

    def run(
        self,
        make_collector: CollectorFactory,
        apply: ApplyFn,
        roles: list[str] | tuple[str, ...] | None = None,
        blocks: list[int] | None = None,
        teacher: bool = False,
        state: "tuple[Callable[[], dict[str, Any]], Callable[[dict[str, Any]], None]] | None" = None,
    ) -> RunnerReport:
        """Calibrate the chosen blocks in order (see the module docstring). With ``teacher``, a second
        stream of activations runs through the blocks *before* ``apply`` changes them, so
        ``current_targets`` holds what the unchanged model computes there (one more forward per block
        and one more set of window activations in memory).

        With a stream that checkpoints and ``state`` = (get, set) of the caller's JSON-able progress,
        a checkpoint is written after a block once the stream's ``checkpoint_seconds`` passed since the last one,
        and a stream that resumes a killed sweep starts at its next block with the saved inputs and
        state (a stream without ``state`` support restarts from block 0)."""
        report = RunnerReport(windows=int(self.windows.shape[0]), tokens=int(self.windows.numel()))
        t0 = time.perf_counter()
        resume = self.stream.resume if self.stream is not None and state is not None else None
        start = 0
        if resume is not None:
            embedded = self.capture(tuple_out=resume["tuple_out"])
            hidden, teacher_hidden = self.stream.resumed_inputs()
            batches = [_Batch(h.to(self.compute_dtype), x.args, x.kwargs) for h, x in zip(hidden, embedded)]
            teacher_batches = [_Batch(h.to(self.compute_dtype), x.args, x.kwargs) for h, x in zip(teacher_hidden, embedded)] if teacher else []
            state[1](resume["state"])
            start = int(resume["next_block"])
        else:
            if self.stream is not None and self.stream.resume is not None:  # cannot continue it: start over
                raise RuntimeError("this pass cannot resume a streamed sweep; remove the stage's work directory")
            batches = self.capture()
            teacher_batches = batches if teacher else []
        report.seconds_capture = time.perf_counter() - t0
        last_checkpoint = time.perf_counter()
        all_blocks = self.adapter.blocks(self.model)
        chosen = set(range(len(all_blocks))) if not blocks else set(blocks)
        last = max(chosen) if chosen else -1
        blocks_iter = range(len(all_blocks))
        for b in progress(blocks_iter, desc="calibrated blocks") if self.show_progress else blocks_iter:
            if b > last:
                break
            if b < start:  # written before the sweep was killed
                continue
            tb = time.perf_counter()
            block = self.stream.load(b) if self.stream is not None else all_blocks[b]
            work = self.compute_copy(block)
            batches = self.for_block(b, batches)
            if teacher:
                teacher_batches = self.for_block(b, teacher_batches)
            teacher_inputs = teacher_batches
            if teacher:  # the block is still unchanged here
                teacher_batches = self.next_inputs(work, teacher_batches)
            if b in chosen:
                refs = self.adapter.linears(self.model, roles=roles, blocks=[b])
                collectors = self.collect(work, refs, batches, make_collector)
                self.current_inputs = batches
                self.current_targets = [t.hidden for t in teacher_batches]
                self.current_teacher_inputs = teacher_inputs
                apply(b, refs, collectors)
                self.current_inputs, self.current_targets, self.current_teacher_inputs = [], [], []
                if refs and work is not block:
                    self.refresh(work, refs)
            if b < last:  # the pruned block's outputs feed the next block
                batches = self.next_inputs(work, batches)
            del work
            if self.stream is not None:
                self.stream.done(b)
                if state is not None and b < last and time.perf_counter() - last_checkpoint >= self.stream.checkpoint_seconds:
                    self.stream.checkpoint(b + 1, [x.hidden for x in batches], [x.hidden for x in teacher_batches] if teacher else [], self.tuple_out, state[0]())
                    last_checkpoint = time.perf_counter()
            report.seconds_per_block.append(time.perf_counter() - tb)
            report.blocks += 1
            log.info("block %d/%d calibrated in %.1f s", b + 1, len(all_blocks), report.seconds_per_block[-1])
        return report

    def collect(
        self, block: torch.nn.Module, refs: list[LinearRef], batches: list[_Batch], make_collector: CollectorFactory
    ) -> dict[str, Collector]:
        """One forward of ``block`` over all batches, feeding every target linear's input to a collector
        (``run`` calls it per block; an ``apply`` callback that retrained its block calls it for fresh
        statistics before pruning again)."""
        by_name: dict[str, Collector] = {}
        # (data_ptr, shape) of tensors seen in this batch → (collector, tensor). Holding the tensor keeps
        # its memory from being reused by a later activation of the same shape within the batch.
        shared: dict[tuple[int, tuple[int, ...]], tuple[Collector, torch.Tensor]] = {}

        def hook_for(ref: LinearRef) -> Callable[..., None]:
            def hook(_module: torch.nn.Module, args: tuple) -> None:
                x = args[0]
                key = (x.data_ptr(), tuple(x.shape))
                seen = shared.get(key)
                if ref.name not in by_name:
                    by_name[ref.name] = seen[0] if seen else make_collector(ref)
                col = by_name[ref.name]
                if seen is not None and seen[0] is col:
                    return  # this exact tensor was already added by a linear sharing the collector
                shared[key] = (col, x)
                col.add(x)

            return hook

        modules = [block.get_submodule(self.adapter.linear_paths[r.role]) for r in refs]
        handles = [m.register_forward_pre_hook(hook_for(r)) for m, r in zip(modules, refs)]
        try:
            with torch.inference_mode():
                for b in batches:
                    shared.clear()
                    block(b.hidden, *b.args, **b.kwargs)
        finally:
            for h in handles:
                h.remove()
        missing = [r.name for r in refs if r.name not in by_name]
        if missing:
            raise RuntimeError(f"linears {missing} were not called during the block's forward pass")
        return by_name
