"""Two-rank gloo training (torch.multiprocessing, file:// rendezvous) on a synthetic
hashtag dataset: the loss falls well below what the hashtag prior alone gives and the
run's checkpoint loads into a linear probe (colour-coded classes, which random features
separate too: tests/test_transfer_probe.py tells trained weights from random ones); a stopped and resumed run gives the same
losses as an uninterrupted one; and the trunk's gradient under DDP + the
vocabulary-parallel head equals the single-process gradient of the global batch, with
and without gradient accumulation."""

import copy
import json
import os

import numpy as np
import pytest
import torch

from engine.config import apply_overrides, get_preset
from engine.evaluate import TransferConfig
from engine.distributed import spawn_ranks

TIMEOUT_S = 300
WORLD = 2


@pytest.fixture(scope="module")
def dataset(make_dataset):
    return make_dataset("train_dataset", n_images=480, vocab_size=16, seed=0, sides=(32, 64), shard_size=160)


def run_ranks(job, tmp_path, *args, world=WORLD):
    """job(rank, world, *args) on `world` gloo ranks; raises if a rank raises or hangs."""
    spawn_ranks(job, world, str(tmp_path), *args, timeout_s=TIMEOUT_S)


def _train_job(rank, world, runs):
    from engine.train import train

    for overrides in runs:
        train(apply_overrides(get_preset("test"), overrides))


def _losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    by_step = {r["step"]: r["loss"] for r in rows}
    return [by_step[s] for s in sorted(by_step)]


def prior_loss(dataset_dir):
    """The loss of the best image-blind prediction: the (resampled) hashtag marginal."""
    from engine.data.dataset import HashtagDataset

    d = HashtagDataset(dataset_dir)
    q = np.zeros((d.num_samples, d.vocab_size))
    for i in range(d.num_samples):
        tags = d.tags_of(i)
        np.add.at(q[i], tags, 1.0 / len(tags))
    w = np.asarray(d.weight) / np.sum(d.weight)
    marginal = (w[:, None] * q).sum(0)
    return float((w * -(q * np.log(marginal)).sum(1)).sum())


@pytest.mark.slow
def test_two_ranks_learn_the_hashtags_and_transfer(dataset, tmp_path):
    from engine.data import synth_imagefolder
    from engine.evaluate import evaluate

    run_dir = str(tmp_path / "run")
    steps = 70
    run_ranks(_train_job, tmp_path, [[f"data.dataset={dataset}", f"train.out_dir={run_dir}", f"train.steps={steps}",
                                      "train.batch_size=32", "optim.base_lr=0.1", "optim.warmup_steps=10",
                                      "train.ckpt_every=35"]])
    losses = _losses(run_dir)
    assert len(losses) == steps
    start, end, prior = np.mean(losses[:3]), np.mean(losses[-10:]), prior_loss(dataset)
    # Falls well below its start, and below the best a model blind to the image can do.
    assert end < 0.8 * start and end < prior - 0.25, (start, end, prior, losses)
    summary = json.load(open(os.path.join(run_dir, "summary.json")))
    assert summary["status"] == "completed" and summary["world_size"] == 2 and summary["skipped_steps"] == 0
    assert summary["checkpoint"].endswith("step_%08d" % steps)
    config = json.load(open(os.path.join(run_dir, "config.json")))
    assert config["resolved"]["micro_batch"] == 16 and config["resolved"]["dist_backend"] == "gloo"
    meta = json.load(open(os.path.join(summary["checkpoint"], "meta.json")))
    # Each rank wrote its own slice of the head; nothing gathered it (engine export does, on demand).
    assert meta["world_size"] == 2 and {"rank_00000.pt", "rank_00001.pt", "shared.pt"} <= set(meta["files"])

    probe = tmp_path / "probe"
    synth_imagefolder(str(probe / "train"), num_classes=8, per_class=12, seed=1)
    synth_imagefolder(str(probe / "val"), num_classes=8, per_class=6, seed=2)
    result = evaluate(TransferConfig(mode="linear", weights=run_dir, train_dir=str(probe / "train"),
                                     val_dir=str(probe / "val"), image_size=32, batch_size=32, epochs=40,
                                     device="cpu", num_workers=0, progress=False))
    assert result["num_classes"] == 8 and result["val_images"] == 48
    assert result["top1"] >= result["chance_top1"] + 50, result  # chance is 12.5%; a random trunk passes too
    assert result["top5"] >= result["top1"]


