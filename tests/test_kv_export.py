"""Prefill + decode graphs with a KV cache: greedy tokens and per-step logits equal PyTorch generate."""

import numpy as np
import onnx
import pytest
import torch

from engines.onnxruntime import OnnxRuntimeCpuEngine
from export.kv_export import cache_layout, export_kv_graphs, greedy_generate
from core.adapters import adapter_for
from tests.conftest import VOCAB, tiny_model


def _runner(path):
    return OnnxRuntimeCpuEngine({}).open(path)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_greedy_decode_matches_pytorch_generate(family, tmp_path):
    model = tiny_model(family)
    adapter = adapter_for(model.config)
    info = export_kv_graphs(model, adapter, tmp_path)
    lay = cache_layout(model, adapter)
    dec = onnx.load(str(tmp_path / "decode.onnx"))
    past0 = next(i for i in dec.graph.input if i.name == "past_key_0")
    dims = [d.dim_value or d.dim_param for d in past0.type.tensor_type.shape.dim]
    assert dims[1] == lay.kv_heads[0] and dims[3] == lay.head_dim  # only KV heads are cached
    if family == "llama":
        assert lay.kv_heads == (2, 2) and info["kv_heads"] == [2, 2]  # GQA: 4 query heads share 2 KV heads
    prompt = np.random.default_rng(0).integers(0, VOCAB, (2, 11)).astype(np.int64)
    n = 12
    with _runner(tmp_path / "prefill.onnx") as pre, _runner(tmp_path / "decode.onnx") as de:
        res = greedy_generate(pre, de, lay, prompt, n)
    model.generation_config.eos_token_id = None  # plain greedy for n steps: no early stop, no min-length masking
    with torch.no_grad():
        ref = model.generate(
            torch.from_numpy(prompt), attention_mask=torch.ones(2, 11, dtype=torch.long), max_new_tokens=n,
            do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0,
        )
    assert np.array_equal(res.tokens, ref.sequences[:, 11:].numpy())
    assert len(res.step_logits) == n
    for got, want in zip(res.step_logits, ref.logits):
        assert np.abs(got - want.numpy()).max() <= 1e-4
    assert len(res.decode_ms) == n - 1


def test_kv_export_refuses_encoders(tmp_path):
    model = tiny_model("bert")
    with pytest.raises(ValueError, match="for causal LMs"):
        export_kv_graphs(model, adapter_for(model.config), tmp_path)
