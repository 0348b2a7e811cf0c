"""The decision maths of the report: per-row headline figures, noise bands of interleaved latency
ratios, the Pareto front, the fastest variant within each perplexity budget, and what each variant
needs to be faster (declared by its passes, :meth:`passes.base.Pass.speedup_need`)."""

from __future__ import annotations

import statistics
from typing import Any

PPL_BUDGETS = (1.1, 1.5, 2.0)


def variant_need(variant: dict[str, Any]) -> Any:
    """The strongest :class:`passes.base.SpeedupNeed` of the variant's passes (None: none declared)."""
    from passes import registry

    reg = registry()
    needs = []
    for p in variant.get("passes", []):
        (name, opts), = p.items()
        cls = reg.get(name)
        need = cls.speedup_need(opts or {}) if cls is not None else None
        if need is not None:
            needs.append(need)
    return max(needs, key=lambda n: n.rank) if needs else None


def need_texts(name: str, need: Any) -> tuple[str, str]:
    """(full reason, table-cell form) of a variant's need; 'baseline' for dense, '—' for none."""
    if name == "dense":
        return "baseline", "baseline"
    return (need.text, need.short) if need is not None else ("—", "—")


def speedup_needs(variant: dict[str, Any]) -> str:
    """What hardware or kernel the variant's pruning needs before it can be faster than dense."""
    return need_texts(variant["name"], variant_need(variant))[0]


def summary_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (variant, engine) with the headline figures, dense-relative where it applies."""
    rows = []
    dense_ppl: dict[str, float] = {}
    for v in results["variants"]:
        for backend, r in v["engines"].items():
            if v["name"] == "dense" and r.get("status") == "ok" and "perplexity_engine" in r:
                dense_ppl[backend] = r["perplexity_engine"]["perplexity"]
    for v in results["variants"]:
        need = variant_need(v) if v["name"] != "dense" else None
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
            row["needs"], row["needs_short"] = need_texts(v["name"], need)
            row["needs_other_hardware"] = bool(need is not None and need.other_hardware)
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
            row["parity_runner"] = r.get("parity", {}).get("engine_runner")
            row["latency"] = (r.get("latency") or {}).get("points", [])
            rows.append(row)
    return rows


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


def reference_point(points: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The batch-1, longest-sequence point (the shape the plot uses)."""
    if not points:
        return None
    b1 = [p for p in points if p["batch"] == min(q["batch"] for q in points)]
    return max(b1, key=lambda p: p["sequence"])


