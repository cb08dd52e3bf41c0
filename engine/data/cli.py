"""`engine data synth|build|inspect|bench`: synthesise a raw set, build shards,
summarise a built dataset, measure loader throughput."""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", required=True, metavar="ACTION")

    p = sub.add_parser("synth", help="write a synthetic raw dataset (JPEGs, captions, bad files)")
    p.add_argument("out", help="output directory")
    p.add_argument("--n-images", type=int, default=200)
    p.add_argument("--vocab-size", type=int, default=50, help="number of distinct synthetic hashtags")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-side", type=int, default=40)
    p.add_argument("--max-side", type=int, default=120)
    p.add_argument("--no-bad-files", action="store_true", help="leave out the zoo of awkward files")
    p.add_argument("--format", choices=("jsonl", "csv"), default="jsonl", help="metadata format")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = sub.add_parser("build", help="validate, deduplicate and shard a raw dataset")
    p.add_argument("--images", required=True, help="image root (metadata paths are relative to it)")
    p.add_argument("--metadata", required=True,
                   help=".jsonl, .csv, .tsv, .parquet, a YFCC100M dataset file, or a directory of webdataset tars")
    p.add_argument("--format", default="auto",
                   choices=("auto", "jsonl", "csv", "tsv", "parquet", "yfcc100m", "webdataset"),
                   help="metadata format (auto: by extension; a directory or .tar is webdataset)")
    p.add_argument("--path-template", help="image path from a row's fields, e.g. '{key}.jpg' or "
                   "'{hash[0:3]}/{hash[3:6]}/{hash}.jpg' (the yfcc100m default)")
    p.add_argument("--yfcc-tags", choices=("user", "machine", "both"), default="user",
                   help="yfcc100m: which tags become hashtags")
    p.add_argument("--path-field", default="path", help="metadata column of the image path")
    p.add_argument("--caption-field", default="caption", help="metadata column of the caption")
    p.add_argument("--tags-field", default="tags", help="metadata column of the hashtag list")
    p.add_argument("--key-field", default="key", help="metadata column of the sample key (default: the path)")
    p.add_argument("--out", required=True, help="output dataset directory")
    p.add_argument("--vocab-size", default="1.5k", help="K, or a preset: 1.5k, 8.5k, 17k")
    p.add_argument("--synonyms", help="JSON {hashtag: canonical} or a 2-column CSV/TSV")
    p.add_argument("--eval-set", help="directory of evaluation images, or a file of sha256 digests")
    p.add_argument("--shard-size", type=int, default=5000, help="samples per shard")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=0, help="processes, or CPUs of a local Ray cluster (0: one per core)")
    p.add_argument("--engine", choices=("local", "ray"), default="local",
                   help="local: a process pool on this machine; ray: Ray Data (a local cluster unless --address)")
    p.add_argument("--address", help="--engine ray: the Ray cluster to join, e.g. auto or ray://head:10001")
    p.add_argument("--chunk-size", type=int, default=2048, help="metadata rows per part (one scan task)")
    p.add_argument("--split-bytes", type=int, default=256 << 20,
                   help="a plain JSONL or YFCC100M file is read in byte ranges of this size, in parallel "
                        "(default 256 MiB; 0: one task per file)")
    p.add_argument("--plan-buckets", type=int, default=0,
                   help="hash buckets of the dedup and vocabulary aggregations (0: one per 250k rows)")
    p.add_argument("--min-count", type=int, default=1)
    p.add_argument("--max-tags-per-image", type=int, default=32)
    p.add_argument("--weighting", choices=("sum", "mean", "max"), default="sum")
    p.add_argument("--validate-with", default="auto", help="auto, torchvision, dali or torchvision,dali")
    p.add_argument("--dali-device", choices=("cpu", "mixed"), default="cpu")
    p.add_argument("--max-bytes", type=int, default=32 << 20)
    p.add_argument("--max-pixels", type=int, default=50_000_000)
    p.add_argument("--min-side", type=int, default=8)
    p.add_argument("--keep-progressive", action="store_true", help="do not re-encode progressive JPEGs")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality of re-encoded images")
    p.add_argument("--overwrite", action="store_true", help="replace a dataset built with other settings")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = sub.add_parser("inspect", help="summarise a built dataset")
    p.add_argument("dataset")
    p.add_argument("--top", type=int, default=10, help="most frequent hashtags to list")

    p = sub.add_parser("bench", help="pipeline-only throughput (img/s) of the loaders on a built dataset")
    p.add_argument("dataset")
    p.add_argument("--backend", default="all", help="dali, torch, or all")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batches", type=int, default=20, help="timed batches per loader (after 2 warm-up)")
    p.add_argument("--threads", type=int, default=None, help="DALI threads / PyTorch workers (default: all cores)")
    p.add_argument("--no-resample", action="store_true")
    p.add_argument("--json", help="also write the results to this file")


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"engine data {args.data_command}: error: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.data_command == "synth":
        from engine.data.synthetic import synth

        info = synth(args.out, n_images=args.n_images, vocab_size=args.vocab_size, seed=args.seed,
                     min_side=args.min_side, max_side=args.max_side, bad_files=not args.no_bad_files,
                     metadata_format=args.format, progress=not args.quiet)
        print(json.dumps(info, indent=1))
        return 0
    if args.data_command == "build":
        from engine.data.builder import BuildConfig, build

        validate = args.validate_with if args.validate_with == "auto" else tuple(args.validate_with.split(","))
        vocab_size = int(args.vocab_size) if args.vocab_size.isdigit() else args.vocab_size
        report = build(BuildConfig(
            images=args.images, metadata=args.metadata, out=args.out, vocab_size=vocab_size,
            synonyms=args.synonyms, eval_set=args.eval_set, shard_size=args.shard_size, seed=args.seed,
            workers=args.workers, min_count=args.min_count, max_tags_per_image=args.max_tags_per_image,
            weighting=args.weighting, validate_with=validate, dali_device=args.dali_device,
            max_bytes=args.max_bytes, max_pixels=args.max_pixels, min_side=args.min_side,
            reencode_progressive=not args.keep_progressive, quality=args.quality, overwrite=args.overwrite,
            progress=not args.quiet, format=args.format, path_template=args.path_template,
            yfcc_tags=args.yfcc_tags, path_field=args.path_field, caption_field=args.caption_field,
            tags_field=args.tags_field, key_field=args.key_field, engine=args.engine, address=args.address,
            chunk_size=args.chunk_size, plan_buckets=args.plan_buckets, split_bytes=args.split_bytes,
        ))
        summary = {k: report[k] for k in ("metadata_rows", "valid_as_is", "reencoded", "skipped", "dropped",
                                           "written", "vocab", "shards", "seconds", "engine", "peak_rss_bytes", "read_tasks")}
        print(json.dumps(summary, indent=1, ensure_ascii=False))
        print(f"report: {args.out}/report.json; every rejected image: {args.out}/rejected.jsonl", file=sys.stderr)
        return 0
    if args.data_command == "inspect":
        from engine.data.dataset import HashtagDataset

        ds = HashtagDataset(args.dataset)
        top = [{"id": i, "hashtag": ds.hashtags[i], "count": int(ds.counts[i])}
               for i in range(min(args.top, ds.vocab_size))]
        print(json.dumps({"meta": ds.meta, "top_hashtags": top}, indent=1, ensure_ascii=False))
        return 0
    if args.data_command == "bench":
        from engine.data.bench import measure_loaders

        results = measure_loaders(args.dataset, backends=args.backend, device=args.device,
                                  batch_size=args.batch_size, size=args.size, batches=args.batches,
                                  threads=args.threads, resample=not args.no_resample)
        text = json.dumps(results, indent=1)
        print(text)
        if args.json:
            with open(args.json, "w") as f:
                f.write(text + "\n")
        return 0
    raise AssertionError(args.data_command)
