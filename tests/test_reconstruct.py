"""Block reconstruction after masking (passes/reconstruct.py) through the one-shot passes' option."""

from __future__ import annotations

import pytest
import torch

from core.adapters import adapter_for
from core.errors import OptionError
from passes import PassContext
from passes.base import DataFacts
from passes.sparsegpt import SparseGPTConfig, SparseGPTPass
from passes.wanda import WandaConfig, WandaPass
from tests.conftest import VOCAB, tiny_model

IDS = torch.randint(0, VOCAB, (12, 32), generator=torch.Generator().manual_seed(3))


def _prune(cls, cfg, family="llama"):
    model = tiny_model(family)
    adapter = adapter_for(model.config)
    res = cls(cfg).run(model, PassContext(adapter, calibration=lambda: IDS, progress=False))
    return model, adapter, res


@pytest.mark.parametrize("mode", ["block", "sublayer"])
@pytest.mark.parametrize("cls,cfg_cls,opts", [(WandaPass, WandaConfig, {"pattern": "2:4"}), (SparseGPTPass, SparseGPTConfig, {"sparsity": 0.5, "blocksize": 16})])
def test_reconstruction_keeps_masks_and_lowers_heldout_error(mode, cls, cfg_cls, opts):
    base = dict(opts, batch_size=2, calibration_dtype="float32")
    plain, adapter, _ = _prune(cls, cfg_cls(**base))
    model, _, res = _prune(cls, cfg_cls(**base, reconstruct=mode, reconstruct_steps=24, reconstruct_lr=3e-4, reconstruct_holdout=2))
    recs = res.info["reconstruct"]
    assert sorted(recs) == ["0", "1"]
    for rec in recs.values():
        assert (rec["attention"] and rec["mlp"]) if mode == "sublayer" else rec["block"]
        assert rec["holdout_after"] <= rec["holdout_before"] or rec["undone"]
    summary = res.info["reconstruct_summary"]
    assert summary["mode"] == mode and summary["holdout_error_ratio"] < 1.0  # it helped somewhere, never hurt
    # block 0 sees the same inputs in both runs: its masks must be the one-shot masks exactly
    for a, b in zip(adapter.linears(plain, blocks=[0]), adapter.linears(model, blocks=[0])):
        assert torch.equal(a.weight_out_in() == 0, b.weight_out_in() == 0)
    for ref in adapter.linears(model):  # every block keeps its pattern / sparsity
        w = ref.weight_out_in()
        if "pattern" in opts:
            assert bool(((w.reshape(w.shape[0], -1, 4) != 0).sum(-1) <= 2).all())
        else:
            assert float((w == 0).float().mean()) >= 0.49


def test_worse_reconstruction_is_undone():
    # an absurd learning rate wrecks the block: the held-out check puts the one-shot weights back
    plain, adapter, _ = _prune(WandaPass, WandaConfig(pattern="2:4", batch_size=2, calibration_dtype="float32"))
    model, _, res = _prune(WandaPass, WandaConfig(pattern="2:4", batch_size=2, calibration_dtype="float32", reconstruct="block", reconstruct_steps=4, reconstruct_lr=0.9))
    assert res.info["reconstruct_summary"]["blocks_undone"] == 2
    for a, b in zip(adapter.linears(plain), adapter.linears(model)):
        assert torch.equal(a.weight_out_in(), b.weight_out_in())


def test_options_are_checked():
    with pytest.raises(ValueError, match="reconstruct 'attention'"):
        WandaConfig(pattern="2:4", reconstruct="attention")
    with pytest.raises(ValueError, match="reconstruct_lr"):
        WandaConfig(pattern="2:4", reconstruct="block", reconstruct_lr=0.0)
    cfg = WandaConfig(pattern="2:4", reconstruct="block", batch_size=8, reconstruct_holdout=2)
    with pytest.raises(OptionError, match="reconstruct_holdout"):
        WandaPass.check(cfg, _facts(), DataFacts(calibration_windows=16, calibration_length=64))
    WandaPass.check(cfg, _facts(), DataFacts(calibration_windows=24, calibration_length=64))
    from passes.sds import SDSConfig

    with pytest.raises(ValueError, match="reconstruct 'sublayer': SDS's recovery"):
        SDSConfig(pattern="2:4", reconstruct="sublayer")
    with pytest.raises(ValueError, match="reconstruct_holdout: SDS measures"):
        SDSConfig(pattern="2:4", reconstruct="block", reconstruct_holdout=3)
    with pytest.raises(ValueError, match="SDS does not reorder inputs"):
        SDSConfig(pattern="2:4", permute=True)


def test_sublayer_refused_for_a_family_without_the_norm():
    with pytest.raises(ValueError, match="does not name the norm before its MLP"):
        _prune(WandaPass, WandaConfig(sparsity=0.5, batch_size=2, reconstruct="sublayer"), family="gpt2")


def _facts():
    config = tiny_model("llama").config
    return adapter_for(config).facts(config)
