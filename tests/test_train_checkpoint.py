"""Checkpoints: atomic writes, keep-last-K, the newest loadable one, a writer killed
mid-write, RNG and optimiser state, and weights for transfer."""

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from engine import checkpoint as ck

REPO = Path(__file__).resolve().parent.parent


def _save(root, step, payload=0.0, keep_last=3):
    return ck.save_checkpoint(str(root), step, rank_state={"x": torch.tensor([payload])},
                              shared={"step": step}, model={"model": {"w": torch.full((4,), float(step))}},
                              config={"train": {"steps": 9}}, keep_last=keep_last)


def test_save_load_and_keep_last(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (10, 20, 30, 40):
        path = _save(root, step, payload=step, keep_last=2)
        assert os.path.basename(path) == "step_%08d" % step
    assert [s for s, _ in ck.list_checkpoints(str(root))] == [30, 40]
    assert sorted(os.listdir(root)) == ["step_00000030", "step_00000040"]  # no .tmp / .trash left
    latest = ck.latest_checkpoint(str(tmp_path))  # a run directory works too
    assert latest.endswith("step_00000040")
    state = ck.load_checkpoint(latest, rank=0, world_size=1)
    assert state["shared"] == {"step": 40} and float(state["rank"]["x"]) == 40
    assert torch.equal(state["model"]["w"], torch.full((4,), 40.0))
    assert state["config"] == {"train": {"steps": 9}}
    assert state["meta"]["world_size"] == 1
    # Format 2 loads at another world size: rank 1 of 2 finds no file of its own here.
    assert ck.load_checkpoint(latest, rank=1, world_size=2)["rank"] is None


def test_incomplete_or_damaged_checkpoints_are_skipped(tmp_path):
    root = tmp_path / "checkpoints"
    _save(root, 1)
    good = _save(root, 2)
    # A newer directory without meta.json (a writer died before committing) ...
    os.makedirs(root / "step_00000003")
    torch.save({"x": 1}, root / "step_00000003" / "rank_00000.pt")
    # ... and one whose file was truncated after the fact.
    bad = _save(root, 4)
    with open(os.path.join(bad, "model.pt"), "r+b") as f:
        f.truncate(10)
    assert ck.latest_checkpoint(str(root)) == good
    assert ck.resolve_checkpoint(good) == good
    assert ck.resolve_checkpoint(str(tmp_path)) == good


WRITER = textwrap.dedent("""
    import os, sys, time, torch
    from engine import checkpoint as ck
    root, marker = sys.argv[1], sys.argv[2]
    ck.save_checkpoint(root, 1, rank_state={"x": torch.ones(3)}, shared={"step": 1},
                       model={"model": {"w": torch.ones(1000)}})
    real = ck._write_file
    def slow(path, obj):  # write half of the file, then hang: the parent kills us here
        if path.endswith("model.pt.part"):
            with open(path, "wb") as f:
                f.write(b"x" * 5000)
                f.flush()
            open(marker, "w").close()
            time.sleep(600)
        real(path, obj)
    ck._write_file = slow
    ck.save_checkpoint(root, 2, rank_state={"x": torch.ones(3)}, shared={"step": 2},
                       model={"model": {"w": torch.ones(100000)}})
""")


def test_writer_killed_mid_write_leaves_the_previous_checkpoint(tmp_path):
    root, marker = tmp_path / "checkpoints", tmp_path / "writing"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(root), str(marker)], cwd=REPO)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None, "the writer exited early"
            assert time.monotonic() < deadline, "the writer never reached the second checkpoint"
            time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert (root / ".tmp-step_00000002").is_dir()  # the half-written one, under its temporary name
    latest = ck.latest_checkpoint(str(root))
    assert latest.endswith("step_00000001")
    assert ck.load_checkpoint(latest)["shared"] == {"step": 1}
    _save(root, 2)  # the next save clears the leftover and commits
    assert not (root / ".tmp-step_00000002").exists()
    assert ck.latest_checkpoint(str(root)).endswith("step_00000002")


