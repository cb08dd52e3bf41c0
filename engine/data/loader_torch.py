"""The pure-PyTorch backend, for environments without DALI: the same host-side
batches (engine.data.sources.host_batch), decoded by torchvision (libjpeg-turbo
on the CPU) in DataLoader worker processes, cropped, resized (bilinear,
antialiased), flipped; normalised and cast on the target device.

Worker processes fork from the caller (DataLoader's default on Linux); each
decodes whole batches, so a batch is one inter-process message.
"""

from __future__ import annotations

import gc
from typing import Callable, Iterator, Optional

import numpy as np
import torch

from engine.data.sources import HostBatch


def decode_crop_resize(data: np.ndarray, box, size: int, flip: bool) -> torch.Tensor:
    """uint8 [3, size, size] from an encoded image: decode (EXIF orientation applied),
    crop box = (left, top, width, height), resize, optional horizontal flip."""
    from torchvision.io import ImageReadMode, decode_image
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    from engine.data.jpeg import _pil_decode

    raw = torch.from_numpy(np.array(data, dtype=np.uint8, copy=True))
    try:
        image = decode_image(raw, mode=ImageReadMode.RGB, apply_exif_orientation=True)
    except RuntimeError:
        image = _pil_decode(bytes(data))
        if image is None:
            raise
    left, top, w, h = (int(v) for v in box)
    image = image[:, top : top + h, left : left + w]
    image = F.resize(image, [size, size], interpolation=InterpolationMode.BILINEAR, antialias=True)
    if flip:
        image = image.flip(-1)
    return image


class _Batches(torch.utils.data.Dataset):
    """Map-style: item g is the whole batch of global step g, as uint8 NHWC."""

    def __init__(self, make_host: Callable[[int], HostBatch], size: int):
        self.make_host = make_host
        self.size = size

    def __len__(self) -> int:  # unused: the sampler decides what is read
        return 2**62

    def __getitem__(self, g: int) -> dict:
        hb = self.make_host(int(g))
        images = torch.empty((len(hb.ids), self.size, self.size, 3), dtype=torch.uint8)
        for i, data in enumerate(hb.data):
            images[i] = decode_crop_resize(data, hb.boxes[i], self.size, bool(hb.flips[i])).permute(1, 2, 0)
        return {"images": images, "targets": torch.from_numpy(hb.targets), "ids": torch.from_numpy(hb.ids)}


class _Range(torch.utils.data.Sampler):
    def __init__(self):
        self.start = self.stop = 0

    def __iter__(self):
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return self.stop - self.start


class TorchBackend:
    name = "torch"

    def __init__(self, make_host: Callable[[int], HostBatch], batch_size: int, size: int,
                 device: torch.device, dtype: torch.dtype, mean, std, num_workers: Optional[int] = None,
                 prefetch: int = 2):
        import os

        self.device = device
        self.dtype = dtype
        self.size = size
        self.num_workers = (os.cpu_count() or 1) if num_workers is None else num_workers
        self._mean = torch.tensor([255.0 * m for m in mean], dtype=torch.float32, device=device)
        self._std = torch.tensor([255.0 * s for s in std], dtype=torch.float32, device=device)
        self._sampler = _Range()
        self._forked = False
        kwargs = {}
        if self.num_workers > 0:
            kwargs = {"prefetch_factor": prefetch, "persistent_workers": True}
        self._loader = torch.utils.data.DataLoader(
            _Batches(make_host, size), batch_size=None, sampler=self._sampler, num_workers=self.num_workers,
            pin_memory=device.type == "cuda", **kwargs,
        )

    def iterate(self, start: int, stop: int) -> Iterator[dict]:
        self._sampler.start, self._sampler.stop = start, stop
        if self.num_workers > 0 and not self._forked:
            # Workers fork now. Garbage the parent still holds (a DALI pipeline, say) must
            # be collected here: finalised in a child, where DALI's threads do not exist,
            # its destructor waits for them forever. Frozen objects are never collected by
            # the children's garbage collector.
            gc.collect()
            gc.freeze()
            try:
                batches = iter(self._loader)
            finally:
                gc.unfreeze()
            self._forked = True
        else:
            batches = iter(self._loader)
        if self.device.type == "cuda":
            yield from self._overlapped(batches)
        else:
            yield from map(self._prepare, batches)

    def _prepare(self, b: dict) -> dict:
        images = b["images"].to(self.device, non_blocking=True).float()
        images = ((images - self._mean) / self._std).to(self.dtype)
        return {"images": images, "targets": b["targets"].to(self.device, non_blocking=True), "ids": b["ids"]}

    def _overlapped(self, batches: Iterator[dict]) -> Iterator[dict]:
        """Batch N+1's copy from pinned memory and its normalisation run on a side stream,
        queued before batch N is handed out, so they overlap the caller's step on batch N
        instead of queueing behind it on the compute stream."""
        side = torch.cuda.Stream(self.device)
        pending = None
        for b in batches:
            with torch.cuda.stream(side):
                staged = self._prepare(b)
                ready = torch.cuda.Event()
                ready.record(side)
            if pending is not None:
                yield self._hand_over(*pending)
            pending = (staged, ready)
        if pending is not None:
            yield self._hand_over(*pending)

    def _hand_over(self, batch: dict, ready) -> dict:
        compute = torch.cuda.current_stream(self.device)
        compute.wait_event(ready)
        for t in (batch["images"], batch["targets"]):
            # Made on the side stream, used on the compute stream: the allocator must not reuse
            # their memory until the compute stream is done with them.
            t.record_stream(compute)
        return batch

    def close(self) -> None:
        self._loader = None
