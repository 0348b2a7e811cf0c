"""Recipe: YAML → validated dataclasses (the skeleton; each stage's options live in its module under
``pipeline/stages/``, each pass's config with the pass).

Every check here runs before any model is loaded. Errors name the key with a
path such as ``variants[1].passes[0].<pass>.sparsity`` and say what was
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

from core.errors import RecipeError
from pipeline.schema import build_dataclass, check, coerce
from pipeline.stages.decode import DecodeSpec
from pipeline.stages.latency import LatencySpec
from pipeline.stages.onnx import ExportSpec
from pipeline.stages.validate import ParitySpec, ValidationSpec

__all__ = [
    "DecodeSpec", "EngineSpec", "ExportSpec", "LatencySpec", "ModelSpec", "DataSpec", "ParitySpec", "PassSpec",
    "Recipe", "ValidationSpec", "VariantSpec", "WindowSpec", "load_recipe", "recipe_from_dict",
]

DEFAULT_RECIPE = "default"
MAX_RECIPE_BYTES = 1 << 20
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


STREAM_MODES = ("auto", "always", "never")


@dataclass
class ModelSpec:
    source: str = "smollm2-135m"
    """Bundled name (smollm2-135m, minilm-l6), a local Hugging Face directory, or a .gguf file."""
    dtype: str = "float32"
    stream: str = "auto"
    """How a variant's passes read the model: 'never' (the whole model in memory), 'always' (block by
    block from disk — every variant's passes must support it), or 'auto' (block by block for the
    variants whose passes support it when the in-memory pruning would not fit in the memory available)."""

    def validate(self, where: str) -> None:
        from core.models import BUNDLED_MODELS  # light import: no torch

        check(self.stream in STREAM_MODES, f"{where}.stream", f"'{self.stream}' is not one of {', '.join(STREAM_MODES)}")

        check("\x00" not in self.source, f"{where}.source", "contains a NUL byte; expected a model name or a path")
        check(self.dtype == "float32", f"{where}.dtype", f"'{self.dtype}' is not supported; expected 'float32'")
        if self.source in BUNDLED_MODELS:
            return
        p = Path(self.source).expanduser()
        check(
            p.exists(),
            f"{where}.source",
            f"'{self.source}' is neither a bundled model ({', '.join(sorted(BUNDLED_MODELS))}) nor an existing path",
        )
        if p.is_dir():
            check((p / "config.json").is_file(), f"{where}.source", f"directory '{p}' has no config.json")
        else:
            check(p.suffix == ".gguf", f"{where}.source", f"file '{p}' is not a .gguf file")


@dataclass
class WindowSpec:
    windows: int = 8
    length: int = 512
    seed: int = 0

    def validate(self, where: str) -> None:
        check(1 <= self.windows <= 100_000, f"{where}.windows", f"{self.windows} is outside [1, 100000]")
        check(2 <= self.length <= 32_768, f"{where}.length", f"{self.length} is outside [2, 32768]")
        check(self.seed >= 0, f"{where}.seed", f"{self.seed} is negative; expected an integer >= 0")


@dataclass
class DataSpec:
    source: str = "shakespeare"
    """'shakespeare' (bundled), or a .txt / .jsonl file ({"text": ...} per line)."""
    eval_source: str | None = None
    """Separate evaluation text (a file, or a named text: 'stdlib-docstrings'); when absent, the tail
    ``eval_fraction`` of ``source`` is held out (Shakespeare: its fixed evaluation split)."""
    eval_fraction: float = 0.1
    calibration: WindowSpec = field(default_factory=lambda: WindowSpec(windows=128, length=512, seed=0))
    evaluation: WindowSpec = field(default_factory=lambda: WindowSpec(windows=40, length=512, seed=0))

    def validate(self, where: str) -> None:
        from calibrate.data import NAMED_TEXTS  # light import: no torch

        for key in ("source", "eval_source"):
            src = getattr(self, key)
            if src is None or (key == "source" and src == "shakespeare") or (key == "eval_source" and src in NAMED_TEXTS):
                continue
            check("\x00" not in src, f"{where}.{key}", "contains a NUL byte; expected 'shakespeare' or a path")
            p = Path(src).expanduser()
            check(p.is_file(), f"{where}.{key}", f"'{src}' is not an existing file (expected 'shakespeare', a .txt or a .jsonl file)")
            check(p.suffix in (".txt", ".jsonl"), f"{where}.{key}", f"'{src}' must end in .txt or .jsonl")
        if self.source == "shakespeare":
            check(
                self.eval_source is None or self.eval_source in NAMED_TEXTS, f"{where}.eval_source",
                f"with source 'shakespeare' is empty (its fixed evaluation split) or a named text ({', '.join(NAMED_TEXTS)})",
            )
        check(0.0 < self.eval_fraction < 1.0, f"{where}.eval_fraction", f"{self.eval_fraction} is outside (0, 1)")
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
    where: str = field(default="", compare=False, repr=False)
    """The variant's key path in the recipe as written (``variants[i]``); empty for the added dense baseline."""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "passes": [p.to_dict() for p in self.passes]}


