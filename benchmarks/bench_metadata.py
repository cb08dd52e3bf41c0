"""Reading metadata, the builder's stage 0, on a synthetic YFCC100M-format file: the
same code path as `engine data build --format yfcc100m` (engine.data.builder's read
stage: parse, URL-decode and normalise the tags, write Parquet parts), without the
image scan.

The file: --rows lines (default 2M) of the 25-field layout, user tags URL-encoded
in several scripts (composed and decomposed forms, ~1% Latin-1 escapes), machine
tags on half the rows, 1% videos; written plain and as .bz2 (the file as
distributed). Each case runs in its own process, so its peak memory is its own:

- plain, one task (split_bytes=0), 1 worker: the single-task rate;
- plain, byte ranges, 1 and --workers workers: the parallel read and its speed-up;
- bz2 (one task: a single bz2 stream decodes from its start only; engine.data.lines);
- the same on Ray (--engines local,ray).

Reported: seconds, rows/s, rows/s per core (rows/s / workers), read tasks, peak
resident memory of the driver and the largest worker, and the extrapolation to
YFCC100M's 100M rows.

  python -m benchmarks.bench_metadata --out benchmarks/results/metadata_read_cpu_2core.json
  python -m benchmarks.bench_metadata --rows 20000 --engines local   # seconds
"""

from __future__ import annotations

import argparse
import bz2
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from urllib.parse import quote_plus

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
YFCC_ROWS = 100_000_000
WORDS = ["beach", "sunset", "new york", "café", "cafe\u0301", "straße", "हिन्दी", "தமிழ்", "ภาษาไทย", "বাংলা",
         "العربية", "東京", "한국어", "crème brûlée", "dog", "cat", "wedding", "2012", "canon", "nikon"]


def synthesise(path: str, rows: int, seed: int = 0) -> None:
    """Plain and .bz2 files of `rows` YFCC100M lines; reused when present."""
    if os.path.isfile(path + ".bz2") and os.path.isfile(path + ".rows") and open(path + ".rows").read() == str(rows):
        return
    rng = np.random.default_rng(seed)
    encoded = [quote_plus(w) for w in WORDS]
    block = 50_000
    with open(path, "wb") as plain, bz2.open(path + ".bz2", "wb", compresslevel=9) as packed:
        for lo in range(0, rows, block):
            n = min(block, rows - lo)
            picks = rng.zipf(1.5, (n, 6)) % len(WORDS)
            ntags = rng.integers(0, 7, n)
            lines = []
            for j in range(n):
                i = lo + j
                user = ",".join(encoded[k] for k in picks[j, : ntags[j]])
                if i % 97 == 0:
                    user += ",%E9t%E9"  # Latin-1 escapes: rejected with a reason
                h = "%032x" % (i * 2654435761 % (1 << 128))
                machine = "vision%3Aoutdoor%3D099,vision%3Asky%3D087" if i % 2 else ""
                cells = [str(i), str(10_000_000 + i), h, "12345678@N00", "some+one", "2012-02-16 09:56:37.0",
                         "1331840483", "Canon+EOS+5D", "a+title+%d" % i, "a+longer+description+of+the+photo+%d" % i,
                         user, machine, "-0.1", "51.5", "16", f"http://www.flickr.com/photos/x/{10_000_000 + i}/",
                         f"http://farm8.staticflickr.com/7205/{10_000_000 + i}_abc.jpg", "Attribution License",
                         "http://creativecommons.org/licenses/by/2.0/", "7205", "8", "abc", "def", "jpg",
                         "1" if i % 100 == 7 else "0"]
                lines.append("\t".join(cells))
            data = ("\n".join(lines) + "\n").encode()
            plain.write(data)
            packed.write(data)
    with open(path + ".rows", "w") as f:
        f.write(str(rows))


