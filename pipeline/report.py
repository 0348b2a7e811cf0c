"""results.json, report.md, report.html and the accuracy-vs-latency plot."""

from __future__ import annotations

import base64
import html
import logging
from pathlib import Path
from typing import Any

from core.artifacts import atomic_write_bytes, atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

PLOT_NAME = "accuracy_latency.png"


def _fmt(x: Any, digits: int = 2) -> str:
    if x is None:
        return "—"
    if isinstance(x, bool):
        return "pass" if x else "FAIL"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _mb(n: int | None) -> str:
    return "—" if n is None else f"{n / 1e6:.1f}"


def summary_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (variant, engine) with the headline figures, dense-relative where it applies."""
    rows = []
    dense_ppl: dict[str, float] = {}
    for v in results["variants"]:
        for backend, r in v["engines"].items():
            if v["name"] == "dense" and r.get("status") == "ok" and "perplexity_engine" in r:
                dense_ppl[backend] = r["perplexity_engine"]["perplexity"]
    for v in results["variants"]:
        for backend, r in v["engines"].items():
            row: dict[str, Any] = {"variant": v["name"], "backend": backend, "status": r.get("status")}
            if r.get("status") != "ok":
                row["reason"] = r.get("reason")
                rows.append(row)
                continue
            size = r.get("size", {})
            row["sparsity"] = size.get("block_linear_sparsity")
            row["parameters"] = size.get("parameters")
            row["nonzero"] = size.get("nonzero_parameters")
            row["onnx_bytes"] = size.get("onnx_bytes")
            row["needs"] = speedup_needs(v)
            if "perplexity_engine" in r:
                row["ppl_torch"] = r["perplexity_torch"]["perplexity"]
                row["ppl_engine"] = r["perplexity_engine"]["perplexity"]
                row["ppl_engine_vs_torch"] = r["perplexity_engine_vs_torch"]
                row["ppl_check_windows"] = r.get("perplexity_engine_vs_torch_windows", r["perplexity_torch"]["windows"])
                if backend in dense_ppl:
                    row["ppl_vs_dense"] = row["ppl_engine"] / dense_ppl[backend]
            agr = r.get("agreement") or {}
            row["top1"] = agr.get("top1_agreement")
            row["kl"] = agr.get("kl_dense_variant")
            row["cosine"] = agr.get("mean_cosine")
            row["parity"] = r.get("parity", {}).get("passed")
            row["parity_maxabs"] = r.get("parity", {}).get("max_absdiff")
            pts = (r.get("latency") or {}).get("points", [])
            row["latency"] = pts
            rows.append(row)
    return rows


NEEDS_SPARSE_TENSOR_CORES = "needs sparse tensor cores (TensorRT SPARSE_WEIGHTS / cuSPARSELt); no CPU kernel accelerates it"
NEEDS_SPARSE_KERNEL = "needs a sparse-matrix kernel; ONNX Runtime CPU and TensorRT run it dense"
NEEDS_NOTHING = "runs faster anywhere: its matrices are smaller"


def speedup_needs(variant: dict[str, Any]) -> str:
    """What hardware or kernel the variant's pruning needs before it can be faster than dense."""
    if variant["name"] == "dense":
        return "baseline"
    kinds = set()
    for p in variant.get("passes", []):
        (name, opts), = p.items()
        if name == "structured":
            kinds.add("masked" if opts.get("apply") == "mask" else "structured")
        elif opts.get("pattern"):
            kinds.add("nm")
        elif opts.get("sparsity") is not None:
            kinds.add("unstructured")
    if "nm" in kinds:
        return NEEDS_SPARSE_TENSOR_CORES
    if "unstructured" in kinds:
        return NEEDS_SPARSE_KERNEL
    if "structured" in kinds:
        return NEEDS_NOTHING
    if "masked" in kinds:
        return "zeroed heads/channels: faster only after the graph 'shrink' pass removes them"
    return "—"


