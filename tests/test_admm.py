"""ADMM pattern pruning + SR-STE: the pattern projections, one ADMM iteration, the final SR-STE
projection, resume from a checkpoint, option checks."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from core.adapters import adapter_for
from core.masks import PatternSet, is_nm_sparse, nm_mask
from passes import PassContext
from passes.admm import ADMMConfig, ADMMHook, ADMMPass, _Target
from tests.conftest import FAMILIES, VOCAB, tiny_model

IDS = torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(7))
SPECS = ["2:4", "4:8", "1:4", "tile2x4:3", "tile4x4:8", "tile1x8:2"]


def _ctx(model, teacher, work_dir=None):
    return PassContext(adapter_for(model.config), calibration=lambda: IDS, progress=False, teacher=lambda: teacher, work_dir=work_dir)


@settings(max_examples=60, deadline=None)
@given(spec=st.sampled_from(SPECS), rows=st.integers(1, 4), cols=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_projection_is_a_member_idempotent_and_nearest(spec, rows, cols, seed):
    p = PatternSet(spec)
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows * p.rows * 2, cols * p.cols, generator=g)
    q = p.project(w)
    assert p.contains(q)
    assert torch.equal(p.project(q), q)  # idempotent
    kept = (q != 0).sum()
    assert int(kept) == w.numel() // (p.rows * p.cols) * p.keep  # randn has no exact zeros: every group full
    # nearest: no other member with the same support size is closer (random members of the set)
    for _ in range(5):
        other = w * p.mask(torch.rand(w.shape, generator=g))
        assert p.contains(other)
        assert (w - q).norm() <= (w - other).norm() + 1e-6


def test_nm_projection_matches_the_mask_utilities_and_tile_groups_are_tiles():
    w = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
    assert torch.equal(PatternSet("2:4").mask(w.abs()), nm_mask(w.abs(), 2, 4))
    t = PatternSet("tile2x2:1")
    q = t.project(torch.tensor([[1.0, 2.0, 0.5, 0.1], [3.0, -4.0, 0.2, -0.3]]))
    assert q.tolist() == [[0.0, 0.0, 0.5, 0.0], [0.0, -4.0, 0.0, 0.0]]  # tiles {1,2,3,-4} and {.5,.1,.2,-.3}
    assert not t.contains(torch.ones(2, 4)) and not t.contains(torch.ones(3, 4))  # 3 rows do not tile


@pytest.mark.parametrize("bad", ["2:2", "tile0x4:1", "tile2x2:4", "tile2x2", "2x4:1"])
def test_bad_patterns_are_refused(bad):
    with pytest.raises(ValueError, match="pattern"):
        PatternSet(bad)


def test_options_are_validated():
    with pytest.raises(ValueError, match="init 'sparsegpt' prunes N:M only"):
        ADMMConfig(pattern="tile4x4:8", init="sparsegpt")
    with pytest.raises(ValueError, match="rho"):
        ADMMConfig(rho=2.0, rho_max=1.0)
    with pytest.raises(ValueError, match="admm_fraction"):
        ADMMConfig(admm_fraction=1.0)
    with pytest.raises(ValueError, match="init 'x'"):
        ADMMConfig(init="x")
    with pytest.raises(ValueError, match="steps"):
        ADMMConfig(steps=1)


def test_admm_iterations_reduce_the_distance_to_the_pattern_set():
    model = tiny_model("llama")
    refs = adapter_for(model.config).linears(model)
    targets = [_Target(r.name, r.module, r.transposed) for r in refs]
    norms = {t.name: float(t.param.detach().pow(2).sum()) for t in targets}
    hook = ADMMHook(targets, PatternSet("2:4"), ADMMConfig(pattern="2:4", admm_interval=2, rho=0.5, rho_max=4.0), norms)
    dist = lambda: sum(float((t.param.detach() - hook.z[t.name]).norm()) for t in targets)  # noqa: E731
    before = dist()
    assert before > 0
    for step in range(6):  # three ADMM iterations of proximal W-steps alone (a zero task loss)
        hook.after_step(step)
    assert dist() < 0.5 * before
    s = hook.summary()
    assert s["iterations"] == 3 and s["primal_mean"][-1] < s["primal_mean"][0]
    assert s["rho"] == [0.5, 0.65, 0.845]


@pytest.mark.parametrize("family", FAMILIES)
def test_admm_srste_leaves_exactly_the_pattern(family):
    teacher = tiny_model(family)
    model = tiny_model(family)
    res = ADMMPass(ADMMConfig(pattern="2:4", init="magnitude", steps=8, admm_interval=2, mask_every=2, lr=1e-3, warmup_steps=1, batch_size=2, rho=0.1)).run(model, _ctx(model, teacher))
    adapter = adapter_for(model.config)
    for ref in adapter.linears(model):
        w = ref.weight_out_in()
        assert not hasattr(ref.module, "parametrizations")  # a plain module again, exportable as is
        assert is_nm_sparse(w, 2, 4), ref.name
        assert float((w == 0).float().mean()) >= 0.5
    assert res.info["admm"]["residuals"]["iterations"] == 2
    assert res.info["budget"]["admm_steps"] + res.info["budget"]["srste_steps"] == 8


@pytest.mark.parametrize("train_rest", [True, False])
def test_train_rest_trains_the_norms_as_distill_does_and_never_the_embeddings(train_rest):
    teacher = tiny_model("llama")
    model = tiny_model("llama")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ADMMPass(ADMMConfig(pattern="2:4", init="magnitude", steps=6, admm_interval=2, lr=1e-2, warmup_steps=0, batch_size=2, train_rest=train_rest)).run(model, _ctx(model, teacher))
    after = dict(model.named_parameters())
    norms = [n for n in before if "norm" in n]
    assert norms
    moved = [n for n in norms if not torch.equal(before[n], after[n])]
    assert (len(moved) == len(norms)) if train_rest else not moved, moved
    emb = [n for n in before if "embed" in n]
    assert emb and all(torch.equal(before[n], after[n]) for n in emb)


def test_srste_final_projection_keeps_only_the_masks_nonzeros():
    teacher = tiny_model("llama")
    model = tiny_model("llama")
    ADMMPass(ADMMConfig(pattern="tile2x4:3", init="dense", steps=6, admm_interval=3, mask_every=100, lr=1e-3, warmup_steps=0, batch_size=2)).run(model, _ctx(model, teacher))
    for ref in adapter_for(model.config).linears(model):
        assert PatternSet("tile2x4:3").contains(ref.weight_out_in()), ref.name


def test_resume_from_a_checkpoint_gives_the_uninterrupted_weights(tmp_path, monkeypatch):
    cfg = dict(pattern="2:4", init="wanda", steps=8, admm_interval=2, mask_every=2, lr=1e-3, warmup_steps=1, batch_size=2, checkpoint_every=3, rho=0.1)
    teacher = tiny_model("llama")
    full = tiny_model("llama")
    ADMMPass(ADMMConfig(**cfg)).run(full, _ctx(full, teacher, tmp_path / "a"))

    import passes.training as training

    real_save = training.Checkpoint.save
    calls = {"n": 0}

    def dying_save(self, meta, tensors):  # the build is killed right after the SR-STE phase's first checkpoint
        real_save(self, meta, tensors)
        if self.name == "srste-checkpoint":
            calls["n"] += 1
            raise KeyboardInterrupt

    killed = tiny_model("llama")
    monkeypatch.setattr(training.Checkpoint, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        ADMMPass(ADMMConfig(**cfg)).run(killed, _ctx(killed, teacher, tmp_path / "b"))
    monkeypatch.setattr(training.Checkpoint, "save", real_save)
    assert calls["n"] == 1
    resumed = tiny_model("llama")
    res = ADMMPass(ADMMConfig(**cfg)).run(resumed, _ctx(resumed, teacher, tmp_path / "b"))
    assert res.info["srste"]["resumed_from_step"] == 3 and res.info["admm"]["resumed_from_step"] == 4
    for (n, a), (_, b) in zip(full.named_parameters(), resumed.named_parameters()):
        assert torch.allclose(a, b, atol=1e-6, rtol=0), n


def test_admm_iterations_with_the_task_loss_shrink_the_primal_residual():
    teacher = tiny_model("llama")
    model = tiny_model("llama")
    res = ADMMPass(ADMMConfig(pattern="2:4", init="dense", steps=40, admm_fraction=0.8, admm_interval=4, rho=0.1, rho_max=1.0, lr=1e-3, warmup_steps=0, batch_size=2)).run(model, _ctx(model, teacher))
    r = res.info["admm"]["residuals"]
    assert r["iterations"] == 8
    assert r["primal_mean"][-1] < 0.5 * r["primal_mean"][0], r["primal_mean"]
    assert r["rho"] == sorted(r["rho"]) and r["rho"][-1] == pytest.approx(min(1.0, 0.1 * 1.3**7))


def test_recipe_options_are_checked_by_name():
    from core.errors import RecipeError
    from pipeline.schema import build_dataclass

    with pytest.raises(RecipeError, match=r"variants\[0\]\.passes\[0\]\.admm\.rho"):
        build_dataclass(ADMMConfig, {"rho": "high"}, "variants[0].passes[0].admm")
    with pytest.raises(RecipeError, match="unknown key"):
        build_dataclass(ADMMConfig, {"sparsity": 0.5}, "variants[0].passes[0].admm")
    model, teacher = tiny_model("llama"), tiny_model("llama")
    with pytest.raises(ValueError, match="does not split into 1 × 3 groups"):
        ADMMPass(ADMMConfig(pattern="1:3", init="dense")).run(model, _ctx(model, teacher))


def test_admm_variant_through_the_whole_build(tiny_dirs, text_file, tmp_path):
    """An ADMM + SR-STE 2:4 variant: trained, exported, built for ONNX Runtime, engine perplexity equal
    to PyTorch's, the ONNX passing polygraphy's 2:4 check on every pruned weight, the residuals in
    results.json and the report with its plot."""
    import onnx
    from polygraphy.tools.sparse import SparsityPruner
    from test_build import tiny_recipe

    from pipeline.build import build

    out = tmp_path / "b"
    variants = [{"name": "admm-2of4", "passes": [{"admm": {"pattern": "2:4", "init": "sparsegpt", "steps": 8, "admm_interval": 2, "batch_size": 1, "lr": 1e-3}}]}]
    summary = build(tiny_recipe(tiny_dirs["llama"], text_file, out, variants=variants))
    v = summary.results["variants"][1]
    eng = v["engines"]["onnxruntime-cpu"]
    assert eng["status"] == "ok" and abs(eng["perplexity_engine_vs_torch"]) < 1e-3
    assert eng["size"]["block_linear_sparsity"] == pytest.approx(0.5, abs=1e-3)
    (pr,) = v["pass_results"]
    assert pr["name"] == "admm" and pr["info"]["admm"]["residuals"]["iterations"] == 2
    pruner = SparsityPruner(onnx.load(str(out / "admm-2of4" / "onnx" / "model.onnx")))
    pruner.check()
    block_weights = {n for n in pruner.prune_infos if n.startswith("model.layers.")}
    assert len(block_weights) == 2 * 7 and block_weights <= pruner.sparse_tensors
    md = (out / "report.md").read_text()
    assert "## ADMM + SR-STE" in md and "**admm-2of4**: ADMM + SR-STE (2:4, init sparsegpt)" in md
    assert (out / "admm_residual_admm-2of4.png").stat().st_size > 1000
    assert "ADMM primal residual" in (out / "report.html").read_text()
