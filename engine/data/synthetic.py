"""Synthetic hashtag datasets for tests, the demo and the benchmarks: real JPEG
files of varied sizes and aspect ratios, captions whose hashtags follow a Zipf
law, a synonym map, an evaluation set that overlaps the training images, and a
sprinkling of the awkward files a real crawl holds (the "zoo"). Nothing is
downloaded; the same seed gives the same bytes.

Each image's colours and stripe pattern depend on its first hashtag, so a model
can learn something from it (the demo's loss goes down). With `tag_colours=False`
only the stripes (orientation and frequency) follow the hashtag and every image gets
random colours: a randomly initialised trunk reads colour well and stripes badly, so
a probe on such images tells a pretrained trunk from a random one.

Layout of `out_dir`:

    images/            the image files (zoo files under images/zoo/)
    metadata.jsonl     (or .csv) one row per image: path + caption or tags
    synonyms.json      {alias: canonical}
    eval/              evaluation images; some are byte copies of training images
    expected.json      what the builder must do with each zoo file, the
                       duplicates and the evaluation overlaps
"""

from __future__ import annotations

import csv
import io
import json
import os
import struct
from typing import Optional

import numpy as np

from engine.data._progress import Progress

# Special hashtags exercising Unicode and case folding; the rest are t0000, t0001, ...
_SPECIAL = {1: "café", 4: "straße", 6: "東京"}
_CASE_VARIANTS = {"café": ["Café", "CAFÉ", "café"], "straße": ["Straße", "STRASSE", "strasse"], "東京": ["東京"]}


def tag_name(i: int) -> str:
    return _SPECIAL.get(i, "t%04d" % i)


def _image(rng: np.random.Generator, h: int, w: int, tag: int, tag_colours: bool = True) -> np.ndarray:
    """uint8 [3, h, w]: stripe orientation and frequency (and, with tag_colours, the hue) from
    the tag, plus a gradient and noise."""
    tag_rng = np.random.default_rng(tag)
    base = tag_rng.uniform(40, 215, size=3)
    fx, fy = tag_rng.uniform(0.5, 6.0, size=2)
    y = np.linspace(0, 1, h, dtype=np.float32)[:, None]
    x = np.linspace(0, 1, w, dtype=np.float32)[None, :]
    stripes = np.sin(2 * np.pi * (fx * x + fy * y) + rng.uniform(0, 2 * np.pi))
    grad = rng.uniform(-30, 30) * (x - 0.5) + rng.uniform(-30, 30) * (y - 0.5)
    amplitude = np.full(3, 40.0)
    if not tag_colours:
        base, amplitude = rng.uniform(40, 215, size=3), rng.uniform(20, 50, size=3)
    img = base[:, None, None] + amplitude[:, None, None] * stripes[None] + grad[None] + rng.normal(0, 6, size=(3, h, w))
    return np.clip(img, 0, 255).astype(np.uint8)


def _jpeg(img: np.ndarray, quality: int) -> bytes:
    import torch
    from torchvision.io import encode_jpeg

    return encode_jpeg(torch.from_numpy(np.ascontiguousarray(img)), quality=quality).numpy().tobytes()


def _png(img: np.ndarray) -> bytes:
    import torch
    from torchvision.io import encode_png

    return encode_png(torch.from_numpy(np.ascontiguousarray(img))).numpy().tobytes()


def _pil_jpeg(img: np.ndarray, mode: str, **kw) -> Optional[bytes]:
    """CMYK, progressive and EXIF-tagged JPEGs, which torchvision cannot write."""
    try:
        from PIL import Image
    except ImportError:
        return None
    im = Image.fromarray(np.ascontiguousarray(img.transpose(1, 2, 0))).convert(mode)
    exif = kw.pop("orientation", None)
    if exif is not None:
        e = im.getexif()
        e[0x0112] = exif
        kw["exif"] = e.tobytes()
    b = io.BytesIO()
    im.save(b, format="JPEG", quality=90, **kw)
    return b.getvalue()


def _patch_sof_size(data: bytes, h: int, w: int) -> bytes:
    """A JPEG whose frame header claims h x w (a decompression bomb, by its header)."""
    i = 2
    while i < len(data):
        marker = data[i + 1]
        (length,) = struct.unpack(">H", data[i + 2 : i + 4])
        if marker in (0xC0, 0xC1, 0xC2):
            return data[: i + 5] + struct.pack(">HH", h, w) + data[i + 9 :]
        i += 2 + length
    raise ValueError("no frame header")


