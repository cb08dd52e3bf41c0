"""Build stage 2, plan, as tasks over parts and hash buckets: no process ever holds
all rows. Each task reads files and writes files (Arrow IPC, memory-mapped when
read), so any engine (engine.data.engines) can run it anywhere.

    rows/part-N.parquet     metadata, `part_rows` rows each (key, path, offset, size, tags)
    scan/part-N.parquet     scan results, one row per metadata row (engine.data.scan)
    plan/spill-N.arrow      dedup map side: the part's candidates (valid, not in the
                            evaluation set) as one record batch per sha256 bucket
    plan/dedup-B.arrow      dedup reduce: the bucket's dropped copies (row, key kept),
                            sorted by row; the first row in metadata order is kept
    plan/status-N.arrow     per row: kept / skipped / in_eval / duplicate (+ key kept)
    plan/counts-N.arrow     hashtag counts of the part's kept rows, a batch per tag bucket
    (vocabulary)            per tag bucket: total counts, top K; the driver merges B x K
    plan/assign-N.arrow     the part's final rows and their hashtag ids; the part's
                            rejected.jsonl lines, report counts and per-tag counts
    plan/route-N.arrow      the part's final rows with their position in the seeded
                            order (a Feistel permutation of [0, n): random access,
                            O(1) memory), sorted by position; a shard's writer slices
                            every part's file by position range

Global row id = part * part_rows + row in the part: metadata order.
"""

from __future__ import annotations

import json
import os
import zlib
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from engine.data import vocab as vocab_mod
from engine.data.engines import run_stage, stream_stage, todo

KEPT, SKIPPED, IN_EVAL, DUPLICATE = 0, 1, 2, 3
REPORT_MAX_KEYS = 10000


def _write_ipc(path: str, batches: list, schema) -> None:
    import pyarrow as pa

    with pa.OSFile(path + ".tmp", "wb") as sink:
        with pa.ipc.new_file(sink, schema) as writer:
            for b in batches:
                writer.write_batch(b)
    os.replace(path + ".tmp", path)


def _open_ipc(path: str):
    import pyarrow as pa

    return pa.ipc.open_file(pa.memory_map(path, "r"))


def _sha_matrix(column) -> np.ndarray:
    """uint8 [n, 32] view of a binary column of 32-byte digests."""
    import pyarrow as pa

    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    arr = arr.cast(pa.binary(32)) if arr.type != pa.binary(32) else arr
    n = len(arr)
    if n == 0:
        return np.zeros((0, 32), np.uint8)
    return np.frombuffer(arr.buffers()[1], dtype=np.uint8, count=32 * n, offset=32 * arr.offset).reshape(n, 32)


def _sha_bucket(sha: np.ndarray, buckets: int) -> np.ndarray:
    return (sha[:, :4].copy().view(">u4").ravel().astype(np.int64) % buckets) if len(sha) else np.zeros(0, np.int64)


def load_eval_set(path: str) -> np.ndarray:
    """Sorted uint8 [n, 32] digests from plan/eval.npy (written by the driver)."""
    return np.load(path) if os.path.isfile(path) else np.zeros((0, 32), np.uint8)


def _in_sorted(sha: np.ndarray, table: np.ndarray) -> np.ndarray:
    if len(table) == 0 or len(sha) == 0:
        return np.zeros(len(sha), bool)
    keys = np.ascontiguousarray(table).view("V32").ravel()
    q = np.ascontiguousarray(sha).view("V32").ravel()
    at = np.minimum(np.searchsorted(keys, q), len(keys) - 1)
    return keys[at] == q


# ---------------------------------------------------------------- dedup


