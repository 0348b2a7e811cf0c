"""DSnoT prune-and-grow (passes/dsnot.py): hand-worked swaps, invariants on random matrices, and the
Wanda pass option end to end on a tiny model."""

from __future__ import annotations

import pytest
import torch

from core.masks import is_nm_sparse
from passes.dsnot import dsnot_refine
from passes.wanda import WandaConfig, WandaPass, wanda_mask, wanda_scores

ONES = torch.ones(4, dtype=torch.float64)


def _error(w, keep, mean):
    return (w.double() * mean.double()[None, :] * (~keep)).sum(1)


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_hand_worked_swap(nm):
    # pruned contributions 0.2 and 0.5: e = 0.7. Grow the 0.5 (largest, same sign); prune the kept -0.1
    # (the only kept weight of opposite sign / the least important one of the group): e = 0.1. Then the
    # 0.2 would grow back, but no kept weight can go without overshooting (unstructured: none of
    # opposite sign left; 2:4: pruning the 1.0 would raise |e| to 0.9): the row stops.
    w = torch.tensor([[1.0, 0.2, 0.5, -0.1]])
    keep = torch.tensor([[True, False, False, True]])
    new, stats = dsnot_refine(w, keep, w.abs(), ONES, ONES, nm=nm, threshold=0.05)
    assert new.tolist() == [[True, False, True, False]]
    assert stats.swaps == 1 and stats.rows_changed == 1
    assert stats.error_before == pytest.approx(0.7) and stats.error_after == pytest.approx(0.1)


def test_variance_ranks_the_weight_grown_back():
    # same contributions as above, but channel 2 is noisy (variance 100): the steadier channel 1 grows back
    w = torch.tensor([[1.0, 0.2, 0.5, -0.1]])
    keep = torch.tensor([[True, False, False, True]])
    var = torch.tensor([1.0, 1.0, 100.0, 1.0], dtype=torch.float64)
    new, stats = dsnot_refine(w, keep, w.abs(), ONES, var, threshold=0.05)
    assert new.tolist() == [[True, True, False, False]]
    assert stats.error_after == pytest.approx(0.4)


def test_threshold_leaves_small_errors_alone():
    w = torch.tensor([[1.0, 0.2, 0.5, -0.1]])
    keep = torch.tensor([[True, False, False, True]])
    new, stats = dsnot_refine(w, keep, w.abs(), ONES, ONES, threshold=1.0)
    assert torch.equal(new, keep) and stats.swaps == 0


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("nm", [None, (2, 4), (4, 8)])
def test_invariants_on_random_matrices(seed, nm):
    g = torch.Generator().manual_seed(seed)
    rows, cols = 33, 64
    w = torch.randn(rows, cols, generator=g)
    x = torch.randn(500, cols, generator=g) * torch.rand(cols, generator=g) * 3 + torch.randn(cols, generator=g)
    norms = x.pow(2).sum(0).sqrt()
    keep = wanda_mask(w, norms, None if nm else 0.5, nm)
    mean, var = x.double().mean(0), x.double().var(0, unbiased=False)
    new, stats = dsnot_refine(w, keep, wanda_scores(w, norms), mean, var, nm=nm, threshold=0.0)
    assert torch.equal(new.sum(1), keep.sum(1))  # every row keeps as many weights
    if nm:
        assert is_nm_sparse(w * new, *nm)
    before, after = _error(w, keep, mean), _error(w, new, mean)
    assert bool((after.abs() <= before.abs() + 1e-12).all())  # no row's expected error grows
    assert bool((torch.sign(after) * torch.sign(before) >= 0).all())  # nor flips sign
    assert stats.swaps == int((new & ~keep).sum()) > 0
    assert stats.error_after == pytest.approx(float(after.abs().mean()))
    assert stats.error_after < stats.error_before


def test_bad_shapes_are_refused():
    w = torch.randn(4, 8)
    with pytest.raises(ValueError, match="input statistics"):
        dsnot_refine(w, torch.ones(4, 8, dtype=torch.bool), w.abs(), torch.ones(7), torch.ones(8))
    with pytest.raises(ValueError, match="multiple of M"):
        dsnot_refine(torch.randn(4, 6), torch.ones(4, 6, dtype=torch.bool), torch.ones(4, 6), torch.ones(6), torch.ones(6), nm=(2, 4))


def test_config_checks():
    with pytest.raises(ValueError, match="dsnot_cycles"):
        WandaConfig(pattern="2:4", dsnot=True, dsnot_cycles=0)
    with pytest.raises(ValueError, match="dsnot_threshold"):
        WandaConfig(pattern="2:4", dsnot=True, dsnot_threshold=-1.0)


@pytest.mark.parametrize("opts", [{"pattern": "2:4"}, {"sparsity": 0.5}])
def test_wanda_pass_with_dsnot(opts):
    from tests.conftest import VOCAB, tiny_model
    from core.adapters import adapter_for
    from passes import PassContext

    ids = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(4))
    plain, refined = tiny_model("llama"), tiny_model("llama")
    adapter = adapter_for(plain.config)
    WandaPass(WandaConfig(**opts, calibration_dtype="float32")).run(plain, PassContext(adapter, calibration=lambda: ids, progress=False))
    res = WandaPass(WandaConfig(**opts, calibration_dtype="float32", dsnot=True, dsnot_threshold=0.0)).run(refined, PassContext(adapter, calibration=lambda: ids, progress=False))
    facts = {n: f for group in res.info["layers"].values() for n, f in group["dsnot"].items()}
    assert sum(f["dsnot_swaps"] for f in facts.values()) > 0
    for a, b in zip(adapter.linears(plain), adapter.linears(refined)):
        wa, wb = a.weight_out_in(), b.weight_out_in()
        assert torch.equal((wa == 0).sum(1), (wb == 0).sum(1))  # same count per row
        if "pattern" in opts:
            assert is_nm_sparse(wb, 2, 4)
    assert any(not torch.equal(a.weight_out_in() == 0, b.weight_out_in() == 0) for a, b in zip(adapter.linears(plain), adapter.linears(refined)))
