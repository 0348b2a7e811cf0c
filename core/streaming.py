"""Block-streamed models: prune a model larger than memory one block at a time, from disk to disk.

A :class:`BlockStream` reads a Hugging Face directory's safetensors (one file or shards with
``model.safetensors.index.json``) with plain ``read`` calls — no ``mmap``, so file pages never count
against the process's memory — into a model *skeleton* whose parameters live on the ``meta`` device
(buffers such as rotary frequencies are real: they are computed, not stored). Only what the
calibration capture needs outside the blocks (embeddings, final norm) is materialised; the output
head stays on ``meta`` unless it is the embedding itself.

Each block is materialised on :meth:`BlockStream.load`, changed by the caller in place, and written
by :meth:`BlockStream.done` into a pre-sized ``model.safetensors`` (its header — every tensor's name,
float32 shape and offset — is known before any block is pruned, because streamed passes keep shapes),
then released. :meth:`BlockStream.finish` copies the blocks nobody loaded, makes the file durable and
renames it into place: the output never exists half-written under its final name.

Peak memory: the materialised outer parts + one block (+ whatever the caller holds: the calibration
activations and a block's statistics) — not the model.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import struct
from pathlib import Path
from typing import Any, Iterator

import torch

from core.artifacts import atomic_write_json
from core.errors import ModelLoadError
from core.models import QUANT_FILE, write_config

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
OUTPUT_FILE = "model.safetensors"
CHECKPOINT_FILE = "stream-checkpoint.json"
CHECKPOINT_SECONDS_ENV = "PIPELINE_STREAM_CHECKPOINT_SECONDS"
FAULT_ENV = "PIPELINE_STREAM_FAULT"
"""Tests only: the process kills itself (SIGKILL) right after the checkpoint before this block."""

_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


class SafetensorsIndex:
    """Every tensor of a directory's ``*.safetensors`` (or of the shards its index names): file,
    dtype, shape and byte range, read from the headers only."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        index = self.directory / INDEX_FILE
        if index.is_file():
            try:
                files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
            except (ValueError, KeyError, TypeError) as exc:
                raise ModelLoadError(f"'{index}' is not a safetensors index (expected a 'weight_map' of tensor → file): {exc}") from exc
        else:
            files = sorted(p.name for p in self.directory.glob("*.safetensors") if p.name != QUANT_FILE)
        if not files:
            raise ModelLoadError(f"model directory '{self.directory}' has no .safetensors weights to stream")
        self.entries: dict[str, tuple[Path, str, tuple[int, ...], int, int]] = {}
        """name → (file, dtype code, shape, absolute start, absolute end)."""
        for name in files:
            path = self.directory / name
            header, data_start = read_header(path)
            for key, meta in header.items():
                if key == "__metadata__":
                    continue
                if meta["dtype"] not in _DTYPES:
                    raise ModelLoadError(f"'{path}': tensor '{key}' has dtype {meta['dtype']}; streaming reads {', '.join(_DTYPES)}")
                begin, end = meta["data_offsets"]
                self.entries[key] = (path, meta["dtype"], tuple(meta["shape"]), data_start + begin, data_start + end)
        self._names = sorted(self.entries, key=lambda n: (str(self.entries[n][0]), self.entries[n][3]))

    def names(self) -> list[str]:
        """Tensor names in file order (the order the output file keeps)."""
        return self._names

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][2]

    def read(self, name: str, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        """One tensor read from disk into fresh memory (``dtype`` None: as stored)."""
        path, code, shape, start, end = self.entries[name]
        raw = torch.empty(end - start, dtype=torch.uint8)
        with open(path, "rb") as f:
            f.seek(start)
            got = f.readinto(memoryview(raw.numpy()))
            _drop_cache(f.fileno(), start, end - start)  # read once: keep the page cache (and a cgroup's charge) small
        if got != end - start:
            raise ModelLoadError(f"'{path}' ends inside tensor '{name}' (read {got} of {end - start} bytes)")
        t = raw.view(_DTYPES[code]).reshape(shape)
        return t if dtype is None or t.dtype == dtype else t.to(dtype)


def read_header(path: Path) -> tuple[dict[str, Any], int]:
    """A safetensors file's JSON header and the offset where its data starts."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100 << 20:
                raise ValueError(f"header length {n} is implausible")
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error) as exc:
        raise ModelLoadError(f"'{path}' is not a readable safetensors file: {exc}") from exc
    return header, 8 + n


class SafetensorsWriter:
    """A float32 safetensors file whose layout is fixed up front and whose tensors arrive in any order."""

    def __init__(self, path: Path, shapes: dict[str, tuple[int, ...]], reopen: bool = False):
        """``reopen``: continue an existing ``.partial`` file with the same layout (a resumed stream);
        otherwise, or when its header differs, start a new one."""
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.offsets: dict[str, tuple[int, int]] = {}
        pos = 0
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        for name, shape in shapes.items():
            n = 4 * math.prod(shape)
            self.offsets[name] = (pos, pos + n)
            header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [pos, pos + n]}
            pos += n
        blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
        blob += b" " * (-len(blob) % 8)
        self.data_start = 8 + len(blob)
        self.shapes = dict(shapes)
        self.written: set[str] = set()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        head = struct.pack("<Q", len(blob)) + blob
        self.reopened = False
        if reopen and self.partial.is_file() and self.partial.stat().st_size == self.data_start + pos:
            with open(self.partial, "rb") as f:
                self.reopened = f.read(len(head)) == head
        if self.reopened:
            self._f = open(self.partial, "r+b")
        else:
            self._f = open(self.partial, "wb")
            self._f.write(head)
            self._f.truncate(self.data_start + pos)

    def sync(self) -> None:
        """Make every tensor written so far durable."""
        self._f.flush()
        os.fsync(self._f.fileno())

    def release_cache(self) -> None:
        """Write what is buffered to disk and drop the file's pages from the page cache: a stream writes
        a model's worth of data, which would otherwise sit in memory as dirty pages (and count against
        a container's memory cgroup)."""
        self._f.flush()
        os.fdatasync(self._f.fileno())
        _drop_cache(self._f.fileno(), 0, 0)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self.shapes:
            raise ValueError(f"tensor '{name}' is not in the source model; a streamed pass must not add tensors")
        if tuple(tensor.shape) != self.shapes[name]:
            raise ValueError(
                f"tensor '{name}' has shape {tuple(tensor.shape)}, the source {self.shapes[name]}: "
                "streamed passes must keep every shape (structured removal runs in memory)"
            )
        data = tensor.detach().to(torch.float32).contiguous().cpu()
        self._f.seek(self.data_start + self.offsets[name][0])
        self._f.write(memoryview(data.view(torch.uint8).reshape(-1).numpy()))
        self.written.add(name)

    def close(self) -> None:
        """Make the file durable and give it its final name; raises if a tensor was never written."""
        missing = [n for n in self.shapes if n not in self.written]
        if missing:
            self._f.close()
            raise RuntimeError(f"{len(missing)} tensors were never written to '{self.path}' (first: {missing[:3]})")
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self.partial, self.path)

    def abort(self, keep: bool = False) -> None:
        """Close the file; delete it unless ``keep`` (a checkpoint can continue it)."""
        if not self._f.closed:
            self._f.close()
        if not keep:
            self.partial.unlink(missing_ok=True)