def spill_part(task: dict) -> dict:
    """Dedup map side: candidates of one part, one record batch per sha256 bucket."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    scan = pq.read_table(task["scan"], columns=["action", "sha256"])
    keys = pq.read_table(task["rows"], columns=["key"]).column("key").combine_chunks()
    valid = np.asarray(scan.column("action").to_numpy(zero_copy_only=False) != "skipped")
    sha = np.zeros((len(valid), 32), np.uint8)
    if valid.any():
        sha[valid] = _sha_matrix(pa.chunked_array(scan.column("sha256")).filter(pa.array(valid)))
    in_eval = valid & _in_sorted(sha, load_eval_set(task["eval"]))
    cand = np.flatnonzero(valid & ~in_eval)
    bucket = _sha_bucket(sha[cand], task["buckets"])
    order = np.argsort(bucket, kind="stable")
    cand, bucket = cand[order], bucket[order]
    bounds = np.searchsorted(bucket, np.arange(task["buckets"] + 1))
    schema = pa.schema([("sha256", pa.binary(32)), ("row", pa.int64()), ("key", pa.string())])
    batches = []
    base = task["part"] * task["part_rows"]
    for b in range(task["buckets"]):
        idx = cand[bounds[b] : bounds[b + 1]]
        digests = pa.FixedSizeBinaryArray.from_buffers(pa.binary(32), len(idx),
                                                       [None, pa.py_buffer(np.ascontiguousarray(sha[idx]).tobytes())])
        batches.append(pa.record_batch([digests, pa.array(base + idx, pa.int64()), keys.take(pa.array(idx))],
                                       schema=schema))
    _write_ipc(task["out"], batches, schema)
    return {"part": task["part"], "candidates": int(len(cand)), "in_eval": int(in_eval.sum())}


def dedup_bucket(task: dict) -> dict:
    """Dedup reduce: within one sha256 bucket, every copy after the first (metadata
    order) is dropped; the output names the key of the copy kept."""
    import pyarrow as pa

    tables = [pa.Table.from_batches([_open_ipc(p).get_batch(task["bucket"])]) for p in task["spills"]]
    t = pa.concat_tables(tables) if tables else None
    n = 0 if t is None else t.num_rows
    schema = pa.schema([("row", pa.int64()), ("kept_key", pa.string())])
    if n == 0:
        _write_ipc(task["out"], [pa.record_batch([pa.array([], pa.int64()), pa.array([], pa.string())],
                                                 schema=schema)], schema)
        return {"bucket": task["bucket"], "rows": 0, "dropped": 0}
    sha = _sha_matrix(t.column("sha256"))
    rows = t.column("row").to_numpy()
    words = sha.view(">u8")  # [n, 4] big-endian words: lexicographic order of the digests
    order = np.lexsort((rows, words[:, 3], words[:, 2], words[:, 1], words[:, 0]))
    w = words[order]
    first = np.ones(n, bool)
    first[1:] = (w[1:] != w[:-1]).any(axis=1)
    group_first = np.maximum.accumulate(np.where(first, np.arange(n), 0))
    dropped = order[~first]
    kept_of = order[group_first[~first]]
    keys = t.column("key").to_numpy(zero_copy_only=False)
    by_row = np.argsort(rows[dropped], kind="stable")
    batch = pa.record_batch([pa.array(rows[dropped][by_row], pa.int64()),
                             pa.array(keys[kept_of][by_row].tolist(), pa.string())], schema=schema)
    _write_ipc(task["out"], [batch], schema)
    return {"bucket": task["bucket"], "rows": int(n), "dropped": int(len(dropped))}


def _part_status(task: dict, valid: np.ndarray, in_eval: np.ndarray):
    """(status int8 per row, key kept per duplicate row) of one part."""
    n = len(valid)
    status = np.where(valid, KEPT, SKIPPED).astype(np.int8)
    status[in_eval] = IN_EVAL
    kept_key = np.empty(n, dtype=object)
    lo = task["part"] * task["part_rows"]
    for path in task["dedups"]:
        t = _open_ipc(path).get_batch(0)
        rows = t.column(0).to_numpy()
        a, b = np.searchsorted(rows, [lo, lo + n])
        if b > a:
            local = rows[a:b] - lo
            status[local] = DUPLICATE
            kept_key[local] = t.column(1).slice(a, b - a).to_pylist()
    return status, kept_key


# ---------------------------------------------------------------- vocabulary


def _tag_bucket(tag: str, buckets: int) -> int:
    return zlib.crc32(tag.encode("utf-8")) % buckets


def count_part(task: dict) -> dict:
    """Statuses of one part's rows, and hashtag counts of its kept rows by tag bucket."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    scan = pq.read_table(task["scan"], columns=["action", "sha256"])
    valid = np.asarray(scan.column("action").to_numpy(zero_copy_only=False) != "skipped")
    sha = np.zeros((len(valid), 32), np.uint8)
    if valid.any():
        sha[valid] = _sha_matrix(pa.chunked_array(scan.column("sha256")).filter(pa.array(valid)))
    in_eval = valid & _in_sorted(sha, load_eval_set(task["eval"]))
    status, kept_key = _part_status(task, valid, in_eval)
    schema = pa.schema([("status", pa.int8()), ("kept_key", pa.string())])
    _write_ipc(task["status"], [pa.record_batch([pa.array(status), pa.array(kept_key.tolist(), pa.string())],
                                                schema=schema)], schema)
    tags = pq.read_table(task["rows"], columns=["tags"]).column("tags").to_pylist()
    counts = Counter(t for i in np.flatnonzero(status == KEPT) for t in tags[i])
    per_bucket: list[list] = [[] for _ in range(task["buckets"])]
    for tag, c in counts.items():
        per_bucket[_tag_bucket(tag, task["buckets"])].append((tag, c))
    cschema = pa.schema([("tag", pa.string()), ("count", pa.int64())])
    batches = []
    for items in per_bucket:
        items.sort()
        batches.append(pa.record_batch([pa.array([t for t, _ in items], pa.string()),
                                        pa.array([c for _, c in items], pa.int64())], schema=cschema))
    _write_ipc(task["out"], batches, cschema)
    return {"part": task["part"], "kept": int((status == KEPT).sum())}