@dataclass
class EngineSpec:
    backend: str
    options: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "options": dict(self.options)}


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
        check(bool(_NAME_RE.match(self.name)), "name", f"'{self.name}' must match [A-Za-z0-9][A-Za-z0-9._-]*")
        self.model.validate("model")
        self.data.validate("data")
        self.export.validate("export")
        self.validation.validate("validation")
        check(
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
        where = v.where = v.where or f"variants[{i}]"
        check(bool(_NAME_RE.match(v.name)), f"{where}.name", f"'{v.name}' must match [A-Za-z0-9][A-Za-z0-9._-]*")
        check(v.name not in seen, f"{where}.name", f"'{v.name}' is used by an earlier variant")
        seen.add(v.name)
        if v.name == "dense":
            check(not v.passes, f"{where}.passes", "variant 'dense' is the unpruned baseline and takes no passes")
        else:
            check(bool(v.passes), f"{where}.passes", "is empty; a pruned variant needs at least one pass")
        for j, p in enumerate(v.passes):
            pwhere = f"{where}.passes[{j}].{p.name}"
            cls = get_pass_config_class(p.name, f"{where}.passes[{j}]")
            p.options = dataclasses.asdict(build_dataclass(cls, p.options, pwhere))
    if "dense" not in seen:
        recipe.variants.insert(0, VariantSpec("dense", []))


def _validate_engines(recipe: Recipe) -> None:
    from engines import KNOWN_BACKENDS, engine_class

    check(len(recipe.engines) > 0, "engines", "is empty; expected at least one backend (e.g. onnxruntime-cpu)")
    seen = set()
    for i, e in enumerate(recipe.engines):
        check(
            e.backend in KNOWN_BACKENDS,
            f"engines[{i}].backend",
            f"'{e.backend}' is not a known backend; expected one of {', '.join(sorted(KNOWN_BACKENDS))}",
        )
        check(e.backend not in seen, f"engines[{i}].backend", f"'{e.backend}' is listed twice")
        seen.add(e.backend)
        build_dataclass(engine_class(e.backend).options_class, e.options, f"engines[{i}].options")


def _parse_variants(raw: Any) -> list[VariantSpec]:
    check(isinstance(raw, list), "variants", f"expected a list of variants, got {type(raw).__name__}")
    out = []
    for i, v in enumerate(raw):
        where = f"variants[{i}]"
        check(isinstance(v, dict), where, f"expected a mapping with 'name' and 'passes', got {v!r}")
        unknown = sorted(set(v) - {"name", "passes"}, key=str)
        check(not unknown, f"{where}.{unknown[0]}" if unknown else where, "unknown key; expected name, passes")
        check(isinstance(v.get("name"), str), f"{where}.name", f"expected a string, got {v.get('name')!r}")
        passes_raw = v.get("passes") or []
        check(isinstance(passes_raw, list), f"{where}.passes", "expected a list of passes like '- PASS: {option: value}'")
        passes = []
        for j, p in enumerate(passes_raw):
            pw = f"{where}.passes[{j}]"
            if isinstance(p, str):
                p = {p: {}}
            check(
                isinstance(p, dict) and len(p) == 1,
                pw,
                f"expected a one-key mapping like 'PASS: {{option: value}}', got {p!r}",
            )
            (pname, opts), = p.items()
            check(isinstance(opts, dict) or opts is None, f"{pw}.{pname}", f"expected a mapping of options, got {opts!r}")
            passes.append(PassSpec(str(pname), dict(opts or {})))
        out.append(VariantSpec(v["name"], passes, where=where))
    return out


def _parse_engines(raw: Any) -> list[EngineSpec]:
    check(isinstance(raw, list), "engines", f"expected a list of backends, got {type(raw).__name__}")
    out = []
    for i, e in enumerate(raw):
        if isinstance(e, str):
            out.append(EngineSpec(e))
            continue
        check(isinstance(e, dict) and isinstance(e.get("backend"), str), f"engines[{i}]", f"expected a backend name or {{backend: NAME, options: {{...}}}}, got {e!r}")
        unknown = sorted(set(e) - {"backend", "options"}, key=str)
        check(not unknown, f"engines[{i}].{unknown[0]}" if unknown else "", "unknown key; expected backend, options")
        opts = e.get("options") or {}
        check(isinstance(opts, dict), f"engines[{i}].options", "expected a mapping")
        out.append(EngineSpec(e["backend"], dict(opts)))
    return out


def recipe_from_dict(raw: Any, base_dir: Path | None = None) -> Recipe:
    """Validate a parsed YAML document. Relative paths resolve against ``base_dir``."""
    check(isinstance(raw, dict), "<root>", f"expected a mapping at the top of the recipe, got {type(raw).__name__}")
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
    unknown = sorted(set(raw) - fields, key=str)
    check(not unknown, unknown[0] if unknown else "", f"unknown key; expected one of {', '.join(sorted(fields | {'variants', 'engines'}))}")
    hints = typing.get_type_hints(Recipe)
    kwargs = {k: coerce(hints[k], v, k) for k, v in raw.items()}
    return Recipe(**kwargs)


def _resolve_paths(recipe: Recipe, base: Path) -> None:
    def fix(p: str | None, keep: set[str]) -> str | None:
        if p is None or p in keep or "\x00" in p:
            return p  # a NUL byte is reported by validation, naming the key
        q = Path(p).expanduser()
        if not q.is_absolute() and (base / q).exists():
            return str((base / q).resolve())
        return p

    from core.models import BUNDLED_MODELS

    recipe.model.source = fix(recipe.model.source, set(BUNDLED_MODELS)) or recipe.model.source
    recipe.data.source = fix(recipe.data.source, {"shakespeare"}) or recipe.data.source
    from calibrate.data import NAMED_TEXTS

    recipe.data.eval_source = fix(recipe.data.eval_source, set(NAMED_TEXTS))


def load_recipe(path_or_name: str | None) -> Recipe:
    """Load a recipe file, or a recipe shipped in the package by name (default: 'default')."""
    name = path_or_name or DEFAULT_RECIPE
    p = Path(name).expanduser()
    if p.suffix in (".yaml", ".yml") or p.exists():
        if p.is_dir():
            raise RecipeError(f"recipe '{name}' is a directory; expected a YAML file or a shipped recipe name")
        if not p.is_file():
            raise RecipeError(f"recipe file '{name}' does not exist")
        size = p.stat().st_size
        if size > MAX_RECIPE_BYTES:
            raise RecipeError(f"recipe file '{name}' is {size / 1e6:.1f} MB; a recipe is a small YAML file (at most {MAX_RECIPE_BYTES >> 20} MiB)")
        data = p.read_bytes()
        base = p.resolve().parent
    else:
        shipped = resources.files("pipeline.recipes") / f"{name}.yaml"
        if not shipped.is_file():
            avail = sorted(f.name[:-5] for f in resources.files("pipeline.recipes").iterdir() if f.name.endswith(".yaml"))
            raise RecipeError(f"recipe '{name}' is neither a file nor a shipped recipe ({', '.join(avail)})")
        data = shipped.read_bytes()
        base = Path.cwd()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError(f"recipe '{name}' is not UTF-8 text (byte {exc.start}): expected a YAML file") from None
    if "\x00" in text:
        raise RecipeError(f"recipe '{name}' contains a NUL byte: expected a YAML text file")
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RecipeError(f"recipe '{name}' is not valid YAML: {exc}") from None
    except RecursionError:
        raise RecipeError(f"recipe '{name}' nests too deeply to be a recipe") from None
    return recipe_from_dict(raw, base)
