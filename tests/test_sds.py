"""SDS (sparse → dense → sparse): pattern validity, step 2 lowers the block error, option checks, the
runner's dense-model targets."""

import pytest
import torch

from calibrate.runner import LayerwiseRunner
from calibrate.stats import InputNormCollector
from core.adapters import adapter_for
from core.errors import RecipeError
from core.masks import is_nm_sparse, sparsity_of
from passes import PassContext
from passes.sds import SDSConfig, SDSPass
from passes.sparsegpt import SparseGPTConfig, SparseGPTPass
from passes.wanda import WandaConfig, WandaPass
from pipeline.schema import build_dataclass
from tests.conftest import FAMILIES, VOCAB, tiny_model

IDS = torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(5))


def _ctx(model):
    return PassContext(adapter_for(model.config), calibration=lambda: IDS, progress=False)


@pytest.mark.parametrize("base, target", [("sparsegpt", {"pattern": "2:4"}), ("wanda", {"sparsity": 0.5}), ("sparsegpt", {"sparsity": 0.6})])
def test_sds_is_never_denser_than_its_step1(base, target):
    extra = {"blocksize": 16} if base == "sparsegpt" else {}
    plain = tiny_model("llama")
    cls, cfg_cls = (SparseGPTPass, SparseGPTConfig) if base == "sparsegpt" else (WandaPass, WandaConfig)
    cls(cfg_cls(**target, **extra)).run(plain, _ctx(plain))
    model = tiny_model("llama")
    res = SDSPass(SDSConfig(base=base, **target, **extra, recon_steps=10, recon_lr=1e-3, holdout_batches=1)).run(model, _ctx(model))
    adapter = adapter_for(model.config)
    for ref, ref1 in zip(adapter.linears(model), adapter.linears(plain)):
        w = ref.weight_out_in()
        # the same solver picks the same number of zeros; a reconstructed weight that is exactly 0 only adds one
        assert sparsity_of(w) >= sparsity_of(ref1.weight_out_in()), ref.name
        if "pattern" in target:
            assert is_nm_sparse(w, 2, 4), ref.name
        else:
            assert sparsity_of(w) == pytest.approx(target["sparsity"], abs=0.02), ref.name
    assert len(res.layers) == len(adapter.linears(model))
    # the weights did change from step 1's (the second pruning is of a reconstructed block)
    assert any(not torch.equal(a.weight_out_in(), b.weight_out_in()) for a, b in zip(adapter.linears(model), adapter.linears(plain)))


@pytest.mark.parametrize("family", FAMILIES)
def test_step2_lowers_the_block_reconstruction_error(family):
    model = tiny_model(family)
    ids = torch.randint(0, VOCAB, (24, 64), generator=torch.Generator().manual_seed(6))
    ctx = PassContext(adapter_for(model.config), calibration=lambda: ids, progress=False)
    res = SDSPass(SDSConfig(pattern="2:4", blocksize=16, batch_size=4, recon_steps=30, recon_lr=1e-3, holdout_batches=1)).run(model, ctx)
    for b, rec in res.info["blocks"].items():
        # the dense reconstruction fits its training batches better than step 1's pruned block did ...
        assert rec["train1"]["loss_last"] < 0.9 * rec["train1"]["loss_first"], (family, b, rec["train1"])
        # ... and after the second pruning the block is still closer to its targets than step 1 left it
        assert rec["sparse1"]["train"] < rec["step1"]["train"], (family, b)
        assert rec["dense1"]["holdout"] < rec["step1"]["holdout"], (family, b)
    assert res.info["holdout_error_ratio"] < 1.0


def test_iterations_and_regularisers_run_and_are_recorded():
    for reg in ("l1", "l2", "smallest", "none"):
        model = tiny_model("llama")
        res = SDSPass(SDSConfig(sparsity=0.5, blocksize=16, regularizer=reg, iterations=2, recon_steps=4, holdout_batches=1)).run(model, _ctx(model))
        rec = res.info["blocks"]["0"]
        assert {"step1", "train1", "dense1", "sparse1", "train2", "dense2", "sparse2"} <= set(rec)
        if reg == "none":
            assert rec["train1"]["reg_last"] == 0.0
        else:  # re-activated weights moved, so the penalty on them is positive
            assert rec["train1"]["reg_last"] > 0.0, reg


