"""TensorRT backend (TensorRT 10 and 11 Python API), imported lazily.

build: ONNX parser → network; an optimisation profile per input from the
engine options' (batch, sequence) ranges; ``BuilderFlag.SPARSE_WEIGHTS`` when
sparsity is asked for; TF32 on or off; a workspace limit; a persisted timing
cache; detailed profiling verbosity so the engine inspector's per-layer JSON can
be saved. The verbose build log is kept (``build.log``) and parsed for the
"(Sparsity) …" lines (:mod:`engines.trt_log`).

Precision: TensorRT 10 still has ``BuilderFlag.FP16``; TensorRT 11 is strongly
typed and has no precision flags, so an fp16 engine there needs an fp16 ONNX
graph. Asking for ``fp16: true`` on TensorRT 11 is an error that says so.

Where ``tensorrt`` is not importable or no CUDA GPU is present,
``check_available`` raises :class:`EngineUnavailable`, which the build records
as a skip with the reason.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engines.base import Engine, EngineArtifact, Runner, TensorMeta
from engines.trt_log import parse_sparsity_log
from core.artifacts import atomic_write_bytes, atomic_write_text
from core.errors import EngineUnavailable, OptionError, PipelineError

log = logging.getLogger(__name__)

@dataclass
class TensorRTOptions:
    sparsity: bool = True
    """BuilderFlag.SPARSE_WEIGHTS: TensorRT may pick 2:4 sparse kernels for 2:4 weights."""
    tf32: bool = True
    fp16: bool = False
    """BuilderFlag.FP16 on TensorRT 10; refused on TensorRT 11 (precision lives in the graph)."""
    workspace_mb: int = 4096
    min_shape: list[int] = field(default_factory=lambda: [1, 1])
    """[batch, sequence] of the optimisation profile's minimum (opt and max likewise)."""
    opt_shape: list[int] = field(default_factory=lambda: [1, 128])
    max_shape: list[int] = field(default_factory=lambda: [4, 512])
    optimization_level: int = 3
    timing_cache: str | None = None
    """Timing cache file (default: under the user cache)."""

    def __post_init__(self) -> None:
        for key in ("sparsity", "tf32", "fp16"):
            if not isinstance(getattr(self, key), bool):
                raise OptionError(key, f"{key} must be true or false, got {getattr(self, key)!r}")
        shapes = [self.min_shape, self.opt_shape, self.max_shape]
        for k, s in zip(("min_shape", "opt_shape", "max_shape"), shapes):
            if not (isinstance(s, list) and len(s) == 2 and all(isinstance(x, int) and x >= 1 for x in s)):
                raise OptionError(k, f"{k} must be [batch, sequence] with positive integers, got {s!r}")
        if not all(shapes[0][i] <= shapes[1][i] <= shapes[2][i] for i in range(2)):
            raise OptionError("opt_shape", f"shapes must satisfy min <= opt <= max, got {shapes}")
        if not isinstance(self.workspace_mb, int) or self.workspace_mb < 16:
            raise OptionError("workspace_mb", f"workspace_mb {self.workspace_mb!r} must be an integer >= 16")
        if self.optimization_level not in range(0, 6):
            raise OptionError("optimization_level", f"optimization_level {self.optimization_level!r} must be 0..5")


def _import_trt() -> Any:
    try:
        import tensorrt as trt  # noqa: PLC0415  (lazy: the CLI must work without TensorRT)
    except ImportError as exc:
        raise EngineUnavailable("tensorrt", f"the tensorrt Python package is not importable ({exc})") from None
    return trt


