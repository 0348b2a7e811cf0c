"""Fuzzed recipes: mutations of valid recipes must end in a RecipeError naming the key (or load as a
valid recipe), quickly, before any model is loaded — never a traceback from inside a library."""

from __future__ import annotations

import copy
import dataclasses
import os
import time
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.errors import RecipeError
from engines import KNOWN_BACKENDS, engine_class
from pipeline.recipe import Recipe, load_recipe

SHIPPED = Path(__file__).resolve().parents[1] / "pipeline" / "recipes"
BASES = {p.stem: yaml.safe_load(p.read_text(encoding="utf-8")) for p in sorted(SHIPPED.glob("*.yaml"))}
TRIED = {"mutations": 0, "files": 0}
"""Cases run in this session (reported by the last test)."""

JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**15), max_value=10**15),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.binary(max_size=12),
    st.lists(st.one_of(st.integers(-5, 5), st.text(max_size=4)), max_size=3),
    st.dictionaries(st.text(max_size=6), st.integers(-3, 3), max_size=2),
)


def paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key/index path inside a parsed recipe."""
    out = []
    if isinstance(node, dict):
        for k, v in node.items():
            out.append(prefix + (k,))
            out += paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out.append(prefix + (i,))
            out += paths(v, prefix + (i,))
    return out


def _parent(doc: Any, path: tuple) -> Any:
    for k in path[:-1]:
        doc = doc[k]
    return doc


@st.composite
def mutated(draw) -> tuple[dict, str, tuple]:
    name = draw(st.sampled_from(sorted(BASES)))
    doc = copy.deepcopy(BASES[name])
    kind = draw(st.sampled_from(["replace", "delete", "unknown-key", "unknown-pass", "empty-list", "duplicate-variant", "nest", "engine-options"]))
    all_paths = paths(doc)
    path = draw(st.sampled_from(all_paths))
    parent = _parent(doc, path)
    if kind == "replace":
        parent[path[-1]] = draw(JUNK)
    elif kind == "delete":
        del parent[path[-1]]
    elif kind == "unknown-key":
        dicts = [p for p in all_paths if isinstance(_parent(doc, p + ("x",)), dict)] or [()]
        path = draw(st.sampled_from(dicts))
        target = _parent(doc, path + ("x",))
        target[draw(st.text(min_size=1, max_size=8).filter(lambda s: s not in target))] = draw(JUNK)
    elif kind == "unknown-pass":
        v = draw(st.integers(0, len(doc["variants"]) - 1))
        path = ("variants", v, "passes", 0)
        doc["variants"][v]["passes"] = [{draw(st.text(min_size=1, max_size=10)): {}}]
    elif kind == "empty-list":
        lists = [p for p in all_paths if isinstance(_parent(doc, p + ("x",)), list)] or [("variants",)]
        path = draw(st.sampled_from(lists))
        parent = _parent(doc, path)
        parent[path[-1]] = []
    elif kind == "engine-options":  # a typed option of some backend (or an unknown one) given junk
        backend = draw(st.sampled_from(sorted(b for b in KNOWN_BACKENDS if isinstance(KNOWN_BACKENDS[b], str))))
        keys = [f.name for f in dataclasses.fields(engine_class(backend).options_class)]
        doc["engines"] = [{"backend": backend, "options": {draw(st.sampled_from([*keys, "bogus_key"])): draw(JUNK)}}]
        path = ("engines",)
    elif kind == "duplicate-variant":
        path = ("variants",)
        doc["variants"].append(copy.deepcopy(doc["variants"][0]))
    else:  # a mapping where a scalar is expected, or the other way round
        parent[path[-1]] = {"nested": parent[path[-1]]} if not isinstance(parent[path[-1]], dict) else 7
    return doc, kind, path


def _load(text: bytes, tmp: Path) -> Any:
    p = tmp / "r.yaml"
    p.write_bytes(text)
    t0 = time.perf_counter()
    with mock.patch("core.models.load_model", side_effect=AssertionError("a model was loaded")), mock.patch(
        "core.models.load_hf_dir", side_effect=AssertionError("a model was loaded")
    ):
        try:
            result = load_recipe(str(p))
        except RecipeError as exc:
            result = exc
    assert time.perf_counter() - t0 < 5.0
    return result


@settings(max_examples=int(os.environ.get("RECIPE_FUZZ_EXAMPLES", "400")), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(case=mutated())
def test_mutated_recipes_fail_with_the_key_named_or_load(case, tmp_path):
    doc, kind, path = case
    TRIED["mutations"] += 1
    text = yaml.safe_dump(doc, allow_unicode=True).encode()
    result = _load(text, tmp_path)
    if isinstance(result, Recipe):
        return  # the mutation happened to stay valid (e.g. another number in range)
    msg = str(result)
    assert msg.startswith(("recipe key '", "recipe '")), msg
    top = str(path[0]) if path else "<root>"
    if kind not in ("unknown-key",) and path:
        assert top in msg or "<root>" in msg, (path, msg)


@pytest.mark.parametrize(
    "name,content",
    [
        ("list-not-mapping", b"- a\n- b\n"),
        ("scalar", b"42\n"),
        ("empty", b""),
        ("binary-garbage", os.urandom(4096)),
        ("nul-bytes", b"name: x\x00y\n"),
        ("bad-yaml", b"name: [unclosed\n"),
        ("tabs", b"name:\n\t- x\n"),
        ("ten-megabytes", b"name: x\n# " + b"a" * (10 * 1024 * 1024) + b"\n"),
        ("deep-nesting", b"name: " + b"[" * 2000 + b"]" * 2000 + b"\n"),
        ("model-path-with-nul", b"model: {source: \"a\\0b\"}\n"),
        ("unknown-root-key", b"nme: x\n"),
    ],
)
def test_malformed_recipe_files(name, content, tmp_path):
    TRIED["files"] += 1
    result = _load(content, tmp_path)
    assert isinstance(result, RecipeError), f"{name}: loaded as {result!r}"
    assert "recipe" in str(result)


def test_recipe_naming_a_directory_or_a_missing_file(tmp_path):
    TRIED["files"] += 2
    with pytest.raises(RecipeError, match="does not exist|is a directory|not a file"):
        load_recipe(str(tmp_path))
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(str(tmp_path / "missing.yaml"))


def test_zz_report_how_many_cases_were_tried(capsys):
    # run last in this module (alphabetical order within the file is definition order): the count for the note
    with capsys.disabled():
        print(f"\nrecipe fuzzing: {TRIED['mutations']} mutated recipes, {TRIED['files']} malformed files")
    assert TRIED["mutations"] >= 100 or TRIED["mutations"] == 0  # 0 when run with -k on one test
