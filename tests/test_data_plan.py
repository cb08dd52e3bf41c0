"""The bucketed plan (engine.data.plan) against a plain in-memory reference of the
same rules, on a synthetic scan table with duplicates across parts, evaluation-set
copies, skipped rows and a long tail of hashtags; the result must not depend on
how many parts or hash buckets the work was cut into."""

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from benchmarks.bench_data_plan import synthesise
from engine.data.engines import LocalEngine
from engine.data.plan import PlanSpec, read_route_range, run_plan
from engine.data.sampling import FeistelPermutation

K = 40


def _reference(work: str, parts: int, k: int, max_tags: int = 32):
    """The rules, one list in memory: eval removal, first-in-metadata-order dedup, top-K
    by (count desc, tag asc), final = kept rows with a vocabulary hashtag."""
    keys, tags, action, sha = [], [], [], []
    for p in range(parts):
        r = pq.read_table(os.path.join(work, "rows", "part-%06d.parquet" % p)).to_pydict()
        s = pq.read_table(os.path.join(work, "scan", "part-%06d.parquet" % p)).to_pydict()
        keys += r["key"]
        tags += r["tags"]
        action += s["action"]
        sha += s["sha256"]
    evals = {bytes(d) for d in np.load(os.path.join(work, "eval.npy"))}
    kept, first, dups = [], {}, []
    for i in range(len(keys)):
        if action[i] == "skipped" or sha[i] in evals:
            continue
        j = first.setdefault(sha[i], i)
        if j != i:
            dups.append([keys[i], keys[j]])
            continue
        kept.append(i)
    counts = {}
    for i in kept:
        for t in tags[i]:
            counts[t] = counts.get(t, 0) + 1
    vocab = [t for t, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:k]]
    tag_id = {t: n for n, t in enumerate(vocab)}
    final = []
    for i in kept:
        ids = [tag_id[t] for t in tags[i] if t in tag_id][:max_tags]
        if ids:
            final.append((keys[i], ids))
    return vocab, dups, final, len(counts)


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    work = str(tmp_path_factory.mktemp("plan"))
    info = synthesise(work, rows=7000, part_rows=1000, distinct_tags=300, seed=3)
    return work, info


@pytest.mark.parametrize("buckets", [1, 5])
def test_bucketed_plan_equals_the_in_memory_rules(table, buckets):
    work, info = table
    vocab, dups, final, distinct = _reference(work, info["parts"], K)
    plan_dir = os.path.join(work, "plan", f"b{buckets}")
    os.makedirs(plan_dir, exist_ok=True)
    parts = range(info["parts"])
    spec = PlanSpec(plan_dir=plan_dir, rows=[os.path.join(work, "rows", "part-%06d.parquet" % p) for p in parts],
                    scans=[os.path.join(work, "scan", "part-%06d.parquet" % p) for p in parts], part_rows=1000,
                    buckets=buckets, eval_path=os.path.join(work, "eval.npy"), k=K, seed=11, progress=False)
    result = run_plan(LocalEngine(workers=2), spec)
    assert result.hashtags == vocab and result.distinct == distinct
    assert result.report["duplicate"]["all"]["count"] == len(dups) > 50  # duplicates across parts were found
    assert result.report["duplicate"]["all"]["keys"] == dups  # [copy, first in metadata order]
    assert result.report["in_eval_set"]["all"]["count"] > 0
    assert result.n == len(final)
    # The routed order is the seeded Feistel permutation of the final rows in metadata order.
    perm = FeistelPermutation(result.n, [11, 0x5EED])
    want = {int(p): final[j] for j, p in enumerate(perm(np.arange(result.n)))}
    got = pa.Table.from_batches([b for b in (read_route_range(r, 0, result.n) for r in result.routes) if b])
    got = got.sort_by("pos").to_pydict()
    assert got["pos"] == list(range(result.n))
    assert [(k, t) for k, t in zip(got["key"], got["tags"])] == [want[i] for i in range(result.n)]
    expected_counts = np.bincount([t for _, ids in final for t in ids], minlength=len(vocab))
    assert result.final_counts.tolist() == expected_counts.tolist()
    with open(result.rejected_parts[0], encoding="utf-8") as f:
        assert all(json.loads(line)["action"] in ("skipped", "dropped", "reencoded") for line in f)
