"""Everything a recipe can be checked for before the first model load.

:func:`check_recipe` runs after the recipe's own validation (keys, types, ranges, engine options),
for ``python -m pipeline check`` and for the build's preflight alike:

1. the model's facts from its config alone — a Hugging Face directory's ``config.json``, the fp32
   cache entry of a GGUF, or the GGUF's header (no weights read, no tokenizer built);
2. the data against the model: calibration, evaluation, parity and latency lengths within the
   model's context;
3. every pass of every variant against the model and the data (``Pass.check``: blocks beyond the
   model, an N:M pattern that does not divide a width, held-out batches ≥ the calibration batches, a
   pass for causal LMs on an encoder, …), each error naming the recipe key;
4. the memory and disk estimate (:mod:`pipeline.preflight`) for the variants not exported yet.
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from core.errors import RecipeError

log = logging.getLogger(__name__)


def model_facts(recipe: Any, source: Any = None) -> tuple[Any, int]:
    """(ModelFacts, fp32 weight bytes) of the recipe's model, without loading it; ``source``: the
    already resolved (fingerprinted) model source, when the caller has one."""
    from core.adapters import adapter_for
    from core.models import config_without_weights, resolve_source

    config, weights = config_without_weights(source or resolve_source(recipe.model.source))
    cfg = SimpleNamespace(**config)
    try:
        facts = adapter_for(cfg).facts(cfg)
    except ValueError as exc:
        raise RecipeError(f"recipe key 'model.source': {exc}") from None
    return facts, weights


def _check_model(recipe: Any, facts: Any) -> None:
    if recipe.export.kv_cache and facts.task != "causal-lm":
        raise RecipeError(f"recipe key 'export.kv_cache': KV-cache graphs are for causal LMs; this {facts.family} model is an {facts.task}")
    from engines import engine_class

    for i, e in enumerate(recipe.engines):
        why = engine_class(e.backend).check_model(facts)
        if why:
            raise RecipeError(f"recipe key 'engines[{i}].backend': engine '{e.backend}' cannot run this model: {why}")
    if facts.context is None:
        return
    v = recipe.validation
    lengths = {
        "data.calibration.length": recipe.data.calibration.length,
        "data.evaluation.length": recipe.data.evaluation.length,
        "validation.parity.length": v.parity.length,
    }
    if v.latency is not None:
        lengths["validation.latency.sequence_lengths"] = max(v.latency.sequence_lengths)
    if v.decode is not None:
        lengths["validation.decode.prompt + new_tokens"] = v.decode.prompt + max(v.decode.new_tokens, v.decode.greedy_tokens)
    for key, n in lengths.items():
        if n > facts.context:
            raise RecipeError(f"recipe key '{key}': {n} tokens is longer than the model's context of {facts.context} positions")


def check_passes(recipe: Any, facts: Any) -> None:
    """``Pass.check`` of every pass of every variant; an error names ``variants[i].passes[j].<pass>.<key>``."""
    from engines import engine_class
    from passes import get_pass_class
    from passes.base import DataFacts, OptionError

    data = DataFacts(recipe.data.calibration.windows, recipe.data.calibration.length)
    for i, v in enumerate(recipe.variants):
        for j, p in enumerate(v.passes):
            cls = get_pass_class(p.name)
            where = f"{v.where or f'variants[{i}]'}.passes[{j}].{p.name}"
            if cls.must_be_last and j != len(v.passes) - 1:
                raise RecipeError(f"recipe key '{where}': pass '{p.name}' must be the variant's last pass; '{v.passes[-1].name}' follows it (variant '{v.name}')")
            if cls.quantizes:
                _check_quantized_variant(recipe, where, v)
            for k, e in enumerate(recipe.engines):
                why = engine_class(e.backend).check_passes([q.name for q in v.passes[: j + 1]])
                if why:
                    raise RecipeError(f"recipe key '{where}': engine '{e.backend}' (engines[{k}]) cannot run variant '{v.name}': {why}")
            try:
                cls.check(cls.config_class(**p.options), facts, data)
            except OptionError as exc:
                raise RecipeError(f"recipe key '{where}.{exc.key}': {exc} (variant '{v.name}')") from None
            except ValueError as exc:
                raise RecipeError(f"recipe key '{where}': {exc} (variant '{v.name}')") from None


def check_streaming(recipe: Any) -> None:
    """With ``model.stream: always``, every variant's passes must run block-streamed."""
    if recipe.model.stream != "always":
        return
    from pipeline.preflight import stream_refusal_of

    for i, v in enumerate(recipe.variants):
        why = stream_refusal_of(v) if v.passes else None
        if why:
            raise RecipeError(f"recipe key 'model.stream': 'always', but variant '{v.name}' ({v.where or f'variants[{i}]'}) cannot run block-streamed: {why}")


def _check_quantized_variant(recipe: Any, where: str, v: Any) -> None:
    """A quantized variant's graph carries ONNX Runtime's quantized ops: every engine must run them, and
    no graph pass may rewrite the weights first."""
    from engines import engine_class

    for k, e in enumerate(recipe.engines):
        if engine_class(e.backend).quantized_weights is None:
            raise RecipeError(
                f"recipe key '{where}': variant '{v.name}' is quantized, and engine '{e.backend}' (engines[{k}]) cannot run "
                "quantized weights; put quantized variants in a recipe whose engines are onnxruntime-cpu, onnxruntime-fused or native-cpu (int8/int4 kernels)"
            )
    if "fp16" in recipe.export.graph_passes:
        raise RecipeError(f"recipe key '{where}': variant '{v.name}' is quantized; the 'fp16' graph pass would rewrite its weights first (drop one of them)")


def check_recipe(recipe: Any, out_dir: Path | None = None, source: Any = None) -> str | None:
    """Run every check that needs no model load; return the memory/disk estimate as text (None when
    every variant is exported already)."""
    from pipeline import preflight
    from passes import get_pass_class

    facts, weights = model_facts(recipe, source)
    _check_model(recipe, facts)
    check_passes(recipe, facts)
    check_streaming(recipe)
    out = Path(out_dir or recipe.output or Path("build") / recipe.name).resolve()
    todo = [v for v in recipe.variants if not (out / v.name / "onnx" / "stage.json").is_file()]
    if not todo:
        return None
    uses = [get_pass_class(p.name) for v in todo for p in v.passes]
    est = preflight.estimate(
        recipe, facts, weights, todo,
        trains=any(c.trains for c in uses), calibrates=any(c.uses_calibration for c in uses),
        state_copies=max((c.state_copies for c in uses), default=0),
    )
    return preflight.check(est, out)
