"""`engine train` as a user runs it: its exit codes (completed 0, non-finite losses or out
of memory 1, preempted 143), a run configured by `--config FILE`, and a new run started
from an earlier run's weights with `model.init` (what the different-world-size resume
error tells the user to do)."""

import json
import os
import signal

import torch

from engine import checkpoint as ck
from engine.cli import main
from engine.heads import HashtagHead


def _args(out_dir, *overrides):
    sets = ["data.synthetic=true", "data.synthetic_vocab=9", "train.batch_size=4", "optim.warmup_steps=0",
            f"train.out_dir={out_dir}", *overrides]
    return ["train", "--preset", "test"] + [arg for s in sets for arg in ("--set", s)]


def _head_calls(monkeypatch, on_call):
    """Runs on_call(n, loss) in place of the head's loss on its n-th call (1-based)."""
    forward = HashtagHead.forward
    calls = {"n": 0}

    def patched(self, *args, **kwargs):
        calls["n"] += 1
        return on_call(calls["n"], forward(self, *args, **kwargs))

    monkeypatch.setattr(HashtagHead, "forward", patched)


def test_nonfinite_losses_exit_1_naming_the_knob(tmp_path, monkeypatch, capsys):
    _head_calls(monkeypatch, lambda n, loss: loss * float("nan"))
    assert main(_args(tmp_path / "run", "train.steps=8", "train.max_nonfinite=2")) == 1
    err = capsys.readouterr().err
    assert "non-finite losses in a row (train.max_nonfinite=2)" in err, err


def test_out_of_memory_exits_1_naming_the_knob(tmp_path, monkeypatch, capsys):
    def oom(n, loss):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    _head_calls(monkeypatch, oom)
    assert main(_args(tmp_path / "run", "train.steps=4")) == 1
    assert "lower train.micro_batch" in capsys.readouterr().err


def test_preempted_run_exits_143_with_a_checkpoint(tmp_path, monkeypatch):
    def sigterm_on_second_step(n, loss):
        if n == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return loss

    _head_calls(monkeypatch, sigterm_on_second_step)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        assert main(_args(tmp_path / "run", "train.steps=50")) == 143
    finally:
        signal.signal(signal.SIGTERM, previous)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "preempted" and summary["step"] < 50
    assert ck.latest_checkpoint(str(tmp_path / "run")) is not None


def test_config_file_is_applied_between_preset_and_overrides(tmp_path, capsys):
    assert main(["train", "--preset", "test", "--print-config"]) == 0
    config = json.loads(capsys.readouterr().out)
    config["train"]["steps"] = 3
    config["train"]["batch_size"] = 6
    config["data"]["synthetic"] = True
    config["data"]["synthetic_vocab"] = 7
    config["optim"]["warmup_steps"] = 0
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    out = tmp_path / "run"
    assert main(["train", "--config", str(path), "--set", f"train.out_dir={out}", "--set", "train.batch_size=4"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["step"] == 3
    saved = json.loads((out / "config.json").read_text())
    # The file's values, then the command line's override of one of them.
    assert saved["train"]["steps"] == 3 and saved["data"]["synthetic_vocab"] == 7 and saved["train"]["batch_size"] == 4


def _trunk_weights(run_dir):
    sd, _ = ck.load_weights(str(run_dir))
    return {k: v for k, v in sd.items() if k.endswith("weight") and v.dim() == 4}


def test_model_init_starts_from_an_earlier_runs_weights(tmp_path):
    first = tmp_path / "first"
    assert main(_args(first, "train.steps=3", "train.seed=1")) == 0
    # An almost-zero learning rate: what the second run ends with is what it started from.
    still = ["train.steps=1", "optim.base_lr=1e-12", "train.seed=2"]
    assert main(_args(tmp_path / "init", *still, f"model.init={first}")) == 0
    assert main(_args(tmp_path / "fresh", *still)) == 0
    expected, loaded, fresh = (_trunk_weights(tmp_path / d) for d in ("first", "init", "fresh"))
    assert expected.keys() == loaded.keys() and len(expected) > 4
    for name, value in expected.items():
        torch.testing.assert_close(loaded[name], value, atol=1e-7, rtol=0, msg=lambda m: f"{name}: {m}")
    assert not torch.allclose(fresh["conv1.weight"], expected["conv1.weight"])


def test_model_init_that_does_not_fit_is_named(tmp_path, capsys):
    first = tmp_path / "first"
    assert main(_args(first, "train.steps=1")) == 0
    capsys.readouterr()
    # One more block in the last stage: keys the earlier run's weights do not have.
    assert main(_args(tmp_path / "other", "train.steps=1", "model.layers=[1,1,1,2]", f"model.init={first}")) == 2
    err = capsys.readouterr().err
    assert "model.init:" in err and "does not fit" in err, err


def test_cudnn_benchmark_mode_follows_the_config(tmp_path, monkeypatch):
    """Training shapes are fixed, so `engine train` runs cuDNN at its best by default (as the
    benchmarks' peers do); model.cudnn_benchmark=false turns the search off."""
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    assert main(_args(tmp_path / "on", "train.steps=1")) == 0
    assert torch.backends.cudnn.benchmark is True
    assert main(_args(tmp_path / "off", "train.steps=1", "model.cudnn_benchmark=false")) == 0
    assert torch.backends.cudnn.benchmark is False
