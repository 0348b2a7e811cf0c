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
