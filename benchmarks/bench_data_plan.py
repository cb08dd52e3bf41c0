"""Dataset-build planning at scale, no image decoding: a synthetic scan table of
--rows metadata rows (default 10M) goes through every plan stage of the builder
(engine.data.plan.run_plan: evaluation-set removal, exact dedup by sha256,
hashtag counts, top-K vocabulary, final rows, seeded order, routing to shards) on
each engine. Each engine runs in its own process, so that its driver's peak
memory is its own; the workers report theirs per task.

Synthetic table: parts of --part-rows rows; 1-5 hashtags per row drawn from a
Zipf law over --distinct-tags tags; sha256 digests from a hash of the row id, 2%
of rows copying an earlier row's digest (duplicates); 0.5% skipped and 0.5%
re-encoded rows; 1000 rows' digests form the evaluation set.

Reported per engine: seconds, rows/s and rows/s per core, peak resident memory
of the driver and of every worker process, and the bytes the plan moves between
stages (its intermediate files: the shuffle), per row, with the arithmetic for
100M and 3.5B rows.

  python -m benchmarks.bench_data_plan --out benchmarks/results/data_plan_cpu_2core_epyc.json
  python -m benchmarks.bench_data_plan --smoke          # 60k rows, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCALES = {"yfcc100m": 100_000_000, "instagram_3.5b": 3_500_000_000}


def _digests(ids: np.ndarray) -> np.ndarray:
    """uint8 [n, 32]: a fixed function of the row id (distinct ids, distinct digests)."""
    from engine.data.sampling import _mix64

    words = np.stack([_mix64(ids.astype(np.uint64) * np.uint64(4) + np.uint64(j)) for j in range(4)], axis=1)
    return words.astype(">u8").view(np.uint8).reshape(len(ids), 32)


def synthesise(work: str, rows: int, part_rows: int, distinct_tags: int, seed: int = 0) -> dict:
    """rows/part-N.parquet and scan/part-N.parquet as the builder's stages 0-1 would
    write them, one part in memory at a time; reused when present."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from engine.data.builder import ROWS_VERSION  # the columns of a rows part

    done = os.path.join(work, "synthetic.json")
    if os.path.isfile(done):
        with open(done) as f:
            info = json.load(f)
        if (info["rows"] == rows and info["part_rows"] == part_rows and info["distinct_tags"] == distinct_tags
                and info.get("rows_version") == ROWS_VERSION):
            return info
    shutil.rmtree(work, ignore_errors=True)
    for d in ("rows", "scan", "plan"):
        os.makedirs(os.path.join(work, d))
    rng = np.random.default_rng(seed)
    tag_names = np.array(["t%07d" % i for i in range(distinct_tags)], dtype=object)
    parts = -(-rows // part_rows)
    t0 = time.perf_counter()
    for p in range(parts):
        lo, hi = p * part_rows, min(rows, (p + 1) * part_rows)
        n = hi - lo
        ids = np.arange(lo, hi, dtype=np.int64)
        source = ids.copy()
        dup = rng.random(n) < 0.02
        if lo > 0 or n > 1:
            source[dup] = (rng.random(int(dup.sum())) * np.maximum(ids[dup], 1)).astype(np.int64)
        ntags = rng.integers(1, 6, n)
        offsets = np.concatenate([[0], np.cumsum(ntags)]).astype(np.int32)
        tag_ids = np.minimum(rng.zipf(1.3, int(offsets[-1])) - 1, distinct_tags - 1)
        tags = pa.ListArray.from_arrays(pa.array(offsets), pa.array(tag_names[tag_ids].tolist(), pa.string()))
        keys = np.char.mod("k%010d", ids).tolist()
        pq.write_table(pa.table({"key": keys, "path": np.char.mod("img/%010d.jpg", ids).tolist(),
                                 "offset": np.full(n, -1, np.int64), "size": np.full(n, -1, np.int64), "tags": tags,
                                 "bad_tags": pa.array([[]] * n, pa.list_(pa.list_(pa.string())))}),
                       os.path.join(work, "rows", "part-%06d.parquet" % p))
        u = rng.random(n)
        action = np.where(u < 0.005, "skipped", np.where(u < 0.01, "reencoded", "ok")).astype(object)
        sha = _digests(source)
        sha_bytes = [bytes(s) if a != "skipped" else b"" for s, a in zip(sha, action)]
        reencoded = action == "reencoded"
        pq.write_table(pa.table({
            "action": action.tolist(), "reason": np.where(action == "skipped", "corrupt",
                                                           np.where(reencoded, "progressive", "")).tolist(),
            "detail": [""] * n, "sha256": pa.array(sha_bytes, pa.binary()),
            "height": np.full(n, 375, np.int32), "width": np.full(n, 500, np.int32),
            "blob_offset": np.where(reencoded, 0, -1).astype(np.int64),
            "blob_size": np.where(reencoded, 1, -1).astype(np.int64),
            "out_sha256": pa.array([bytes(32) if r else b"" for r in reencoded], pa.binary()),
        }), os.path.join(work, "scan", "part-%06d.parquet" % p))
    eval_ids = np.sort(rng.choice(rows, size=min(1000, rows), replace=False))
    digests = _digests(eval_ids)
    order = np.lexsort(digests.T[::-1])
    np.save(os.path.join(work, "eval.npy"), np.ascontiguousarray(digests[order]))
    info = {"rows": rows, "part_rows": part_rows, "parts": parts, "distinct_tags": distinct_tags,
            "rows_version": ROWS_VERSION,
            "seconds": round(time.perf_counter() - t0, 1)}
    with open(done, "w") as f:
        json.dump(info, f)
    return info


def run_one(work: str, engine_name: str, workers: int, k: int, buckets: int) -> dict:
    """One engine's plan (called in a fresh process by main)."""
    from engine.data.engines import make_engine, peak_rss_bytes
    from engine.data.plan import PlanSpec, run_plan

    with open(os.path.join(work, "synthetic.json")) as f:
        info = json.load(f)
    plan_dir = os.path.join(work, "plan", engine_name)
    shutil.rmtree(plan_dir, ignore_errors=True)
    os.makedirs(plan_dir)
    parts = range(info["parts"])
    spec = PlanSpec(plan_dir=plan_dir, rows=[os.path.join(work, "rows", "part-%06d.parquet" % p) for p in parts],
                    scans=[os.path.join(work, "scan", "part-%06d.parquet" % p) for p in parts],
                    part_rows=info["part_rows"], buckets=buckets, eval_path=os.path.join(work, "eval.npy"), k=k,
                    progress=True)
    with make_engine(engine_name, workers) as engine:
        t0 = time.perf_counter()
        result = run_plan(engine, spec)
        seconds = time.perf_counter() - t0
        workers_rss = sorted(engine.peak_rss.values(), reverse=True)
    shuffle = {}
    for name in os.listdir(plan_dir):
        kind = name.split("-")[0].split(".")[0]
        shuffle[kind] = shuffle.get(kind, 0) + os.path.getsize(os.path.join(plan_dir, name))
    rows = info["rows"]
    cores = workers if workers > 0 else os.cpu_count()
    return {
        "engine": engine_name, "workers": cores, "rows": rows, "parts": info["parts"], "buckets": buckets,
        "final_samples": result.n, "vocab": len(result.hashtags), "distinct_hashtags": result.distinct,
        "dropped": {name: result.report[name].get("all", {"count": 0})["count"]
                    for name in ("duplicate", "in_eval_set", "no_hashtag")},
        "seconds": round(seconds, 2), "rows_per_s": round(rows / seconds), "rows_per_s_per_core": round(rows / seconds / cores),
        "peak_rss_mib": {"driver": round(peak_rss_bytes() / 2**20, 1),
                         "workers": [round(b / 2**20, 1) for b in workers_rss]},
        "intermediate_bytes": shuffle, "intermediate_bytes_per_row": round(sum(shuffle.values()) / rows, 1),
    }


def scale_arithmetic(r: dict, part_rows: int) -> dict:
    """What the measured rates and sizes mean for bigger sets on a cluster."""
    out = {}
    for name, rows in SCALES.items():
        core_s = rows / r["rows_per_s_per_core"]
        out[name] = {
            "rows": rows, "core_hours": round(core_s / 3600, 1),
            "hours_on_256_cores": round(core_s / 256 / 3600, 2),
            "intermediate_GB": round(rows * r["intermediate_bytes_per_row"] / 1e9, 1),
            "parts": -(-rows // part_rows), "buckets_at_250k_rows_each": -(-rows // 250_000),
            # A task holds one part (rows) or one bucket (rows / buckets) whatever the total:
            # the worker peaks measured here hold for any size; the driver holds per-part and
            # per-bucket counters and the K-tag vocabulary (B x K candidates when merging).
            "worker_peak_mib_measured": max(r["peak_rss_mib"]["workers"] or [0]),
        }
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--part-rows", type=int, default=250_000)
    ap.add_argument("--distinct-tags", type=int, default=200_000)
    ap.add_argument("--vocab", type=int, default=17_000)
    ap.add_argument("--buckets", type=int, default=0, help="0: one per 250k rows")
    ap.add_argument("--engines", default="local,ray")
    ap.add_argument("--workers", type=int, default=0, help="0: one per core")
    ap.add_argument("--work", default="/tmp/engine_bench_data_plan")
    ap.add_argument("--out", help="JSON results")
    ap.add_argument("--smoke", action="store_true", help="60k rows in parts of 10k")
    ap.add_argument("--run-engine", help=argparse.SUPPRESS)  # internal: one engine in this process
    args = ap.parse_args(argv)
    if args.smoke:
        args.rows, args.part_rows, args.distinct_tags, args.vocab = 60_000, 10_000, 5_000, 1500
    buckets = args.buckets if args.buckets > 0 else max(1, -(-args.rows // 250_000))
    if args.run_engine:
        print(json.dumps(run_one(args.work, args.run_engine, args.workers, args.vocab, buckets)))
        return 0
    t0 = time.perf_counter()
    info = synthesise(args.work, args.rows, args.part_rows, args.distinct_tags)
    print(f"synthetic scan table: {info['rows']} rows in {info['parts']} parts ({time.perf_counter() - t0:.1f}s)",
          file=sys.stderr)
    payload = {"benchmark": "data_plan", "machine": {"cpu": platform.processor() or platform.machine(),
                                                     "cores": os.cpu_count(), "platform": platform.platform()},
               "synthetic": info, "runs": []}
    try:
        import subprocess as sp

        payload["machine"]["cpu"] = next((line.split(":", 1)[1].strip() for line in sp.run(
            ["lscpu"], capture_output=True, text=True).stdout.splitlines() if line.startswith("Model name")),
            payload["machine"]["cpu"])
    except OSError:
        pass
    for name in args.engines.split(","):
        cmd = [sys.executable, "-m", "benchmarks.bench_data_plan", "--run-engine", name, "--work", args.work,
               "--workers", str(args.workers), "--vocab", str(args.vocab), "--buckets", str(buckets)]
        r = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=REPO))
        if r.returncode != 0:
            raise SystemExit(f"bench_data_plan: engine {name} failed (exit {r.returncode})")
        run = json.loads(r.stdout.strip().splitlines()[-1])
        run["scale"] = scale_arithmetic(run, args.part_rows)
        payload["runs"].append(run)
        print(json.dumps(run, indent=1))
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out + ".tmp", "w") as f:
                json.dump(payload, f, indent=1)
            os.replace(args.out + ".tmp", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
