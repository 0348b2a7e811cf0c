"""ONNX Runtime CPU on the fused decoder graph (``engines/fused_graph.py``): ``GroupQueryAttention``
with rotary embedding and an in-place KV buffer, ``SkipSimplifiedLayerNormalization``, packed q/k/v,
``MatMulNBits`` for quantized weights — the contrib ops ONNX Runtime's CPU provider has fused kernels
for. Built from the variant's saved model (``source = 'model'``); the plain traced graphs stay what
``onnxruntime-cpu`` and TensorRT run (standard ops only).

Generation (``runner.generate``) binds each layer's past and present KV to one preallocated buffer
(I/O binding), so a decode step neither concatenates nor copies the cache, and binds the logits to a
preallocated output.
"""

from __future__ import annotations

import logging
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import EngineUnavailable, OptionError, PipelineError
from engines.base import Engine, EngineArtifact, Generation, Runner, TensorMeta, llama_style_family
from engines.fused_graph import ACTIVATION, CONTEXTUAL, GRAPH, FusedLayout, build_fused_graph, read_layout

log = logging.getLogger(__name__)

CONTRIB_OPS = ("GroupQueryAttention", "SkipSimplifiedLayerNormalization", "MatMulNBits")


@dataclass
class FusedOptions:
    threads: int = 0
    """Intra-op threads (0 = all cores)."""
    max_positions: int = 4096
    """Rows of the rotary tables in the graph: the longest prompt + generated tokens it can run
    (at most the model's context)."""

    def __post_init__(self) -> None:
        if not isinstance(self.threads, int) or isinstance(self.threads, bool) or self.threads < 0:
            raise OptionError("threads", f"threads {self.threads!r} must be an integer >= 0 (0 = all cores)")
        if not isinstance(self.max_positions, int) or isinstance(self.max_positions, bool) or not 16 <= self.max_positions <= 1 << 20:
            raise OptionError("max_positions", f"max_positions {self.max_positions!r} must be an integer in [16, 1048576]")


class OnnxRuntimeFusedEngine(Engine):
    name = "onnxruntime-fused"
    source = "model"
    """Built from the variant's saved model directory: the graph is written from its weights."""
    generates = True
    quantized_weights = "kernels"
    options_class = FusedOptions

    @classmethod
    def check_model(cls, facts: Any) -> str | None:
        return llama_style_family(facts, "fused decoder graph")

    @classmethod
    def check_passes(cls, passes: list[str]) -> str | None:
        refused = {"contextual": CONTEXTUAL, "activation": ACTIVATION}
        return next((refused[p] for p in passes if p in refused), None)

    def check_available(self) -> None:
        from engines.onnxruntime import require_cpu_provider

        ort = require_cpu_provider(self.name)
        from onnxruntime.capi import onnxruntime_pybind11_state as C

        have = {s.name for s in C.get_all_operator_schema() if s.domain == "com.microsoft"}
        missing = [op for op in CONTRIB_OPS if op not in have]
        if missing:
            raise EngineUnavailable(self.name, f"onnxruntime {ort.__version__} lacks the contrib ops {missing}")

    def version_info(self) -> dict[str, Any]:
        import onnxruntime as ort

        return {"onnxruntime": ort.__version__, "graph": "fused", "machine": platform.machine(), "processor": platform.processor()}

    def build(self, model_dir: Path, out_dir: Path) -> EngineArtifact:
        self.check_available()
        t0 = time.perf_counter()
        out_dir = Path(out_dir)
        info = build_fused_graph(Path(model_dir), out_dir / GRAPH, max_positions=self.options["max_positions"])
        # load once: a graph ONNX Runtime refuses fails the build, not the first validation
        with OnnxRuntimeFusedRunner(out_dir, self._session_options()):
            pass
        info = self.version_info() | {"options": self.options, "build_seconds": round(time.perf_counter() - t0, 2)} | info
        log.info("onnxruntime-fused engine built in %.1f s: %d nodes, %.1f MB", info["build_seconds"], info["nodes"], info["bytes"] / 1e6)
        return EngineArtifact(self.name, out_dir / GRAPH, info)

    def _session_options(self, threads: int | None = None, spinning: bool = False) -> Any:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        n = threads if threads is not None else self.options["threads"]
        so.intra_op_num_threads = n or (os.cpu_count() or 1)
        if not spinning:
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return so

    def runner(self, artifact: EngineArtifact, threads: int | None = None, spinning: bool = False, **_: Any) -> "OnnxRuntimeFusedRunner":
        """``spinning`` is off by default: the runner alternates with other sessions in one process (latency runs)."""
        return OnnxRuntimeFusedRunner(Path(artifact.path).parent, self._session_options(threads, spinning))


