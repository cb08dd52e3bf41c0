"""Pipeline-only loader throughput (no model): images per second out of each
backend from a built dataset, every peer measured in the same run.

- dali:  the training pipeline (engine.data.pipeline_dali); mixed decode on a GPU
- torch: the PyTorch loader (DataLoader workers, torchvision decode)
- torch_1core: the PyTorch loader in the calling process, one thread: the cost
  of decode + crop + resize + normalise per image per core
- torchvision_gpu_decode: torchvision.io.decode_jpeg(device="cuda") on batches of
  the same JPEGs, decode only (GPU machines only)
"""

from __future__ import annotations

import os
import time
from typing import Optional

import numpy as np
import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _forever(loader):
    while True:  # epochs back to back, as training reads them
        yield from loader


def _time_loader(loader, batches: int, warmup: int, device: torch.device) -> dict:
    it = _forever(loader)
    n_img = 0
    for _ in range(warmup):
        next(it)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(batches):
        b = next(it)
        n_img += b["images"].shape[0]
    _sync(device)
    dt = time.perf_counter() - t0
    return {"images": n_img, "seconds": round(dt, 4), "img_per_s": round(n_img / dt, 1)}


def _gpu_decode(dataset_dir: str, batch_size: int, batches: int, device: torch.device) -> dict:
    from torchvision.io import ImageReadMode, decode_jpeg

    from engine.data.dataset import HashtagDataset

    ds = HashtagDataset(dataset_dir)
    ids = np.arange(batch_size * (batches + 2)) % ds.num_samples
    data = [torch.frombuffer(bytearray(ds.read(i)), dtype=torch.uint8) for i in ids]
    groups = [data[k * batch_size : (k + 1) * batch_size] for k in range(batches + 2)]
    for g in groups[:2]:
        decode_jpeg(g, mode=ImageReadMode.RGB, device=device)
    _sync(device)
    t0 = time.perf_counter()
    for g in groups[2:]:
        decode_jpeg(g, mode=ImageReadMode.RGB, device=device)
    _sync(device)
    dt = time.perf_counter() - t0
    n = batch_size * batches
    return {"images": n, "seconds": round(dt, 4), "img_per_s": round(n / dt, 1), "note": "decode only"}


def measure_loaders(dataset_dir: str, backends: str = "all", device: Optional[str] = None, batch_size: int = 64,
                    size: int = 224, batches: int = 20, warmup: int = 2, threads: Optional[int] = None,
                    resample: bool = True, hw_decoder_load: float = 0.65) -> dict:
    from engine.data.jpeg import dali_available
    from engine.data.loaders import _device, make_train_loader

    dev = _device(device)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = threads or cores
    every = ("dali", "torch", "torch_1core", "torchvision_gpu_decode")
    wanted = every if backends == "all" else tuple(backends.split(","))
    out: dict = {"dataset": os.path.abspath(dataset_dir), "device": str(dev), "batch_size": batch_size, "size": size,
                 "batches": batches, "resample": resample, "cpu_cores": cores, "threads": threads, "results": {}}
    if dev.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(dev)
    common = dict(batch_size=batch_size, device=dev, size=size, resample=resample, seed=0)
    for name in wanted:
        try:
            if name == "dali":
                why = dali_available()
                if why:
                    out["results"][name] = {"skipped": why}
                    continue
                loader = make_train_loader(dataset_dir, backend="dali", num_threads=threads,
                                           hw_decoder_load=hw_decoder_load, **common)
                r = _time_loader(loader, batches, warmup, dev)
                r.update(threads=threads, decoder="mixed" if dev.type == "cuda" else "cpu",
                         hw_decoder_load=hw_decoder_load if dev.type == "cuda" else None)
            elif name == "torch":
                loader = make_train_loader(dataset_dir, backend="torch", num_workers=threads, **common)
                r = _time_loader(loader, batches, warmup, dev)
                r.update(workers=threads)
            elif name == "torch_1core":
                prev = torch.get_num_threads()
                torch.set_num_threads(1)
                try:
                    loader = make_train_loader(dataset_dir, backend="torch", num_workers=0, **common)
                    r = _time_loader(loader, max(2, batches // 4), 1, dev)
                finally:
                    torch.set_num_threads(prev)
                r.update(workers=0, ms_per_image_per_core=round(1000.0 / r["img_per_s"], 3))
            elif name == "torchvision_gpu_decode":
                if dev.type != "cuda":
                    out["results"][name] = {"skipped": "needs a CUDA device"}
                    continue
                r = _gpu_decode(dataset_dir, batch_size, batches, dev)
            else:
                raise ValueError(f"unknown backend {name!r}")
            if dev.type == "cpu" and name in ("dali", "torch"):
                r["img_per_s_per_core"] = round(r["img_per_s"] / min(threads, cores), 1)
            out["results"][name] = r
        except Exception as e:  # one failing peer must not lose the others' numbers
            out["results"][name] = {"error": f"{type(e).__name__}: {e}"}
    return out
