"""Training and evaluation loaders: the batch contract, backend choice, state.

Batch contract (both backends, every loader):

    {"images": [B, S, S, 3] tensor on `device`, NHWC, normalised with the ImageNet
               mean/std, of `dtype` (default bf16 on a GPU, fp32 on the CPU);
               with layout="NCHW" the same memory viewed as [B, 3, S, S]
               (channels_last), which is what a channels_last model takes,
     "tags":   int32 [B, K] hashtag ids padded with -1, on `device`   (hashtag sets)
     "labels": int64 [B] class indices, on `device`                   (ImageFolder sets)
     "ids":    int64 [B] sample ids (index in the dataset), on the CPU}

A loader iterates one epoch per `for batch in loader` (len(loader) batches),
then the next epoch on the next `for`. `state_dict()` after any batch and
`load_state_dict()` on a fresh loader (either backend) give exactly the batches
that would have followed. A training loader's position is the optimizer step
(global_batch / (batch_size * world_size) of its batches make one), so a state
saved at a step boundary loads into a loader of any world size with the same
global batch and micro-batch. See engine.data.sampling for the order and randomness.
"""

from __future__ import annotations

import sys
from typing import Iterator, Optional, Union

import numpy as np
import torch

from engine.data.sampling import EvalSequence, TrainSequence
from engine.data.sources import IMAGENET_MEAN, IMAGENET_STD, Augment, FolderSource, ShardSource, host_batch

STATE_VERSION = 2  # 1: a per-rank position in a world-size-dependent order
_warned_fallback = False


def _device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    d = torch.device(device)
    if d.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r}: expected 'cpu' or 'cuda[:N]'")
    if d.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} asked for, but torch sees no CUDA device")
    return d


def resolve_backend(backend: str) -> str:
    """'dali' or 'torch'. 'auto' takes DALI when it imports, else the PyTorch loader
    (saying so once on stderr)."""
    global _warned_fallback
    if backend not in ("auto", "dali", "torch"):
        raise ValueError(f"backend {backend!r}: expected 'auto', 'dali' or 'torch'")
    if backend != "auto":
        if backend == "dali":
            from engine.data.jpeg import dali_available

            why = dali_available()
            if why:
                raise RuntimeError(f"backend='dali' asked for, but {why}; pip install nvidia-dali-cuda130")
        return backend
    from engine.data.jpeg import dali_available

    why = dali_available()
    if why is None:
        return "dali"
    if not _warned_fallback:
        print(f"engine.data: {why}; using the PyTorch loader (torchvision decode on the CPU)", file=sys.stderr)
        _warned_fallback = True
    return "torch"