class OnnxRuntimeFusedRunner(Runner):
    """Runs the fused graph in ``artifact_dir``. ``graph`` and ``layout`` let it drive another graph of the
    same interface (``input_ids``, ``attention_mask``, ``past_key_values.<i>.key``/``.value`` →
    ``logits``, ``present.<i>.*`` with a shared-buffer ``GroupQueryAttention``), e.g. ONNX Runtime
    GenAI's model builder output, whose logits cover every position (no ``logits_to_keep`` input)."""

    def __init__(self, artifact_dir: Path, session_options: Any, name: str | None = None, graph: str = GRAPH, layout: FusedLayout | None = None):
        super().__init__()
        self.artifact_dir = Path(artifact_dir)
        self.graph = graph
        self.session_options = session_options
        self.name = name or f"onnxruntime-fused:{self.artifact_dir.parent.name}"
        self.session = None
        self.layout = layout or read_layout(self.artifact_dir)
        self.keeps = True

    def activate_impl(self) -> None:
        import onnxruntime as ort

        self.session = ort.InferenceSession(str(self.artifact_dir / self.graph), self.session_options, providers=["CPUExecutionProvider"])
        self.keeps = any(i.name == "logits_to_keep" for i in self.session.get_inputs())

    def deactivate_impl(self) -> None:
        self.session = None

    def describe(self) -> str:
        import onnxruntime as ort

        return f"onnxruntime {ort.__version__} CPUExecutionProvider, fused contrib-op graph ({GRAPH})"

    def input_metadata(self) -> list[TensorMeta]:
        return [TensorMeta("input_ids", np.dtype(np.int64), ("batch", "sequence")), TensorMeta("attention_mask", np.dtype(np.int64), ("batch", "sequence"))]

    def _check_ids(self, ids: np.ndarray, mask: np.ndarray | None, new_tokens: int = 0) -> None:
        if mask is not None and not np.all(mask == 1):
            raise PipelineError(f"runner '{self.name}': input 'attention_mask' has zeros; the fused graph runs unpadded rows only (every mask value 1)")
        if ids.shape[1] + new_tokens > self.layout.max_positions:
            raise PipelineError(
                f"runner '{self.name}': {ids.shape[1]} prompt + {new_tokens} new tokens exceed the graph's {self.layout.max_positions} "
                "rotary positions (engine option 'max_positions')"
            )

    def _buffers(self, batch: int, capacity: int) -> dict[str, np.ndarray]:
        lay = self.layout
        return {
            lay.past_name(j, kind): np.zeros((batch, lay.kv_heads[j], capacity, lay.head_dim), np.float32)
            for j in range(lay.layers) for kind in ("key", "value")
        }

    def infer_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Logits of every position of unpadded rows (a fresh cache of the sequence's length)."""
        ids = np.ascontiguousarray(feeds["input_ids"], np.int64)
        self._check_ids(ids, feeds.get("attention_mask"))
        b, s = ids.shape
        run = {"input_ids": ids, "attention_mask": np.ones((b, s), np.int64), **self._buffers(b, s)}
        if self.keeps:
            run["logits_to_keep"] = np.array([s], np.int64)
        return {"logits": self.session.run(["logits"], run)[0]}

    def generate(self, prompt: np.ndarray, new_tokens: int) -> Generation:
        """Greedy decoding of ``new_tokens`` after ``prompt`` (1, T), timed per step; the cache lives in
        preallocated buffers bound as both past and present."""
        import onnxruntime as ort

        if not self.active:
            raise PipelineError(f"runner '{self.name}' is not active; use it as 'with runner: runner.generate(...)'")
        ids = np.ascontiguousarray(prompt, np.int64)
        if ids.ndim != 2 or ids.shape[0] != 1:
            raise PipelineError(f"runner '{self.name}': generate takes one prompt of shape (1, T), got {ids.shape}")
        self._check_ids(ids, None, new_tokens)
        lay = self.layout
        io = self.session.io_binding()
        capacity = ids.shape[1] + new_tokens
        logits = ort.OrtValue.ortvalue_from_numpy(np.zeros((1, 1, lay.vocab), np.float32))
        if self.keeps:
            io.bind_ortvalue_output("logits", logits)
            io.bind_cpu_input("logits_to_keep", np.array([1], np.int64))
        buffers = [ort.OrtValue.ortvalue_from_numpy(a) for a in self._buffers(1, capacity).values()]
        for j, v in zip(range(2 * lay.layers), buffers):
            layer, kind = divmod(j, 2)
            kind_name = ("key", "value")[kind]
            io.bind_ortvalue_input(lay.past_name(layer, kind_name), v)
            io.bind_ortvalue_output(lay.present_name(layer, kind_name), v)
        total = ids.shape[1]
        steps: list[np.ndarray] = []
        tokens: list[int] = []
        times: list[float] = []
        prefill_ms = 0.0
        for step in range(new_tokens):
            io.bind_cpu_input("input_ids", ids)
            io.bind_cpu_input("attention_mask", np.ones((1, total), np.int64))
            if not self.keeps:  # a graph with every position's logits: allocated per call, its shape changes
                io.bind_output("logits")
            t0 = time.perf_counter()
            self.session.run_with_iobinding(io)
            ms = (time.perf_counter() - t0) * 1e3
            if step == 0:
                prefill_ms = ms
            else:
                times.append(ms)
            last = (logits.numpy() if self.keeps else io.get_outputs()[-1].numpy())[:, -1].copy()
            steps.append(last)
            nxt = int(last[0].argmax())
            tokens.append(nxt)
            if len(tokens) == new_tokens:
                break
            ids = np.array([[nxt]], np.int64)
            total += 1
        return Generation(np.asarray(tokens, np.int64)[None], steps, prefill_ms, times)
