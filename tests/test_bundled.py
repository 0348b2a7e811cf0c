"""Integration tests on the bundled real models and text (installed by scripts/install.sh)."""

import pytest
import torch

from calibrate.data import evaluation_windows, shakespeare_splits, tokenize
from core.models import load_model, resolve_source

pytestmark = pytest.mark.slow


def test_minilm_loads_as_a_bert_encoder_and_embeds_sensibly():
    loaded = load_model("minilm-l6")
    assert loaded.adapter.family == "bert" and loaded.task == "encoder"
    dims = loaded.adapter.dims(loaded.model.config)
    assert dims["heads"] == 12 and dims["layers"] == 6 and dims["hidden"] == 384
    tok = loaded.tokenizer
    sents = ["The king is dead.", "The monarch has died.", "Bananas are yellow fruit."]
    batch = tok(sents, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = loaded.model(**batch).last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1).float()
    e = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)
    assert float(e[0] @ e[1]) > float(e[0] @ e[2]) + 0.2  # a real sentence encoder, not random weights


def test_smollm2_gguf_dequantises_into_the_cache_and_predicts_shakespeare(cache_dir):
    src = resolve_source("smollm2-135m")
    assert src.kind == "gguf" and src.path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    loaded = load_model("smollm2-135m")
    assert loaded.directory.is_relative_to(cache_dir)
    dims = loaded.adapter.dims(loaded.model.config)
    assert (dims["heads"], dims["kv_heads"], dims["layers"]) == (9, 3, 30)
    ids = tokenize(loaded.tokenizer, shakespeare_splits().evaluation)
    w = evaluation_windows(ids, 256, 1)
    with torch.no_grad():
        loss = loaded.model(input_ids=w, labels=w).loss
    assert float(loss.exp()) < 100  # dense SmolLM2 is at ~41 on this split; random weights give ~49152
