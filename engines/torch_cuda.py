"""PyTorch CUDA backend for 2:4 variants: Linear weights as semi-structured sparse tensors.

build: records the model directory (the "engine" is the pruned model itself) and
which decoder Linears are 2:4 along their input dimension. runner: loads the
model in fp16 (or bf16) on the GPU and converts every 2:4 Linear weight with
``torch.sparse.to_sparse_semi_structured``, so the GEMMs run on the sparse
tensor cores (cuSPARSELt / CUTLASS) — the measurable 2:4 speed path on a GPU
without TensorRT. ``sparse: false`` keeps the same runner dense, for an
interleaved dense-vs-sparse comparison.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engines.base import Engine, EngineArtifact, Runner, TensorMeta
from core.errors import EngineUnavailable, OptionError

log = logging.getLogger(__name__)

@dataclass
class TorchCudaOptions:
    dtype: str = "float16"
    """float16 or bfloat16 (the 2:4 sparse kernels' types)."""
    sparse: bool = True
    """Swap 2:4 linears for semi-structured sparse tensors (cuSPARSELt / CUTLASS)."""

    def __post_init__(self) -> None:
        if self.dtype not in ("float16", "bfloat16"):
            raise OptionError("dtype", f"dtype '{self.dtype}' must be float16 or bfloat16 (the 2:4 sparse kernels' types)")
        if not isinstance(self.sparse, bool):
            raise OptionError("sparse", f"sparse must be true or false, got {self.sparse!r}")



def convert_2of4_linears(model: Any, adapter: Any) -> list[str]:
    """Swap every 2:4 block Linear's weight for a semi-structured sparse tensor; returns their names."""
    import torch
    from torch.sparse import to_sparse_semi_structured

    from core.masks import is_nm_sparse

    done = []
    for ref in adapter.linears(model):
        lin = ref.module
        if not isinstance(lin, torch.nn.Linear) or not is_nm_sparse(lin.weight.detach(), 2, 4):
            continue
        lin.weight = torch.nn.Parameter(to_sparse_semi_structured(lin.weight.detach()), requires_grad=False)
        done.append(ref.name)
    return done


class TorchCudaEngine(Engine):
    options_class = TorchCudaOptions
    name = "torch-cuda"

    def check_available(self) -> None:
        import torch

        if not torch.cuda.is_available():
            raise EngineUnavailable(self.name, "no CUDA GPU is visible on this machine")
        major, _ = torch.cuda.get_device_capability()
        if self.options["sparse"] and major < 8:
            raise EngineUnavailable(self.name, f"2:4 sparse tensor cores need compute capability 8.0+, this GPU has {major}.x")

    def version_info(self) -> dict[str, Any]:
        import torch

        return {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}

    def build(self, onnx_path: Path, out_dir: Path) -> EngineArtifact:
        """The model directory sits beside the ONNX stage: <variant>/model/model."""
        self.check_available()
        model_dir = Path(onnx_path).parent.parent / "model" / "model"
        spec = {"model_dir": str(model_dir), "options": self.options}
        path = Path(out_dir) / "torch-cuda.json"
        path.write_text(json.dumps(spec, indent=2), encoding="utf-8")
        return EngineArtifact(self.name, path, self.version_info() | spec)

    def runner(self, artifact: EngineArtifact, **_: Any) -> "TorchCudaRunner":
        spec = json.loads(Path(artifact.path).read_text(encoding="utf-8"))
        return TorchCudaRunner(Path(spec["model_dir"]), spec["options"])


class TorchCudaRunner(Runner):
    def __init__(self, model_dir: Path, options: dict[str, Any]):
        super().__init__()
        self.model_dir = model_dir
        self.options = options
        self.name = f"torch-cuda:{model_dir.parent.parent.name}"
        self.sparse_linears: list[str] = []

    def activate_impl(self) -> None:
        import torch

        from core.models import load_hf_dir

        model, _, adapter = load_hf_dir(self.model_dir)
        dtype = getattr(torch, self.options["dtype"])
        self.model = model.to("cuda", dtype).eval()
        self.task = adapter.task
        if self.options["sparse"]:
            self.sparse_linears = convert_2of4_linears(self.model, adapter)
            log.info("%s: %d linears run as 2:4 semi-structured sparse", self.name, len(self.sparse_linears))

    def deactivate_impl(self) -> None:
        import torch

        self.model = None
        torch.cuda.empty_cache()

    def input_metadata(self) -> list[TensorMeta]:
        return [TensorMeta("input_ids", np.dtype(np.int64), (None, None)), TensorMeta("attention_mask", np.dtype(np.int64), (None, None))]

    def infer_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        ids = torch.from_numpy(feeds["input_ids"]).cuda()
        mask = torch.from_numpy(feeds["attention_mask"]).cuda()
        from core.adapters.base import task_forward, task_output_name

        with torch.inference_mode():
            out = task_forward(self.model, self.task, ids, mask)
        torch.cuda.synchronize()
        return {task_output_name(self.task): out.float().cpu().numpy()}
