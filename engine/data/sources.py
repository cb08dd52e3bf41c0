"""Where a loader's samples come from, and the host-side part of every batch that
both backends share: which samples, their encoded bytes, crop windows, flips and
targets (see engine.data.sampling for the order and the randomness)."""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np

from engine.data import jpeg as jpeg_mod
from engine.data.dataset import HashtagDataset
from engine.data.sampling import EvalSequence, TrainSequence, center_crop, random_resized_crop

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class ShardSource:
    """A built hashtag dataset; targets are int32 [B, K] hashtag ids padded with -1."""

    target_name = "tags"

    def __init__(self, root: str, max_tags: Optional[int] = None):
        self.dataset = HashtagDataset(root)
        self.n = self.dataset.num_samples
        self.max_tags = self.dataset.max_tags if max_tags is None else int(max_tags)
        if self.max_tags < 1:
            raise ValueError(f"max_tags must be at least 1, got {max_tags}")

    def read(self, ids: np.ndarray) -> list[np.ndarray]:
        return self.dataset.read_many(ids)

    def hw(self, ids: np.ndarray, data: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        return self.dataset.hw(ids)

    def targets(self, ids: np.ndarray) -> np.ndarray:
        return self.dataset.padded_tags(ids, self.max_tags)

    def weights_cdf(self) -> np.ndarray:
        return np.asarray(self.dataset.weight_cdf)


def image_hw(data: bytes) -> tuple[int, int]:
    """(height, width) of an encoded image after EXIF orientation, from its header."""
    if jpeg_mod.is_jpeg(data):
        return jpeg_mod.parse_jpeg_header(data).oriented_hw
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        w, h = im.size
        orientation = im.getexif().get(0x0112, 1)
    return (w, h) if orientation in (5, 6, 7, 8) else (h, w)


class FolderSource:
    """An ImageFolder-style labelled set: root/<class>/<image>; classes sorted by
    name (label = index), files sorted, as torchvision.datasets.ImageFolder does.
    Files are not validated: a corrupt file aborts a DALI pipeline (run the
    builder's checks, or `validate=True`, on sets you do not trust)."""

    target_name = "labels"

    def __init__(self, root: str, validate: bool = False):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"image folder {root!r} does not exist or is not a directory")
        self.root = root
        self.classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
        if not self.classes:
            raise ValueError(f"image folder {root!r} has no class subdirectories")
        self.files: list[str] = []
        labels = []
        for c, name in enumerate(self.classes):
            for dirpath, dirnames, filenames in os.walk(os.path.join(root, name)):
                dirnames.sort()
                for f in sorted(filenames):
                    if f.lower().endswith(IMG_EXTENSIONS):
                        self.files.append(os.path.join(dirpath, f))
                        labels.append(c)
        if not self.files:
            raise ValueError(f"image folder {root!r} has no image files ({', '.join(IMG_EXTENSIONS)})")
        self.labels = np.asarray(labels, dtype=np.int64)
        self.n = len(self.files)
        if validate:
            limits = jpeg_mod.Limits(min_side=1, reencode_progressive=False)
            bad = []
            for path in self.files:
                with open(path, "rb") as f:
                    checked = jpeg_mod.check_image(f.read(), limits)
                if checked.action == "skipped":
                    bad.append(f"{path} ({checked.reason})")
            if bad:
                raise ValueError(f"image folder {root!r}: {len(bad)} file(s) fail validation: " + "; ".join(bad[:10]))

    def read(self, ids: np.ndarray) -> list[np.ndarray]:
        out = []
        for i in ids:
            with open(self.files[int(i)], "rb") as f:
                out.append(np.frombuffer(f.read(), dtype=np.uint8))
        return out

    def hw(self, ids: np.ndarray, data: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        hw = []
        for i, d in zip(ids, data):
            try:
                hw.append(image_hw(d.tobytes()))
            except Exception as e:
                raise ValueError(f"{self.files[int(i)]}: cannot read the image header ({e})") from None
        arr = np.asarray(hw, dtype=np.int64).reshape(-1, 2)
        return arr[:, 0], arr[:, 1]

    def targets(self, ids: np.ndarray) -> np.ndarray:
        return self.labels[np.asarray(ids)]


Source = Union[ShardSource, FolderSource]


@dataclass
class Augment:
    train: bool
    size: int = 224
    scale: tuple = (0.08, 1.0)
    ratio: tuple = (3 / 4, 4 / 3)
    crop_fraction: float = 0.875  # evaluation: centre crop of this fraction of the shorter side
    flip: bool = True


@dataclass
class HostBatch:
    data: list  # encoded images, uint8 numpy arrays
    boxes: np.ndarray  # int32 [B, 4]: left, top, width, height (source pixels)
    flips: np.ndarray  # int32 [B]
    targets: np.ndarray  # int32 [B, K] tags or int64 [B] labels
    ids: np.ndarray  # int64 [B]


def host_batch(source: Source, seq: Union[TrainSequence, EvalSequence], aug: Augment, global_step: int) -> HostBatch:
    plan = seq.batch(global_step)
    data = source.read(plan.ids)
    h, w = source.hw(plan.ids, data)
    if aug.train:
        u = seq.uniforms(plan.epoch, plan.positions, 1, 41)
        boxes = random_resized_crop(h, w, u[:, :40], aug.scale, aug.ratio)
        flips = (u[:, 40] < 0.5).astype(np.int32) if aug.flip else np.zeros(len(plan.ids), np.int32)
    else:
        boxes = center_crop(h, w, aug.crop_fraction)
        flips = np.zeros(len(plan.ids), np.int32)
    return HostBatch(data, boxes, flips, source.targets(plan.ids), plan.ids)