def test_background_writes_commit_once_every_rank_wrote_and_reshard(tmp_path):
    root = str(tmp_path / "checkpoints")
    slices = [[0, 3], [3, 5]]
    weight = torch.arange(10.0).reshape(5, 2)
    writers = [ck.Writer(root, r, 2, keep_last=2) for r in range(2)]

    def rank_state(r):
        lo, hi = slices[r]
        return {ck.rank_file(r): {"head": {"weight": weight[lo:hi]},
                                  "head_optimizer": {"weight": {"momentum_buffer": -weight[lo:hi],
                                                                "step": torch.tensor(7.0)}}}}

    trunk = {"conv1.weight": torch.ones(2)}
    writers[0].save(1, {**rank_state(0), "shared.pt": {"trunk": trunk}},
                    meta={"num_classes": 5, "head_slices": slices})
    trunk["conv1.weight"] += 1  # training goes on: the checkpoint keeps the values at save()
    time.sleep(0.2)
    assert ck.latest_checkpoint(root) is None  # rank 1 has not written its slice: not committed
    writers[1].save(1, rank_state(1))
    for w in writers:
        w.wait()
    path = ck.latest_checkpoint(root)
    assert path.endswith("step_00000001") and not [n for n in os.listdir(root) if n.startswith(".")]
    # A job of another world size reads its rows across the two files.
    rows = ck.read_rows(path, "head_optimizer", 2, 5)
    assert torch.equal(rows["weight"]["momentum_buffer"], -weight[2:5]) and float(rows["weight"]["step"]) == 7
    sd = ck.model_state(path)
    assert torch.equal(sd["fc.weight"], weight) and torch.equal(sd["conv1.weight"], torch.ones(2))
    exported = ck.export_model(str(tmp_path))
    assert exported == str(tmp_path / "model.pt")
    assert torch.equal(torch.load(exported, weights_only=True)["model"]["fc.weight"], weight)


def test_rng_state_round_trip_is_weights_only_safe(tmp_path):
    torch.manual_seed(3)
    np.random.seed(4)
    random.seed(5)
    state = ck.rng_state()
    torch.save(state, tmp_path / "rng.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    ck.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], got[0]) and np.array_equal(expected[1], got[1]) and expected[2] == got[2]


def test_optimizer_state_split_and_merge():
    a, b, c = (torch.nn.Parameter(torch.randn(3)) for _ in range(3))
    opt = torch.optim.SGD([{"params": [a, b]}, {"params": [c]}], lr=0.1, momentum=0.9)
    for p in (a, b, c):
        p.grad = torch.ones(3)
    opt.step()
    sd = opt.state_dict()
    shared, local = ck.split_optimizer_state(sd, {2})
    assert set(shared["state"]) == {0, 1} and set(local["state"]) == {2}
    merged = ck.merge_optimizer_state(shared, local)
    opt2 = torch.optim.SGD([{"params": [a, b]}, {"params": [c]}], lr=0.1, momentum=0.9)
    opt2.load_state_dict(merged)
    assert torch.equal(opt2.state[c]["momentum_buffer"], opt.state[c]["momentum_buffer"])


def test_weights_from_a_state_dict_file_infer_the_architecture(tmp_path):
    from engine.models.resnext import resnext

    model = resnext([1, 2, 1, 1], 4, 4, num_classes=7)
    torch.save({"state_dict": {"module." + k: v for k, v in model.state_dict().items()}}, tmp_path / "w.pth")
    sd, cfg = ck.load_weights(str(tmp_path / "w.pth"))
    assert cfg is None and "fc.weight" in sd and "conv1.weight" in sd
    assert ck.infer_architecture(sd) == {"layers": [1, 2, 1, 1], "groups": 4, "width_per_group": 4}
    import torchvision

    tv = torchvision.models.resnext50_32x4d()
    assert ck.infer_architecture(tv.state_dict()) == {"layers": [3, 4, 6, 3], "groups": 32, "width_per_group": 4}
    with pytest.raises(ValueError, match="not a state dict"):
        torch.save([1, 2], tmp_path / "x.pt")
        ck.load_weights(str(tmp_path / "x.pt"))
