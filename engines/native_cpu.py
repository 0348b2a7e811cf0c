"""Native CPU engine: a decoder run by the project's own sparse kernels, so pruned weights are read
compressed and the zeros are skipped.

Why not ONNX Runtime (measured on this project's machines, ONNX Runtime 1.32 CPU): its C/C++ API
headers ship in no package these machines can install, so no native custom op can be built; its
Python custom ops (onnxruntime-extensions ``PyOp``) copy every input on every call (9 ms per call
for a 100 MB weight input) and return outputs through Python lists, so the weights cannot live in
the graph and a 128-token prefill's activations cross Python per layer. PyTorch eager as the host
was measured too: SmolLM2 decodes at about half of ONNX Runtime's speed before any sparse kernel runs
(``benchmarks/hosting_probe.py``).
This engine therefore owns the whole decoder (RMSNorm, rotary embedding, grouped-query attention
with a preallocated KV cache, gated MLP) in NumPy around the native kernels, and is timed against
ONNX Runtime dense in the same process; the report names the engine of every latency.

``build(model_dir, out)`` writes the engine artifact from the variant's saved model: every block
linear with at least ``min_sparsity`` zeros compressed (2:4 where the pattern holds, else bitmask;
:mod:`core.sparse_format`), the rest dense, in one safetensors file with the config and a manifest —
the file shrinks with the kept weights. Values are float32, or the codes of the weights' own grid:
int8 for an INT8-quantized model, 4-bit codes for a 4-bit one (the ``int4`` format where a weight is
dense, ``2:4-int4`` where it is 2:4, ``bitmask-int4`` where it is otherwise sparse), and (option ``exact_grids``) the ``int4`` format for a dense weight
lying exactly on a 4-bit scale-and-offset grid or int8 values for one on a symmetric int8 grid — a
GGUF source's Q4_1 / Q8_0 weights, stored as they were shipped, bit for bit. Families: those whose adapter fills ``native`` (Llama-style:
Llama, SmolLM2, Mistral, Qwen2 with its q/k/v biases); others are refused with the reason.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from core.activation import GATE_OUT
from core.errors import EngineUnavailable, OptionError, PipelineError
from core.sparse_format import BITMASK_INT4_GROUP
from engines.base import Engine, EngineArtifact, Generation, Runner, TensorMeta, llama_style_family, llama_style_unsupported, sliding_window

log = logging.getLogger(__name__)

ARTIFACT = "model.native.safetensors"
SEP = "::"
"""Separator between a linear's weight name and its array name in the artifact (``<name>::values``)."""
EXACT_BLOCK = 32
"""Inputs per scale of the exact int8 grids looked for (``NativeOptions.exact_grids``): GGUF's Q8_0 block."""


@dataclass
class NativeOptions:
    threads: int = 0
    """Kernel threads (0 = all cores)."""
    min_sparsity: float = 0.25
    """A block linear with at least this fraction of zero weights is stored compressed; below it the
    bitmask costs more than it saves and the linear stays dense."""

    int8_activations: bool = False
    """Multiply int8 activations (x quantized per block of 32; AVX-512 VNNI where the CPU has it, and
    AVX2 for int4 weights), as ONNX Runtime's MatMulNBits does at ``accuracy_level`` 4, wherever a
    weight has such a kernel: dense
    int8 values in blocks of 32 (an INT8 model's — unless it was quantized at another accuracy_level —
    or an exact int8 grid's, such as the bundled SmolLM2's head) and every ``int4``-format weight —
    an activation-sparse group's input-major 4-bit weights too, on the AVX2 path. Off
    by default: fp32 activations compute exactly the model's result; on, the result moves by the
    activations' rounding, which validation measures like any variant's error. (Whatever this option,
    on AVX-512 VNNI an activation-sparse group's input-major 4-bit weights multiply 16-bit activations,
    each active input rounded to 1/32639 of its block's largest — ``engines.native.int16_activations``.)"""

    exact_grids: bool = True
    """Store a weight that has no quantization grid but lies exactly on a 4-bit or int8 block grid as
    its codes: the same weights bit for bit in fewer bytes. A dense weight on an asymmetric 4-bit grid
    (a scale and offset per row and 32 inputs, ``core.sparse_format.exact_int4_grid``: GGUF's Q4_1)
    becomes the ``int4`` format, 0.19× its float32 bytes; any weight on a symmetric int8 grid (a scale
    per 32 inputs, ``exact_int8_grid``: GGUF's Q8_0) gets int8 values in its format. The bundled
    SmolLM2 is Q4_1 in its GGUF (every block linear) with a Q8_0 token embedding (its tied LM head), so
    dense SmolLM2 reads 0.19× of its float32 bytes per token, exactly the same model."""

    half_grids: bool = True
    """Store and read an ``int4`` weight's scales and offsets as fp16 where every one of them is an fp16
    number (GGUF's Q4_1 stores them so): exactly the same weights, 5 bits per weight in the file and
    read per token instead of 6. Off: float32 grids (kept to measure the difference)."""

    def __post_init__(self) -> None:
        if not isinstance(self.half_grids, bool):
            raise OptionError("half_grids", f"half_grids {self.half_grids!r} must be true or false")
        if not isinstance(self.exact_grids, bool):
            raise OptionError("exact_grids", f"exact_grids {self.exact_grids!r} must be true or false")
        if not isinstance(self.int8_activations, bool):
            raise OptionError("int8_activations", f"int8_activations {self.int8_activations!r} must be true or false")
        if not isinstance(self.threads, int) or isinstance(self.threads, bool) or self.threads < 0:
            raise OptionError("threads", f"threads {self.threads!r} must be an integer >= 0 (0 = all cores)")
        if not isinstance(self.min_sparsity, (int, float)) or not 0.0 <= float(self.min_sparsity) <= 1.0:
            raise OptionError("min_sparsity", f"min_sparsity {self.min_sparsity!r} is outside [0, 1]")


