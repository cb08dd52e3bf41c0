"""Transfer evaluation (linear probe, fine-tuning) from an engine checkpoint and from a
torchvision-format state dict; `engine plot`; the demo and the end-to-end benchmark in
their small CPU modes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.cli import main
from engine.config import ConfigError
from engine.evaluate import TransferConfig

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.filterwarnings(
    "ignore:The image decoding and encoding capabilities of TorchVision:DeprecationWarning")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from engine.data import synth_imagefolder

    root = tmp_path_factory.mktemp("probe")
    synth_imagefolder(str(root / "train"), num_classes=6, per_class=8, seed=1, min_side=32, max_side=48)
    synth_imagefolder(str(root / "val"), num_classes=6, per_class=4, seed=2, min_side=32, max_side=48)
    return str(root / "train"), str(root / "val")


@pytest.fixture(scope="module")
def state_dict_file(tmp_path_factory):
    """A torchvision-layout state dict (fc included, 'module.' prefixes) of a tiny ResNeXt."""
    from engine.models.resnext import resnext

    torch.manual_seed(0)
    model = resnext([1, 1, 1, 1], 4, 4, num_classes=5)
    path = tmp_path_factory.mktemp("weights") / "tiny_wsl.pth"
    torch.save({"module." + k: v for k, v in model.state_dict().items()}, path)
    return str(path)


def _cfg(folders, **kw):
    train, val = folders
    base = dict(train_dir=train, val_dir=val, image_size=32, batch_size=16, device="cpu", num_workers=0,
                progress=False)
    return TransferConfig(**{**base, **kw})


def test_the_trunk_evaluated_holds_the_weights_given(state_dict_file):
    """Every trunk tensor is the file's (prefixes stripped, the classifier dropped), not a
    fresh initialisation of the inferred architecture."""
    from engine.evaluate import load_trunk

    trunk, source = load_trunk(state_dict_file)
    saved = {k.removeprefix("module."): v for k, v in torch.load(state_dict_file).items()}
    got = trunk.state_dict()
    assert source["arch"] == "resnext(layers=[1, 1, 1, 1], groups=4, width_per_group=4)"
    assert set(got) == {k for k in saved if not k.startswith("fc.")}
    for name, tensor in got.items():
        assert torch.equal(tensor, saved[name]), name


def test_linear_probe_from_a_state_dict_file(folders, state_dict_file, tmp_path):
    from engine.evaluate import evaluate

    out = tmp_path / "linear.json"
    r = evaluate(_cfg(folders, mode="linear", weights=state_dict_file, epochs=30, out=str(out)))
    assert r["arch"] == "resnext(layers=[1, 1, 1, 1], groups=4, width_per_group=4)"
    assert r["num_classes"] == 6 and r["train_images"] == 48 and r["val_images"] == 24
    assert 0 <= r["top1"] <= r["top5"] <= 100 and r["top5_k"] == 5
    assert r["top1"] > 2 * r["chance_top1"]  # colour classes: even random features separate them
    assert json.loads(out.read_text())["top1"] == r["top1"]


def test_finetune_from_an_engine_checkpoint(folders, tmp_path):
    from engine.config import apply_overrides, get_preset
    from engine.evaluate import evaluate
    from engine.train import train

    run = tmp_path / "run"
    train(apply_overrides(get_preset("test"), ["data.synthetic=true", "data.synthetic_vocab=7", "train.steps=5",
                                               "optim.warmup_steps=1", f"train.out_dir={run}"]))
    r = evaluate(_cfg(folders, mode="finetune", weights=str(run), epochs=2, lr=0.01))
    assert r["mode"] == "finetune" and r["weights"] == str(run)
    assert r["arch"] == "resnext(layers=[1, 1, 1, 1], groups=4, width_per_group=4)"
    assert r["val_images"] == 24 and 0 <= r["top1"] <= r["top5"] <= 100


def test_eval_cli_and_its_errors(folders, state_dict_file, capsys):
    train, val = folders
    assert main(["eval", "linear", "--weights", state_dict_file, "--train-dir", train, "--val-dir", val,
                 "--image-size", "32", "--batch-size", "16", "--epochs", "5", "--device", "cpu",
                 "--num-workers", "0"]) == 0
    assert "top-1" in capsys.readouterr().out
    assert main(["eval", "linear", "--weights", "/no/such.pth", "--train-dir", train, "--val-dir", val]) == 2
    assert "weights: '/no/such.pth' does not exist" in capsys.readouterr().err
    assert main(["eval", "finetune", "--weights", "random", "--train-dir", train, "--val-dir", val]) == 2
    assert "random weights need --model" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="^val_dir"):
        from engine.evaluate import evaluate

        evaluate(_cfg(folders, mode="linear", weights=state_dict_file, val_dir="/nowhere"))


def test_plot_draws_the_curves(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": s, "loss": 3.0 / s, "lr": 0.1, "img_per_s": 100.0 + s, "img_per_s_per_rank": 50.0,
             "data_wait": 0.05, "step_ms": 10.0, "mfu": None, "mem_gib": 0.1} for s in range(1, 11)]
    rows[4]["loss"] = None  # an interval of skipped steps
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 11, "lo')
    assert main(["plot", str(run)]) == 0
    png = run / "curves.png"
    assert capsys.readouterr().out.strip() == str(png)
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"
    assert main(["plot", str(tmp_path / "empty")]) == 2
    assert "holds no metrics.jsonl" in capsys.readouterr().err


def test_demo_end_to_end_small(tmp_path):
    """The README's main command, shortened: synth -> build -> pretrain -> linear probe."""
    env = dict(os.environ, OMP_NUM_THREADS="2")
    proc = subprocess.run([sys.executable, "-m", "engine.cli", "demo", "--out", str(tmp_path / "demo"),
                           "--steps", "12", "--images", "160", "--vocab", "8", "--probe-classes", "4"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    for stage in ("== 1. synthesise", "== 2. build", "== 3. pretrain", "== 4. transfer", "== 5. final metrics",
                  "img/s", "linear probe"):
        assert stage in out, out[-3000:]
    result = json.loads((tmp_path / "demo" / "demo.json").read_text())
    assert result["pretrain"]["status"] == "completed" and result["pretrain"]["step"] == 12
    assert result["linear_probe"]["top1"] > result["linear_probe"]["chance_top1"]


def test_bench_train_e2e_smoke(tmp_path):
    out = tmp_path / "e2e.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_train_e2e", "--smoke", "--out", str(out),
                           "--work", str(tmp_path / "work")], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["environment"]["device"] and report["smoke"] is True
    modes = {r["input"]: r for r in report["results"]}
    assert set(modes) == {"synthetic", "real"}
    assert all(r["img_per_s"] > 0 for r in modes.values())
    assert report["real_over_synthetic"] > 0
    # The real input is read from disk, not from the page cache the build left warm.
    assert modes["real"]["settings"]["page_cache"].startswith("dropped")
    assert all({"warmup", "repeats", "compile", "cudnn_benchmark"} <= set(r["settings"]) for r in modes.values())
