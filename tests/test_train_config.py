"""Training configuration: presets, `--set` overrides with type coercion, and bad configs
failing before any work with a message naming the field."""

import json
import math
import os

import pytest

from engine import config as C
from engine.cli import main
from engine.config import ConfigError, apply_overrides, get_preset, validate


def test_every_preset_resolves_and_validates():
    for name in C.PRESETS:
        cfg = get_preset(name)
        assert cfg.preset == name
        if not cfg.data.dataset:  # tiny/test: the demo and the tests name theirs
            cfg = apply_overrides(cfg, ["data.dataset=somewhere"])
        world = 8 if name.startswith("paper") else 1
        validate(cfg, world, check_paths=False)
    paper = get_preset("paper-32x48d-17k")
    assert paper.model.name == "resnext101_32x48d"
    assert paper.train.batch_size == 8064 and paper.train.micro_batch == 24
    assert C.accumulation(paper, 8) == (24, 42)  # 8,064 on one 8-GPU node
    assert C.accumulation(paper, 336) == (24, 1)  # the paper's 336 GPUs
    assert paper.optim.nesterov and paper.optim.momentum == 0.9 and paper.optim.weight_decay == 1e-4
    assert paper.optim.base_lr * paper.train.batch_size / paper.optim.reference_batch == pytest.approx(3.15)
    assert not paper.model.sync_bn  # per-GPU batch norm, as in the paper
    assert {f"paper-32x{w}d-{v}" for w in (8, 16, 32, 48) for v in ("1.5k", "8.5k", "17k")} <= set(C.PRESETS)


def test_overrides_coerce_to_the_field_types():
    cfg = apply_overrides(get_preset("tiny"), [
        "train.steps=1_000", "optim.base_lr=2.5e-2", "model.compile=yes", "model.layers=[2,1,1,1]",
        "optim.milestones=10,20", "data.dataset=some/dir", "train.batch_size=64.0"])
    assert cfg.train.steps == 1000 and isinstance(cfg.train.steps, int)
    assert cfg.optim.base_lr == 0.025
    assert cfg.model.compile is True
    assert cfg.model.layers == [2, 1, 1, 1] and cfg.optim.milestones == [10, 20]
    assert cfg.data.dataset == "some/dir" and cfg.train.batch_size == 64
    assert get_preset("tiny").train.steps != 1000  # presets are fresh copies
    again = C.from_dict(json.loads(C.to_json(cfg)))
    assert again == cfg


@pytest.mark.parametrize("override, named", [
    ("train.stepz=3", "train.stepz"),
    ("trian.steps=3", "trian.steps"),
    ("train.steps=many", "train.steps"),
    ("train.steps=2.5", "train.steps"),
    ("model.compile=maybe", "model.compile"),
    ("model.layers=[1,x]", "model.layers"),
    ("steps=3", "steps"),
])
def test_bad_overrides_name_the_field(override, named):
    with pytest.raises(ConfigError) as e:
        apply_overrides(get_preset("tiny"), [override])
    assert str(e.value).startswith(named)


def test_unknown_field_suggests_the_close_one():
    with pytest.raises(ConfigError, match=r"did you mean train\.steps"):
        apply_overrides(get_preset("tiny"), ["train.stepz=3"])


def test_unknown_preset_is_named():
    with pytest.raises(ConfigError, match=r"unknown preset 'paper-32x8d-1k'.*did you mean"):
        get_preset("paper-32x8d-1k")


@pytest.mark.parametrize("override, world, named", [
    ("train.batch_size=33", 2, "train.batch_size"),
    ("train.micro_batch=5", 2, "train.micro_batch"),
    ("data.dataset=", 1, "data.dataset"),
    ("data.dataset=/no/such/dataset", 1, "data.dataset"),
    ("model.name=resnext101_32x9d", 1, "model.name"),
    ("optim.schedule=linear", 1, "optim.schedule"),
    ("train.precision=fp8", 1, "train.precision"),
    ("optim.warmup_steps=100000", 1, "optim.warmup_steps"),
    ("head.sample_fraction=0", 1, "head.sample_fraction"),
    ("train.batch_size=2", 2, "train.micro_batch"),
])
def test_validation_names_the_field(tmp_path, override, world, named):
    cfg = apply_overrides(get_preset("test"), [f"data.dataset={tmp_path}", override])
    os.makedirs(tmp_path, exist_ok=True)
    (tmp_path / "dataset.json").write_text("{}")
    with pytest.raises(ConfigError) as e:
        validate(cfg, world)
    assert str(e.value).startswith(named), str(e.value)


