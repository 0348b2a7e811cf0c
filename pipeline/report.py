"""results.json, report.md, report.html and the accuracy-vs-latency plot."""

from __future__ import annotations

import base64
import html
import re
import statistics
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
            row["parity_fp64"] = r.get("parity", {}).get("fp64_reference")
            pts = (r.get("latency") or {}).get("points", [])
            row["latency"] = pts
            rows.append(row)
    return rows


PARITY_FLOOR_NOTE = (
    "A failed parity is re-checked against the same model run in float64: \"fp32 floor\" is PyTorch fp32's own distance "
    "from it, \"engine\" the engine's. An engine about as far from float64 as PyTorch fp32 is (within 10×) sits at the "
    "model's rounding floor rather than being an export error — a per-token top-k (contextual sparsity) turns an ulp at "
    "the k-th boundary into a different unit and a visible logit change; on such a model a floor this high also means "
    "elementwise parity cannot tell a right engine from a slightly wrong one."
)


def _parity_cell(r: dict[str, Any]) -> str:
    """'pass (max |Δ|)', or 'FAIL (max |Δ|)' with the float64 diagnosis when one was made."""
    cell = f"{_fmt(r.get('parity'))} ({_fmt(r.get('parity_maxabs'), 5)})"
    f = r.get("parity_fp64") or {}
    if "within_floor" in f:
        verdict = "within it" if f["within_floor"] else "engine farther"
        cell += f"; vs float64: fp32 floor {f['torch_fp32_vs_fp64']:.3g}, engine {f['engine_vs_fp64']:.3g} ({verdict})"
    elif "skipped" in f:
        cell += f"; float64 check skipped: {f['skipped']}"
    return cell


NEEDS_SPARSE_TENSOR_CORES = "needs sparse tensor cores (TensorRT SPARSE_WEIGHTS / cuSPARSELt); no CPU kernel accelerates it"
NEEDS_SPARSE_KERNEL = "needs a sparse-matrix kernel; ONNX Runtime CPU and TensorRT run it dense"
NEEDS_NOTHING = "runs faster anywhere: its matrices are smaller"
NEEDS_SHORT = {
    NEEDS_SPARSE_TENSOR_CORES: "sparse tensor cores (GPU)",
    NEEDS_SPARSE_KERNEL: "a sparse kernel",
    NEEDS_NOTHING: "nothing (smaller matrices)",
}
"""Table-cell forms; the report's "what to ship" section gives the full reasons."""


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


def ratio_band(dense: list[float], variant: list[float]) -> tuple[float, float] | None:
    """Min–max of the per-repeat ratios variant/dense. The repeats are interleaved round-robin, so
    sample i of each runner comes from the same round; the band is how far one round's ratio can
    stray from another's on this machine."""
    pairs = [v / d for d, v in zip(dense, variant) if d > 0]
    return (min(pairs), max(pairs)) if pairs else None


def judge(dense: list[float], variant: list[float], ratio: float | None) -> tuple[tuple[float, float] | None, bool]:
    """(band, within noise) of a variant/dense ratio. Within noise when the per-round band contains
    1.00, or when the ratio is closer to 1.00 than the dense engine's own round-to-round spread
    ((max − min) / median of its samples): a difference smaller than the baseline's scatter
    cannot be told from it, even when a few rounds happen to fall on one side."""
    band = ratio_band(dense, variant)
    if band is None or ratio is None:
        return band, False
    floor = (max(dense) - min(dense)) / statistics.median(dense) if len(dense) > 1 else 0.0
    return band, band[0] <= 1.0 <= band[1] or abs(ratio - 1.0) <= floor


def ratio_text(ratio: float | None, band: tuple[float, float] | None, within: bool) -> str:
    if ratio is None:
        return "—"
    if within:
        return f"≈ 1.00 (within noise: ×{ratio:.3f}, rounds ×{band[0]:.2f}–{band[1]:.2f})"
    return f"×{ratio:.3f}" + (f" [{band[0]:.3f}–{band[1]:.3f}]" if band else "")


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


