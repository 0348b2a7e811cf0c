"""The report as a person sees it: report.html rendered in headless Chromium at desktop and phone
widths. Skipped, with the reason, where Chromium is not installed (Debian: apt-get install chromium)."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from pipeline.report import decision, summary_rows, write_reports

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "default_build_avx2.json"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")

MEASURE = """<script>
window.addEventListener('load', () => {
  const d = document.documentElement;
  const first = document.querySelector('table');
  parent.postMessage(JSON.stringify({
    innerWidth: window.innerWidth, scrollWidth: d.scrollWidth,
    images: [...document.images].map(i => i.naturalWidth),
    imageRight: [...document.images].map(i => i.getBoundingClientRect().right),
    firstCells: first ? [...first.rows].map(r => r.cells[0].textContent) : [],
    rowHeights: [...document.querySelectorAll('tr')].map(r => r.getBoundingClientRect().height),
    scrollBoxes: [...document.querySelectorAll('.scroll')].map(b => ({client: b.clientWidth, scroll: b.scrollWidth})),
  }), '*');
});
</script></body>"""

HOST = """<!doctype html><html><body style="margin:0">
<div id="measure"></div>
<script>window.addEventListener('message', e => {{ document.getElementById('measure').textContent = e.data; }});</script>
<iframe src="{page}" style="border:0;width:{width}px;height:{height}px"></iframe>
</body></html>"""
"""Headless Chromium will not make a window narrower than 500 px, so the page is laid out in an
iframe of the exact width (media queries and scroll widths follow the iframe's viewport); the
page reports its measurements to the host with postMessage."""


def _flags(user_dir: Path, width: int, height: int) -> list[str]:
    return [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
        f"--user-data-dir={user_dir}", f"--window-size={max(width, 500)},{height}",
    ]


def _host(page: Path, width: int, height: int, tmp: Path, name: str) -> Path:
    host = tmp / f"{name}-{width}.html"
    host.write_text(HOST.format(page=page.as_uri(), width=width, height=height), encoding="utf-8")
    return host


def render(page: Path, width: int, height: int, tmp: Path) -> dict:
    """Layout facts of ``page`` at a ``width`` px viewport, measured by a script in a copy of the page."""
    probe = tmp / f"probe-{width}.html"
    probe.write_text(page.read_text(encoding="utf-8").replace("</body>", MEASURE), encoding="utf-8")
    host = _host(probe, width, height, tmp, "host")
    out = subprocess.run(
        _flags(tmp / f"profile-{width}", width, height) + ["--virtual-time-budget=5000", "--dump-dom", host.as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    m = re.search(r'<div id="measure">(.*?)</div>', out.stdout, re.S)
    assert m and m.group(1), f"no measurement in Chromium's DOM (exit {out.returncode}): {out.stderr[-500:]}"
    return json.loads(html.unescape(m.group(1)))


def screenshot(page: Path, width: int, height: int, dest: Path, tmp: Path) -> None:
    """A PNG of ``page`` at a ``width`` px viewport (cropped to it), for a person to look at."""
    host = _host(page, width, height, tmp, "shot")
    subprocess.run(_flags(tmp / f"shot-{width}", width, height) + [f"--screenshot={dest}", host.as_uri()], capture_output=True, timeout=120)
    assert dest.is_file() and dest.stat().st_size > 1000, f"no screenshot written to {dest}"


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report")
    results = json.loads(RESULTS.read_text(encoding="utf-8"))
    results.pop("decision", None)
    write_reports(out, results)
    return out / "report.html"


def test_decision_on_the_measured_default_build():
    """Computed from the committed results of the default build (not a rendering question)."""
    results = json.loads(RESULTS.read_text(encoding="utf-8"))
    rows = summary_rows(results)
    d = decision(results, rows)
    (kind, k), = d["latency"].items()
    assert kind == "prefill b1×512"
    assert k["variants"]["sparsegpt-2of4"]["within_noise"]  # 2:4 on a CPU: no faster than dense
    assert not k["variants"]["ffn50-kv1-kd"]["within_noise"] and k["variants"]["ffn50-kv1-kd"]["ratio"] < 0.7
    assert k["pareto"] == ["ffn50-kv1-kd", "dense"]  # sparsegpt-2of4 is dominated by the structured variant
    assert [s["variant"] for s in k["ship"]] == ["dense", "dense", "ffn50-kv1-kd"]
    assert [n["variant"] for n in d["needs_other_hardware"]] == ["sparsegpt-2of4"]


def test_markdown_labels_ratios_within_noise(report):
    md = (report.parent / "report.md").read_text(encoding="utf-8")
    row = next(line for line in md.splitlines() if line.startswith("| sparsegpt-2of4 | onnxruntime-cpu | b1/s128"))
    assert row.count("≈ 1.00 (within noise") == 2
    row = next(line for line in md.splitlines() if line.startswith("| ffn50-kv1-kd | onnxruntime-cpu | b1/s128"))
    assert "within noise" not in row and re.search(r"×0\.6\d\d \[0\.\d+–0\.\d+\]", row)
    assert "Measured on: AMD EPYC (2 cores; avx2)" in md


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (Debian: apt-get install chromium); the report is not rendered")
@pytest.mark.parametrize("width", [1400, 390])
def test_report_reads_at_desktop_and_phone_width(report, width, tmp_path):
    m = render(report, width, 1600, tmp_path)
    assert m["innerWidth"] == width
    assert m["firstCells"][1:] == ["dense", "sparsegpt-2of4", "ffn50-kv1-kd"]  # every variant row, header first
    assert m["images"] and all(w > 0 for w in m["images"])  # the plot loaded
    assert all(r <= width for r in m["imageRight"])  # and fits the page
    assert m["scrollWidth"] <= width, f"page scrolls sideways at {width} px: {m['scrollWidth']}"
    assert max(m["rowHeights"]) < 60, f"a table row is {max(m['rowHeights'])} px tall (numbers wrapping)"
    if width == 1400:
        assert all(b["scroll"] <= b["client"] for b in m["scrollBoxes"]), "the table scrolls at desktop width"
    else:
        assert any(b["scroll"] > b["client"] for b in m["scrollBoxes"])  # the wide table scrolls in its own box
    screenshot(report, width, 1600, report.parent / f"report-{width}.png", tmp_path)
