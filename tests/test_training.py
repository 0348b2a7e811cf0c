"""The shared training loop: schedule, hooks, checkpoints that hold hook state, resume, and
checkpoints that are corrupt, foreign or pickled being refused."""

from __future__ import annotations

import json
import math
import pickle

import pytest
import torch

from passes.training import Checkpoint, TrainConfig, lr_factor, train


class _Toy(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(16, 8)
        self.lin = torch.nn.Linear(8, 8)


def _loss(model: _Toy):
    target = torch.linspace(-1, 1, 8)

    def fn(ids: torch.Tensor):
        out = model.lin(model.emb(ids)).mean((0, 1))
        loss = (out - target).pow(2).mean()
        return loss, {"mse": float(loss.detach())}

    return fn


class _Counter:
    """A hook with state that must survive an interruption (as ADMM's Z and U do)."""

    def __init__(self) -> None:
        self.total = torch.zeros(1)
        self.before: list[int] = []

    def before_step(self, step: int) -> None:
        self.before.append(step)

    def after_step(self, step: int) -> None:
        self.total += step

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"total": self.total}

    def load_state_dict(self, d: dict[str, torch.Tensor]) -> None:
        self.total = d["total"].clone()


def test_lr_schedule_by_hand():
    assert [lr_factor(s, 2, 10) for s in (0, 1)] == [0.5, 1.0]
    assert lr_factor(2, 2, 10) == pytest.approx(1.0)
    assert lr_factor(6, 2, 10) == pytest.approx(0.5)  # half-way through the cosine
    assert lr_factor(10, 2, 10) == pytest.approx(0.0)


def test_lr_schedule_anneals_by_time_and_splits_into_spans():
    # a wall-time cap that binds at step 3 of 100: the rate follows the time share, down to 0
    assert lr_factor(3, 2, 100, time_share=0.5) == pytest.approx(0.5)
    assert lr_factor(3, 2, 100, time_share=1.0) == pytest.approx(0.0)
    assert lr_factor(50, 0, 100, time_share=0.1) == pytest.approx(lr_factor(50, 0, 100))  # steps ahead of time: steps rule
    # two runs covering [0, 0.4] and [0.4, 1] of one schedule: one warm-up, one continuous cosine
    first = [lr_factor(s, 2, 4, span=(0.0, 0.4)) for s in range(4)]
    second = [lr_factor(s, 2, 6, span=(0.4, 1.0)) for s in range(6)]  # no warm-up of its own
    assert first[:3] == [0.5, 1.0, 1.0]
    assert first[3] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.2)))
    assert second[0] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.4)))
    assert first[3] > second[0] and second == sorted(second, reverse=True) and second[-1] > 0.0
    with pytest.raises(ValueError, match="schedule_span"):
        train(_Toy(), dict(_Toy().named_parameters()), lambda ids: (torch.zeros(()), {}), torch.zeros(2, 3, dtype=torch.long), TrainConfig(steps=2), schedule_span=(0.5, 0.2))


def test_a_run_continued_with_data_offset_sees_the_windows_of_one_run():
    windows = torch.arange(7).reshape(7, 1).repeat(1, 3)
    seen: list[list[int]] = []

    def loss_fn(ids):
        seen.append(ids[:, 0].tolist())
        return model.emb(ids).sum() * 0.0, {}

    model = _Toy()
    params = dict(model.named_parameters())
    cfg = dict(batch_size=2, warmup_steps=0, compute_dtype="float32", log_every=100)
    train(model, params, loss_fn, windows, TrainConfig(steps=5, **cfg), seed=3, show_progress=False)
    whole, seen[:] = list(seen), []
    train(model, params, loss_fn, windows, TrainConfig(steps=2, **cfg), seed=3, show_progress=False)
    train(model, params, loss_fn, windows, TrainConfig(steps=3, **cfg), seed=3, show_progress=False, data_offset=2)
    assert seen == whole and len({i for b in whole for i in b}) == 7  # every window, in the same order


def test_two_continued_runs_equal_one_run():
    """schedule_span + data_offset + optimizer_state: a run split in two (ADMM's phases) trains as one."""
    windows = torch.randint(0, 16, (5, 6), generator=torch.Generator().manual_seed(2))
    cfg = dict(lr=0.05, warmup_steps=0, compute_dtype="float32", batch_size=2, log_every=100)
    one = _Toy()
    train(one, dict(one.named_parameters()), _loss(one), windows, TrainConfig(steps=6, **cfg), seed=4, show_progress=False)
    two = _Toy()
    params = dict(two.named_parameters())
    first = train(two, params, _loss(two), windows, TrainConfig(steps=3, **cfg), seed=4, show_progress=False, schedule_span=(0.0, 0.5))
    train(two, params, _loss(two), windows, TrainConfig(steps=3, **cfg), seed=4, show_progress=False, schedule_span=(0.5, 1.0),
          data_offset=3, optimizer_state=first.optimizer_state)
    for (n, a), (_, b) in zip(one.named_parameters(), two.named_parameters()):
        assert torch.allclose(a, b, atol=1e-6), n
    fresh = _Toy()  # without the carried moments the split run differs: the check can fail
    fp = dict(fresh.named_parameters())
    train(fresh, fp, _loss(fresh), windows, TrainConfig(steps=3, **cfg), seed=4, show_progress=False, schedule_span=(0.0, 0.5))
    train(fresh, fp, _loss(fresh), windows, TrainConfig(steps=3, **cfg), seed=4, show_progress=False, schedule_span=(0.5, 1.0), data_offset=3)
    assert not torch.allclose(fresh.lin.weight, one.lin.weight, atol=1e-6)