def _child(args) -> None:
    """One case: the builder's read stage on a fresh output directory."""
    from engine.data import builder
    from engine.data.engines import make_engine, peak_rss_bytes

    os.makedirs(args.child_work, exist_ok=True)
    cfg = builder.BuildConfig(images=args.child_work, metadata=args.child_file, out=args.child_work,
                              format="yfcc100m", yfcc_tags="both", workers=args.child_workers, progress=False,
                              engine=args.child_engine, split_bytes=args.child_split)
    rows_dir = os.path.join(args.child_work, "rows")
    t0 = time.perf_counter()
    with make_engine(cfg.engine, cfg.workers) as engine:
        info = builder._read_stage(engine, cfg, {}, rows_dir)
        workers = dict(engine.peak_rss)
    seconds = time.perf_counter() - t0
    tasks = len({os.path.dirname(p) for p in info["parts"]})
    print(json.dumps({"seconds": round(seconds, 2), "rows": info["rows"], "not_images": info["not_images"],
                      "tasks": tasks, "driver_peak_rss_mb": round(peak_rss_bytes() / 2**20),
                      "worker_peak_rss_mb": round(max(workers.values(), default=0) / 2**20)}))


def run_case(work: str, file: str, engine: str, workers: int, split: int) -> dict:
    case_dir = os.path.join(work, "case")
    shutil.rmtree(case_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "benchmarks.bench_metadata", "--child-file", file, "--child-work", case_dir,
           "--child-engine", engine, "--child-workers", str(workers), "--child-split", str(split)]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    shutil.rmtree(case_dir, ignore_errors=True)
    rate = r["rows"] / r["seconds"]
    r.update(engine=engine, workers=workers, split_bytes=split, compressed=file.endswith(".bz2"),
             rows_per_s=round(rate), rows_per_s_per_core=round(rate / workers),
             yfcc100m_hours=round(YFCC_ROWS / rate / 3600, 2))
    return r


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=2_000_000)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--engines", default="local", help="comma-separated: local,ray")
    p.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "bench_metadata"))
    p.add_argument("--out", default=None)
    p.add_argument("--child-file", help=argparse.SUPPRESS)
    p.add_argument("--child-work", help=argparse.SUPPRESS)
    p.add_argument("--child-engine", help=argparse.SUPPRESS)
    p.add_argument("--child-workers", type=int, help=argparse.SUPPRESS)
    p.add_argument("--child-split", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child_file:
        _child(args)
        return
    os.makedirs(args.work, exist_ok=True)
    path = os.path.join(args.work, "yfcc100m_dataset")
    t = time.perf_counter()
    synthesise(path, args.rows)
    size, packed = os.path.getsize(path), os.path.getsize(path + ".bz2")
    print(f"synthetic file: {args.rows} rows, {size / 2**20:.0f} MiB plain, {packed / 2**20:.0f} MiB bz2 "
          f"({time.perf_counter() - t:.0f} s)", flush=True)
    load_before = os.getloadavg()
    split = -(-size // (2 * args.workers))  # two ranges per worker
    cases = []
    for engine in args.engines.split(","):
        plan = [(path, 1, 0), (path, 1, split), (path, args.workers, split), (path + ".bz2", 1, 0)]
        if engine == "ray":
            plan = [(path, args.workers, split), (path + ".bz2", 1, 0)]
        for file, workers, split_bytes in plan:
            r = run_case(args.work, file, engine, workers, split_bytes)
            print(json.dumps(r), flush=True)
            cases.append(r)
    by = {(c["engine"], c["workers"], c["split_bytes"] > 0, c["compressed"]): c for c in cases}
    single = by.get(("local", 1, False, False))
    one = by.get(("local", 1, True, False))
    many = by.get(("local", args.workers, True, False))
    result = {
        "benchmark": "metadata_read_yfcc100m_format",
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "python": platform.python_version(),
                    # Other jobs on the machine slow the parallel cases most: the load says how idle it was.
                    "load_average_before": [round(x, 2) for x in load_before],
                    "load_average_after": [round(x, 2) for x in os.getloadavg()]},
        "file": {"rows": args.rows, "plain_bytes": size, "bz2_bytes": packed,
                 "bytes_per_row": round(size / args.rows, 1)},
        "cases": cases,
        "speedup_plain_ranges": (round(one["seconds"] / many["seconds"], 2) if one and many else None),
        "speedup_vs_one_task": (round(single["seconds"] / many["seconds"], 2) if single and many else None),
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
