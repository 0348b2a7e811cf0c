"""OPT: separate q/k/v/out projections, fc1/fc2 MLP with ReLU."""

from core.adapters.base import ModelAdapter

OPT = ModelAdapter(
    family="opt",
    model_types=("opt",),
    task="causal-lm",
    head_path="lm_head",
    attention_path="self_attn",
    head_attrs={"num_heads": "heads"},
    blocks_path="model.decoder.layers",
    linear_paths={
        "q": "self_attn.q_proj",
        "k": "self_attn.k_proj",
        "v": "self_attn.v_proj",
        "o": "self_attn.out_proj",
        "up": "fc1",
        "down": "fc2",
    },
    config_keys={"layers": "num_hidden_layers", "hidden": "hidden_size", "heads": "num_attention_heads", "ffn": "ffn_dim", "context": "max_position_embeddings"},
)
