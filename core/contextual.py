"""Contextual-sparsity modules (Deja Vu) that a saved model is rebuilt with: the gated MLP that
computes only the selected units of each token (:class:`ContextualMLP`), the lookahead predictor,
and the capture of block inputs the predictors read. The pass that calibrates and installs them is
``passes.contextual``; this module also writes and reads the structure in the model config
(``contextual``) so that ``core.models.load_hf_dir`` rebuilds a saved contextual model exactly.

Execution: a single-token step (KV-cache decode, any batch) gathers the selected rows of W_gate and
W_up and the rows of W_downᵀ (kept pre-transposed and contiguous) and multiplies only those — the
skipped units' work is not done. Longer inputs run ``full_mode``: ``mask`` (each token's own
selection applied as a mask on the dense computation: the same function, used for perplexity and
for the prefill graph) or ``dense`` (prefill dense, as in Deja Vu).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch

from core.adapters.base import ModelAdapter, get_submodule

CONFIG_KEY = "contextual"

class Predictor(torch.nn.Module):
    """Deja Vu's MLP predictor: d → r → units, no nonlinearity."""

    def __init__(self, hidden: int, rank: int, units: int):
        super().__init__()
        self.down = torch.nn.Linear(hidden, rank, bias=False)
        self.up = torch.nn.Linear(rank, units)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))


class ContextStore:
    """The block inputs of the current forward, by block index, shared by the capturing blocks and
    the predictors. Deliberately not a dict: ``torch.export`` flattens and rebuilds the pytree
    containers it finds among module attributes, which would give every module its own copy."""

    def __init__(self) -> None:
        self.values: dict[int, torch.Tensor] = {}

    def __setitem__(self, index: int, value: torch.Tensor) -> None:
        self.values[index] = value

    def __getitem__(self, index: int) -> torch.Tensor:
        try:
            return self.values[index]
        except KeyError:
            raise RuntimeError(f"contextual predictor: no captured input of block {index}; the blocks before it did not run") from None

    def clear(self) -> None:
        self.values.clear()


_CAPTURING: dict[type, type] = {}


def capture_block_inputs(block: torch.nn.Module, store: ContextStore, index: int) -> None:
    """Make ``block`` keep its input hidden state in ``store[index]`` on every call, for the
    predictors. Done by switching the instance to a subclass whose ``forward`` stores and delegates
    (not a hook: ``torch.export`` does not run module hooks; parameter names are unchanged, and
    ``copy.deepcopy`` copies the store along with the model)."""
    cls = type(block)
    if cls not in _CAPTURING.values():
        if cls not in _CAPTURING:
            def forward(self, hidden_states, *args, **kwargs):
                self._context_store[self._context_index] = hidden_states
                return super(sub, self).forward(hidden_states, *args, **kwargs)

            sub = type(f"Capturing{cls.__name__}", (cls,), {"forward": forward, "__module__": __name__})
            _CAPTURING[cls] = sub
        block.__class__ = _CAPTURING[cls]
    block._context_store = store
    block._context_index = index


