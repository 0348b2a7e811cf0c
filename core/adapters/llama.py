"""Llama-style decoder families as data: Llama 2/3, SmolLM2, Mistral and Qwen2 (one adapter: GQA attention,
SwiGLU MLP, the same module names), Qwen3 (adds per-head q/k norms), Gemma 2/3 (Llama's linears with extra
norms, scaled embeddings and soft-capping), Phi-3 (fused ``qkv_proj`` and ``gate_up_proj``).

The PyTorch passes and the ONNX export only need where the linears are; the engines that run the blocks
themselves (native-cpu, the fused ONNX Runtime graph) need the whole block to be Llama's, which ``native``
(filled) and ``native_refusal`` (empty) say.
"""

from dataclasses import replace

from core.adapters.base import ModelAdapter

_LLAMA_LINEARS = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}

LLAMA = ModelAdapter(
    family="llama",
    model_types=("llama", "mistral", "qwen2"),
    task="causal-lm",
    head_path="lm_head",
    attention_path="self_attn",
    head_attrs={"num_key_value_groups": "groups"},
    blocks_path="model.layers",
    linear_paths=_LLAMA_LINEARS,
    config_keys={
        "layers": "num_hidden_layers",
        "hidden": "hidden_size",
        "heads": "num_attention_heads",
        "kv_heads": "num_key_value_heads",
        "ffn": "intermediate_size",
        "context": "max_position_embeddings",
        "head_dim": "head_dim",
    },
    defaults={"kv_heads": lambda c: c.num_attention_heads},
    gated_mlp=True,
    mlp_activation="act_fn",
    native={"embed": "model.embed_tokens", "final_norm": "model.norm", "attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"},
)

QWEN3 = replace(
    LLAMA,
    family="qwen3",
    model_types=("qwen3",),
    native={},
    native_refusal="Qwen3's per-head RMSNorm of queries and keys (q_norm, k_norm) is not implemented there",
)

GEMMA = replace(
    LLAMA,
    family="gemma",
    model_types=("gemma", "gemma2", "gemma3_text"),
    native={},
    native_refusal=(
        "Gemma's blocks are not Llama's: embeddings scaled by √hidden, (1 + w) RMSNorms before and after attention "
        "and MLP, GELU-tanh gating, attention and logit soft-capping, alternating sliding windows"
    ),
)

PHI3 = replace(
    LLAMA,
    family="phi3",
    model_types=("phi3",),
    linear_paths={"qkv": "self_attn.qkv_proj", "o": "self_attn.o_proj", "gate_up": "mlp.gate_up_proj", "down": "mlp.down_proj"},
    head_attrs={},
    mlp_activation="activation_fn",
    native={},
    native_refusal="Phi-3's fused qkv_proj and gate_up_proj are not split there",
    head_slicing_refusal=(
        "Phi-3's attention slices its fused qkv_proj by the config's head counts, shared by every block, so heads "
        "cannot be removed per block; remove FFN channels only (heads: 0), or zero heads with apply: mask"
    ),
)
