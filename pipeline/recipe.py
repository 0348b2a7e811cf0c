"""Recipe: YAML → validated dataclasses.

Every check here runs before any model is loaded. Errors name the key with a
path such as ``variants[1].passes[0].magnitude.sparsity`` and say what was
expected.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import RecipeError

DEFAULT_RECIPE = "default"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def _check(cond: bool, where: str, msg: str) -> None:
    if not cond:
        raise RecipeError(f"recipe key '{where}': {msg}")


@dataclass
class ModelSpec:
    source: str = "smollm2-135m"
    """Bundled name (smollm2-135m, minilm-l6), a local Hugging Face directory, or a .gguf file."""
    dtype: str = "float32"

    def validate(self, where: str) -> None:
        from pipeline.models import BUNDLED_MODELS  # light import: no torch

        _check(self.dtype == "float32", f"{where}.dtype", f"'{self.dtype}' is not supported; expected 'float32'")
        if self.source in BUNDLED_MODELS:
            return
        p = Path(self.source).expanduser()
        _check(
            p.exists(),
            f"{where}.source",
            f"'{self.source}' is neither a bundled model ({', '.join(sorted(BUNDLED_MODELS))}) nor an existing path",
        )
        if p.is_dir():
            _check((p / "config.json").is_file(), f"{where}.source", f"directory '{p}' has no config.json")
        else:
            _check(p.suffix == ".gguf", f"{where}.source", f"file '{p}' is not a .gguf file")


@dataclass
class WindowSpec:
    windows: int = 8
    length: int = 512
    seed: int = 0

    def validate(self, where: str) -> None:
        _check(1 <= self.windows <= 100_000, f"{where}.windows", f"{self.windows} is outside [1, 100000]")
        _check(2 <= self.length <= 32_768, f"{where}.length", f"{self.length} is outside [2, 32768]")
        _check(self.seed >= 0, f"{where}.seed", f"{self.seed} is negative; expected an integer >= 0")


@dataclass
class DataSpec:
    source: str = "shakespeare"
    """'shakespeare' (bundled), or a .txt / .jsonl file ({"text": ...} per line)."""
    eval_source: str | None = None
    """Separate evaluation text; when absent, the tail ``eval_fraction`` of ``source`` is held out."""
    eval_fraction: float = 0.1
    calibration: WindowSpec = field(default_factory=lambda: WindowSpec(windows=128, length=512, seed=0))
    evaluation: WindowSpec = field(default_factory=lambda: WindowSpec(windows=40, length=512, seed=0))

    def validate(self, where: str) -> None:
        for key in ("source", "eval_source"):
            src = getattr(self, key)
            if src is None or (key == "source" and src == "shakespeare"):
                continue
            p = Path(src).expanduser()
            _check(p.is_file(), f"{where}.{key}", f"'{src}' is not an existing file (expected 'shakespeare', a .txt or a .jsonl file)")
            _check(p.suffix in (".txt", ".jsonl"), f"{where}.{key}", f"'{src}' must end in .txt or .jsonl")
        if self.source == "shakespeare":
            _check(self.eval_source is None, f"{where}.eval_source", "must be empty with source 'shakespeare' (its evaluation split is fixed)")
        _check(0.0 < self.eval_fraction < 1.0, f"{where}.eval_fraction", f"{self.eval_fraction} is outside (0, 1)")
        self.calibration.validate(f"{where}.calibration")
        self.evaluation.validate(f"{where}.evaluation")


@dataclass
class PassSpec:
    name: str
    options: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {self.name: dict(self.options)}


@dataclass
class VariantSpec:
    name: str
    passes: list[PassSpec] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "passes": [p.to_dict() for p in self.passes]}


@dataclass
class ExportSpec:
    opset: int = 18
    exporter: str = "dynamo"
    """'dynamo' (torch.export based) or 'torchscript' (tracing; faster, older)."""
    reuse_dense_graph: bool = True
    """Variants whose passes keep every shape reuse the dense ONNX graph with their own weights
    instead of re-running the exporter (same computation; engine/PyTorch parity still checked)."""
    kv_cache: bool = False
    """Also export prefill + decode graphs with an explicit KV cache (causal LMs)."""
    graph_passes: list[str] = field(default_factory=list)
    """ONNX rewrites applied to every variant's graph, in order: cleanup, sparse_layout, fp16."""

    def validate(self, where: str) -> None:
        _check(17 <= self.opset <= 23, f"{where}.opset", f"{self.opset} is outside [17, 23]")
        known = ("cleanup", "sparse_layout", "fp16")
        for i, name in enumerate(self.graph_passes):
            _check(name in known, f"{where}.graph_passes[{i}]", f"'{name}' is not one of {', '.join(known)}")
        _check(self.exporter in ("dynamo", "torchscript"), f"{where}.exporter", f"'{self.exporter}' is not one of dynamo, torchscript")