def vocab_bucket(task: dict) -> dict:
    """Total counts of one tag bucket across parts; its top K (count desc, tag asc)."""
    total: Counter = Counter()
    for path in task["counts"]:
        b = _open_ipc(path).get_batch(task["bucket"])
        total.update(dict(zip(b.column(0).to_pylist(), b.column(1).to_pylist())))
    ranked = sorted((kv for kv in total.items() if kv[1] >= task["min_count"]), key=lambda kv: (-kv[1], kv[0]))
    return {"bucket": task["bucket"], "distinct": len(total), "top": ranked[: task["k"]]}


def merge_vocab(results, k: int) -> tuple[list[str], list[int], int]:
    """(hashtags, counts, distinct) from every bucket's top K, folded as they arrive:
    K candidates held, not buckets x K (a tag lives in one bucket, so the order is total
    and the arrival order does not matter)."""
    ranked: list = []
    distinct = 0
    for r in results:
        distinct += r["distinct"]
        ranked = sorted(ranked + r["top"], key=lambda kv: (-kv[1], kv[0]))[:k]
    return [t for t, _ in ranked], [c for _, c in ranked], distinct


# ---------------------------------------------------------------- final rows


def _capped_add(store: dict, name: str, item) -> None:
    entry = store.setdefault(name, {"count": 0, "keys": []})
    entry["count"] += 1
    if len(entry["keys"]) < REPORT_MAX_KEYS:
        entry["keys"].append(item)


