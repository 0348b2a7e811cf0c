"""ONNX Runtime GPU backends, where ``onnxruntime-gpu`` is installed.

- ``onnxruntime-cuda``: CUDAExecutionProvider.
- ``onnxruntime-trt``: TensorrtExecutionProvider (CUDA as fallback) with
  ``trt_sparsity_enable`` for 2:4 weights, ``trt_fp16_enable``, and an engine cache
  (``trt_engine_cache_enable`` / ``trt_engine_cache_path``, under the artifact
  directory) so TensorRT engines built at session creation are reused.

The artifact is the exported ONNX file itself: these providers compile at
session creation. Where the provider is missing (the CPU build of onnxruntime,
as on this project's machines), ``check_available`` raises EngineUnavailable.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from dataclasses import dataclass

from engines.base import EngineArtifact
from engines.onnxruntime import OnnxRuntimeCpuEngine, OnnxRuntimeRunner, OrtOptions
from core.errors import EngineUnavailable, OptionError


@dataclass
class OrtTensorRTOptions(OrtOptions):
    sparsity: bool = True
    """trt_sparsity_enable: let TensorRT pick 2:4 sparse kernels for 2:4 weights."""
    fp16: bool = False
    """trt_fp16_enable."""

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("sparsity", "fp16"):
            if not isinstance(getattr(self, key), bool):
                raise OptionError(key, f"{key} must be true or false, got {getattr(self, key)!r}")


class _OrtGpuEngine(OnnxRuntimeCpuEngine):
    provider = "CUDAExecutionProvider"
    quantized_weights = None  # no GPU here to measure where its providers place the quantized ops

    def check_available(self) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise EngineUnavailable(self.name, f"onnxruntime is not importable ({exc})") from None
        if self.provider not in ort.get_available_providers():
            raise EngineUnavailable(self.name, f"{self.provider} is not in this onnxruntime build ({ort.__version__}; install onnxruntime-gpu)")

    def providers(self, cache_dir: Path) -> list[Any]:
        return [self.provider, "CPUExecutionProvider"]

    def build(self, onnx_path: Path, out_dir: Path) -> EngineArtifact:
        self.check_available()
        dst = Path(out_dir) / "model.onnx"
        shutil.copyfile(onnx_path, dst)
        data = Path(str(onnx_path) + ".data")
        if data.is_file():
            shutil.copyfile(data, Path(out_dir) / data.name)
        return EngineArtifact(self.name, dst, self.version_info() | {"options": self.options, "provider": self.provider})

    def runner(self, artifact: EngineArtifact, threads: int | None = None, spinning: bool = True, **_: Any) -> OnnxRuntimeRunner:
        so = self._session_options(None, threads)
        r = OnnxRuntimeRunner(Path(artifact.path), so, name=f"{self.name}:{Path(artifact.path).parent.name}")
        r.providers = self.providers(Path(artifact.path).parent / "trt-cache")
        return r


class OnnxRuntimeCudaEngine(_OrtGpuEngine):
    name = "onnxruntime-cuda"
    provider = "CUDAExecutionProvider"


class OnnxRuntimeTensorRTEngine(_OrtGpuEngine):
    name = "onnxruntime-trt"
    provider = "TensorrtExecutionProvider"
    options_class = OrtTensorRTOptions

    def providers(self, cache_dir: Path) -> list[Any]:
        cache_dir.mkdir(parents=True, exist_ok=True)
        trt_opts = {
            "trt_sparsity_enable": self.options["sparsity"],
            "trt_fp16_enable": self.options["fp16"],
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(cache_dir),
        }
        return [(self.provider, trt_opts), "CUDAExecutionProvider", "CPUExecutionProvider"]
