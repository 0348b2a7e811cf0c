"""Engine and Runner interfaces.

``engine.build(onnx_path, out_dir) -> EngineArtifact`` turns an ONNX file into
whatever the backend runs; ``engine.runner(artifact)`` gives a :class:`Runner`
used as ``with runner: runner.infer(feeds)``. A backend that cannot work on this
machine raises :class:`core.errors.EngineUnavailable` from ``check_available``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import OptionError, PipelineError


@dataclass
class TensorMeta:
    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...]
    """Static sizes as ints; dynamic ones as their symbolic name or None."""


@dataclass
class EngineArtifact:
    backend: str
    path: Path
    """The file the runner loads (e.g. the optimised ONNX model)."""
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Generation:
    """A greedy decode by an engine that generates (``Engine.generates``): ``tokens`` (1, n), the logits
    of every step (the prefill's last position first), prefill milliseconds and one milliseconds value
    per decode step."""

    tokens: np.ndarray
    logits: list[np.ndarray]
    prefill_ms: float
    decode_ms: list[float]


@dataclass
class NoOptions:
    """An engine without options."""


def llama_style_family(facts: Any, decoder: str) -> str | None:
    """``check_model`` of an engine that runs Llama-style decoder blocks itself (the adapter's ``native``
    roles), its ``decoder`` named in the reason: None for such a family, else the reason."""
    from core.adapters import ADAPTERS

    adapter = next((a for a in ADAPTERS if a.family == facts.family), None)
    if adapter is None or not adapter.native or facts.task != "causal-lm":
        return _no_llama_decoder(facts.family, facts.task, decoder, adapter.native_refusal if adapter is not None else "")
    return None


def _no_llama_decoder(family: str, task: str, decoder: str, why: str = "") -> str:
    if why:
        return f"family '{family}' has no {decoder}: {why}; use onnxruntime-cpu"
    return f"family '{family}' ({task}) has no {decoder} (Llama-style blocks only: its adapter does not fill 'native'); use onnxruntime-cpu"


def sliding_window(config: Any) -> int:
    """The attention's sliding window in positions, else -1 (transformers already clears ``sliding_window``
    in configs whose ``use_sliding_window`` is off, as Qwen2's is by default)."""
    w = getattr(config, "sliding_window", None)
    if not w or not getattr(config, "use_sliding_window", True):
        return -1
    return int(w)


def llama_style_unsupported(adapter: Any, config: Any, decoder: str) -> str | None:
    """None when an engine's own Llama-style ``decoder`` can run this model (read from its config), else the reason."""
    if not adapter.native or adapter.task != "causal-lm":
        return _no_llama_decoder(adapter.family, adapter.task, decoder, adapter.native_refusal)
    params = getattr(config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", (getattr(config, "rope_scaling", None) or {}).get("rope_type", "default"))
    if rope_type not in (None, "default"):
        return f"rotary scaling '{rope_type}' is not implemented by the {decoder} (only the default rotary embedding)"
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        return f"MLP activation '{act}' is not implemented by the {decoder} (only silu)"
    return None


class Engine(ABC):
    name: str = "engine"
    options_class: type = NoOptions
    """A dataclass of the engine's options: its fields are the recipe keys (``engines[i].options.<key>``),
    their types are checked by the recipe loader, and its ``__post_init__`` raises
    :class:`core.errors.OptionError` naming the key of a value out of range."""

    source: str = "onnx"
    """What ``build`` is given: 'onnx' (the variant's exported graph, ``onnx/model.onnx``) or 'model'
    (the variant's saved model directory, for an engine that runs the model without ONNX)."""
    quantized_weights: str | None = None
    """How it runs a variant whose weights a quantizing pass left quantized: 'kernels' (its graph's
    ``MatMulNBits`` ops, ONNX Runtime CPU), 'dequantized' (the fp32 values of the quantized weights, at
    fp32 speed and size: native-cpu), or None (it cannot: the recipe is refused)."""
    generates: bool = False
    """Whether its runner has ``generate(prompt, new_tokens)`` (greedy decode with its own KV cache);
    the decode stage then times it beside the ONNX KV-cache graphs."""

    def __init__(self, options: dict[str, Any]):
        self.options = self.validate_options(dict(options))

    @classmethod
    def check_model(cls, facts: Any) -> str | None:
        """None when this backend can run a model with these facts (:class:`core.adapters.base.ModelFacts`),
        else the reason it cannot — asked by ``pipeline check`` before anything is built."""
        return None

    @classmethod
    def check_passes(cls, passes: list[str]) -> str | None:
        """None when this backend can run a variant made by these passes (their recipe names, in order),
        else the reason it cannot — asked by ``pipeline check`` for every variant."""
        return None

    def validate_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """The options as a plain dict with defaults filled in; an unknown key is a ValueError naming it."""
        from dataclasses import asdict, fields

        known = [f.name for f in fields(self.options_class)]
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise OptionError(unknown[0], f"engine '{self.name}': unknown option '{unknown[0]}'; expected {', '.join(known) or 'none'}")
        return asdict(self.options_class(**options))

    @abstractmethod
    def check_available(self) -> None:
        """Raise EngineUnavailable(backend, reason) when this backend cannot run here."""

    @abstractmethod
    def build(self, onnx_path: Path, out_dir: Path) -> EngineArtifact: ...

    @abstractmethod
    def runner(self, artifact: EngineArtifact, **kwargs: Any) -> "Runner": ...

    def version_info(self) -> dict[str, Any]:
        return {}


class Runner(ABC):
    """Explicit lifecycle: ``activate`` allocates, ``deactivate`` frees; ``infer`` checks its feeds."""

    name = "runner"

    def __init__(self) -> None:
        self.active = False

    def __enter__(self) -> "Runner":
        self.activate()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.deactivate()

    def activate(self) -> None:
        if self.active:
            raise PipelineError(f"runner '{self.name}' is already active")
        self.activate_impl()
        self.active = True

    def deactivate(self) -> None:
        if self.active:
            self.deactivate_impl()
            self.active = False

    def describe(self) -> str:
        """What this runner executes on (runtime, provider or device), for the report; read while active."""
        return self.name

    @abstractmethod
    def activate_impl(self) -> None: ...

    @abstractmethod
    def deactivate_impl(self) -> None: ...

    @abstractmethod
    def input_metadata(self) -> list[TensorMeta]: ...

    @abstractmethod
    def infer_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not self.active:
            raise PipelineError(f"runner '{self.name}' is not active; use it as 'with runner: runner.infer(feeds)'")
        self.check_feeds(feeds)
        return self.infer_impl(feeds)

    def check_feeds(self, feeds: dict[str, np.ndarray]) -> None:
        meta = {m.name: m for m in self.input_metadata()}
        missing = sorted(set(meta) - set(feeds))
        extra = sorted(set(feeds) - set(meta))
        if missing or extra:
            raise PipelineError(f"runner '{self.name}': feeds missing {missing} / unexpected {extra}; expected inputs {sorted(meta)}")
        for name, arr in feeds.items():
            m = meta[name]
            if np.dtype(arr.dtype) != np.dtype(m.dtype):
                raise PipelineError(f"runner '{self.name}': input '{name}' has dtype {arr.dtype}, expected {np.dtype(m.dtype)}")
            if len(arr.shape) != len(m.shape):
                raise PipelineError(f"runner '{self.name}': input '{name}' has shape {arr.shape}, expected rank {len(m.shape)} {m.shape}")
            for got, want in zip(arr.shape, m.shape):
                if isinstance(want, int) and want >= 0 and got != want:
                    raise PipelineError(f"runner '{self.name}': input '{name}' has shape {arr.shape}, expected {m.shape}")