def assign_part(task: dict) -> dict:
    """The part's final rows (a kept row with at least one vocabulary hashtag) with
    their hashtag ids; its lines of rejected.jsonl and its report counts."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    import pyarrow.compute as pc

    with open(task["vocab"], encoding="utf-8") as f:
        hashtags = json.load(f)["hashtags"]
    rows = pq.read_table(task["rows"], columns=["key", "path", "tags", "bad_tags"])
    scan = pq.read_table(task["scan"], columns=["action", "reason", "detail"])
    st = _open_ipc(task["status"]).get_batch(0)
    status = st.column(0).to_numpy()
    n = len(status)
    action = np.asarray(scan.column("action").to_numpy(zero_copy_only=False))
    # Every row's hashtags as vocabulary ids (-1: not in the vocabulary), flat, in order;
    # a row keeps its first max_tags ids.
    tags = rows.column("tags").combine_chunks()
    lengths = pc.list_value_length(tags).fill_null(0).to_numpy().astype(np.int64)
    ids = pc.index_in(pc.list_flatten(tags), value_set=pa.array(hashtags, pa.string())).fill_null(-1)
    ids = ids.to_numpy().astype(np.int64)
    row_of = np.repeat(np.arange(n), lengths)
    valid = ids >= 0
    seen = np.cumsum(valid)
    row_start = np.concatenate([[0], np.cumsum(lengths)])[:-1]
    before_row = np.concatenate([[0], seen])[row_start]  # valid ids before each row's first
    keep = valid & (seen - 1 - before_row[row_of] < task["max_tags"])
    per_row = np.bincount(row_of[keep], minlength=n)
    is_final = (status == KEPT) & (per_row > 0)
    no_tag = (status == KEPT) & (per_row == 0)
    take = keep & is_final[row_of]
    final = np.flatnonzero(is_final)
    final_ids = ids[take].astype(np.int32)
    final_offsets = np.concatenate([[0], np.cumsum(per_row[final])]).astype(np.int32)
    report: dict = {"valid_as_is": int((action == "ok").sum()), "skipped": {}, "reencoded": {}, "in_eval_set": {},
                    "duplicate": {}, "no_hashtag": {}, "tags_rejected": {}}
    # rejected.jsonl lines: a Python loop over the (few) rows not written as is.
    reencoded = (status == KEPT) & (action == "reencoded")
    bad_tags = rows.column("bad_tags").combine_chunks()
    has_bad = pc.list_value_length(bad_tags).fill_null(0).to_numpy() > 0
    odd = np.flatnonzero((status != KEPT) | reencoded | no_tag | has_bad)
    sub = pa.array(odd, pa.int64())
    bad_of = bad_tags.take(sub).to_pylist()
    keys = rows.column("key").take(sub).to_pylist()
    paths = rows.column("path").take(sub).to_pylist()
    reasons = scan.column("reason").take(sub).to_pylist()
    details = scan.column("detail").take(sub).to_pylist()
    kept_keys = st.column(1).take(sub).to_pylist()
    lines = []
    for j, i in enumerate(odd.tolist()):
        key, path, s = keys[j], paths[j], status[i]
        for tag, why in bad_of[j]:  # the tags a row lost, whatever became of the row
            lines.append({"key": key, "path": path, "action": "tag_rejected", "reason": why, "tag": tag})
            _capped_add(report["tags_rejected"], why, [key, tag])
        if s == SKIPPED:
            lines.append({"key": key, "path": path, "action": "skipped", "reason": reasons[j], "detail": details[j]})
            _capped_add(report["skipped"], reasons[j], key)
            continue
        if s == IN_EVAL:
            lines.append({"key": key, "path": path, "action": "dropped", "reason": "in_eval_set"})
            _capped_add(report["in_eval_set"], "all", key)
            continue
        if s == DUPLICATE:
            lines.append({"key": key, "path": path, "action": "dropped", "reason": "duplicate",
                          "duplicate_of": kept_keys[j]})
            _capped_add(report["duplicate"], "all", [key, kept_keys[j]])
            continue
        if reencoded[i]:
            lines.append({"key": key, "path": path, "action": "reencoded", "reason": reasons[j]})
            _capped_add(report["reencoded"], reasons[j], key)
        if no_tag[i]:
            lines.append({"key": key, "path": path, "action": "dropped", "reason": "no_hashtag"})
            _capped_add(report["no_hashtag"], "all", key)
    counts = np.bincount(final_ids, minlength=len(hashtags)).astype(np.int64)
    schema = pa.schema([("row", pa.int32()), ("tags", pa.list_(pa.int32()))])
    tag_lists = pa.ListArray.from_arrays(pa.array(final_offsets), pa.array(final_ids, pa.int32()))
    _write_ipc(task["out"], [pa.record_batch([pa.array(final.astype(np.int32)), tag_lists], schema=schema)], schema)
    base = task["out"][: -len(".arrow")]
    np.save(base + ".counts.npy", counts)
    with open(base + ".rejected.jsonl.tmp", "w", encoding="utf-8") as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines))
    os.replace(base + ".rejected.jsonl.tmp", base + ".rejected.jsonl")
    report["final"] = int(len(final))
    report["tags"] = int(len(final_ids))
    with open(base + ".report.json.tmp", "w", encoding="utf-8") as f:
        json.dump(report, f, ensure_ascii=False)
    os.replace(base + ".report.json.tmp", base + ".report.json")
    return {"part": task["part"], "final": int(len(final))}


def merge_reports(paths: list[str]) -> dict:
    """The parts' reports (assign_part's) as one: counts summed, key lists concatenated in
    part order and capped at REPORT_MAX_KEYS."""
    merged: dict = {"valid_as_is": 0, "final": 0, "tags": 0}
    lists = ("skipped", "reencoded", "in_eval_set", "duplicate", "no_hashtag", "tags_rejected")
    for name in lists:
        merged[name] = {}
    for p in paths:
        with open(p, encoding="utf-8") as f:
            r = json.load(f)
        for name in ("valid_as_is", "final", "tags"):
            merged[name] += r[name]
        for name in lists:
            for reason, entry in r[name].items():
                m = merged[name].setdefault(reason, {"count": 0, "keys": []})
                m["count"] += entry["count"]
                room = REPORT_MAX_KEYS - len(m["keys"])
                m["keys"].extend(entry["keys"][:room])
    for name in lists:
        for m in merged[name].values():
            m["truncated"] = m["count"] > len(m["keys"])
    return merged


def route_part(task: dict) -> dict:
    """The part's final rows with everything a shard writer needs, keyed by their
    position in the seeded order and sorted by it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from engine.data.sampling import FeistelPermutation

    a = _open_ipc(task["assign"]).get_batch(0)
    local = a.column(0).to_numpy()
    perm = FeistelPermutation(task["n"], [task["seed"], 0x5EED])
    pos = perm(np.arange(task["first"], task["first"] + len(local), dtype=np.int64)).astype(np.int64)
    order = np.argsort(pos, kind="stable")
    take = pa.array(local[order].astype(np.int64))
    rows = pq.read_table(task["rows"], columns=["key", "path", "offset", "size"]).take(take)
    scan = pq.read_table(task["scan"], columns=["sha256", "height", "width", "blob_offset", "blob_size",
                                                "out_sha256"]).take(take)
    cols = {"pos": pa.array(pos[order], pa.int64()), "part": pa.array(np.full(len(local), task["part"], np.int32))}
    for t in (rows, scan):
        for name in t.column_names:
            cols[name] = t.column(name).combine_chunks()
    cols["tags"] = a.column(1).take(pa.array(order))
    table = pa.table(cols)
    _write_ipc(task["out"], table.to_batches(max_chunksize=max(1, table.num_rows)) or
               [pa.RecordBatch.from_pylist([], schema=table.schema)], table.schema)
    return {"part": task["part"], "rows": len(local)}


