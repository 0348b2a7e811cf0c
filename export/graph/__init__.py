"""ONNX graph-rewrite passes, built on onnx-ir (see docs/architecture.md for why onnx-ir).

Each pass is one class in one file, an ``onnx_ir.passes.InPlacePass`` whose
docstring numbers its rewrite rules and states the invariant it keeps.
:func:`run_graph_passes` applies passes in order and runs ``onnx.checker`` after
each, so a broken rewrite is reported with the pass that produced it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import onnx
import onnx_ir as ir

from core.errors import PipelineError

log = logging.getLogger(__name__)


GRAPH_PASSES = ("cleanup", "sparse_layout", "fp16", "shrink")
"""Recipe names (export.graph_passes), applied in the order given."""


def make_passes(names: Sequence[str], head_dim: int | None = None) -> list[ir.passes.PassBase]:
    """Graph passes by recipe name; ``head_dim`` (from the model config) lets ``shrink`` remove heads."""
    from export.graph.cleanup import CleanupPass
    from export.graph.precision import Fp16GemmPass
    from export.graph.shrink import ShrinkPass
    from export.graph.sparse_layout import SparseLayoutPass

    table = {"cleanup": CleanupPass, "sparse_layout": SparseLayoutPass, "fp16": Fp16GemmPass, "shrink": lambda: ShrinkPass(head_dim)}
    unknown = [n for n in names if n not in table]
    if unknown:
        raise ValueError(f"graph passes {unknown} are unknown; expected some of {', '.join(GRAPH_PASSES)}")
    return [table[n]() for n in names]


def run_graph_passes(model: ir.Model, passes: Sequence[ir.passes.PassBase]) -> dict[str, Any]:
    """Apply ``passes`` in place; check the model after each. Returns {pass name: modified}."""
    report: dict[str, Any] = {}
    for p in passes:
        name = type(p).__name__
        result = p(model)
        try:
            onnx.checker.check_model(ir.to_proto(result.model), full_check=False)
        except onnx.checker.ValidationError as exc:
            raise PipelineError(f"graph pass {name} produced an invalid model: {exc}") from exc
        report[name] = bool(result.modified)
        detail = getattr(p, "last_report", None)
        if hasattr(detail, "to_dict"):
            report[name + ".report"] = detail.to_dict()
        log.info("graph pass %s: %s", name, "modified" if result.modified else "no change")
    return report


def rewrite_file(src: Path, dst: Path, passes: Sequence[ir.passes.PassBase]) -> dict[str, Any]:
    model = ir.load(str(src))
    report = run_graph_passes(model, passes)
    from export.onnx_export import save_onnx

    save_onnx(ir.to_proto(model), Path(dst))
    return report
