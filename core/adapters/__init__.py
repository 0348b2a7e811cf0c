"""Adapter lookup by the model config's ``model_type``."""

from __future__ import annotations

from typing import Any

from core.adapters.base import LinearRef, ModelAdapter
from core.adapters.bert import BERT
from core.adapters.gguf import config_from_gguf
from core.adapters.gpt2 import GPT2
from core.adapters.llama import GEMMA, LLAMA, PHI3, QWEN3
from core.adapters.opt import OPT
from core.errors import ModelLoadError

ADAPTERS: tuple[ModelAdapter, ...] = (LLAMA, QWEN3, GEMMA, PHI3, GPT2, OPT, BERT)

__all__ = ["ADAPTERS", "LinearRef", "ModelAdapter", "adapter_for", "config_from_gguf"]


def adapter_for(config: Any) -> ModelAdapter:
    for a in ADAPTERS:
        if a.matches(config):
            return a
    known = sorted(t for a in ADAPTERS for t in a.model_types)
    raise ModelLoadError(
        f"model_type '{getattr(config, 'model_type', None)}' has no adapter; supported: {', '.join(known)}"
    )