@dataclass
class EngineSpec:
    backend: str
    options: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "options": dict(self.options)}


@dataclass
class ParitySpec:
    atol: float = 1e-3
    rtol: float = 1e-3
    batch: int = 2
    length: int = 64

    def validate(self, where: str) -> None:
        _check(self.atol >= 0, f"{where}.atol", f"{self.atol} is negative")
        _check(self.rtol >= 0, f"{where}.rtol", f"{self.rtol} is negative")
        _check(1 <= self.batch <= 64, f"{where}.batch", f"{self.batch} is outside [1, 64]")
        _check(1 <= self.length <= 8192, f"{where}.length", f"{self.length} is outside [1, 8192]")


@dataclass
class LatencySpec:
    batch_sizes: list[int] = field(default_factory=lambda: [1, 4])
    sequence_lengths: list[int] = field(default_factory=lambda: [128, 512])
    warmup: int = 2
    repeats: int = 5
    threads: int = 0
    """Intra-op threads for the latency sessions; 0 = all cores."""

    def validate(self, where: str) -> None:
        _check(len(self.batch_sizes) > 0, f"{where}.batch_sizes", "is empty")
        _check(len(self.sequence_lengths) > 0, f"{where}.sequence_lengths", "is empty")
        for b in self.batch_sizes:
            _check(isinstance(b, int) and 1 <= b <= 256, f"{where}.batch_sizes", f"{b!r} is outside [1, 256]")
        for s in self.sequence_lengths:
            _check(isinstance(s, int) and 1 <= s <= 32768, f"{where}.sequence_lengths", f"{s!r} is outside [1, 32768]")
        _check(0 <= self.warmup <= 100, f"{where}.warmup", f"{self.warmup} is outside [0, 100]")
        _check(1 <= self.repeats <= 1000, f"{where}.repeats", f"{self.repeats} is outside [1, 1000]")
        _check(self.threads >= 0, f"{where}.threads", f"{self.threads} is negative")


@dataclass
class DecodeSpec:
    prompt: int = 128
    """Prompt tokens (from the evaluation text) before decoding."""
    new_tokens: int = 64
    """Tokens generated per latency run (ms/token is their mean)."""
    greedy_tokens: int = 32
    """Greedy tokens compared with PyTorch generate (identical tokens, per-step max |Δlogit|)."""
    repeats: int = 3

    def validate(self, where: str) -> None:
        _check(1 <= self.prompt <= 8192, f"{where}.prompt", f"{self.prompt} is outside [1, 8192]")
        _check(2 <= self.new_tokens <= 4096, f"{where}.new_tokens", f"{self.new_tokens} is outside [2, 4096]")
        _check(1 <= self.greedy_tokens <= 4096, f"{where}.greedy_tokens", f"{self.greedy_tokens} is outside [1, 4096]")
        _check(1 <= self.repeats <= 100, f"{where}.repeats", f"{self.repeats} is outside [1, 100]")


@dataclass
class ValidationSpec:
    perplexity: bool = True
    agreement_windows: int = 8
    """Evaluation windows on which top-1 agreement and KL(dense‖variant) are measured."""
    parity: ParitySpec = field(default_factory=ParitySpec)
    latency: LatencySpec | None = field(default_factory=LatencySpec)
    decode: DecodeSpec | None = None
    """Greedy-decode parity and decode latency through the KV-cache graphs (needs export.kv_cache)."""

    def validate(self, where: str) -> None:
        _check(self.agreement_windows >= 0, f"{where}.agreement_windows", f"{self.agreement_windows} is negative")
        self.parity.validate(f"{where}.parity")
        if self.latency is not None:
            self.latency.validate(f"{where}.latency")
        if self.decode is not None:
            self.decode.validate(f"{where}.decode")