def machine_line(env: dict[str, Any]) -> str:
    """Where the latency was measured: CPU model, cores, the instruction sets that matter, runtimes."""
    cpu = env.get("cpu") or {}
    isa = ", ".join(cpu.get("isa") or []) or "no AVX2/AVX-512/AMX reported"
    return (
        f"Measured on: {cpu.get('model') or env.get('machine')} ({env.get('cpus')} cores; {isa}); "
        f"Python {env.get('python')}, torch {env.get('torch')}, onnxruntime {env.get('onnxruntime')}. "
        "Latency from a different machine is not comparable with these figures."
    )


def _latency_cells(points: list[dict[str, Any]], dense: bool) -> str:
    if not points:
        return "—"
    parts = []
    for p in points:
        ms = p["dense_median_ms"] if dense else p["variant_median_ms"]
        ratio = "" if dense or p["ratio"] is None else f" (×{p['ratio']:.3f})"
        parts.append(f"b{p['batch']}/s{p['sequence']}: {ms:.1f} ms{ratio}")
    return "; ".join(parts)


def render_markdown(results: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    ev = results["data"]["evaluation"]
    env = results["environment"]
    lines = [
        f"# Build report: {results['recipe']['name']}",
        "",
        f"Model: `{results['model']['source']}` ({results['model']['kind']}). "
        f"Evaluation: {ev['windows']} windows × {ev['length']} tokens. "
        f"Calibration ({results['data']['calibration']['windows']} × {results['data']['calibration']['length']}, seed {results['data']['calibration']['seed']}) "
        f"used by: {', '.join(results['data']['calibration_used_by']) or 'no variant'}.",
        machine_line(env),
        "",
        "Perplexity is the engine's over every evaluation window; \"engine vs PyTorch\" compares the two on the first few windows.",
        "",
        "| variant | backend | linear sparsity | parameters (M) | ppl (engine) | engine vs PyTorch | ppl / dense | top-1 agree | KL(dense‖v) | parity | ONNX MB | speed-up needs |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['variant']} | {r['backend']} | skipped: {r.get('reason')} |  |  |  |  |  |  |  |  |  |")
            continue
        lines.append(
            f"| {r['variant']} | {r['backend']} | {_fmt(r.get('sparsity'), 3)} | {_mb(r.get('parameters'))} | {_fmt(r.get('ppl_engine'))} "
            f"| {_check_cell(r)} | {_fmt(r.get('ppl_vs_dense'), 3)} | {_fmt(r.get('top1'), 3)} | {_fmt(r.get('kl'), 4)} "
            f"| {_fmt(r.get('parity'))} ({_fmt(r.get('parity_maxabs'), 5)}) | {_mb(r.get('onnx_bytes'))} | {r.get('needs')} |"
        )
    lines += ["", "## Prefill latency (median, engine; variant/dense ratio, interleaved in one process)", ""]
    lines += ["| variant | backend | latency |", "|---|---|---|"]
    for r in rows:
        if r["status"] == "ok":
            lines.append(f"| {r['variant']} | {r['backend']} | {_latency_cells(r['latency'], r['variant'] == 'dense')} |")
    if results.get("decode"):
        d = results["decode"]
        lines += [
            "",
            f"## Decode (KV cache, {d['runtime']}, batch {d['batch']}, {d['prompt_tokens']}-token prompt; variant/dense ratios interleaved)",
            "",
            "| variant | greedy tokens = PyTorch | max abs Δlogit | decode ms/token | ratio | prefill ms | ratio |",
            "|---|---|---|---|---|---|---|",
        ]
        for v in results["variants"]:
            r = v.get("decode")
            if r:
                lines.append(
                    f"| {v['name']} | {'yes' if r['tokens_identical'] else 'NO'} ({r['greedy_tokens']}) | {r['max_abs_logit_delta']:.2e} "
                    f"| {r['decode_ms_per_token']:.2f} | ×{r['decode_ratio']:.3f} | {r['prefill_ms']:.1f} | ×{r['prefill_ratio']:.3f} |"
                )
    lines += _structured_section(results)
    if results.get("skips"):
        lines += ["", "## Skipped backends", ""]
        for s in {(s["backend"], s["reason"]) for s in results["skips"]}:
            lines.append(f"- `{s[0]}`: {s[1]}")
    lines += ["", f"![accuracy vs latency]({PLOT_NAME})", ""]
    return "\n".join(lines)


def _structured_section(results: dict[str, Any]) -> list[str]:
    """Per-layer kept heads / KV heads / FFN channels of structured variants, and their recovery runs."""
    lines: list[str] = []
    for v in results["variants"]:
        for pr in v.get("pass_results", []):
            info = pr.get("info") or {}
            if pr.get("name") == "structured" and info.get("kept"):
                after, before = info["parameters_after"], info["parameters_before"]
                lines += [
                    "",
                    f"**{v['name']}**: {before / 1e6:.2f}M → {after / 1e6:.2f}M parameters ({100 * after / before:.1f} %); "
                    f"{info['importance']} importance, {info['head_unit']} head units, {info['allocation']} allocation, {info['apply']}.",
                    "",
                    "| block | heads | KV heads | FFN channels |",
                    "|---|---|---|---|",
                ]
                lines += [
                    f"| {k['block']} | {k['heads']} / {k['dense']['heads']} | {k['kv_heads']} / {k['dense']['kv_heads']} | {k['ffn']} / {k['dense']['ffn']} |"
                    for k in info["kept"]
                ]
            elif pr.get("name") == "distill" and info:
                budget = info.get("budget", {})
                minutes = f", {budget['max_minutes']} min" if budget.get("max_minutes") else ""
                lines += [
                    "",
                    f"**{v['name']}** recovery: {info['steps']} of {info['steps_planned']} steps"
                    f"{' (stopped at the time budget)' if info.get('stopped_early') else ''}, {info['tokens']} tokens, "
                    f"{info['train_seconds']:.0f} s ({info['compute_dtype']}); budget {budget.get('steps')} steps{minutes}; "
                    f"loss {info['loss_first10']:.4f} (first 10 steps) → {info['loss_last10']:.4f} (last 10)",
                ]
    return ["", "## Structured pruning (kept / dense, per block)", *lines] if lines else []


def _check_cell(r: dict[str, Any]) -> str:
    if r.get("ppl_engine_vs_torch") is None:
        return "—"
    return f"{_pct(r['ppl_engine_vs_torch'])} ({r['ppl_check_windows']} windows)"


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:+.4f}%"


