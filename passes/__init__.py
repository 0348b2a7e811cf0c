"""PyTorch pruning passes and their registry (recipe names → Pass classes)."""

from __future__ import annotations

from passes.base import Pass, PassContext, PassResult, registry
from passes import magnitude as _magnitude  # noqa: F401  (registers the passes)
from passes import sparsegpt as _sparsegpt  # noqa: F401
from passes import wanda as _wanda  # noqa: F401
from passes import structured as _structured  # noqa: F401
from passes import distill as _distill  # noqa: F401
from passes import sds as _sds  # noqa: F401
from passes import admm as _admm  # noqa: F401
from passes import contextual as _contextual  # noqa: F401
from passes import activation as _activation  # noqa: F401
from passes import quantize as _quantize  # noqa: F401
from core.errors import RecipeError

__all__ = ["Pass", "PassContext", "PassResult", "get_pass_class", "get_pass_config_class", "registry"]


def get_pass_class(name: str, where: str = "pass") -> type[Pass]:
    reg = registry()
    if name not in reg:
        raise RecipeError(f"recipe key '{where}': unknown pass '{name}'; expected one of {', '.join(sorted(reg))}")
    return reg[name]


def get_pass_config_class(name: str, where: str = "pass") -> type:
    return get_pass_class(name, where).config_class
