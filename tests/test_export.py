"""Export parity: ONNX Runtime on the exported graph vs PyTorch, every family, both exporters."""

import numpy as np
import onnx
import pytest
import torch

from engines import get_engine
from export.onnx_export import export_onnx
from core.adapters import adapter_for
from tests.conftest import FAMILIES, VOCAB, tiny_model


def _run_both(model, task, path, ids, mask):
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input_ids": ids, "attention_mask": mask})[0]
    with torch.no_grad():
        t_ids, t_mask = torch.from_numpy(ids), torch.from_numpy(mask)
        if task == "causal-lm":
            ref = model(input_ids=t_ids, attention_mask=t_mask, use_cache=False).logits.numpy()
        else:
            ref = model(input_ids=t_ids, attention_mask=t_mask).last_hidden_state.numpy()
    return got, ref


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
@pytest.mark.parametrize("family", FAMILIES)
def test_export_parity(family, exporter, tmp_path):
    model = tiny_model(family)
    task = adapter_for(model.config).task
    path = tmp_path / "model.onnx"
    info = export_onnx(model, task, path, opset=18, exporter=exporter)
    proto = onnx.load(str(path))
    assert [i.name for i in proto.graph.input] == ["input_ids", "attention_mask"]
    assert info["onnx_bytes"] == path.stat().st_size
    rng = np.random.default_rng(0)
    # dynamic batch and sequence, different from the export example (2 × 16)
    for b, s in [(1, 1), (3, 37), (1, 100)]:
        ids = rng.integers(0, VOCAB, (b, s)).astype(np.int64)
        mask = np.ones_like(ids)
        got, ref = _run_both(model, task, path, ids, mask)
        assert got.shape == ref.shape
        np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)
    # left padding: positions the mask keeps must agree
    ids = rng.integers(0, VOCAB, (2, 12)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, :4] = 0
    got, ref = _run_both(model, task, path, ids, mask)
    keep = mask.astype(bool)
    np.testing.assert_allclose(got[keep], ref[keep], atol=1e-4, rtol=1e-4)


def test_exported_weights_are_named_after_parameters(tmp_path):
    model = tiny_model("llama")
    export_onnx(model, "causal-lm", tmp_path / "m.onnx", exporter="dynamo")
    names = {t.name for t in onnx.load(str(tmp_path / "m.onnx")).graph.initializer}
    assert "model.layers.0.self_attn.q_proj.weight.T" in names
    assert "model.layers.1.mlp.down_proj.weight.T" in names


def test_ort_engine_build_and_runner_checks(tmp_path):
    from core.errors import PipelineError

    model = tiny_model("llama")
    export_onnx(model, "causal-lm", tmp_path / "m.onnx", exporter="torchscript")
    engine = get_engine("onnxruntime-cpu")
    art = engine.build(tmp_path / "m.onnx", tmp_path)
    assert art.path.is_file() and art.info["onnxruntime"]
    runner = engine.runner(art)
    ids = np.zeros((1, 5), np.int64)
    with pytest.raises(PipelineError, match="not active"):
        runner.infer({"input_ids": ids, "attention_mask": ids})
    with runner:
        out = runner.infer({"input_ids": ids, "attention_mask": np.ones_like(ids)})
        assert out["logits"].shape == (1, 5, VOCAB)
        with pytest.raises(PipelineError, match="dtype int32, expected int64"):
            runner.infer({"input_ids": ids.astype(np.int32), "attention_mask": np.ones_like(ids)})
        with pytest.raises(PipelineError, match="missing \\['attention_mask'\\]"):
            runner.infer({"input_ids": ids})
        with pytest.raises(PipelineError, match="expected rank 2"):
            runner.infer({"input_ids": ids[0], "attention_mask": np.ones_like(ids)[0]})


def test_engine_rejects_unknown_option():
    with pytest.raises(ValueError, match="unknown option 'turbo'"):
        get_engine("onnxruntime-cpu", {"turbo": True})


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_rebinding_carries_trained_norms_or_refuses(exporter, tmp_path):
    """A variant whose training moved the norms (distillation, ADMM's train_rest) must not be
    rebound into the dense graph with the dense norms: every changed parameter is rebound, or the
    rebind is refused (the exporter merged the dense model's identical all-ones norms)."""
    from export.onnx_export import RebindError, changed_parameters, rebind_weights

    linears = lambda m: [f"{r.name}.weight" for r in adapter_for(m.config).linears(m)]  # noqa: E731
    ones = tiny_model("llama")
    export_onnx(ones, "causal-lm", tmp_path / "ones.onnx", exporter=exporter)
    trained = tiny_model("llama")
    with torch.no_grad():
        trained.model.layers[1].input_layernorm.weight.mul_(1.5)
    assert changed_parameters(ones, trained) == ["model.layers.1.input_layernorm.weight"]
    with pytest.raises(RebindError, match="input_layernorm"):
        rebind_weights(tmp_path / "ones.onnx", trained, linears(trained), tmp_path / "bad.onnx", dense=ones)

    dense = tiny_model("llama")
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # distinct norms, as a real model has
        for n, p in dense.named_parameters():
            if "norm" in n:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
    export_onnx(dense, "causal-lm", tmp_path / "dense.onnx", exporter=exporter)
    variant = tiny_model("llama")
    variant.load_state_dict(dense.state_dict())
    with torch.no_grad():
        variant.model.layers[1].post_attention_layernorm.weight.mul_(1.5)
        variant.model.norm.weight.add_(0.2)
        variant.model.layers[0].mlp.up_proj.weight.mul_(0.5)
    rebind_weights(tmp_path / "dense.onnx", variant, linears(variant), tmp_path / "v.onnx", dense=dense)
    ids = np.random.default_rng(0).integers(0, VOCAB, (2, 9)).astype(np.int64)
    got, ref = _run_both(variant, "causal-lm", tmp_path / "v.onnx", ids, np.ones_like(ids))
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)
    stale, _ = _run_both(variant, "causal-lm", tmp_path / "dense.onnx", ids, np.ones_like(ids))
    assert np.abs(stale - ref).max() > 1e-2  # the check above can fail: the norms matter


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
@pytest.mark.parametrize("form", ["threshold", "topk", "cats"])
def test_activation_sparsity_is_in_the_exported_graph(form, exporter, tmp_path):
    """The activation pass's hooks (thresholds, the per-token top-k, or CATS's threshold on the gate's
    activation) are traced into the graph: ONNX Runtime's logits equal the sparsified PyTorch model's
    and differ from the dense one's."""
    from passes.activation import ActivationConfig, ActivationSparsityPass
    from passes.base import PassContext

    model = tiny_model("llama", seed=3)
    dense = tiny_model("llama", seed=3)
    windows = torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(0))
    options = {"groups": ["gate_out"]} if form == "cats" else {"form": form}
    ActivationSparsityPass(ActivationConfig(sparsity=0.5, **options)).run(
        model, PassContext(adapter=adapter_for(model.config), calibration=lambda: windows, progress=False))
    path = tmp_path / "model.onnx"
    export_onnx(model, "causal-lm", path, opset=18, exporter=exporter)
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert ("TopK" in ops) == (form == "topk")
    ids = np.random.default_rng(1).integers(0, VOCAB, (2, 24)).astype(np.int64)
    got, ref = _run_both(model, "causal-lm", path, ids, np.ones_like(ids))
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        plain = dense(input_ids=torch.from_numpy(ids)).logits.numpy()
    assert np.abs(plain - ref).max() > 1e-2