def read_route_range(path: str, lo: int, hi: int):
    """The rows of one route file with lo <= position < hi (a zero-copy slice)."""
    f = _open_ipc(path)
    if f.num_record_batches == 0:
        return None
    b = f.get_batch(0)
    pos = b.column(0).to_numpy()
    i, j = np.searchsorted(pos, [lo, hi])
    return b.slice(i, j - i) if j > i else None


def image_weights(tag_lists: list, counts: np.ndarray, weighting: str) -> np.ndarray:
    return vocab_mod.image_weights([np.asarray(t, np.int64) for t in tag_lists], np.maximum(counts, 1), weighting)


# ---------------------------------------------------------------- driver


@dataclass
class PlanSpec:
    plan_dir: str
    rows: list  # rows/part-N.parquet, every part
    scans: list  # scan/part-N.parquet, every part
    part_rows: int  # rows per part (all parts but the last)
    buckets: int  # hash buckets of dedup and vocabulary
    eval_path: str  # sorted evaluation-set digests (load_eval_set)
    k: int  # vocabulary size
    min_count: int = 1
    max_tags: int = 32
    seed: int = 0
    progress: bool = True


@dataclass
class PlanResult:
    n: int  # final samples
    hashtags: list  # the vocabulary, id order
    distinct: int  # distinct hashtags of the kept rows
    final_counts: np.ndarray  # images per hashtag in the final set
    counts_path: str  # final_counts saved for the writers
    report: dict  # merged part reports (merge_reports)
    routes: list = field(default_factory=list)  # route-N.arrow, every part
    rejected_parts: list = field(default_factory=list)  # the parts of rejected.jsonl, in order


