"""The DALI backend: decode + crop (ROI decode), resize, flip, normalise.

    external_source (host: encoded bytes, crop window, flip, targets, ids;
                     engine.data.sources.host_batch)
      -> decoders.image_slice(device="mixed" on a GPU, "cpu" without one)
      -> resize(size x size, linear, antialiased)
      -> crop_mirror_normalize(mirror=flip, ImageNet mean/std, fp16 or fp32, HWC)
      -> images [B, S, S, 3] and targets on the GPU (or the CPU)

One code path for both devices: `device_id=None` with CPU operators on a machine
without a GPU, `device="mixed"` decode (nvJPEG, the hardware JPEG decoder taking
`hw_decoder_load` of the work) on a GPU. DALI has no bfloat16: a bf16 request is
produced as fp16 by DALI and cast on the device by torch.

Why external_source instead of readers.webdataset: the reader cannot draw a
weighted sample (resampling), shuffles only within a buffer, and its position
is restored through DALI's checkpoints only. Feeding the bytes from the index
(memory-mapped shards) gives weighted draws, a global shuffle, and a state of
two integers; the shards stay readable by readers.webdataset (their .idx files
are DALI's own format; a test reads them that way).
"""

from __future__ import annotations

import os
from typing import Callable, Iterator, Optional

import numpy as np
import torch

from engine.data.sources import HostBatch


class _Feed:
    """The callback DALI polls (in the thread calling run()), once per batch, ahead of
    use. It holds no reference to the backend: a pipeline is then freed as soon as
    its loader is (no reference cycle left for a garbage collector to finalise,
    possibly in a forked child where DALI's threads do not exist and the
    destructor would wait for them forever)."""

    def __init__(self, make_host: Callable[[int], HostBatch], start: int):
        self.make_host = make_host
        self.start = start

    def __call__(self, info):
        hb = self.make_host(self.start + int(info.iteration))
        anchors = np.ascontiguousarray(hb.boxes[:, :2])
        shapes = np.ascontiguousarray(hb.boxes[:, 2:])
        return hb.data, anchors, shapes, hb.flips, hb.targets, hb.ids


class DaliBackend:
    name = "dali"

    def __init__(self, make_host: Callable[[int], HostBatch], batch_size: int, size: int,
                 device: torch.device, dtype: torch.dtype, mean, std, num_threads: Optional[int] = None,
                 hw_decoder_load: float = 0.65, prefetch: int = 2, jpeg_fancy_upsampling: bool = False,
                 target_dtype=np.int32):
        import nvidia.dali  # noqa: F401  (fails here, clearly, when DALI is missing)

        self.make_host = make_host
        self.batch_size = batch_size
        self.size = size
        self.device = device
        self.dtype = dtype
        self.mean = [255.0 * m for m in mean]
        self.std = [255.0 * s for s in std]
        self.num_threads = num_threads or max(1, min(8, os.cpu_count() or 1))
        self.hw_decoder_load = hw_decoder_load
        self.prefetch = prefetch
        self.fancy = jpeg_fancy_upsampling
        self.target_dtype = np.dtype(target_dtype)
        self._pipe = None
        self._next = 0  # global step of the next batch it will return

    def make_pipeline(self, mixed: bool, device_id: Optional[int], start: int = 0):
        """The (unbuilt) pipeline. mixed=True with device_id=None still defines the GPU
        graph, which serialize() checks on a machine without a GPU (a CPU test does)."""
        import nvidia.dali.fn as fn
        import nvidia.dali.types as types
        from nvidia.dali import pipeline_def

        out_type = types.FLOAT if self.dtype == torch.float32 else types.FLOAT16
        target_type = types.INT32 if self.target_dtype == np.int32 else types.INT64
        decoder_args = {"device": "mixed", "hw_decoder_load": self.hw_decoder_load,
                        "jpeg_fancy_upsampling": self.fancy} if mixed else {"device": "cpu"}
        feed = _Feed(self.make_host, start)
        size, mean, std = self.size, self.mean, self.std

        @pipeline_def(batch_size=self.batch_size, num_threads=self.num_threads, device_id=device_id,
                      prefetch_queue_depth=self.prefetch, seed=1)
        def pipe():
            jpegs, anchors, shapes, flips, targets, ids = fn.external_source(
                source=feed, num_outputs=6, batch=True, batch_info=True,
                dtype=[types.UINT8, types.INT32, types.INT32, types.INT32, target_type, types.INT64],
            )
            images = fn.decoders.image_slice(jpegs, anchors, shapes, axis_names="WH", output_type=types.RGB,
                                             **decoder_args)
            images = fn.resize(images, size=[size, size], interp_type=types.INTERP_LINEAR, antialias=True)
            images = fn.crop_mirror_normalize(images, mirror=flips, mean=mean, std=std,
                                              dtype=out_type, output_layout="HWC")
            if mixed:
                targets = targets.gpu()
            return images, targets, ids

        return pipe()

    def _build(self, start: int) -> None:
        self.close()
        mixed = self.device.type == "cuda"
        device_id = None
        if mixed:
            device_id = self.device.index if self.device.index is not None else torch.cuda.current_device()
        self._next = start
        self._pipe = self.make_pipeline(mixed, device_id, start)
        self._pipe.build()

    def iterate(self, start: int, stop: int) -> Iterator[dict]:
        from nvidia.dali.plugin.pytorch.torch_utils import to_torch_tensor

        if self._pipe is None or self._next != start:
            self._build(start)
        for _ in range(start, stop):
            images, targets, ids = self._pipe.run()
            self._next += 1
            images = to_torch_tensor(images.as_tensor(), copy=True)
            if self.dtype not in (torch.float32, torch.float16):
                images = images.to(self.dtype)
            yield {
                "images": images,
                "targets": to_torch_tensor(targets.as_tensor(), copy=True),
                "ids": to_torch_tensor(ids.as_tensor(), copy=True),
            }

    def close(self) -> None:
        if self._pipe is not None:
            del self._pipe
            self._pipe = None