def latency_kinds(results: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per measured latency kind ('prefill' at batch 1 × the longest sequence; 'decode' ms/token when
    the build decoded), per variant: ratio to dense, its band and whether it is within noise."""
    kinds: dict[str, dict[str, dict[str, Any]]] = {}
    for r in rows:
        ref = _reference_point(r.get("latency") or [])
        if r.get("status") != "ok" or ref is None:
            continue
        label = f"prefill b{ref['batch']}×{ref['sequence']}"
        if r["variant"] == "dense":
            entry = {"ratio": 1.0, "band": None, "ms": ref["dense_median_ms"]}
        else:
            band, within = judge(ref["dense_samples_ms"], ref["variant_samples_ms"], ref["ratio"])
            entry = {"ratio": ref["ratio"], "band": band, "within_noise": within, "ms": ref["variant_median_ms"]}
        kinds.setdefault(label, {})[r["variant"]] = entry
    dense_dec = next((v.get("decode") for v in results["variants"] if v["name"] == "dense"), None)
    if dense_dec:
        for v in results["variants"]:
            d = v.get("decode")
            if not d:
                continue
            if v["name"] == "dense":
                entry = {"ratio": 1.0, "band": None, "ms": d["decode_ms_per_token"]}
            else:
                band, within = judge(dense_dec["samples"]["decode_ms_per_token"], d["samples"]["decode_ms_per_token"], d["decode_ratio"])
                entry = {"ratio": d["decode_ratio"], "band": band, "within_noise": within, "ms": d["decode_ms_per_token"]}
            kinds.setdefault("decode ms/token", {})[v["name"]] = entry
    for per in kinds.values():
        for e in per.values():
            e.setdefault("within_noise", False)  # dense
            e["effective_ratio"] = 1.0 if e["within_noise"] else e["ratio"]
    return kinds


def pareto_front(points: dict[str, tuple[float, float]]) -> list[str]:
    """Names not dominated in (latency ratio, perplexity ratio), both lower-is-better."""
    front = []
    for n, (x, y) in points.items():
        dominated = any((x2 <= x and y2 <= y) and (x2 < x or y2 < y) for m, (x2, y2) in points.items() if m != n)
        if not dominated:
            front.append(n)
    return sorted(front, key=lambda n: points[n])


PPL_BUDGETS = (1.1, 1.5, 2.0)


def decision(results: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """What the numbers mean for a deployment decision on this machine: the Pareto front per latency
    kind, the fastest variant under each perplexity budget, and the variants whose speed needs
    hardware or kernels this machine does not have."""
    ok = {r["variant"]: r for r in rows if r.get("status") == "ok" and r.get("ppl_vs_dense") is not None}
    kinds = latency_kinds(results, rows)
    out: dict[str, Any] = {"latency": {}, "needs_other_hardware": []}
    for kind, per in kinds.items():
        pts = {n: (e["effective_ratio"], ok[n]["ppl_vs_dense"]) for n, e in per.items() if n in ok}
        ship = []
        for budget in PPL_BUDGETS:
            fits = [n for n in pts if pts[n][1] <= budget]
            best = min(fits, key=lambda n: (pts[n][0], pts[n][1])) if fits else None
            ship.append({"ppl_budget": budget, "variant": best, "latency_ratio": pts[best][0] if best else None, "ppl_ratio": pts[best][1] if best else None})
        out["latency"][kind] = {
            "variants": {n: {k: e[k] for k in ("ratio", "band", "within_noise", "ms")} for n, e in per.items()},
            "pareto": pareto_front(pts),
            "ship": ship,
        }
    for r in rows:
        if r.get("needs") in (NEEDS_SPARSE_TENSOR_CORES, NEEDS_SPARSE_KERNEL):
            out["needs_other_hardware"].append({"variant": r["variant"], "why": r["needs"]})
    return out


def _decision_markdown(d: dict[str, Any]) -> list[str]:
    lines = ["", "## What to ship (from the figures above, on this machine)", ""]
    for kind, k in d["latency"].items():
        lines.append(f"**{kind}** — Pareto front (latency ratio vs perplexity ratio): {', '.join(k['pareto'])}.")
        lines.append("")
        for s in k["ship"]:
            if s["variant"] is None:
                lines.append(f"- perplexity ≤ {s['ppl_budget']}× dense: no variant qualifies")
            elif s["variant"] == "dense" or s["latency_ratio"] >= 1.0:
                lines.append(f"- perplexity ≤ {s['ppl_budget']}× dense: ship `dense`; no variant within this budget is faster here")
            else:
                lines.append(
                    f"- perplexity ≤ {s['ppl_budget']}× dense: `{s['variant']}` "
                    f"(latency ×{s['latency_ratio']:.3f}, perplexity ×{s['ppl_ratio']:.3f})"
                )
        lines.append("")
    if d["needs_other_hardware"]:
        lines.append("Variants whose speed-up this machine cannot show:")
        lines += [f"- `{n['variant']}`: {n['why']}" for n in d["needs_other_hardware"]]
    return lines


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
            f"| {_parity_cell(r)} | {_mb(r.get('onnx_bytes'))} | {r.get('needs')} |"
        )
    if any("within_floor" in (r.get("parity_fp64") or {}) for r in rows):
        lines += ["", PARITY_FLOOR_NOTE]
    d = decision(results, rows)
    lines += _decision_markdown(d)
    lines += [
        "",
        "## Prefill latency (median [min–max] over the interleaved repeats; variant/dense ratio [min–max of per-round ratios])",
        "",
    ]
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
                dec, pre = _decode_ratios(results, v["name"])
                lines.append(
                    f"| {v['name']} | {_greedy_cell(r)} | {r['max_abs_logit_delta']:.2e} "
                    f"| {r['decode_ms_per_token']:.2f} | {dec} | {r['prefill_ms']:.1f} | {pre} |"
                )
    lines += _structured_section(results)
    lines += _allocation_section(results)
    lines += _section(SDS_TITLE, _texts(results, sds_text))
    lines += _section(CONTEXTUAL_TITLE, _texts(results, contextual_text))
    lines += _admm_section(results)
    if results.get("skips"):
        lines += ["", "## Skipped backends", ""]
        for s in {(s["backend"], s["reason"]) for s in results["skips"]}:
            lines.append(f"- `{s[0]}`: {s[1]}")
    lines += ["", f"![accuracy vs latency]({PLOT_NAME})", ""]
    return "\n".join(lines)


def _decode_ratios(results: dict[str, Any], name: str) -> tuple[str, str]:
    """Decode and prefill ratio cells of the decode stage, each with its interleaved band."""
    dense = next(v["decode"] for v in results["variants"] if v["name"] == "dense")
    r = next(v["decode"] for v in results["variants"] if v["name"] == name)
    if name == "dense":
        return "×1.000", "×1.000"
    out = []
    for metric, ratio in (("decode_ms_per_token", "decode_ratio"), ("prefill_ms", "prefill_ratio")):
        out.append(ratio_text(r[ratio], *judge(dense["samples"][metric], r["samples"][metric], r[ratio])))
    return out[0], out[1]


def _kept_rows(kept: list[dict[str, Any]]) -> list[str]:
    """One table row per run of consecutive blocks that keep the same shape."""
    def cells(k: dict[str, Any]) -> str:
        return f"{k['heads']} / {k['dense']['heads']} | {k['kv_heads']} / {k['dense']['kv_heads']} | {k['ffn']} / {k['dense']['ffn']}"

    rows: list[str] = []
    start = 0
    for i in range(1, len(kept) + 1):
        if i == len(kept) or cells(kept[i]) != cells(kept[start]):
            first, last = kept[start]["block"], kept[i - 1]["block"]
            rows.append(f"| {first if first == last else f'{first}–{last}'} | {cells(kept[start])} |")
            start = i
    return rows


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
                lines += _kept_rows(info["kept"])
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


ROLE_ORDER = ("q", "k", "v", "o", "gate", "up", "down", "fc1", "fc2", "qkv", "proj")


def sparsity_by_layer(variant: dict[str, Any]) -> tuple[dict[str, Any], dict[str, dict[int, float]]] | None:
    """For a variant whose one-shot pass mixed per-layer sparsities: that pass's allocation facts and
    the measured sparsity of every pruned linear, by role then block (from the weights, as the pass
    recorded them)."""
    for pr in variant.get("pass_results", []):
        alloc = (pr.get("info") or {}).get("allocation")
        if isinstance(alloc, dict) and alloc.get("method") in ("owl", "sensitivity") and pr.get("layers"):
            by_role: dict[str, dict[int, float]] = {}
            for layer in pr["layers"]:
                by_role.setdefault(layer["role"], {})[int(layer["block"])] = float(layer["sparsity"])
            return {**alloc, "target": alloc.get("target", pr["info"].get("sparsity"))}, by_role
    return None


def _allocation_text(variant: dict[str, Any]) -> str | None:
    got = sparsity_by_layer(variant)
    if got is None:
        return None
    alloc, by_role = got
    values = [s for blocks in by_role.values() for s in blocks.values()]
    target = alloc.get("target")
    how = {"owl": f"OWL (λ {alloc.get('lambda')}, M {alloc.get('m')})", "sensitivity": f"sensitivity ({alloc.get('measure')} measure, one sparsity per {alloc.get('unit')}, bounds {alloc.get('bounds')})"}[alloc["method"]]
    return f"**{variant['name']}**: {how}; target {target}; measured per-linear sparsity {min(values):.3f}–{max(values):.3f}."


def _allocation_section(results: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    for v in results["variants"]:
        text = _allocation_text(v)
        if text:
            lines += ["", text, "", f"![sparsity by block and role: {v['name']}]({sparsity_plot_name(v['name'])})"]
    return ["", "## Mixed sparsity (per block and role, measured from the weights)", *lines] if lines else []


def _pass_info(variant: dict[str, Any], name: str, key: str) -> dict[str, Any] | None:
    """The ``info`` of the variant's first pass called ``name`` whose info has ``key``, else None."""
    for pr in variant.get("pass_results", []):
        info = pr.get("info") or {}
        if pr.get("name") == name and key in info:
            return info
    return None


def _texts(results: dict[str, Any], text_of: Any) -> list[str]:
    """``text_of(variant)`` of every variant that has one."""
    return [t for t in (text_of(v) for v in results["variants"]) if t]


def _section(title: str, texts: list[str]) -> list[str]:
    """A markdown section of one paragraph per text; nothing when there are none."""
    return ["", f"## {title}", *[x for t in texts for x in ("", t)]] if texts else []


SDS_TITLE = "SDS (sparse → dense → sparse)"
CONTEXTUAL_TITLE = "Contextual sparsity (Deja Vu)"


def contextual_text(variant: dict[str, Any]) -> str | None:
    """One line on a contextual-sparsity variant: selector, kept MLP share, recall@k of the selection on
    held-out calibration tokens, the predictor's cost, and the decode ratio where measured."""
    info = _pass_info(variant, "contextual", "blocks")
    if info is None:
        return None
    sparse = [b for b, r in info["blocks"].items() if r["keep"] < 1.0]
    recall = {
        "predictor": f"recall@k of the predictor on held-out calibration tokens {info.get('mean_recall_at_k', float('nan')):.3f}",
        "threshold": f"recall@k of the top-k units by |act(gate)| on held-out calibration tokens {info.get('mean_threshold_recall_at_k', float('nan')):.3f}",
    }.get(info["selector"], "the oracle computes every unit to choose (an upper bound, no saving)")
    pred = (
        f", predictor rank {info['predictor_rank']} reading {info['predictor_input']} ({info['predictor_macs_share']:.3f} of a block's MACs)"
        if info["selector"] == "predictor" else ""
    )
    macs = f"; MLP MACs computed {info['mlp_macs_share']:.3f} × dense" if "mlp_macs_share" in info else ""
    dec = variant.get("decode") or {}
    speed = f"; decode {dec['decode_ratio']:.3f} × dense ms/token" if "decode_ratio" in dec else ""
    return (
        f"**{variant['name']}**: contextual MLP sparsity, selector {info['selector']}, {info['keep']:.2f} of the units computed "
        f"per token in {len(sparse)} of {len(info['blocks'])} blocks (attention dense){pred}{macs}; {recall}; "
        f"perplexity with each token's own selection, prefill {info['full_mode']}{speed}."
    )


def sds_text(variant: dict[str, Any]) -> str | None:
    """One line on an SDS variant: its settings and the held-out block reconstruction error of the
    final sparse blocks against the base method's own (step 1) blocks, overall and the range per block."""
    info = _pass_info(variant, "sds", "holdout_error_ratio")
    if info is None:
        return None
    last = f"sparse{info['iterations']}"
    per = [r[last]["holdout"] / r["step1"]["holdout"] for r in info["blocks"].values() if r["step1"]["holdout"] > 0]
    spread = f" (per block {min(per):.3f}–{max(per):.3f})" if per else ""
    return (
        f"**{variant['name']}**: SDS over {info['base']} ({info['pattern'] or info['sparsity']}), {info['iterations']} × "
        f"{info['recon_steps']} reconstruction steps per block, regulariser {info['regularizer']} × {info['reg_weight']}, "
        f"target {info['target']}; held-out block error after SDS = {info['holdout_error_ratio']:.3f} × step 1's{spread}."
    )


def _admm_info(variant: dict[str, Any]) -> dict[str, Any] | None:
    return _pass_info(variant, "admm", "admm")


def admm_text(variant: dict[str, Any]) -> str | None:
    """One line on an ADMM + SR-STE variant: budget, the residual at the hard projection, mask churn."""
    info = _admm_info(variant)
    if info is None:
        return None
    a, s, b = info["admm"], info["srste"], info["budget"]
    res = a["residuals"]
    first = f"{res['primal_mean'][0]:.4f} → " if res["primal_mean"] else ""
    flips = s.get("mask_flip_share") or []
    churn = f"; SR-STE mask changes per refresh {min(flips):.4f}–{max(flips):.4f} of the weights" if flips else ""
    early = " (stopped early: time budget)" if a["stopped_early"] or s["stopped_early"] else ""
    return (
        f"**{variant['name']}**: ADMM + SR-STE ({info['pattern']}, init {info['initialisation']['init']}): "
        f"{a['steps']} ADMM steps ({res['iterations']} Z/U updates, ρ {res['rho'][0] if res['rho'] else '—'} → {res['rho'][-1] if res['rho'] else '—'}) + "
        f"{s['steps']} SR-STE steps, {b['tokens']} tokens, {a['train_seconds'] + s['train_seconds']:.0f} s{early}; primal residual "
        f"‖W − Z‖/‖W‖ (mean over layers) {first}{a['final_primal_mean']:.4f} at the hard projection{churn}."
    )


def _admm_section(results: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    for v in results["variants"]:
        text = admm_text(v)
        if text:
            lines += ["", text, "", f"![ADMM primal residual: {v['name']}]({residual_plot_name(v['name'])})"]
    return ["", "## ADMM + SR-STE", *lines] if lines else []


def residual_plot_name(variant: str) -> str:
    return f"admm_residual_{re.sub(r'[^A-Za-z0-9_.-]', '_', variant)}.png"


def render_residual_plot(variant: dict[str, Any]) -> bytes | None:
    """ADMM's primal residual ‖W − Z‖/‖W‖ per iteration (mean and max over layers, log scale); None
    for a variant without an ADMM pass or with no Z/U update."""
    info = _admm_info(variant)
    if info is None or not info["admm"]["residuals"]["primal_mean"]:
        return None
    res = info["admm"]["residuals"]
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.2, 3.0), dpi=110)
    it = list(range(1, len(res["primal_mean"]) + 1))
    ax.plot(it, res["primal_mean"], marker=".", lw=1, label="primal, mean over layers")
    ax.plot(it, res["primal_max"], marker=".", lw=1, ls=":", label="primal, max over layers")
    if any(v > 0 for v in res["dual_mean"]):
        ax.plot(it, res["dual_mean"], lw=1, ls="--", label="dual ρ‖ΔZ‖/‖W‖, mean")
    ax.set_yscale("log")
    ax.set_xlabel("ADMM iteration (Z/U update)")
    ax.set_ylabel("‖W − Z‖ / ‖W‖")
    ax.set_title(f"{variant['name']}: ADMM residuals ({info['pattern']})", fontsize=9)
    ax.grid(True, alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def sparsity_plot_name(variant: str) -> str:
    return f"sparsity_{re.sub(r'[^A-Za-z0-9_.-]', '_', variant)}.png"


def render_sparsity_plot(variant: dict[str, Any]) -> bytes | None:
    """Sparsity by block, one line per role, the target dashed; None for a variant without a mixed allocation."""
    got = sparsity_by_layer(variant)
    if got is None:
        return None
    alloc, by_role = got
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.2, 3.0), dpi=110)
    roles = sorted(by_role, key=lambda r: (ROLE_ORDER.index(r) if r in ROLE_ORDER else len(ROLE_ORDER), r))
    for role in roles:
        blocks = sorted(by_role[role])
        ax.plot(blocks, [by_role[role][b] for b in blocks], marker=".", lw=1, label=role)
    if alloc.get("target") is not None:
        ax.axhline(float(alloc["target"]), color="0.3", lw=0.8, ls="--", label="target")
    ax.set_ylim(0, 1)
    ax.set_xlabel("block")
    ax.set_ylabel("sparsity (measured)")
    ax.set_title(f"{variant['name']}: {alloc['method']} allocation", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, ncol=4, loc="lower right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _check_cell(r: dict[str, Any]) -> str:
    if r.get("ppl_engine_vs_torch") is None:
        return "—"
    return f"{_pct(r['ppl_engine_vs_torch'])} ({r['ppl_check_windows']} win.)"


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:+.4f}%"