def _adapter_and_config(model_dir: Path) -> tuple[Any, Any]:
    from transformers import AutoConfig

    from core.adapters import adapter_for

    config = AutoConfig.from_pretrained(str(model_dir))
    adapter = adapter_for(config)
    refuse = supports(adapter, config)
    if refuse:
        raise PipelineError(f"engine 'native-cpu': {refuse}")
    return adapter, config


def supports(adapter: Any, config: Any) -> str | None:
    """None when the engine can run this model, else the reason it cannot."""
    reason = llama_style_unsupported(adapter, config, "native decoder")
    if reason is None:
        window = sliding_window(config)
        context = adapter.config_value(config, "context") if "context" in adapter.config_keys else None
        if window > 0 and (context is None or window < context):
            reason = (f"sliding-window attention ({window} positions) is not implemented by the native decoder, which attends "
                      "to every earlier position; use onnxruntime-fused (GroupQueryAttention local_window_size) or onnxruntime-cpu")
    return reason


def _grid_arrays(model_dir: Path, quant: dict[str, Any]) -> dict[str, np.ndarray]:
    """A quantized model's grids (``<weight>.scale`` / ``<weight>.zero``), or an error naming the engine."""
    from core.errors import ModelLoadError
    from core.models import quantization_arrays

    try:
        return quantization_arrays(model_dir, quant)
    except ModelLoadError as exc:
        raise PipelineError(f"engine 'native-cpu': {exc}") from None


def _int8_grids(model_dir: Path, quant: dict[str, Any] | None) -> dict[str, tuple[np.ndarray, int]]:
    """``{weight name: (scales, block)}`` of a model quantized to INT8 (its grids' zero points must be
    128: the symmetric int8 of ``core.quant``); empty for an unquantized or 4-bit model."""
    if not quant or int(quant.get("bits", 0)) != 8:
        return {}
    arrays = _grid_arrays(model_dir, quant)
    block = int(quant["block_size"])
    grids = {}
    for name in quant.get("weights", []):
        zero = arrays[f"{name}.zero"]
        if not (zero == 128).all():
            raise PipelineError(f"engine 'native-cpu': the int8 grid of '{name}' has zero points other than 128; the kernels read symmetric int8 only")
        grids[name] = (np.ascontiguousarray(arrays[f"{name}.scale"], np.float32), block)
    return grids


def _int4_grids(model_dir: Path, quant: dict[str, Any] | None) -> dict[str, tuple[np.ndarray, np.ndarray, int]]:
    """``{weight name: (scales, zeros, block)}`` of a model quantized to 4 bits in blocks that are a
    multiple of 32 (the int4 format's zero-point form); empty otherwise (other blocks run in fp32)."""
    if not quant or int(quant.get("bits", 0)) != 4 or int(quant["block_size"]) % 32:
        return {}
    arrays = _grid_arrays(model_dir, quant)
    block = int(quant["block_size"])
    return {name: (np.asarray(arrays[f"{name}.scale"], np.float32), np.asarray(arrays[f"{name}.zero"], np.float32), block) for name in quant.get("weights", [])}


def _sparse_int4_format(w: np.ndarray) -> str:
    """The 4-bit format of a kept-sparse weight on a 4-bit grid: ``2:4-int4`` where the weight is 2:4 and
    K % 32 == 0, else ``bitmask-int4``."""
    from core.sparse_format import is_two_four

    return "2:4-int4" if w.shape[1] % 32 == 0 and is_two_four(w) else "bitmask-int4"


def _int8x_here() -> str:
    """Where the int8-weight × int8-activation kernels run, and whether this CPU runs one, for the notes."""
    from engines import native

    here = "this CPU runs it" if native.int8_activations() else "not on this CPU: fp32 activations"
    return f"where the CPU has AVX-512 VNNI or the instruction set is AVX2 ({here})"


def _int8_x16_here() -> str:
    """Where int8 weights in blocks of 32 multiply 16-bit activations, and whether this CPU does, for the notes."""
    from engines import native

    here = "this CPU runs it" if native.int16_activations() else "not on this CPU: fp32 activations"
    return (f"int8 weights in blocks of 32 multiply 16-bit activations (each rounded to 1/32639 of the token's largest |x|) "
            f"where the CPU has AVX-512 VNNI ({here})")


def _int4x_here() -> str:
    """Where the int4 × int8-activation kernels run, and whether this CPU runs one, for the notes."""
    from engines import native

    here = "this CPU runs it" if native.int4_int8_activations() else "not on this CPU: fp32 activations"
    return f"where the CPU has AVX-512 VNNI (float grids) or AVX2 ({here})"


