"""The graph-level shrink pass: zeroed heads and FFN channels sliced out of an exported graph."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch

from conftest import VOCAB, tiny_model
from engines.onnxruntime import OnnxRuntimeCpuEngine
from export.graph import run_graph_passes
from export.graph.shrink import ShrinkPass
from export.onnx_export import export_onnx, save_onnx
from core.structure import mask_block
from core.adapters import adapter_for


def _run(path, ids):
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    with OnnxRuntimeCpuEngine({}).open(path) as r:
        out = r.infer(feeds)
    return next(iter(out.values()))


def _weights(path):
    return {i.name: tuple(i.dims) for i in onnx.load(str(path)).graph.initializer}


CASES = {
    # llama: 4 query heads in 2 KV groups. Block 0 loses KV group 0 (heads 0, 1) and half its FFN;
    # block 1 loses head 1 only (a partial group: reported, kept) and 40 channels.
    "llama": ([[2, 3], [0, 2, 3]], [list(range(0, 128, 2)), list(range(40, 128))], [(2, 1), (4, 2)]),
    "bert": ([[0, 3], [1]], [list(range(64)), list(range(0, 128, 4))], [(2, 2), (1, 1)]),
}


@pytest.mark.parametrize("family,exporter", [("llama", "torchscript"), ("llama", "dynamo"), ("bert", "torchscript"), ("bert", "dynamo")])
def test_shrink_removes_zeroed_units_and_keeps_outputs(family, exporter, tmp_path):
    heads, ffn, expect = CASES[family]
    model = tiny_model(family)
    adapter = adapter_for(model.config)
    if family == "llama":
        mask_block(model, adapter, 0, heads[0], ffn[0])
        # a dead query head inside a live group: zero its o_proj columns only (q rows too)
        attn = adapter.blocks(model)[1].self_attn
        with torch.no_grad():
            attn.o_proj.weight[:, 16:32] = 0
            attn.q_proj.weight[16:32] = 0
        mask_block(model, adapter, 1, None, ffn[1])
    else:
        for b in range(2):
            mask_block(model, adapter, b, heads[b], ffn[b])
    task = "encoder" if family == "bert" else "causal-lm"
    src = tmp_path / "masked.onnx"
    export_onnx(model, task, src, 18, exporter)
    ir_model = ir.load(str(src))
    shrink = ShrinkPass(head_dim=16)
    report = run_graph_passes(ir_model, [shrink])
    assert report["ShrinkPass"] is True
    dst = tmp_path / "shrunk.onnx"
    save_onnx(ir.to_proto(ir_model), dst)
    ids = np.random.default_rng(0).integers(3, VOCAB, (2, 19)).astype(np.int64)
    a, b = _run(src, ids), _run(dst, ids)
    assert a.shape == b.shape
    assert np.abs(a - b).max() <= 1e-4
    rep = shrink.last_report
    assert [r["kept"] for r in rep.ffn] == [len(f) for f in ffn]
    kept = {r["consumer"]: r for r in rep.attention}
    assert len(kept) == 2 and not rep.skipped
    got = [(r["kept"], r.get("kept_kv", r["kept"])) for r in sorted(kept.values(), key=lambda r: r["consumer"])]
    assert got == expect
    if family == "llama":
        assert sorted(kept.values(), key=lambda r: r["consumer"])[1]["dead_heads_kept"] == 1
    before, after = _weights(src), _weights(dst)
    assert sum(np.prod(s) for s in after.values()) < sum(np.prod(s) for s in before.values())
    onnx.checker.check_model(str(dst))


def test_shrink_leaves_a_dense_graph_alone(tmp_path):
    model = tiny_model("llama")
    src = tmp_path / "dense.onnx"
    export_onnx(model, "causal-lm", src, 18, "torchscript")
    m = ir.load(str(src))
    p = ShrinkPass(head_dim=16)
    assert run_graph_passes(m, [p])["ShrinkPass"] is False
    assert not p.last_report.ffn and not p.last_report.attention
