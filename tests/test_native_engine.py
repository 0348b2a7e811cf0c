"""The native-cpu engine against PyTorch on tiny Llama-family models built in-process: logits of a
padded batch, greedy decoding with its KV cache, compressed storage (2:4, bitmask, dense) and the
file shrinking with the kept weights; families it cannot run are refused with the reason."""

from __future__ import annotations

import contextlib
import copy
import functools
import json

import numpy as np
import pytest
import torch

from tests.conftest import tiny_model

native = pytest.importorskip("engines.native")
if not native.available():  # pragma: no cover - install.sh builds it
    pytest.skip("native kernels not built: run scripts/install.sh (needs a C++17 compiler)", allow_module_level=True)

from engines.native_cpu import ARTIFACT, NativeCpuEngine  # noqa: E402


def prune(model: torch.nn.Module, kind: str, seed: int = 0) -> None:
    """2:4 on the attention linears and 70 % unstructured on the MLP ('mixed'), or one kind everywhere."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, mod in model.named_modules():
            if not isinstance(mod, torch.nn.Linear) or "layers" not in name:
                continue
            w = mod.weight
            k = kind if kind != "mixed" else ("2:4" if "self_attn" in name else "70")
            if k == "2:4":
                groups = w.view(w.shape[0], -1, 4)
                idx = groups.abs().argsort(-1)[..., :2]
                groups.scatter_(-1, idx, 0.0)
            elif k == "70":
                w.mul_((torch.rand(w.shape, generator=g) > 0.7).float())


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """{kind: (model, artifact)} for dense, 2:4, 70 % unstructured and mixed tiny Llamas."""
    from core.models import save_hf_dir
    from tests.conftest import byte_tokenizer

    out = {}
    for kind in ("dense", "2:4", "70", "mixed"):
        model = tiny_model("llama", seed=1)
        if kind != "dense":
            prune(model, kind)
        root = tmp_path_factory.mktemp(f"native-{kind.replace(':', '')}")
        save_hf_dir(model, byte_tokenizer(), root / "model")
        (root / "engine").mkdir()
        art = NativeCpuEngine({"threads": 2}).build(root / "model", root / "engine")
        out[kind] = (model, art)
    return out


@pytest.mark.parametrize("kind", ["dense", "2:4", "70", "mixed"])
def test_logits_match_pytorch_on_a_padded_batch(built, kind):
    model, art = built[kind]
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 257, (2, 24)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, 17:] = 0
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
    with NativeCpuEngine({"threads": 2}).runner(art) as r:
        got = r.infer({"input_ids": ids, "attention_mask": mask})["logits"]
    np.testing.assert_allclose(got[0], ref[0], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(got[1, :17], ref[1, :17], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["dense", "2:4", "mixed"])
def test_greedy_decode_matches_pytorch_generate(built, kind):
    model, art = built[kind]
    prompt = np.random.default_rng(1).integers(0, 257, (1, 20)).astype(np.int64)
    with NativeCpuEngine({"threads": 2}).runner(art) as r:
        g = r.generate(prompt, 32)
    with torch.no_grad():
        ref = model.generate(torch.from_numpy(prompt), attention_mask=torch.ones(prompt.shape, dtype=torch.long), max_new_tokens=32, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=0, eos_token_id=None)
    np.testing.assert_array_equal(g.tokens, ref.sequences[:, 20:].numpy())
    assert len(g.decode_ms) == 31 and g.prefill_ms > 0
    for a, b in zip(g.logits, ref.logits):
        np.testing.assert_allclose(a, b.numpy(), atol=1e-4, rtol=1e-4)


def test_decode_past_the_preallocated_cache(built):
    # prefill allocates prompt + 64 positions (at least 256); decoding past them grows the cache, keeping what it holds
    model, art = built["2:4"]
    prompt = np.arange(1, 201, dtype=np.int64)[None]
    with NativeCpuEngine({"threads": 1}).runner(art) as r:
        g = r.generate(prompt, 80)
        assert r.decoder.cache[0][0].shape[1] > 264  # grew during decoding
    with torch.no_grad():
        ref = model.generate(torch.from_numpy(prompt), attention_mask=torch.ones(prompt.shape, dtype=torch.long), max_new_tokens=80,
                             do_sample=False, pad_token_id=0, eos_token_id=None)
    np.testing.assert_array_equal(g.tokens, ref[:, 200:].numpy())


def test_storage_formats_and_the_file_shrinks(built):
    sizes = {}
    for kind, (_, art) in built.items():
        manifest = json.loads((art.path.parent / "manifest.json").read_text())
        formats = {e["format"] for e in manifest["linears"].values()}
        sizes[kind] = art.path.stat().st_size
        assert art.path.name == ARTIFACT
        if kind == "dense":
            assert formats == {"dense"}
        elif kind == "2:4":
            assert formats == {"2:4"}
            assert manifest["linear_bytes"] == pytest.approx(manifest["linear_dense_bytes"] * (0.5 + 1 / 32), rel=1e-6)
        elif kind == "70":
            assert formats == {"bitmask"}
        else:
            assert formats == {"2:4", "bitmask"}
    assert sizes["2:4"] < 0.8 * sizes["dense"] and sizes["70"] < sizes["2:4"]


def test_families_without_a_native_decoder_are_refused(tiny_dirs, tmp_path):
    from types import SimpleNamespace

    from core.errors import PipelineError

    with pytest.raises(PipelineError, match="no native decoder"):
        NativeCpuEngine({}).build(tiny_dirs["gpt2"], tmp_path)
    facts = SimpleNamespace(family="bert", task="encoder")
    assert "no native decoder" in NativeCpuEngine.check_model(facts)
    assert NativeCpuEngine.check_model(SimpleNamespace(family="llama", task="causal-lm")) is None


def test_options_are_checked():
    from core.errors import OptionError

    with pytest.raises(OptionError, match="min_sparsity"):
        NativeCpuEngine({"min_sparsity": 1.5})
    with pytest.raises(OptionError, match="threads"):
        NativeCpuEngine({"threads": -1})
    with pytest.raises(OptionError, match="int8_activations"):
        NativeCpuEngine({"int8_activations": "yes"})
    with pytest.raises(OptionError, match="half_grids"):
        NativeCpuEngine({"half_grids": 1})


@pytest.mark.parametrize("form", ["threshold", "topk"])
def test_activation_sparsity_pass_engine_and_reload(tmp_path, form):
    """TEAL thresholds (or the top-k form): calibrated shares near the target on held-out windows, saved
    in the config and reinstalled on load; the native engine's logits and greedy decoding equal
    PyTorch's, and its decode steps read about (1 - sparsity) of the inputs' weight rows — top-k:
    exactly its kept counts."""
    from core.adapters import adapter_for
    from core.models import load_hf_dir, save_hf_dir
    from passes.activation import ActivationConfig, ActivationSparsityPass
    from passes.base import PassContext
    from tests.conftest import byte_tokenizer

    model = tiny_model("llama", seed=2)
    adapter = adapter_for(model.config)
    windows = torch.randint(0, 257, (8, 64), generator=torch.Generator().manual_seed(0))
    res = ActivationSparsityPass(ActivationConfig(sparsity=0.5, form=form)).run(model, PassContext(adapter=adapter, calibration=lambda: windows, progress=False))
    for group, share in res.info["measured_sparsity"].items():
        assert 0.35 < share < 0.7, (group, share)
    if form == "topk":  # every token keeps exactly half of each group's inputs (no ties among random floats)
        assert model.config.activation_sparsity["method"] == "topk"
        widths = {"attn_in": 64, "o_in": 64, "mlp_in": 64, "down_in": 128}
        assert res.info["keep"] == {str(b): {g: k // 2 for g, k in widths.items()} for b in range(2)}
        for group, share in res.info["measured_sparsity"].items():
            assert share == pytest.approx(0.5, abs=1e-6), (group, share)
    # the work an input-skipping kernel does: each linear's in × out times its group's nonzero share
    from core.activation import group_of

    sizes = [(m.in_features * m.out_features, group_of(n.rsplit(".", 1)[-1].removesuffix("_proj"))) for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and ".layers." in n]
    macs = res.info["linear_macs_per_token"]
    assert macs["before"] == sum(s for s, _ in sizes)
    assert macs["after"] == pytest.approx(sum(s * (1 - res.info["measured_sparsity"][g]) for s, g in sizes))
    assert 0.3 < macs["after"] / macs["before"] < 0.65
    save_hf_dir(model, byte_tokenizer(), tmp_path / "model")
    reloaded, _, _ = load_hf_dir(tmp_path / "model")
    ids = torch.randint(0, 257, (1, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        dense_logits = tiny_model("llama", seed=2)(input_ids=ids).logits
    assert torch.equal(reloaded(input_ids=ids).logits, ref)
    assert (dense_logits - ref).abs().max() > 1e-3  # the thresholds change the function
    (tmp_path / "engine").mkdir()
    art = NativeCpuEngine({"threads": 2}).build(tmp_path / "model", tmp_path / "engine")
    with NativeCpuEngine({"threads": 2}).runner(art) as r:
        got = r.infer({"input_ids": ids.numpy(), "attention_mask": np.ones((1, 30), np.int64)})["logits"]
        np.testing.assert_allclose(got, ref.numpy(), atol=1e-4, rtol=1e-4)
        g = r.generate(ids.numpy()[:, :20], 16)
        read = r.decoder.inputs_read / r.decoder.inputs_total
    assert 0.3 < read < 0.65
    if form == "topk":
        assert read == 0.5
    with torch.no_grad():
        out = reloaded.generate(ids[:, :20], attention_mask=torch.ones(1, 20, dtype=torch.long), max_new_tokens=16, do_sample=False,
                                pad_token_id=0, eos_token_id=None)
    np.testing.assert_array_equal(g.tokens, out[:, 20:].numpy())


@pytest.mark.parametrize("grid,form", [("q4_1", "threshold"), ("zero_point", "threshold"), ("q4_1", "topk")])
def test_activation_sparsity_on_4bit_weights_reads_the_4bit_rows(tmp_path, grid, form):
    """TEAL thresholds on a tiny Llama whose block linears lie on a 4-bit grid (GGUF's Q4_1 form, as the
    bundled SmolLM2's, or the quantize pass's zero-point form): native-cpu keeps every activation-sparse
    group's weights in 4 bits, input-major (an eighth of the float32 rows' bytes; Q4_1's grids in fp16);
    logits (prefill: the rows decompressed slab by slab) and 32 greedy tokens through the native decode
    step equal PyTorch, and the decode steps read about (1 − sparsity) of the inputs."""
    from core.adapters import adapter_for
    from core.models import save_hf_dir
    from passes import PassContext, get_pass_class
    from passes.activation import ActivationConfig, ActivationSparsityPass
    from tests.conftest import byte_tokenizer

    model = tiny_model("llama", seed=6)
    adapter = adapter_for(model.config)
    if grid == "q4_1":
        with torch.no_grad():
            for role, path in adapter.linear_paths.items():
                for layer in adapter.blocks(model):
                    lin = layer.get_submodule(path)
                    lin.weight.copy_(torch.from_numpy(_on_q4_grid(lin.weight.numpy())))
    else:
        cls = get_pass_class("quantize")
        cls(cls.config_class(bits=4, block_size=32)).run(model, PassContext(adapter))
    windows = torch.randint(0, 257, (8, 64), generator=torch.Generator().manual_seed(0))
    ActivationSparsityPass(ActivationConfig(sparsity=0.4, form=form)).run(model, PassContext(adapter=adapter, calibration=lambda: windows, progress=False))
    save_hf_dir(model, byte_tokenizer(), tmp_path / "model")
    (tmp_path / "engine").mkdir()
    art = NativeCpuEngine({"threads": 2}).build(tmp_path / "model", tmp_path / "engine")
    assert art.info["formats"] == {"int4": 14}

    def input_major_4bit(r) -> None:
        for L in r.decoder.layers:
            for w in (L.qkv, L.o, L.gate_up, L.down):
                assert isinstance(w, native.InputMajorInt4Weight) and w.zero_point == (grid == "zero_point")
                # both grids held as fp16 (5 bits per weight): Q4_1's scales and minima are fp16 numbers, and
                # the quantize pass rounds its scales up to fp16 numbers (its zero points are small integers)
                assert w.half_grid
                assert w.nbytes < 0.16 * 4 * w.n * w.k

    _runs_as_pytorch(model, art, 3, input_major_4bit)
    with NativeCpuEngine({"threads": 2}).runner(art) as r:
        r.generate(np.arange(3, 23, dtype=np.int64)[None], 16)
        read = r.decoder.inputs_read / r.decoder.inputs_total
    assert 0.35 < read < 0.8, read
    if form == "topk":  # round(0.6 · 64) = 38 of 64 inputs (attn_in, o_in, mlp_in), 77 of 128 (down_in), every step
        assert read == pytest.approx((3 * 38 + 77) / (3 * 64 + 128))


@pytest.mark.parametrize("grid,groups", [("q4_1", ["gate_out"]), ("float32", ["gate_out"]), ("q4_1", ["gate_out", "attn_in", "o_in"])])
def test_cats_gate_thresholds_skip_up_rows_and_down_inputs(tmp_path, grid, groups):
    """CATS (``groups: [gate_out]``): thresholds on |SiLU(gate)| calibrated near the target share, saved as
    the spec's ``gate_out`` group and reinstalled on load; the work counted is gate whole, up and down at
    the nonzero share. native-cpu keeps a 4-bit gate_up row-major (the up rows of the active activations
    computed by the row-subset kernel) and down input-major; logits and 32 greedy tokens equal PyTorch's,
    and its decode reads about (1 − sparsity) of the gate activations (any other gate_up: computed whole,
    the same result). With attn_in / o_in, TEAL thresholds join on those groups."""
    from core.activation import GATE_OUT
    from core.adapters import adapter_for
    from core.models import load_hf_dir, save_hf_dir
    from passes.activation import ActivationConfig, ActivationSparsityPass
    from passes.base import PassContext
    from tests.conftest import byte_tokenizer

    model = tiny_model("llama", seed=11)
    adapter = adapter_for(model.config)
    if grid == "q4_1":
        with torch.no_grad():
            for path in adapter.linear_paths.values():
                for layer in adapter.blocks(model):
                    lin = layer.get_submodule(path)
                    lin.weight.copy_(torch.from_numpy(_on_q4_grid(lin.weight.numpy())))
    dense = copy.deepcopy(model)
    windows = torch.randint(0, 257, (8, 64), generator=torch.Generator().manual_seed(0))
    res = ActivationSparsityPass(ActivationConfig(sparsity=0.5, groups=groups)).run(model, PassContext(adapter=adapter, calibration=lambda: windows, progress=False))
    assert res.info["form"] == "cats"
    spec = model.config.activation_sparsity
    assert spec["method"] == "teal" and all(set(g) == set(groups) for g in spec["thresholds"].values())
    share = res.info["measured_sparsity"]
    assert set(share) == set(groups) and 0.35 < share[GATE_OUT] < 0.65, share
    # the work: gate whole; up and down at the gate's nonzero share; q/k/v and o at theirs when hooked
    sizes = {n.rsplit(".", 1)[-1].removesuffix("_proj"): m.in_features * m.out_features for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and ".layers.0." in n}
    keep = {"gate": 1.0, "up": 1 - share[GATE_OUT], "down": 1 - share[GATE_OUT], **{r: 1 - share.get("attn_in", 0.0) for r in "qkv"}, "o": 1 - share.get("o_in", 0.0)}
    macs = res.info["linear_macs_per_token"]
    assert macs["before"] == 2 * sum(sizes.values())
    assert macs["after"] == pytest.approx(2 * sum(sizes[r] * keep[r] for r in sizes))
    save_hf_dir(model, byte_tokenizer(), tmp_path / "model")
    reloaded, _, _ = load_hf_dir(tmp_path / "model")
    ids = torch.randint(0, 257, (1, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        assert torch.equal(reloaded(input_ids=ids).logits, ref)
        assert (dense(input_ids=ids).logits - ref).abs().max() > 1e-3  # the thresholds change the function
    (tmp_path / "engine").mkdir()
    art = NativeCpuEngine({"threads": 2}).build(tmp_path / "model", tmp_path / "engine")

    def layout(r) -> None:
        for L in r.decoder.layers:
            assert L.gate_t is not None and GATE_OUT not in L.act
            assert isinstance(L.gate_up, native.NativeWeight) and L.gate_up.format == ("int4" if grid == "q4_1" else "dense")
            assert isinstance(L.down, native.InputMajorInt4Weight if grid == "q4_1" else native.InputMajorWeight)
            assert isinstance(L.qkv, native.NativeWeight) == ("attn_in" not in groups)

    _runs_as_pytorch(model, art, 4, layout)
    for native_step in (True, False):  # the decode step in native code, and the NumPy path
        with NativeCpuEngine({"threads": 2}).runner(art) as r:
            r.decoder.native_step = native_step
            r.decoder.prefill(np.arange(3, 23, dtype=np.int64)[None])
            r.decoder.inputs_read = r.decoder.inputs_total = 0
            logits = [r.decoder.step(t) for t in range(30, 42)]
            if grid == "q4_1" and groups == ["gate_out"]:  # 2 layers × (the gate's activations + down's inputs) per step
                assert r.decoder.inputs_total == 12 * 2 * 2 * 128
            read = r.decoder.inputs_read / r.decoder.inputs_total
            assert 0.3 < read < 0.7, read
            steps = np.concatenate(logits)
            if native_step:
                first = steps
            else:  # the two paths' inputs differ in float rounding (norms in C++ / NumPy); the 16-bit kernel rounds them to 1/32639 of a block's largest
                tol = 5e-4 if native.int16_activations() else 1e-4
                np.testing.assert_allclose(steps, first, atol=tol, rtol=tol)


def test_cats_needs_a_silu_gated_mlp_and_one_mlp_group():
    from passes.activation import ActivationConfig, ActivationSparsityPass
    from passes.base import OptionError, PassContext

    with pytest.raises(OptionError, match="both sparsify the MLP"):
        ActivationConfig(groups=["gate_out", "mlp_in"])
    with pytest.raises(OptionError, match="both sparsify the MLP"):
        ActivationConfig(groups=["down_in", "gate_out"])
    with pytest.raises(OptionError, match="threshold form only"):
        ActivationConfig(groups=["gate_out"], form="topk")
    from core.adapters import adapter_for

    model = tiny_model("gpt2")
    facts = adapter_for(model.config).facts(model.config)
    with pytest.raises(OptionError, match="has no gate"):  # early, at `pipeline check`
        ActivationSparsityPass.check(ActivationConfig(groups=["gate_out"]), facts, None)
    windows = torch.randint(0, 257, (4, 32), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="needs a SiLU-gated MLP with a separate gate projection"):
        ActivationSparsityPass(ActivationConfig(groups=["gate_out"])).run(model, PassContext(adapter=adapter_for(model.config), calibration=lambda: windows, progress=False))


def _int4_part(rng, n, k, zero_point, half=False):
    """A random ``int4`` weight (n, k): codes, scales and offsets or zero points; with ``half`` every scale
    and offset an fp16 number (Q4_1's grid)."""
    from core.sparse_format import CompressedWeight

    codes = rng.integers(0, 16, (n, k // 32, 32)).astype(np.uint8)
    arrays = {"values": (codes[..., :16] | (codes[..., 16:] << 4)).reshape(n, k // 2), "scales": rng.uniform(0.01, 0.1, (n, k // 32)).astype(np.float32)}
    if zero_point:
        arrays["zeros"] = rng.integers(0, 16, (n, k // 32)).astype(np.float32)
    else:
        arrays["offsets"] = (rng.choice([-1, 1], (n, k // 32)) * rng.uniform(0.01, 0.5, (n, k // 32))).astype(np.float32)
    if half:
        arrays = {key: a.astype(np.float16).astype(np.float32) if a.dtype == np.float32 else a for key, a in arrays.items()}
        arrays.get("offsets", arrays["scales"])[:, 0] = 0.0
    return CompressedWeight("int4", (n, k), arrays, 32)


def test_input_major_4bit_kernel_matches_reference_on_every_isa():
    """The input-major 4-bit GEMV (both grid forms, float32 and fp16 grids) against a float64 reference
    of the same weights at thresholds from none to all skipped, on odd output counts (a partial last
    chunk of 32, a padded row) and stacked parts; the prefill path (decompression, exact) and a few
    rows by the kernel."""
    from core.sparse_format import CompressedWeight, decompress

    rng = np.random.default_rng(1)
    part = functools.partial(_int4_part, rng)
    best = native.best_isa()
    native.int16_activations(False)  # the float kernels (the 16-bit one: the next test)
    try:
        for isa in [i for i in ("scalar", "avx2+fma", "avx512f") if list(native.ISA_NAMES.values()).index(i) <= list(native.ISA_NAMES.values()).index(best)]:
            native.set_isa(isa)
            for shapes, k, zp, half in [([7], 32, False, False), ([300, 33], 64, True, False), ([1536], 576, False, True), ([257, 64, 64], 96, True, True),
                                        ([31], 1536, False, False), ([45], 64, False, True)]:
                parts = [part(n, k, zp, half) for n in shapes]
                w = native.InputMajorInt4Weight(parts)
                assert w.half_grid == half and w.grid_flags == int(zp) | (2 * half)
                assert w.nbytes == sum(shapes) * k // 2 + (4 if half else 8) * sum(shapes) * (k // 32)
                dense = np.concatenate([decompress(p) for p in parts])
                assert w.n == dense.shape[0] and np.array_equal(w.to_dense(), dense)
                if half:  # the same weight with float32 grids: the same results, bit for bit
                    wf = native.InputMajorInt4Weight(parts, half_grid=False)
                    assert not wf.half_grid and wf.nbytes > w.nbytes and np.array_equal(wf.to_dense(), dense)
                    xh = rng.standard_normal((1, k)).astype(np.float32)
                    assert np.array_equal(wf.gemv_sparse(xh, 0.5)[0], w.gemv_sparse(xh, 0.5)[0])
                x = rng.standard_normal((1, k)).astype(np.float32)
                x[0, : min(k, 40)] = 0.0  # a whole block of inputs inactive
                for t in (-1.0, 0.0, 0.7, 100.0):
                    y, used = w.gemv_sparse(x, t)
                    kept = np.abs(x) > t
                    assert used == int(kept.sum())
                    ref = np.where(kept, x, 0).astype(np.float64) @ dense.T.astype(np.float64)
                    np.testing.assert_allclose(y, ref, atol=1e-5 * (1 + np.abs(ref).max()), rtol=0)
                xs = rng.standard_normal((20, k)).astype(np.float32)
                ref = xs.astype(np.float64) @ dense.T.astype(np.float64)
                for m in (3, 20):  # by the kernel, and by the prefill path
                    np.testing.assert_allclose(w(xs[:m]), ref[:m], atol=1e-4 * (1 + np.abs(ref).max()), rtol=0)
    finally:
        native.set_isa(best)
        native.int16_activations(True)
    with pytest.raises(ValueError, match="expected int4"):
        native.InputMajorInt4Weight([CompressedWeight("dense", (4, 32), {"values": np.zeros((4, 32), np.float32)})])
    with pytest.raises(ValueError, match="grid forms"):
        native.InputMajorInt4Weight([part(4, 32, True), part(4, 32, False)])
    bad = part(4, 64, False)
    bad.arrays["scales"] = bad.arrays["scales"][:, :1]
    with pytest.raises(ValueError, match=r"scales \(4, 1\)"):
        native.InputMajorInt4Weight([bad])


def test_input_major_4bit_int16_activation_kernel_computes_the_block_rounded_product():
    """The input-major 4-bit GEMV's 16-bit kernel (AVX-512 VNNI, int4_x_vnni_avx512.cpp: the active inputs
    of a block in fours, each rounded to 1/32639 of the block's largest |x|, the integer dot products by
    vpdpbusd on its two bytes): against that computed in float64 — Σ code · xq exactly, times scale · qs,
    plus offset · Σx — at thresholds from none to all skipped, active counts that leave a short last
    quad, partial tiles of 128 outputs and chunks of 32, stacked parts, both grid forms and both grid
    precisions; not the float kernel's result; within 1e-4 of the float64 product of the unrounded x."""
    from core.sparse_format import decompress

    if not native.int16_activations():
        pytest.skip(f"the 16-bit kernel needs AVX-512 VNNI (this CPU's best: {native.best_isa()})")
    rng = np.random.default_rng(5)
    for shapes, k, zp, half in [([7], 32, False, False), ([300, 33], 64, True, False), ([1536], 576, False, True), ([45, 64], 96, True, True),
                                ([130], 160, False, False), ([576], 1536, True, True)]:
        parts = [_int4_part(rng, n, k, zp, half) for n in shapes]
        w = native.InputMajorInt4Weight(parts)
        dense = np.concatenate([decompress(p) for p in parts]).astype(np.float64)
        offsets = np.concatenate([p.arrays["offsets"] if not zp else -p.arrays["zeros"] * p.arrays["scales"] for p in parts]).astype(np.float64)
        scales = np.concatenate([p.arrays["scales"] for p in parts]).astype(np.float64)
        packed = np.concatenate([p.arrays["values"] for p in parts]).reshape(-1, k // 32, 16)
        codes = np.concatenate([packed & 15, packed >> 4], axis=-1).astype(np.float64)
        x = (rng.standard_normal((1, k)) * rng.uniform(0.2, 3.0, k)).astype(np.float32)
        x[0, : min(k - 32, 40)] = 0.0  # a whole block of inputs inactive (but for k = 32)
        for t in (-1.0, 0.0, 0.3, 0.9, 2.0, 100.0):
            kept = np.where(np.abs(x) > t, x, np.float32(0))[0]
            xb = kept.reshape(-1, 32)
            amax = np.abs(xb).max(-1)
            qs = np.where(amax > 0, amax / np.float32(32639), np.float32(1)).astype(np.float32)
            q = np.clip(np.rint(xb * (np.float32(1) / qs)[:, None]), -32639, 32639)
            ref = (np.einsum("nbj,bj->nb", codes, q) * scales * qs.astype(np.float64)).sum(-1) + offsets @ xb.sum(-1, dtype=np.float32).astype(np.float64)
            y, used = w.gemv_sparse(x, t)
            assert used == int((np.abs(x) > t).sum())
            np.testing.assert_allclose(y[0], ref, atol=2e-6 * (1 + np.abs(ref).max()), rtol=0)
            exact = kept.astype(np.float64) @ dense.T
            np.testing.assert_allclose(y[0], exact, atol=1e-4 * (1 + np.abs(exact).max()), rtol=0)
            if 0 < t < 1 and kept.any():  # really the 16-bit kernel: not the float kernel's result
                native.int16_activations(False)
                try:
                    assert not np.array_equal(y, w.gemv_sparse(x, t)[0])
                finally:
                    native.int16_activations(True)


def test_input_major_4bit_int8_activation_kernel_computes_the_block_rounded_product():
    """The input-major 4-bit GEMV with int8 activations (AVX2's vpmaddubsw on pairs of active inputs,
    and the scalar reference): per block of active inputs, scale max|x| / 127, x rounded to nearest
    even, Σ code · q in integers times scale · that scale, plus offset · Σx in float — against that
    computed in float64, at thresholds from none (every input: 16 pairs per block, past the 16-bit
    sums' flush) to all skipped, odd active counts, both grid forms; AVX2 and scalar bit for bit; the
    prefill path (rows rounded the same way, dense GEMM) equal to the kernel row by row; on AVX-512
    the float kernel's result."""
    from core.sparse_format import decompress

    rng = np.random.default_rng(3)
    best = native.best_isa()
    isas = [i for i in ("scalar", "avx2+fma") if list(native.ISA_NAMES.values()).index(i) <= list(native.ISA_NAMES.values()).index(best)]
    try:
        for shapes, k, zp, half in [([7], 32, False, False), ([300, 33], 64, True, False), ([1536], 576, False, True), ([45, 64], 96, True, True),
                                    ([50], 64, False, False), ([40, 30], 128, True, False)]:
            parts = [_int4_part(rng, n, k, zp, half) for n in shapes]
            w8 = native.InputMajorInt4Weight(parts, int8_activations=True)
            assert w8.grid_flags == int(zp) | (2 * half) | 4
            dense = np.concatenate([decompress(p) for p in parts]).astype(np.float64)
            offsets = np.concatenate([p.arrays["offsets"] if not zp else -p.arrays["zeros"] * p.arrays["scales"] for p in parts]).astype(np.float64)
            scales = np.concatenate([p.arrays["scales"] for p in parts]).astype(np.float64)
            packed = np.concatenate([p.arrays["values"] for p in parts]).reshape(-1, k // 32, 16)
            codes = np.concatenate([packed & 15, packed >> 4], axis=-1).astype(np.float64)  # (N, K/32, 32), 0..15
            np.testing.assert_allclose((codes * scales[..., None] + offsets[..., None]).reshape(dense.shape), dense, atol=1e-6, rtol=0)
            x = (rng.standard_normal((1, k)) * rng.uniform(0.2, 3.0, k)).astype(np.float32)
            x[0, : min(k, 40)] = 0.0  # a whole block of inputs inactive
            for t in (-1.0, 0.0, 0.3, 0.9, 100.0):
                kept = np.where(np.abs(x) > t, x, np.float32(0))[0]
                xb = kept.reshape(-1, 32)
                sx = np.where(np.abs(xb).max(-1) > 0, np.abs(xb).max(-1) / np.float32(127), np.float32(1)).astype(np.float32)
                q = np.clip(np.rint(xb * (np.float32(1) / sx)[:, None]), -127, 127)
                dots = np.einsum("nbj,bj->nb", codes, q)
                ref = (dots * scales * sx.astype(np.float64)).sum(-1) + offsets @ xb.sum(-1, dtype=np.float32).astype(np.float64)
                ys = []
                for isa in isas:
                    native.set_isa(isa)
                    y, used = w8.gemv_sparse(x, t)
                    assert used == int((np.abs(x) > t).sum())
                    np.testing.assert_allclose(y[0], ref, atol=2e-5 * (1 + np.abs(ref).max()), rtol=0)
                    ys.append(y)
                assert all(np.array_equal(ys[0], y) for y in ys[1:])
                if 0 < t < 1 and kept.any():  # really int8: not the float kernel's result
                    assert not np.array_equal(ys[-1], native.InputMajorInt4Weight(parts).gemv_sparse(x, t)[0])
            xs = (rng.standard_normal((native.GEMV_MAX_ROWS + 4, k)) * rng.uniform(0.2, 3.0, k)).astype(np.float32)
            rows = np.concatenate([w8.gemv_sparse(xs[i : i + 1], -1.0)[0] for i in range(xs.shape[0])])
            np.testing.assert_allclose(w8(xs), rows, atol=3e-5 * (1 + np.abs(rows).max()), rtol=0)
            if best == "avx512f":
                native.set_isa("avx512f")
                assert not w8.int8_now
                assert np.array_equal(w8.gemv_sparse(x, 0.3)[0], native.InputMajorInt4Weight(parts).gemv_sparse(x, 0.3)[0])
    finally:
        native.set_isa(best)


def test_activation_pass_options_are_checked():
    from passes.activation import ActivationConfig
    from passes.base import OptionError

    with pytest.raises(OptionError, match="sparsity"):
        ActivationConfig(sparsity=1.0)
    with pytest.raises(OptionError, match="groups"):
        ActivationConfig(groups=["qkv"])
    with pytest.raises(OptionError, match="form"):
        ActivationConfig(form="cats")


def test_input_skipping_kernel_matches_reference_on_every_isa():
    rng = np.random.default_rng(0)
    best = native.best_isa()
    try:
        for isa in [i for i in ("scalar", "avx2+fma", "avx512f") if list(native.ISA_NAMES.values()).index(i) <= list(native.ISA_NAMES.values()).index(best)]:
            native.set_isa(isa)
            for n, k in [(7, 5), (300, 64), (1536, 576), (257, 33)]:
                w = rng.standard_normal((n, k)).astype(np.float32)
                x = rng.standard_normal((1, k)).astype(np.float32)
                weight = native.InputMajorWeight(w)
                for t in (0.0, 0.7, 100.0):
                    y, used = weight.gemv_sparse(x, t)
                    kept = np.abs(x) > t
                    assert used == int(kept.sum())
                    ref = np.where(kept, x, 0).astype(np.float64) @ w.T.astype(np.float64)
                    np.testing.assert_allclose(y, ref, atol=1e-4 * (1 + np.abs(ref).max()), rtol=0)
    finally:
        native.set_isa(best)


def test_native_decode_step_equals_the_numpy_path_and_leaves_the_weights_alone(built):
    _, art = built["mixed"]
    prompt = np.arange(3, 23, dtype=np.int64)[None]
    with NativeCpuEngine({"threads": 2}).runner(art) as r:
        d = r.decoder
        embed = d.embed.copy()
        runs = []
        for native_step in (True, False):
            d.native_step = native_step
            d.prefill(prompt)
            runs.append([d.step(t) for t in (5, 7, 5, 9)])
        assert np.array_equal(d.embed, embed)
    for a, b in zip(*runs):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_a_quantized_model_runs_dequantized_and_says_so(tmp_path):
    from core.adapters import adapter_for
    from core.models import save_hf_dir
    from passes import PassContext, get_pass_class
    from tests.conftest import byte_tokenizer

    model = tiny_model("llama", seed=3)
    prune(model, "2:4")
    cls = get_pass_class("quantize")
    cls(cls.config_class(bits=4, block_size=16)).run(model, PassContext(adapter_for(model.config)))
    save_hf_dir(model, byte_tokenizer(), tmp_path / "model")
    (tmp_path / "engine").mkdir()
    art = NativeCpuEngine({"threads": 2}).build(tmp_path / "model", tmp_path / "engine")
    assert "dequantized in fp32" in art.info["quantized_weights"]
    assert art.info["formats"] == {"2:4": 14}  # the pattern survived, so the 2:4 kernel still reads half
    ids = np.random.default_rng(1).integers(0, 257, (1, 12)).astype(np.int64)
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids)).logits.numpy()
    with NativeCpuEngine({"threads": 2}).runner(art) as r:
        got = r.infer({"input_ids": ids, "attention_mask": np.ones_like(ids)})["logits"]
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["mixed", "dense"])
def test_an_int8_model_is_read_as_int8_and_computes_its_own_weights(tmp_path, kind):
    """INT8 (the quantize pass, head included): every block linear and the untied head stored as int8
    codes with their scales in their pruned format; logits and 32 greedy tokens equal the PyTorch model,
    which holds the same dequantized weights; the native decode step equals the NumPy path."""
    from core.adapters import adapter_for
    from core.models import save_hf_dir
    from passes import PassContext, get_pass_class
    from tests.conftest import byte_tokenizer

    model = tiny_model("llama", seed=4)
    if kind != "dense":
        prune(model, kind)
    file_bytes = {}
    art = None
    for bits in (None, 8):
        if bits:
            cls = get_pass_class("quantize")
            cls(cls.config_class(bits=8, block_size=16, head=True)).run(model, PassContext(adapter_for(model.config)))
        root = tmp_path / f"bits{bits}"
        save_hf_dir(model, byte_tokenizer(), root / "model")
        (root / "engine").mkdir()
        art = NativeCpuEngine({"threads": 2}).build(root / "model", root / "engine")
        file_bytes[bits] = art.path.stat().st_size
    manifest = json.loads((art.path.parent / "manifest.json").read_text())
    assert {e["values"] for e in manifest["linears"].values()} == {"int8"}
    assert {e["scale_block"] for e in manifest["linears"].values()} == {16}
    assert {e["format"] for e in manifest["linears"].values()} == ({"2:4", "bitmask"} if kind == "mixed" else {"dense"})
    assert manifest["head_storage"]["values"] == "int8" and not manifest["tied_head"]
    assert "int8 weights read as int8 codes" in art.info["quantized_weights"] and "the LM head" in art.info["quantized_weights"]
    # the fp32 model's file holds the embedding once (tied); the int8 one adds an int8 head: its linears are a quarter
    linear_fp32 = sum(e["dense_bytes"] for e in manifest["linears"].values())
    assert manifest["linear_bytes"] < 0.32 * linear_fp32
    assert file_bytes[8] < file_bytes[None]  # with an int8 head added (the tiny model's embedding is a large share)
    ids = np.random.default_rng(2).integers(0, 257, (2, 24)).astype(np.int64)
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids)).logits.numpy()
    prompt = ids[:1, :20]
    with torch.no_grad():
        gen = model.generate(torch.from_numpy(prompt), attention_mask=torch.ones(prompt.shape, dtype=torch.long), max_new_tokens=32, do_sample=False,
                             pad_token_id=0, eos_token_id=None)
    with NativeCpuEngine({"threads": 2}).runner(art) as r:
        assert r.decoder.head.block == 16 and r.decoder.layers[0].down.block == 16
        got = r.infer({"input_ids": ids, "attention_mask": np.ones_like(ids)})["logits"]
        g = r.generate(prompt, 32)
        d = r.decoder
        runs = []
        for native_step in (True, False):
            d.native_step = native_step
            d.prefill(prompt)
            runs.append([d.step(t) for t in (5, 7, 5, 9)])
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)
    np.testing.assert_array_equal(g.tokens, gen[:, 20:].numpy())
    for a, b in zip(*runs):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("isa", ["best", "avx2+fma"])
def test_accuracy_level_4_decodes_with_int8_activations(tmp_path, isa):
    """INT8 in blocks of 32 at accuracy_level 4 (the quantize pass's default) with the engine option
    int8_activations (off by default: fp32 activations, the model's own result): decode steps multiply
    int8 activations (VNNI, or the AVX2 kernel) — close to the model, not equal — and so do whole
    sequences (validation, prefill), as ONNX Runtime's level 4 does; switched off, the same artifact
    computes exactly as PyTorch."""
    with _on_isa(isa):
        if not native.int8_activations():
            pytest.skip(f"int8 weights run with fp32 activations on {native.isa()} here (no AVX-512 VNNI)")
        _accuracy_level_4_with_int8_activations(tmp_path)


@contextlib.contextmanager
def _on_isa(isa: str):
    """native-cpu on instruction set ``isa`` ("best": as it is) for the block, then back; skips the
    test where the CPU lacks it."""
    best = native.isa()
    if isa != "best":
        if list(native.ISA_NAMES.values()).index(isa) > list(native.ISA_NAMES.values()).index(native.best_isa()):
            pytest.skip(f"this CPU has no {isa}")
        native.set_isa(isa)
    try:
        yield
    finally:
        native.set_isa(best)


def _accuracy_level_4_with_int8_activations(tmp_path) -> None:
    from core.adapters import adapter_for
    from core.models import save_hf_dir
    from passes import PassContext, get_pass_class
    from tests.conftest import byte_tokenizer

    model = tiny_model("llama", seed=6)
    cls = get_pass_class("quantize")
    cls(cls.config_class(bits=8, block_size=32, head=True)).run(model, PassContext(adapter_for(model.config)))
    save_hf_dir(model, byte_tokenizer(), tmp_path / "model")
    (tmp_path / "plain").mkdir()
    plain = NativeCpuEngine({"threads": 2}).build(tmp_path / "model", tmp_path / "plain")  # the default: fp32 activations
    assert "fp32 activations" in plain.info["quantized_weights"]
    with NativeCpuEngine({"threads": 2}).runner(plain) as r:
        assert not r.decoder.head.int8_activations
    (tmp_path / "engine").mkdir()
    art = NativeCpuEngine({"threads": 2, "int8_activations": True}).build(tmp_path / "model", tmp_path / "engine")
    assert "multiply int8 activations" in art.info["quantized_weights"] and "(this CPU runs it)" in art.info["quantized_weights"]
    prompt = np.random.default_rng(3).integers(0, 257, (1, 20)).astype(np.int64)
    with torch.no_grad():
        ref = model.generate(torch.from_numpy(prompt), attention_mask=torch.ones(prompt.shape, dtype=torch.long), max_new_tokens=16, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=0, eos_token_id=None)
    with NativeCpuEngine({"threads": 2}).runner(art) as r:
        assert r.decoder.head.int8_activations and all(L.down.int8_activations and L.qkv.int8_activations for L in r.decoder.layers)
        quantized = r.generate(prompt, 16)
        full = r.infer({"input_ids": prompt, "attention_mask": np.ones_like(prompt)})["logits"]
        try:
            native.int8_activations(False)
            native.int16_activations(False)  # (else int8 weights in blocks of 32 multiply 16-bit activations)
            exact = r.generate(prompt, 16)
            full_exact = r.infer({"input_ids": prompt, "attention_mask": np.ones_like(prompt)})["logits"]
        finally:
            native.int8_activations(True)
            native.int16_activations(True)
    np.testing.assert_array_equal(exact.tokens, ref.sequences[:, 20:].numpy())
    for a, b in zip(exact.logits, ref.logits):
        np.testing.assert_allclose(a, b.numpy(), atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        whole = model(input_ids=torch.from_numpy(prompt)).logits.numpy()
    np.testing.assert_allclose(full_exact, whole, atol=1e-4, rtol=1e-4)
    scale = np.abs(whole).max()
    for got, want in [(full, whole), *zip(quantized.logits, [b.numpy() for b in ref.logits])]:
        assert 0 < np.abs(got - want).max() < 0.05 * scale, (np.abs(got - want).max(), scale)  # int8 activations: close, really not exact


def test_sliding_window_is_refused_not_ignored():
    """The native decoder attends to every earlier position: a Mistral-style window shorter than the
    context would silently change the results past it, so the engine refuses the model instead."""
    from transformers import MistralConfig

    from core.adapters import adapter_for
    from engines.native_cpu import supports

    common = dict(vocab_size=257, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    windowed = MistralConfig(**common, sliding_window=8)
    assert "sliding-window attention (8 positions)" in supports(adapter_for(windowed), windowed)
    for cfg in (MistralConfig(**common, sliding_window=None), MistralConfig(**common, sliding_window=512)):
        assert supports(adapter_for(cfg), cfg) is None  # no window, or one the context never exceeds


def _on_q4_grid(w: np.ndarray) -> np.ndarray:
    """``w`` dequantized from GGUF's Q4_1 (tests/test_native_kernels.py)."""
    from tests.test_native_kernels import _on_q4_grid as on_grid

    return on_grid(w)


def _on_q8_grid(w: torch.Tensor) -> torch.Tensor:
    """``w`` dequantized from GGUF's Q8_0 (blocks of 32, an fp16 scale, codes round(w / scale))."""
    b = w.reshape(w.shape[0], -1, 32)
    d = (b.abs().amax(-1, keepdim=True) / 127).half().float()
    return ((b / torch.where(d > 0, d, 1.0)).round().clamp(-127, 127) * d).reshape(w.shape)


@pytest.mark.parametrize("isa", ["best", "avx2+fma"])
def test_weights_on_an_exact_int8_grid_are_stored_as_codes_and_compute_the_same(tmp_path, isa):
    """A tied embedding on a Q8_0 grid (as the bundled SmolLM2's is), one block linear on one and four on
    a Q4_1 grid (as its block linears are): with exact_grids (the default) they are int8 codes / the
    int4 format in the artifact, the file is smaller, and logits and decode steps equal the fp32
    artifact's bit for bit (the kernels multiply by exactly the same weights, in the same order); off,
    nothing is; a weight off any grid stays float32."""
    from core.models import save_hf_dir
    from tests.conftest import byte_tokenizer

    model = tiny_model("llama", seed=5)
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb.copy_(_on_q8_grid(emb))
        down = model.model.layers[1].mlp.down_proj.weight
        down.copy_(_on_q8_grid(down))
        for lin in (model.model.layers[0].self_attn.q_proj, model.model.layers[0].self_attn.k_proj, model.model.layers[0].self_attn.v_proj,
                    model.model.layers[1].mlp.up_proj):  # q, k, v all int4 (stacked as one int4 weight); up with a float32 gate
            lin.weight.copy_(torch.from_numpy(_on_q4_grid(lin.weight.detach().numpy())))
    save_hf_dir(model, byte_tokenizer(), tmp_path / "model")
    arts = {}
    for exact in (True, False):
        (tmp_path / f"engine-{exact}").mkdir()
        arts[exact] = NativeCpuEngine({"threads": 2, "exact_grids": exact}).build(tmp_path / "model", tmp_path / f"engine-{exact}")
    on = json.loads((arts[True].path.parent / "manifest.json").read_text())
    off = json.loads((arts[False].path.parent / "manifest.json").read_text())
    assert on["tied_head"] and on["embed_storage"] == on["head_storage"]
    assert on["embed_storage"]["values"] == "int8" and on["embed_storage"]["exact_grid"] and on["embed_storage"]["scale_block"] == 32
    exact = {n: (e["exact_grid"], e["format"], e["values"]) for n, e in on["linears"].items() if e["exact_grid"]}
    int4 = ("int4", "int4", "int4")
    assert exact == {"model.layers.1.mlp.down_proj.weight": ("int8", "dense", "int8"), "model.layers.1.mlp.up_proj.weight": int4,
                     **{f"model.layers.0.self_attn.{p}_proj.weight": int4 for p in "qkv"}}
    assert on["linears"]["model.layers.1.mlp.up_proj.weight"]["bytes"] == 128 * 64 // 2 + 2 * 2 * 128 * 2  # codes, fp16 scales and minima
    info = arts[True].info["exact_grids"]
    assert "token embedding (the tied LM head) as int8" in info and "4 block linears as int4" in info and "1 block linears as int8" in info
    assert off["embed_storage"]["values"] == "float32" and not any(e["values"] == "int8" for e in off["linears"].values())
    assert arts[False].info["exact_grids"] == "none found"
    assert arts[True].path.stat().st_size < arts[False].path.stat().st_size - 3 * emb.numel()  # ~3 bytes saved per embedding weight
    (tmp_path / "engine-float-grids").mkdir()  # Q4_1 grids held as float32 instead of fp16: the same weights
    float_grids = NativeCpuEngine({"threads": 2, "half_grids": False}).build(tmp_path / "model", tmp_path / "engine-float-grids")
    floats = json.loads((float_grids.path.parent / "manifest.json").read_text())
    assert floats["linears"]["model.layers.1.mlp.up_proj.weight"]["bytes"] == 128 * 64 // 2 + 2 * 4 * 128 * 2  # float32 scales and minima
    assert float_grids.path.stat().st_size > arts[True].path.stat().st_size
    ids = np.random.default_rng(3).integers(0, 257, (2, 20)).astype(np.int64)
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids)).logits.numpy()
    best = native.isa()
    outs = {}
    try:
        native.set_isa(native.best_isa() if isa == "best" else isa)
        x16_on = native.int16_activations()
        with NativeCpuEngine({"threads": 2}).runner(arts[True]) as r:  # decode steps: the int8 LM head × 16-bit activations where the CPU has VNNI
            r.decoder.prefill(ids[:1, :12])
            x16_steps = [r.decoder.step(t) for t in (5, 7, 9)]
        native.int16_activations(False)  # the codes compute the float weights' result bit for bit
        for exact, art in arts.items():
            with NativeCpuEngine({"threads": 2}).runner(art) as r:
                d = r.decoder
                assert isinstance(d.embed, np.ndarray) != exact
                assert (d.layers[0].qkv.format == "int4") == exact
                logits = r.infer({"input_ids": ids, "attention_mask": np.ones_like(ids)})["logits"]
                assert d.layers[0].qkv.half_grid == exact  # the Q4_1 grid's fp16 scales and minima, read as fp16
                d.prefill(ids[:1, :12])
                outs[exact] = (logits, [d.step(t) for t in (5, 7, 9)], d.embed[ids])
        with NativeCpuEngine({"threads": 2}).runner(float_grids) as r:
            d = r.decoder
            assert d.layers[0].qkv.format == "int4" and not d.layers[0].qkv.half_grid
            logits = r.infer({"input_ids": ids, "attention_mask": np.ones_like(ids)})["logits"]
            d.prefill(ids[:1, :12])
            outs["float-grids"] = (logits, [d.step(t) for t in (5, 7, 9)], d.embed[ids])
    finally:
        native.int16_activations(True)
        native.set_isa(best)
    for a, b in zip(x16_steps, outs[True][1]):  # on VNNI the head rounds x: close, not exact
        assert np.array_equal(a, b) != x16_on
        np.testing.assert_allclose(a, b, atol=1e-3 * np.abs(b).max(), rtol=0)
    for a, b in zip(outs[True][1], outs["float-grids"][1]):
        assert np.array_equal(a, b)
    assert np.array_equal(outs[True][0], outs["float-grids"][0])
    np.testing.assert_allclose(outs[True][0], ref, atol=1e-4, rtol=1e-4)
    assert np.array_equal(outs[True][2], emb.detach().numpy()[ids])  # the rows looked up are the model's own, bit for bit
    assert np.array_equal(outs[True][0], outs[False][0])
    for a, b in zip(outs[True][1], outs[False][1]):
        assert np.array_equal(a, b)


def test_exact_int8_grid_finds_q8_grids_only():
    from core.sparse_format import exact_int8_grid

    w = torch.randn(8, 96, generator=torch.Generator().manual_seed(0))
    q = _on_q8_grid(w).numpy()
    s = exact_int8_grid(q)
    assert s is not None and s.shape == (8, 3)
    np.testing.assert_array_equal(s, np.abs(q.reshape(8, 3, 32)).max(-1) / np.float32(127))
    assert exact_int8_grid(w.numpy()) is None  # random floats: off any such grid
    off = q.copy()
    off[5, 40] = np.nextafter(off[5, 40], np.float32(1))  # one weight a float step off its code
    assert exact_int8_grid(off) is None
    assert exact_int8_grid(q[:, :90]) is None  # K not a multiple of the block
    zero = np.zeros((4, 64), np.float32)
    np.testing.assert_array_equal(exact_int8_grid(zero), np.zeros((4, 2), np.float32))


@pytest.mark.parametrize("isa", ["best", "avx2+fma"])
def test_int4_weights_with_the_int8_activations_option(tmp_path, isa):
    """A tiny Llama whose block linears are all on a Q4_1 grid (as the bundled SmolLM2's are): stored as
    int4; with int8_activations the decode steps and whole sequences multiply int8 activations — close
    to the model, not equal — and the artifact says so; switched off, the same artifact is exact. On
    the CPU's best instruction set (AVX-512 VNNI) and on the AVX2 kernel."""
    with _on_isa(isa):
        if not native.int4_int8_activations():
            pytest.skip(f"int4 weights run with fp32 activations on {native.isa()} here (no AVX-512 VNNI)")
        _int4_weights_with_int8_activations(tmp_path)


def _int4_weights_with_int8_activations(tmp_path) -> None:
    from core.models import save_hf_dir
    from tests.conftest import byte_tokenizer

    model = tiny_model("llama", seed=8)
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and "layers" in name:
                mod.weight.copy_(torch.from_numpy(_on_q4_grid(mod.weight.detach().numpy())))
    save_hf_dir(model, byte_tokenizer(), tmp_path / "model")
    (tmp_path / "engine").mkdir()
    art = NativeCpuEngine({"threads": 2, "int8_activations": True}).build(tmp_path / "model", tmp_path / "engine")
    assert art.info["formats"] == {"int4": 14} and "these weights multiply int8 activations" in art.info["exact_grids"]
    ids = np.random.default_rng(4).integers(0, 257, (1, 20)).astype(np.int64)
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids)).logits.numpy()
    with NativeCpuEngine({"threads": 2}).runner(art) as r:
        d = r.decoder
        assert all(L.qkv.int8_activations and L.down.int8_activations for L in d.layers)
        # Q4_1's fp16 grids stay fp16 where the int8-activation kernel reads them (AVX2), not for VNNI's
        assert all(L.down.half_grid == (native.isa() == "avx2+fma") for L in d.layers)
        assert not d.head.int8_activations  # the tiny model's head is float32 (off any grid)
        outs = {}
        for on in (True, False):
            native.int8_activations(on)
            try:
                d.prefill(ids[:, :12])
                outs[on] = (r.infer({"input_ids": ids, "attention_mask": np.ones_like(ids)})["logits"], [d.step(t) for t in (5, 7, 9)])
            finally:
                native.int8_activations(True)
    np.testing.assert_allclose(outs[False][0], ref, atol=1e-4, rtol=1e-4)
    assert not np.allclose(outs[True][0], ref, atol=1e-6, rtol=0)  # really int8 activations
    np.testing.assert_allclose(outs[True][0], ref, atol=0.05 * (1 + np.abs(ref).max()), rtol=0)
    for a, b in zip(outs[True][1], outs[False][1]):
        assert not np.array_equal(a, b)
        np.testing.assert_allclose(a, b, atol=0.05 * (1 + np.abs(b).max()), rtol=0)


def _quantized_artifact(tmp_path, model: torch.nn.Module, **quantize: object) -> tuple[object, dict]:
    """``model`` through the quantize pass with these options, saved and built by native-cpu: (artifact, manifest)."""
    from core.adapters import adapter_for
    from core.models import save_hf_dir
    from passes import PassContext, get_pass_class
    from tests.conftest import byte_tokenizer

    cls = get_pass_class("quantize")
    cls(cls.config_class(**quantize)).run(model, PassContext(adapter_for(model.config)))
    save_hf_dir(model, byte_tokenizer(), tmp_path / "model")
    (tmp_path / "engine").mkdir()
    art = NativeCpuEngine({"threads": 2}).build(tmp_path / "model", tmp_path / "engine")
    return art, json.loads((art.path.parent / "manifest.json").read_text())


def _runs_as_pytorch(model: torch.nn.Module, art, seed: int, check=lambda runner: None) -> None:
    """Logits of a batch and 32 greedy tokens (the native decode step) equal the PyTorch model's;
    ``check(runner)`` looks at the opened runner first."""
    ids = np.random.default_rng(seed).integers(0, 257, (2, 24)).astype(np.int64)
    prompt = ids[:1, :20]
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids)).logits.numpy()
        gen = model.generate(torch.from_numpy(prompt), attention_mask=torch.ones(prompt.shape, dtype=torch.long), max_new_tokens=32, do_sample=False,
                             pad_token_id=0, eos_token_id=None)
    with NativeCpuEngine({"threads": 2}).runner(art) as r:
        check(r)
        got = r.infer({"input_ids": ids, "attention_mask": np.ones_like(ids)})["logits"]
        g = r.generate(prompt, 32)
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)
    np.testing.assert_array_equal(g.tokens, gen[:, 20:].numpy())


def test_a_4bit_model_is_read_as_int4_codes_and_computes_its_own_weights(tmp_path):
    """The quantize pass at 4 bits, blocks of 32, the head too, on a dense tiny Llama: every block linear
    and the untied head stored in the int4 format's zero-point form (codes + scale + zero point); logits
    and 32 greedy tokens equal the PyTorch model, which holds the same dequantized weights."""
    model = tiny_model("llama", seed=9)
    art, manifest = _quantized_artifact(tmp_path, model, bits=4, block_size=32, head=True)
    assert art.info["formats"] == {"int4": 14} and manifest["head_storage"]["format"] == "int4" and not manifest["tied_head"]
    assert "int4 weights read as 4-bit codes" in art.info["quantized_weights"] and "the LM head" in art.info["quantized_weights"]
    assert "dequantized" not in art.info["quantized_weights"]
    assert manifest["linear_bytes"] < 0.2 * manifest["linear_dense_bytes"]

    def head_is_int4(r) -> None:
        assert r.decoder.head.format == "int4" and "zeros" in r.decoder.head.arrays

    _runs_as_pytorch(model, art, 5, head_is_int4)


@pytest.mark.parametrize("kind,block", [("2:4", 32), ("2:4", 64), ("mixed", 64), ("70", 32), ("70", 64), ("70", 128)])
def test_a_sparse_model_quantized_to_4_bits_is_read_as_sparse_int4(tmp_path, kind, block):
    """Pruned (2:4, 70 % unstructured, or 2:4 attention with a 70 % MLP), then the quantize pass at 4
    bits (zeros kept): every block linear stored as ``2:4-int4`` where it is 2:4 and ``bitmask-int4``
    elsewhere (4-bit codes of the kept values, a scale and zero point per block), under 0.15 of the
    dense float32 bytes; logits and 32 greedy tokens (the native decode step) equal the PyTorch model
    holding the same weights — with blocks of 64 and 128 the bitmask-int4 and 2:4-int4 weights run their
    16-bit kernels where the CPU has them (x rounded to 1/32639 of its largest |x|)."""
    model = tiny_model("llama", seed=4)
    prune(model, kind)
    art, manifest = _quantized_artifact(tmp_path, model, bits=4, block_size=block)
    expected = {"2:4": {"2:4-int4": 14}, "70": {"bitmask-int4": 14}, "mixed": {"2:4-int4": 8, "bitmask-int4": 6}}[kind]
    assert art.info["formats"] == expected, art.info["formats"]
    for fmt, what in (("2:4-int4", "2:4 block linears read as 4-bit codes"), ("bitmask-int4", "sparse block linears read as 4-bit codes")):
        assert (f"{expected.get(fmt)} {what}" in art.info["quantized_weights"]) == (fmt in expected)
    assert "dequantized" not in art.info["quantized_weights"]
    assert manifest["linear_bytes"] < 0.15 * manifest["linear_dense_bytes"]
    # the note says, per sparse 4-bit format, where its 16-bit kernel rounds the activations and whether this CPU runs it
    note = art.info["quantized_weights"]
    assert note.count("rounded to 16 bits per token") == len(expected)
    assert note.count("(this CPU runs it)") == (("bitmask-int4" in expected and native.bitmask_int4_int16(block))
                                                + ("2:4-int4" in expected and native.twofour_int4_int16(block)))

    def stacked_keep_the_format(r) -> None:  # q, k and v stacked into one weight stay in their 4-bit format
        assert {L.qkv.format for L in r.decoder.layers} == {"bitmask-int4" if kind == "70" else "2:4-int4"}

    _runs_as_pytorch(model, art, 6, stacked_keep_the_format)


def test_a_two_four_int4_model_with_the_int8_activations_option_on_avx2(tmp_path):
    """A 2:4 model at 4 bits (blocks of 64), built with int8_activations and opened on the AVX2 path:
    every 2:4-int4 linear (q, k and v stacked too) holds the nibble layout and the decode steps and
    whole sequences multiply int8 activations — close to the model, not equal; switched off, the same
    runner is exact (the float kernel); without the option no weight holds the layout."""
    if native.best_isa() == "scalar":
        pytest.skip("this CPU has no AVX2")
    best = native.isa()
    model = tiny_model("llama", seed=4)
    prune(model, "2:4")
    art, _ = _quantized_artifact(tmp_path, model, bits=4, block_size=64)
    (tmp_path / "engine8").mkdir()
    art8 = NativeCpuEngine({"threads": 2, "int8_activations": True}).build(tmp_path / "model", tmp_path / "engine8")
    ids = np.random.default_rng(4).integers(0, 257, (1, 20)).astype(np.int64)
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids)).logits.numpy()
    try:
        native.set_isa("avx2+fma")
        with NativeCpuEngine({"threads": 2}).runner(art) as r:
            assert all(L.qkv.nibbles_ptr() is None for L in r.decoder.layers)
        with NativeCpuEngine({"threads": 2}).runner(art8) as r:
            d = r.decoder
            assert all(W.format == "2:4-int4" and W.nibbles_ptr() is not None for L in d.layers for W in (L.qkv, L.o, L.down))
            outs = {}
            for on in (True, False):
                native.int8_activations(on)
                try:
                    d.prefill(ids[:, :12])
                    outs[on] = (r.infer({"input_ids": ids[:, :4], "attention_mask": np.ones_like(ids[:, :4])})["logits"], [d.step(t) for t in (5, 7, 9)])
                finally:
                    native.int8_activations(True)
    finally:
        native.set_isa(best)
    np.testing.assert_allclose(outs[False][0], ref[:, :4], atol=1e-4, rtol=1e-4)
    assert not np.allclose(outs[True][0], ref[:, :4], atol=1e-6, rtol=0)  # 4 rows of x: the gemv kernel, int8 activations
    np.testing.assert_allclose(outs[True][0], ref[:, :4], atol=0.05 * (1 + np.abs(ref).max()), rtol=0)
    for a, b in zip(outs[True][1], outs[False][1]):
        assert not np.array_equal(a, b)
        np.testing.assert_allclose(a, b, atol=0.05 * (1 + np.abs(b).max()), rtol=0)


