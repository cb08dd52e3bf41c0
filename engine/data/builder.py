"""The offline dataset builder: metadata + images -> validated, deduplicated,
indexed webdataset shards (format in engine.data.dataset).

Stages, each a list of tasks that an engine runs (engine.data.engines: a local
process pool, or Ray Data on a cluster), each resumable, none holding all rows:

0. read, one task per metadata file, or per byte range of a large plain one
   (`split_bytes`): the metadata (engine.data.metadata) streamed into parts of
   `chunk_size` rows, .build/rows/file-F[-range-R]/part-N.parquet.
1. scan, one task per part (engine.data.scan): hash, validate, repair.
2. plan (engine.data.plan): evaluation-set removal and exact dedup by sha256 as a
   bucketed map/reduce, hashtag counts and the top-K vocabulary as a bucketed
   aggregation, final rows per part, a seeded order (a Feistel permutation of the
   final rows, evaluated per part) and the routing of rows to shards.
3. write, one task per shard (engine.data.write), skipped when already finished
   under the same plan.
4. finalize (driver, streaming): the global index through memory maps, keys.txt,
   rejected.jsonl and report.json merged from their parts, vocab.json,
   dataset.json last.

Same inputs and seed give byte-identical shards, index, vocabulary, report and
rejected list, on either engine, whether the build ran in one go or was killed
and resumed. report.json holds no timings; build() returns them with the report.
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
from engine.data import plan as plan_mod
from engine.data import scan as scan_mod
from engine.data import vocab as vocab_mod
from engine.data import write as write_mod
from engine.data.dataset import FORMAT, shard_name
from engine.data.engines import ENGINES, make_engine, peak_rss_bytes, run_stage, todo
from engine.data.write import BuildError

ROWS_VERSION = 3
# Settings that change where, how visibly or in what pieces a build runs, never what it writes.
RUN_SETTINGS = ("progress", "workers", "start_method", "overwrite", "out", "engine", "address", "plan_buckets",
                "chunk_size", "split_bytes")


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
    workers: int = 0  # processes (local) or CPUs of the local Ray cluster; 0: one per CPU core; 1: no subprocesses
    # Worker processes: auto (spawn, or fork for a script with no __main__ guard), spawn, fork.
    start_method: str = "auto"
    engine: str = "local"  # local: a process pool; ray: Ray Data (engine.data.engines)
    address: Optional[str] = None  # ray: the cluster to join; None starts a local one
    plan_buckets: int = 0  # hash buckets of the dedup and vocabulary aggregations; 0: one per 250k rows
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
    chunk_size: int = 2048  # rows per metadata part: one scan task, one unit of every plan stage
    split_bytes: int = 256 << 20  # a plain jsonl / yfcc100m file is read in byte ranges of this size; 0: whole
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
    if cfg.engine not in ENGINES:
        raise ValueError(f"engine {cfg.engine!r}: expected one of {', '.join(ENGINES)}")
    meta_mod.detect_format(cfg.metadata, cfg.format)
    if cfg.yfcc_tags not in meta_mod.YFCC_TAGS:
        raise ValueError(f"yfcc_tags {cfg.yfcc_tags!r}: expected one of {', '.join(meta_mod.YFCC_TAGS)}")



def _capped_entry(entry: Optional[dict]) -> dict:
    entry = entry or {"count": 0, "keys": [], "truncated": False}
    return {"count": entry["count"], "keys": entry["keys"], "truncated": entry["truncated"]}


def _write_text(path: str, text: str) -> None:
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def _fresh_dir(path: str, fingerprint: str) -> None:
    """Empties `path` unless it was made under the same fingerprint; records it."""
    fp_path = path + ".fingerprint"
    old = open(fp_path).read().strip() if os.path.isfile(fp_path) else None
    if old != fingerprint:
        shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path, exist_ok=True)
    with open(fp_path + ".tmp", "w") as f:
        f.write(fingerprint)
    os.replace(fp_path + ".tmp", fp_path)


def _read_stage(engine, cfg: BuildConfig, synonyms: dict, rows_dir: str) -> dict:
    """Stage 0: every input file's rows as Parquet parts, a task per file. Returns
    {"parts": [path, ...] in metadata order, "part_rows": [...], "rows", "not_images", "read_tasks"}."""
    done = os.path.join(rows_dir, "done.json")
    if os.path.isfile(done):
        with open(done, encoding="utf-8") as f:
            return json.load(f)
    fmt = meta_mod.detect_format(cfg.metadata, cfg.format)
    files = meta_mod.input_files(cfg.metadata, fmt)
    tasks = []
    for i, path in enumerate(files):
        ranges = meta_mod.read_ranges(path, fmt, cfg.split_bytes)
        for r, (start, end) in enumerate(ranges):
            out_dir = os.path.join(rows_dir, "file-%06d" % i + ("-range-%05d" % r if len(ranges) > 1 else ""))
            tasks.append({"file": os.path.abspath(path), "start": start, "end": end,
                          "images": os.path.abspath(cfg.images), "format": fmt,
                          "fields": dataclasses.asdict(cfg.fields()), "synonyms": synonyms, "chunk": cfg.chunk_size,
                          "out_dir": out_dir, "out": os.path.join(out_dir, "done.json")})
    run_stage(engine, meta_mod.write_parts, todo(tasks), "read ", cfg.progress, len(tasks),
              len(tasks) - len(todo(tasks)))
    info: dict = {"parts": [], "part_rows": [], "rows": 0, "not_images": {}, "read_tasks": len(tasks)}
    for t in tasks:
        with open(t["out"], encoding="utf-8") as f:
            file_info = json.load(f)
        for name, n in file_info["parts"]:
            info["parts"].append(os.path.join(t["out_dir"], name))
            info["part_rows"].append(n)
            info["rows"] += n
        for reason, c in file_info["not_images"].items():
            info["not_images"][reason] = info["not_images"].get(reason, 0) + c
    if info["rows"] == 0:
        raise ValueError(f"metadata {cfg.metadata!r} has no rows")
    info["not_images"] = dict(sorted(info["not_images"].items()))
    _write_text(done, json.dumps(info))
    return info


def build(config: Union[BuildConfig, dict]) -> dict:
    """Builds (or resumes building) a dataset; returns the report (also written to
    <out>/report.json) with this run's timings, shard reuse and peak memory. Raises
    on bad inputs, naming them."""
    cfg = config if isinstance(config, BuildConfig) else BuildConfig(**config)
    t0 = time.monotonic()
    _check_config(cfg)
    k = vocab_mod.parse_vocab_size(cfg.vocab_size)
    use_dali, validator_note = _validators(cfg)
    synonyms = vocab_mod.load_synonyms(cfg.synonyms)
    eval_hashes = load_eval_hashes(cfg.eval_set)
    out = os.path.abspath(cfg.out)
    build_dir = os.path.join(out, ".build")
    rows_dir, scan_dir, plan_dir = (os.path.join(build_dir, d) for d in ("rows", "scan", "plan"))
    done_dir = os.path.join(build_dir, "shards")
    shard_dir = os.path.join(out, "shards")
    images = os.path.abspath(cfg.images)

    # Which configuration produced what is already here.
    inputs_fp = _inputs_fingerprint(cfg)
    settings = {name: v for name, v in dataclasses.asdict(cfg).items() if name not in RUN_SETTINGS}
    eval_fp = _fingerprint(sorted(eval_hashes))
    config_fp = _fingerprint({"settings": settings, "metadata": inputs_fp, "images": images, "eval_hashes": eval_fp,
                              "synonyms": synonyms, "hashtag_rule": vocab_mod.RULE})
    # The rows and scan results, by content (what the plan reads), and cut into parts (where they lie).
    content_fp = _fingerprint({"versions": [ROWS_VERSION, scan_mod.SCAN_VERSION], "hashtag_rule": vocab_mod.RULE,
                               "metadata": inputs_fp,
                               "format": cfg.format, "fields": dataclasses.asdict(cfg.fields()), "synonyms": synonyms,
                               "images": images, "limits": dataclasses.asdict(cfg.limits()), "dali": use_dali,
                               "dali_device": cfg.dali_device})
    rows_fp = _fingerprint({"content": content_fp, "chunk": cfg.chunk_size, "split": cfg.split_bytes})
    plan_fp = _fingerprint({"config": config_fp, "content": content_fp})
    meta_path = os.path.join(out, "dataset.json")
    if os.path.isfile(meta_path) and not cfg.overwrite:
        with open(meta_path, encoding="utf-8") as f:
            old = json.load(f).get("config_fingerprint")
        if old != config_fp:
            raise BuildError(
                f"{out} holds a dataset built from other inputs or settings; "
                "pass overwrite=True (--overwrite) to replace it"
            )
    if os.path.isfile(meta_path):
        os.remove(meta_path)  # the directory is not a complete dataset until the end of this build
    os.makedirs(build_dir, exist_ok=True)
    _fresh_dir(rows_dir, rows_fp)
    stages: dict = {}
    with make_engine(cfg.engine, cfg.workers, cfg.start_method, cfg.address) as engine:
        t_read = time.monotonic()
        info = _read_stage(engine, cfg, synonyms, rows_dir)
        t_read = time.monotonic() - t_read
        num_parts, num_rows = len(info["parts"]), info["rows"]
        buckets = cfg.plan_buckets if cfg.plan_buckets > 0 else max(1, -(-num_rows // 250_000))
        _fresh_dir(scan_dir, rows_fp)
        _fresh_dir(plan_dir, _fingerprint({"plan": plan_fp, "buckets": buckets, "parts": num_parts}))
        os.makedirs(done_dir, exist_ok=True)
        os.makedirs(shard_dir, exist_ok=True)
        eval_path = os.path.join(plan_dir, "eval.npy")
        digests = np.frombuffer(b"".join(bytes.fromhex(h) for h in sorted(eval_hashes)), np.uint8).reshape(-1, 32)
        with open(eval_path + ".tmp", "wb") as f:
            np.save(f, digests)
        os.replace(eval_path + ".tmp", eval_path)

        def part(d: str, kind: str, p: int, ext: str = "arrow") -> str:
            return os.path.join(d, "%s-%06d.%s" % (kind, p, ext))

        rows_of = info["parts"]
        scan_of = [part(scan_dir, "part", p, "parquet") for p in range(num_parts)]
        # ---- stage 1: scan
        t = time.monotonic()
        limits = dataclasses.asdict(cfg.limits())
        tasks = todo([{"part": p, "rows": rows_of[p], "out": scan_of[p], "images": images, "limits": limits,
                        "dali": use_dali, "dali_device": cfg.dali_device, "scan_dir": scan_dir}
                       for p in range(num_parts)])
        rejected_so_far: dict[str, int] = {}

        def scan_note(r: dict) -> str:
            for reason, c in r["by_reason"].items():
                rejected_so_far[reason] = rejected_so_far.get(reason, 0) + c
            return "rejected " + (", ".join(f"{k} {v}" for k, v in sorted(rejected_so_far.items())) or "0")

        before = num_rows - sum(info["part_rows"][t_["part"]] for t_ in tasks)
        run_stage(engine, scan_mod.scan_part, tasks, "scan ", cfg.progress, num_rows, before,
                   weight=lambda r: r["rows"], note=scan_note)
        stages["scan"] = time.monotonic() - t

        # ---- stage 2: plan
        t = time.monotonic()
        planned = plan_mod.run_plan(engine, plan_mod.PlanSpec(
            plan_dir=plan_dir, rows=rows_of, scans=scan_of, part_rows=cfg.chunk_size, buckets=buckets,
            eval_path=eval_path, k=k, min_count=cfg.min_count, max_tags=cfg.max_tags_per_image, seed=cfg.seed,
            progress=cfg.progress))
        if planned.n == 0:
            raise BuildError(f"no image survived validation, deduplication and the vocabulary (metadata {cfg.metadata})")
        n, hashtags, merged, final_counts = planned.n, planned.hashtags, planned.report, planned.final_counts
        stages["plan"] = time.monotonic() - t

        # ---- stage 3: write shards
        t = time.monotonic()
        num_shards = (n + cfg.shard_size - 1) // cfg.shard_size
        bins = [part(scan_dir, "part", p, "bin") for p in range(num_parts)]
        todo_shards, reused = [], 0
        for s in range(num_shards):
            done = os.path.join(done_dir, shard_name(s) + ".npz")
            if os.path.isfile(done) and os.path.isfile(os.path.join(shard_dir, shard_name(s) + ".tar")):
                with np.load(done) as z:
                    if z["plan"].tobytes().decode() == plan_fp:
                        reused += 1
                        continue
                os.remove(done)
            todo_shards.append([s, s * cfg.shard_size, min(n, (s + 1) * cfg.shard_size)])
        # Runs of consecutive unfinished shards, at most 64 per task, at least ~4 tasks per worker.
        per_task = max(1, min(64, len(todo_shards) // (4 * max(1, cfg.workers or (os.cpu_count() or 1)))))
        runs: list[list] = []
        for item in todo_shards:
            if runs and len(runs[-1]) < per_task and runs[-1][-1][0] == item[0] - 1:
                runs[-1].append(item)
            else:
                runs.append([item])
        tasks = [{"shards": r, "routes": planned.routes, "bins": bins, "images": images,
                  "counts": planned.counts_path, "weighting": cfg.weighting, "shard_dir": shard_dir,
                  "done_dir": done_dir, "plan": plan_fp} for r in runs]
        run_stage(engine, write_mod.write_shards_task, tasks, "write", cfg.progress, num_shards, reused,
                  weight=lambda r: r["shards"])
        stages["write"] = time.monotonic() - t
        peak = dict(engine.peak_rss)
    for name in os.listdir(shard_dir):  # shards of an older, larger plan
        m = re.fullmatch(r"shard-(\d+)\.(tar|idx)", name)
        if m and int(m.group(1)) >= num_shards:
            os.remove(os.path.join(shard_dir, name))

    # ---- stage 4: finalize
    t = time.monotonic()
    max_tags = write_mod.write_index(out, done_dir, num_shards, n, merged["tags"])
    vocab_mod.write_vocab(os.path.join(out, "vocab.json"), hashtags, final_counts.tolist())
    write_mod.concat_parts(planned.rejected_parts, os.path.join(out, "rejected.jsonl"))
    skipped = merged["skipped"]
    reencoded = merged["reencoded"]
    report = {
        "format": "engine-build-report/2",
        "inputs": {"images": images, "metadata": os.path.abspath(cfg.metadata),
                   "synonyms": cfg.synonyms, "eval_set": cfg.eval_set},
        "config": settings,
        "validation": validator_note,
        "metadata_rows": num_rows,
        "read_tasks": info.get("read_tasks"),  # files, and byte ranges of the plain ones (split_bytes)
        # Metadata rows left out before the scan: YFCC100M videos, and img2dataset rows by their status.
        "not_images": {r: c for r, c in info["not_images"].items() if not r.startswith("status:")},
        "skipped_by_status": {r[len("status:"):]: c for r, c in info["not_images"].items() if r.startswith("status:")},
        "tags_rejected": {r: e["count"] for r, e in sorted(merged["tags_rejected"].items())},
        "valid_as_is": merged["valid_as_is"],
        "reencoded": {r: e["count"] for r, e in sorted(reencoded.items())},
        "skipped": {r: e["count"] for r, e in sorted(skipped.items())},
        "dropped": {"in_eval_set": merged["in_eval_set"].get("all", {"count": 0})["count"],
                    "duplicate": merged["duplicate"].get("all", {"count": 0})["count"],
                    "no_hashtag": merged["no_hashtag"].get("all", {"count": 0})["count"]},
        "written": n,
        "keys": {
            "reencoded": {r: _capped_entry(e) for r, e in sorted(reencoded.items())},
            "skipped": {r: _capped_entry(e) for r, e in sorted(skipped.items())},
            "in_eval_set": _capped_entry(merged["in_eval_set"].get("all")),
            "duplicate": _capped_entry(merged["duplicate"].get("all")),  # [key, key of the copy kept]
            "no_hashtag": _capped_entry(merged["no_hashtag"].get("all")),
            "tags_rejected": {r: _capped_entry(e) for r, e in sorted(merged["tags_rejected"].items())},
        },
        "vocab": {"requested": k, "size": len(hashtags), "distinct_hashtags": planned.distinct,
                  "synonyms": len(synonyms), "weighting": cfg.weighting},
        "eval_set_hashes": len(eval_hashes),
        "shards": {"count": num_shards, "shard_size": cfg.shard_size},
    }
    _write_text(os.path.join(out, "report.json"), json.dumps(report, indent=1, ensure_ascii=False))
    meta = {
        "format": FORMAT, "num_samples": n, "num_shards": num_shards, "shard_size": cfg.shard_size,
        "max_tags": max_tags, "vocab_size": len(hashtags), "seed": cfg.seed,
        "weighting": cfg.weighting, "validation": validator_note, "plan": plan_fp, "config_fingerprint": config_fp,
    }
    _write_text(meta_path, json.dumps(meta, indent=1))  # last: the build is complete
    stages["finalize"] = time.monotonic() - t
    peak["driver"] = peak_rss_bytes()
    run = dict(report)
    run["shards"] = dict(report["shards"], written=len(todo_shards), reused=reused)
    run["seconds"] = {"read": round(t_read, 3), **{k_: round(v, 3) for k_, v in stages.items()},
                      "total": round(time.monotonic() - t0, 3)}
    run["engine"] = cfg.engine
    run["peak_rss_bytes"] = {str(k_): v for k_, v in peak.items()}
    return run
