"""Channel permutation before N:M selection (passes/permute.py): the search by hand, GQA-exact folding
into the producing linears (a block computes the same function), and the pass option."""

from __future__ import annotations

import pytest
import torch

from calibrate.stats import InputNormCollector
from core.adapters import adapter_for
from core.masks import is_nm_sparse
from passes import PassContext
from passes.permute import head_permutation, kept_importance, kv_rows, nm_permutation, permute_block
from passes.sparsegpt import SparseGPTConfig, SparseGPTPass
from passes.wanda import WandaConfig, WandaPass
from calibrate.sensitivity import diag_saliency
from tests.conftest import VOCAB, tiny_model


def test_clustered_channels_are_spread_out():
    # four important channels side by side: 2:4 keeps two of them (10+10) and two small ones (1+1) = 22;
    # spread one pair per group, it keeps all four: 40
    scores = torch.tensor([[10.0, 10.0, 10.0, 10.0, 1.0, 1.0, 1.0, 1.0]])
    assert kept_importance(scores, 2, 4) == 22.0
    perm = nm_permutation(scores, 2, 4)
    assert sorted(perm.tolist()) == list(range(8))
    assert kept_importance(scores[:, perm], 2, 4) == 40.0


def test_identity_when_nothing_is_gained():
    scores = torch.tensor([[10.0, 10.0, 1.0, 1.0, 10.0, 10.0, 1.0, 1.0]])
    assert torch.equal(nm_permutation(scores, 2, 4), torch.arange(8))


@pytest.mark.parametrize("seed", range(4))
def test_search_never_loses_importance(seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(40, 64, generator=g) * torch.rand(64, generator=g).pow(3)
    perm = nm_permutation(scores, 2, 4)
    assert sorted(perm.tolist()) == list(range(64))
    assert kept_importance(scores[:, perm], 2, 4) >= kept_importance(scores, 2, 4)


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (3, 8)])
def test_gain_is_the_exact_rise_of_the_kept_sum(n, m):
    # the search's gain of adding a value to a group that already keeps n (relu(value - n-th largest))
    # equals the rise of the sum of the n largest, computed the slow way
    g = torch.Generator().manual_seed(n * 10 + m)
    for k in range(n, m):
        held = torch.rand(5, 7, k, generator=g)
        cand = torch.rand(5, 7, generator=g)
        slow = torch.cat([held, cand[..., None]], -1).topk(n, dim=-1).values.sum(-1) - held.topk(n, dim=-1).values.sum(-1)
        fast = (cand - held.topk(n, dim=-1).values[..., -1]).clamp_min(0)
        assert torch.allclose(slow, fast, atol=1e-6)
    # and the search uses it: on a case where one order is clearly best, it finds it
    scores = torch.tensor([[9.0, 8.0, 7.0, 6.0, 0.1, 0.2, 0.3, 0.4]] * 3)
    perm = nm_permutation(scores, 2, 4)
    assert kept_importance(scores[:, perm], 2, 4) == pytest.approx(90.0)  # 9+8+7+6 per row (identity: 17.7)


def test_head_permutation_is_shared_within_a_kv_group():
    g = torch.Generator().manual_seed(1)
    heads, kv, d = 4, 2, 8
    order = head_permutation(torch.rand(6, heads * d, generator=g), 2, 4, heads, kv)
    blocks = order.reshape(heads, d) - torch.arange(heads)[:, None] * d
    assert torch.equal(blocks[0], blocks[1]) and torch.equal(blocks[2], blocks[3])  # query heads of one KV head
    assert torch.equal(kv_rows(order, heads, kv).reshape(kv, d) - torch.arange(kv)[:, None] * d, blocks[::2])


def _wanda_saliency(weights, col):
    h = col.sq_norms().double()
    return [diag_saliency(w, h) for w in weights], h, "row"


def test_folding_keeps_the_block_function():
    model = tiny_model("llama")  # 4 query heads, 2 KV heads (GQA)
    adapter = adapter_for(model.config)
    block = adapter.blocks(model)[0]
    refs = adapter.linears(model, blocks=[0])
    g = torch.Generator().manual_seed(2)
    cols = {}
    for r in refs:  # skewed input statistics, so the search has something to gain
        c = InputNormCollector(r.in_features)
        c.add(torch.randn(50, r.in_features, generator=g) * torch.rand(r.in_features, generator=g).pow(4) * 5)
        cols[r.name] = c
    norms_before = {r.role: cols[r.name].norms().clone() for r in refs}
    x = torch.randn(2, 16, 64, generator=g)
    pos = torch.arange(16)[None].expand(2, -1)
    rope = model.model.rotary_emb(x, pos)
    with torch.no_grad():
        before = block(x, position_embeddings=rope)[0]
        info = permute_block(refs, cols, _wanda_saliency, (2, 4), head_dim=16)
        after = block(x, position_embeddings=rope)[0]
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    assert set(info) == {"down", "o"}
    for role, kept in info.items():
        assert kept["kept_after"] > kept["kept_before"]
    by_role = {r.role: r for r in refs}
    assert not torch.equal(cols[by_role["down"].name].norms(), norms_before["down"])  # statistics follow the weights
    assert torch.equal(torch.sort(cols[by_role["down"].name].norms()).values, torch.sort(norms_before["down"]).values)


@pytest.mark.parametrize("cls,cfg_cls", [(WandaPass, WandaConfig), (SparseGPTPass, SparseGPTConfig)])
def test_pass_option(cls, cfg_cls):
    ids = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(4))
    model = tiny_model("llama")
    adapter = adapter_for(model.config)
    opts = {"blocksize": 16} if cls is SparseGPTPass else {}
    res = cls(cfg_cls(pattern="2:4", permute=True, calibration_dtype="float32", **opts)).run(model, PassContext(adapter, calibration=lambda: ids, progress=False))
    assert sorted(res.info["permute"]) == ["0", "1"]
    assert all(k["kept_after"] >= k["kept_before"] for b in res.info["permute"].values() for k in b.values())
    assert all(is_nm_sparse(r.weight_out_in(), 2, 4) for r in adapter.linears(model))
    with pytest.raises(ValueError, match="needs 'pattern'"):
        cfg_cls(sparsity=0.5, permute=True)
