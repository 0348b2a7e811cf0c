"""Cleanup: identities, dead nodes, constant folding, duplicated initialisers.

Rules:
1. ``Identity`` nodes are removed and their consumers read the Identity's input
   (graph outputs keep their names);
2. nodes whose outputs reach no graph output are removed;
3. subgraphs computable from constants alone are folded into initialisers
   (onnxscript's constant folder);
4. initialisers with identical dtype, shape and bytes are merged into one.

Invariant: the model computes the same outputs for every input; graph inputs and
outputs keep their names, types and shapes. A model with nothing to clean is left
untouched (``modified`` is False).
"""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import DeduplicateInitializersPass, IdentityEliminationPass, RemoveUnusedNodesPass


class CleanupPass(ir.passes.InPlacePass):
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for p in (IdentityEliminationPass(), RemoveUnusedNodesPass()):
            modified |= p(model).modified
        try:
            from onnxscript.optimizer import fold_constants

            folded = fold_constants(model)
            modified |= bool(getattr(folded, "modified", False))
        except ImportError:  # onnxscript is a dependency; keep the pass usable without it
            pass
        for p in (RemoveUnusedNodesPass(), DeduplicateInitializersPass()):
            modified |= p(model).modified
        return ir.passes.PassResult(model, modified)
