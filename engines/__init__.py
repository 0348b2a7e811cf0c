"""Inference backends behind one interface (build → artifact, runner with a lifecycle).

The registry maps recipe names to ``module:Class`` strings so that listing or
validating backends never imports a runtime (TensorRT is imported lazily).
"""

from __future__ import annotations

import importlib

from engines.base import Engine, EngineArtifact, Runner

KNOWN_BACKENDS: dict[str, str | type] = {
    "onnxruntime-cpu": "engines.onnxruntime:OnnxRuntimeCpuEngine",
    "onnxruntime-cuda": "engines.onnxruntime_gpu:OnnxRuntimeCudaEngine",
    "onnxruntime-trt": "engines.onnxruntime_gpu:OnnxRuntimeTensorRTEngine",
    "tensorrt": "engines.tensorrt:TensorRTEngine",
    "torch-cuda": "engines.torch_cuda:TorchCudaEngine",
    "native-cpu": "engines.native_cpu:NativeCpuEngine",
    "onnxruntime-fused": "engines.onnxruntime_fused:OnnxRuntimeFusedEngine",
}

__all__ = ["Engine", "EngineArtifact", "KNOWN_BACKENDS", "Runner", "engine_class", "get_engine", "register_engine"]


def register_engine(backend: str, target: str | type) -> None:
    """Add a backend: ``target`` is an :class:`Engine` subclass or its ``module:Class`` path (imported on use)."""
    if backend in KNOWN_BACKENDS:
        raise ValueError(f"backend '{backend}' is registered already")
    KNOWN_BACKENDS[backend] = target


def engine_class(backend: str) -> type[Engine]:
    """The Engine class of a backend; imports its module, not its runtime (runtimes are imported lazily)."""
    if backend not in KNOWN_BACKENDS:
        raise ValueError(f"backend '{backend}' is not one of {', '.join(sorted(KNOWN_BACKENDS))}")
    target = KNOWN_BACKENDS[backend]
    if isinstance(target, str):
        module, cls = target.split(":")
        return getattr(importlib.import_module(module), cls)
    return target


def get_engine(backend: str, options: dict | None = None) -> Engine:
    return engine_class(backend)(dict(options or {}))
