"""ONNX Runtime CPU backend.

build: an InferenceSession with full graph optimisation writes the optimised
model (``model.ort.onnx``), which is the engine artifact. Like any
``ORT_ENABLE_ALL`` output it may hold CPU-specific fused kernels: it is tied to
this ONNX Runtime version and CPU family, which the artifact records.
"""

from __future__ import annotations

import logging
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

from dataclasses import dataclass

from engines.base import Engine, EngineArtifact, Runner, TensorMeta
from core.errors import EngineUnavailable, OptionError

log = logging.getLogger(__name__)

_ORT_TYPES = {
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(bool)": np.bool_,
}


@dataclass
class OrtOptions:
    optimization: str = "all"
    """Graph optimisation level of the session that writes the engine: basic, extended or all."""
    threads: int = 0
    """Intra-op threads (0 = all cores)."""

    def __post_init__(self) -> None:
        if self.optimization not in ("basic", "extended", "all"):
            raise OptionError("optimization", f"optimization '{self.optimization}' is not one of basic, extended, all")
        if not isinstance(self.threads, int) or isinstance(self.threads, bool) or self.threads < 0:
            raise OptionError("threads", f"threads {self.threads!r} must be an integer >= 0 (0 = all cores)")


def require_cpu_provider(engine: str) -> Any:
    """The ``onnxruntime`` module when it imports and has its CPU provider, else ``EngineUnavailable`` for ``engine``."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise EngineUnavailable(engine, f"onnxruntime is not importable ({exc})") from None
    if "CPUExecutionProvider" not in ort.get_available_providers():
        raise EngineUnavailable(engine, "CPUExecutionProvider is missing from this onnxruntime build")
    return ort


class OnnxRuntimeCpuEngine(Engine):
    name = "onnxruntime-cpu"
    quantized_weights = "kernels"
    options_class = OrtOptions

    def check_available(self) -> None:
        require_cpu_provider(self.name)

    def version_info(self) -> dict[str, Any]:
        import onnxruntime as ort

        return {"onnxruntime": ort.__version__, "machine": platform.machine(), "processor": platform.processor()}

    def _session_options(self, optimized_path: Path | None = None, threads: int | None = None, external: bool = False) -> Any:
        import onnxruntime as ort

        so = ort.SessionOptions()
        level = {
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[self.options["optimization"]]
        so.graph_optimization_level = level
        so.log_severity_level = 3
        n = threads if threads is not None else self.options["threads"]
        so.intra_op_num_threads = n or (os.cpu_count() or 1)
        if optimized_path is not None:
            so.optimized_model_filepath = str(optimized_path)
            if external:  # a model over protobuf's 2 GiB limit keeps its weights in a side file
                so.add_session_config_entry("session.optimized_model_external_initializers_file_name", optimized_path.name + ".data")
        return so

    def build(self, onnx_path: Path, out_dir: Path) -> EngineArtifact:
        import onnxruntime as ort

        self.check_available()
        out = Path(out_dir) / "model.ort.onnx"
        t0 = time.perf_counter()
        external = Path(str(onnx_path) + ".data").is_file()
        ort.InferenceSession(str(onnx_path), self._session_options(out, external=external), providers=["CPUExecutionProvider"])
        seconds = time.perf_counter() - t0
        if not out.is_file():
            raise RuntimeError(f"onnxruntime did not write the optimised model to {out}")
        info = self.version_info() | {"options": self.options, "build_seconds": round(seconds, 2), "bytes": out.stat().st_size}
        log.info("onnxruntime-cpu engine built in %.1f s (%s)", seconds, out)
        return EngineArtifact(self.name, out, info)

    def runner(self, artifact: EngineArtifact, threads: int | None = None, spinning: bool = True, **_: Any) -> "OnnxRuntimeRunner":
        return self.open(Path(artifact.path), threads=threads, spinning=spinning)

    def open(self, model: Path, threads: int | None = None, spinning: bool = True, name: str | None = None) -> "OnnxRuntimeRunner":
        """A runner on any ONNX file with this engine's session options. ``spinning=False`` stops idle
        intra-op threads from spinning, for sessions that alternate in one process (latency runs)."""
        so = self._session_options(None, threads)
        if not spinning:
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return OnnxRuntimeRunner(Path(model), so, name=name)


class OnnxRuntimeRunner(Runner):
    def __init__(self, model_path: Path, session_options: Any, name: str | None = None):
        super().__init__()
        self.model_path = Path(model_path)
        self.session_options = session_options
        self.name = name or f"onnxruntime-cpu:{self.model_path.parent.name}"
        self.session = None
        self.providers: list[Any] = ["CPUExecutionProvider"]

    def activate_impl(self) -> None:
        import onnxruntime as ort

        self.session = ort.InferenceSession(str(self.model_path), self.session_options, providers=self.providers)

    def deactivate_impl(self) -> None:
        self.session = None

    def describe(self) -> str:
        """The session's runtime and the provider that runs it (the first the session kept)."""
        import onnxruntime as ort

        providers = self.session.get_providers() if self.session is not None else self.providers
        first = providers[0] if isinstance(providers[0], str) else providers[0][0]
        return f"onnxruntime {ort.__version__} {first} ({self.model_path.name})"

    def input_metadata(self) -> list[TensorMeta]:
        return [
            TensorMeta(i.name, np.dtype(_ORT_TYPES.get(i.type, np.float32)), tuple(i.shape)) for i in self.session.get_inputs()
        ]

    def output_names(self) -> list[str]:
        return [o.name for o in self.session.get_outputs()]

    def infer_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = self.output_names()
        return dict(zip(names, self.session.run(names, feeds)))
