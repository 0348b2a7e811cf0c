"""The report's decision maths on hand-made figures: noise bands, Pareto front, what to ship."""

from __future__ import annotations

import pytest

from pipeline.report import decision, judge, pareto_front, ratio_band, ratio_text, speedup_needs


def test_ratio_band_pairs_samples_by_round():
    dense = [100.0, 110.0, 90.0]
    variant = [95.0, 121.0, 90.0]  # per-round ratios 0.95, 1.10, 1.00
    assert ratio_band(dense, variant) == pytest.approx((0.95, 1.10))
    assert judge(dense, variant, 1.0)[1]  # the band contains 1.00
    assert not judge([100.0, 100.0], [60.0, 70.0], 0.65)[1]
    # every round a little faster (band 0.990–0.995), but dense itself scatters by 2 %: within noise
    assert judge([100.0, 102.0, 101.0], [99.5, 101.1, 100.0], 0.99)[1]
    # the same rounds with a steady dense engine: a real (small) difference
    assert not judge([100.0, 100.0, 100.0], [99.0, 99.5, 99.2], 0.992)[1]
    assert ratio_text(1.02, (0.95, 1.10), True) == "≈ 1.00 (within noise: ×1.020, rounds ×0.95–1.10)"
    assert ratio_text(0.65, (0.6, 0.7), False) == "×0.650 [0.600–0.700]"


def test_pareto_front_by_hand():
    pts = {"dense": (1.0, 1.0), "a": (0.6, 1.8), "b": (1.0, 2.0), "c": (0.5, 3.0), "d": (0.7, 1.9)}
    # b is dominated by dense (same speed, worse), d by a (slower and worse); c is the fastest
    assert pareto_front(pts) == ["c", "a", "dense"]


def _point(dense, variant):
    import statistics

    return {
        "batch": 1, "sequence": 64, "dense_median_ms": statistics.median(dense), "dense_samples_ms": dense,
        "variant_median_ms": statistics.median(variant) if variant else None,
        "ratio": statistics.median(variant) / statistics.median(dense) if variant else None, "variant_samples_ms": variant,
    }


def test_decision_picks_the_fastest_variant_within_each_budget():
    dense = [100.0, 100.0, 100.0]
    lat = {"dense": [], "nm": [99.0, 101.0, 100.0], "small": [60.0, 61.0, 59.0], "tiny": [40.0, 41.0, 39.0]}
    ppl = {"dense": 10.0, "nm": 10.5, "small": 14.0, "tiny": 30.0}
    passes = {"dense": [], "nm": [{"sparsegpt": {"pattern": "2:4"}}], "small": [{"structured": {"ffn": 0.5}}], "tiny": [{"structured": {"ffn": 0.8}}]}
    variants = []
    for n in lat:
        r = {"status": "ok", "perplexity_engine": {"perplexity": ppl[n]}, "perplexity_torch": {"perplexity": ppl[n], "windows": 1},
             "perplexity_engine_vs_torch": 0.0, "latency": {"points": [_point(dense, lat[n])]}}
        variants.append({"name": n, "passes": passes[n], "engines": {"onnxruntime-cpu": r}})
    results = {"variants": variants}
    from pipeline.report import summary_rows

    d = decision(results, summary_rows(results))
    k = d["latency"]["prefill b1×64"]
    assert k["variants"]["nm"]["within_noise"] and not k["variants"]["small"]["within_noise"]
    assert k["pareto"] == ["tiny", "small", "dense"]  # nm: within noise, so as slow as dense and worse
    assert [s["variant"] for s in k["ship"]] == ["dense", "small", "small"]  # ≤1.1: nm is no faster; ≤1.5 and ≤2.0: small
    assert [n["variant"] for n in d["needs_other_hardware"]] == ["nm"]


def test_speedup_needs_by_pass_kind():
    assert "sparse tensor cores" in speedup_needs({"name": "x", "passes": [{"wanda": {"pattern": "2:4"}}]})
    assert "sparse-matrix kernel" in speedup_needs({"name": "x", "passes": [{"magnitude": {"sparsity": 0.5}}]})
    assert "smaller" in speedup_needs({"name": "x", "passes": [{"structured": {"ffn": 0.5}}, {"distill": {"steps": 3}}]})
    assert speedup_needs({"name": "dense", "passes": []}) == "baseline"