def _reference_point(points: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The batch-1, longest-sequence point (the shape the plot uses)."""
    if not points:
        return None
    b1 = [p for p in points if p["batch"] == min(q["batch"] for q in points)]
    return max(b1, key=lambda p: p["sequence"])


def render_plot(results: dict[str, Any], rows: list[dict[str, Any]], d: dict[str, Any] | None = None) -> bytes | None:
    """One panel per measured latency kind: latency as a ratio to dense (error bars: the interleaved
    band; the axis starts at 0 and includes 1.0) against perplexity as a ratio to dense. Ratios
    within noise are drawn at 1.0, hollow; Pareto-optimal variants are filled and listed."""
    d = d or decision(results, rows)
    ppl = {r["variant"]: r["ppl_vs_dense"] for r in rows if r.get("status") == "ok" and r.get("ppl_vs_dense") is not None}
    panels = [(kind, k) for kind, k in d["latency"].items() if any(n in ppl for n in k["variants"])]
    if not panels:
        return None
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 4.4), dpi=110, squeeze=False)
    for ax, (kind, k) in zip(axes[0], panels):
        xmax = 1.15
        labels: list[tuple[str, float, float]] = []
        for name, e in k["variants"].items():
            if name not in ppl:
                continue
            x = 1.0 if e["within_noise"] else e["ratio"]
            band = e["band"]
            err = None if band is None else [[max(0.0, x - band[0])], [max(0.0, band[1] - x)]]
            on_front = name in k["pareto"]
            face = "none" if e["within_noise"] else ("C0" if on_front else "0.6")
            ax.errorbar([x], [ppl[name]], xerr=err, fmt="*" if name == "dense" else "o", ms=9 if name == "dense" else 7,
                        mfc=face, mec="C0" if on_front else "0.4", ecolor="0.5", capsize=3)
            label = name + (" (≈1.00, within noise)" if e["within_noise"] else "")
            labels.append((label, x, ppl[name]))
            xmax = max(xmax, (band[1] if band else x) * 1.1)
        for label, x, y in labels:  # right of the point, or left of it near the right edge
            right = x < 0.6 * xmax
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(7 if right else -7, 5), ha="left" if right else "right", fontsize=8)
        ax.axvline(1.0, color="0.3", lw=0.8, ls="--")
        ax.set_xlim(0, xmax)
        ys = [ppl[n] for n in k["variants"] if n in ppl]
        if max(ys) > 5:
            ax.set_yscale("log")
        ax.set_ylim(min(0.9, min(ys) * 0.95), max(ys) * 1.15)
        ax.set_xlabel("latency / dense (median; bar: min–max per round)")
        ax.set_ylabel("perplexity / dense (engine, eval split)")
        ax.grid(True, which="both", alpha=0.3)
        ax.set_title(f"{kind}\nPareto front (filled): {', '.join(k['pareto'])}", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def render_html(
    md_rows: list[dict[str, Any]], results: dict[str, Any], plot: bytes | None, sparsity_plots: dict[str, bytes] | None = None,
    residual_plots: dict[str, bytes] | None = None,
) -> str:
    esc = html.escape
    head = ["variant", "backend", "sparsity", "params (M)", "ppl (engine)", "engine vs PyTorch", "ppl / dense", "top-1", "KL(dense‖v)", "parity (max |Δ|)", "ONNX MB", "speed-up needs"]
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
            _parity_cell(r),
            _mb(r.get("onnx_bytes")),
            NEEDS_SHORT.get(r.get("needs"), r.get("needs")),
        ]
        body.append("<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in cells) + "</tr>")
    shapes = sorted({(p["batch"], p["sequence"]) for r in md_rows for p in r.get("latency") or []})
    lat_rows = []
    for r in md_rows:
        if r["status"] != "ok" or not r.get("latency"):
            continue
        by_shape = {(p["batch"], p["sequence"]): p for p in r["latency"]}
        cells = [r["variant"], r["backend"]] + [_latency_cells([by_shape[sh]], r["variant"] == "dense").split(": ", 1)[1] if sh in by_shape else "—" for sh in shapes]
        lat_rows.append("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in cells) + "</tr>")
    lat_head = "".join(f"<th>{esc(h)}</th>" for h in ["variant", "backend"] + [f"batch {b} × {q} tokens" for b, q in shapes])
    img = ""
    if plot:
        img = f"<img alt='accuracy vs latency' src='data:image/png;base64,{base64.b64encode(plot).decode()}'>"
    mixed = ""
    for v in results["variants"]:
        text = _allocation_text(v)
        if text:
            png = (sparsity_plots or {}).get(v["name"])
            pic = f"<img alt='sparsity by block and role: {esc(v['name'])}' src='data:image/png;base64,{base64.b64encode(png).decode()}'>" if png else ""
            mixed += f"{_lines_html([text])}{pic}"
    if mixed:
        mixed = f"<h2>Mixed sparsity (per block and role, measured from the weights)</h2>{mixed}"
    for title, text_of in ((SDS_TITLE, sds_text), (CONTEXTUAL_TITLE, contextual_text)):
        texts = _texts(results, text_of)
        if texts:
            mixed += f"<h2>{title}</h2>{_lines_html(texts)}"
    admm = ""
    for v in results["variants"]:
        text = admm_text(v)
        if text:
            png = (residual_plots or {}).get(v["name"])
            pic = f"<img alt='ADMM primal residual: {esc(v['name'])}' src='data:image/png;base64,{base64.b64encode(png).decode()}'>" if png else ""
            admm += f"{_lines_html([text])}{pic}"
    if admm:
        mixed += f"<h2>ADMM + SR-STE</h2>{admm}"
    ev = results["data"]["evaluation"]
    ship = _lines_html(_decision_markdown(results.get("decision") or decision(results, md_rows))[3:])
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>Build report: {esc(results['recipe']['name'])}</title>
<style>
body{{font-family:sans-serif;margin:1.5em;max-width:100%}}
h1{{font-size:1.5em}} h2{{font-size:1.2em}}
.scroll{{overflow-x:auto;max-width:100%}}
table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 6px;font-size:85%;white-space:nowrap;text-align:left}}
th{{background:#f0f0f0}}
img{{max-width:100%;height:auto}}
li{{margin:0.2em 0}}
@media (max-width:600px){{body{{margin:0.6em}} td,th{{font-size:80%;padding:3px 5px}}}}
</style>
</head><body>
<h1>Build report: {esc(results['recipe']['name'])}</h1>
<p class="machine"><b>{esc(machine_line(results.get('environment') or {}))}</b></p>
<p>Model <code>{esc(results['model']['source'])}</code>; evaluation {ev['windows']} windows × {ev['length']} tokens.
Perplexity is the engine's over every evaluation window; "engine vs PyTorch" compares the two on the first few windows.
Latency: median [min–max] over repeats interleaved round-robin in one process; a ratio whose per-round band contains 1.00 is shown as within noise.</p>
<div class="scroll"><table><tr>{''.join(f'<th>{esc(h)}</th>' for h in head)}</tr>
{''.join(body)}
</table></div>
<h2>Prefill latency</h2>
<p>Median [min–max] over the interleaved repeats, then variant/dense [min–max of the per-round ratios].</p>
<div class="scroll"><table><tr>{lat_head}</tr>{''.join(lat_rows)}</table></div>
<h2>What to ship (on this machine)</h2>
<div class="ship">{ship}</div>
{_decode_html(results)}
{mixed}
<h2>Accuracy vs latency</h2>
{img or '<p>No latency or perplexity figures to plot.</p>'}
</body></html>
"""


def _lines_html(lines: list[str]) -> str:
    """Markdown paragraphs and '- ' list items as HTML, consecutive items in one list."""
    out, items = [], []
    for line in lines + [""]:
        if line.startswith("- "):
            items.append(f"<li>{_md_inline(html.escape(line[2:]))}</li>")
            continue
        if items:
            out.append("<ul>" + "".join(items) + "</ul>")
            items = []
        if line:
            out.append(f"<p>{_md_inline(html.escape(line))}</p>")
    return "".join(out)


def _md_inline(text: str) -> str:
    """`code` and **bold** of the markdown lines, as HTML (text already escaped)."""
    import re

    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", text)


def _greedy_cell(r: dict[str, Any]) -> str:
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


def _decode_html(results: dict[str, Any]) -> str:
    if not results.get("decode"):
        return ""
    d = results["decode"]
    rows = []
    for v in results["variants"]:
        r = v.get("decode")
        if r:
            dec, pre = _decode_ratios(results, v["name"])
            cells = [
                v["name"],
                _greedy_cell(r),
                f"{r['max_abs_logit_delta']:.2e}",
                f"{r['decode_ms_per_token']:.2f} ({dec})",
                f"{r['prefill_ms']:.1f} ({pre})",
            ]
            rows.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    head = "".join(f"<th>{h}</th>" for h in ("variant", "greedy tokens = PyTorch", "max |Δlogit|", "decode ms/token", "prefill ms"))
    return (
        f"<h2>Decode (KV cache, {html.escape(d['runtime'])}, batch {d['batch']}, {d['prompt_tokens']}-token prompt)</h2>"
        f"<div class='scroll'><table><tr>{head}</tr>{''.join(rows)}</table></div>"
    )


def write_reports(out: Path, results: dict[str, Any]) -> None:
    rows = summary_rows(results)
    results["decision"] = decision(results, rows)
    plot = render_plot(results, rows, results["decision"])
    sparsity_plots = {v["name"]: p for v in results["variants"] if (p := render_sparsity_plot(v))}
    residual_plots = {v["name"]: p for v in results["variants"] if (p := render_residual_plot(v))}
    atomic_write_json(out / "results.json", results)
    atomic_write_text(out / "report.md", render_markdown(results, rows))
    if plot:
        atomic_write_bytes(out / PLOT_NAME, plot)
    for name, png in sparsity_plots.items():
        atomic_write_bytes(out / sparsity_plot_name(name), png)
    for name, png in residual_plots.items():
        atomic_write_bytes(out / residual_plot_name(name), png)
    atomic_write_text(out / "report.html", render_html(rows, results, plot, sparsity_plots, residual_plots))
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
        if r["variant"] == "dense":
            ratio = "1.000 (base)"
        elif ref and ref.get("ratio"):
            _, within = judge(ref["dense_samples_ms"], ref["variant_samples_ms"], ref["ratio"])
            ratio = "≈1.00 (noise)" if within else f"{ref['ratio']:.3f}"
        else:
            ratio = "—"
        lines.append(
            f"{r['variant']:<18} {r['backend']:<16} {_fmt(r.get('sparsity'), 3):>8} {_fmt(r.get('ppl_engine')):>10} "
            f"{_fmt(r.get('ppl_vs_dense'), 3):>9} {_fmt(r.get('top1'), 3):>6} {_fmt(r.get('parity')):>6} {ratio:>16}"
        )
    return "\n".join(lines)
