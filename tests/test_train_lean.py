"""The lean step: in steady state a training step reads nothing back from the device; the
loss, the non-finite streak, bad tags and stop requests are read at sync points (log and
checkpoint steps). Skipping a non-finite step on the device (fused SGD's found_inf) leaves
weights, momentum and schedule bitwise as the host-side skip does."""

import json
import os
import signal
from pathlib import Path

import pytest
import torch

import engine.train as train_mod
from engine.config import apply_overrides, get_preset
from engine.distributed import spawn_ranks

READS = ("item", "tolist", "__bool__", "__float__", "__int__")


def make_trainer(tmp_path, *overrides):
    cfg = apply_overrides(get_preset("test"), ["data.synthetic=true", "data.synthetic_vocab=9",
                                               f"train.out_dir={tmp_path / 'run'}", "train.batch_size=4",
                                               *overrides])
    return train_mod.Trainer(cfg)


class ReadSpy:
    """Counts device-to-host reads: the loop's host_read, and any Tensor method that reads a
    value back (item, tolist, bool, float, int) while a step is running."""

    def __init__(self, monkeypatch, trainer):
        self.in_step = None
        self.step_reads: dict[int, list[str]] = {}
        self.host_reads: list[int] = []
        real_host_read = train_mod.host_read

        def host_read(t):
            self.host_reads.append(trainer.state.step + (self.in_step is not None))
            return real_host_read(t)

        monkeypatch.setattr(train_mod, "host_read", host_read)
        for name in READS:
            real = getattr(torch.Tensor, name)

            def spy(t, *a, _real=real, _name=name, **k):
                if self.in_step is not None:
                    self.step_reads.setdefault(self.in_step, []).append(_name)
                return _real(t, *a, **k)

            monkeypatch.setattr(torch.Tensor, name, spy)
        step = trainer.train_step

        def spied_step(batches):
            self.in_step = trainer.state.step + 1
            try:
                return step(batches)
            finally:
                self.in_step = None

        trainer.train_step = spied_step


def test_steady_state_steps_read_nothing_back(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path, "train.steps=15", "train.log_every=5")
    try:
        spy = ReadSpy(monkeypatch, trainer)
        summary = trainer.fit()
    finally:
        trainer.close()
    assert summary["status"] == "completed"
    # Step 1 reads: the head's first call exchanges and checks shapes and tags, and fused SGD's
    # first update decides on the host (a skipped first step must not create momentum buffers).
    assert set(spy.step_reads) == {1}, spy.step_reads
    # Then one read per sync point: the log steps (the last one is also the final checkpoint).
    assert spy.host_reads == [1, 5, 10, 15]
    assert [h["step"] for h in summary["history"]] == [5, 10, 15]
    assert all(h["loss"] > 0 and h["skipped"] == 0 for h in summary["history"])


def _poison(trainer, bad_steps):
    forward = trainer.head.forward
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = forward(*args, **kwargs)
        return loss * float("nan") if calls["n"] in bad_steps else loss

    trainer.head.forward = poisoned


def _run(tmp_path, bad_steps, on_device: bool, monkeypatch):
    trainer = make_trainer(tmp_path, "train.steps=6", "train.log_every=3")
    try:
        _poison(trainer, bad_steps)
        if not on_device:
            monkeypatch.setattr(trainer, "skips_on_device", lambda: False)
        reads = []
        real = train_mod.host_read
        monkeypatch.setattr(train_mod, "host_read", lambda t: reads.append(trainer.state.step) or real(t))
        summary = trainer.fit()
        params = [p.detach().clone() for p in list(trainer.trunk.parameters()) + list(trainer.head.parameters())]
        momentum = [trainer.optimizer.state.get(p, {}).get("momentum_buffer")
                    for g in trainer.optimizer.param_groups for p in g["params"]]
        return summary, params, momentum, trainer.scheduler.last_epoch, reads
    finally:
        trainer.close()
        monkeypatch.undo()


@pytest.mark.parametrize("bad_steps", [{3, 4}, {1}, {1, 2, 5}])
def test_skip_on_device_equals_the_host_skip_bitwise(tmp_path, monkeypatch, bad_steps):
    device = _run(tmp_path / "device", bad_steps, True, monkeypatch)
    host = _run(tmp_path / "host", bad_steps, False, monkeypatch)
    assert device[0]["skipped_steps"] == host[0]["skipped_steps"] == len(bad_steps)
    assert [h["skipped"] for h in device[0]["history"]] == [h["skipped"] for h in host[0]["history"]]
    for a, b in zip(device[1], host[1]):
        assert torch.equal(a, b)
    for a, b in zip(device[2], host[2]):
        assert (a is None and b is None) or torch.equal(a, b)
    assert device[3] == host[3] == 6
    # The host path read the flag back every step; the device path only until fused SGD's
    # first real update (then the sync points, steps 3 and 6).
    first_update = min(set(range(1, 7)) - bad_steps)
    assert [s for s in device[4] if s not in (3, 6)] == list(range(0, first_update))
    assert len(host[4]) >= 6