def test_target_model_takes_the_dense_models_own_block_outputs():
    model = tiny_model("llama")
    adapter = adapter_for(model.config)
    with torch.no_grad():
        hidden = model(input_ids=IDS, attention_mask=torch.ones_like(IDS), output_hidden_states=True).hidden_states
    seen = {}

    def apply(b, refs, cols):
        seen[b] = torch.cat(runner.current_targets)
        for r in refs:  # change the block, so the next block's inputs differ from the dense model's
            r.weight_out_in().mul_(0.5)

    runner = LayerwiseRunner(model, adapter, IDS, batch_size=3)
    runner.run(lambda ref: InputNormCollector(ref.in_features), apply, teacher=True)
    torch.testing.assert_close(seen[0], hidden[1], atol=1e-5, rtol=1e-5)
    # block 1's target is the dense block 1 on the dense block 0's output, although apply changed block 0
    dense = tiny_model("llama")
    blocks = adapter.blocks(dense)
    ref_runner = LayerwiseRunner(dense, adapter, IDS, batch_size=3)
    expected = ref_runner.next_inputs(blocks[1], ref_runner.next_inputs(blocks[0], ref_runner.capture()))
    torch.testing.assert_close(seen[1], torch.cat([x.hidden for x in expected]), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(seen[1], hidden[2], atol=1e-3)  # hidden[2] is after the final norm


def test_options_are_validated():
    with pytest.raises(ValueError, match="base 'obs'"):
        SDSConfig(pattern="2:4", base="obs")
    with pytest.raises(ValueError, match="blocksize: SparseGPT solver options, but base is 'wanda'"):
        SDSConfig(pattern="2:4", base="wanda", blocksize=64)
    with pytest.raises(ValueError, match="allocation 'owl'"):
        SDSConfig(sparsity=0.5, allocation="owl")
    with pytest.raises(ValueError, match="regularizer 'l0'"):
        SDSConfig(pattern="2:4", regularizer="l0")
    with pytest.raises(ValueError, match="target 'layer'"):
        SDSConfig(pattern="2:4", target="layer")
    with pytest.raises(ValueError, match="iterations 0"):
        SDSConfig(pattern="2:4", iterations=0)
    with pytest.raises(ValueError, match="set exactly one"):
        SDSConfig()
    with pytest.raises(ValueError, match="pattern"):
        SDSConfig(pattern="4:2")
    with pytest.raises(RecipeError, match=r"variants\[0\]\.passes\[0\]\.sds\.recon_lr"):
        build_dataclass(SDSConfig, {"pattern": "2:4", "recon_lr": "fast"}, "variants[0].passes[0].sds")
    with pytest.raises(RecipeError, match="unknown key"):
        build_dataclass(SDSConfig, {"pattern": "2:4", "base_options": {}}, "variants[0].passes[0].sds")
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="leaves none to reconstruct"):
        SDSPass(SDSConfig(pattern="2:4", batch_size=8, holdout_batches=1)).run(model, _ctx(model))


def test_sds_masked_recovery_after_the_final_pruning():
    """``reconstruct: block`` on SDS: the final sparse block's kept weights are trained with the mask fixed —
    the pattern survives, the held-out error does not grow (a worse recovery is undone), and it is measured."""
    ids = torch.randint(0, VOCAB, (24, 64), generator=torch.Generator().manual_seed(6))
    kw = dict(pattern="2:4", blocksize=16, batch_size=4, recon_steps=20, recon_lr=1e-3, holdout_batches=1)
    plain, model = tiny_model("llama"), tiny_model("llama")
    base = SDSPass(SDSConfig(**kw)).run(plain, PassContext(adapter_for(plain.config), calibration=lambda: ids, progress=False))
    res = SDSPass(SDSConfig(**kw, reconstruct="block", reconstruct_steps=30)).run(
        model, PassContext(adapter_for(model.config), calibration=lambda: ids, progress=False))
    adapter = adapter_for(model.config)
    for ref, ref0 in zip(adapter.linears(model), adapter.linears(plain)):
        assert is_nm_sparse(ref.weight_out_in(), 2, 4), ref.name
        # the recovery never revives a pruned weight: same zeros as SDS without it, on the first block
        # (later blocks see different inputs, so their masks may differ)
        if ".0." in ref.name:
            assert torch.equal(ref.weight_out_in() == 0, ref0.weight_out_in() == 0), ref.name
    assert res.info["recover"] == "block" and res.info["seconds"]["recover"] > 0
    trained = 0
    for b, rec in res.info["blocks"].items():
        r = rec["recover"]
        assert r["holdout_after"] <= r["holdout_before"] or r.get("undone"), (b, r)
        assert rec["sparse1"]["holdout"] == pytest.approx(min(r["holdout_after"], r["holdout_before"]), rel=1e-4), (b, rec)
        trained += r["block"]["loss_last"] < r["block"]["loss_first"]
    assert trained, res.info["blocks"]  # at least one block's training loss fell
    b0 = res.info["blocks"]["0"]
    assert b0["sparse1"]["holdout"] <= base.info["blocks"]["0"]["sparse1"]["holdout"] * (1 + 1e-5)


def test_sds_variant_through_the_whole_build(tiny_dirs, text_file, tmp_path):
    """An SDS 2:4 variant: pruned, exported, built for ONNX Runtime, engine perplexity equal to
    PyTorch's, the ONNX passing polygraphy's 2:4 check on every pruned weight, SDS facts in
    results.json and the report."""
    import onnx
    from polygraphy.tools.sparse import SparsityPruner
    from test_build import tiny_recipe

    from pipeline.build import build

    out = tmp_path / "b"
    variants = [{"name": "sds-2of4", "passes": [{"sds": {"pattern": "2:4", "blocksize": 16, "recon_steps": 6, "batch_size": 1, "holdout_batches": 1}}]}]
    summary = build(tiny_recipe(tiny_dirs["llama"], text_file, out, variants=variants))
    v = summary.results["variants"][1]
    eng = v["engines"]["onnxruntime-cpu"]
    assert eng["status"] == "ok" and abs(eng["perplexity_engine_vs_torch"]) < 1e-3
    assert eng["size"]["block_linear_sparsity"] == pytest.approx(0.5, abs=1e-3)
    (pr,) = v["pass_results"]
    assert pr["name"] == "sds" and set(pr["info"]["blocks"]) == {"0", "1"}
    pruner = SparsityPruner(onnx.load(str(out / "sds-2of4" / "onnx" / "model.onnx")))
    pruner.check()
    block_weights = {n for n in pruner.prune_infos if n.startswith("model.layers.")}
    assert len(block_weights) == 2 * 7 and block_weights <= pruner.sparse_tensors
    md = (out / "report.md").read_text()
    assert "## SDS (sparse → dense → sparse)" in md and "**sds-2of4**: SDS over sparsegpt (2:4)" in md
    assert "SDS over sparsegpt" in (out / "report.html").read_text()