class Loader:
    """Iterable of batch dicts (module docstring) with an exact, resumable position."""

    def __init__(self, source, seq, aug: Augment, *, batch_size: int, device, dtype, backend: str,
                 layout: str, kind: str, options: dict, num_threads=None, num_workers=None,
                 hw_decoder_load: float = 0.65, prefetch: int = 2, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                 jpeg_fancy_upsampling: bool = False):
        if layout not in ("NHWC", "NCHW"):
            raise ValueError(f"layout {layout!r}: expected 'NHWC' or 'NCHW' (a channels_last view)")
        self.source, self.seq, self.aug = source, seq, aug
        self.batch_size = batch_size
        self.device = _device(device)
        self.dtype = dtype if dtype is not None else (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        if self.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"dtype {dtype}: expected torch.float32, float16 or bfloat16")
        self.layout = layout
        self.kind = kind
        self.options = options  # what must match on load_state_dict
        self.backend_name = resolve_backend(backend)
        self._global = 0  # batches handed out since epoch 0, step 0
        make_host = _HostFn(source, seq, aug)
        if self.backend_name == "dali":
            from engine.data.pipeline_dali import DaliBackend

            target_dtype = np.int32 if source.target_name == "tags" else np.int64
            self._impl = DaliBackend(make_host, batch_size, aug.size, self.device, self.dtype, mean, std,
                                     num_threads=num_threads, hw_decoder_load=hw_decoder_load, prefetch=prefetch,
                                     jpeg_fancy_upsampling=jpeg_fancy_upsampling, target_dtype=target_dtype)
        else:
            from engine.data.loader_torch import TorchBackend

            self._impl = TorchBackend(make_host, batch_size, aug.size, self.device, self.dtype, mean, std,
                                      num_workers=num_workers, prefetch=prefetch)

    # ---- position
    @property
    def steps_per_epoch(self) -> int:
        return self.seq.steps_per_epoch

    def __len__(self) -> int:
        return self.seq.steps_per_epoch

    @property
    def epoch(self) -> int:
        return self._global // self.seq.steps_per_epoch

    @property
    def step(self) -> int:
        return self._global % self.seq.steps_per_epoch

    def set_epoch(self, epoch: int) -> None:
        """Jump to the start of `epoch`."""
        self._global = int(epoch) * self.seq.steps_per_epoch

    def state_dict(self) -> dict:
        if self.kind != "train":
            return {"version": STATE_VERSION, "kind": self.kind, "epoch": self.epoch, "step": self.step,
                    **self.options}
        step, micro = divmod(self._global, self.seq.accum)
        # epoch and step (this rank's batches into the epoch) say where it is; global_step and micro
        # restore it, at any world size.
        return {"version": STATE_VERSION, "kind": self.kind, "epoch": self.epoch, "step": self.step,
                "global_step": step, "micro": micro, "accumulation": self.seq.accum, **self.options}

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") == 1 and state.get("kind") == "train":
            raise ValueError("loader state v1: written by an engine whose sample order depended on the world size; "
                             "it cannot continue the same order here (start a new run from the weights with "
                             "model.init, or resume with the engine version that wrote it)")
        if state.get("version") != STATE_VERSION or state.get("kind") != self.kind:
            raise ValueError(f"loader state of kind {state.get('kind')!r} v{state.get('version')} "
                             f"cannot restore a {self.kind!r} loader v{STATE_VERSION}")
        diff = {k: (state.get(k), v) for k, v in self.options.items() if state.get(k) != v}
        if diff:
            raise ValueError("loader state does not match this loader (saved, here): "
                             + ", ".join(f"{k}={a!r} vs {b!r}" for k, (a, b) in diff.items()))
        if self.kind != "train":
            self._global = int(state["epoch"]) * self.seq.steps_per_epoch + int(state["step"])
            return
        if state["micro"] and state["accumulation"] != self.seq.accum:
            raise ValueError(f"loader state: saved {state['micro']} micro-batches into a step, at another world "
                             "size; only a state saved at a step boundary moves to another world size")
        self.set_step(int(state["global_step"]), int(state["micro"]))

    def set_step(self, step: int, micro: int = 0) -> None:
        """Position at optimizer step `step` (plus `micro` of this rank's micro-batches)."""
        self._global = step * self.seq.accum + micro

    # ---- iteration
    def __iter__(self) -> Iterator[dict]:
        start = self._global
        stop = (self.epoch + 1) * self.seq.steps_per_epoch
        target_name = self.source.target_name
        for g, b in zip(range(start, stop), self._impl.iterate(start, stop)):
            self._global = g + 1
            images = b["images"]
            if self.layout == "NCHW":
                images = images.permute(0, 3, 1, 2)
            yield {"images": images, target_name: b["targets"], "ids": b["ids"]}

    def close(self) -> None:
        self._impl.close()

    def __repr__(self) -> str:
        return (f"Loader({self.kind}, backend={self.backend_name}, device={self.device}, dtype={self.dtype}, "
                f"batch_size={self.batch_size}, steps_per_epoch={len(self)}, epoch={self.epoch}, step={self.step})")


class _HostFn:
    """Picklable global-step -> HostBatch (DataLoader workers receive it)."""

    def __init__(self, source, seq, aug):
        self.source, self.seq, self.aug = source, seq, aug

    def __call__(self, g: int):
        return host_batch(self.source, self.seq, self.aug, g)


def make_train_loader(
    dataset_dir: str,
    batch_size: int,
    *,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    device: Union[str, torch.device, None] = None,
    dtype: Optional[torch.dtype] = None,
    size: int = 224,
    resample: bool = True,
    samples_per_epoch: Optional[int] = None,
    global_batch: Optional[int] = None,
    backend: str = "auto",
    layout: str = "NHWC",
    scale: tuple = (0.08, 1.0),
    ratio: tuple = (3 / 4, 4 / 3),
    flip: bool = True,
    max_tags: Optional[int] = None,
    num_threads: Optional[int] = None,
    num_workers: Optional[int] = None,
    hw_decoder_load: float = 0.65,
    prefetch: int = 2,
) -> Loader:
    """Training batches from a built dataset: random-resized crop + flip, this
    rank's share of a seeded epoch; resample=True draws it from the inverse-sqrt
    hashtag-frequency weights, resample=False is a shuffled pass.

    batch_size is the micro-batch of one call; global_batch (default batch_size *
    world_size) the optimizer step's batch, which this rank's global_batch /
    (batch_size * world_size) consecutive batches are its share of (engine.data.sampling).

    backend: "dali" (GPU decode on a GPU device, CPU operators otherwise), "torch"
    (DataLoader workers, torchvision decode) or "auto" (DALI when installed).
    num_threads: DALI's CPU threads; num_workers: the PyTorch loader's processes
    (default: one per core). hw_decoder_load: share of JPEGs for the hardware
    decoder (DALI on a GPU)."""
    source = ShardSource(dataset_dir, max_tags=max_tags)
    seq = TrainSequence(source.n, batch_size, rank, world_size, seed,
                        weights_cdf=source.weights_cdf() if resample else None,
                        samples_per_epoch=samples_per_epoch, global_batch=global_batch)
    aug = Augment(train=True, size=size, scale=tuple(scale), ratio=tuple(ratio), flip=flip)
    # What fixes the sample order and the crops; the rank and world size do not.
    options = {"seed": seed, "batch_size": batch_size, "global_batch": seq.global_batch, "num_samples": source.n,
               "resample": resample, "samples_per_epoch": seq.length, "size": size, "scale": list(scale),
               "ratio": list(ratio), "flip": flip, "dataset": source.dataset.meta.get("plan")}
    return Loader(source, seq, aug, batch_size=batch_size, device=device, dtype=dtype, backend=backend,
                  layout=layout, kind="train", options=options, num_threads=num_threads, num_workers=num_workers,
                  hw_decoder_load=hw_decoder_load, prefetch=prefetch)


