"""Whole-model FLOPs from per-layer shapes, checked by hand on a tiny config."""

from conftest import tiny_model
from core.structure import LayerShape, slice_block
from core.adapters import adapter_for
from pipeline.flops import FlopsModel


def test_flops_by_hand():
    f = FlopsModel(hidden=8, head_dim=2, vocab=10, gated=True, layers=(LayerShape(4, 2, 6),))
    got = f.forward(batch=1, new_tokens=3)
    # q 8×8, k and v 8×4 each, o 8×8, gate/up/down 8×6 each: 64+32+32+64+144 = 336 MACs per token
    assert got["linear"] == 2 * 3 * 336
    # QKᵀ and PV: 4 heads × 3 queries × 3 keys × 2 dims each
    assert got["attention"] == 2 * 2 * 4 * 3 * 3 * 2
    assert got["output_head"] == 2 * 3 * 8 * 10
    assert got["total"] == got["linear"] + got["attention"] + got["output_head"]
    # decode: one new token against 5 cached keys
    assert f.forward(1, 1, context=5)["attention"] == 2 * 2 * 4 * 1 * 5 * 2


def test_flops_follow_the_pruned_shapes():
    model = tiny_model("llama")
    adapter = adapter_for(model.config)
    dense = FlopsModel.of(model, adapter)
    slice_block(model, adapter, 0, [2, 3], list(range(64)))
    pruned = FlopsModel.of(model, adapter)
    assert pruned.layers[0] == LayerShape(2, 1, 64) and pruned.layers[1] == dense.layers[1]
    d, p = dense.forward(1, 16), pruned.forward(1, 16)
    assert p["output_head"] == d["output_head"] and p["linear"] < d["linear"] and p["attention"] < d["attention"]
