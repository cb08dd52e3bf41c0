"""Build stages 3 and 4, write and finalize.

write: one task per run of consecutive shards. It takes their samples from every
part's route file (a position range of each, engine.data.plan), reads the bytes (the source file or
tar, or a re-encoded copy in the scan's .bin), checks their sha256 against the
scan, writes the tar and DALI index to temporary names and renames them, then its
slice of the global index to .build/shards/shard-N.npz, written last: a finished
shard. A rerun skips every finished shard whose plan is unchanged.

finalize: the global index arrays are filled shard by shard through memory maps
(never one in-memory list of all samples), keys.txt and rejected.jsonl are
concatenated from their parts.
"""

from __future__ import annotations

import hashlib
import os
import time

import numpy as np

from engine.data import plan as plan_mod
from engine.data.dataset import shard_name, write_shard


class BuildError(RuntimeError):
    pass


def write_shards_task(task: dict) -> dict:
    """A run of consecutive shards: each part's route file is opened and sliced once for
    the whole run (at 3.5B rows there are thousands of parts and hundreds of thousands
    of shards), then each shard is written."""
    import pyarrow as pa

    shards = task["shards"]  # [[shard, lo, hi], ...], consecutive
    lo, hi = shards[0][1], shards[-1][2]
    slices = [s for s in (plan_mod.read_route_range(p, lo, hi) for p in task["routes"]) if s]
    table = pa.Table.from_batches(slices).combine_chunks() if slices else None
    if table is None or table.num_rows != hi - lo:
        raise BuildError(f"shards {shards[0][0]}-{shards[-1][0]}: the plan routes "
                         f"{0 if table is None else table.num_rows} samples to them, expected {hi - lo}")
    table = table.take(pa.compute.sort_indices(table, [("pos", "ascending")]))
    counts = np.load(task["counts"])
    for shard, s_lo, s_hi in shards:
        _write_one(task, shard, s_lo, table.slice(s_lo - lo, s_hi - s_lo), counts)
    return {"shards": len(shards), "samples": table.num_rows}


def _write_one(task: dict, shard: int, lo: int, table, counts: np.ndarray) -> None:
    cols = table.to_pydict()
    items = []
    for j in range(table.num_rows):
        if cols["blob_size"][j] >= 0:
            with open(task["bins"][cols["part"][j]], "rb") as f:
                f.seek(cols["blob_offset"][j])
                data = f.read(cols["blob_size"][j])
            want = cols["out_sha256"][j]
        else:
            with open(os.path.join(task["images"], cols["path"][j]), "rb") as f:
                if cols["offset"][j] >= 0:
                    f.seek(cols["offset"][j])
                    data = f.read(cols["size"][j])
                else:
                    data = f.read()
            want = cols["sha256"][j]
        if hashlib.sha256(data).digest() != want:
            raise BuildError(f"{os.path.join(task['images'], cols['path'][j])} changed since the build scanned it; "
                             "rerun the build with overwrite=True (--overwrite)")
        items.append((data, np.asarray(cols["tags"][j], dtype=np.int32)))
    tar_path = os.path.join(task["shard_dir"], shard_name(shard) + ".tar")
    idx_path = os.path.join(task["shard_dir"], shard_name(shard) + ".idx")
    offsets, sizes = write_shard(tar_path, idx_path, lo, items)
    tags = cols["tags"]
    done = os.path.join(task["done_dir"], shard_name(shard) + ".npz")
    with open(done + ".tmp", "wb") as f:
        np.savez(
            f, offsets=offsets, sizes=sizes, height=np.asarray(cols["height"], np.int32),
            width=np.asarray(cols["width"], np.int32), lengths=np.asarray([len(t) for t in tags], np.int64),
            tags=np.asarray([t for ts in tags for t in ts], np.int32),
            weight=plan_mod.image_weights(tags, counts, task["weighting"]),
            sha256=np.frombuffer(b"".join(cols["sha256"]), np.uint8).reshape(-1, 32),
            keys=np.frombuffer("\n".join(k.replace("\n", " ") for k in cols["key"]).encode("utf-8"), np.uint8),
            plan=np.frombuffer(task["plan"].encode(), dtype=np.uint8),
        )
    os.replace(done + ".tmp", done)  # written last: marks the shard finished
    delay = float(os.environ.get("ENGINE_DATA_TEST_SHARD_DELAY", "0") or 0)  # tests: widen the kill window
    if delay:
        time.sleep(delay)


def write_index(out: str, done_dir: str, num_shards: int, n: int, total_tags: int) -> int:
    """The global index from the shards' parts, through memory maps; returns max tags per image."""
    from numpy.lib.format import open_memmap

    index_dir = os.path.join(out, "index")
    os.makedirs(index_dir, exist_ok=True)
    specs = {"shard": (np.int32, (n,)), "offset": (np.int64, (n,)), "size": (np.int32, (n,)),
             "height": (np.int32, (n,)), "width": (np.int32, (n,)), "tag_ptr": (np.int64, (n + 1,)),
             "tags": (np.int32, (total_tags,)), "weight": (np.float64, (n,)), "weight_cdf": (np.float64, (n,)),
             "sha256": (np.uint8, (n, 32))}
    arrays = {name: open_memmap(os.path.join(index_dir, name + ".npy.tmp"), mode="w+", dtype=dt, shape=shape)
              for name, (dt, shape) in specs.items()}
    at, tag_at, cdf, max_tags = 0, 0, 0.0, 0
    arrays["tag_ptr"][0] = 0
    with open(os.path.join(index_dir, "keys.txt.tmp"), "w", encoding="utf-8") as keys:
        for s in range(num_shards):
            with np.load(os.path.join(done_dir, shard_name(s) + ".npz")) as z:
                m = len(z["offsets"])
                sl = slice(at, at + m)
                arrays["shard"][sl] = s
                arrays["offset"][sl] = z["offsets"]
                arrays["size"][sl] = z["sizes"]
                arrays["height"][sl] = z["height"]
                arrays["width"][sl] = z["width"]
                lengths = z["lengths"]
                arrays["tag_ptr"][at + 1 : at + m + 1] = tag_at + np.cumsum(lengths)
                arrays["tags"][tag_at : tag_at + len(z["tags"])] = z["tags"]
                arrays["weight"][sl] = z["weight"]
                # Sequential sums from the previous shard's last value: the same additions, in the
                # same order, as one cumulative sum over all samples.
                running = np.cumsum(np.concatenate([[cdf], z["weight"]]))[1:]
                arrays["weight_cdf"][sl] = running
                cdf = float(running[-1]) if m else cdf
                arrays["sha256"][sl] = z["sha256"]
                keys.write(z["keys"].tobytes().decode("utf-8") + "\n")
                max_tags = max(max_tags, int(lengths.max()) if m else 0)
                at += m
                tag_at += len(z["tags"])
    for name, arr in arrays.items():
        arr.flush()
        del arr
    arrays.clear()
    for name in specs:
        os.replace(os.path.join(index_dir, name + ".npy.tmp"), os.path.join(index_dir, name + ".npy"))
    os.replace(os.path.join(index_dir, "keys.txt.tmp"), os.path.join(index_dir, "keys.txt"))
    return max_tags


def concat_parts(paths: list[str], out_path: str) -> None:
    """Concatenates text parts into one file, a block at a time."""
    with open(out_path + ".tmp", "wb") as out:
        for p in paths:
            with open(p, "rb") as f:
                while True:
                    block = f.read(1 << 20)
                    if not block:
                        break
                    out.write(block)
    os.replace(out_path + ".tmp", out_path)

