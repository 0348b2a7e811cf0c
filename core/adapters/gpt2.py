"""GPT-2: fused qkv projection, weights stored as (in, out) by ``Conv1D``."""

from core.adapters.base import ModelAdapter

GPT2 = ModelAdapter(
    family="gpt2",
    model_types=("gpt2",),
    task="causal-lm",
    head_path="lm_head",
    attention_path="attn",
    head_attrs={"num_heads": "heads", "split_size": "width"},
    blocks_path="transformer.h",
    linear_paths={"qkv": "attn.c_attn", "o": "attn.c_proj", "up": "mlp.c_fc", "down": "mlp.c_proj"},
    config_keys={"layers": "n_layer", "hidden": "n_embd", "heads": "n_head", "ffn": "n_inner", "context": "n_positions"},
    defaults={"ffn": lambda c: 4 * c.n_embd},
    weight_layout="in_out",
    linear_size_attrs={"out": "nf"},
)
