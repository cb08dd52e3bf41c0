"""Which samples each rank reads, in which order, with which crop and flip.

Every random choice is a pure function of (seed, epoch, position in the epoch),
computed in numpy on the host, so that

- a loader's whole state is (epoch, step): resuming from a checkpoint replays
  exactly the batches that would have come next (no pipeline RNG to restore);
- the DALI and the PyTorch loaders read the same samples with the same crop
  windows and flips, and can be compared image by image;
- a training step does not depend on the number of ranks: with global batch B
  and micro-batch m, step k of an epoch is positions [k * B, (k + 1) * B), its
  micro-batch j is positions [k * B + j * m, k * B + (j + 1) * m), and rank r of
  W reads micro-batches j = r * A .. r * A + A - 1, A = B / (m * W) accumulation
  steps. Samples, crops and flips are functions of positions, so micro-batch j
  of step s is the same m images, cropped the same way, at any W (and each
  per-GPU batch norm sees the same m images).

Training epochs (length L = samples_per_epoch, default the dataset size N):

- resample on: position p holds an i.i.d. draw from the resampling weights
  (with replacement), by inverse-CDF search on uniforms from
  numpy.random.default_rng([seed, epoch, block, 0]), block = p // 4096;
- resample off: position p holds perm_epoch(p), a seeded pseudo-random
  permutation of [0, N) (a Feistel network with cycle walking): each sample
  exactly once, O(1) memory, random access.

An epoch has L // B full steps (a short tail is dropped); a rank reads
A * (L // B) micro-batches of it. Evaluation reads each rank's contiguous slice of
[0, N) once, in order, the last batch possibly short.

Crop windows follow torchvision's RandomResizedCrop.get_params (10 attempts with
area fraction in `scale` and log-uniform aspect ratio in `ratio`, then a centre
crop fallback), vectorised; uniforms come from default_rng([seed, epoch, block, 1]).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

BLOCK = 4096
_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on uint64 arrays (wrapping arithmetic)."""
    x = x.copy()
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


class FeistelPermutation:
    """A seeded bijection of [0, n), evaluated on arrays of positions."""

    def __init__(self, n: int, key, rounds: int = 6):
        if n < 1:
            raise ValueError("n must be at least 1")
        self.n = n
        bits = max(2, math.ceil(math.log2(n)) if n > 1 else 2)
        self.half = (bits + 1) // 2
        self.mask = np.uint64((1 << self.half) - 1)
        keys = np.random.default_rng(key).integers(0, 2**63, size=rounds, dtype=np.int64)
        self.keys = keys.astype(np.uint64)

    def _once(self, x: np.ndarray) -> np.ndarray:
        h = np.uint64(self.half)
        left, right = x >> h, x & self.mask
        for k in self.keys:
            left, right = right, left ^ (_mix64(right ^ k) & self.mask)
        return (left << h) | right

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        x = np.asarray(positions, dtype=np.uint64)
        with np.errstate(over="ignore"):
            y = self._once(x)
            bad = y >= np.uint64(self.n)
            while bad.any():  # cycle walking: at most a few rounds (domain < 4n)
                y[bad] = self._once(y[bad])
                bad = y >= np.uint64(self.n)
        return y.astype(np.int64)


@dataclass
class BatchPlan:
    ids: np.ndarray  # int64 [B] sample ids
    positions: np.ndarray  # int64 [B] positions in the epoch's global sequence
    epoch: int
    step: int


class TrainSequence:
    """The training micro-batches of one rank (module docstring). `batch_size` is the
    micro-batch m one call of batch() returns; `global_batch` the optimizer step's B
    (default m * world_size: no accumulation)."""

    def __init__(self, n: int, batch_size: int, rank: int, world_size: int, seed: int,
                 weights_cdf: Optional[np.ndarray] = None, samples_per_epoch: Optional[int] = None,
                 global_batch: Optional[int] = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.n = n
        self.batch_size = batch_size
        self.global_batch = int(global_batch or batch_size * world_size)
        if self.global_batch % (batch_size * world_size):
            raise ValueError(f"a global batch of {self.global_batch} does not split into micro-batches of "
                             f"{batch_size} on {world_size} ranks; world sizes that work: "
                             f"{', '.join(map(str, world_sizes(self.global_batch, batch_size)))}")
        self.accum = self.global_batch // (batch_size * world_size)
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.cdf = None if weights_cdf is None else np.asarray(weights_cdf, dtype=np.float64)
        self.length = int(samples_per_epoch) if samples_per_epoch else n
        self.global_steps_per_epoch = self.length // self.global_batch
        self.steps_per_epoch = self.global_steps_per_epoch * self.accum
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"an epoch of {self.length} samples gives fewer than one batch: a global batch of {self.global_batch} "
                f"({world_size} rank(s) x micro-batch {batch_size} x {self.accum}); lower batch_size or raise "
                "samples_per_epoch"
            )
        self._perm: dict[int, FeistelPermutation] = {}
        self._blocks: dict[tuple, np.ndarray] = {}

    @property
    def resample(self) -> bool:
        return self.cdf is not None

    def _block(self, epoch: int, block: int, stream: int, width: int) -> np.ndarray:
        key = (epoch, block, stream)
        arr = self._blocks.get(key)
        if arr is None:
            if len(self._blocks) > 16:
                self._blocks.clear()
            rng = np.random.default_rng([self.seed, epoch, block, stream])
            arr = rng.random((BLOCK, width))
            self._blocks[key] = arr
        return arr

    def uniforms(self, epoch: int, positions: np.ndarray, stream: int, width: int) -> np.ndarray:
        out = np.empty((len(positions), width))
        blocks = positions // BLOCK
        for b in np.unique(blocks):
            sel = blocks == b
            out[sel] = self._block(epoch, int(b), stream, width)[positions[sel] % BLOCK]
        return out

    def ids_at(self, epoch: int, positions: np.ndarray) -> np.ndarray:
        if self.cdf is not None:
            u = self.uniforms(epoch, positions, 0, 1)[:, 0] * self.cdf[-1]
            return np.minimum(np.searchsorted(self.cdf, u, side="right"), self.n - 1).astype(np.int64)
        perm = self._perm.get(epoch)
        if perm is None:
            self._perm = {epoch: FeistelPermutation(self.n, key=[self.seed, epoch, 2])}
            perm = self._perm[epoch]
        return perm(positions % self.n)

    def positions(self, step: int, micro: int) -> tuple[int, np.ndarray]:
        """(epoch, positions) of micro-batch `micro` of optimizer step `step` (any rank's)."""
        epoch, k = divmod(step, self.global_steps_per_epoch)
        start = k * self.global_batch + micro * self.batch_size
        return epoch, np.arange(start, start + self.batch_size, dtype=np.int64)

    def batch(self, global_step: int) -> BatchPlan:
        """This rank's micro-batch number `global_step` (A of them per optimizer step)."""
        step, i = divmod(global_step, self.accum)
        epoch, positions = self.positions(step, self.rank * self.accum + i)
        return BatchPlan(self.ids_at(epoch, positions), positions, epoch, global_step % self.steps_per_epoch)


