"""BERT encoders (MiniLM, BERT): loaded as the bare ``BertModel``."""

from core.adapters.base import ModelAdapter

BERT = ModelAdapter(
    family="bert",
    model_types=("bert",),
    task="encoder",
    attention_path="attention.self",
    head_attrs={"num_attention_heads": "heads", "all_head_size": "width"},
    blocks_path="encoder.layer",
    linear_paths={
        "q": "attention.self.query",
        "k": "attention.self.key",
        "v": "attention.self.value",
        "o": "attention.output.dense",
        "up": "intermediate.dense",
        "down": "output.dense",
    },
    config_keys={"layers": "num_hidden_layers", "hidden": "hidden_size", "heads": "num_attention_heads", "ffn": "intermediate_size", "context": "max_position_embeddings"},
)