def _quantized_note(quant: dict[str, Any], linears: dict[str, Any], head: dict[str, Any], int8_activations: bool) -> str:
    """What the artifact did with a quantized model's weights."""
    if int(quant.get("bits", 0)) != 8:
        n = sum(e["format"] == "int4" for e in linears.values())
        n24 = sum(e["format"] == "2:4-int4" for e in linears.values())
        nbm = sum(e["format"] == "bitmask-int4" for e in linears.values())
        rest = len(linears) - n - n24 - nbm
        note = f"int4 weights read as 4-bit codes with a scale and zero point per 32 inputs ({n} block linears{', the LM head' if head.get('values') == 'int4' else ''})"
        block = int(quant.get("block_size") or 0)
        if n24 or nbm:
            from engines import native

            def x16(runs: bool, isa: str, blocks: str) -> str:  # where the format's 16-bit kernel rounds the activations
                return (f", their activations rounded to 16 bits per token (1/32639 of the largest |x|) by the kernel for AVX-512 VNNI + {isa} "
                        f"where the blocks are {blocks} inputs ({'this CPU runs it' if runs else 'not on this CPU: fp32 activations'})")
        if n24:
            note += f"; {n24} 2:4 block linears read as 4-bit codes of their kept values with 2-bit positions (2:4-int4, a scale and zero point per {quant.get('block_size')} inputs)"
            note += x16(native.twofour_int4_int16(block), "VBMI", "at most 512")
        if nbm:
            note += f"; {nbm} sparse block linears read as 4-bit codes of their kept values with a bit per weight (bitmask-int4, a scale and zero point per {quant.get('block_size')} inputs)"
            note += x16(native.bitmask_int4_int16(block), "VBMI2", "32 or a multiple of 64")
        if rest:
            note += f"; {rest} block linears run dequantized in fp32 (blocks of {quant.get('block_size')} inputs: the int4 formats need a multiple of 32)"
        if int8_activations:
            note += f"; option int8_activations: int8 activations (per block of 32) {_int4x_here()}"
            if n24:
                note += (f"; the 2:4-int4 linears multiply int8 activations (rounded per block of {block} inputs) where the instruction set is "
                         f"AVX2, from a second copy of the weight (3 bits a weight and its grid): "
                         f"{'this CPU runs it' if native.isa() == 'avx2+fma' else 'not on this CPU: their kernels above'}")
            return note
        return note + "; fp32 activations otherwise (the model's own result)"
    n = sum(e["values"] == "int8" for e in linears.values())
    note = f"int8 weights read as int8 codes with a scale per {quant['block_size']} inputs ({n} block linears{', the LM head' if head['values'] == 'int8' else ''})"
    if int8_activations:
        note += f"; option int8_activations: dense ones multiply int8 activations (per block of 32) {_int8x_here()}"
    else:
        note += f"; {_int8_x16_here()}, else fp32 activations (the model's own result)"
    return note


def _exact_note(linears: dict[str, Any], embed: dict[str, Any], head: dict[str, Any], tied: bool, int8x: bool = False) -> str:
    """Which weights were found on an exact grid and stored as its codes (option ``exact_grids``)."""
    parts = []
    if embed.get("exact_grid"):
        parts.append(f"the token embedding{' (the tied LM head)' if tied else ''} as {embed['exact_grid']}")
    if not tied and head.get("exact_grid"):
        parts.append(f"the LM head as {head['exact_grid']}")
    for kind in ("int4", "int8"):
        n = sum(e.get("exact_grid") == kind for e in linears.values())
        if n:
            parts.append(f"{n} block linears as {kind}")
    if not parts:
        return "none found"
    note = "codes on the weights' own grids, lossless: " + ", ".join(parts)
    if not int8x and (embed.get("exact_grid") == "int8" or head.get("exact_grid") == "int8" or any(e.get("exact_grid") == "int8" for e in linears.values())):
        note += f"; {_int8_x16_here()}"
    if int8x:
        note += (f"; option int8_activations: these weights multiply int8 activations (per block of 32), not exact — int4 {_int4x_here()}, "
                 f"int8 {_int8x_here()}")
    return note


def _load_tensors(model_dir: Path) -> dict[str, np.ndarray]:
    from core.errors import ModelLoadError
    from core.models import weight_arrays

    try:
        return weight_arrays(model_dir)
    except ModelLoadError as exc:
        raise PipelineError(f"engine 'native-cpu': {exc}") from None


@functools.lru_cache(maxsize=1)
def _kernel_version() -> tuple[tuple[str, Any], ...]:
    """The kernel library's identity (hashed once per process: stage keys ask for it many times)."""
    import hashlib

    from engines import native

    try:
        return (("runtime", "native-cpu"), ("isa", native.best_isa()), ("kernels_sha256", hashlib.sha256(native.LIB_PATH.read_bytes()).hexdigest()[:16]))
    except (EngineUnavailable, OSError):
        return (("runtime", "native-cpu"), ("isa", None))


class _Int8Rows:
    """An embedding table stored as int8 codes with a scale per row and block: indexing returns the
    rows dequantized (code · scale in float32, the model's own values bit for bit)."""

    def __init__(self, codes: np.ndarray, scales: np.ndarray, block: int):
        self.codes, self.scales, self.block = codes, scales, block
        self.shape = codes.shape

    def __getitem__(self, ids: Any) -> np.ndarray:
        codes = self.codes[ids]
        scales = np.repeat(self.scales[ids], self.block, axis=-1)[..., : self.shape[1]]
        return (codes.astype(np.float32) * scales).astype(np.float32)


def _embedding(t: dict[str, np.ndarray], name: str, entry: dict[str, Any]) -> "np.ndarray | _Int8Rows":
    """The token embedding as the artifact holds it: a float32 table, or int8 rows (``exact_grids``)."""
    block = int(entry.get("scale_block", 0))
    if not block:
        return t[name]
    return _Int8Rows(t[f"{name}{SEP}values"], t[f"{name}{SEP}scales"], block)


