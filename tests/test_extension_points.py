"""The extension points hold: a method with its own report section is its pass file + one registry
line (no edit of pipeline/), a stage kind is one module + one list entry, and no module of pipeline/
names a pass."""

from __future__ import annotations

import io
import json
import re
import tokenize
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


# --- a test-only pass with its own report section -------------------------------------------------


@dataclass
class EchoConfig:
    note: str = "hello"

    def __post_init__(self) -> None:
        if not self.note:
            raise ValueError("note is empty")


def make_echo_pass():
    from passes.base import Pass, PassResult

    class EchoPass(Pass):
        """Changes nothing; reports its note and how many linears it saw."""

        name = "echo-test"
        config_class = EchoConfig
        report_title = "Echo (a test-only pass)"

        def run(self, model: Any, ctx: Any) -> PassResult:
            return PassResult(self.name, info={"note": self.config.note, "linears": len(ctx.adapter.linears(model))})

        @classmethod
        def report_section(cls, variant: dict[str, Any], result: dict[str, Any]) -> list[Any]:
            from core.document import Paragraph, Table

            info = result["info"]
            return [Paragraph(f"**{variant['name']}** says `{info['note']}`."), Table(["variant", "linears seen"], [[variant["name"], str(info["linears"])]])]

    return EchoPass


def test_a_new_pass_brings_its_own_report_section(tiny_dirs, text_file, tmp_path, monkeypatch):
    from test_build import tiny_recipe

    from passes import base
    from pipeline.build import build

    echo = make_echo_pass()
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))
    base.register_pass(echo)  # the one registry line
    out = tmp_path / "b"
    build(tiny_recipe(tiny_dirs["llama"], text_file, out, variants=[{"name": "echoed", "passes": [{"echo-test": {"note": "from a test pass"}}]}]))
    md, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    assert "## Echo (a test-only pass)" in md and "**echoed** says `from a test pass`." in md and "| echoed | 14 |" in md
    assert "<h2>Echo (a test-only pass)</h2>" in page and "<b>echoed</b> says <code>from a test pass</code>." in page
    assert "<td>echoed</td><td>14</td>" in page


# --- a test-only stage ---------------------------------------------------------------------------------


def make_echo_stage():
    from core.artifacts import stable_hash
    from pipeline.stages.base import Scope, Stage, variant_entry

    class EngineBytesStage(Stage):
        """Per variant × engine: the engine artifact's size and SHA-256 prefix, read from its files."""

        kind = "engine-bytes"
        scope = Scope.VARIANT_ENGINE
        built = 0

        def key(self, ctx: Any, v: Any, e: Any) -> str:
            return stable_hash("engine-bytes", ctx.content(v.name, f"engine-{e.backend}"))

        def build(self, ctx: Any, tmp: Path, v: Any, e: Any) -> dict[str, Any]:
            import hashlib

            type(self).built += 1
            art = next(p for p in (ctx.out / v.name / f"engine-{e.backend}").iterdir() if p.name != "stage.json")
            data = art.read_bytes()
            (tmp / "bytes.json").write_text(json.dumps({"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()[:16]}))
            return {}

        def contribute(self, ctx: Any, results: dict[str, Any], v: Any, e: Any) -> None:
            entry = variant_entry(results, v.name)["engines"][e.backend]
            entry["engine_bytes_stage"] = json.loads((self.path(ctx, v, e) / "bytes.json").read_text())

    return EngineBytesStage


def test_a_new_stage_is_one_class_and_one_list_entry(tiny_dirs, text_file, tmp_path):
    from test_build import tiny_recipe

    from pipeline.build import STAGES, Builder

    stage_cls = make_echo_stage()
    stages = [*STAGES, stage_cls()]  # the one list entry
    recipe = tiny_recipe(tiny_dirs["llama"], text_file, tmp_path / "b")
    summary = Builder(recipe, stages=stages).run()
    for v in summary.results["variants"]:
        got = v["engines"]["onnxruntime-cpu"]["engine_bytes_stage"]
        assert got["bytes"] == (tmp_path / "b" / v["name"] / "engine-onnxruntime-cpu" / "model.ort.onnx").stat().st_size
        assert (tmp_path / "b" / v["name"] / "engine-bytes-onnxruntime-cpu" / "stage.json").is_file()
    assert stage_cls.built == 3
    again = Builder(recipe, stages=stages).run()  # reused like every stage, and contributes the same
    assert stage_cls.built == 3 and again.reused_all
    assert [v["engines"]["onnxruntime-cpu"]["engine_bytes_stage"] for v in again.results["variants"]] == [
        v["engines"]["onnxruntime-cpu"]["engine_bytes_stage"] for v in summary.results["variants"]
    ]


# --- pipeline/ names no pass ----------------------------------------------------------------------------


def pass_names_in(path: Path, names: list[str]) -> list[tuple[int, str]]:
    """(line, word) of every code or string token of ``path`` (comments excluded) that contains a pass
    name as a word of its own, any case (an underscore separates words: ``sds_text`` counts, ``unstructured`` does not)."""
    pattern = re.compile(r"(?<![A-Za-z0-9-])(" + "|".join(map(re.escape, names)) + r")(?![A-Za-z0-9])", re.IGNORECASE)
    out = []
    for tok in tokenize.generate_tokens(io.StringIO(path.read_text(encoding="utf-8")).readline):
        if tok.type in (tokenize.NAME, tokenize.STRING) or tok.type == getattr(tokenize, "FSTRING_MIDDLE", -1):
            out += [(tok.start[0], m.group(1)) for m in pattern.finditer(tok.string)]
    return out


def test_no_module_of_pipeline_names_a_pass():
    from passes import registry

    names = sorted(registry())
    hits = [f"{p.relative_to(ROOT)}:{line} '{word}'" for p in sorted((ROOT / "pipeline").rglob("*.py")) for line, word in pass_names_in(p, names)]
    assert not hits, "pipeline/ must not know the passes:\n" + "\n".join(hits)


def test_the_pass_name_check_can_fail(tmp_path):
    p = tmp_path / "x.py"
    p.write_text('# magnitude in a comment is fine\nif name == "structured":\n    x = 1\nSDS_TITLE = "ok"\n', encoding="utf-8")
    assert pass_names_in(p, ["magnitude", "structured", "sds"]) == [(2, "structured"), (4, "SDS")]
