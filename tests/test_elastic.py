"""Elastic training (issue 19): a step is the same at any world size, so a checkpoint of a
2-rank run resumes at 1 and at 4 ranks with the losses of the uninterrupted 2-rank run; the
head's slices and their momentum are resharded; world sizes that do not divide the batch
and old-format checkpoints at another world size fail naming what works."""

import json
import os
import shutil

import pytest
import torch

from engine import checkpoint as ck
from engine.config import ConfigError, apply_overrides, get_preset
from engine.distributed import spawn_ranks

BATCH, MICRO = 16, 4


@pytest.fixture(scope="module")
def dataset(make_dataset):
    return make_dataset("elastic_dataset", n_images=96, vocab_size=12, seed=3, sides=(24, 48), shard_size=96)


def _overrides(dataset, out_dir, steps):
    # 96 samples / 16 per step: 6 steps an epoch, so the resumed part crosses epochs. Momentum and a
    # cosine schedule make the resumed steps depend on the optimizer state and the schedule position.
    return [f"data.dataset={dataset}", f"train.out_dir={out_dir}", f"train.steps={steps}",
            f"train.batch_size={BATCH}", f"train.micro_batch={MICRO}", "data.image_size=24",
            "optim.warmup_steps=3", "optim.schedule=cosine", "optim.base_lr=0.1", "train.ckpt_every=10",
            "train.keep_last=5", "train.log_every=1"]


def _train_job(rank, world, overrides):
    from engine.train import train

    train(apply_overrides(get_preset("test"), overrides))


def _losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


@pytest.mark.slow
def test_a_two_rank_checkpoint_resumes_at_one_and_four_ranks(dataset, tmp_path):
    whole = str(tmp_path / "whole")
    spawn_ranks(_train_job, 2, str(tmp_path), _overrides(dataset, whole, 20), timeout_s=300)
    reference = _losses(whole)
    assert sorted(reference) == list(range(1, 21))
    ten = os.path.join(whole, "checkpoints", "step_00000010")
    meta = ck.read_meta(ten)
    assert meta["world_size"] == 2 and meta["head_slices"] == [[0, 6], [6, 12]] and "model.pt" not in meta["files"]

    worst = 0.0
    for world in (1, 4):
        run = str(tmp_path / f"at{world}")
        shutil.copytree(ten, os.path.join(run, "checkpoints", "step_00000010"))
        spawn_ranks(_train_job, world, str(tmp_path), _overrides(dataset, run, 20), timeout_s=300)
        resumed = _losses(run)
        assert sorted(resumed) == list(range(11, 21)), (world, resumed)
        for step, loss in resumed.items():
            worst = max(worst, abs(loss - reference[step]) / abs(reference[step]))
        summary = json.load(open(os.path.join(run, "summary.json")))
        assert summary["status"] == "completed" and summary["world_size"] == world
        assert summary["accumulation"] == BATCH // (MICRO * world) and summary["images"] == 20 * BATCH
        # The resharded checkpoint holds the same head as a gathered one would.
        a, b = ck.model_state(os.path.join(run, "checkpoints", "step_00000020")), ck.model_state(
            os.path.join(whole, "checkpoints", "step_00000020"))
        torch.testing.assert_close(a["fc.weight"], b["fc.weight"], rtol=0, atol=2e-4)
    print(f"elastic resume: worst relative loss difference {worst:.2e}")
    assert worst < 1e-5, worst

    # B=16, m=4 does not split over 3 ranks: the error names the world sizes that do.
    from engine.train import resumed_accumulation

    cfg = apply_overrides(get_preset("test"), _overrides(dataset, whole, 30) + ["train.micro_batch=0"])
    with pytest.raises(ConfigError, match="cannot continue at 3 ranks.*world sizes that work: 1, 2, 4"):
        resumed_accumulation(cfg, 3, ten)
    assert resumed_accumulation(cfg, 4, ten) == (MICRO, 1)  # micro_batch=0 keeps the checkpoint's


def test_format_1_checkpoints_resume_only_at_their_world_size(tmp_path):
    from engine.train import resumed_accumulation

    path = tmp_path / "checkpoints" / "step_00000004"
    os.makedirs(path)
    torch.save({"x": 1}, path / "rank_00000.pt")
    (path / "meta.json").write_text(json.dumps({"format": ck.FORMAT_1, "step": 4, "world_size": 2,
                                                "files": {"rank_00000.pt": os.path.getsize(path / "rank_00000.pt")}}))
    cfg = apply_overrides(get_preset("test"), ["data.synthetic=true", "train.micro_batch=4"])
    assert ck.latest_checkpoint(str(tmp_path)) == str(path)
    assert resumed_accumulation(cfg, 2, str(path)) == (4, 2)
    with pytest.raises(ConfigError, match="written by 2 ranks in the old format.*resumes at its own world size"):
        resumed_accumulation(cfg, 1, str(path))
    with pytest.raises(ValueError, match="resumes at its own world size only"):
        ck.load_checkpoint(str(path), rank=0, world_size=1)
