"""Issue 30's family matrix: each decoder family's tiny random model through the whole build — one-shot
pruning, structured removal, contextual sparsity, ONNX prefill and KV-cache decode graphs on ONNX Runtime,
parity with PyTorch — or refused before anything is built, with the reason.

One build per family (module-scoped), then one test per cell of the matrix, so that
``benchmarks/family_matrix.py`` can read the matrix from this file's test outcomes (each refusal test
records its reason as the ``refused`` property of its JUnit test case). The suite builds the two families
whose blocks differ most from Llama's (Gemma 2: its own norms, soft-capping, an explicit head_dim and a
sliding window; Phi-3: fused qkv and gate_up linears) — each build takes about 50 s of exports on two
cores; ``FAMILY_MATRIX=all`` (what the benchmark sets) builds every family. The checks without a build
(structured slicing equals masking, the engines' refusals) run for every family always.
"""

from __future__ import annotations

import json
import os

import pytest
from conftest import DECODER_FAMILIES

from test_build import tiny_recipe

from pipeline.build import build

BUILT_FAMILIES = DECODER_FAMILIES if os.environ.get("FAMILY_MATRIX") == "all" else ("gemma2", "phi3")

FUSED_MLP = {"phi3"}
"""Families whose gate and up projections are one fused linear (contextual sparsity refuses them)."""
NO_HEAD_SLICING = {"phi3"}
"""Families whose attention cannot lose heads per block (structured removal keeps heads, removes FFN channels)."""
LLAMA_BLOCKS = {"qwen2", "mistral"}
"""Families whose blocks are Llama's exactly (native-cpu and the fused graph run them)."""


def _recipe(model_dir, text_file, out, variants):
    return tiny_recipe(model_dir, text_file, out, variants=variants, export={"kv_cache": True}, validation={
        "agreement_windows": 1,
        "parity": {"batch": 1, "length": 8},
        "latency": None,
        # prompt + new tokens (22) run past the Gemma models' 16-position sliding window
        "decode": {"prompt": 16, "new_tokens": 6, "greedy_tokens": 8, "repeats": 1},
    })


def _variants(family: str) -> list[dict]:
    """One-shot 2:4 (its graph is the dense one rebound); structured removal, then contextual sparsity on the
    smaller model in one variant (one export for both)."""
    structured = [{"structured": {"ffn": 0.5} if family in NO_HEAD_SLICING else {"ffn": 0.5, "heads": 0.5}}]
    contextual = [] if family in FUSED_MLP else [{"contextual": {"keep": 0.5}}]
    return [
        {"name": "wanda-2of4", "passes": [{"wanda": {"pattern": "2:4"}}]},
        {"name": "structured", "passes": structured + contextual},
    ]


@pytest.fixture(scope="module", params=BUILT_FAMILIES)
def family_build(request, family_dirs, text_file, tmp_path_factory):
    family = request.param
    out = tmp_path_factory.mktemp(f"family-{family}") / "build"
    summary = build(_recipe(family_dirs[family], text_file, out, _variants(family)))
    return family, out, {v["name"]: v for v in summary.results["variants"]}


def _ort(variant: dict) -> dict:
    r = variant["engines"]["onnxruntime-cpu"]
    assert r["status"] == "ok", r
    return r


@pytest.mark.slow
def test_one_shot(family_build):
    family, out, variants = family_build
    r = _ort(variants["wanda-2of4"])
    assert r["size"]["block_linear_sparsity"] == pytest.approx(0.5, abs=1e-3)
    from safetensors.torch import load_file

    weights = load_file(str(out / "wanda-2of4" / "model" / "model" / "model.safetensors"))
    layer0 = [w for n, w in weights.items() if n.startswith("model.layers.0.") and n.endswith("proj.weight")]
    assert layer0, sorted(weights)[:8]
    for w in layer0:  # 2:4 along the reduction axis: every group of 4 inputs keeps at most 2
        assert int((w.reshape(w.shape[0], -1, 4) != 0).sum(-1).max()) <= 2


@pytest.mark.slow
def test_structured(family_build):
    family, out, variants = family_build
    _ort(variants["structured"])
    info = variants["structured"]["pass_results"][0]["info"]
    assert info["parameters_after"] < info["parameters_before"]
    cfg = json.loads((out / "structured" / "model" / "model" / "config.json").read_text())
    for layer in info["kept"]:
        assert layer["ffn"] == layer["dense"]["ffn"] // 2
        if family in NO_HEAD_SLICING:
            assert layer["heads"] == layer["dense"]["heads"]
        else:
            assert layer["heads"] < layer["dense"]["heads"] and layer["heads"] % layer["kv_heads"] == 0
    assert cfg["pruned_layers"] == [{k: v for k, v in layer.items() if k in ("heads", "kv_heads", "ffn")} for layer in info["kept"]]


@pytest.mark.slow
def test_structured_head_slicing(family_build, family_dirs, text_file, tmp_path, record_property):
    family, _, variants = family_build
    if family not in NO_HEAD_SLICING:
        kept = variants["structured"]["pass_results"][0]["info"]["kept"]
        assert all(layer["heads"] < layer["dense"]["heads"] for layer in kept), kept
        return
    from core.errors import RecipeError
    from pipeline.checks import check_recipe

    recipe = _recipe(family_dirs[family], text_file, tmp_path, [{"name": "heads", "passes": [{"structured": {"heads": 0.5}}]}])
    with pytest.raises(RecipeError, match=r"structured\.heads.*fused qkv_proj.*config's head counts") as err:
        check_recipe(recipe)
    record_property("refused", str(err.value))