def latency_kinds(results: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per measured latency kind ('prefill' at batch 1 × the longest sequence; 'decode' ms/token when
    the build decoded), per variant: ratio to dense, its band and whether it is within noise."""
    kinds: dict[str, dict[str, dict[str, Any]]] = {}
    backends = list(dict.fromkeys(r["backend"] for r in rows if r.get("status") == "ok" and r.get("latency")))
    for r in rows:
        ref = reference_point(r.get("latency") or [])
        if r.get("status") != "ok" or ref is None:
            continue
        # each engine's prefill latency is a kind of its own (its ratios are to dense on the same engine)
        label = f"prefill b{ref['batch']}×{ref['sequence']}" + (f" ({r['backend']})" if len(backends) > 1 else "")
        if r["variant"] == "dense":
            entry = {"ratio": 1.0, "band": None, "ms": ref["dense_median_ms"]}
        else:
            band, within = judge(ref["dense_samples_ms"], ref["variant_samples_ms"], ref["ratio"])
            entry = {"ratio": ref["ratio"], "band": band, "within_noise": within, "ms": ref["variant_median_ms"]}
        kinds.setdefault(label, {})[r["variant"]] = entry
    dense_dec = next((v.get("decode") for v in results["variants"] if v["name"] == "dense"), None)
    if dense_dec:
        base = ((results.get("decode") or {}).get("baseline") or {}).get("decode_ms_per_token")
        base_samples = base["samples"] if base else dense_dec["samples"]["decode_ms_per_token"]

        def decode_entry(d: dict[str, Any]) -> dict[str, Any]:
            own = d["samples"]["decode_ms_per_token"]
            if own == base_samples:
                return {"ratio": 1.0, "band": None, "ms": d["decode_ms_per_token"]}
            ratio = d.get("decode_ratio", 1.0)
            band, within = judge(base_samples, own, ratio)
            return {"ratio": ratio, "band": band, "within_noise": within, "ms": d["decode_ms_per_token"]}

        for v in results["variants"]:
            d = v.get("decode")
            if not d:
                continue
            kinds.setdefault("decode ms/token", {})[v["name"]] = decode_entry(d)
            for backend, g in (d.get("engines") or {}).items():  # the same variant on an engine with its own decoder
                if "samples" in g:
                    kinds.setdefault("decode ms/token", {})[engine_label(v["name"], backend)] = decode_entry(g)
    for per in kinds.values():
        for e in per.values():
            e.setdefault("within_noise", False)  # dense
            e["effective_ratio"] = 1.0 if e["within_noise"] else e["ratio"]
    return kinds


ENGINE_SEP = " on "


def engine_label(variant: str, backend: str) -> str:
    """A decision candidate that is a variant run by an engine other than the build's ONNX Runtime graphs."""
    return f"{variant}{ENGINE_SEP}{backend}"


def variant_of(label: str) -> str:
    return label.split(ENGINE_SEP, 1)[0]


def pareto_front(points: dict[str, tuple[float, float]]) -> list[str]:
    """Names not dominated in (latency ratio, perplexity ratio), both lower-is-better."""
    front = []
    for n, (x, y) in points.items():
        dominated = any((x2 <= x and y2 <= y) and (x2 < x or y2 < y) for m, (x2, y2) in points.items() if m != n)
        if not dominated:
            front.append(n)
    return sorted(front, key=lambda n: points[n])


def decision(results: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """What the numbers mean for a deployment decision on this machine: the Pareto front per latency
    kind, the fastest variant under each perplexity budget, and the variants whose speed needs
    hardware or kernels this machine does not have."""
    ok = {r["variant"]: r for r in rows if r.get("status") == "ok" and r.get("ppl_vs_dense") is not None}
    kinds = latency_kinds(results, rows)
    out: dict[str, Any] = {"latency": {}, "needs_other_hardware": []}
    for kind, per in kinds.items():
        pts = {n: (e["effective_ratio"], ok[variant_of(n)]["ppl_vs_dense"]) for n, e in per.items() if variant_of(n) in ok}
        ship = []
        for budget in PPL_BUDGETS:
            fits = [n for n in pts if pts[n][1] <= budget]
            best = min(fits, key=lambda n: (pts[n][0], pts[n][1])) if fits else None
            ship.append({"ppl_budget": budget, "variant": best, "latency_ratio": pts[best][0] if best else None, "ppl_ratio": pts[best][1] if best else None})
        out["latency"][kind] = {
            "variants": {n: {k: e[k] for k in ("ratio", "band", "within_noise", "ms")} for n, e in per.items()},
            "baseline": (
                f"the fastest dense decode ({(((results.get('decode') or {}).get('baseline') or {}).get('decode_ms_per_token') or {}).get('engine', 'onnxruntime-cpu')})"
                if kind.startswith("decode") else "dense on the same engine"
            ),
            "pareto": pareto_front(pts),
            "ship": ship,
        }
    # a speed-up an engine of this build did show (e.g. native-cpu's sparse kernels) is not one this machine cannot show
    shown = {}
    for n, e in kinds.get("decode ms/token", {}).items():
        if ENGINE_SEP in n and e["effective_ratio"] < 1.0:
            shown.setdefault(variant_of(n), []).append(n.split(ENGINE_SEP, 1)[1])
    out["shown_by_engine"] = [{"variant": v, "engines": sorted(set(b))} for v, b in shown.items() if v != "dense"]
    seen = set()
    for r in rows:
        if r.get("needs_other_hardware") and r["variant"] not in shown and r["variant"] not in seen:
            seen.add(r["variant"])
            out["needs_other_hardware"].append({"variant": r["variant"], "why": r["needs"]})
    return out
