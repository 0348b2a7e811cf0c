"""results.json, report.md, report.html and their figures.

One document model (:mod:`core.document`) built once by :mod:`pipeline.report.compose` and rendered by
:mod:`pipeline.report.render`; the decision maths in :mod:`pipeline.report.decision`, the
accuracy-vs-latency plot and the sparsity frontier in :mod:`pipeline.report.plots`; every pass writes its own section.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from core.artifacts import atomic_write_bytes, atomic_write_json, atomic_write_text
from pipeline.report.compose import build_document, fmt
from pipeline.report.decision import decision, judge, pareto_front, ratio_band, ratio_text, reference_point, speedup_needs, summary_rows
from pipeline.report.plots import frontier_points, render_frontier, render_plot
from pipeline.report.render import to_html, to_markdown

__all__ = ["decision", "judge", "pareto_front", "ratio_band", "ratio_text", "speedup_needs", "summary_rows", "terminal_table", "write_reports"]

log = logging.getLogger(__name__)


def write_reports(out: Path, results: dict[str, Any]) -> None:
    rows = summary_rows(results)
    results["decision"] = decision(results, rows)
    frontier = frontier_points(results, rows, results["decision"])
    doc = build_document(results, rows, results["decision"], render_plot(rows, results["decision"]), frontier, render_frontier(frontier))
    atomic_write_json(out / "results.json", results)
    for fig in doc.figures():
        atomic_write_bytes(out / fig.name, fig.png)
    atomic_write_text(out / "report.md", to_markdown(doc))
    atomic_write_text(out / "report.html", to_html(doc))
    log.info("reports written: %s", out / "report.html")


def terminal_table(results: dict[str, Any]) -> str:
    rows = summary_rows(results)
    header = f"{'variant':<18} {'backend':<16} {'sparsity':>8} {'ppl':>10} {'ppl/dense':>9} {'top1':>6} {'parity':>6} {'latency b1 ratio':>16}"
    lines = [header, "-" * len(header)]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"{r['variant']:<18} {r['backend']:<16} skipped: {r.get('reason')}")
            continue
        ref = reference_point(r["latency"])
        if r["variant"] == "dense":
            ratio = "1.000 (base)"
        elif ref and ref.get("ratio"):
            _, within = judge(ref["dense_samples_ms"], ref["variant_samples_ms"], ref["ratio"])
            ratio = "≈1.00 (noise)" if within else f"{ref['ratio']:.3f}"
        else:
            ratio = "—"
        lines.append(
            f"{r['variant']:<18} {r['backend']:<16} {fmt(r.get('sparsity'), 3):>8} {fmt(r.get('ppl_engine')):>10} "
            f"{fmt(r.get('ppl_vs_dense'), 3):>9} {fmt(r.get('top1'), 3):>6} {fmt(r.get('parity')):>6} {ratio:>16}"
        )
    return "\n".join(lines)
