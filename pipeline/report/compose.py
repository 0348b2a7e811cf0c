"""results.json → one :class:`core.document.Document`: the header, the summary table, what to ship,
latency and decode tables, every pass's own section (declared by the pass class: ``report_title`` and
``report_section``), skipped backends and the accuracy-vs-latency plot. Nothing here knows a pass."""

from __future__ import annotations

from typing import Any

from core.document import Bullets, Document, Figure, Paragraph, Section, Table
from pipeline.report.decision import judge, ratio_text
from pipeline.report.plots import FRONTIER_NAME, PLOT_NAME

PARITY_FLOOR_NOTE = (
    "A failed parity is re-checked against the same model run in float64: \"fp32 floor\" is PyTorch fp32's own distance "
    "from it, \"engine\" the engine's. An engine about as far from float64 as PyTorch fp32 is (within 10×) sits at the "
    "model's rounding floor rather than being an export error — a per-token top-k selection turns an ulp at "
    "the k-th boundary into a different unit and a visible logit change; on such a model a floor this high also means "
    "elementwise parity cannot tell a right engine from a slightly wrong one."
)


def fmt(x: Any, digits: int = 2) -> str:
    if x is None:
        return "—"
    if isinstance(x, bool):
        return "pass" if x else "FAIL"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _mb(n: int | None) -> str:
    return "—" if n is None else f"{n / 1e6:.1f}"


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:+.4f}%"


def machine_line(env: dict[str, Any]) -> str:
    """Where the latency was measured: CPU model, cores, the instruction sets that matter, runtimes."""
    cpu = env.get("cpu") or {}
    isa = ", ".join(cpu.get("isa") or []) or "no AVX2/AVX-512/AMX reported"
    return (
        f"Measured on: {cpu.get('model') or env.get('machine')} ({env.get('cpus')} cores; {isa}); "
        f"Python {env.get('python')}, torch {env.get('torch')}, onnxruntime {env.get('onnxruntime')}. "
        "Latency from a different machine is not comparable with these figures."
    )


def parity_cell(r: dict[str, Any]) -> str:
    """'pass (max |Δ|)', or 'FAIL (max |Δ|)' with the float64 diagnosis when one was made."""
    cell = f"{fmt(r.get('parity'))} ({fmt(r.get('parity_maxabs'), 5)})"
    f = r.get("parity_fp64") or {}
    if "within_floor" in f:
        verdict = "within it" if f["within_floor"] else "engine farther"
        cell += f"; vs float64: fp32 floor {f['torch_fp32_vs_fp64']:.3g}, engine {f['engine_vs_fp64']:.3g} ({verdict})"
    elif "skipped" in f:
        cell += f"; float64 check skipped: {f['skipped']}"
    return cell


def greedy_cell(r: dict[str, Any]) -> str:
    """'yes (32)', or 'NO (32)' with the float64 diagnosis when one was made."""
    cell = f"{'yes' if r['tokens_identical'] else 'NO'} ({r['greedy_tokens']})"
    f = r.get("fp64_reference") or {}
    if "engine_tokens_equal_fp64" in f:
        cell += (
            f"; leading tokens equal to float64: engine {f['engine_tokens_equal_fp64']}, PyTorch fp32 {f['torch_fp32_tokens_equal_fp64']}"
            f" (first-step |Δlogit| to float64 {f['engine_first_step_vs_fp64']:.3g} / {f['torch_fp32_first_step_vs_fp64']:.3g})"
        )
    elif "skipped" in f:
        cell += f"; float64 check skipped: {f['skipped']}"
    return cell


def _check_cell(r: dict[str, Any]) -> str:
    if r.get("ppl_engine_vs_torch") is None:
        return "—"
    return f"{_pct(r['ppl_engine_vs_torch'])} ({r['ppl_check_windows']} win.)"


