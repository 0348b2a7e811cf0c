"""Per-block sparsity allocation (OWL) for the one-shot passes: hand-computed cases, properties,
and the passes at the same overall sparsity."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from core.adapters import adapter_for
from passes import PassContext
from passes.allocation import allocate, outlier_ratio, owl_sparsities
from passes.sparsegpt import SparseGPTConfig, SparseGPTPass
from passes.wanda import WandaConfig, WandaPass


def test_outlier_ratio_by_hand():
    # mean of [1,1,1,1,1,1,1,1,1,11] is 2; m=5 → threshold 10: one entry of ten is above
    assert outlier_ratio([torch.ones(9), torch.tensor([11.0])], 5.0) == pytest.approx(0.1)
    assert outlier_ratio([torch.ones(4)], 0.5) == 1.0


def test_owl_sparsities_by_hand():
    # LOD 0.1, 0.2, 0.3 → scaled onto [0, 2λ] = 0, 0.08, 0.16; mean 0.08; keep = that − 0.08 + 0.3
    assert owl_sparsities([0.1, 0.2, 0.3], target=0.7, lam=0.08) == pytest.approx([0.78, 0.70, 0.62])
    assert owl_sparsities([0.5, 0.5], target=0.6, lam=0.1) == pytest.approx([0.6, 0.6])  # no spread without differences
    with pytest.raises(ValueError, match="outside"):
        owl_sparsities([0.0, 1.0], target=0.95, lam=0.2)


@settings(max_examples=200, deadline=None)
@given(
    lod=st.lists(st.floats(0, 1), min_size=1, max_size=40),
    target=st.floats(0.2, 0.8),
    lam_frac=st.floats(0, 1),
    data=st.data(),
)
def test_owl_hits_the_weighted_target_within_its_band(lod, target, lam_frac, data):
    lam = lam_frac * min(target, 1 - target) * 0.99
    sizes = data.draw(st.lists(st.integers(1, 10_000), min_size=len(lod), max_size=len(lod)))
    try:
        sp = owl_sparsities(lod, target, lam, sizes)
    except ValueError:
        return  # unequal sizes can push a block past [0, 1); refused, never silently clipped
    assert sum(s * n for s, n in zip(sp, sizes)) / sum(sizes) == pytest.approx(target, abs=1e-9)
    assert max(sp) - min(sp) <= 2 * lam + 1e-9
    assert all(target - 2 * lam - 1e-9 <= s <= target + 2 * lam + 1e-9 for s in sp)
    # more outliers, lower sparsity
    order = sorted(range(len(lod)), key=lambda i: lod[i])
    assert all(sp[order[i]] >= sp[order[i + 1]] - 1e-12 for i in range(len(order) - 1))


@pytest.mark.parametrize("cls,cfg_cls", [(WandaPass, WandaConfig), (SparseGPTPass, SparseGPTConfig)])
def test_owl_pass_keeps_the_overall_sparsity_and_spreads_blocks(cls, cfg_cls):
    from conftest import tiny_model

    model = tiny_model("llama")
    # make block 1 outlier-heavy: a few large weights in every linear
    with torch.no_grad():
        for lin in model.model.layers[1].modules():
            if isinstance(lin, torch.nn.Linear):
                lin.weight[:, :2] *= 40
    windows = torch.randint(0, 257, (4, 32), generator=torch.Generator().manual_seed(0))
    adapter = adapter_for(model.config)
    ctx = PassContext(adapter, calibration=lambda: windows, progress=False)
    uniform = copy.deepcopy(model)
    cls(cfg_cls(sparsity=0.6, calibration_dtype="float32")).run(uniform, ctx)
    owl = copy.deepcopy(model)
    r = cls(cfg_cls(sparsity=0.6, allocation="owl", owl_lambda=0.1, owl_m=3.0, calibration_dtype="float32")).run(owl, ctx)
    alloc = r.info["allocation"]
    assert alloc["outlier_ratio"]["1"] > alloc["outlier_ratio"]["0"]
    assert alloc["block_sparsity"]["1"] < alloc["block_sparsity"]["0"]  # the outlier-heavy block is pruned less
    zeros = lambda m: sum(int((x.weight_out_in() == 0).sum()) for x in adapter.linears(m))  # noqa: E731
    total = sum(x.weight_out_in().numel() for x in adapter.linears(model))
    assert zeros(owl) / total == pytest.approx(0.6, abs=0.01)  # same overall sparsity, measured from the weights
    assert abs(zeros(owl) - zeros(uniform)) / total < 0.01


def test_allocation_options_are_validated():
    with pytest.raises(ValueError, match="needs 'sparsity', not 'pattern'"):
        WandaConfig(pattern="2:4", allocation="owl")
    with pytest.raises(ValueError, match="owl_lambda 0.5 is outside"):
        WandaConfig(sparsity=0.7, allocation="owl", owl_lambda=0.5)
    with pytest.raises(ValueError, match="not one of uniform, owl, sensitivity"):
        WandaConfig(sparsity=0.7, allocation="magic")
    with pytest.raises(ValueError, match="sensitivity_unit .row. is not one of block, input, matrix"):
        WandaConfig(sparsity=0.7, allocation="sensitivity", sensitivity_unit="row")
    with pytest.raises(ValueError, match="sensitivity_measure"):
        SparseGPTConfig(sparsity=0.7, allocation="sensitivity", sensitivity_measure="fisher")
    with pytest.raises(ValueError, match="sensitivity_deviation 0.6 is outside"):
        SparseGPTConfig(sparsity=0.7, allocation="sensitivity", sensitivity_deviation=0.6)
    with pytest.raises(ValueError, match=r"sensitivity_bounds \[0.75, 0.9\] must satisfy"):
        SparseGPTConfig(sparsity=0.7, allocation="sensitivity", sensitivity_bounds=[0.75, 0.9])
    with pytest.raises(ValueError, match="list of two numbers"):
        SparseGPTConfig(sparsity=0.7, allocation="sensitivity", sensitivity_bounds=[0.5])
    with pytest.raises(ValueError, match="hutchinson_samples 0"):
        SparseGPTConfig(sparsity=0.7, allocation="sensitivity", hutchinson_samples=0)
    assert SparseGPTConfig(sparsity=0.7, allocation="sensitivity", sensitivity_deviation=0.2).sparsity_range() == pytest.approx((0.5, 0.9))
    assert SparseGPTConfig(sparsity=0.9, allocation="sensitivity", sensitivity_deviation=0.2).sparsity_range() == pytest.approx((0.7, 0.99))


# --- sensitivity allocation -------------------------------------------------------------------


def test_allocate_by_hand():
    # two units of 100 parameters, grid 0, .5, 1; unit 0 costs 1 per half, unit 1 costs 10 then 20
    sp = allocate([[0, 1, 2], [0, 10, 30]], [100, 100], 0.5, [0, 0], [1, 1])
    assert sp == pytest.approx([1.0, 0.0])  # all the budget goes to the cheap unit
    sp = allocate([[0, 1, 2], [0, 10, 30]], [100, 100], 0.5, [0, 0], [0.75, 1])
    assert sp == pytest.approx([0.75, 0.25])  # its bound stops it; the rest goes to the other
    sp = allocate([[0, 1, 2], [0, 10, 30]], [300, 100], 0.5, [0.5, 0.5], [0.5, 0.5])
    assert sp == pytest.approx([0.5, 0.5])  # fixed units stay fixed
    with pytest.raises(ValueError, match="outside what the bounds allow"):
        allocate([[0, 1, 2], [0, 1, 2]], [1, 1], 0.8, [0, 0], [0.6, 0.6])


@settings(max_examples=300, deadline=None)
@given(
    n=st.integers(1, 12),
    target=st.floats(0.05, 0.95),
    dev=st.floats(0.0, 0.3),
    data=st.data(),
)
def test_allocate_hits_the_exact_parameter_target_within_bounds(n, target, dev, data):
    g = 10
    sizes = data.draw(st.lists(st.integers(1, 5_000_000), min_size=n, max_size=n))
    curves = []
    for _ in range(n):
        inc = data.draw(st.lists(st.floats(0, 1e3), min_size=g, max_size=g))
        c = [0.0]
        for x in inc:
            c.append(c[-1] + x)
        curves.append(c)
    lo = [max(0.0, target - dev)] * n
    hi = [min(1.0, target + dev)] * n
    sp = allocate(curves, sizes, target, lo, hi)
    assert sum(s * z for s, z in zip(sp, sizes)) / sum(sizes) == pytest.approx(target, abs=1e-9)
    assert all(l - 1e-12 <= s <= h + 1e-12 for s, l, h in zip(sp, lo, hi))
    # no cheaper reallocation: moving a small amount from any unit to any other cannot lower the
    # total estimated loss (first order), for convex curves
    def cost(u, s):
        x = s * g
        k = min(int(x), g - 1)
        return curves[u][k] + (x - k) * (curves[u][k + 1] - curves[u][k])

    if all(all(c[k + 2] - c[k + 1] >= c[k + 1] - c[k] for k in range(g - 1)) for c in curves):
        base = sum(cost(u, s) for u, s in enumerate(sp))
        eps = 1e-4
        for a in range(n):
            for b in range(n):
                if a == b:
                    continue
                da = eps / sizes[a]
                db = eps / sizes[b]
                if sp[a] + da <= hi[a] and sp[b] - db >= lo[b]:
                    moved = base + cost(a, sp[a] + da) - cost(a, sp[a]) + cost(b, sp[b] - db) - cost(b, sp[b])
                    assert moved >= base - 1e-6 * max(1.0, base)


def test_the_more_sensitive_layer_gets_the_lower_sparsity():
    """Two linears on one input: in B, 90 % of the weights are tiny, so pruning up to 90 % of B costs
    almost nothing, while every weight of A matters. B must get the higher sparsity, A the lower."""
    from calibrate.sensitivity import diag_saliency, error_curve
    from passes.sparsegpt import obs_saliency

    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 64, generator=g)
    H = 2 * x.T @ x / x.shape[0]
    a = torch.randn(64, 64, generator=g)
    b = a.clone()
    b[torch.rand(64, 64, generator=g) < 0.9] *= 0.01
    for name, sal in (("obs", lambda w: obs_saliency([w], H)[0]), ("diag", lambda w: diag_saliency(w, torch.diagonal(H)))):
        ca = error_curve("a", 0, "q", a, sal(a), torch.diagonal(H), "matrix")
        cb = error_curve("b", 0, "k", b, sal(b), torch.diagonal(H), "matrix")
        curves = [(ca.curve / ca.energy).tolist(), (cb.curve / cb.energy).tolist()]
        sp = allocate(curves, [a.numel(), b.numel()], 0.6, [0.3, 0.3], [0.9, 0.9])
        assert sp[1] > 0.8 and sp[0] < 0.4, (name, sp)
        assert (sp[0] + sp[1]) / 2 == pytest.approx(0.6)


@pytest.mark.parametrize("cls,cfg_cls", [(WandaPass, WandaConfig), (SparseGPTPass, SparseGPTConfig)])
@pytest.mark.parametrize("opts", [{}, {"sensitivity_unit": "input"}, {"sensitivity_measure": "relative", "sensitivity_unit": "matrix"}, {"sensitivity_measure": "relative"}, {"sensitivity_measure": "hutchinson", "sensitivity_unit": "matrix", "hutchinson_samples": 2}, {"sensitivity_resolve": False}])
def test_sensitivity_pass_keeps_the_overall_sparsity_within_bounds(cls, cfg_cls, opts):
    from conftest import tiny_model

    model = tiny_model("llama")
    with torch.no_grad():  # block 1: most weights tiny, so it is the cheap one to prune
        for lin in model.model.layers[1].modules():
            if isinstance(lin, torch.nn.Linear):
                lin.weight[:, 2:] *= 0.05
    windows = torch.randint(0, 257, (4, 32), generator=torch.Generator().manual_seed(0))
    adapter = adapter_for(model.config)
    ctx = PassContext(adapter, calibration=lambda: windows, progress=False)
    m = copy.deepcopy(model)
    r = cls(cfg_cls(sparsity=0.6, allocation="sensitivity", sensitivity_deviation=0.15, calibration_dtype="float32", **opts)).run(m, ctx)
    alloc = r.info["allocation"]
    assert alloc["method"] == "sensitivity" and alloc["allocated_sparsity"] == pytest.approx(0.6, abs=1e-6)
    lin = adapter.linears(m)
    total = sum(x.weight_out_in().numel() for x in lin)
    zeros = sum(int((x.weight_out_in() == 0).sum()) for x in lin)
    assert zeros / total == pytest.approx(0.6, abs=0.005)  # measured from the weights
    for x in lin:
        s = float((x.weight_out_in() == 0).float().mean())
        assert 0.45 - 0.02 <= s <= 0.75 + 0.02, (x.name, s)
        assert alloc["matrix_sparsity"][x.name] == pytest.approx(s, abs=0.02)
    # block 1 is the cheap one to prune by its relative output error (its weights are tiny). (The
    # measured loss of a random model is no guide: pruning it often lowers the loss.)
    if opts.get("sensitivity_measure") == "relative":
        assert alloc["block_sparsity"]["1"] > alloc["block_sparsity"]["0"]
    if opts.get("sensitivity_measure", "loss") == "loss":
        points = alloc["delta_loss_dense"]
        if opts.get("sensitivity_unit") == "input":
            # one curve per group of linears sharing an input, each group one sparsity
            assert sorted(points) == sorted(f"{b}:{g}" for b in range(len(adapter.blocks(m))) for g in ("q+k+v", "o", "gate+up", "down"))
            sp = alloc["matrix_sparsity"]
            for b in range(len(adapter.blocks(m))):
                same = {round(sp[x.name], 9) for x in lin if x.name.startswith(f"model.layers.{b}.") and x.role in ("q", "k", "v")}
                assert len(same) == 1, (b, same)
            # finer than per block: some block's groups got different sparsities
            assert any(len({round(sp[x.name], 6) for x in lin if x.name.startswith(f"model.layers.{b}.")}) > 1 for b in range(len(adapter.blocks(m)))), sp
        else:
            assert len(points["0"]) == 3 and all(len(p) == 2 for p in points["0"])
        assert ("delta_loss_pruned_inputs" in alloc) == opts.get("sensitivity_resolve", True)



def test_sensitivity_variant_through_the_whole_build(tiny_dirs, text_file, tmp_path):
    """A recipe variant with sensitivity allocation: pruned, exported, engine-validated, and its
    per-layer sparsities (measured) in results.json, plotted by block and role in the report."""
    from test_build import tiny_recipe

    from pipeline.build import build

    out = tmp_path / "b"
    variants = [{"name": "wanda60-sens", "passes": [{"wanda": {"sparsity": 0.6, "allocation": "sensitivity", "sensitivity_deviation": 0.15}}]}]
    summary = build(tiny_recipe(tiny_dirs["llama"], text_file, out, variants=variants))
    v = summary.results["variants"][1]
    assert v["engines"]["onnxruntime-cpu"]["status"] == "ok"
    assert v["engines"]["onnxruntime-cpu"]["size"]["block_linear_sparsity"] == pytest.approx(0.6, abs=0.01)
    (pr,) = v["pass_results"]
    alloc = pr["info"]["allocation"]
    assert alloc["method"] == "sensitivity" and len(alloc["matrix_sparsity"]) == len(pr["layers"])
    spread = [layer["sparsity"] for layer in pr["layers"]]
    assert max(spread) - min(spread) > 0.01  # really mixed
    assert all(0.45 - 0.02 <= s <= 0.75 + 0.02 for s in spread)
    assert (out / "sparsity_wanda60-sens.png").is_file()
    md = (out / "report.md").read_text()
    assert "## Mixed sparsity" in md and "sensitivity (loss measure, one sparsity per block" in md
    assert "sparsity by block and role: wanda60-sens" in (out / "report.html").read_text()


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2"])
def test_loss_from_block_equals_the_full_model_loss_on_true_inputs(family):
    """Feeding block b its true inputs and running the rest must give the model's own loss; changing
    block b's weights must change it. Gemma 2 alternates sliding-window (block 0) and global (block 1)
    attention: with windows (40) past its window (16), block 1 must still get the global mask."""
    from conftest import tiny_model

    from calibrate.runner import LayerwiseRunner
    from calibrate.sensitivity import loss_from_block

    model = tiny_model(family)
    adapter = adapter_for(model.config)
    ids = torch.randint(0, 257, (2, 40), generator=torch.Generator().manual_seed(1))
    seen = {}
    handle = adapter.blocks(model)[1].register_forward_pre_hook(lambda m, a: seen.setdefault("h", a[0].detach().clone()))
    with torch.no_grad():
        full = float(model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids, use_cache=False).loss)
    handle.remove()
    runner = LayerwiseRunner(model, adapter, ids, batch_size=2, show_progress=False)
    runner.capture()  # learns whether the family's blocks return tuples
    tuple_out = runner.tuple_out
    assert loss_from_block(model, adapter, 1, seen["h"], ids, tuple_out) == pytest.approx(full, rel=1e-5)
    assert len(adapter.blocks(model)) == 2  # the block list is restored
    with torch.no_grad():
        adapter.linears(model, blocks=[1])[0].weight_out_in().mul_(0)
    assert loss_from_block(model, adapter, 1, seen["h"], ids, tuple_out) != pytest.approx(full, rel=1e-4)
    with pytest.raises(ValueError, match="do not match windows"):
        loss_from_block(model, adapter, 1, seen["h"][:1], ids, tuple_out)
