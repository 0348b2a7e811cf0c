"""Inference backends behind one interface (build → artifact, runner with a lifecycle).

The registry maps recipe names to ``module:Class`` strings so that listing or
validating backends never imports a runtime (TensorRT is imported lazily).
"""

from __future__ import annotations

import importlib

from engines.base import Engine, EngineArtifact, Runner

KNOWN_BACKENDS: dict[str, str] = {
    "onnxruntime-cpu": "engines.onnxruntime:OnnxRuntimeCpuEngine",
    "onnxruntime-cuda": "engines.onnxruntime_gpu:OnnxRuntimeCudaEngine",
    "onnxruntime-trt": "engines.onnxruntime_gpu:OnnxRuntimeTensorRTEngine",
    "tensorrt": "engines.tensorrt:TensorRTEngine",
    "torch-cuda": "engines.torch_cuda:TorchCudaEngine",
}

__all__ = ["Engine", "EngineArtifact", "KNOWN_BACKENDS", "Runner", "get_engine"]


def get_engine(backend: str, options: dict | None = None) -> Engine:
    if backend not in KNOWN_BACKENDS:
        raise ValueError(f"backend '{backend}' is not one of {', '.join(sorted(KNOWN_BACKENDS))}")
    module, cls = KNOWN_BACKENDS[backend].split(":")
    return getattr(importlib.import_module(module), cls)(dict(options or {}))
