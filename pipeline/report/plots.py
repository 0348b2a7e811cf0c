"""The accuracy-vs-latency plot of the report (pass-specific figures belong to the passes)."""

from __future__ import annotations

from typing import Any

PLOT_NAME = "accuracy_latency.png"


def render_plot(rows: list[dict[str, Any]], d: dict[str, Any]) -> bytes | None:
    """One panel per measured latency kind: latency as a ratio to dense (error bars: the interleaved
    band; the axis starts at 0 and includes 1.0) against perplexity as a ratio to dense. Ratios
    within noise are drawn at 1.0, hollow; Pareto-optimal variants are filled and listed."""
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


FRONTIER_NAME = "sparsity_frontier.png"


def frontier_points(results: dict[str, Any], rows: list[dict[str, Any]], d: dict[str, Any]) -> list[dict[str, Any]]:
    """One point per variant whose passes recorded the decoder linears' multiply-adds per token
    (``info['linear_macs_per_token']``, as each pass counts them: inputs skipped by a kernel, matrices
    sliced) and per engine that decoded it: the work as a share of dense, perplexity / dense on that
    engine (or the first engine with one) and the decision's decode entry (``d['latency']['decode
    ms/token']['variants']``: ratio to the fastest dense decode, its band, within noise). Dense is the point at 1."""
    from pipeline.report.decision import engine_label

    ppl: dict[tuple[str, str], float] = {(r["variant"], r["backend"]): r["ppl_vs_dense"] for r in rows if r.get("status") == "ok" and r.get("ppl_vs_dense") is not None}
    runtime = (results.get("decode") or {}).get("runtime", "onnxruntime-cpu")
    decoded = d["latency"].get("decode ms/token", {}).get("variants", {})
    points = []
    for v in results["variants"]:
        counted = [pr for pr in v.get("pass_results", []) if "linear_macs_per_token" in (pr.get("info") or {})]
        if v["name"] != "dense" and not counted:
            continue
        macs = [pr["info"]["linear_macs_per_token"] for pr in counted]
        # a pass's variants form one series per form of it (``info['form']`` where the pass has several)
        kinds = [pr["name"] + (f"[{pr['info']['form']}]" if pr["info"].get("form") else "") for pr in counted]
        engines = {runtime: v["name"], **{b: engine_label(v["name"], b) for b in ((v.get("decode") or {}).get("engines") or {})}}
        runs = {b: decoded[key] for b, key in engines.items() if key in decoded}
        first_ppl = next((p for (n, _), p in ppl.items() if n == v["name"]), None)
        for backend, e in sorted(runs.items()) or [(None, None)]:
            points.append({"variant": v["name"], "kind": "+".join(kinds) or "dense", "engine": backend,
                           "macs": macs[-1]["after"] / macs[0]["before"] if macs else 1.0,
                           "ppl_vs_dense": ppl.get((v["name"], backend), first_ppl), "decode": e})
    return points if any(p["variant"] != "dense" for p in points) else []


def render_frontier(points: list[dict[str, Any]]) -> bytes | None:
    """Two panels over the decoder linears' multiply-adds per token (share of dense): perplexity / dense,
    and decode speed-up against the fastest dense decode (within noise: 1.0), one line per kind of
    variant (and engine)."""
    if not points:
        return None
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12.4, 4.4), dpi=110)
    kinds = sorted({p["kind"] for p in points if p["kind"] != "dense"})
    dense = [p for p in points if p["kind"] == "dense"]
    for i, kind in enumerate(kinds):
        pts = sorted((p for p in points if p["kind"] == kind), key=lambda p: -p["macs"])
        q = [p for p in pts if p["ppl_vs_dense"] is not None]
        seen: dict[str, tuple[float, float]] = {}
        for p in q:
            seen.setdefault(p["variant"], (p["macs"], p["ppl_vs_dense"]))
        a.plot(*zip((1.0, 1.0), *seen.values()), "-o", color=f"C{i}", label=kind)
        for name, (x, y) in seen.items():
            a.annotate(name, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
        for j, engine in enumerate(sorted({p["engine"] for p in pts if p["decode"]})):
            # a ratio within noise is drawn at 1.0, as in the accuracy-vs-latency plot
            e = [(p["macs"], 1.0 if p["decode"]["within_noise"] else 1.0 / p["decode"]["ratio"]) for p in dense + pts if p["engine"] == engine and p["decode"]]
            b.plot(*zip(*e), ["-o", "--s", ":^"][j % 3], color=f"C{i}", label=f"{kind} on {engine}")
    a.axhline(1.0, color="0.3", lw=0.8, ls="--")
    b.axhline(1.0, color="0.3", lw=0.8, ls="--")
    for ax in (a, b):
        ax.invert_xaxis()
        ax.set_xlabel("decoder-linear multiply-adds per token / dense")
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if not b.get_legend_handles_labels()[0]:
        b.text(0.5, 0.5, "no decode measured in this build", transform=b.transAxes, ha="center", va="center", color="0.4")
    ys = [p["ppl_vs_dense"] for p in points if p["ppl_vs_dense"] is not None]
    if ys and max(ys) > 5:
        from matplotlib.ticker import ScalarFormatter

        a.set_yscale("log")
        a.yaxis.set_major_formatter(ScalarFormatter())
        a.yaxis.set_minor_formatter(ScalarFormatter())
    a.set_ylabel("perplexity / dense (eval split)")
    b.set_ylabel("decode speed-up (fastest dense ms/token ÷ variant's)")
    a.set_title("quality against work", fontsize=9)
    b.set_title("speed against work (1.0: the fastest dense decode)", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