def world_sizes(global_batch: int, micro_batch: int, limit: int = 4096) -> list[int]:
    """The world sizes W at which a global batch splits into micro-batches: B % (m * W) == 0."""
    if micro_batch < 1 or global_batch % micro_batch:
        return []
    return [w for w in range(1, min(limit, global_batch // micro_batch) + 1) if global_batch % (micro_batch * w) == 0]


class EvalSequence:
    """One in-order pass over this rank's contiguous slice of the dataset, repeated."""

    def __init__(self, n: int, batch_size: int, rank: int, world_size: int):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.lo = rank * n // world_size
        self.hi = (rank + 1) * n // world_size
        self.batch_size = batch_size
        self.steps_per_epoch = max(1, -(-(self.hi - self.lo) // batch_size))
        if self.hi <= self.lo:
            raise ValueError(f"rank {rank} of {world_size} gets no sample of a {n}-sample dataset")

    def batch(self, global_step: int) -> BatchPlan:
        epoch, step = divmod(global_step, self.steps_per_epoch)
        start = self.lo + step * self.batch_size
        ids = np.arange(start, min(start + self.batch_size, self.hi), dtype=np.int64)
        return BatchPlan(ids, ids.copy(), epoch, step)


def random_resized_crop(h: np.ndarray, w: np.ndarray, u: np.ndarray,
                        scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> np.ndarray:
    """Crop windows [B, 4] as (left, top, width, height), int32, from image sizes and
    uniforms u [B, 40] (10 attempts x (area, log ratio, top, left))."""
    h = h.astype(np.float64)[:, None]
    w = w.astype(np.float64)[:, None]
    area = h * w
    target = area * (scale[0] + (scale[1] - scale[0]) * u[:, 0:40:4])
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[:, 1:40:4]
    ar = np.exp(log_r)
    cw = np.round(np.sqrt(target * ar))
    ch = np.round(np.sqrt(target / ar))
    ok = (cw > 0) & (ch > 0) & (cw <= w) & (ch <= h)
    first = np.argmax(ok, axis=1)
    rows = np.arange(len(first))
    any_ok = ok[rows, first]
    cw, ch = cw[rows, first], ch[rows, first]
    top = np.floor(u[rows, 4 * first + 2] * (h[:, 0] - ch + 1))
    left = np.floor(u[rows, 4 * first + 3] * (w[:, 0] - cw + 1))
    # Fallback: the whole image, cut to the nearest allowed aspect ratio, centred.
    in_ratio = w[:, 0] / h[:, 0]
    fw = np.where(in_ratio < ratio[0], w[:, 0], np.where(in_ratio > ratio[1], np.round(h[:, 0] * ratio[1]), w[:, 0]))
    fh = np.where(in_ratio < ratio[0], np.round(w[:, 0] / ratio[0]), h[:, 0])
    ftop = np.floor((h[:, 0] - fh) / 2)
    fleft = np.floor((w[:, 0] - fw) / 2)
    out = np.stack([
        np.where(any_ok, left, fleft), np.where(any_ok, top, ftop),
        np.where(any_ok, cw, fw), np.where(any_ok, ch, fh),
    ], axis=1)
    return out.astype(np.int32)


def center_crop(h: np.ndarray, w: np.ndarray, crop_fraction: float) -> np.ndarray:
    """The square window a torchvision Resize(S / crop_fraction) + CenterCrop(S) keeps,
    in source pixels: side round(crop_fraction * min(h, w)), centred. [B, 4] as
    (left, top, width, height), int32."""
    side = np.maximum(1, np.round(np.minimum(h, w) * crop_fraction)).astype(np.int64)
    top = np.round((h - side) / 2.0).astype(np.int64)
    left = np.round((w - side) / 2.0).astype(np.int64)
    return np.stack([left, top, side, side], axis=1).astype(np.int32)
