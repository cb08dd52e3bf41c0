"""The on-disk format of a built hashtag dataset, and random access to it.

    <root>/dataset.json            format, counts, max tags per image, build seed
    <root>/vocab.json              id -> hashtag, counts (see engine.data.vocab)
    <root>/report.json             what the builder kept, re-encoded, skipped and why
    <root>/rejected.jsonl          one line per image not written as is (all of them)
    <root>/shards/shard-NNNNNN.tar webdataset-style: <key>.jpg, <key>.tags (little-endian int32)
    <root>/shards/shard-NNNNNN.idx DALI webdataset index (v1.2), one line per sample
    <root>/index/*.npy             one row per sample, memory-mapped when read:
        shard (int32), offset (int64, of the JPEG data in the tar), size (int32),
        height, width (int32, of the decoded image, EXIF orientation applied),
        tag_ptr (int64, N+1; the tags of sample i are tags[tag_ptr[i]:tag_ptr[i+1]]),
        tags (int32), weight (float64, resampling weight), weight_cdf (float64),
        sha256 (uint8 [N, 32], of the source file)
    <root>/index/keys.txt          the metadata key (source path) of each sample

The sample with id i has the tar key "%010d" % i; samples are numbered in shard
order, shard s holding ids [s * shard_size, (s + 1) * shard_size).
"""

from __future__ import annotations

import io
import json
import mmap
import os
import tarfile
from collections import OrderedDict
from typing import Optional

import numpy as np

FORMAT = "engine-hashtag-shards/1"
INDEX_ARRAYS = ("shard", "offset", "size", "height", "width", "tag_ptr", "tags", "weight", "weight_cdf", "sha256")


def sample_key(i: int) -> str:
    return "%010d" % i


def shard_name(s: int) -> str:
    return "shard-%06d" % s


class ShardMaps:
    """Read-only memory maps of shard files, least recently used dropped first
    (a dropped map closes once no array still views it). Reading a sample is a
    zero-copy view; the consumer (DALI's external source, a decoder) copies."""

    def __init__(self, limit: int = 1024):
        self.limit = limit
        self._maps: "OrderedDict[str, mmap.mmap]" = OrderedDict()

    def view(self, path: str, size: int, offset: int) -> np.ndarray:
        m = self._maps.get(path)
        if m is None:
            fd = os.open(path, os.O_RDONLY)
            try:
                m = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
            finally:
                os.close(fd)
            self._maps[path] = m
            if len(self._maps) > self.limit:
                self._maps.popitem(last=False)
        else:
            self._maps.move_to_end(path)
        if offset + size > len(m):
            raise OSError(f"{path}: sample at {offset}+{size} lies past the end of the file ({len(m)} bytes)")
        return np.frombuffer(m, dtype=np.uint8, count=size, offset=offset)

    def close(self) -> None:
        self._maps.clear()

    def __getstate__(self):
        return {"limit": self.limit}

    def __setstate__(self, state):
        self.__init__(state["limit"])