@pytest.mark.slow
def test_contextual(family_build, family_dirs, text_file, tmp_path, record_property):
    family, _, variants = family_build
    if family in FUSED_MLP:
        from core.errors import RecipeError
        from pipeline.checks import check_recipe

        recipe = _recipe(family_dirs[family], text_file, tmp_path, [{"name": "ctx", "passes": [{"contextual": {}}]}])
        with pytest.raises(RecipeError, match="separate gate and up linears.*fuses them into one") as err:
            check_recipe(recipe)
        record_property("refused", str(err.value))
        return
    v = variants["structured"]
    assert [r["name"] for r in v["pass_results"]] == ["structured", "contextual"]
    contextual = v["pass_results"][1]["info"]
    assert contextual["blocks"] and _ort(v)["parity"]["passed"] and v["decode"]["tokens_identical"]


@pytest.mark.slow
def test_onnx_prefill_and_ort_equals_pytorch(family_build):
    family, out, variants = family_build
    for name, v in variants.items():
        assert (out / name / "onnx" / "model.onnx").is_file()
        r = _ort(v)
        assert r["parity"]["passed"], (name, r["parity"])
        assert abs(r["perplexity_engine_vs_torch"]) < 1e-3, name


@pytest.mark.slow
def test_kv_decode(family_build):
    family, out, variants = family_build
    for name, v in variants.items():
        d = v["decode"]
        assert d["tokens_identical"], (family, name, d)
        assert d["max_abs_logit_delta"] <= 1e-3, (family, name)
        assert (out / name / "kv" / "decode.onnx").is_file()


@pytest.mark.parametrize("family", DECODER_FAMILIES)
@pytest.mark.parametrize("backend", ["native-cpu", "onnxruntime-fused"])
def test_engines_that_run_llama_blocks_themselves(family, backend, family_dirs, record_property):
    """native-cpu and the fused graph take the families whose blocks are Llama's and refuse the others with
    the family's own reason (asked by ``pipeline check`` before anything is built)."""
    from transformers import AutoConfig

    from core.adapters import adapter_for
    from engines import engine_class

    config = AutoConfig.from_pretrained(str(family_dirs[family]))
    reason = engine_class(backend).check_model(adapter_for(config).facts(config))
    if family in LLAMA_BLOCKS:
        assert reason is None
        return
    expected = {"qwen3": "q_norm, k_norm", "gemma2": "soft-capping", "gemma3": "soft-capping", "phi3": "fused qkv_proj and gate_up_proj"}
    assert reason is not None and expected[family] in reason and "use onnxruntime-cpu" in reason, reason
    record_property("refused", reason)


@pytest.mark.parametrize("family", DECODER_FAMILIES)
def test_slicing_equals_masking(family):
    """Structured removal through the adapter: slicing heads and FFN channels out of a block gives the same
    logits as zeroing them (what the slicing must preserve), and the matrices really shrink."""
    import torch

    from conftest import tiny_model
    from core.adapters import adapter_for
    from core.structure import layer_shapes, mask_block, slice_block

    sliced, masked = tiny_model(family), tiny_model(family)
    adapter = adapter_for(sliced.config)
    keep_heads = None if family in NO_HEAD_SLICING else [0, 1]  # GQA: 4 query heads on 2 KV heads, keep the first group
    for b in range(2):
        slice_block(sliced, adapter, b, keep_heads, keep_ffn=list(range(0, 128, 2)))
        mask_block(masked, adapter, b, keep_heads, keep_ffn=list(range(0, 128, 2)))
    ids = torch.randint(0, 257, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = sliced(input_ids=ids).logits, masked(input_ids=ids).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    shapes = layer_shapes(sliced, adapter)
    assert all(s.ffn == 64 for s in shapes)
    assert all((s.heads, s.kv_heads) == ((4, 2) if keep_heads is None else (2, 1)) for s in shapes)
    assert sum(p.numel() for p in sliced.parameters()) < sum(p.numel() for p in masked.parameters())


def test_fused_qkv_masking_zeroes_the_heads_of_each_part():
    """Phi-3's fused [q | k | v] with GQA (4 query heads of width 16 on 2 KV heads): masking to query heads
    {0, 1} (KV head 0) zeroes q rows 32–63, k rows 16–31 and v rows 16–31 of the fused weight, nothing else."""
    import torch

    from conftest import tiny_model
    from core.adapters import adapter_for
    from core.structure import mask_block

    model = tiny_model("phi3")
    adapter = adapter_for(model.config)
    (qkv,) = adapter.linears(model, roles=["qkv"], blocks=[0])
    before = qkv.weight_out_in().clone()
    mask_block(model, adapter, 0, keep_heads=[0, 1])
    after = qkv.weight_out_in()
    q, k, v = 64, 32, 32
    gone = torch.zeros(q + k + v, dtype=torch.bool)
    gone[32:64] = True
    gone[q + 16:q + 32] = True
    gone[q + k + 16:] = True
    assert torch.all(after[gone] == 0)
    torch.testing.assert_close(after[~gone], before[~gone], rtol=0, atol=0)