class TransposedLinear(torch.nn.Module):
    """A bias-free linear stored as Wᵀ (in, out), contiguous, so row i (input i's output vector) is one
    contiguous gather; ``weight`` is the usual (out, in) view for code that reads linears."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight_t = torch.nn.Parameter(weight.detach().t().contiguous(), requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:
        return self.weight_t.t()

    bias = None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h @ self.weight_t


class ContextualMLP(torch.nn.Module):
    """A gated MLP that computes only the selected units of every token (see the module doc)."""

    def __init__(self, mlp: torch.nn.Module, names: dict[str, str], selector: str, k: int, block: int, threshold: float | None = None,
                 predictor: Predictor | None = None, predictor_input: str = "mlp", store: ContextStore | None = None, full_mode: str = "mask"):
        """``names``: the family's attribute names of the MLP's gate, up and down linears and its
        activation (``ModelAdapter.gated_mlp_names``); the parts keep them, so the saved weights
        keep the family's parameter names."""
        super().__init__()
        self.names = dict(names)
        for role in ("gate", "up", "down"):
            if getattr(mlp, names[role]).bias is not None:
                raise ValueError(f"contextual MLP: {names[role]} has a bias; only bias-free gated MLPs are supported")
        for role in ("gate", "up", "act"):
            setattr(self, names[role], getattr(mlp, names[role]))
        setattr(self, names["down"], TransposedLinear(getattr(mlp, names["down"]).weight))
        """W_downᵀ (units, hidden): row i is unit i's output vector, contiguous for the gather."""
        self.selector, self.k, self.block = selector, int(k), block
        self.register_buffer("threshold", torch.tensor(float(threshold if threshold is not None else 0.0)), persistent=True)
        self.predictor = predictor
        self.predictor_input = predictor_input
        self.store = store if store is not None else ContextStore()
        self.full_mode = full_mode

    @property
    def gate(self) -> torch.nn.Module:
        return getattr(self, self.names["gate"])

    @property
    def up(self) -> torch.nn.Module:
        return getattr(self, self.names["up"])

    @property
    def down(self) -> "TransposedLinear":
        return getattr(self, self.names["down"])

    @property
    def act(self) -> torch.nn.Module:
        return getattr(self, self.names["act"])

    @property
    def units(self) -> int:
        return self.down.weight_t.shape[0]

    def _predictor_x(self, x: torch.Tensor) -> torch.Tensor:
        if self.predictor_input == "mlp":
            return x
        key = self.block - 1 if self.predictor_input == "prev" and self.block > 0 else self.block
        return self.store[key]

    def scores(self, x: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        if self.selector == "oracle":
            gate = self.gate(x) if gate is None else gate
            return (self.act(gate) * self.up(x)).abs()
        if self.selector == "threshold":
            return self.act(self.gate(x) if gate is None else gate).abs()
        return self.predictor(self._predictor_x(x))

    def mask(self, scores: torch.Tensor) -> torch.Tensor:
        if self.selector == "threshold":
            return scores >= self.threshold
        if self.k >= scores.shape[-1]:
            return torch.ones_like(scores, dtype=torch.bool)
        if torch.compiler.is_exporting() or torch.jit.is_tracing():  # exporters know TopK, not kthvalue
            return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, scores.topk(self.k, dim=-1, sorted=False).indices, True)
        # the k-th largest score per token as a threshold: the top-k set (barring exact ties), at half
        # the cost of topk + scatter on CPU
        kth = scores.kthvalue(scores.shape[-1] - self.k + 1, dim=-1, keepdim=True).values
        return scores >= kth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2] == 1:
            return self.gathered(x)
        gate = self.gate(x)
        h = self.act(gate) * self.up(x)
        if self.full_mode == "mask":
            scores = h.abs() if self.selector == "oracle" else self.scores(x, gate)  # the oracle's scores are |h| itself
            h = h * self.mask(scores).to(h.dtype)
        return self.down(h)

    def gathered(self, x: torch.Tensor) -> torch.Tensor:
        """One token per row: (batch, 1, hidden) → (batch, 1, hidden), computing only the selected units."""
        b = x.shape[0]
        xs = x[:, 0]  # (b, d)
        if self.selector == "threshold":
            if torch.compiler.is_exporting():
                raise ValueError(
                    "contextual selector 'threshold' keeps a different number of units in every token; its decode graph would "
                    "need data-dependent shapes, which this exporter does not produce. Export selector 'predictor' (or 'oracle')"
                )
            # the gate is computed whole (it is the selector); then the kept units only
            gate = self.gate(xs)
            act = self.act(gate)
            keep = act.abs() >= self.threshold  # (b, units)
            out = []
            for r in range(b):  # a different number of units per row
                idx = keep[r].nonzero().squeeze(-1)
                u = self.up.weight.index_select(0, idx) @ xs[r]
                out.append((act[r].index_select(0, idx) * u) @ self.down.weight_t.index_select(0, idx))
            return torch.stack(out)[:, None]
        s = self.scores(xs[:, None])[:, 0]  # (b, units)
        idx = s.topk(self.k, dim=-1, sorted=False).indices  # (b, k); order is irrelevant, sorting costs
        flat = idx.reshape(-1)
        wg = self.gate.weight.index_select(0, flat).reshape(b, self.k, -1)
        wu = self.up.weight.index_select(0, flat).reshape(b, self.k, -1)
        wd = self.down.weight_t.index_select(0, flat).reshape(b, self.k, -1)
        xv = xs[:, :, None]  # (b, d, 1)
        h = self.act(torch.bmm(wg, xv)) * torch.bmm(wu, xv)  # (b, k, 1)
        return torch.bmm(h.transpose(1, 2), wd)  # (b, 1, d)


@contextmanager
def full_mode(model: torch.nn.Module, mode: str) -> Iterator[None]:
    """Temporarily run every :class:`ContextualMLP` of ``model`` with multi-token inputs in ``mode``."""
    mods = [m for m in model.modules() if isinstance(m, ContextualMLP)]
    saved = [m.full_mode for m in mods]
    for m in mods:
        m.full_mode = mode
    try:
        yield
    finally:
        for m, s in zip(mods, saved):
            m.full_mode = s


def contextual_spec(model: torch.nn.Module, adapter: ModelAdapter) -> dict[str, Any] | None:
    """The contextual structure of ``model`` as a JSON-able dict (None when it has none)."""
    blocks = {}
    common: dict[str, Any] = {}
    for l, block in enumerate(adapter.blocks(model)):
        mlp = get_submodule(block, adapter.mlp_path())
        if isinstance(mlp, ContextualMLP):
            blocks[str(l)] = mlp.k
            common = {"selector": mlp.selector, "predictor_input": mlp.predictor_input, "full_mode": mlp.full_mode,
                      "predictor_rank": mlp.predictor.down.out_features if mlp.predictor is not None else None}
    return {**common, "blocks": blocks} if blocks else None


def apply_contextual_spec(model: torch.nn.Module, adapter: ModelAdapter, spec: dict[str, Any]) -> None:
    """Rebuild the contextual structure ``spec`` (from :func:`contextual_spec`) on a dense model of the
    same config, before its weights are loaded."""
    try:
        selector, inp, mode, rank = spec["selector"], spec["predictor_input"], spec["full_mode"], spec["predictor_rank"]
        ks = {int(b): int(k) for b, k in spec["blocks"].items()}
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"config '{CONFIG_KEY}' is malformed ({exc!r}); expected selector, predictor_input, full_mode, predictor_rank and blocks") from exc
    blocks = adapter.blocks(model)
    names = adapter.gated_mlp_names()
    store = ContextStore()
    if selector == "predictor" and inp != "mlp":
        for i, b in enumerate(blocks):
            capture_block_inputs(b, store, i)
    for l, k in ks.items():
        if not 0 <= l < len(blocks):
            raise ValueError(f"config '{CONFIG_KEY}': block {l} is outside the model's {len(blocks)} blocks")
        mlp = get_submodule(blocks[l], adapter.mlp_path())
        units, hidden = getattr(mlp, names["gate"]).weight.shape
        pred = Predictor(hidden, int(rank), units) if selector == "predictor" else None
        set_submodule(blocks[l], adapter.mlp_path(), ContextualMLP(mlp, names, selector, k, l, None, pred, inp, store, mode))
    model.config.contextual = spec


def set_submodule(root: torch.nn.Module, path: str, module: torch.nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)
