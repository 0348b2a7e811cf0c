import math

import pytest
import torch

from pipeline.validate import agreement, interleaved_latency, perplexity


def test_uniform_logits_give_vocab_size_perplexity():
    vocab = 50
    windows = torch.randint(0, vocab, (3, 20))
    res = perplexity(lambda ids: torch.zeros(ids.shape[0], ids.shape[1], vocab), windows, "t")
    assert res["perplexity"] == pytest.approx(vocab)
    assert res["tokens"] == 3 * 19


def test_perfect_prediction_perplexity_is_one_ish():
    windows = torch.tensor([[1, 2, 3, 4]])

    def fn(ids):
        out = torch.full((1, 4, 8), -30.0)
        for t in range(3):
            out[0, t, ids[0, t + 1]] = 30.0
        return out

    assert perplexity(fn, windows, "t")["perplexity"] == pytest.approx(1.0, abs=1e-6)


def test_agreement_hand_case():
    # two positions; dense prefers token 0 at both, variant flips the second
    d = torch.tensor([[[2.0, 0.0], [2.0, 0.0]]])
    v = torch.tensor([[[2.0, 0.0], [0.0, 2.0]]])
    res = agreement(lambda ids: d, lambda ids: v, torch.zeros(1, 2, dtype=torch.long), "t")
    assert res["top1_agreement"] == 0.5
    p = torch.softmax(torch.tensor([2.0, 0.0]), 0)
    q = torch.softmax(torch.tensor([0.0, 2.0]), 0)
    kl2 = float((p * (p.log() - q.log())).sum())
    assert res["kl_dense_variant"] == pytest.approx(kl2 / 2, rel=1e-5)


class FakeClock:
    """``time`` for pipeline.validate with a clock only the fake runners move: the interleaving and
    ratio logic is tested without timing anything on a shared machine."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now


class FakeRunner:
    def __init__(self, delay, clock):
        self.delay = delay
        self.clock = clock
        self.calls = 0

    def infer(self, feeds):
        self.calls += 1
        self.clock.now += self.delay
        return {}


def test_interleaved_latency_ratio_and_call_counts(monkeypatch):
    import pipeline.validate as validate

    clock = FakeClock()
    monkeypatch.setattr(validate, "time", clock)
    d, v, w = FakeRunner(0.002, clock), FakeRunner(0.004, clock), FakeRunner(0.001, clock)
    pts = interleaved_latency({"dense": d, "slow": v, "fast": w}, [(1, 8), (2, 4)], vocab=10, warmup=1, repeats=4)
    assert d.calls == v.calls == w.calls == 2 * 5
    slow = pts["slow"][0].to_dict()
    assert len(slow["dense_samples_ms"]) == 4 and slow["ratio"] == pytest.approx(2.0)
    assert pts["fast"][1].to_dict()["ratio"] == pytest.approx(0.5)
    base = pts["dense"][0].to_dict()
    assert base["ratio"] is None and not math.isnan(base["dense_median_ms"])
    with pytest.raises(ValueError, match="baseline runner 'dense'"):
        interleaved_latency({"x": d}, [(1, 1)], vocab=10, warmup=0, repeats=1)


def test_perplexity_with_agreement_matches_separate_measurements():
    from pipeline.validate import perplexity_with_agreement

    g = torch.Generator().manual_seed(0)
    table_d = torch.randn(20, 20, generator=g)
    table_v = table_d + 0.5 * torch.randn(20, 20, generator=g)
    dense = lambda ids: table_d[ids]  # noqa: E731  (logits depend on the current token only)
    variant = lambda ids: table_v[ids]  # noqa: E731
    windows = torch.randint(0, 20, (5, 12), generator=g)
    ppl, agr = perplexity_with_agreement(variant, dense, windows, 3, "t")
    assert ppl["perplexity"] == pytest.approx(perplexity(variant, windows, "t")["perplexity"])
    ref = agreement(dense, variant, windows[:3], "t")
    assert agr["top1_agreement"] == pytest.approx(ref["top1_agreement"])
    assert agr["kl_dense_variant"] == pytest.approx(ref["kl_dense_variant"])
    assert agr["windows"] == 3
    assert perplexity_with_agreement(variant, None, windows, 3, "t")[1] is None