def _drop_cache(fd: int, offset: int, length: int) -> None:
    """Advise the kernel that these pages of ``fd`` are not needed again (no-op where unsupported)."""
    if hasattr(os, "posix_fadvise"):
        try:
            os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass


def _trim_heap() -> None:
    """Give freed heap memory back to the system (glibc ``malloc_trim``): a block's tensors of a few MB
    come from the heap, and without it the resident set creeps up block after block."""
    global _LIBC
    if _LIBC is None:
        import ctypes
        import ctypes.util

        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC: Any = None


def _set_param(model: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    parent_path, _, attr = name.rpartition(".")
    mod = model.get_submodule(parent_path) if parent_path else model
    if attr in mod._parameters:
        mod._parameters[attr] = torch.nn.Parameter(value, requires_grad=value.is_floating_point())
    elif attr in mod._buffers:
        mod._buffers[attr] = value
    else:
        raise ModelLoadError(f"the model has no parameter or buffer '{name}' for the stored tensor of that name")


STREAM_REFUSALS = ("pruned_layers", "contextual", "weight_quantization", "activation_sparsity")
"""Config keys of saved variants whose modules differ from the family's: streaming builds the family's own."""


class BlockStream:
    """One sweep over a saved model's blocks (see the module docstring). ``out_dir`` receives
    ``model.safetensors``, the config and the tokenizer files of ``source``."""

    def __init__(self, source: Path, out_dir: Path | None, head: bool = False, checkpoint_key: str | None = None):
        """``out_dir`` None: read only (blocks are released, nothing is written). ``head``: materialise
        the output head too (to compute logits). ``checkpoint_key``: identifies the sweep (source, pass,
        options, data); a killed sweep with the same key left in ``out_dir`` is continued (see
        :meth:`checkpoint`), anything else there is replaced."""
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

        from core.adapters import adapter_for

        self.source = Path(source)
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.want_head = head
        try:
            self.config = AutoConfig.from_pretrained(self.source)
        except Exception as exc:
            raise ModelLoadError(f"'{self.source}/config.json' could not be read: {exc}") from exc
        for key in STREAM_REFUSALS:
            if getattr(self.config, key, None) is not None:
                raise ModelLoadError(f"'{self.source}' is a saved variant with '{key}' in its config; streaming reads a family's own layout only")
        self.adapter = adapter_for(self.config)
        self.index = SafetensorsIndex(self.source)
        cls = AutoModelForCausalLM if self.adapter.task == "causal-lm" else AutoModel
        with init_empty_weights(include_buffers=False):
            self.model = cls.from_config(self.config, dtype=torch.float32).eval()
        if hasattr(self.model, "tie_weights"):  # not done on meta weights; the groups below need it
            self.model.tie_weights()
        self.prefix = self.adapter.blocks_path + "."
        self.layers = len(self.adapter.blocks(self.model))
        self.names_of: dict[int | None, list[str]] = {}
        """Block index (None: outside the blocks) → its stored tensor names, in file order."""
        for n in self.index.names():
            self.names_of.setdefault(self._block_of(n), []).append(n)
        self._check_names()
        self.checkpoint_key = checkpoint_key
        self.checkpoint_seconds = float(os.environ.get(CHECKPOINT_SECONDS_ENV, "60"))
        """Seconds between checkpoints (after the block during which they passed); 0 = after every block."""
        self.resume: dict[str, Any] | None = self._resumable()
        self.writer = (
            SafetensorsWriter(self.out_dir / OUTPUT_FILE, {n: self.index.shape(n) for n in self.index.names()}, reopen=self.resume is not None)
            if self.out_dir is not None else None
        )
        if self.resume is not None and not self.writer.reopened:
            log.warning("'%s': the checkpoint's partial output does not match its layout; starting over", self.out_dir)
            self.resume = None
        self.loaded: set[int] = set()
        self.written: set[int] = set(self.resume["written"]) if self.resume else set()
        if self.resume:  # the written blocks' tensors are in the reopened file already
            self.writer.written.update(n for b in self.written for n in self.names_of.get(b, []))
            log.info("'%s': resuming a killed sweep at block %d (%d blocks written)", self.out_dir, self.resume["next_block"], len(self.written))
        self.bytes_loaded = 0
        self._materialise_outer()

    def _block_of(self, name: str) -> int | None:
        if not name.startswith(self.prefix):
            return None
        head = name[len(self.prefix):].split(".", 1)[0]
        return int(head) if head.isdigit() else None

    def _resumable(self) -> dict[str, Any] | None:
        """The checkpoint left in ``out_dir`` by a killed sweep with this key, else None (and a fresh ``out_dir``)."""
        if self.out_dir is None:
            return None
        meta = self.out_dir / CHECKPOINT_FILE
        if self.checkpoint_key is not None and meta.is_file():
            try:
                state = json.loads(meta.read_text(encoding="utf-8"))
            except ValueError:
                state = {}
            if state.get("key") == self.checkpoint_key and (self.out_dir / state.get("inputs", "-")).is_file():
                return state
        if self.out_dir.exists():
            shutil.rmtree(self.out_dir)
        return None

    def checkpoint(self, next_block: int, hidden: list[torch.Tensor], teacher: list[torch.Tensor], tuple_out: bool, state: dict[str, Any]) -> None:
        """Record that every block before ``next_block`` is written: the inputs of ``next_block`` (and the
        dense stream's, for passes with a teacher), the caller's JSON-able ``state``, then the progress
        file — in that order, each durable before the next, so a kill at any point leaves a consistent
        checkpoint (the previous one or this one)."""
        from safetensors.torch import save_file

        if self.writer is None or self.out_dir is None or self.checkpoint_key is None:
            return
        name = f"inputs-{next_block}.safetensors"
        tensors = {f"h.{i}": h.contiguous() for i, h in enumerate(hidden)}
        tensors.update({f"t.{i}": t.contiguous() for i, t in enumerate(teacher)})
        tmp = self.out_dir / (name + ".tmp")
        save_file(tensors, str(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, self.out_dir / name)
        self.writer.sync()
        progress = {"key": self.checkpoint_key, "next_block": next_block, "written": sorted(self.written), "inputs": name,
                    "batches": len(hidden), "teacher_batches": len(teacher), "tuple_out": tuple_out, "state": state}
        atomic_write_json(self.out_dir / CHECKPOINT_FILE, progress)
        for old in self.out_dir.glob("inputs-*.safetensors"):
            if old.name != name:
                old.unlink(missing_ok=True)
        log.debug("checkpoint: blocks < %d written", next_block)
        fault = os.environ.get(FAULT_ENV)
        if fault and fault == str(next_block):  # tests: a kill right after this checkpoint
            os.kill(os.getpid(), 9)

    def resumed_inputs(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The hidden states (and teacher hidden states) the checkpoint saved for ``resume['next_block']``."""
        from safetensors.torch import load_file

        assert self.resume is not None and self.out_dir is not None
        t = load_file(str(self.out_dir / self.resume["inputs"]))
        return [t[f"h.{i}"] for i in range(self.resume["batches"])], [t[f"t.{i}"] for i in range(self.resume["teacher_batches"])]

    def _groups(self) -> dict[str, list[str]]:
        """Every parameter name → all names of that parameter (more than one when tied, e.g. an output
        head that is the embedding), the first being the one the model owns it under."""
        by_id: dict[int, list[str]] = {}
        for name, p in self.model.named_parameters(remove_duplicate=False):
            by_id.setdefault(id(p), []).append(name)
        return {n: names for names in by_id.values() for n in names}

    def _check_names(self) -> None:
        stored = set(self.index.entries)
        missing = sorted({names[0] for names in self._groups().values() if not stored.intersection(names)})
        if missing:
            raise ModelLoadError(f"'{self.source}' lacks {len(missing)} of the model's weights (first: {missing[:3]})")

    def _materialise_outer(self) -> None:
        """Load every stored tensor outside the blocks, except an untied output head (the calibration
        capture replaces it), and write them all to the output."""
        head = None if self.want_head else self.adapter.head_path
        groups = self._groups()
        buffers = {n for n, _ in self.model.named_buffers()}
        for name in self.names_of.get(None, []):
            t = self.index.read(name)
            if self.writer is not None:
                self.writer.write(name, t)
            names = groups.get(name)
            if names is not None:
                only_head = head is not None and all(n.startswith(head + ".") for n in names)
                if not only_head:
                    _set_param(self.model, names[0], t)
                    self.bytes_loaded += t.numel() * t.element_size()
            elif name in buffers:
                _set_param(self.model, name, t)
        if hasattr(self.model, "tie_weights"):
            self.model.tie_weights()

    def load(self, b: int) -> torch.nn.Module:
        """Block ``b`` with its stored weights (float32)."""
        if b in self.written:
            raise RuntimeError(f"block {b} was already written; a stream sweeps each block once")
        block = self.adapter.blocks(self.model)[b]
        if b not in self.loaded:
            for name in self.names_of.get(b, []):
                _set_param(self.model, name, self.index.read(name))
            left = [n for n, p in block.named_parameters() if p.is_meta]
            if left:
                raise ModelLoadError(f"'{self.source}' lacks block {b}'s {left[:3]}")
            self.loaded.add(b)
        return block

    def done(self, b: int) -> None:
        """Write block ``b``'s (changed) tensors to the output and release its memory."""
        block = self.load(b) if b not in self.loaded else self.adapter.blocks(self.model)[b]
        prefix = f"{self.prefix}{b}."
        state = block.state_dict()
        for name in self.names_of.get(b, []) if self.writer is not None else []:
            local = name[len(prefix):]
            if local not in state:
                raise ValueError(f"block {b} no longer has '{local}' (stored in the source); streamed passes must keep every tensor")
            self.writer.write(name, state[local])
        block.to("meta")
        self.loaded.discard(b)
        self.written.add(b)
        if self.writer is not None:
            self.writer.release_cache()
        _trim_heap()

    def blocks(self) -> Iterator[int]:
        return iter(range(self.layers))

    def finish(self) -> Path:
        """Copy every block not yet written, tensor by tensor, then put the output in place with the
        config and tokenizer; returns the output directory."""
        if self.writer is None or self.out_dir is None:
            raise RuntimeError("a read-only stream has no output to finish")
        for b in range(self.layers):
            if b not in self.written and b not in self.loaded:
                for name in self.names_of.get(b, []):
                    self.writer.write(name, self.index.read(name))
        for b in sorted(self.loaded):
            self.done(b)
        self.writer.close()
        for f in [self.out_dir / CHECKPOINT_FILE, *self.out_dir.glob("inputs-*.safetensors")]:
            f.unlink(missing_ok=True)
        write_config(self.config, self.out_dir, type(self.model).__name__)
        for p in self.source.iterdir():  # tokenizer and generation files travel as they are
            if p.is_file() and p.suffix in (".json", ".txt", ".model", ".jinja") and p.name not in ("config.json", INDEX_FILE) and not p.name.startswith("stream-"):
                shutil.copy2(p, self.out_dir / p.name)
        return self.out_dir

    def abort(self) -> None:
        """After a failure: close the output; keep it when a checkpoint can continue it, else delete it."""
        if self.writer is None:
            return
        self.writer.abort(keep=self.checkpoint_key is not None and self.out_dir is not None and (self.out_dir / CHECKPOINT_FILE).is_file())
