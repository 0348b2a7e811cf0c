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
from passes.allocation import outlier_ratio, owl_sparsities
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
    with pytest.raises(ValueError, match="not built yet"):
        SparseGPTConfig(sparsity=0.7, allocation="sensitivity")
    with pytest.raises(ValueError, match="not one of uniform, owl"):
        WandaConfig(sparsity=0.7, allocation="magic")
