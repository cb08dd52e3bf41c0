"""Faults: SIGTERM under torchrun produces a checkpoint; a worker killed under torchrun's
elastic restarts resumes from the last checkpoint and finishes; non-finite losses are
skipped and counted, and too many in a row stop the run naming the last good checkpoint;
out-of-memory errors name the knob to turn."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from engine import checkpoint as ck
from engine.config import apply_overrides, get_preset

REPO = Path(__file__).resolve().parent.parent
TORCHRUN = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")


def _torchrun(out_dir, steps, extra=(), restarts=0):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [TORCHRUN, "--standalone", "--nproc-per-node", "2", "--max-restarts", str(restarts),
           "--monitor-interval", "0.5", "-m", "engine.cli", "train", "--preset", "test",
           "--set", "data.synthetic=true", "--set", "data.synthetic_vocab=11", "--set", f"train.out_dir={out_dir}",
           "--set", f"train.steps={steps}", "--set", "train.batch_size=8", *extra]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _logged_steps(out_dir) -> int:
    try:
        with open(os.path.join(out_dir, "metrics.jsonl")) as f:
            return sum(1 for line in f if line.strip())
    except OSError:
        return 0


def _wait_for_steps(proc, out_dir, n, timeout=180):
    deadline = time.monotonic() + timeout
    while _logged_steps(out_dir) < n:
        if proc.poll() is not None:
            pytest.fail(f"torchrun exited early ({proc.returncode}):\n{proc.stdout.read()[-4000:]}")
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"no {n} steps logged in {timeout}s")
        time.sleep(0.2)


def _workers(torchrun_pid):
    """{RANK: pid} of torchrun's worker processes."""
    out = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid != torchrun_pid:
                continue
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
        except (OSError, ValueError, IndexError):
            continue
        if b"RANK" in env:
            out[int(env[b"RANK"])] = int(pid)
    return out


def _finish(proc, timeout=180):
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"torchrun did not finish in {timeout}s:\n{out[-4000:]}")
    return out


def test_sigterm_under_torchrun_writes_a_checkpoint(tmp_path):
    out_dir = str(tmp_path / "run")
    proc = _torchrun(out_dir, 100_000)
    _wait_for_steps(proc, out_dir, 3)
    proc.send_signal(signal.SIGTERM)  # what a scheduler sends on preemption; torchrun forwards it
    out = _finish(proc)
    summary = json.load(open(os.path.join(out_dir, "summary.json")))
    assert summary["status"] == "preempted", out[-3000:]
    path = ck.latest_checkpoint(out_dir)
    assert path is not None and path == summary["checkpoint"], out[-3000:]
    state = ck.load_checkpoint(path, rank=1, world_size=2)
    assert state["shared"]["state"]["step"] == summary["step"] >= 3
    assert state["meta"]["world_size"] == 2
    assert state["rank"]["data"]["kind"] == "synthetic"


@pytest.mark.slow
def test_killed_worker_is_restarted_by_torchrun_and_resumes(tmp_path):
    out_dir = str(tmp_path / "run")
    steps = 24
    proc = _torchrun(out_dir, steps, ["--set", "train.ckpt_every=4"], restarts=1)
    _wait_for_steps(proc, out_dir, 9)
    workers = _workers(proc.pid)
    assert set(workers) == {0, 1}, workers
    os.kill(workers[1], signal.SIGKILL)  # a rank dies
    out = _finish(proc)
    assert proc.returncode == 0, out[-4000:]
    assert "resumed from" in out, out[-4000:]
    summary = json.load(open(os.path.join(out_dir, "summary.json")))
    assert summary["status"] == "completed" and summary["step"] == steps
    assert ck.latest_checkpoint(out_dir).endswith("step_%08d" % steps)


def _trainer(tmp_path, *overrides):
    from engine.train import Trainer

    cfg = apply_overrides(get_preset("test"), ["data.synthetic=true", "data.synthetic_vocab=9",
                                               f"train.out_dir={tmp_path / 'run'}", "train.batch_size=4",
                                               *overrides])
    return Trainer(cfg)


def _poison(trainer, bad_calls):
    """Make the head's loss NaN on the given (1-based) calls."""
    forward = trainer.head.forward
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = forward(*args, **kwargs)
        return loss * float("nan") if bad_calls(calls["n"]) else loss

    trainer.head.forward = poisoned


def test_nonfinite_loss_skips_the_step_and_counts_it(tmp_path):
    trainer = _trainer(tmp_path, "train.steps=6")
    try:
        _poison(trainer, lambda n: n == 3)
        snapshots = []
        step = trainer.train_step

        def recording_step(batches):
            before = trainer.trunk.conv1.weight.detach().clone()
            result = step(batches)
            snapshots.append(torch.equal(before, trainer.trunk.conv1.weight))
            return result

        trainer.train_step = recording_step
        summary = trainer.fit()
    finally:
        trainer.close()
    assert summary["status"] == "completed" and summary["skipped_steps"] == 1
    assert snapshots == [False, False, True, False, False, False]  # step 3 left the weights alone
    assert [h["loss"] is None for h in summary["history"]] == [False, False, True, False, False, False]
    assert all(math.isfinite(h["loss"]) for h in summary["history"] if h["loss"] is not None)
    assert [h["skipped"] for h in summary["history"]] == [0, 0, 1, 0, 0, 0]


def test_too_many_nonfinite_losses_stop_naming_the_last_good_checkpoint(tmp_path):
    from engine.train import NonFiniteLossError

    trainer = _trainer(tmp_path, "train.steps=20", "train.ckpt_every=2", "train.max_nonfinite=3")
    try:
        _poison(trainer, lambda n: n >= 6)
        with pytest.raises(NonFiniteLossError) as e:
            trainer.fit()
    finally:
        trainer.close()
    # Steps 6, 7, 8 are non-finite: no periodic checkpoint is written during the streak (step 6).
    good = str(tmp_path / "run" / "checkpoints" / "step_00000004")
    assert f"3 non-finite losses in a row (train.max_nonfinite=3) at step 8; the last good checkpoint is {good}" \
        in str(e.value)
    assert ck.latest_checkpoint(str(tmp_path / "run")) == good


def test_out_of_memory_names_the_knob(tmp_path):
    from engine.train import OutOfMemory

    trainer = _trainer(tmp_path, "train.steps=5")
    try:
        def oom(*args, **kwargs):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

        trainer.forward_backward = oom
        with pytest.raises(OutOfMemory, match=r"lower train\.micro_batch \(now 4 per rank; the global "
                                              r"train\.batch_size=4 is kept by gradient accumulation"):
            trainer.fit()
    finally:
        trainer.close()