def run_plan(engine, spec: PlanSpec) -> PlanResult:
    """Every plan stage on the engine; a stage's finished tasks (output present) are skipped."""
    parts = range(len(spec.rows))

    def name(kind: str, i: int) -> str:
        return os.path.join(spec.plan_dir, "%s-%06d.arrow" % (kind, i))

    common = {"part_rows": spec.part_rows, "buckets": spec.buckets, "eval": spec.eval_path}
    spills = [name("spill", p) for p in parts]
    dedups = [name("dedup", b) for b in range(spec.buckets)]
    counts = [name("counts", p) for p in parts]
    statuses = [name("status", p) for p in parts]
    assigns = [name("assign", p) for p in parts]
    routes = [name("route", p) for p in parts]
    for fn, tasks, desc in (
        (spill_part, [dict(common, part=p, scan=spec.scans[p], rows=spec.rows[p], out=spills[p]) for p in parts],
         "dedup map"),
        (dedup_bucket, [{"bucket": b, "spills": spills, "out": dedups[b]} for b in range(spec.buckets)],
         "dedup reduce"),
        (count_part, [dict(common, part=p, scan=spec.scans[p], rows=spec.rows[p], dedups=dedups, status=statuses[p],
                           out=counts[p]) for p in parts], "count"),
    ):
        tasks = todo(tasks)
        run_stage(engine, fn, tasks, desc, spec.progress, len(tasks))
    hashtags, _, distinct = merge_vocab(stream_stage(
        engine, vocab_bucket, [{"bucket": b, "counts": counts, "min_count": spec.min_count, "k": spec.k}
                               for b in range(spec.buckets)], "vocab", spec.progress, spec.buckets), spec.k)
    vocab_path = os.path.join(spec.plan_dir, "vocab.json")
    with open(vocab_path + ".tmp", "w", encoding="utf-8") as f:
        json.dump({"hashtags": hashtags}, f, ensure_ascii=False)
    os.replace(vocab_path + ".tmp", vocab_path)
    tasks = todo([{"part": p, "rows": spec.rows[p], "scan": spec.scans[p], "status": statuses[p], "vocab": vocab_path,
                   "max_tags": spec.max_tags, "out": assigns[p]} for p in parts])
    run_stage(engine, assign_part, tasks, "final", spec.progress, len(tasks))
    stem = [a[: -len(".arrow")] for a in assigns]
    report = merge_reports([s + ".report.json" for s in stem])
    final_counts = np.zeros(len(hashtags), np.int64)
    first = np.zeros(len(parts) + 1, np.int64)
    for p in parts:
        with open(stem[p] + ".report.json", encoding="utf-8") as f:
            first[p + 1] = first[p] + json.load(f)["final"]
        final_counts += np.load(stem[p] + ".counts.npy")
    counts_path = os.path.join(spec.plan_dir, "final_counts.npy")
    np.save(counts_path, final_counts)
    n = int(first[-1])
    if n:
        tasks = todo([{"part": p, "assign": assigns[p], "rows": spec.rows[p], "scan": spec.scans[p], "n": n,
                       "first": int(first[p]), "seed": spec.seed, "out": routes[p]} for p in parts])
        run_stage(engine, route_part, tasks, "order", spec.progress, len(tasks))
    return PlanResult(n=n, hashtags=hashtags, distinct=distinct, final_counts=final_counts, counts_path=counts_path,
                      report=report, routes=routes, rejected_parts=[s + ".rejected.jsonl" for s in stem])