@pytest.mark.slow
def test_stopped_and_resumed_run_gives_the_same_losses(dataset, tmp_path):
    # 12 steps per epoch per rank (480 samples / 2 ranks / 16 + resampling): the resumed part
    # crosses an epoch boundary.
    common = [f"data.dataset={dataset}", "train.steps=16", "train.batch_size=32", "optim.warmup_steps=4",
              "optim.schedule=cosine", "train.ckpt_every=3"]
    whole, parts = str(tmp_path / "whole"), str(tmp_path / "parts")
    run_ranks(_train_job, tmp_path, [common + [f"train.out_dir={whole}"],
                                     common + [f"train.out_dir={parts}", "train.halt_after=10"]])
    halted = json.load(open(os.path.join(parts, "summary.json")))
    assert halted["status"] == "halted" and halted["step"] == 10
    run_ranks(_train_job, tmp_path, [common + [f"train.out_dir={parts}"]])  # fresh processes, resume=auto
    resumed = json.load(open(os.path.join(parts, "summary.json")))
    assert resumed["status"] == "completed" and resumed["step"] == 16
    a, b = _losses(whole), _losses(parts)
    assert len(a) == len(b) == 16
    assert a == b, list(zip(a, b))
    # keep_last=2 (the test preset): the two newest of steps 3, 6, 9, 10, 12, 15, 16 remain.
    assert sorted(os.listdir(os.path.join(parts, "checkpoints"))) == ["step_00000015", "step_00000016"]


def _gradient_job(rank, world, out_dir, result_path):
    from engine.distributed import DistInfo
    from engine.train import Trainer, build_head

    cfg = apply_overrides(get_preset("test"), ["data.synthetic=true", "data.synthetic_vocab=13",
                                               f"train.out_dir={out_dir}", "train.batch_size=8",
                                               "model.channels_last=false", "train.resume=never"])
    trainer = Trainer(cfg)
    try:
        reference_trunk = copy.deepcopy(trainer.trunk)
        g = torch.Generator().manual_seed(5)
        images = torch.randn(8, 3, 32, 32, generator=g)
        tags = torch.randint(0, 13, (8, 3), generator=g, dtype=torch.int32)
        tags[torch.rand(8, 3, generator=g) < 0.4] = -1
        tags[:, 0] = torch.randint(0, 13, (8,), generator=g, dtype=torch.int32)
        lo, hi = rank * 4, rank * 4 + 4
        trainer.trunk.eval()  # running statistics: each image's features independent of the others
        trainer.forward_backward(images[lo:hi], tags[lo:hi])
        # One process, the whole batch, the head unsharded (initialised alike whatever the world size).
        head = build_head(cfg, trainer.trunk.num_features, 13, DistInfo(), torch.device("cpu"))
        reference_trunk.eval()
        loss = head(reference_trunk(images), tags)
        loss.backward()
        worst = 0.0
        for (name, p), q in zip(trainer.trunk.named_parameters(), reference_trunk.parameters()):
            assert p.grad is not None, name
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
            worst = max(worst, float((p.grad - q.grad).abs().max()))
        start, stop = trainer.head.vocab_start, trainer.head.vocab_stop
        torch.testing.assert_close(trainer.head.weight, head.weight[start:stop].detach())
        torch.testing.assert_close(trainer.head.weight.grad, head.weight.grad[start:stop], rtol=1e-4, atol=1e-6)
        # Gradient accumulation: two micro-batches of 2 rows per rank, DDP's all-reduce on the last only.
        trainer.optimizer.zero_grad(set_to_none=True)
        trainer.accum = 2
        trainer.forward_backward(images[lo:lo + 2], tags[lo:lo + 2], sync=False)
        trainer.forward_backward(images[lo + 2:hi], tags[lo + 2:hi], sync=True)
        for (name, p), q in zip(trainer.trunk.named_parameters(), reference_trunk.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg="accumulated " + name)
        torch.testing.assert_close(trainer.head.weight.grad, head.weight.grad[start:stop], rtol=1e-4, atol=1e-6)
        if rank == 0:
            with open(result_path, "w") as f:
                json.dump({"worst": worst}, f)
    finally:
        trainer.close()


def test_ddp_and_vocab_parallel_head_give_the_global_gradient(tmp_path):
    result = tmp_path / "grad.json"
    run_ranks(_gradient_job, tmp_path, str(tmp_path / "run"), str(result))
    assert json.loads(result.read_text())["worst"] < 1e-4
