"""Sample order, rank sharding, resampling and crop windows (engine.data.sampling)."""

import numpy as np
import pytest

from engine.data.sampling import (
    EvalSequence, FeistelPermutation, TrainSequence, center_crop, random_resized_crop, world_sizes,
)


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 1000, 4097])
def test_feistel_is_a_permutation(n):
    perm = FeistelPermutation(n, key=[0, 1, 2])
    out = perm(np.arange(n))
    assert sorted(out.tolist()) == list(range(n))
    assert np.array_equal(out, FeistelPermutation(n, key=[0, 1, 2])(np.arange(n)))
    if n > 10:
        assert not np.array_equal(out, np.arange(n))
        assert not np.array_equal(out, FeistelPermutation(n, key=[0, 2, 2])(np.arange(n)))


def _epoch_ids(seq, epoch):
    return np.concatenate([seq.batch(epoch * seq.steps_per_epoch + s).ids for s in range(seq.steps_per_epoch)])


def test_shuffled_epochs_rank_disjoint_and_covering():
    n, b, w = 103, 5, 3
    seqs = [TrainSequence(n, b, r, w, seed=7) for r in range(w)]
    assert all(s.steps_per_epoch == n // (w * b) for s in seqs)
    for epoch in (0, 1):
        ids = [_epoch_ids(s, epoch) for s in seqs]
        allids = np.concatenate(ids)
        assert len(set(allids.tolist())) == len(allids) == w * seqs[0].steps_per_epoch * b
        assert n - len(allids) < w * b  # only a short tail is left out
    assert not np.array_equal(_epoch_ids(seqs[0], 0), _epoch_ids(seqs[0], 1))
    # The global order does not depend on the number of ranks: step k is positions [k B, (k + 1) B).
    one = TrainSequence(n, b * w, 0, 1, seed=7)
    assert np.array_equal(one.batch(4).ids, np.concatenate([s.batch(4).ids for s in seqs]))


@pytest.mark.parametrize("resample", [False, True])
def test_micro_batches_of_a_step_do_not_depend_on_the_world_size(resample):
    """Micro-batch j of step s: the same samples and crop uniforms at W = 1, 2, 4 (B = 32, m = 4),
    with rank r running micro-batches r A .. r A + A - 1 of each step, A = B / (m W)."""
    n, B, m = 200, 32, 4
    cdf = np.cumsum(np.linspace(1, 3, n)) if resample else None

    def steps(world):
        seqs = [TrainSequence(n, m, r, world, seed=5, weights_cdf=cdf, global_batch=B) for r in range(world)]
        accum = B // (m * world)
        assert all(s.accum == accum and s.steps_per_epoch == (n // B) * accum for s in seqs)
        out = []
        for step in (0, 3, 7, 13):  # 6 steps an epoch: 7 and 13 are in later epochs
            plans = [s.batch(step * accum + i) for s in seqs for i in range(accum)]
            out.append((np.stack([p.ids for p in plans]), np.stack([p.positions for p in plans]),
                        np.stack([seqs[0].uniforms(p.epoch, p.positions, 1, 41) for p in plans])))
        return out

    reference = steps(1)
    for world in (2, 4):
        for (ids, pos, u), (ids1, pos1, u1) in zip(steps(world), reference):
            assert np.array_equal(ids, ids1) and np.array_equal(pos, pos1) and np.array_equal(u, u1)
    with pytest.raises(ValueError, match="world sizes that work: 1, 2, 4, 8"):
        TrainSequence(n, m, 0, 3, seed=5, global_batch=B)
    assert world_sizes(B, m) == [1, 2, 4, 8]


def test_resampled_epochs_follow_the_weights():
    n = 50
    weights = np.ones(n)
    weights[0] = 25.0  # sample 0 should take a third of all draws
    seq = TrainSequence(n, 100, 0, 1, seed=0, weights_cdf=np.cumsum(weights), samples_per_epoch=30000)
    ids = _epoch_ids(seq, 0)
    assert abs(np.mean(ids == 0) - 25 / 74) < 0.02
    assert set(np.unique(ids).tolist()) == set(range(n))
    seq2 = TrainSequence(n, 100, 0, 1, seed=0, weights_cdf=np.cumsum(weights), samples_per_epoch=30000)
    assert np.array_equal(seq2.batch(123).ids, seq.batch(123).ids)


def test_eval_sequence_slices():
    seqs = [EvalSequence(10, 3, r, 3) for r in range(3)]
    ids = [np.concatenate([s.batch(k).ids for k in range(s.steps_per_epoch)]) for s in seqs]
    assert np.array_equal(np.concatenate(ids), np.arange(10))
    assert [len(s.batch(s.steps_per_epoch - 1).ids) for s in seqs] == [3, 3, 1]
    with pytest.raises(ValueError, match="rank 3"):
        EvalSequence(10, 3, 3, 3)


def test_train_sequence_rejects_too_small_epochs():
    with pytest.raises(ValueError, match="fewer than one batch"):
        TrainSequence(10, 8, 0, 2, seed=0)


def test_random_resized_crop_windows_are_valid():
    rng = np.random.default_rng(0)
    h = rng.integers(1, 500, size=2000)
    w = rng.integers(1, 500, size=2000)
    boxes = random_resized_crop(h, w, rng.random((2000, 40)))
    left, top, bw, bh = boxes.T
    assert (bw >= 1).all() and (bh >= 1).all()
    assert (left >= 0).all() and (top >= 0).all() and (left + bw <= w).all() and (top + bh <= h).all()
    big = (h > 50) & (w > 50) & (h < 2 * w) & (w < 2 * h)
    frac = (bw * bh / (h * w))[big]
    assert frac.min() >= 0.08 * 0.9 and frac.max() <= 1.0
    ar = (bw / bh)[big & (bw > 20) & (bh > 20)]
    assert ar.min() > 0.7 and ar.max() < 1.45
    # Extreme aspect ratios fall back to a centred crop at the nearest allowed ratio.
    box = random_resized_crop(np.array([10]), np.array([1000]), np.ones((1, 40)))
    assert box.tolist() == [[493, 0, 13, 10]]


def test_center_crop_matches_resize_then_center_crop():
    boxes = center_crop(np.array([256, 300, 375]), np.array([256, 400, 500]), 0.875)
    assert boxes.tolist() == [[16, 16, 224, 224], [69, 19, 262, 262], [86, 24, 328, 328]]