@dataclass
class Recipe:
    name: str = DEFAULT_RECIPE
    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=DataSpec)
    variants: list[VariantSpec] = field(default_factory=list)
    export: ExportSpec = field(default_factory=ExportSpec)
    engines: list[EngineSpec] = field(default_factory=lambda: [EngineSpec("onnxruntime-cpu")])
    validation: ValidationSpec = field(default_factory=ValidationSpec)
    output: str | None = None
    """Build directory; default ``build/<name>``."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {
            "variants": [v.to_dict() for v in self.variants],
            "engines": [e.to_dict() for e in self.engines],
        }

    def validate(self) -> "Recipe":
        _check(bool(_NAME_RE.match(self.name)), "name", f"'{self.name}' must match [A-Za-z0-9][A-Za-z0-9._-]*")
        self.model.validate("model")
        self.data.validate("data")
        self.export.validate("export")
        self.validation.validate("validation")
        _check(
            self.validation.decode is None or self.export.kv_cache,
            "validation.decode",
            "needs export.kv_cache: true (decoding runs the KV-cache graphs)",
        )
        _validate_variants(self)
        _validate_engines(self)
        return self


def _validate_variants(recipe: Recipe) -> None:
    from passes import get_pass_config_class  # imports pass configs only

    seen: set[str] = set()
    for i, v in enumerate(recipe.variants):
        where = f"variants[{i}]"
        _check(bool(_NAME_RE.match(v.name)), f"{where}.name", f"'{v.name}' must match [A-Za-z0-9][A-Za-z0-9._-]*")
        _check(v.name not in seen, f"{where}.name", f"'{v.name}' is used by an earlier variant")
        seen.add(v.name)
        if v.name == "dense":
            _check(not v.passes, f"{where}.passes", "variant 'dense' is the unpruned baseline and takes no passes")
        else:
            _check(bool(v.passes), f"{where}.passes", "is empty; a pruned variant needs at least one pass")
        for j, p in enumerate(v.passes):
            pwhere = f"{where}.passes[{j}].{p.name}"
            cls = get_pass_config_class(p.name, f"{where}.passes[{j}]")
            p.options = dataclasses.asdict(build_dataclass(cls, p.options, pwhere))
    if "dense" not in seen:
        recipe.variants.insert(0, VariantSpec("dense", []))


def _validate_engines(recipe: Recipe) -> None:
    from engines import KNOWN_BACKENDS

    _check(len(recipe.engines) > 0, "engines", "is empty; expected at least one backend (e.g. onnxruntime-cpu)")
    seen = set()
    for i, e in enumerate(recipe.engines):
        _check(
            e.backend in KNOWN_BACKENDS,
            f"engines[{i}].backend",
            f"'{e.backend}' is not a known backend; expected one of {', '.join(sorted(KNOWN_BACKENDS))}",
        )
        _check(e.backend not in seen, f"engines[{i}].backend", f"'{e.backend}' is listed twice")
        seen.add(e.backend)


# --- generic dict → dataclass with type checks -------------------------------------------


def build_dataclass(cls: type, data: Any, where: str) -> Any:
    """Construct ``cls`` from a mapping, rejecting unknown keys and wrong types.

    ``ValueError`` raised by the class's own ``__post_init__`` becomes a
    :class:`RecipeError` that names ``where``.
    """
    if data is None:
        data = {}
    _check(isinstance(data, dict), where, f"expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    _check(not unknown, f"{where}.{unknown[0]}" if unknown else where, f"unknown key; expected one of {', '.join(fields)}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, f"{where}.{name}")
    try:
        return cls(**kwargs)
    except ValueError as exc:
        raise RecipeError(f"recipe key '{where}': {exc}") from None
    except TypeError as exc:  # missing required field
        raise RecipeError(f"recipe key '{where}': {exc}") from None


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, where)
            except RecipeError as exc:
                errors.append(str(exc))
        raise RecipeError(errors[-1] if errors else f"recipe key '{where}': unexpected value {value!r}")
    if origin is list:
        _check(isinstance(value, list), where, f"expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        _check(isinstance(value, dict), where, f"expected a mapping, got {type(value).__name__}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value, where)
    if tp is Any:
        return value
    if tp is bool:
        _check(isinstance(value, bool), where, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        _check(isinstance(value, int) and not isinstance(value, bool), where, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        _check(isinstance(value, (int, float)) and not isinstance(value, bool), where, f"expected a number, got {value!r}")
        return float(value)
    if tp is str:
        _check(isinstance(value, str), where, f"expected a string, got {value!r}")
        return value
    raise RecipeError(f"recipe key '{where}': unsupported field type {_type_name(tp)}")


def _parse_variants(raw: Any) -> list[VariantSpec]:
    _check(isinstance(raw, list), "variants", f"expected a list of variants, got {type(raw).__name__}")
    out = []
    for i, v in enumerate(raw):
        where = f"variants[{i}]"
        _check(isinstance(v, dict), where, f"expected a mapping with 'name' and 'passes', got {v!r}")
        unknown = sorted(set(v) - {"name", "passes"})
        _check(not unknown, f"{where}.{unknown[0]}" if unknown else where, "unknown key; expected name, passes")
        _check(isinstance(v.get("name"), str), f"{where}.name", f"expected a string, got {v.get('name')!r}")
        passes_raw = v.get("passes") or []
        _check(isinstance(passes_raw, list), f"{where}.passes", "expected a list of passes like '- magnitude: {sparsity: 0.5}'")
        passes = []
        for j, p in enumerate(passes_raw):
            pw = f"{where}.passes[{j}]"
            if isinstance(p, str):
                p = {p: {}}
            _check(
                isinstance(p, dict) and len(p) == 1,
                pw,
                f"expected a one-key mapping like 'magnitude: {{sparsity: 0.5}}', got {p!r}",
            )
            (pname, opts), = p.items()
            _check(isinstance(opts, dict) or opts is None, f"{pw}.{pname}", f"expected a mapping of options, got {opts!r}")
            passes.append(PassSpec(str(pname), dict(opts or {})))
        out.append(VariantSpec(v["name"], passes))
    return out


def _parse_engines(raw: Any) -> list[EngineSpec]:
    _check(isinstance(raw, list), "engines", f"expected a list of backends, got {type(raw).__name__}")
    out = []
    for i, e in enumerate(raw):
        if isinstance(e, str):
            out.append(EngineSpec(e))
            continue
        _check(isinstance(e, dict) and isinstance(e.get("backend"), str), f"engines[{i}]", f"expected a backend name or {{backend: NAME, options: {{...}}}}, got {e!r}")
        unknown = sorted(set(e) - {"backend", "options"})
        _check(not unknown, f"engines[{i}].{unknown[0]}" if unknown else "", "unknown key; expected backend, options")
        opts = e.get("options") or {}
        _check(isinstance(opts, dict), f"engines[{i}].options", "expected a mapping")
        out.append(EngineSpec(e["backend"], dict(opts)))
    return out


def recipe_from_dict(raw: Any, base_dir: Path | None = None) -> Recipe:
    """Validate a parsed YAML document. Relative paths resolve against ``base_dir``."""
    _check(isinstance(raw, dict), "<root>", f"expected a mapping at the top of the recipe, got {type(raw).__name__}")
    raw = dict(raw)
    variants = _parse_variants(raw.pop("variants", []))
    engines = _parse_engines(raw.pop("engines", ["onnxruntime-cpu"]))
    recipe = _build_root(raw)
    recipe.variants = variants
    recipe.engines = engines
    if base_dir is not None:
        _resolve_paths(recipe, base_dir)
    return recipe.validate()


def _build_root(raw: dict[str, Any]) -> Recipe:
    fields = {f.name for f in dataclasses.fields(Recipe)} - {"variants", "engines"}
    unknown = sorted(set(raw) - fields)
    _check(not unknown, unknown[0] if unknown else "", f"unknown key; expected one of {', '.join(sorted(fields | {'variants', 'engines'}))}")
    hints = typing.get_type_hints(Recipe)
    kwargs = {k: _coerce(hints[k], v, k) for k, v in raw.items()}
    return Recipe(**kwargs)


def _resolve_paths(recipe: Recipe, base: Path) -> None:
    def fix(p: str | None, keep: set[str]) -> str | None:
        if p is None or p in keep:
            return p
        q = Path(p).expanduser()
        if not q.is_absolute() and (base / q).exists():
            return str((base / q).resolve())
        return p

    from pipeline.models import BUNDLED_MODELS

    recipe.model.source = fix(recipe.model.source, set(BUNDLED_MODELS)) or recipe.model.source
    recipe.data.source = fix(recipe.data.source, {"shakespeare"}) or recipe.data.source
    recipe.data.eval_source = fix(recipe.data.eval_source, set())


def load_recipe(path_or_name: str | None) -> Recipe:
    """Load a recipe file, or a recipe shipped in the package by name (default: 'default')."""
    name = path_or_name or DEFAULT_RECIPE
    p = Path(name).expanduser()
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise RecipeError(f"recipe file '{name}' does not exist")
        text = p.read_text(encoding="utf-8")
        base = p.resolve().parent
    else:
        shipped = resources.files("pipeline.recipes") / f"{name}.yaml"
        if not shipped.is_file():
            avail = sorted(f.name[:-5] for f in resources.files("pipeline.recipes").iterdir() if f.name.endswith(".yaml"))
            raise RecipeError(f"recipe '{name}' is neither a file nor a shipped recipe ({', '.join(avail)})")
        text = shipped.read_text(encoding="utf-8")
        base = Path.cwd()
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RecipeError(f"recipe '{name}' is not valid YAML: {exc}") from None
    return recipe_from_dict(raw, base)
