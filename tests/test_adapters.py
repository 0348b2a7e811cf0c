import pytest
import torch

from passes import PassContext
from passes.magnitude import MagnitudeConfig, MagnitudePass
from core.masks import is_nm_sparse, sparsity_of
from core.adapters import adapter_for
from core.errors import ModelLoadError
from tests.conftest import FAMILIES, tiny_config, tiny_model

EXPECTED_ROLES = {
    "llama": ["q", "k", "v", "o", "gate", "up", "down"],
    "gpt2": ["qkv", "o", "up", "down"],
    "opt": ["q", "k", "v", "o", "up", "down"],
    "bert": ["q", "k", "v", "o", "up", "down"],
}


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_finds_every_block_linear(family):
    model = tiny_model(family)
    adapter = adapter_for(model.config)
    assert adapter.family == family
    refs = adapter.linears(model)
    assert [r.role for r in refs] == EXPECTED_ROLES[family] * 2
    dims = adapter.dims(model.config)
    assert dims["layers"] == 2 and dims["hidden"] == 64 and dims["head_dim"] == 16
    for r in refs:
        w = r.weight_out_in()
        if r.role in ("q", "o"):
            assert w.shape == (64, 64)
        if r.role == "qkv":
            assert w.shape == (3 * 64, 64)  # GPT-2 Conv1D (in, out) seen as (out, in)
        if r.role == "down":
            assert w.shape[0] == 64 and w.shape[1] == dims["ffn"]


def test_gqa_dims_of_llama():
    dims = adapter_for(tiny_config("llama")).dims(tiny_config("llama"))
    assert dims["heads"] == 4 and dims["kv_heads"] == 2


def test_unknown_family_is_a_clear_error():
    class Cfg:
        model_type = "mamba"

    with pytest.raises(ModelLoadError, match="model_type 'mamba' has no adapter"):
        adapter_for(Cfg())


@pytest.mark.parametrize("family", FAMILIES)
def test_magnitude_2of4_is_along_the_input_dimension_for_every_family(family):
    model = tiny_model(family)
    adapter = adapter_for(model.config)
    emb_before = model.get_input_embeddings().weight.clone()
    res = MagnitudePass(MagnitudeConfig(pattern="2:4")).run(model, PassContext(adapter))
    for r in adapter.linears(model):
        w = r.weight_out_in()
        assert is_nm_sparse(w, 2, 4), r.name
        assert sparsity_of(w) == pytest.approx(0.5)
    assert torch.equal(model.get_input_embeddings().weight, emb_before)  # embeddings untouched
    assert len(res.layers) == len(adapter.linears(model))


def test_magnitude_layer_filters():
    model = tiny_model("llama")
    adapter = adapter_for(model.config)
    MagnitudePass(MagnitudeConfig(sparsity=0.5, targets=["up"], blocks=[1])).run(model, PassContext(adapter))
    for r in adapter.linears(model):
        expected = 0.5 if (r.role == "up" and r.block == 1) else 0.0
        assert sparsity_of(r.weight_out_in()) == pytest.approx(expected, abs=1e-3), r.name