def test_training_lowers_the_loss_and_runs_hooks():
    model = _Toy()
    hook = _Counter()
    windows = torch.randint(0, 16, (4, 6), generator=torch.Generator().manual_seed(1))
    cfg = TrainConfig(steps=30, lr=0.05, warmup_steps=2, compute_dtype="float32")
    r = train(model, dict(model.lin.named_parameters()), _loss(model), windows, cfg, hooks=[hook], show_progress=False)
    assert r.steps == 30 and not r.stopped_early
    assert r.history[-1]["loss"] < 0.2 * r.history[0]["loss"]
    assert hook.before == list(range(30)) and float(hook.total) == sum(range(30))
    assert not model.emb.weight.requires_grad and not model.training


def test_resume_gives_the_same_weights_and_hook_state(tmp_path):
    windows = torch.randint(0, 16, (4, 6), generator=torch.Generator().manual_seed(1))
    cfg = TrainConfig(steps=8, lr=0.05, warmup_steps=1, checkpoint_every=3, compute_dtype="float32")

    straight, h1 = _Toy(), _Counter()
    train(straight, dict(straight.lin.named_parameters()), _loss(straight), windows, cfg, hooks=[h1], show_progress=False)

    interrupted, h2 = _Toy(), _Counter()
    calls = {"n": 0}
    real = _loss(interrupted)

    def flaky(ids):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt("simulated interruption")
        return real(ids)

    ckpt = Checkpoint(tmp_path, "toy")
    with pytest.raises(KeyboardInterrupt):
        train(interrupted, dict(interrupted.lin.named_parameters()), flaky, windows, cfg, checkpoint=ckpt, hooks=[h2], show_progress=False)
    assert json.loads((tmp_path / "toy.json").read_text())["step"] == 3
    resumed, h3 = _Toy(), _Counter()
    r = train(resumed, dict(resumed.lin.named_parameters()), _loss(resumed), windows, cfg, checkpoint=ckpt, hooks=[h3], show_progress=False)
    assert r.resumed_from_step == 3 and r.steps == 8
    torch.testing.assert_close(resumed.lin.weight, straight.lin.weight, atol=1e-6, rtol=0)
    assert float(h3.total) == float(h1.total)
    assert len(list(tmp_path.glob("toy-*.safetensors"))) == 1  # older tensor files removed


def _checkpointed(tmp_path):
    model = _Toy()
    windows = torch.randint(0, 16, (4, 6), generator=torch.Generator().manual_seed(1))
    cfg = TrainConfig(steps=2, lr=0.05, warmup_steps=1, checkpoint_every=1, compute_dtype="float32")
    ckpt = Checkpoint(tmp_path, "toy")
    train(model, dict(model.lin.named_parameters()), _loss(model), windows, cfg, checkpoint=ckpt, show_progress=False)
    meta = json.loads((tmp_path / "toy.json").read_text())
    return ckpt, meta


@pytest.mark.parametrize("damage", ["truncated", "zeroed", "byte-flipped"])
def test_corrupt_or_foreign_checkpoints_are_ignored(tmp_path, caplog, damage):
    ckpt, meta = _checkpointed(tmp_path)
    assert ckpt.load(meta["fingerprint"]) is not None
    assert ckpt.load("other settings") is None and "written for other settings" in caplog.text
    path = tmp_path / meta["tensors"]
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "zeroed":
        path.write_bytes(bytes(len(data)))
    else:
        path.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    assert ckpt.load(meta["fingerprint"]) is None and "does not match its SHA-256" in caplog.text
    (tmp_path / "toy.json").write_text("{not json")
    assert ckpt.load(meta["fingerprint"]) is None and "unreadable checkpoint" in caplog.text


def test_a_pickle_in_the_checkpoint_path_is_never_unpickled(tmp_path, caplog):
    ckpt, meta = _checkpointed(tmp_path)

    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('unpickled!')",))

    (tmp_path / meta["tensors"]).write_bytes(pickle.dumps(Boom()))
    meta["sha256"] = __import__("hashlib").sha256((tmp_path / meta["tensors"]).read_bytes()).hexdigest()
    (tmp_path / "toy.json").write_text(json.dumps(meta))
    assert ckpt.load(meta["fingerprint"]) is None  # safetensors refuses the header; nothing is executed
    assert "is not a safetensors file" in caplog.text
