"""GGUF metadata → the Hugging Face config a family's adapter reads (for checks before the GGUF is
dequantised; the dequantised model's own config.json is used once it exists)."""

from __future__ import annotations

from typing import Any

GGUF_CONFIG_KEYS = {
    "block_count": "num_hidden_layers",
    "context_length": "max_position_embeddings",
    "embedding_length": "hidden_size",
    "feed_forward_length": "intermediate_size",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "vocab_size": "vocab_size",
}
"""GGUF keys (after ``<architecture>.``) → the Hugging Face config attribute of the Llama-style
families GGUF files carry here (llama, mistral, qwen2 share these names)."""


def config_from_gguf(meta: dict[str, Any]) -> dict[str, Any]:
    """A config dict (``model_type`` and the sizes) from a GGUF header's scalar metadata."""
    arch = meta.get("general.architecture")
    config: dict[str, Any] = {"model_type": arch}
    for key, attr in GGUF_CONFIG_KEYS.items():
        if isinstance(meta.get(f"{arch}.{key}"), int):
            config[attr] = meta[f"{arch}.{key}"]
    return config
