"""Recipe values → dataclasses, with the key path in every error.

``build_dataclass`` rejects unknown keys and wrong types and turns a class's own ``ValueError``
(from ``__post_init__``) into a :class:`RecipeError` that names the key, e.g.
``recipe key 'variants[1].passes[0].<pass>.sparsity': 1.5 is outside [0, 1)``.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from core.errors import RecipeError


def check(cond: bool, where: str, msg: str) -> None:
    if not cond:
        raise RecipeError(f"recipe key '{where}': {msg}")


def build_dataclass(cls: type, data: Any, where: str) -> Any:
    """Construct ``cls`` from a mapping, rejecting unknown keys and wrong types.

    ``ValueError`` raised by the class's own ``__post_init__`` becomes a
    :class:`RecipeError` that names ``where``.
    """
    if data is None:
        data = {}
    check(isinstance(data, dict), where, f"expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields), key=str)
    check(not unknown, f"{where}.{unknown[0]}" if unknown else where, f"unknown key; expected one of {', '.join(fields)}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = coerce(hints[name], value, f"{where}.{name}")
    try:
        return cls(**kwargs)
    except ValueError as exc:  # an OptionError names the key inside the mapping
        key = getattr(exc, "key", None)
        raise RecipeError(f"recipe key '{where}{'.' + key if key else ''}': {exc}") from None
    except TypeError as exc:  # missing required field
        raise RecipeError(f"recipe key '{where}': {exc}") from None


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def coerce(tp: Any, value: Any, where: str) -> Any:
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
                return coerce(a, value, where)
            except RecipeError as exc:
                errors.append(str(exc))
        raise RecipeError(errors[-1] if errors else f"recipe key '{where}': unexpected value {value!r}")
    if origin is list:
        check(isinstance(value, list), where, f"expected a list, got {type(value).__name__} {value!r}")
        return [coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        check(isinstance(value, dict), where, f"expected a mapping, got {type(value).__name__}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value, where)
    if tp is Any:
        return value
    if tp is bool:
        check(isinstance(value, bool), where, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        check(isinstance(value, int) and not isinstance(value, bool), where, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        check(isinstance(value, (int, float)) and not isinstance(value, bool), where, f"expected a number, got {value!r}")
        return float(value)
    if tp is str:
        check(isinstance(value, str), where, f"expected a string, got {value!r}")
        return value
    raise RecipeError(f"recipe key '{where}': unsupported field type {_type_name(tp)}")