def _latency_cells(points: list[dict[str, Any]], dense: bool) -> str:
    if not points:
        return "—"
    parts = []
    for p in points:
        own = p["dense_samples_ms"] if dense else p["variant_samples_ms"]
        ms = p["dense_median_ms"] if dense else p["variant_median_ms"]
        spread = f" [{min(own):.1f}–{max(own):.1f}]" if own else ""
        ratio = "" if dense else " " + ratio_text(p["ratio"], *judge(p["dense_samples_ms"], p["variant_samples_ms"], p["ratio"]))
        parts.append(f"b{p['batch']}/s{p['sequence']}: {ms:.1f} ms{spread}{ratio}")
    return "; ".join(parts)


def decode_baseline_samples(results: dict[str, Any], metric: str) -> list[float]:
    """Samples of the decode stage's baseline for ``metric``: the fastest dense run (older results:
    dense on ONNX Runtime's KV-cache graphs)."""
    base = (results.get("decode") or {}).get("baseline")
    if base:
        return base[metric]["samples"]
    return next(v["decode"] for v in results["variants"] if v["name"] == "dense")["samples"][metric]


def _decode_ratios(results: dict[str, Any], r: dict[str, Any]) -> list[str]:
    """Decode and prefill ratio cells of one decode run, each with its interleaved band against the baseline."""
    out = []
    for metric, ratio in (("decode_ms_per_token", "decode_ratio"), ("prefill_ms", "prefill_ratio")):
        base = decode_baseline_samples(results, metric)
        out.append("×1.000 (baseline)" if r["samples"][metric] is base or r["samples"][metric] == base else ratio_text(r[ratio], *judge(base, r["samples"][metric], r[ratio])))
    return out


def _summary_table(rows: list[dict[str, Any]]) -> Table:
    header = ["variant", "backend", "linear sparsity", "parameters (M)", "ppl (engine)", "engine vs PyTorch", "ppl / dense",
              "top-1 agree", "KL(dense‖v)", "parity (max |Δ|)", "ONNX MB", "speed-up needs"]
    body = []
    for r in rows:
        if r["status"] != "ok":
            body.append([r["variant"], r["backend"], f"skipped: {r.get('reason')}"])
            continue
        body.append([
            r["variant"], r["backend"], fmt(r.get("sparsity"), 3), _mb(r.get("parameters")), fmt(r.get("ppl_engine")), _check_cell(r),
            fmt(r.get("ppl_vs_dense"), 3), fmt(r.get("top1"), 3), fmt(r.get("kl"), 4), parity_cell(r), _mb(r.get("onnx_bytes")),
            r.get("needs_short") or "—",
        ])
    return Table(header, body)


def _busy_note(stage: str, shares: dict[str, float]) -> list[Paragraph]:
    """The warning above a timing table whose rounds ran on a busy host (core.resources.HostLoad)."""
    held = ", ".join(f"{100 * share:.0f}% of this machine's CPU time during {when}" for when, share in shares.items())
    return [Paragraph(f"**The host was busy**: other processes (or the hypervisor) held {held}. Load that lasts the whole stage skews "
                      f"the ratios unevenly, and the noise bands (from the rounds' own spread) cannot see it: rebuild the {stage} stage on "
                      "a quiet machine before trusting them.")]


def latency_busy(results: dict[str, Any]) -> dict[str, float]:
    """Backends whose latency stage found the host busy (core.resources.HostLoad): backend → others' CPU share."""
    busy: dict[str, float] = {}
    for x in results.get("variants", []):
        for backend, e in (x.get("engines") or {}).items():
            lat = e.get("latency") if isinstance(e, dict) else None
            if isinstance(lat, dict) and lat.get("host_busy"):
                busy[backend] = float(lat["host_others_cpu_share"])
    return busy