def test_sparsity_frontier_places_variants_by_their_work():
    """Variants whose passes record the decoder linears' multiply-adds per token are placed by that share
    of dense, with perplexity / dense on the engine and decode speed against the fastest dense decode;
    others (a 2:4 variant here) are left out, and dense anchors the curve."""
    from core.document import Document
    from pipeline.report import summary_rows
    from pipeline.report.compose import _frontier_section
    from pipeline.report.plots import frontier_points, render_frontier
    from pipeline.report.render import to_markdown

    ppl = {"dense": 10.0, "teal-30": 10.5, "ffn50": 30.0, "nm": 12.0}
    passes = {
        "dense": [],
        "teal-30": [{"name": "activation", "info": {"form": "threshold", "linear_macs_per_token": {"before": 1000, "after": 690.0}}}],
        "ffn50": [{"name": "structured", "info": {"linear_macs_per_token": {"before": 1000, "after": 620}}},
                  {"name": "quantize", "info": {"bits": 4}}],
        "nm": [{"name": "sparsegpt", "info": {"pattern": "2:4"}}],
    }
    native = {"dense": 0.5, "teal-30": 0.45, "ffn50": 0.36, "nm": 0.5}
    variants = []
    for n, p in ppl.items():
        r = {"status": "ok", "perplexity_engine": {"perplexity": p}, "perplexity_torch": {"perplexity": p, "windows": 1},
             "perplexity_engine_vs_torch": 0.0}
        ort = 1.0 if n == "dense" else 0.98
        # interleaved rounds: dense on ONNX Runtime 10.0 / 10.3 / 9.9 ms (a 4 % spread), each run that ratio of it
        rounds = lambda ratio: {"decode_ms_per_token": [ratio * t for t in (10.0, 10.3, 9.9)]}  # noqa: E731
        variants.append({"name": n, "passes": [], "pass_results": passes[n],
                         "engines": {"onnxruntime-cpu": r, "native-cpu": dict(r, perplexity_engine={"perplexity": p * 1.01})},
                         "decode": {"decode_ratio": ort, "decode_ms_per_token": 10.0 * ort, "samples": rounds(ort),
                                    "engines": {"native-cpu": {"decode_ratio": native[n], "decode_ms_per_token": 10.0 * native[n], "samples": rounds(native[n])}}}})
    results = {"variants": variants, "decode": {"runtime": "onnxruntime-cpu"}}
    rows = summary_rows(results)
    points = frontier_points(results, rows, decision(results, rows))
    by = {(p["variant"], p["engine"]): p for p in points}
    assert sorted({p["variant"] for p in points}) == ["dense", "ffn50", "teal-30"]
    assert by[("teal-30", "native-cpu")]["macs"] == pytest.approx(0.69) and by[("ffn50", "native-cpu")]["macs"] == pytest.approx(0.62)
    assert by[("dense", "native-cpu")]["macs"] == 1.0 and by[("ffn50", "onnxruntime-cpu")]["kind"] == "structured"
    assert by[("teal-30", "native-cpu")]["ppl_vs_dense"] == pytest.approx(1.05)  # on that engine, against its own dense
    assert by[("ffn50", "native-cpu")]["decode"]["ratio"] == 0.36 and by[("ffn50", "onnxruntime-cpu")]["decode"]["ratio"] == 0.98
    # ×0.98 is closer to 1 than dense's own 4 % round-to-round spread: within noise, drawn and printed as ≈ 1.00
    assert by[("ffn50", "onnxruntime-cpu")]["decode"]["within_noise"] and not by[("ffn50", "native-cpu")]["decode"]["within_noise"]
    png = render_frontier(points)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    doc = Document("t")
    doc.add(_frontier_section(points, png))
    md = to_markdown(doc)
    assert "| teal-30 | activation[threshold] | 0.690 | native-cpu | 1.050 | ×0.450 (speed-up ×2.22) |" in md
    assert "| ffn50 | structured | 0.620 | native-cpu | 3.000 | ×0.360 (speed-up ×2.78) |" in md
    assert "| ffn50 | structured | 0.620 | onnxruntime-cpu | 3.000 | ≈ 1.00 (within noise: ×0.980" in md
    assert doc.figures()[0].name == "sparsity_frontier.png"
    # nothing to place: no section
    plain = {"variants": [v for v in variants if v["name"] in ("dense", "nm")], "decode": {"runtime": "onnxruntime-cpu"}}
    plain_rows = summary_rows(plain)
    assert frontier_points(plain, plain_rows, decision(plain, plain_rows)) == []


def test_a_busy_host_is_measured_and_flagged_in_the_report():
    """HostLoad sees CPU time another process takes while a block runs (a busy-looping child on this
    machine's cores), and a decode stage marked busy puts a warning before its table and in "what to ship"."""
    import subprocess
    import sys
    import time

    from core.document import Paragraph
    from core.resources import HostLoad
    from pipeline.report.compose import _decode_section, _ship_section

    busy = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 3: pass"])
    try:
        time.sleep(0.3)
        load = HostLoad().start()
        time.sleep(1.5)  # this process idles; the child holds one core
        share = load.stop()
    finally:
        busy.wait()
    if share is None:
        pytest.skip("no /proc/stat on this system: HostLoad measures nothing here")
    import os

    assert share > 0.5 / (os.cpu_count() or 1), share  # one core of the machine's, at least half of it
    d = {"runtime": "onnxruntime-cpu", "batch": 1, "prompt_tokens": 8, "host_others_cpu_share": 0.42, "host_busy": True}
    section = _decode_section({"decode": d, "variants": []})
    first = section.blocks[0]
    assert isinstance(first, Paragraph) and "The host was busy" in first.text and "42%" in first.text
    quiet = _decode_section({"decode": {**d, "host_busy": False}, "variants": []})
    assert not any(isinstance(b, Paragraph) for b in quiet.blocks)
    decision = {"latency": {}, "needs_other_hardware": []}
    from pipeline.report.compose import latency_busy

    entry = {"latency": {"points": [], "host_busy": True, "host_others_cpu_share": 0.3}}
    assert latency_busy({"variants": [{"engines": {"onnxruntime-cpu": entry, "native-cpu": {"latency": {"points": []}}}}]}) == {"onnxruntime-cpu": 0.3}
    assert "busy host" in _ship_section(decision, True).blocks[0].text
    assert not any("busy host" in getattr(b, "text", "") for b in _ship_section(decision, False).blocks)