class NativeCpuEngine(Engine):
    name = "native-cpu"
    source = "model"
    """Built from the variant's saved model directory (not its ONNX graph)."""
    generates = True
    options_class = NativeOptions
    quantized_weights = "int8 and int4 kernels"
    """INT8 weights are stored and read as int8 codes with their scales (every format: 2:4, bitmask,
    dense, the LM head too); the quantize pass's 4-bit weights (blocks a multiple of 32) are read as
    4-bit codes in the ``int4`` format's zero-point form where they are dense, as 4-bit codes of their
    kept values in ``2:4-int4`` where they are 2:4 and in ``bitmask-int4`` where they are otherwise
    kept sparse; other blocks (16) run as fp32 values (the artifact says how many).
    Weights with no quantization at all that lie exactly on a 4-bit or int8 grid (a GGUF source's
    Q4_1 / Q8_0) are stored as their codes (option ``exact_grids``)."""

    @classmethod
    def check_model(cls, facts: Any) -> str | None:
        return llama_style_family(facts, "native decoder")

    def check_available(self) -> None:
        import platform

        if platform.machine().lower() not in ("x86_64", "amd64"):
            raise EngineUnavailable(self.name, f"the native kernels have x86-64 paths only (this machine is {platform.machine()})")
        from engines import native

        native.lib()  # raises EngineUnavailable naming the fix

    def version_info(self) -> dict[str, Any]:
        return dict(_kernel_version())

    def build(self, model_dir: Path, out_dir: Path) -> EngineArtifact:
        from safetensors.numpy import save_file

        from core.sparse_format import compress, exact_int8_grid, half_grid_form

        self.check_available()
        t0 = time.perf_counter()
        model_dir, out_dir = Path(model_dir), Path(out_dir)
        adapter, config = _adapter_and_config(model_dir)
        tensors = _load_tensors(model_dir)
        out: dict[str, np.ndarray] = {}
        linears: dict[str, Any] = {}
        quant = getattr(config, "weight_quantization", None)
        grids = _int8_grids(model_dir, quant)
        grids4 = _int4_grids(model_dir, quant)

        def store(name: str, w: np.ndarray, compressed: bool, int4: bool = True) -> dict[str, Any]:
            """Write weight ``name`` into the artifact: compressed or dense, as codes where the model holds
            it so (its quantization grid, or an exact int4 / int8 grid found here; ``int4``: that format
            allowed)."""
            grid = grids.get(name)
            exact = None
            c = None
            if name in grids4 and int4:  # the quantize pass's 4-bit grid: the int4 format's zero-point form, or 4-bit codes of the kept values
                try:
                    c = compress(w, _sparse_int4_format(w) if compressed else "int4", grid=grids4[name], name=name)
                except ValueError as exc:
                    hint = (" (a structured variant keeps such widths with the structured pass's round_to: 32, or more)"
                            if w.shape[1] % 32 else "")
                    raise PipelineError(f"engine 'native-cpu': {exc}{hint}") from None
            if c is None and grid is None and self.options["exact_grids"]:
                if int4 and not compressed:
                    try:
                        c, exact = compress(w, "int4", name=name), "int4"
                    except ValueError:  # off any such grid (the common case: it shows in the first row)
                        c = None
                if c is None and (scales := exact_int8_grid(w, EXACT_BLOCK)) is not None:
                    grid, exact = (scales, EXACT_BLOCK), "int8"
            try:
                c = c or compress(w, "auto" if compressed else "dense", grid=grid, name=name)
            except ValueError as exc:
                raise PipelineError(f"engine 'native-cpu': {exc}") from None
            if self.options["half_grids"]:
                c = half_grid_form(c)  # an int4 grid of fp16 numbers (Q4_1's) stored as fp16, exactly
            if c.format == "dense" and not c.int8:
                out[name] = c.arrays["values"]
            else:
                for key, arr in c.arrays.items():
                    out[f"{name}{SEP}{key}"] = arr
            return {"format": c.format, "shape": list(c.shape), "bytes": c.nbytes, "values": c.value_type, "scale_block": c.block, "exact_grid": exact}

        layers = adapter.config_value(config, "layers")
        for i in range(layers):
            for role, path in adapter.linear_paths.items():
                name = f"{adapter.blocks_path}.{i}.{path}.weight"
                w = tensors.pop(name, None)
                if w is None:
                    raise PipelineError(f"engine 'native-cpu': weight '{name}' ({role}) is missing from {model_dir}")
                w = np.ascontiguousarray(w, np.float32)
                zeros = float((w == 0).mean())
                entry = {"role": role, "block": i, "shape": list(w.shape), "sparsity": round(zeros, 6), "dense_bytes": int(w.nbytes)}
                entry.update(store(name, w, zeros >= self.options["min_sparsity"] and zeros > 0))
                linears[name] = entry
        embed_name = adapter.native["embed"] + ".weight"
        head_name = f"{adapter.head_path}.weight"
        if embed_name not in tensors and getattr(config, "tie_word_embeddings", False) and head_name in tensors:
            embed_name = head_name  # a tied checkpoint may hold only the head's copy
        if embed_name not in tensors:
            raise PipelineError(f"engine 'native-cpu': the token embedding '{embed_name}' is missing from {model_dir}")
        tie = bool(getattr(config, "tie_word_embeddings", False))
        tied = head_name == embed_name or (head_name not in tensors and tie) or (head_name in tensors and np.array_equal(tensors[head_name], tensors[embed_name]))
        if tied and head_name in grids:  # a quantized head that is the embedding: one grid for both
            grids.setdefault(embed_name, grids[head_name])
        # the embedding (the head too when tied) and an untied head: int8 codes where a grid holds them
        # (the embedding is looked up by rows: int8 rows at most, never the int4 format)
        embed_entry = store(embed_name, np.ascontiguousarray(tensors.pop(embed_name), np.float32), compressed=False, int4=False)
        if tied:
            head_entry = embed_entry
            tensors.pop(head_name, None)
        elif head_name in tensors:
            head_entry = store(head_name, np.ascontiguousarray(tensors.pop(head_name), np.float32), compressed=False)
        else:
            raise PipelineError(f"engine 'native-cpu': the LM head '{head_name}' is missing from {model_dir} (and the embedding is not tied to it)")
        for name, arr in tensors.items():
            out[name] = np.ascontiguousarray(arr, np.float32) if arr.dtype != np.float32 else np.ascontiguousarray(arr)
        save_file(out, str(out_dir / ARTIFACT))
        shutil.copy2(model_dir / "config.json", out_dir / "config.json")
        manifest = {
            "family": adapter.family,
            "tied_head": bool(tied),
            "head": head_name,
            "head_storage": head_entry,
            "embed": embed_name,
            "embed_storage": embed_entry,
            "min_sparsity": self.options["min_sparsity"],
            # an INT8 model quantized at another accuracy_level keeps fp32 activations: that level is its own
            "half_grids": self.options["half_grids"],
            "bitmask_int4_group": BITMASK_INT4_GROUP,  # the layout of bitmask-int4 codes (earlier artifacts: per 16-input word)
            "int8_activations": bool(self.options["int8_activations"] and not (quant and int(quant.get("bits", 0)) == 8 and int(quant.get("accuracy_level", 0)) != 4)),
            "linears": linears,
            "linear_bytes": sum(e["bytes"] for e in linears.values()),
            "linear_dense_bytes": sum(e["dense_bytes"] for e in linears.values()),
        }
        (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")
        seconds = time.perf_counter() - t0
        size = (out_dir / ARTIFACT).stat().st_size
        formats: dict[str, int] = {}
        for e in linears.values():
            formats[e["format"]] = formats.get(e["format"], 0) + 1
        info = self.version_info() | {
            "options": self.options,
            "build_seconds": round(seconds, 2),
            "bytes": size,
            "formats": formats,
            "linear_bytes_ratio": round(manifest["linear_bytes"] / manifest["linear_dense_bytes"], 4),
            "exact_grids": _exact_note(linears, embed_entry, head_entry, tied, manifest["int8_activations"]),
            **({"quantized_weights": _quantized_note(quant, linears, head_entry, manifest["int8_activations"])} if quant else {}),
        }
        log.info("native-cpu engine built in %.1f s: %s, %.1f MB (%s)", seconds, ARTIFACT, size / 1e6, formats)
        return EngineArtifact(self.name, out_dir / ARTIFACT, info)

    def runner(self, artifact: EngineArtifact, threads: int | None = None, **_: Any) -> "NativeRunner":
        return self.open(Path(artifact.path).parent, threads=threads)

    def open(self, artifact_dir: Path, threads: int | None = None, name: str | None = None) -> "NativeRunner":
        n = threads if threads is not None else self.options["threads"]
        return NativeRunner(Path(artifact_dir), threads=n or (os.cpu_count() or 1), name=name)


@dataclass
class _Layer:
    attn_norm: np.ndarray
    mlp_norm: np.ndarray
    qkv: Any
    qkv_bias: np.ndarray | None
    o: Any
    gate_up: Any
    down: Any
    heads: int
    kv_heads: int
    ffn: int
    act: dict[str, float]
    """Activation-sparsity thresholds by input group (attn_in, o_in, mlp_in, down_in); empty = none."""
    keep: dict[str, int] = field(default_factory=dict)
    """The top-k form instead: inputs kept per token by input group."""
    gate_t: float | None = None
    """CATS: gate activations with |SiLU(g)| at or below it are zero (up's rows skipped at decode; down
    gets a threshold of 0 in ``act``, so it reads only the nonzero inputs); None: none."""



def _input_major(parts: "list[Any]") -> Any:
    """The input-major form of the parts of an activation-sparse group: ``int4`` parts with one grid form
    keep their 4-bit codes (:class:`engines.native.InputMajorInt4Weight`); any other mix runs float32."""
    from engines import native

    if native.InputMajorInt4Weight.accepts(parts):
        return native.InputMajorInt4Weight([p.compressed() for p in parts], half_grid=all(p.half_grid for p in parts),
                                           int8_activations=all(p.int8_activations for p in parts))
    stacked = parts[0] if len(parts) == 1 else native.NativeWeight.stacked(parts)
    return native.InputMajorWeight(stacked.to_dense())


class NativeDecoder:
    """The decoder in NumPy around the native kernels: ``forward`` (a whole batch, no cache) for
    validation, ``prefill`` + ``step`` with a preallocated KV cache for decoding."""

    def __init__(self, artifact_dir: Path):
        from safetensors.numpy import load_file

        from engines import native

        artifact_dir = Path(artifact_dir)
        self.adapter, self.config = _adapter_and_config(artifact_dir)
        manifest = json.loads((artifact_dir / "manifest.json").read_text(encoding="utf-8"))
        t = load_file(str(artifact_dir / ARTIFACT))
        a, c = self.adapter, self.config
        self.eps = float(getattr(c, "rms_norm_eps", 1e-6))
        self.head_dim = int(a.facts(c).head_dim)
        from core.models import rope_theta

        self.theta = rope_theta(c)
        self.embed = _embedding(t, manifest["embed"], manifest.get("embed_storage", {"format": "dense"}))
        self.final_norm = t[a.native["final_norm"] + ".weight"]

        # the engine option (accuracy_level 4 models only): dense int8 weights multiply int8 activations where the CPU has AVX-512 VNNI
        int8_activations = bool(manifest.get("int8_activations", False))
        half_grids = bool(manifest.get("half_grids", True))

        if manifest.get("bitmask_int4_group") != BITMASK_INT4_GROUP and any(e.get("format") == "bitmask-int4" for e in manifest.get("linears", {}).values()):
            raise PipelineError(f"engine 'native-cpu': {artifact_dir} holds bitmask-int4 weights in an earlier layout (codes per 16-input word); "
                                f"rebuild it (the build's engine stage does so when the kernel library changed)")
        stored: dict[str, dict[str, np.ndarray]] = {}  # a compressed weight's arrays, as the build wrote them ("<weight>::<array>")
        for key, arr in t.items():
            if SEP in key:
                weight_name, _, part = key.partition(SEP)
                stored.setdefault(weight_name, {})[part] = arr

        def weight(name: str, entry: dict[str, Any]) -> Any:
            from core.sparse_format import CompressedWeight

            fmt, block = entry["format"], int(entry.get("scale_block", 0))
            if fmt == "dense" and not block:
                return native.NativeWeight(t[name])
            arrays = stored[name]
            shape = tuple(arrays["values"].shape if fmt == "dense" else entry["shape"])
            return native.NativeWeight(CompressedWeight(fmt, shape, arrays, block), int8_activations=int8_activations, half_grid=half_grids)

        head = manifest["embed"] if manifest["tied_head"] else manifest["head"]
        self.head = weight(head, manifest.get("head_storage", {"format": "dense"}))

        from core.activation import spec_values

        spec = getattr(c, "activation_sparsity", None)
        method, values = spec_values(spec) if spec else ("teal", {})
        self.inputs_read = 0
        self.inputs_total = 0
        self.layers: list[_Layer] = []
        for i in range(a.config_value(c, "layers")):
            p = f"{a.blocks_path}.{i}."
            w = {role: weight(p + path + ".weight", manifest["linears"][p + path + ".weight"]) for role, path in a.linear_paths.items()}
            biases = [t.get(p + a.linear_paths[r] + ".bias") for r in ("q", "k", "v")]
            heads = w["q"].n // self.head_dim
            kv = w["k"].n // self.head_dim
            act = {g: float(v) for g, v in values.get(str(i), {}).items()} if method == "teal" else {}
            keep = {g: int(v) for g, v in values.get(str(i), {}).items()} if method == "topk" else {}
            gate_t = act.pop(GATE_OUT, None)
            if gate_t is not None:  # down's input is zero where the gate's activation is: it reads the nonzero inputs
                act["down_in"] = 0.0  # (the spec refuses gate_out with a down_in threshold of its own)
            stacks = {"attn_in": [w["q"], w["k"], w["v"]], "o_in": [w["o"]], "mlp_in": [w["gate"], w["up"]], "down_in": [w["down"]]}
            built = {}
            for group, parts in stacks.items():
                if group in act or group in keep:
                    # an activation-sparse input reads whole weight rows of the inputs that remain: stored
                    # input-major — in 4 bits when every part is int4 with one grid form, else float32
                    built[group] = _input_major(parts)
                    continue
                built[group] = parts[0] if len(parts) == 1 else native.NativeWeight.stacked(parts)
            self.layers.append(
                _Layer(
                    attn_norm=t[p + a.native["attn_norm"] + ".weight"],
                    mlp_norm=t[p + a.native["mlp_norm"] + ".weight"],
                    qkv=built["attn_in"],
                    qkv_bias=np.concatenate(biases).astype(np.float32) if all(b is not None for b in biases) else None,
                    o=built["o_in"],
                    gate_up=built["mlp_in"],
                    down=built["down_in"],
                    heads=heads,
                    kv_heads=kv,
                    ffn=w["gate"].n,
                    act=act,
                    keep=keep,
                    gate_t=gate_t,
                )
            )
        self._table = None  # the ctypes layer table of the native decode step, rebuilt when the cache moves
        half = self.head_dim // 2
        self.inv_freq = (1.0 / (self.theta ** (np.arange(0, half, dtype=np.float64) * 2.0 / self.head_dim))).astype(np.float64)
        self._rope_cache = np.zeros((0, self.head_dim), np.float32), np.zeros((0, self.head_dim), np.float32)
        self.cache: list[tuple[np.ndarray, np.ndarray]] = []
        self._table_cache = None
        self.length = 0
        self.native_step = True
        """Run decode steps' layers in one native call and a prefill's attention in native code (False: the
        NumPy paths, also the fallback without AVX2)."""

    # -- pieces ---------------------------------------------------------------------------------
    def _norm(self, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        var = np.mean(x * x, axis=-1, keepdims=True)
        return (x / np.sqrt(var + self.eps)) * w

    def _rope(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        cos, sin = self._rope_cache
        if cos.shape[0] < n:
            m = max(n, 2 * cos.shape[0], 256)
            freqs = np.arange(m, dtype=np.float64)[:, None] * self.inv_freq[None]
            emb = np.concatenate([freqs, freqs], axis=-1)
            self._rope_cache = np.cos(emb).astype(np.float32), np.sin(emb).astype(np.float32)
        return self._rope_cache

    @staticmethod
    def _rotate(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
        h = x.shape[-1] // 2
        rot = np.concatenate([-x[..., h:], x[..., :h]], axis=-1)
        return x * cos + rot * sin

    def _lin(self, L: _Layer, group: str, w: Any, x: np.ndarray, sparse_inputs: bool) -> np.ndarray:
        """One (stacked) linear of a layer; with ``sparse_inputs`` its input is thresholded as the model
        says — at a single row by the input-skipping kernel, which reads only the remaining inputs' rows."""
        from engines import native

        x = np.ascontiguousarray(x, np.float32)
        t = L.act.get(group) if sparse_inputs else None
        k = L.keep.get(group) if sparse_inputs else None
        if k is not None and k < x.shape[1]:  # the top-k form: each row keeps entries above its (k+1)-th largest |x|
            i = x.shape[1] - k - 1
            t = np.partition(np.abs(x), i, axis=1)[:, i : i + 1]
        if isinstance(w, (native.InputMajorWeight, native.InputMajorInt4Weight)):
            if t is not None and x.shape[0] == 1:
                y, used = w.gemv_sparse(x, float(np.max(t)))
                self.inputs_read += used
                self.inputs_total += w.k
                return y
            if t is not None:
                x = np.where(np.abs(x) > t, x, np.float32(0.0))
            return w(x)
        return w(x)

    def _mlp(self, L: _Layer, x: np.ndarray, sparse_inputs: bool = True) -> np.ndarray:
        if L.gate_t is not None and sparse_inputs:
            return self._mlp_cats(L, x)
        gu = self._lin(L, "mlp_in", L.gate_up, x, sparse_inputs)
        g, u = gu[:, : L.ffn], gu[:, L.ffn :]
        return self._lin(L, "down_in", L.down, g / (1.0 + np.exp(-g)) * u, sparse_inputs)

    def _mlp_cats(self, L: _Layer, x: np.ndarray) -> np.ndarray:
        """CATS: SiLU(gate) thresholded; at a single row of a 4-bit gate_up only the gate rows and the up
        rows of the active activations are computed, and down reads only their inputs."""
        from engines import native

        x = np.ascontiguousarray(x, np.float32)
        single = x.shape[0] == 1 and isinstance(L.gate_up, native.NativeWeight) and L.gate_up.format == "int4"
        if single:
            g = L.gate_up.gemv_rows(x, np.arange(L.ffn))[None]
        else:
            gu = L.gate_up(x)
            g, u = gu[:, : L.ffn], gu[:, L.ffn :]
        a = g / (1.0 + np.exp(-g))
        a = np.where(np.abs(a) > L.gate_t, a, np.float32(0.0))
        if single:
            on = np.flatnonzero(a[0])
            a[0, on] *= L.gate_up.gemv_rows(x, on + L.ffn)
            self.inputs_read += on.size
            self.inputs_total += L.ffn
        else:
            a = a * u
        return self._lin(L, "down_in", L.down, a, True)

    def _qkv(self, L: _Layer, x: np.ndarray, sparse_inputs: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        qkv = self._lin(L, "attn_in", L.qkv, x, sparse_inputs)
        if L.qkv_bias is not None:
            qkv = qkv + L.qkv_bias
        d = self.head_dim
        q = qkv[:, : L.heads * d]
        k = qkv[:, L.heads * d : (L.heads + L.kv_heads) * d]
        v = qkv[:, (L.heads + L.kv_heads) * d :]
        return q, k, v

    # -- whole sequences (validation) ------------------------------------------------------------
    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
        """Logits (B, T, vocab) for a batch, no cache; padded keys (mask 0) are not attended to."""
        b, t = input_ids.shape
        d = self.head_dim
        cos, sin = self._rope(t)
        cos, sin = cos[:t], sin[:t]
        causal = np.triu(np.full((t, t), -np.inf, np.float32), 1)
        if attention_mask is not None:
            causal = causal[None] + np.where(attention_mask[:, None, :] > 0, 0.0, -np.inf).astype(np.float32)  # (B, T, T)
        else:
            causal = causal[None]
        h = self.embed[input_ids].reshape(b * t, -1)
        for L in self.layers:
            q, k, v = self._qkv(L, self._norm(h, L.attn_norm))
            q = self._rotate(q.reshape(b, t, L.heads, d).transpose(0, 2, 1, 3), cos, sin)  # (B, H, T, D)
            k = self._rotate(k.reshape(b, t, L.kv_heads, d).transpose(0, 2, 1, 3), cos, sin)
            v = v.reshape(b, t, L.kv_heads, d).transpose(0, 2, 1, 3)
            g = L.heads // L.kv_heads
            qg = q.reshape(b, L.kv_heads, g * t, d)
            s = (qg @ k.transpose(0, 1, 3, 2)).reshape(b, L.kv_heads, g, t, t) / math.sqrt(d)
            s = s + causal[:, None, None]
            s = np.exp(s - s.max(-1, keepdims=True))
            s /= s.sum(-1, keepdims=True)
            s = np.nan_to_num(s, nan=0.0)  # a fully masked (padded) query row
            o = (s.reshape(b, L.kv_heads, g * t, t) @ v).reshape(b, L.heads, t, d).transpose(0, 2, 1, 3).reshape(b * t, L.heads * d)
            h = h + self._lin(L, "o_in", L.o, o, True)
            h = h + self._mlp(L, self._norm(h, L.mlp_norm))
        h = self._norm(h, self.final_norm)
        return self.head(np.ascontiguousarray(h, np.float32)).reshape(b, t, -1)

    # -- decoding with a KV cache -----------------------------------------------------------------
    def _ensure_cache(self, n: int) -> None:
        have = self.cache[0][0].shape[1] if self.cache else 0
        if have >= n:
            return
        size = max(n, 2 * have, 256)
        new = []
        for i, L in enumerate(self.layers):
            kc = np.zeros((L.kv_heads, size, self.head_dim), np.float32)
            vc = np.zeros((L.kv_heads, size, self.head_dim), np.float32)
            if self.cache:
                kc[:, : self.length] = self.cache[i][0][:, : self.length]
                vc[:, : self.length] = self.cache[i][1][:, : self.length]
            new.append((kc, vc))
        self.cache = new

    def prefill(self, input_ids: np.ndarray) -> np.ndarray:
        """Start a sequence (batch 1): fills the KV cache, returns the last position's logits (1, vocab)."""
        from engines import native

        if input_ids.ndim != 2 or input_ids.shape[0] != 1:
            raise PipelineError(f"native decoder: prefill takes input_ids of shape (1, T), got {input_ids.shape}")
        t = input_ids.shape[1]
        d = self.head_dim
        self.length = 0
        self._ensure_cache(t + 64)
        cos, sin = self._rope(t)
        cos, sin = cos[:t], sin[:t]
        causal = np.triu(np.full((t, t), -np.inf, np.float32), 1)
        h = self.embed[input_ids[0]]
        for i, L in enumerate(self.layers):
            # thresholded inputs as the model defines them, multiplied densely (the speed-up is decoding's)
            q, k, v = self._qkv(L, self._norm(h, L.attn_norm))
            kc, vc = self.cache[i]
            o = native.prefill_attention(np.ascontiguousarray(q), np.ascontiguousarray(k), np.ascontiguousarray(v), cos, sin, kc, vc, L.heads,
                                         L.kv_heads) if self.native_step else None
            if o is None:  # no AVX2 + FMA: the same in NumPy
                q = self._rotate(q.reshape(t, L.heads, d).transpose(1, 0, 2), cos, sin)  # (H, T, D)
                k = self._rotate(k.reshape(t, L.kv_heads, d).transpose(1, 0, 2), cos, sin)
                v = v.reshape(t, L.kv_heads, d).transpose(1, 0, 2)
                kc[:, :t] = k
                vc[:, :t] = v
                g = L.heads // L.kv_heads
                s = (q.reshape(L.kv_heads, g * t, d) @ k.transpose(0, 2, 1)).reshape(L.kv_heads, g, t, t) / math.sqrt(d) + causal
                s = np.exp(s - s.max(-1, keepdims=True))
                s /= s.sum(-1, keepdims=True)
                o = (s.reshape(L.kv_heads, g * t, t) @ v).reshape(L.heads, t, d).transpose(1, 0, 2).reshape(t, L.heads * d)
            h = h + self._lin(L, "o_in", L.o, o, True)
            h = h + self._mlp(L, self._norm(h, L.mlp_norm))
        self.length = t
        last = self._norm(h[-1:], self.final_norm)
        return self.head(np.ascontiguousarray(last, np.float32))

    def _layer_table(self) -> Any:
        from engines import native

        if self._table is None or self._table_cache is not self.cache:  # the cache list is replaced when it grows
            table = (native.PkLayer * len(self.layers))()
            for i, L in enumerate(self.layers):
                kc, vc = self.cache[i]
                table[i] = native.PkLayer(
                    L.heads, L.kv_heads, self.head_dim, L.ffn, L.attn_norm.ctypes.data, L.mlp_norm.ctypes.data,
                    L.qkv_bias.ctypes.data if L.qkv_bias is not None else None,
                    *(native.pk_weight(w, L.act.get(g), L.keep.get(g)) for w, g in ((L.qkv, "attn_in"), (L.o, "o_in"), (L.gate_up, "mlp_in"), (L.down, "down_in"))),
                    kc.ctypes.data, vc.ctypes.data, kc.shape[1], -1.0 if L.gate_t is None else float(L.gate_t),
                )
            self._table, self._table_cache = table, self.cache
        return self._table

    def step(self, token: int) -> np.ndarray:
        """One decode step (batch 1): appends to the KV cache in place, returns the logits (1, vocab).
        The layers run in native code (one call) on CPUs with AVX2 + FMA, else in NumPy here."""
        from engines import native

        pos = self.length
        self._ensure_cache(pos + 1)
        cos, sin = self._rope(pos + 1)
        if self.native_step:
            h = np.array(self.embed[token][None], dtype=np.float32, copy=True)  # updated in place: never the embedding itself
            rc, read, total = native.decode_layers(self._layer_table(), h.shape[1], h, pos, cos[pos], sin[pos], self.eps)
            if rc == 0:
                self.inputs_read += read
                self.inputs_total += total
                self.length = pos + 1
                return self.head.gemv(np.ascontiguousarray(self._norm(h, self.final_norm), np.float32))
            self.native_step = False
        d = self.head_dim
        cos, sin = cos[pos], sin[pos]
        h = self.embed[token][None]
        n = pos + 1
        scale = 1.0 / math.sqrt(d)
        for i, L in enumerate(self.layers):
            q, k, v = self._qkv(L, self._norm(h, L.attn_norm))
            kc, vc = self.cache[i]
            kc[:, pos] = self._rotate(k.reshape(L.kv_heads, d), cos, sin)
            vc[:, pos] = v.reshape(L.kv_heads, d)
            g = L.heads // L.kv_heads
            qg = self._rotate(q.reshape(L.heads, d), cos, sin).reshape(L.kv_heads, g, d)
            s = (qg @ kc[:, :n].transpose(0, 2, 1)) * scale  # (KV, G, n)
            s = np.exp(s - s.max(-1, keepdims=True))
            s /= s.sum(-1, keepdims=True)
            o = (s @ vc[:, :n]).reshape(1, L.heads * d)
            h = h + self._lin(L, "o_in", L.o, o, True)
            h = h + self._mlp(L, self._norm(h, L.mlp_norm))
        self.length = n
        return self.head.gemv(np.ascontiguousarray(self._norm(h, self.final_norm), np.float32))

    def generate(self, prompt: np.ndarray, new_tokens: int) -> Generation:
        """Greedy decoding of ``new_tokens`` after ``prompt`` (1, T), timed per step."""
        t0 = time.perf_counter()
        logits = self.prefill(np.asarray(prompt, np.int64))
        prefill_ms = (time.perf_counter() - t0) * 1e3
        steps, tokens, times = [logits], [], []
        for _ in range(new_tokens):
            nxt = int(logits[0].argmax())
            tokens.append(nxt)
            if len(tokens) == new_tokens:
                break
            t0 = time.perf_counter()
            logits = self.step(nxt)
            times.append((time.perf_counter() - t0) * 1e3)
            steps.append(logits)
        return Generation(np.asarray(tokens, np.int64)[None], steps, prefill_ms, times)


class NativeRunner(Runner):
    def __init__(self, artifact_dir: Path, threads: int, name: str | None = None):
        super().__init__()
        self.artifact_dir = Path(artifact_dir)
        self.threads = int(threads)
        self.name = name or f"native-cpu:{self.artifact_dir.parent.name}"
        self.decoder: NativeDecoder | None = None

    def activate_impl(self) -> None:
        from engines import native

        native.set_threads(self.threads)
        self._blas_threads = native.numpy_blas_threads(1)
        self.decoder = NativeDecoder(self.artifact_dir)

    def deactivate_impl(self) -> None:
        from engines import native

        self.decoder = None
        if getattr(self, "_blas_threads", None):
            native.numpy_blas_threads(self._blas_threads)

    def describe(self) -> str:
        from engines import native

        return f"native-cpu ({native.isa()} sparse kernels, {self.threads} threads, {ARTIFACT})"

    def input_metadata(self) -> list[TensorMeta]:
        return [TensorMeta("input_ids", np.dtype(np.int64), ("batch", "sequence")), TensorMeta("attention_mask", np.dtype(np.int64), ("batch", "sequence"))]

    def infer_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from engines import native

        native.set_threads(self.threads)
        return {"logits": self.decoder.forward(feeds["input_ids"], feeds.get("attention_mask")).astype(np.float32)}

    def generate(self, prompt: np.ndarray, new_tokens: int) -> Generation:
        from engines import native

        if not self.active:
            raise PipelineError(f"runner '{self.name}' is not active; use it as 'with runner: runner.generate(...)'")
        native.set_threads(self.threads)
        return self.decoder.generate(prompt, new_tokens)
