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


# --- family knowledge lives in core/adapters only -------------------------------------------------

GENERIC = {"model", "layers", "layer", "self", "output", "dense", "key", "value", "query", "attention", "attn", "mlp", "h",
           "encoder", "decoder", "transformer", "intermediate"}
"""Path components of the adapters that are ordinary words (they name nothing a family alone has)."""


def family_names() -> set[str]:
    """Every attribute and config name an adapter declares (linear, block, attention and head paths,
    config keys, head attributes, MLP activation, size attributes), less ordinary words, plus the
    names of the families' own classes and task outputs the adapters translate."""
    from core.adapters import ADAPTERS

    names: set[str] = {"Conv1D", "last_hidden_state"}
    for a in ADAPTERS:
        for path in [a.blocks_path, a.attention_path, a.head_path or "", *a.linear_paths.values()]:
            names.update(x for x in path.split(".") if x)
        names.update(a.config_keys.values())
        names.update(a.head_attrs)
        names.update(a.linear_size_attrs.values())
        if a.mlp_activation:
            names.add(a.mlp_activation)
    # head_dim: also the project's own name for the head width (ModelAdapter.dims), which Qwen3's and
    # Gemma's configs happen to spell the same way; only the adapters read it from a config
    return names - GENERIC - {"in_features", "out_features", "head_dim"}


def family_names_in(path, names: set[str]) -> list[tuple[int, str]]:
    """(line, name) of every identifier or word inside a string token (comments excluded) of ``path`` that is a family name."""
    import io
    import re
    import tokenize

    out = []
    for tok in tokenize.generate_tokens(io.StringIO(path.read_text(encoding="utf-8")).readline):
        if tok.type in (tokenize.NAME, tokenize.STRING) or tok.type == getattr(tokenize, "FSTRING_MIDDLE", -1):
            out += [(tok.start[0], w) for w in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", tok.string) if w in names]
    return out


OP_SCHEMA_WORDS = {("engines/fused_graph.py", "num_heads")}
"""Words that are ONNX Runtime operator attributes, not a family's config key: GroupQueryAttention's
``num_heads`` (the fused graph sets it from the weights' shapes, per block)."""


def test_family_names_appear_only_in_the_adapters():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    names = family_names()
    assert {"gate_proj", "act_fn", "c_attn", "n_embd", "num_key_value_heads", "nf", "Conv1D", "lm_head"} <= names
    hits = []
    for pkg in ("core", "calibrate", "passes", "export", "engines", "pipeline"):
        for p in sorted((root / pkg).rglob("*.py")):
            if p.parent.name == "adapters":
                continue
            rel = str(p.relative_to(root))
            hits += [f"{rel}:{line} {w}" for line, w in family_names_in(p, names) if (rel, w) not in OP_SCHEMA_WORDS]
    assert not hits, "family knowledge outside core/adapters:\n" + "\n".join(hits)


def test_the_family_name_check_can_fail(tmp_path):
    p = tmp_path / "x.py"
    p.write_text("# gate_proj in a comment is fine\nw = mlp.gate_proj.weight\ns = 'reads n_embd'\n", encoding="utf-8")
    assert family_names_in(p, family_names()) == [(2, "gate_proj"), (3, "n_embd")]
