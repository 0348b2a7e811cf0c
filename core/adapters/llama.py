"""Llama family (Llama 2/3, SmolLM2, Mistral-style): GQA attention, SwiGLU MLP."""

from core.adapters.base import ModelAdapter

LLAMA = ModelAdapter(
    family="llama",
    model_types=("llama", "mistral", "qwen2"),
    task="causal-lm",
    head_path="lm_head",
    attention_path="self_attn",
    head_attrs={"num_key_value_groups": "groups"},
    blocks_path="model.layers",
    linear_paths={
        "q": "self_attn.q_proj",
        "k": "self_attn.k_proj",
        "v": "self_attn.v_proj",
        "o": "self_attn.o_proj",
        "gate": "mlp.gate_proj",
        "up": "mlp.up_proj",
        "down": "mlp.down_proj",
    },
    config_keys={
        "layers": "num_hidden_layers",
        "hidden": "hidden_size",
        "heads": "num_attention_heads",
        "kv_heads": "num_key_value_heads",
        "ffn": "intermediate_size",
        "context": "max_position_embeddings",
    },
    defaults={"kv_heads": lambda c: c.num_attention_heads},
    gated_mlp=True,
    mlp_activation="act_fn",
    native={"embed": "model.embed_tokens", "final_norm": "model.norm", "attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"},
)
