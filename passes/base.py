"""The Pass interface, its context and result, and the registry used by recipes."""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar

from core.errors import OptionError

if TYPE_CHECKING:
    from pathlib import Path

    import torch

    from core.adapters.base import ModelAdapter, ModelFacts

ROLES = ("q", "k", "v", "qkv", "o", "up", "gate", "gate_up", "down")
"""Linear roles an adapter can name; passes filter on them."""


@dataclass
class PassContext:
    """What a pass may use besides the model: the adapter and lazily-built calibration data."""

    adapter: "ModelAdapter"
    calibration: Callable[[], "torch.Tensor"] | None = None
    """Returns calibration windows ``(N, L)`` of token ids; tokenises on first call."""
    seed: int = 0
    progress: bool = True
    teacher: Callable[[], "torch.nn.Module"] | None = None
    """Returns the dense model (read-only), for passes that distil from it."""
    work_dir: "Path | None" = None
    """A directory that survives an interrupted stage (checkpoints); the builder removes it once the stage is done."""
    memo: dict[str, Any] = field(default_factory=dict)
    """Results shared between variants of one build (e.g. importance scores), keyed by the caller."""
    prefix_key: str | None = None
    """Identifies the model a pass receives (source, calibration data, earlier passes); None = do not share."""
    stream: Any = None
    """A :class:`core.streaming.BlockStream` when the pass runs block-streamed: the model it gets is a
    skeleton whose blocks hold weights only between ``stream.load(b)`` and ``stream.done(b)``."""

    def calibration_windows(self, pass_name: str) -> "torch.Tensor":
        """The calibration windows, or a clear error naming the pass when the context has none."""
        if self.calibration is None:
            raise ValueError(f"pass '{pass_name}' needs calibration data, and the context has none")
        return self.calibration()


@dataclass(frozen=True)
class DataFacts:
    """What the checks before a build know of the data a pass will get."""

    calibration_windows: int
    calibration_length: int


def check_blocks(key: str, blocks: list[int] | None, model: "ModelFacts") -> None:
    """Every index in ``blocks`` names one of the model's blocks."""
    outside = [b for b in blocks or [] if not 0 <= b < model.layers]
    if outside:
        raise OptionError(key, f"blocks {outside} are outside the model's {model.layers} blocks (0–{model.layers - 1})")


def check_nm_divides(key: str, nm: tuple[int, int] | None, roles: list[str], model: "ModelFacts") -> None:
    """An N:M pattern's M divides the input width of every targeted linear of the model."""
    if nm is None:
        return
    for role in (r for r in roles if r in model.roles):
        width = model.in_features(role)
        if width % nm[1]:
            raise OptionError(key, f"pattern {nm[0]}:{nm[1]} needs input widths divisible by {nm[1]}; the model's '{role}' linears have {width}")


@dataclass
class LayerChange:
    name: str
    role: str
    block: int
    shape: tuple[int, ...]
    sparsity: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def of(cls, ref: Any) -> "LayerChange":
        """The linear's current shape and fraction of zero weights."""
        from core.masks import sparsity_of

        w = ref.weight_out_in()
        return cls(ref.name, ref.role, ref.block, tuple(w.shape), sparsity_of(w))


@dataclass
class PassResult:
    name: str
    layers: list[LayerChange] = field(default_factory=list)
    seconds: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "layers": [c.to_dict() for c in self.layers],
            "seconds": round(self.seconds, 3),
            "info": self.info,
        }


@dataclass(frozen=True)
class SpeedupNeed:
    """What a variant's pruning needs before it runs faster than dense; a variant shows the strongest
    need (highest ``rank``) of its passes."""

    rank: int
    text: str
    """The reason, for the report's "what to ship" section."""
    short: str
    """The table-cell form."""
    other_hardware: bool
    """True when the speed-up needs hardware or a kernel the project's CPU engines do not have."""


NEEDS_SPARSE_TENSOR_CORES = SpeedupNeed(
    40,
    "needs sparse tensor cores on a GPU (TensorRT SPARSE_WEIGHTS / cuSPARSELt), or on a CPU the native-cpu engine's 2:4 kernel (decode); ONNX Runtime runs it dense",
    "sparse tensor cores (GPU)",
    True,
)
NEEDS_ROW_SKIPPING_KERNEL = SpeedupNeed(
    35, "needs a kernel that reads only the selected rows; ONNX Runtime's Gather copies them first", "a row-skipping kernel", True
)
NEEDS_SPARSE_KERNEL = SpeedupNeed(
    30, "needs a sparse-matrix kernel (the native-cpu engine has one, for decode); ONNX Runtime CPU and TensorRT run it dense", "a sparse kernel", True
)
NEEDS_NOTHING = SpeedupNeed(20, "runs faster anywhere: its matrices are smaller", "nothing (smaller matrices)", False)
NEEDS_GRAPH_SHRINK = SpeedupNeed(
    10, "zeroed heads/channels: faster only after the graph 'shrink' pass removes them", "the graph 'shrink' pass", False
)


def weight_sparsity_need(pattern: str | None, sparsity: float | None) -> SpeedupNeed | None:
    """2:4 → sparse tensor cores; any other pattern or unstructured sparsity → a sparse-matrix kernel."""
    if pattern:
        return NEEDS_SPARSE_TENSOR_CORES if pattern.strip() == "2:4" else NEEDS_SPARSE_KERNEL
    if sparsity is not None:
        return NEEDS_SPARSE_KERNEL
    return None