def _reference_point(points: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The batch-1, longest-sequence point (the shape the plot uses)."""
    if not points:
        return None
    b1 = [p for p in points if p["batch"] == min(q["batch"] for q in points)]
    return max(b1, key=lambda p: p["sequence"])


def render_plot(rows: list[dict[str, Any]]) -> bytes | None:
    pts = []
    for r in rows:
        ref = _reference_point(r.get("latency") or [])
        if r.get("ppl_engine") is None or ref is None:
            continue
        ms = ref["dense_median_ms"] if r["variant"] == "dense" else ref["variant_median_ms"]
        pts.append((r["variant"], r["backend"], ms, r["ppl_engine"], ref))
    if not pts:
        return None
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=110)
    for name, backend, ms, ppl, _ in pts:
        ax.scatter([ms], [ppl], s=40, marker="*" if name == "dense" else "o")
        ax.annotate(name, (ms, ppl), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ref = pts[0][4]
    ax.set_xlabel(f"prefill latency, batch {ref['batch']} × {ref['sequence']} tokens (ms, median)")
    ax.set_ylabel("perplexity (engine, eval split)")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title("accuracy vs latency")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def render_html(md_rows: list[dict[str, Any]], results: dict[str, Any], plot: bytes | None) -> str:
    esc = html.escape
    head = ["variant", "backend", "linear sparsity", "parameters (M)", "ppl (engine)", "engine vs PyTorch", "ppl / dense", "top-1 agree", "KL(dense‖v)", "parity (max |Δ|)", "ONNX MB", "prefill latency", "speed-up needs"]
    body = []
    for r in md_rows:
        if r["status"] != "ok":
            body.append(f"<tr><td>{esc(r['variant'])}</td><td>{esc(r['backend'])}</td><td colspan='{len(head) - 2}'>skipped: {esc(str(r.get('reason')))}</td></tr>")
            continue
        cells = [
            r["variant"],
            r["backend"],
            _fmt(r.get("sparsity"), 3),
            _mb(r.get("parameters")),
            _fmt(r.get("ppl_engine")),
            _check_cell(r),
            _fmt(r.get("ppl_vs_dense"), 3),
            _fmt(r.get("top1"), 3),
            _fmt(r.get("kl"), 4),
            f"{_fmt(r.get('parity'))} ({_fmt(r.get('parity_maxabs'), 5)})",
            _mb(r.get("onnx_bytes")),
            _latency_cells(r["latency"], r["variant"] == "dense"),
            r.get("needs"),
        ]
        body.append("<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in cells) + "</tr>")
    img = ""
    if plot:
        img = f"<img alt='accuracy vs latency' src='data:image/png;base64,{base64.b64encode(plot).decode()}'>"
    ev = results["data"]["evaluation"]
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Build report: {esc(results['recipe']['name'])}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px;font-size:90%}}th{{background:#f0f0f0}}</style>
</head><body>
<h1>Build report: {esc(results['recipe']['name'])}</h1>
<p>Model <code>{esc(results['model']['source'])}</code>; evaluation {ev['windows']} windows × {ev['length']} tokens.
Perplexity is the engine's over every evaluation window; "engine vs PyTorch" compares the two on the first few windows.
Latency ratios are variant/dense medians measured interleaved in one process.</p>
<p>{esc(machine_line(results.get('environment') or {}))}</p>
<table><tr>{''.join(f'<th>{esc(h)}</th>' for h in head)}</tr>
{''.join(body)}
</table>
{_decode_html(results)}
<h2>Accuracy vs latency</h2>
{img or '<p>No latency or perplexity figures to plot.</p>'}
</body></html>
"""


def _decode_html(results: dict[str, Any]) -> str:
    if not results.get("decode"):
        return ""
    d = results["decode"]
    rows = []
    for v in results["variants"]:
        r = v.get("decode")
        if r:
            cells = [
                v["name"],
                f"{'yes' if r['tokens_identical'] else 'NO'} ({r['greedy_tokens']})",
                f"{r['max_abs_logit_delta']:.2e}",
                f"{r['decode_ms_per_token']:.2f} (×{r['decode_ratio']:.3f})",
                f"{r['prefill_ms']:.1f} (×{r['prefill_ratio']:.3f})",
            ]
            rows.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    head = "".join(f"<th>{h}</th>" for h in ("variant", "greedy tokens = PyTorch", "max |Δlogit|", "decode ms/token", "prefill ms"))
    return (
        f"<h2>Decode (KV cache, {html.escape(d['runtime'])}, batch {d['batch']}, {d['prompt_tokens']}-token prompt)</h2>"
        f"<table><tr>{head}</tr>{''.join(rows)}</table>"
    )


def write_reports(out: Path, results: dict[str, Any]) -> None:
    rows = summary_rows(results)
    plot = render_plot(rows)
    atomic_write_json(out / "results.json", results)
    atomic_write_text(out / "report.md", render_markdown(results, rows))
    if plot:
        atomic_write_bytes(out / PLOT_NAME, plot)
    atomic_write_text(out / "report.html", render_html(rows, results, plot))
    log.info("reports written: %s", out / "report.html")


def terminal_table(results: dict[str, Any]) -> str:
    rows = summary_rows(results)
    header = f"{'variant':<18} {'backend':<16} {'sparsity':>8} {'ppl':>10} {'ppl/dense':>9} {'top1':>6} {'parity':>6} {'latency b1 ratio':>16}"
    lines = [header, "-" * len(header)]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"{r['variant']:<18} {r['backend']:<16} skipped: {r.get('reason')}")
            continue
        ref = _reference_point(r["latency"])
        ratio = "1.000 (base)" if r["variant"] == "dense" else (f"{ref['ratio']:.3f}" if ref and ref.get("ratio") else "—")
        lines.append(
            f"{r['variant']:<18} {r['backend']:<16} {_fmt(r.get('sparsity'), 3):>8} {_fmt(r.get('ppl_engine')):>10} "
            f"{_fmt(r.get('ppl_vs_dense'), 3):>9} {_fmt(r.get('top1'), 3):>6} {_fmt(r.get('parity')):>6} {ratio:>16}"
        )
    return "\n".join(lines)