def make_eval_loader(
    dataset_dir: str,
    batch_size: int,
    *,
    rank: int = 0,
    world_size: int = 1,
    device: Union[str, torch.device, None] = None,
    dtype: Optional[torch.dtype] = None,
    size: int = 224,
    crop_fraction: float = 0.875,
    backend: str = "auto",
    layout: str = "NHWC",
    max_tags: Optional[int] = None,
    num_threads: Optional[int] = None,
    num_workers: Optional[int] = None,
    hw_decoder_load: float = 0.65,
    prefetch: int = 2,
) -> Loader:
    """Evaluation batches from a built dataset: every sample of this rank's
    contiguous slice once, in order (the last batch may be short); centre crop
    of crop_fraction of the shorter side resized to size x size (= Resize(size /
    crop_fraction) + CenterCrop(size), up to rounding)."""
    source = ShardSource(dataset_dir, max_tags=max_tags)
    return _eval_loader(source, batch_size, rank, world_size, device, dtype, size, crop_fraction, backend,
                        layout, num_threads, num_workers, hw_decoder_load, prefetch,
                        {"dataset": source.dataset.meta.get("plan")})


def _eval_loader(source, batch_size, rank, world_size, device, dtype, size, crop_fraction, backend, layout,
                 num_threads, num_workers, hw_decoder_load, prefetch, extra) -> Loader:
    if not 0 < crop_fraction <= 1:
        raise ValueError(f"crop_fraction must be in (0, 1], got {crop_fraction}")
    seq = EvalSequence(source.n, batch_size, rank, world_size)
    aug = Augment(train=False, size=size, crop_fraction=crop_fraction)
    options = {"rank": rank, "world_size": world_size, "batch_size": batch_size, "num_samples": source.n, **extra}
    return Loader(source, seq, aug, batch_size=batch_size, device=device, dtype=dtype, backend=backend,
                  layout=layout, kind="eval", options=options, num_threads=num_threads, num_workers=num_workers,
                  hw_decoder_load=hw_decoder_load, prefetch=prefetch)


def make_imagefolder_loader(
    root: str,
    batch_size: int,
    *,
    train: bool = False,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    device: Union[str, torch.device, None] = None,
    dtype: Optional[torch.dtype] = None,
    size: int = 224,
    crop_fraction: float = 0.875,
    scale: tuple = (0.08, 1.0),
    ratio: tuple = (3 / 4, 4 / 3),
    backend: str = "auto",
    layout: str = "NHWC",
    validate: bool = False,
    num_threads: Optional[int] = None,
    num_workers: Optional[int] = None,
    hw_decoder_load: float = 0.65,
    prefetch: int = 2,
) -> Loader:
    """A labelled ImageFolder-style set (root/<class>/<image>) for transfer: batches
    carry "labels"; `loader.classes` names them. train=True: shuffled epochs with
    random-resized crop and flip (fine-tuning); train=False: the evaluation
    transform, every image once."""
    source = FolderSource(root, validate=validate)
    if train:
        seq = TrainSequence(source.n, batch_size, rank, world_size, seed)
        aug = Augment(train=True, size=size, scale=tuple(scale), ratio=tuple(ratio))
        options = {"seed": seed, "batch_size": batch_size, "global_batch": seq.global_batch,
                   "num_samples": source.n}
        loader = Loader(source, seq, aug, batch_size=batch_size, device=device, dtype=dtype, backend=backend,
                        layout=layout, kind="train", options=options, num_threads=num_threads,
                        num_workers=num_workers, hw_decoder_load=hw_decoder_load, prefetch=prefetch)
    else:
        loader = _eval_loader(source, batch_size, rank, world_size, device, dtype, size, crop_fraction, backend,
                              layout, num_threads, num_workers, hw_decoder_load, prefetch, {})
    loader.classes = source.classes
    return loader