def _ship_section(d: dict[str, Any], host_busy: bool = False) -> Section:
    blocks: list[Any] = []
    if host_busy:
        blocks.append(Paragraph("**Ratios taken on a busy host** (see the latency and decode sections): the choices below rest on "
                                "timings that need a rebuild of those stages on a quiet machine."))
    for kind, k in d["latency"].items():
        blocks.append(Paragraph(f"**{kind}** — Pareto front (latency ratio vs perplexity ratio): {', '.join(k['pareto'])}."))
        items = []
        for s in k["ship"]:
            if s["variant"] is None:
                items.append(f"perplexity ≤ {s['ppl_budget']}× dense: no variant qualifies")
            elif s["variant"].split(" on ")[0] == "dense" or s["latency_ratio"] >= 1.0:
                fastest = s["variant"] if s["variant"].split(" on ")[0] == "dense" else "dense"
                items.append(f"perplexity ≤ {s['ppl_budget']}× dense: ship `{fastest}`; no pruned variant within this budget is faster here")
            else:
                items.append(f"perplexity ≤ {s['ppl_budget']}× dense: `{s['variant']}` (latency ×{s['latency_ratio']:.3f}, perplexity ×{s['ppl_ratio']:.3f})")
        blocks.append(Bullets(items))
    if d.get("shown_by_engine"):
        blocks.append(Paragraph("Sparse variants whose decode speed-up an engine of this build showed on this CPU:"))
        blocks.append(Bullets([f"`{n['variant']}` on {', '.join(n['engines'])}" for n in d["shown_by_engine"]]))
    if d["needs_other_hardware"]:
        blocks.append(Paragraph("Variants whose speed-up this machine cannot show:"))
        blocks.append(Bullets([f"`{n['variant']}`: {n['why']}" for n in d["needs_other_hardware"]]))
    return Section("What to ship (from the figures above, on this machine)", blocks or [Paragraph("No latency was measured.")])


def _decode_section(results: dict[str, Any]) -> Section:
    d = results.get("decode")
    if not d:
        return Section("")
    rows = []
    for v in results["variants"]:
        r = v.get("decode")
        if r:
            dec, pre = _decode_ratios(results, r)
            rows.append([v["name"], d["runtime"], greedy_cell(r), f"{r['max_abs_logit_delta']:.2e}", f"{r['decode_ms_per_token']:.2f}", dec, f"{r['prefill_ms']:.1f}", pre])
            for backend, g in (r.get("engines") or {}).items():
                if "samples" not in g:
                    continue
                dec, pre = _decode_ratios(results, g)
                rows.append([v["name"], g.get("runtime", backend), greedy_cell(g), f"{g['max_abs_logit_delta']:.2e}", f"{g['decode_ms_per_token']:.2f}", dec, f"{g['prefill_ms']:.1f}", pre])
    base = d.get("baseline") or {}
    against = (
        f"decode ratios to the fastest dense decode (dense on {base['decode_ms_per_token']['engine']}), prefill ratios to the fastest dense prefill (dense on {base['prefill_ms']['engine']})"
        if base else f"every ratio to dense on {d['runtime']}'s KV-cache graphs"
    )
    busy = _busy_note("decode", {"the decode rounds": d["host_others_cpu_share"]}) if d.get("host_busy") else []
    table = Table(["variant", "engine", "greedy tokens = PyTorch", "max abs Δlogit", "decode ms/token", "ratio", "prefill ms", "ratio"], rows)
    return Section(f"Decode (KV cache, batch {d['batch']}, {d['prompt_tokens']}-token prompt; {against}, interleaved in one process)", [*busy, table])


def pass_sections(results: dict[str, Any]) -> list[Section]:
    """Every registered pass's own section, in registry order; passes sharing a title share a section."""
    from passes import registry

    doc = Document("")
    for cls in registry().values():
        if not cls.report_title:
            continue
        blocks: list[Any] = []
        for v in results["variants"]:
            for pr in v.get("pass_results", []):
                if pr.get("name") == cls.name:
                    blocks += cls.report_section(v, pr)
        doc.add(Section(cls.report_title, blocks))
    return doc.sections