def test_an_artifact_with_bitmask_int4_codes_in_the_earlier_layout_is_refused_by_name(tmp_path):
    """An artifact written before bitmask-int4 codes were packed per group of 64 inputs (its manifest
    without ``bitmask_int4_group``) would be misread: opening it fails with the directory and the fix."""
    from core.errors import PipelineError

    model = tiny_model("llama", seed=4)
    prune(model, "70")
    art, manifest = _quantized_artifact(tmp_path, model, bits=4, block_size=64)
    assert manifest["bitmask_int4_group"] == 64
    with NativeCpuEngine({"threads": 1}).runner(art):
        pass
    del manifest["bitmask_int4_group"]
    (art.path.parent / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    with pytest.raises(PipelineError, match="earlier layout.*rebuild it"):
        with NativeCpuEngine({"threads": 1}).runner(art):
            pass


def test_a_4bit_width_off_the_block_is_refused_with_the_fix(tmp_path):
    """FFN channels removed to a width that is not a multiple of 32, then 4-bit blocks of 32: the
    native engine cannot hold down's grid and says so, naming the weight and the structured pass's
    round_to; with round_to: 32 the same variant builds and computes the model's weights."""
    from core.adapters import adapter_for
    from core.errors import PipelineError
    from passes import PassContext
    from passes.structured import StructuredConfig, StructuredPass

    windows = torch.randint(0, 257, (4, 32), generator=torch.Generator().manual_seed(0))
    for round_to, width in ((1, 102), (32, 96)):
        model = tiny_model("llama", seed=4)
        StructuredPass(StructuredConfig(ffn=0.2, round_to=round_to)).run(
            model, PassContext(adapter=adapter_for(model.config), calibration=lambda: windows, progress=False))
        assert model.model.layers[0].mlp.down_proj.weight.shape[1] == width
        out = tmp_path / str(round_to)
        out.mkdir()
        if round_to == 1:
            with pytest.raises(PipelineError, match=r"down_proj.weight.*round_to: 32"):
                _quantized_artifact(out, model, bits=4, block_size=32)
        else:
            art, _ = _quantized_artifact(out, model, bits=4, block_size=32)
            assert art.info["formats"] == {"int4": 14}
            _runs_as_pytorch(model, art, 5)


@pytest.mark.parametrize("t,heads,kv_heads,d", [(1, 2, 1, 8), (37, 9, 3, 64), (128, 4, 4, 32), (45, 6, 2, 80), (19, 2, 2, 20), (9, 4, 1, 128)])
def test_prefill_attention_is_rotary_causal_softmax_attention(t, heads, kv_heads, d):
    """The prefill's native attention against a float64 NumPy reference: q and k rotated (rotate-half),
    k and v in the caches at positions 0..T-1 (the rest untouched), causal softmax attention per head
    with grouped KV heads; shape, dtype and capacity errors name the input."""
    rng = np.random.default_rng(t)
    q, k, v = (rng.standard_normal((t, n * d)).astype(np.float32) for n in (heads, kv_heads, kv_heads))
    pos = np.arange(t)[:, None] / (10000.0 ** (np.arange(0, d // 2) * 2.0 / d))[None]
    emb = np.concatenate([pos, pos], -1)
    cos, sin = np.cos(emb).astype(np.float32), np.sin(emb).astype(np.float32)
    cap = t + 5
    kc, vc = np.full((kv_heads, cap, d), 7.0, np.float32), np.full((kv_heads, cap, d), 7.0, np.float32)

    def rot(x, n):
        x = x.astype(np.float64).reshape(t, n, d)
        r = np.concatenate([-x[..., d // 2:], x[..., : d // 2]], -1)
        return x * cos[:, None] + r * sin[:, None]

    qr, kr, vr = rot(q, heads), rot(k, kv_heads), v.astype(np.float64).reshape(t, kv_heads, d)
    ref = np.empty((t, heads, d))
    for h in range(heads):
        g = h // (heads // kv_heads)
        s = qr[:, h] @ kr[:, g].T / np.sqrt(d) + np.triu(np.full((t, t), -np.inf), 1)
        p = np.exp(s - s.max(-1, keepdims=True))
        ref[:, h] = (p / p.sum(-1, keepdims=True)) @ vr[:, g]
    out = native.prefill_attention(q.copy(), k.copy(), v, cos, sin, kc, vc, heads, kv_heads)
    np.testing.assert_allclose(out.reshape(t, heads, d), ref, atol=2e-5, rtol=0)
    np.testing.assert_allclose(kc[:, :t], kr.transpose(1, 0, 2), atol=2e-6, rtol=0)
    assert np.array_equal(vc[:, :t], v.reshape(t, kv_heads, d).transpose(1, 0, 2)) and (kc[:, t:] == 7.0).all() and (vc[:, t:] == 7.0).all()
    with pytest.raises(ValueError, match="q must be float32 and C-contiguous"):
        native.prefill_attention(np.asfortranarray(q) if t > 1 else q.astype(np.float64), k, v, cos, sin, kc, vc, heads, kv_heads)
    with pytest.raises(ValueError, match="do not fit"):
        native.prefill_attention(q, k, v, cos, sin, kc, vc, heads + 1, kv_heads)
    small = np.zeros((kv_heads, max(0, t - 1), d), np.float32)
    with pytest.raises(ValueError, match="exceed the KV cache"):
        native.prefill_attention(q, k, v, cos, sin, small, small.copy(), heads, kv_heads)
