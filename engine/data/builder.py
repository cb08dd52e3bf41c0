"""The offline dataset builder: metadata + images -> validated, deduplicated,
indexed webdataset shards (format in engine.data.dataset).

Stages, each resumable:

1. scan (parallel over processes, in chunks of rows): read each file, hash it
   (sha256 of the source bytes), validate it with torchvision and DALI
   (engine.data.jpeg), re-encode what can be repaired. Results per chunk go to
   <out>/.build/scan/, so an interrupted scan resumes at the first missing chunk.
2. plan (in the main process): drop images whose hash is in the evaluation set,
   then exact duplicates (the first row in metadata order is kept), build the
   top-K vocabulary, drop images left with no hashtag, order the rest by a
   seeded permutation and cut it into shards.
3. write (parallel over processes): one tar + DALI index per shard, written to
   temporary names and renamed; a per-shard record written last marks the shard
   finished. A rerun skips every finished shard whose plan is unchanged.
4. finalize: the global index, vocab.json, dataset.json, report.json.

Same inputs and seed give byte-identical shards, whether the build ran in one
go or was killed and resumed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np

from engine.data import jpeg as jpeg_mod
from engine.data import metadata as meta_mod
from engine.data import vocab as vocab_mod
from engine.data._progress import Progress
from engine.data.dataset import FORMAT, shard_name, write_shard

SCAN_VERSION = 1
REPORT_MAX_KEYS = 10000


@dataclass
class BuildConfig:
    """Everything `build` needs. Paths may be relative to the working directory."""

    images: str  # image root; metadata paths are relative to it (absolute paths are kept)
    metadata: str  # one row per image, or a directory of webdataset tars (see engine.data.metadata)
    out: str  # output dataset directory
    vocab_size: Union[int, str] = "1.5k"  # K, or a preset: "1.5k", "8.5k", "17k"
    synonyms: Optional[str] = None  # JSON {hashtag: canonical} or 2-column CSV/TSV
    eval_set: Optional[str] = None  # a directory of images, or a file of sha256 digests (sha256sum format)
    shard_size: int = 5000  # samples per shard
    seed: int = 0  # sample order across shards
    workers: int = 0  # processes; 0: one per CPU core; 1: no subprocesses
    # Worker processes: auto (spawn, or fork for a script with no __main__ guard), spawn, fork.
    start_method: str = "auto"
    min_count: int = 1  # a hashtag needs this many images to enter the vocabulary
    max_tags_per_image: int = 32  # keep an image's first N vocabulary hashtags
    weighting: str = "sum"  # resampling weight of a multi-tag image: sum | mean | max (engine.data.vocab)
    validate_with: Union[str, Sequence[str]] = "auto"  # "auto", or a subset of ("torchvision", "dali")
    dali_device: str = "cpu"  # "cpu", or "mixed" on a GPU machine (the exact training decoder)
    max_bytes: int = 32 << 20  # larger files are skipped (file_too_large)
    max_pixels: int = 50_000_000  # larger images are skipped (too_large), decided from the header
    max_side: int = 16384
    min_side: int = 8  # smaller images are skipped (too_small)
    reencode_progressive: bool = True  # progressive JPEGs are re-encoded (the HW decoder takes baseline only)
    quality: int = 90  # JPEG quality of re-encoded images
    chunk_size: int = 256  # rows per scan task
    overwrite: bool = False  # allow replacing a build made with a different configuration
    progress: bool = True
    path_field: str = "path"
    caption_field: str = "caption"
    tags_field: str = "tags"  # also accepted: "hashtags"
    key_field: str = "key"  # optional; the key defaults to the path as written
    # Metadata format (engine.data.metadata): auto, jsonl, csv, tsv, parquet, yfcc100m, webdataset.
    format: str = "auto"
    path_template: Optional[str] = None  # image path from a row's fields, e.g. "{key}.jpg"
    yfcc_tags: str = "user"  # yfcc100m: user, machine or both

    def fields(self) -> meta_mod.Fields:
        return meta_mod.Fields(path=self.path_field, caption=self.caption_field, tags=self.tags_field,
                               key=self.key_field, path_template=self.path_template, yfcc_tags=self.yfcc_tags)

    def limits(self) -> jpeg_mod.Limits:
        return jpeg_mod.Limits(
            max_bytes=self.max_bytes, max_pixels=self.max_pixels, max_side=self.max_side,
            min_side=self.min_side, reencode_progressive=self.reencode_progressive, quality=self.quality,
        )


class BuildError(RuntimeError):
    pass


# ---------------------------------------------------------------- metadata


Row = meta_mod.Row


def read_metadata(cfg: BuildConfig, synonyms: dict[str, str], skipped: Optional[dict] = None) -> list[Row]:
    """Every row of the metadata (formats: engine.data.metadata)."""
    rows = list(meta_mod.iter_rows(cfg.metadata, cfg.images, cfg.format, cfg.fields(), synonyms, skipped))
    if not rows:
        raise ValueError(f"metadata {cfg.metadata!r} has no rows")
    return rows


def _inputs_fingerprint(cfg: BuildConfig) -> str:
    """sha256 of the metadata files; a tar (webdataset input) by size and mtime, since
    hashing it would read every image twice (the write stage checks each image's sha256)."""
    fmt = meta_mod.detect_format(cfg.metadata, cfg.format)
    parts = []
    for path in meta_mod.input_files(cfg.metadata, fmt):
        if fmt == "webdataset":
            st = os.stat(path)
            parts.append([os.path.abspath(path), st.st_size, st.st_mtime_ns])
        else:
            parts.append([os.path.abspath(path), _file_sha256(path)])
    return _fingerprint(parts)


def load_eval_hashes(path: Optional[str]) -> set[str]:
    """sha256 digests of an evaluation set: every file under a directory, or a text
    file with one hex digest per line (`sha256sum` output works)."""
    if not path:
        return set()
    if os.path.isdir(path):
        out = set()
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames.sort()
            for name in sorted(filenames):
                with open(os.path.join(dirpath, name), "rb") as f:
                    out.add(hashlib.sha256(f.read()).hexdigest())
        return out
    if not os.path.isfile(path):
        raise FileNotFoundError(f"evaluation set {path!r} does not exist")
    out = set()
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            token = line.split()[0].lstrip("\\").lower() if line.strip() else ""
            if not token:
                continue
            if not re.fullmatch(r"[0-9a-f]{64}", token):
                raise ValueError(f"evaluation hashes {path}:{lineno}: expected a sha256 hex digest, got {token[:80]!r}")
            out.add(token)
    return out


# ---------------------------------------------------------------- stage 1: scan

_DALI_CHECKERS: dict = {}  # one DALI pipeline per process and device, reused across chunks


def _dali_checker(device: str):
    if device not in _DALI_CHECKERS:
        _DALI_CHECKERS[device] = jpeg_mod.DaliChecker(device=device)
    return _DALI_CHECKERS[device]


def _read_file(path: str, max_bytes: int):
    """(bytes, None) or (None, reason)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None, "missing"
    except OSError:
        return None, "unreadable"
    if os.path.isfile(path) and st.st_size > max_bytes:
        return None, "file_too_large"
    try:
        with open(path, "rb") as f:
            return f.read(), None
    except OSError:
        return None, "unreadable"


def _scan_chunk(task: dict) -> dict:
    """Scans rows; writes <scan_dir>/chunk-N.json (+ .bin with re-encoded images)."""
    import torch

    torch.set_num_threads(1)
    limits = jpeg_mod.Limits(**task["limits"])
    records = []
    blobs: list[bytes] = []
    pending = []  # (record index, bytes, was_original) to check with DALI
    blob_at = 0
    for path, offset, size in task["paths"]:
        if offset < 0:
            data, reason = _read_file(path, limits.max_bytes)
        else:
            data, reason = meta_mod.read_member(path, offset, size, limits.max_bytes)
        rec = {"action": "skipped", "reason": reason or "", "detail": "", "sha256": "", "h": 0, "w": 0}
        if data is not None:
            rec["sha256"] = hashlib.sha256(data).hexdigest()
            checked = jpeg_mod.check_image(data, limits)
            rec.update(action=checked.action, reason=checked.reason, detail=checked.detail,
                       h=checked.height, w=checked.width)
            if checked.action != "skipped":
                pending.append((len(records), checked.data, checked.action == "ok"))
        records.append(rec)
    if task["dali"] and pending:
        checker = _dali_checker(task["dali_device"])
        shapes = checker.shapes([b for _, b, _ in pending])
        for pi, shape in enumerate(shapes):
            ri, data, original = pending[pi]
            rec = records[ri]
            if shape == (rec["h"], rec["w"]):
                continue
            fixed = None
            if original:  # torchvision reads it, DALI does not: try a baseline re-encode
                try:
                    image = jpeg_mod.decode_rgb(data)
                    candidate = jpeg_mod.encode_baseline_jpeg(image, limits.quality)
                    if checker.shapes([candidate])[0] == (rec["h"], rec["w"]):
                        fixed = candidate
                except Exception:
                    fixed = None
            if fixed is None:
                rec.update(action="skipped", reason="dali_undecodable", detail=f"DALI decode gave {shape}")
            else:
                rec.update(action="reencoded", reason="dali_rejected")
                pending[pi] = (ri, fixed, False)
    for ri, data, original in pending:
        rec = records[ri]
        if rec["action"] == "reencoded":
            rec["blob"] = [blob_at, len(data)]
            blobs.append(data)
            blob_at += len(data)
            rec["out_sha256"] = hashlib.sha256(data).hexdigest()
    base = os.path.join(task["scan_dir"], "chunk-%06d" % task["chunk"])
    with open(base + ".bin.tmp", "wb") as f:
        for b in blobs:
            f.write(b)
    with open(base + ".json.tmp", "w", encoding="utf-8") as f:
        json.dump({"version": SCAN_VERSION, "start": task["start"], "records": records}, f)
    os.replace(base + ".bin.tmp", base + ".bin")
    os.replace(base + ".json.tmp", base + ".json")  # written last: marks the chunk done
    return {"chunk": task["chunk"], "n": len(records)}


# ---------------------------------------------------------------- stage 3: write


def _write_shard_task(task: dict) -> dict:
    items = []
    for src in task["samples"]:
        if src["blob"] is not None:
            with open(src["bin"], "rb") as f:
                f.seek(src["blob"][0])
                data = f.read(src["blob"][1])
            want = src["out_sha256"]
        else:
            with open(src["file"], "rb") as f:
                if src["offset"] >= 0:
                    f.seek(src["offset"])
                    data = f.read(src["size"])
                else:
                    data = f.read()
            want = src["sha256"]
        if hashlib.sha256(data).hexdigest() != want:
            raise BuildError(
                f"{src['file']} changed since the build scanned it; rerun the build with overwrite=True (--overwrite)"
            )
        items.append((data, np.asarray(src["tags"], dtype=np.int32)))
    tar_path = os.path.join(task["shard_dir"], shard_name(task["shard"]) + ".tar")
    idx_path = os.path.join(task["shard_dir"], shard_name(task["shard"]) + ".idx")
    offsets, sizes = write_shard(tar_path, idx_path, task["first_id"], items)
    done = os.path.join(task["done_dir"], shard_name(task["shard"]) + ".npz")
    with open(done + ".tmp", "wb") as f:
        np.savez(f, offsets=offsets, sizes=sizes, plan=np.frombuffer(task["plan"].encode(), dtype=np.uint8))
    os.replace(done + ".tmp", done)  # written last: marks the shard finished
    delay = float(os.environ.get("ENGINE_DATA_TEST_SHARD_DELAY", "0") or 0)  # tests: widen the kill window
    if delay:
        time.sleep(delay)
    return {"shard": task["shard"]}


# ---------------------------------------------------------------- driver


def _pool_map(fn, tasks: list, workers: int, progress: Progress, weight=lambda r: 1, start_method: str = "auto"):
    """Runs fn over tasks, in subprocesses when workers > 1; yields results as they come."""
    if workers <= 1 or len(tasks) <= 1:
        for t in tasks:
            r = fn(t)
            progress.update(weight(t))
            yield r
        return
    import multiprocessing as mp

    ctx = mp.get_context(_start_method(start_method))
    with ctx.Pool(min(workers, len(tasks)), initializer=_worker_init) as pool:
        for r in pool.imap_unordered(_Call(fn), tasks):
            progress.update(weight(r["_task"]))
            yield r["result"]


def _start_method(method: str) -> str:
    """spawn, unless the caller is a script that spawn would re-run: a spawned worker
    imports the main script, and an unguarded build() call there would start the
    build again in every worker. Such a caller gets fork (it has run no DALI
    pipeline, the one thing a forked worker must not inherit; see _worker_init)."""
    if method != "auto":
        return method
    import __main__

    path = getattr(__main__, "__file__", None)
    if path is None or getattr(__main__, "__spec__", None) is not None:  # interactive, or python -m
        return "spawn"
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            guarded = "__main__" in f.read()
    except OSError:
        guarded = True
    if guarded:
        return "spawn"
    print(f"engine data build: {path} calls build() outside an `if __name__ == '__main__':` guard; "
          "forking the worker processes instead of spawning them", file=sys.stderr)
    return "fork"


_INHERITED: list = []  # DALI pipelines a forked worker inherited: never used, never destroyed


def _worker_init():
    global _DALI_CHECKERS
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if _DALI_CHECKERS:  # forked from a process that ran DALI: its threads are not here
        _INHERITED.append(_DALI_CHECKERS)
        _DALI_CHECKERS = {}


class _Call:
    def __init__(self, fn):
        self.fn = fn

    def __call__(self, task):
        return {"_task": task, "result": self.fn(task)}


def _fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _validators(cfg: BuildConfig) -> tuple[bool, str]:
    """(use DALI, note)."""
    v = cfg.validate_with
    names = {"torchvision", "dali"} if v == "auto" else ({v} if isinstance(v, str) else set(v))
    unknown = names - {"torchvision", "dali"}
    if unknown:
        raise ValueError(f"validate_with: unknown decoder(s) {sorted(unknown)}; expected 'torchvision' and/or 'dali'")
    if "dali" not in names:
        return False, "validated with torchvision only"
    why = jpeg_mod.dali_available()
    if why:
        if v == "auto":
            print(f"engine data build: {why}; validating with torchvision only", file=sys.stderr)
            return False, f"validated with torchvision only: {why}"
        raise RuntimeError(f"validate_with asks for DALI but {why}")
    return True, f"validated with torchvision and DALI ({cfg.dali_device})"


def _check_config(cfg: BuildConfig) -> None:
    if not os.path.isdir(cfg.images):
        raise FileNotFoundError(f"image root {cfg.images!r} does not exist or is not a directory")
    for name in ("shard_size", "chunk_size", "max_tags_per_image", "min_count", "quality"):
        if int(getattr(cfg, name)) < 1:
            raise ValueError(f"{name} must be at least 1, got {getattr(cfg, name)!r}")
    if cfg.weighting not in ("sum", "mean", "max"):
        raise ValueError(f"weighting {cfg.weighting!r}: expected 'sum', 'mean' or 'max'")
    if cfg.start_method not in ("auto", "spawn", "fork", "forkserver"):
        raise ValueError(f"start_method {cfg.start_method!r}: expected 'auto', 'spawn', 'fork' or 'forkserver'")
    if cfg.dali_device not in ("cpu", "mixed"):
        raise ValueError(f"dali_device {cfg.dali_device!r}: expected 'cpu' or 'mixed'")
    vocab_mod.parse_vocab_size(cfg.vocab_size)
    meta_mod.detect_format(cfg.metadata, cfg.format)
    if cfg.yfcc_tags not in meta_mod.YFCC_TAGS:
        raise ValueError(f"yfcc_tags {cfg.yfcc_tags!r}: expected one of {', '.join(meta_mod.YFCC_TAGS)}")


def _capped(keys: list, limit: int = REPORT_MAX_KEYS) -> dict:
    return {"count": len(keys), "keys": keys[:limit], "truncated": len(keys) > limit}


def build(config: Union[BuildConfig, dict]) -> dict:
    """Builds (or resumes building) a dataset; returns the report (also written to
    <out>/report.json). Raises on bad inputs, naming them."""
    cfg = config if isinstance(config, BuildConfig) else BuildConfig(**config)
    t0 = time.monotonic()
    _check_config(cfg)
    k = vocab_mod.parse_vocab_size(cfg.vocab_size)
    use_dali, validator_note = _validators(cfg)
    synonyms = vocab_mod.load_synonyms(cfg.synonyms)
    not_images: dict[str, int] = {}  # rows left out on purpose (YFCC100M videos)
    rows = read_metadata(cfg, synonyms, not_images)
    eval_hashes = load_eval_hashes(cfg.eval_set)
    workers = cfg.workers if cfg.workers > 0 else (os.cpu_count() or 1)
    out = os.path.abspath(cfg.out)
    build_dir = os.path.join(out, ".build")
    scan_dir = os.path.join(build_dir, "scan")
    done_dir = os.path.join(build_dir, "shards")
    shard_dir = os.path.join(out, "shards")

    # Which configuration produced what is already here.
    metadata_sha = _inputs_fingerprint(cfg)
    ignored = ("progress", "workers", "start_method", "overwrite", "out")
    settings = {name: v for name, v in dataclasses.asdict(cfg).items() if name not in ignored}
    config_fp = _fingerprint({"settings": settings, "metadata": metadata_sha, "images": os.path.abspath(cfg.images),
                              "eval_hashes": sorted(eval_hashes), "synonyms": synonyms})
    scan_fp = _fingerprint({
        "version": SCAN_VERSION, "images": os.path.abspath(cfg.images), "metadata": metadata_sha,
        "limits": dataclasses.asdict(cfg.limits()), "dali": use_dali, "dali_device": cfg.dali_device,
        "chunk": cfg.chunk_size, "fields": dataclasses.asdict(cfg.fields()), "format": cfg.format,
    })
    meta_path = os.path.join(out, "dataset.json")
    if os.path.isfile(meta_path) and not cfg.overwrite:
        with open(meta_path, encoding="utf-8") as f:
            old = json.load(f).get("config_fingerprint")
        if old != config_fp:
            raise BuildError(
                f"{out} holds a dataset built from other inputs or settings; "
                "pass overwrite=True (--overwrite) to replace it"
            )
    fp_path = os.path.join(build_dir, "scan.fingerprint")
    old_scan = open(fp_path).read().strip() if os.path.isfile(fp_path) else None
    if old_scan != scan_fp:
        shutil.rmtree(scan_dir, ignore_errors=True)
    if os.path.isfile(meta_path):
        os.remove(meta_path)  # the directory is not a complete dataset until the end of this build
    os.makedirs(scan_dir, exist_ok=True)
    os.makedirs(done_dir, exist_ok=True)
    os.makedirs(shard_dir, exist_ok=True)
    with open(fp_path + ".tmp", "w") as f:
        f.write(scan_fp)
    os.replace(fp_path + ".tmp", fp_path)

    # ---- stage 1: scan
    t_scan = time.monotonic()
    limits = dataclasses.asdict(cfg.limits())
    tasks = []
    for c, start in enumerate(range(0, len(rows), cfg.chunk_size)):
        if os.path.isfile(os.path.join(scan_dir, "chunk-%06d.json" % c)):
            continue
        chunk = rows[start : start + cfg.chunk_size]
        tasks.append({
            "chunk": c, "start": start, "paths": [(os.path.join(cfg.images, r.path), r.offset, r.size) for r in chunk],
            "limits": limits, "dali": use_dali, "dali_device": cfg.dali_device, "scan_dir": scan_dir,
        })
    scanned_before = len(rows) - sum(len(t["paths"]) for t in tasks)
    with Progress(len(rows), "scan ", enabled=cfg.progress, initial=scanned_before) as bar:
        for _ in _pool_map(_scan_chunk, tasks, workers, bar, lambda t: len(t["paths"]), cfg.start_method):
            pass
    records: list[dict] = []
    for c, start in enumerate(range(0, len(rows), cfg.chunk_size)):
        with open(os.path.join(scan_dir, "chunk-%06d.json" % c), encoding="utf-8") as f:
            part = json.load(f)
        for rec in part["records"]:
            rec["chunk"] = c
        records.extend(part["records"])
    t_scan = time.monotonic() - t_scan

    # ---- stage 2: plan
    rejected: list[dict] = []  # everything not written as is, for rejected.jsonl
    keep = []
    dup_pairs, in_eval = [], []
    first_by_hash: dict[str, int] = {}
    for i, (row, rec) in enumerate(zip(rows, records)):
        if rec["action"] == "skipped":
            rejected.append({"key": row.key, "path": row.path, "action": "skipped", "reason": rec["reason"],
                             "detail": rec.get("detail", "")})
            continue
        if rec["sha256"] in eval_hashes:
            in_eval.append(row.key)
            rejected.append({"key": row.key, "path": row.path, "action": "dropped", "reason": "in_eval_set"})
            continue
        j = first_by_hash.setdefault(rec["sha256"], i)
        if j != i:
            dup_pairs.append([row.key, rows[j].key])
            rejected.append({"key": row.key, "path": row.path, "action": "dropped", "reason": "duplicate",
                             "duplicate_of": rows[j].key})
            continue
        if rec["action"] == "reencoded":
            rejected.append({"key": row.key, "path": row.path, "action": "reencoded", "reason": rec["reason"]})
        keep.append(i)
    hashtags, counts = vocab_mod.build_vocab((rows[i].tags for i in keep), k, cfg.min_count)
    tag_id = {t: n for n, t in enumerate(hashtags)}
    final, final_tags, no_tag = [], [], []
    for i in keep:
        ids = [tag_id[t] for t in rows[i].tags if t in tag_id][: cfg.max_tags_per_image]
        if not ids:
            no_tag.append(rows[i].key)
            rejected.append({"key": rows[i].key, "path": rows[i].path, "action": "dropped", "reason": "no_hashtag"})
            continue
        final.append(i)
        final_tags.append(np.asarray(ids, dtype=np.int32))
    if not final:
        raise BuildError(f"no image survived validation, deduplication and the vocabulary (metadata {cfg.metadata})")
    # Counts of the final dataset (a kept hashtag's images all stay, so they equal the vocabulary counts
    # unless max_tags_per_image cut some); weights use these.
    final_counts = np.bincount(np.concatenate(final_tags), minlength=len(hashtags)).astype(np.int64)
    order = np.random.default_rng(cfg.seed).permutation(len(final))
    final = [final[j] for j in order]
    final_tags = [final_tags[j] for j in order]
    weights = vocab_mod.image_weights(final_tags, np.maximum(final_counts, 1), cfg.weighting)
    n = len(final)
    num_shards = (n + cfg.shard_size - 1) // cfg.shard_size
    plan_fp = _fingerprint({
        "scan": scan_fp, "rows": final, "sha": [records[i]["sha256"] for i in final],
        "tags": [t.tolist() for t in final_tags], "shard_size": cfg.shard_size,
    })

    # ---- stage 3: write shards
    t_write = time.monotonic()
    tasks, reused = [], 0
    for s in range(num_shards):
        done = os.path.join(done_dir, shard_name(s) + ".npz")
        tar_path = os.path.join(shard_dir, shard_name(s) + ".tar")
        if os.path.isfile(done) and os.path.isfile(tar_path):
            with np.load(done) as z:
                if z["plan"].tobytes().decode() == plan_fp:
                    reused += 1
                    continue
            os.remove(done)
        lo, hi = s * cfg.shard_size, min(n, (s + 1) * cfg.shard_size)
        samples = []
        for i, tags in zip(final[lo:hi], final_tags[lo:hi]):
            rec = records[i]
            samples.append({
                "file": os.path.join(cfg.images, rows[i].path), "offset": rows[i].offset, "size": rows[i].size,
                "sha256": rec["sha256"], "tags": tags.tolist(),
                "blob": rec.get("blob"), "out_sha256": rec.get("out_sha256"),
                "bin": os.path.join(scan_dir, "chunk-%06d.bin" % rec["chunk"]),
            })
        tasks.append({"shard": s, "first_id": lo, "samples": samples, "shard_dir": shard_dir,
                      "done_dir": done_dir, "plan": plan_fp})
    with Progress(num_shards, "write", enabled=cfg.progress, initial=reused) as bar:
        for _ in _pool_map(_write_shard_task, tasks, workers, bar, start_method=cfg.start_method):
            pass
    for name in os.listdir(shard_dir):  # shards of an older, larger plan
        m = re.fullmatch(r"shard-(\d+)\.(tar|idx)", name)
        if m and int(m.group(1)) >= num_shards:
            os.remove(os.path.join(shard_dir, name))
    t_write = time.monotonic() - t_write

    # ---- stage 4: finalize
    offsets = np.zeros(n, dtype=np.int64)
    sizes = np.zeros(n, dtype=np.int32)
    for s in range(num_shards):
        with np.load(os.path.join(done_dir, shard_name(s) + ".npz")) as z:
            lo = s * cfg.shard_size
            offsets[lo : lo + len(z["offsets"])] = z["offsets"]
            sizes[lo : lo + len(z["sizes"])] = z["sizes"]
    lengths = np.array([len(t) for t in final_tags], dtype=np.int64)
    arrays = {
        "shard": (np.arange(n) // cfg.shard_size).astype(np.int32),
        "offset": offsets,
        "size": sizes,
        "height": np.array([records[i]["h"] for i in final], dtype=np.int32),
        "width": np.array([records[i]["w"] for i in final], dtype=np.int32),
        "tag_ptr": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        "tags": np.concatenate(final_tags).astype(np.int32),
        "weight": weights,
        "weight_cdf": np.cumsum(weights),
        "sha256": np.frombuffer(b"".join(bytes.fromhex(records[i]["sha256"]) for i in final),
                                dtype=np.uint8).reshape(n, 32),
    }
    index_dir = os.path.join(out, "index")
    os.makedirs(index_dir, exist_ok=True)
    for name, arr in arrays.items():
        path = os.path.join(index_dir, name + ".npy")
        with open(path + ".tmp", "wb") as f:
            np.save(f, arr)
        os.replace(path + ".tmp", path)
    _write_text(os.path.join(index_dir, "keys.txt"), "\n".join(rows[i].key.replace("\n", " ") for i in final) + "\n")
    vocab_mod.write_vocab(os.path.join(out, "vocab.json"), hashtags, final_counts.tolist())

    skipped_keys: dict[str, list] = {}
    reencoded_keys: dict[str, list] = {}
    for r in rejected:
        if r["action"] == "skipped":
            skipped_keys.setdefault(r["reason"], []).append(r["key"])
        elif r["action"] == "reencoded":
            reencoded_keys.setdefault(r["reason"], []).append(r["key"])
    n_ok = sum(1 for rec in records if rec["action"] == "ok")
    report = {
        "format": "engine-build-report/1",
        "inputs": {"images": os.path.abspath(cfg.images), "metadata": os.path.abspath(cfg.metadata),
                   "synonyms": cfg.synonyms, "eval_set": cfg.eval_set},
        "config": dataclasses.asdict(cfg),
        "validation": validator_note,
        "metadata_rows": len(rows),
        "not_images": dict(sorted(not_images.items())),  # metadata rows left out before the scan (videos)
        "valid_as_is": n_ok,
        "reencoded": {r: len(v) for r, v in sorted(reencoded_keys.items())},
        "skipped": {r: len(v) for r, v in sorted(skipped_keys.items())},
        "dropped": {"in_eval_set": len(in_eval), "duplicate": len(dup_pairs), "no_hashtag": len(no_tag)},
        "written": n,
        "keys": {
            "reencoded": {r: _capped(v) for r, v in sorted(reencoded_keys.items())},
            "skipped": {r: _capped(v) for r, v in sorted(skipped_keys.items())},
            "in_eval_set": _capped(in_eval),
            "duplicate": _capped(dup_pairs),  # [key, key of the copy kept]
            "no_hashtag": _capped(no_tag),
        },
        "vocab": {"requested": k, "size": len(hashtags),
                  "distinct_hashtags": len({t for i in keep for t in rows[i].tags}),
                  "synonyms": len(synonyms), "weighting": cfg.weighting},
        "eval_set_hashes": len(eval_hashes),
        "shards": {"count": num_shards, "shard_size": cfg.shard_size, "written": len(tasks), "reused": reused},
        "seconds": {"scan": round(t_scan, 3), "write": round(t_write, 3), "total": round(time.monotonic() - t0, 3)},
    }
    _write_text(os.path.join(out, "rejected.jsonl"),
                "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejected))
    _write_text(os.path.join(out, "report.json"), json.dumps(report, indent=1, ensure_ascii=False))
    meta = {
        "format": FORMAT, "num_samples": n, "num_shards": num_shards, "shard_size": cfg.shard_size,
        "max_tags": int(lengths.max()), "vocab_size": len(hashtags), "seed": cfg.seed,
        "weighting": cfg.weighting, "validation": validator_note, "plan": plan_fp, "config_fingerprint": config_fp,
    }
    _write_text(os.path.join(out, "dataset.json"), json.dumps(meta, indent=1))  # last: the build is complete
    return report


def _write_text(path: str, text: str) -> None:
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(path + ".tmp", path)