def _frontier_section(points: list[dict[str, Any]], png: bytes | None) -> Section:
    """Variants placed by the work their decoder linears do per token, as the passes that change it count
    it (``linear_macs_per_token``): quality and decode speed at the same multiply-adds."""
    if not points:
        return Section("")
    def cell(e: dict[str, Any] | None) -> str:
        if not e:
            return "—"
        if e["within_noise"]:
            return ratio_text(e["ratio"], e["band"], True)
        return f"×{e['ratio']:.3f} (speed-up ×{1.0 / e['ratio']:.2f})"

    rows = [
        [p["variant"], p["kind"], f"{p['macs']:.3f}", p["engine"] or "—", fmt(p["ppl_vs_dense"], 3), cell(p["decode"])]
        for p in sorted(points, key=lambda p: (p["kind"] != "dense", p["kind"], -p["macs"], p["engine"] or ""))
    ]
    blocks: list[Any] = [
        Paragraph(
            "Decoder-linear multiply-adds per token as a share of dense, as the pass that changed them counts them (its own "
            "section says how: inputs a kernel skips at the share measured on held-out calibration tokens, or matrices sliced), "
            "perplexity / dense on the engine (eval split) and decode ms/token against the fastest dense decode of the run."
        ),
        Table(["variant", "work changed by", "multiply-adds / dense", "decode engine", "ppl / dense", "decode ms/token ratio"], rows),
    ]
    if png:
        blocks.append(Figure(FRONTIER_NAME, "sparsity frontier", png))
    return Section("Sparsity frontier: quality and decode speed at the same work", blocks)


def build_document(results: dict[str, Any], rows: list[dict[str, Any]], d: dict[str, Any], plot: bytes | None,
                   frontier: list[dict[str, Any]] | None = None, frontier_png: bytes | None = None) -> Document:
    ev, cal = results["data"]["evaluation"], results["data"]["calibration"]
    doc = Document(f"Build report: {results['recipe']['name']}")
    doc.preamble += [
        Paragraph(
            f"Model: `{results['model']['source']}` ({results['model']['kind']}). Evaluation: {ev['windows']} windows × {ev['length']} tokens. "
            f"Calibration ({cal['windows']} × {cal['length']}, seed {cal['seed']}) used by: {', '.join(results['data']['calibration_used_by']) or 'no variant'}."
        ),
        Paragraph(f"**{machine_line(results.get('environment') or {})}**"),
        Paragraph(
            "Perplexity is the engine's over every evaluation window; \"engine vs PyTorch\" compares the two on the first few windows. "
            "Latency: median [min–max] over repeats interleaved round-robin in one process; a ratio whose per-round band contains 1.00 is shown as within noise."
        ),
        _summary_table(rows),
    ]
    ran_on = sorted({f"{r['backend']}: {r['parity_runner']}" for r in rows if r.get("parity_runner")})
    if ran_on:
        doc.preamble.append(Paragraph("Parity (Polygraphy Comparator against PyTorch) ran on the engine's own runner — " + "; ".join(ran_on) + "."))
    if any("within_floor" in (r.get("parity_fp64") or {}) for r in rows):
        doc.preamble.append(Paragraph(PARITY_FLOOR_NOTE))
    busy = latency_busy(results)
    doc.add(_ship_section(d, bool((results.get("decode") or {}).get("host_busy")) or bool(busy)))
    lat = [[r["variant"], r["backend"], _latency_cells(r["latency"], r["variant"] == "dense")] for r in rows if r["status"] == "ok" and r.get("latency")]
    if lat:
        warn = _busy_note("latency", {f"{b}'s latency rounds": share for b, share in busy.items()}) if busy else []
        doc.add(Section(
            "Prefill latency (median [min–max] over the interleaved repeats; variant/dense ratio [min–max of per-round ratios])",
            [*warn, Table(["variant", "backend", "latency"], lat)],
        ))
    doc.add(_decode_section(results))
    doc.add(_frontier_section(frontier or [], frontier_png))
    for s in pass_sections(results):
        doc.add(s)
    if results.get("skips"):
        doc.add(Section("Skipped backends", [Bullets([f"`{b}`: {why}" for b, why in sorted({(s["backend"], s["reason"]) for s in results["skips"]})])]))
    doc.add(Section("Accuracy vs latency", [Figure(PLOT_NAME, "accuracy vs latency", plot) if plot else Paragraph("No latency or perplexity figures to plot.")]))
    return doc