class HashtagDataset:
    """Random access to a built dataset: bytes, tags and image sizes by sample id."""

    def __init__(self, root: str):
        self.root = os.path.abspath(root)
        meta_path = os.path.join(self.root, "dataset.json")
        if not os.path.isdir(self.root):
            raise FileNotFoundError(f"dataset directory {root!r} does not exist")
        if not os.path.isfile(meta_path):
            raise FileNotFoundError(
                f"{root!r} is not a built dataset (no dataset.json); build one with `engine data build`"
            )
        with open(meta_path, encoding="utf-8") as f:
            self.meta = json.load(f)
        if self.meta.get("format") != FORMAT:
            raise ValueError(f"{meta_path}: format {self.meta.get('format')!r}, expected {FORMAT!r}")
        with open(os.path.join(self.root, "vocab.json"), encoding="utf-8") as f:
            vocab = json.load(f)
        self.hashtags: list[str] = vocab["hashtags"]
        self.counts = np.asarray(vocab["counts"], dtype=np.int64)
        self.num_samples = int(self.meta["num_samples"])
        self.num_shards = int(self.meta["num_shards"])
        self.max_tags = int(self.meta["max_tags"])
        idx = os.path.join(self.root, "index")
        for name in INDEX_ARRAYS:
            path = os.path.join(idx, name + ".npy")
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{root!r}: index file {path} is missing (an unfinished build?)")
            setattr(self, name, np.load(path, mmap_mode="r"))
        if len(self.offset) != self.num_samples:
            raise ValueError(f"{root!r}: index holds {len(self.offset)} samples, dataset.json says {self.num_samples}")
        self.shard_paths = [os.path.join(self.root, "shards", shard_name(s) + ".tar") for s in range(self.num_shards)]
        self.index_paths = [os.path.join(self.root, "shards", shard_name(s) + ".idx") for s in range(self.num_shards)]
        self._maps = ShardMaps()
        self._keys: Optional[list[str]] = None

    def __len__(self) -> int:
        return self.num_samples

    @property
    def vocab_size(self) -> int:
        return len(self.hashtags)

    def read(self, i: int) -> bytes:
        return self.view(i).tobytes()

    def view(self, i: int) -> np.ndarray:
        """Sample i's JPEG bytes as a read-only uint8 array viewing the shard's memory map."""
        return self._maps.view(self.shard_paths[int(self.shard[i])], int(self.size[i]), int(self.offset[i]))

    def read_many(self, ids: np.ndarray) -> list[np.ndarray]:
        ids = np.asarray(ids, dtype=np.int64)
        shards = np.asarray(self.shard[ids]).tolist()
        offsets = np.asarray(self.offset[ids]).tolist()
        sizes = np.asarray(self.size[ids]).tolist()
        paths, view = self.shard_paths, self._maps.view
        return [view(paths[s], n, o) for s, o, n in zip(shards, offsets, sizes)]

    def tags_of(self, i: int) -> np.ndarray:
        return np.asarray(self.tags[int(self.tag_ptr[i]) : int(self.tag_ptr[i + 1])])

    def padded_tags(self, ids: np.ndarray, k: Optional[int] = None) -> np.ndarray:
        """int32 [len(ids), k] hashtag ids padded with -1 (k defaults to max_tags;
        a smaller k keeps each image's first k hashtags)."""
        k = self.max_tags if k is None else k
        ids = np.asarray(ids, dtype=np.int64)
        start = np.asarray(self.tag_ptr[ids])
        length = np.minimum(np.asarray(self.tag_ptr[ids + 1]) - start, k)
        col = np.arange(k)
        valid = col[None, :] < length[:, None]
        where = np.where(valid, start[:, None] + col[None, :], 0)
        return np.where(valid, np.asarray(self.tags)[where] if len(self.tags) else -1, -1).astype(np.int32)

    def hw(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ids = np.asarray(ids)
        return np.asarray(self.height[ids], dtype=np.int64), np.asarray(self.width[ids], dtype=np.int64)

    def keys(self) -> list[str]:
        if self._keys is None:
            with open(os.path.join(self.root, "index", "keys.txt"), encoding="utf-8") as f:
                self._keys = f.read().split("\n")[: self.num_samples]
        return self._keys

    def close(self) -> None:
        self._maps.close()


# ---------------------------------------------------------------- writing shards


def write_shard(tar_path: str, idx_path: str, first_id: int, items: list[tuple[bytes, np.ndarray]]):
    """Writes one tar (deterministic headers: same input, same bytes) and its DALI
    index. Returns (offsets, sizes) of the JPEG data. Writes to .tmp files and
    renames, tar first, index second."""
    offsets = np.zeros(len(items), dtype=np.int64)
    sizes = np.zeros(len(items), dtype=np.int64)
    lines = [f"v1.2 {len(items)}"]
    tmp_tar, tmp_idx = tar_path + ".tmp", idx_path + ".tmp"
    with open(tmp_tar, "wb") as raw:
        with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for j, (jpeg, tags) in enumerate(items):
                key = sample_key(first_id + j)
                parts = []
                for ext, payload in (("jpg", jpeg), ("tags", np.asarray(tags, dtype="<i4").tobytes())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(payload)
                    info.mtime = 0
                    info.mode = 0o644
                    info.uid = info.gid = 0
                    info.uname = info.gname = ""
                    header_at = tar.offset
                    tar.addfile(info, io.BytesIO(payload))
                    parts.append(f"{ext} {header_at + 512} {len(payload)} {key}.{ext}")
                    if ext == "jpg":
                        offsets[j], sizes[j] = header_at + 512, len(payload)
                lines.append(" ".join(parts))
        raw.flush()
        os.fsync(raw.fileno())
    with open(tmp_idx, "w", encoding="ascii") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp_tar, tar_path)
    os.replace(tmp_idx, idx_path)
    return offsets, sizes