class TensorRTEngine(Engine):
    options_class = TensorRTOptions
    name = "tensorrt"

    def check_available(self) -> None:
        _import_trt()
        try:
            import torch

            gpu = torch.cuda.is_available()
        except ImportError:
            gpu = False
        if not gpu:
            raise EngineUnavailable(self.name, "no CUDA GPU is visible on this machine")

    def version_info(self) -> dict[str, Any]:
        trt = _import_trt()
        import torch

        return {"tensorrt": trt.__version__, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}

    def _timing_cache_path(self) -> Path:
        if self.options["timing_cache"]:
            return Path(self.options["timing_cache"]).expanduser()
        from core.models import cache_root

        return cache_root() / "tensorrt" / "timing.cache"

    def build(self, onnx_path: Path, out_dir: Path) -> EngineArtifact:
        trt = _import_trt()
        self.check_available()
        opts = self.options
        lines: list[str] = []

        class _Logger(trt.ILogger):
            def __init__(self) -> None:
                trt.ILogger.__init__(self)

            def log(self, severity: Any, msg: str) -> None:
                lines.append(f"[{severity.name}] {msg}")
                if severity <= trt.ILogger.Severity.WARNING:
                    log.warning("TensorRT: %s", msg)

        logger = _Logger()
        builder = trt.Builder(logger)
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(onnx_path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise PipelineError(f"TensorRT's ONNX parser rejected {onnx_path}: {errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, opts["workspace_mb"] << 20)
        config.builder_optimization_level = opts["optimization_level"]
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
        if opts["sparsity"]:
            config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
        if not opts["tf32"] and hasattr(trt.BuilderFlag, "TF32"):
            config.clear_flag(trt.BuilderFlag.TF32)
        if opts["fp16"]:
            if not hasattr(trt.BuilderFlag, "FP16"):
                raise PipelineError(
                    f"TensorRT {trt.__version__} has no FP16 builder flag (strongly typed): export an fp16 ONNX graph instead of setting fp16"
                )
            config.set_flag(trt.BuilderFlag.FP16)
        profile = builder.create_optimization_profile()
        for i in range(network.num_inputs):
            inp = network.get_input(i)
            profile.set_shape(inp.name, tuple(opts["min_shape"]), tuple(opts["opt_shape"]), tuple(opts["max_shape"]))
        config.add_optimization_profile(profile)
        cache_path = self._timing_cache_path()
        cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
        t0 = time.perf_counter()
        serialized = builder.build_serialized_network(network, config)
        seconds = time.perf_counter() - t0
        atomic_write_text(Path(out_dir) / "build.log", "\n".join(lines) + "\n")
        if serialized is None:
            raise PipelineError(f"TensorRT failed to build an engine from {onnx_path}; see {Path(out_dir) / 'build.log'}")
        plan = Path(out_dir) / "model.plan"
        atomic_write_bytes(plan, bytes(serialized))
        atomic_write_bytes(cache_path, bytes(config.get_timing_cache().serialize()))
        runtime = trt.Runtime(logger)
        engine = runtime.deserialize_cuda_engine(serialized)
        inspector = engine.create_engine_inspector()
        atomic_write_text(Path(out_dir) / "layers.json", inspector.get_engine_information(trt.LayerInformationFormat.JSON))
        sparsity = parse_sparsity_log(lines)
        info = self.version_info() | {
            "options": opts,
            "build_seconds": round(seconds, 2),
            "bytes": plan.stat().st_size,
            "sparsity_log": sparsity.to_dict(),
        }
        log.info("TensorRT engine built in %.1f s: %d layers eligible for sparse math, %d picked sparse", seconds, len(sparsity.eligible), len(sparsity.picked))
        return EngineArtifact(self.name, plan, info)

    def runner(self, artifact: EngineArtifact, **_: Any) -> "TensorRTRunner":
        return TensorRTRunner(Path(artifact.path))


class TensorRTRunner(Runner):
    """Device buffers as CUDA tensors (PyTorch), ``execute_async_v3`` on a dedicated stream."""

    def __init__(self, plan: Path):
        super().__init__()
        self.plan = plan
        self.name = f"tensorrt:{plan.parent.name}"

    def activate_impl(self) -> None:
        trt = _import_trt()
        import torch

        self._torch = torch
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(self.plan.read_bytes())
        if self._engine is None:
            raise PipelineError(f"TensorRT could not deserialise {self.plan} (built by another TensorRT version or GPU?)")
        self._context = self._engine.create_execution_context()
        self._stream = torch.cuda.Stream()
        self._trt = trt
        self._names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]

    def deactivate_impl(self) -> None:
        self._context = self._engine = self._runtime = None

    def _is_input(self, name: str) -> bool:
        return self._engine.get_tensor_mode(name) == self._trt.TensorIOMode.INPUT

    def input_metadata(self) -> list[TensorMeta]:
        out = []
        for n in self._names:
            if self._is_input(n):
                dt = np.dtype(self._trt.nptype(self._engine.get_tensor_dtype(n)))
                out.append(TensorMeta(n, dt, tuple(d if d >= 0 else None for d in self._engine.get_tensor_shape(n))))
        return out

    def infer_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self._torch
        keep = []
        for n in self._names:
            if self._is_input(n):
                t = torch.from_numpy(np.ascontiguousarray(feeds[n])).cuda()
                keep.append(t)
                self._context.set_input_shape(n, tuple(t.shape))
                self._context.set_tensor_address(n, t.data_ptr())
        outputs = {}
        for n in self._names:
            if not self._is_input(n):
                shape = tuple(self._context.get_tensor_shape(n))
                dt = torch.from_numpy(np.zeros(0, self._trt.nptype(self._engine.get_tensor_dtype(n)))).dtype
                t = torch.empty(shape, dtype=dt, device="cuda")
                outputs[n] = t
                self._context.set_tensor_address(n, t.data_ptr())
        with torch.cuda.stream(self._stream):
            if not self._context.execute_async_v3(self._stream.cuda_stream):
                raise PipelineError(f"TensorRT execution failed for {self.plan}")
        self._stream.synchronize()
        return {n: t.cpu().numpy() for n, t in outputs.items()}