class BadTagsAt:
    """The trainer's loader, with every tag of the n-th batch (0-based) set to `value`."""

    def __init__(self, loader, n, value):
        self.loader, self.n, self.value = loader, n, value

    def __iter__(self):
        for i, batch in enumerate(self.loader):
            yield {**batch, "tags": batch["tags"].clone().fill_(self.value)} if i == self.n else batch

    def state_dict(self):
        return self.loader.state_dict()


def test_bad_tags_raise_at_the_next_sync_point(tmp_path):
    trainer = make_trainer(tmp_path, "train.steps=12", "train.log_every=5")
    try:
        # Step 7's batch (after the first call, whose checks read the values back) holds class 9 of 9.
        trainer.loader = BadTagsAt(trainer.loader, 6, 9)
        with pytest.raises(ValueError, match=r"between steps 6 and 10 held 12 tag value\(s\) outside \[-1, 9\)"):
            trainer.fit()
    finally:
        trainer.close()


def fit_signalled_after(trainer, step: int, signalled: bool = True) -> dict:
    """trainer.fit() with SIGTERM sent to this process once `step` steps are done (if
    `signalled`), between sync points; closes the trainer."""
    train_step = trainer.train_step

    def signalled_step(batches):
        if signalled and trainer.state.step == step:
            os.kill(os.getpid(), signal.SIGTERM)
        return train_step(batches)

    trainer.train_step = signalled_step
    try:
        return trainer.fit()
    finally:
        trainer.close()


def test_sigterm_between_sync_points_stops_at_the_next_one_with_a_checkpoint(tmp_path):
    trainer = make_trainer(tmp_path, "train.steps=20", "train.log_every=5", "train.ckpt_every=0")
    summary = fit_signalled_after(trainer, 2)
    assert summary["status"] == "preempted" and summary["step"] == 5
    assert summary["checkpoint"].endswith("step_00000005")


def _stop_job(rank, world, tmp_path):
    trainer = make_trainer(Path(tmp_path), "train.steps=20", "train.log_every=4")
    summary = fit_signalled_after(trainer, 5, signalled=rank == 1)  # rank 1 alone is signalled
    with open(os.path.join(tmp_path, "run", f"rank{rank}.json"), "w") as f:
        json.dump({"status": summary["status"], "step": summary["step"]}, f)


def test_one_rank_signalled_every_rank_stops_at_the_same_step(tmp_path):
    spawn_ranks(_stop_job, 2, str(tmp_path), str(tmp_path), timeout_s=300)
    results = [json.loads((tmp_path / "run" / f"rank{r}.json").read_text()) for r in range(2)]
    assert results == [{"status": "preempted", "step": 8}] * 2
    assert (tmp_path / "run" / "checkpoints" / "step_00000008").is_dir()


def test_lean_step_benchmark_smoke_counts_reads_per_variant(tmp_path):
    from benchmarks.bench_lean_step import main

    out = tmp_path / "lean.json"
    assert main(["--smoke", "--steps", "4", "--out", str(out)]) == 0
    lean, before = json.loads(out.read_text())["rows"]
    # Four timed steps: the lean loop reads back once (its one sync point), the old loop at every step
    # (the skip decision and the sync point).
    assert [lean["per_step_sync"], before["per_step_sync"]] == [False, True]
    assert lean["host_reads_per_step"] == 0.25 and before["host_reads_per_step"] == 2.0
    assert lean["step_ms"] > 0 and before["step_ms"] > 0


def test_tensorboard_event_files_hold_the_logged_metrics(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from engine.config import TrainConfig

    assert TrainConfig().tensorboard  # on by default (the demo's `tiny` preset keeps the default)
    trainer = make_trainer(tmp_path, "train.steps=6", "train.log_every=3", "train.tensorboard=true")
    try:
        summary = trainer.fit()
    finally:
        trainer.close()
    events = EventAccumulator(str(tmp_path / "run" / "tb"))
    events.Reload()
    losses = events.Scalars("train/loss")
    assert [e.step for e in losses] == [3, 6]
    assert [e.value for e in losses] == pytest.approx([h["loss"] for h in summary["history"]])
    assert {"train/img_per_s", "train/data_wait", "train/lr"} <= set(events.Tags()["scalars"])
