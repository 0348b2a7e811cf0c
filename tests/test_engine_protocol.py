"""Validation goes through ``engine.runner(artifact)`` for every backend: a fake backend whose artifact
is not an ONNX file (a zlib container nobody else can open) runs a whole tiny build — perplexity,
agreement, parity through Polygraphy's Comparator, latency — and the report names what parity ran on."""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from core.errors import OptionError
from engines.base import Engine, EngineArtifact, Runner, TensorMeta

MAGIC = b"ZLIBENGINE\x00"


@dataclass
class ZlibOptions:
    level: int = 6

    def __post_init__(self) -> None:
        if not 0 <= self.level <= 9:
            raise OptionError("level", f"level {self.level} is outside [0, 9]")


class ZlibEngine(Engine):
    """An engine whose artifact is the ONNX graph compressed behind a magic header: ONNX Runtime,
    Polygraphy and onnx.load cannot open it; only this engine's runner can."""

    name = "zlib-fake"
    options_class = ZlibOptions
    activations = 0

    def check_available(self) -> None:
        pass

    def build(self, onnx_path: Path, out_dir: Path) -> EngineArtifact:
        out = Path(out_dir) / "model.zlibengine"
        out.write_bytes(MAGIC + zlib.compress(Path(onnx_path).read_bytes(), self.options["level"]))
        return EngineArtifact(self.name, out, {"bytes": out.stat().st_size})

    def runner(self, artifact: EngineArtifact, **_: Any) -> "ZlibRunner":
        return ZlibRunner(Path(artifact.path))


class ZlibRunner(Runner):
    def __init__(self, path: Path):
        super().__init__()
        self.path = path
        self.name = f"zlib-fake:{path.parent.name}"
        self.session = None

    def activate_impl(self) -> None:
        import onnxruntime as ort

        data = self.path.read_bytes()
        assert data.startswith(MAGIC)
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        self.session = ort.InferenceSession(zlib.decompress(data[len(MAGIC):]), so, providers=["CPUExecutionProvider"])
        ZlibEngine.activations += 1

    def deactivate_impl(self) -> None:
        self.session = None

    def describe(self) -> str:
        return "zlib-fake runner (in-memory ONNX Runtime session)"

    def input_metadata(self) -> list[TensorMeta]:
        return [TensorMeta(i.name, np.dtype(np.int64), tuple(i.shape)) for i in self.session.get_inputs()]

    def infer_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = [o.name for o in self.session.get_outputs()]
        return dict(zip(names, self.session.run(names, feeds)))


@pytest.fixture()
def fake_backend(monkeypatch):
    from engines import KNOWN_BACKENDS

    monkeypatch.setitem(KNOWN_BACKENDS, "zlib-fake", ZlibEngine)
    ZlibEngine.activations = 0
    return "zlib-fake"


def test_a_whole_build_on_a_backend_whose_artifact_is_not_onnx(fake_backend, tiny_dirs, text_file, tmp_path):
    import onnx
    from test_build import tiny_recipe

    from pipeline.build import build

    out = tmp_path / "b"
    summary = build(tiny_recipe(tiny_dirs["llama"], text_file, out, engines=[{"backend": fake_backend, "options": {"level": 1}}]))
    art = out / "magnitude-50" / f"engine-{fake_backend}" / "model.zlibengine"
    with pytest.raises(Exception):
        onnx.load(str(art))  # what Polygraphy's OnnxrtRunner would have tried
    for v in summary.results["variants"]:
        r = v["engines"][fake_backend]
        assert r["status"] == "ok", r
        assert r["parity"]["passed"] and r["parity"]["engine_runner"] == "zlib-fake runner (in-memory ONNX Runtime session)"
        assert abs(r["perplexity_engine_vs_torch"]) < 1e-3
        assert len(r["latency"]["points"]) == 1
    assert ZlibEngine.activations >= 3 * 2  # every variant: perplexity and parity (and latency) opened this runner
    assert "zlib-fake runner" in (out / "report.md").read_text() and "zlib-fake runner" in (out / "report.html").read_text()


def test_the_ort_backend_parity_runs_on_the_engine_it_built(tiny_dirs, text_file, tmp_path):
    from test_build import tiny_recipe

    from pipeline.build import build

    res = build(tiny_recipe(tiny_dirs["llama"], text_file, tmp_path / "b", variants=[])).results
    parity = res["variants"][0]["engines"]["onnxruntime-cpu"]["parity"]
    assert parity["engine_runner"].endswith("CPUExecutionProvider (model.ort.onnx)"), parity  # the optimised model the engine stage wrote


def test_fake_backend_options_are_typed(fake_backend):
    from core.errors import RecipeError
    from pipeline.recipe import recipe_from_dict

    with pytest.raises(RecipeError, match=r"engines\[0\]\.options\.level': level 12 is outside"):
        recipe_from_dict({"name": "x", "engines": [{"backend": fake_backend, "options": {"level": 12}}], "variants": []})
    with pytest.raises(RecipeError, match=r"engines\[0\]\.options\.level': expected an integer"):
        recipe_from_dict({"name": "x", "engines": [{"backend": fake_backend, "options": {"level": "high"}}], "variants": []})
    assert json.dumps(ZlibEngine({}).options) == '{"level": 6}'