def test_train_fails_before_any_work(tmp_path, monkeypatch):
    from engine.train import train

    out = tmp_path / "run"
    cfg = apply_overrides(get_preset("test"), ["data.dataset=/no/such/dataset", f"train.out_dir={out}"])
    with pytest.raises(ConfigError, match=r"^data\.dataset: '/no/such/dataset' does not exist"):
        train(cfg)
    assert not out.exists()
    # Under torchrun with 3 ranks: refused before the process group is even created.
    monkeypatch.setenv("WORLD_SIZE", "3")
    cfg = apply_overrides(get_preset("test"), ["data.synthetic=true", f"train.out_dir={out}"])
    with pytest.raises(ConfigError, match=r"^train\.batch_size: 16 is not divisible by the world size \(3 ranks\)"):
        train(cfg)
    assert not out.exists()


def test_apex_optimizers_absent_name_the_alternative(tmp_path):
    pytest.importorskip("torch")
    try:
        import apex.optimizers  # noqa: F401
        pytest.skip("apex is installed here")
    except ImportError:
        pass
    from engine.train import train

    for name, hint in (("apex_sgd", "optim.name=sgd"), ("apex_lamb", "torch has no LAMB")):
        cfg = apply_overrides(get_preset("test"), ["data.synthetic=true", f"optim.name={name}",
                                                   f"train.out_dir={tmp_path / 'run'}"])
        with pytest.raises(ConfigError, match=rf"^optim\.name: {name} needs NVIDIA apex.*{hint}"):
            train(cfg)


def test_learning_rate_schedule():
    from engine.builders import lr_lambda, peak_lr

    cfg = apply_overrides(get_preset("tiny"), ["train.steps=100", "train.batch_size=512", "optim.base_lr=0.1",
                                               "optim.warmup_steps=10", "optim.warmup_start=0.5",
                                               "optim.schedule=step", "optim.num_decays=2", "optim.decay_factor=0.5"])
    assert peak_lr(cfg) == pytest.approx(0.2)
    f = lr_lambda(cfg)
    assert f(0) == 0.5 and f(5) == pytest.approx(0.75) and f(10) == 1.0
    assert [f(s) for s in (39, 40, 69, 70, 99)] == [1.0, 0.5, 0.5, 0.25, 0.25]
    cfg = apply_overrides(cfg, ["optim.schedule=cosine", "optim.min_lr_factor=0.1"])
    f = lr_lambda(cfg)
    assert f(10) == pytest.approx(1.0) and f(55) == pytest.approx(0.55) and f(100) == pytest.approx(0.1)
    paper = get_preset("paper-32x8d-1.5k")
    f = lr_lambda(paper)
    assert f(0) * peak_lr(paper) == pytest.approx(0.1)  # the warm-up starts at 0.1 ...
    assert f(paper.optim.warmup_steps) * peak_lr(paper) == pytest.approx(0.1 * 8064 / 256)  # ... reaches 3.15
    assert f(paper.train.steps - 1) == pytest.approx(0.5 ** 20)
    assert not math.isnan(f(paper.train.steps))


def test_cli_errors_name_the_field(capsys, tmp_path):
    assert main(["train", "--preset", "nope"]) == 2
    assert "preset: unknown preset 'nope'" in capsys.readouterr().err
    assert main(["train", "--preset", "test", "--set", "train.stepz=3"]) == 2
    assert "train.stepz: unknown field 'stepz'" in capsys.readouterr().err
    assert main(["train", "--preset", "test", "--set", "data.dataset=/no/such"]) == 2
    assert "data.dataset: '/no/such' does not exist" in capsys.readouterr().err
    assert main(["train", "--preset", "tiny", "--set", "train.steps=7", "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["train"]["steps"] == 7 and printed["preset"] == "tiny"
    assert main(["train", "--list-presets"]) == 0
    assert "paper-32x48d-17k" in capsys.readouterr().out


def test_one_switch_selects_the_fused_blocks():
    from engine.builders import build_trunk
    from engine.models import BNActBottleneck, ConvBNBottleneck

    for mode, block in (("bn_act", BNActBottleneck), ("conv", ConvBNBottleneck)):
        cfg = apply_overrides(get_preset("tiny"), [f"model.fused={mode}", "data.synthetic=true"])
        validate(cfg, 1)
        assert isinstance(build_trunk(cfg).layer1[0], block)
    with pytest.raises(ConfigError, match="model.fused: must be one of none, bn_act, conv"):
        validate(apply_overrides(get_preset("tiny"), ["model.fused=everything", "data.synthetic=true"]), 1)