def _caption(rng: np.random.Generator, tags: list[int], alias_of: dict[int, str]) -> str:
    words = ["a", "photo", "of", "my", "day", "with", "friends", "lovely", "weekend", "view"]
    parts = list(rng.choice(words, size=int(rng.integers(2, 6))))
    for t in tags:
        name = tag_name(t)
        if t in alias_of and rng.random() < 0.5:
            name = alias_of[t]
        elif name in _CASE_VARIANTS:
            name = str(rng.choice(_CASE_VARIANTS[name]))
        elif rng.random() < 0.2:
            name = name.upper()
        parts.insert(int(rng.integers(0, len(parts) + 1)), "#" + name)
    return " ".join(parts)


def synth(
    out_dir: str,
    n_images: int = 64,
    vocab_size: int = 20,
    seed: int = 0,
    min_side: int = 40,
    max_side: int = 120,
    zipf_a: float = 1.1,
    max_tags: int = 5,
    bad_files: bool = True,
    n_duplicates: int = 2,
    n_eval: int = 6,
    n_eval_overlap: int = 2,
    no_hashtag_fraction: float = 0.03,
    tags_list_fraction: float = 0.1,
    metadata_format: str = "jsonl",
    progress: bool = True,
    tag_colours: bool = True,
) -> dict:
    """Writes a synthetic dataset (module docstring); returns its paths and counts."""
    if n_images < 1 or vocab_size < 1:
        raise ValueError("n_images and vocab_size must be at least 1")
    if min_side < 1 or max_side < min_side:
        raise ValueError(f"need 1 <= min_side <= max_side, got {min_side}, {max_side}")
    if metadata_format not in ("jsonl", "csv"):
        raise ValueError(f"metadata_format {metadata_format!r}: expected 'jsonl' or 'csv'")
    rng = np.random.default_rng(seed)
    img_dir = os.path.join(out_dir, "images")
    zoo_dir = os.path.join(img_dir, "zoo")
    eval_dir = os.path.join(out_dir, "eval")
    for d in (img_dir, zoo_dir, eval_dir):
        os.makedirs(d, exist_ok=True)

    zipf = 1.0 / np.arange(1, vocab_size + 1) ** zipf_a
    zipf /= zipf.sum()
    # Every 5th tag (except specials) has an alias that the synonym map folds back.
    alias_of = {t: tag_name(t) + "_alt" for t in range(2, vocab_size, 5) if t not in _SPECIAL}
    synonyms = {alias: tag_name(t) for t, alias in alias_of.items()}

    rows: list[dict] = []
    expected: dict = {"zoo": {}, "duplicates": [], "eval_overlap": [], "no_hashtag": []}
    normal_files: list[tuple[str, bytes]] = []

    def write(rel: str, data: bytes) -> str:
        with open(os.path.join(img_dir, rel), "wb") as f:
            f.write(data)
        return rel

    def row(rel: str, tags: list[int], as_list: bool) -> dict:
        if as_list:
            return {"path": rel, "tags": ["#" + tag_name(t) if rng.random() < 0.5 else tag_name(t) for t in tags]}
        return {"path": rel, "caption": _caption(rng, tags, alias_of)}

    with Progress(n_images, "synth", enabled=progress) as bar:
        for i in range(n_images):
            k = min(max_tags, int(rng.geometric(0.5)))
            tags = list(dict.fromkeys(int(t) for t in rng.choice(vocab_size, size=k, p=zipf)))
            a = rng.uniform(min_side, max_side)
            ar = np.exp(rng.uniform(np.log(0.5), np.log(2.0)))
            h = int(np.clip(round(a / np.sqrt(ar)), min_side, max_side))
            w = int(np.clip(round(a * np.sqrt(ar)), min_side, max_side))
            data = _jpeg(_image(rng, h, w, tags[0], tag_colours), int(rng.integers(70, 96)))
            rel = write("img_%06d.jpg" % i, data)
            normal_files.append((rel, data))
            if rng.random() < no_hashtag_fraction:
                rows.append({"path": rel, "caption": "no tags here, just # and words"})
                expected["no_hashtag"].append(rel)
            else:
                rows.append(row(rel, tags, rng.random() < tags_list_fraction))
            bar.update()

    def zoo(name: str, data: Optional[bytes], action: str, reason: str) -> None:
        if data is None:  # Pillow missing: this kind of file cannot be written here
            return
        rel = write(os.path.join("zoo", name), data)
        tags = [int(rng.choice(vocab_size, p=zipf))]
        rows.append(row(rel, tags, False))
        expected["zoo"][rel] = {"action": action, "reason": reason}

    if bad_files:
        base = _image(rng, 64, 96, 0)
        good = _jpeg(base, 90)
        zoo("empty.jpg", b"", "skipped", "empty")
        zoo("truncated.jpg", good[: len(good) // 2], "skipped", "truncated")
        zoo("no_eoi.jpg", good[:-2], "skipped", "truncated")
        zoo("garbage.jpg", rng.integers(0, 256, 700, dtype=np.uint8).tobytes(), "skipped", "not_an_image")
        zoo("text.jpg", b"this is not an image\n" * 20, "skipped", "not_an_image")
        mid = len(good) // 2  # 200 bytes of entropy-coded data cut out: libjpeg warns, the builder skips
        zoo("corrupt.jpg", good[:mid] + good[mid + 200 :], "skipped", "corrupt")
        zoo("huge_header.jpg", _patch_sof_size(good, 60000, 60000), "skipped", "too_large")
        zoo("tiny.jpg", _jpeg(_image(rng, 4, 4, 3), 90), "skipped", "too_small")
        zoo("png_named.jpg", _png(base), "reencoded", "not_jpeg")
        zoo("cmyk.jpg", _pil_jpeg(base, "CMYK"), "reencoded", "cmyk")
        zoo("progressive.jpg", _pil_jpeg(base, "RGB", progressive=True), "reencoded", "progressive")
        zoo("grayscale.jpg", _jpeg(base[:1], 90), "ok", "")
        zoo("exif_rotated.jpg", _pil_jpeg(base, "RGB", orientation=6), "ok", "")
        rows.append({"path": "zoo/missing.jpg", "caption": "#" + tag_name(0)})
        expected["zoo"]["zoo/missing.jpg"] = {"action": "skipped", "reason": "missing"}
        os.makedirs(os.path.join(zoo_dir, "a_directory.jpg"), exist_ok=True)
        rows.append({"path": "zoo/a_directory.jpg", "caption": "#" + tag_name(0)})
        expected["zoo"]["zoo/a_directory.jpg"] = {"action": "skipped", "reason": "unreadable"}

    # Exact duplicates of normal images, under other names and captions.
    no_tag = set(expected["no_hashtag"])
    candidates = [j for j, (rel, _) in enumerate(normal_files) if rel not in no_tag]
    picks = rng.choice(candidates, size=min(n_duplicates + n_eval_overlap, len(candidates)), replace=False)
    for j in picks[:n_duplicates]:
        src_rel, data = normal_files[int(j)]
        rel = write("dup_of_%s" % os.path.basename(src_rel), data)
        rows.append({"path": rel, "caption": "again #" + tag_name(0)})
        expected["duplicates"].append([rel, src_rel])
    # The evaluation set: some byte copies of training images, the rest new.
    for n, j in enumerate(picks[n_duplicates:]):
        src_rel, data = normal_files[int(j)]
        with open(os.path.join(eval_dir, "eval_%03d.jpg" % n), "wb") as f:
            f.write(data)
        expected["eval_overlap"].append(src_rel)
    for n in range(len(expected["eval_overlap"]), n_eval):
        with open(os.path.join(eval_dir, "eval_%03d.jpg" % n), "wb") as f:
            f.write(_jpeg(_image(rng, 64, 64, n), 90))

    if metadata_format == "jsonl":
        meta = os.path.join(out_dir, "metadata.jsonl")
        with open(meta, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    else:
        meta = os.path.join(out_dir, "metadata.csv")
        with open(meta, "w", encoding="utf-8", newline="") as f:
            wr = csv.writer(f)
            wr.writerow(["path", "caption", "tags"])
            for r in rows:
                wr.writerow([r["path"], r.get("caption", ""), " ".join(r.get("tags", []))])
    syn_path = os.path.join(out_dir, "synonyms.json")
    with open(syn_path, "w", encoding="utf-8") as f:
        json.dump(synonyms, f, ensure_ascii=False, indent=1)
    expected.update({"rows": len(rows), "n_images": n_images, "vocab_size": vocab_size, "seed": seed})
    exp_path = os.path.join(out_dir, "expected.json")
    with open(exp_path, "w", encoding="utf-8") as f:
        json.dump(expected, f, ensure_ascii=False, indent=1)
    return {"images": img_dir, "metadata": meta, "synonyms": syn_path, "eval_set": eval_dir,
            "expected": exp_path, "rows": len(rows)}


def synth_imagefolder(out_dir: str, num_classes: int = 3, per_class: int = 6, seed: int = 0,
                      min_side: int = 40, max_side: int = 120, first_tag: int = 100,
                      tag_colours: bool = True) -> str:
    """An ImageFolder-style labelled set: out_dir/<class>/<n>.jpg (one PNG per class too).
    Class c looks like hashtag first_tag + c of `synth`: the default, 100, gives classes
    unlike any hashtag of a small vocabulary; 0 gives the pretraining hashtags themselves."""
    rng = np.random.default_rng(seed)
    for c in range(num_classes):
        d = os.path.join(out_dir, "class_%02d" % c)
        os.makedirs(d, exist_ok=True)
        for n in range(per_class):
            h, w = (int(v) for v in rng.integers(min_side, max_side + 1, size=2))
            img = _image(rng, h, w, first_tag + c, tag_colours)
            data = _png(img) if n == 0 else _jpeg(img, 90)
            with open(os.path.join(d, "%03d.%s" % (n, "png" if n == 0 else "jpg")), "wb") as f:
                f.write(data)
    return out_dir


class SyntheticMicroBatches:
    """Random training input already on the device, for throughput runs without an input
    pipeline: micro-batch j of every optimizer step is drawn from a generator seeded by
    (seed, j) alone, on the CPU, so that rank r of W holds exactly the micro-batches
    r * A .. r * A + A - 1 (A = global_batch / (micro_batch * W)) that a run at any other
    world size holds; the step is the same at every W. The same A micro-batches repeat
    each step (nothing is drawn in the loop). Batches follow engine.data.loaders' contract."""

    def __init__(self, *, global_batch: int, micro_batch: int, rank: int, world_size: int, seed: int,
                 image_size: int, vocab_size: int, tags_per_image: int, device, dtype, channels_last: bool = True):
        import torch

        if global_batch % (micro_batch * world_size):
            raise ValueError(f"a global batch of {global_batch} does not split into micro-batches of {micro_batch} "
                             f"on {world_size} ranks")
        self.global_batch, self.micro_batch = global_batch, micro_batch
        self.accum = global_batch // (micro_batch * world_size)
        self.seed = seed
        self.tag_width = tags_per_image
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.batches = []
        for j in range(rank * self.accum, (rank + 1) * self.accum):
            g = torch.Generator().manual_seed(seed * 1_000_003 + j)
            images = torch.randn(micro_batch, 3, image_size, image_size, generator=g)
            tags = torch.randint(0, vocab_size, (micro_batch, tags_per_image), generator=g, dtype=torch.int32)
            keep = torch.rand(micro_batch, tags_per_image, generator=g) < 0.6
            keep[:, 0] = True
            self.batches.append({"images": images.to(device, dtype).contiguous(memory_format=fmt),
                                 "tags": torch.where(keep, tags, -1).to(device)})
        self._global = 0  # micro-batches handed out

    def __iter__(self):
        while True:
            batch = self.batches[self._global % self.accum]
            self._global += 1
            yield batch

    def state_dict(self) -> dict:
        step, micro = divmod(self._global, self.accum)
        return {"kind": "synthetic", "version": 2, "global_step": step, "micro": micro, "seed": self.seed,
                "global_batch": self.global_batch, "batch_size": self.micro_batch}

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != 2:  # v1: a per-rank batch; the data position is the step anyway
            return
        self.set_step(int(state["global_step"]), int(state["micro"]) if state.get("micro") else 0)

    def set_step(self, step: int, micro: int = 0) -> None:
        self._global = step * self.accum + micro