class Pass(ABC):
    """One transformation of a PyTorch model. Subclasses set ``name`` and ``config_class``; they may
    declare what their variant needs to run faster (:meth:`speedup_need`) and their own report
    section (``report_title`` and :meth:`report_section`), so the report needs no pass-specific code."""

    name: ClassVar[str]
    config_class: ClassVar[type]
    uses_calibration: ClassVar[bool] = False
    """True when ``run`` reads ``ctx.calibration`` (its stage key then includes the calibration data)."""
    trains: ClassVar[bool] = False
    """True when ``run`` trains weights with an optimizer (the memory preflight counts gradients and moments)."""
    state_copies: ClassVar[int] = 0
    """Weight-sized tensors a training pass keeps besides gradients and moments (ADMM: Z and U)."""
    changes_shapes: ClassVar[bool] = False
    """True when the pass removes heads/channels; otherwise the dense ONNX graph is reused with new weights."""

    must_be_last: ClassVar[bool] = False
    """True when the pass works on what every other pass of its variant left (quantization): it must come last."""
    quantizes: ClassVar[bool] = False
    """True when the pass leaves quantized weights, which only engines with quantized kernels run."""
    streams: ClassVar[bool] = False
    """True when ``run`` can work block by block from disk (``ctx.stream``), for models larger than memory."""

    report_title: ClassVar[str | None] = None
    """Title of the report section this pass contributes to (passes may share one); None = none."""

    @classmethod
    def speedup_need(cls, options: dict[str, Any]) -> SpeedupNeed | None:
        """What a variant with this pass (these recipe options) needs to be faster; None = nothing of its own."""
        return weight_sparsity_need(options.get("pattern"), options.get("sparsity"))

    @classmethod
    def report_section(cls, variant: dict[str, Any], result: dict[str, Any]) -> list[Any]:
        """Blocks (:mod:`core.document`) of this pass's section for one variant, from the variant's entry in
        results.json and this pass's result in it (``result['info']``); empty when there is nothing to say."""
        return []

    @classmethod
    def shapes_change(cls, options: dict[str, Any]) -> bool:
        """Whether this pass, with these recipe options, changes tensor shapes (no dense-graph reuse)."""
        return cls.changes_shapes

    @classmethod
    def check(cls, config: Any, model: "ModelFacts", data: DataFacts) -> None:
        """Check the pass's options against the model's config and the data before anything is loaded;
        raise :class:`OptionError` naming the option. ``pipeline check`` and the build's preflight call it."""
        target = config if isinstance(config, SparsityTarget) else None
        if target is not None:
            check_blocks("blocks", target.blocks, model)
            check_nm_divides("pattern", target.nm, target.targets, model)

    @classmethod
    def stream_refusal(cls, config: Any) -> str | None:
        """Why this pass, with this config, cannot run block-streamed; None when it can."""
        if not cls.streams:
            return f"pass '{cls.name}' works on the whole model in memory; it has no block-streamed form"
        return None

    def __init__(self, config: Any):
        if not isinstance(config, self.config_class):
            raise TypeError(f"pass '{self.name}' needs a {self.config_class.__name__}, got {type(config).__name__}")
        self.config = config

    @abstractmethod
    def run(self, model: "torch.nn.Module", ctx: PassContext) -> PassResult:
        """Change ``model`` in place and say what changed."""


_REGISTRY: dict[str, type[Pass]] = {}


def register_pass(cls: type[Pass]) -> type[Pass]:
    if cls.name in _REGISTRY:
        raise ValueError(f"pass name '{cls.name}' is registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def registry() -> dict[str, type[Pass]]:
    return dict(_REGISTRY)


def check_roles(roles: list[str]) -> None:
    bad = [r for r in roles if r not in ROLES]
    if bad:
        raise ValueError(f"targets {bad} are not linear roles; expected some of {', '.join(ROLES)}")
    if not roles:
        raise ValueError("targets is empty; expected some of " + ", ".join(ROLES))


@dataclass
class SparsityTarget:
    """What to prune and how much: shared by the config of every weight-sparsity pass."""

    sparsity: float | None = None
    """Fraction of weights removed (unstructured). Exclusive with ``pattern``."""
    pattern: str | None = None
    """'N:M' — keep N of every M along the input dimension, e.g. '2:4'."""
    targets: list[str] = field(default_factory=lambda: list(ROLES))
    blocks: list[int] | None = None
    """Block indices to prune; all when empty."""

    def __post_init__(self) -> None:
        from core.masks import parse_pattern

        if (self.sparsity is None) == (self.pattern is None):
            raise ValueError("set exactly one of 'sparsity' (unstructured) or 'pattern' (N:M)")
        if self.sparsity is not None and not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity {self.sparsity} is outside [0, 1)")
        if self.pattern is not None:
            parse_pattern(self.pattern)
        check_roles(self.targets)
        if self.blocks is not None and any(b < 0 for b in self.blocks):
            raise ValueError(f"blocks {self.blocks} has a negative index")

    @property
    def nm(self) -> tuple[int, int] | None:
        from core.masks import parse_pattern

        return parse_pattern(self.pattern) if self.pattern else None
