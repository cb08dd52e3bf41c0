"""Transfer tells pretrained weights from random ones. The synthetic hashtags here are carried
by stripe orientation and frequency alone, with random colours per image
(`synth(tag_colours=False)`): a randomly initialised trunk's pooled features follow colour
and barely the stripes, so its linear probe on labelled images of those hashtags stays near
chance, while a trunk pretrained on the hashtags by `engine.train` is far above it. Broken
pretraining (a dropped gradient, lr 0, weights never saved or loaded) puts the pretrained
probe back near chance, which these tests catch; the colour-coded sets of the other transfer
tests cannot, since random features separate colours."""

import pytest
import torch

from engine.config import apply_overrides, get_preset
from engine.evaluate import TransferConfig

pytestmark = pytest.mark.slow  # a minute or more on 2 cores

CLASSES = 8
CHANCE = 100.0 / CLASSES
# Measured on a 2-core CPU, 800 steps, three pretraining seeds, 16 shots and 40 validation
# images a class: linear probe of the random trunk 16.9-22.5% top-1, of the pretrained one
# 53.1-59.1%; fine-tuning 3 epochs (seed 0): 15.0% from random, 61.6% from pretrained. The
# bars sit between, several standard errors (about 2.8 points at 320 images) from each side.
RANDOM_AT_MOST = CHANCE + 15
PRETRAINED_AT_LEAST = CHANCE + 25


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """(run dir, the test preset's config): 800 steps on 2,000 stripe-coded images, about a
    minute on 2 cores."""
    from engine.data import BuildConfig, build, synth
    from engine.train import train

    root = tmp_path_factory.mktemp("stripes")
    raw = synth(str(root / "raw"), n_images=2000, vocab_size=16, seed=0, min_side=32, max_side=64, bad_files=False,
                n_duplicates=0, n_eval=0, n_eval_overlap=0, progress=False, tag_colours=False)
    build(BuildConfig(images=raw["images"], metadata=raw["metadata"], out=str(root / "ds"), vocab_size=16,
                      synonyms=raw["synonyms"], shard_size=500, workers=1, progress=False))
    cfg = apply_overrides(get_preset("test"), [f"data.dataset={root / 'ds'}", f"train.out_dir={root / 'run'}",
                                               "train.steps=800", "train.batch_size=32", "optim.base_lr=0.2",
                                               "optim.warmup_steps=10", "train.log_every=100"])
    summary = train(cfg)
    assert summary["status"] == "completed", summary
    return str(root / "run"), cfg


@pytest.fixture(scope="module")
def probe_set(tmp_path_factory):
    """Labelled images of the first 8 pretraining hashtags (new images, colours random)."""
    from engine.data import synth_imagefolder

    root = tmp_path_factory.mktemp("probe")
    for split, per_class, seed in (("train", 16, 1), ("val", 40, 2)):
        synth_imagefolder(str(root / split), num_classes=CLASSES, per_class=per_class, seed=seed, min_side=32,
                          max_side=64, first_tag=0, tag_colours=False)
    return str(root / "train"), str(root / "val")


@pytest.fixture(scope="module")
def random_weights(pretrained, tmp_path_factory):
    from engine.builders import build_trunk

    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("random") / "random_trunk.pt"
    torch.save(build_trunk(pretrained[1], fused=False).state_dict(), path)
    return str(path)


def _transfer(weights, probe_set, **kw):
    from engine.evaluate import evaluate

    train_dir, val_dir = probe_set
    cfg = dict(mode="linear", weights=weights, train_dir=train_dir, val_dir=val_dir, image_size=32, batch_size=32,
               epochs=40, device="cpu", num_workers=0, progress=False)
    return evaluate(TransferConfig(**{**cfg, **kw}))


def test_linear_probe_is_near_chance_for_a_random_trunk_and_far_above_for_a_pretrained_one(
        pretrained, probe_set, random_weights):
    run_dir, _ = pretrained
    random_init = _transfer(random_weights, probe_set)
    trained = _transfer(run_dir, probe_set)
    assert random_init["num_classes"] == trained["num_classes"] == CLASSES
    assert random_init["val_images"] == trained["val_images"] == CLASSES * 40
    assert random_init["top1"] <= RANDOM_AT_MOST, random_init
    assert trained["top1"] >= PRETRAINED_AT_LEAST, (trained["top1"], random_init["top1"])



def test_fine_tuning_from_pretrained_weights_beats_fine_tuning_from_random_ones(pretrained, probe_set,
                                                                                 random_weights):
    """Three epochs of fine-tuning on 16 images a class: from random weights the network has
    not learnt the stripes yet; from pretrained weights it starts from them."""
    run_dir, _ = pretrained
    kw = dict(mode="finetune", epochs=3, lr=0.01, batch_size=16)
    random_init = _transfer(random_weights, probe_set, **kw)
    trained = _transfer(run_dir, probe_set, **kw)
    assert random_init["mode"] == trained["mode"] == "finetune"
    assert random_init["top1"] <= RANDOM_AT_MOST, random_init
    assert trained["top1"] >= PRETRAINED_AT_LEAST, (trained["top1"], random_init["top1"])
