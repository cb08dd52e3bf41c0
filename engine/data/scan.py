"""Build stage 1, scan: one task per metadata part (engine.data.plan.ROWS): read
each image, hash it (sha256 of the source bytes), validate it with torchvision and
DALI (engine.data.jpeg), re-encode what can be repaired. A part's results go to
scan/part-N.parquet (one row per metadata row, same order) and the re-encoded
images to scan/part-N.bin; the Parquet file is renamed into place last, so it
marks the part done and a rerun skips it."""

from __future__ import annotations

import hashlib
import os
import time

import numpy as np

from engine.data import jpeg as jpeg_mod
from engine.data import metadata as meta_mod

SCAN_VERSION = 2
_DALI_CHECKERS: dict = {}  # one DALI pipeline per process and device, reused across tasks
_INHERITED: list = []  # DALI pipelines a forked worker inherited: never used, never destroyed


def worker_init():
    global _DALI_CHECKERS
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if _DALI_CHECKERS:  # forked from a process that ran DALI: its threads are not here
        _INHERITED.append(_DALI_CHECKERS)
        _DALI_CHECKERS = {}


def _dali_checker(device: str):
    if device not in _DALI_CHECKERS:
        _DALI_CHECKERS[device] = jpeg_mod.DaliChecker(device=device)
    return _DALI_CHECKERS[device]


def read_file(path: str, max_bytes: int):
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


def read_source(images: str, path: str, offset: int, size: int, max_bytes: int):
    """An image's bytes: a whole file, or a byte range of a tar (webdataset input)."""
    full = os.path.join(images, path)
    if offset < 0:
        return read_file(full, max_bytes)
    return meta_mod.read_member(full, offset, size, max_bytes)


def scan_part(task: dict) -> dict:
    """Scans one part; returns {"part", "rows", "by_action": {...}, "by_reason": {...}}."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    torch.set_num_threads(1)
    limits = jpeg_mod.Limits(**task["limits"])
    rows = pq.read_table(task["rows"], columns=["path", "offset", "size"]).to_pydict()
    n = len(rows["path"])
    action = ["skipped"] * n
    reason = [""] * n
    detail = [""] * n
    sha = [b""] * n
    hh = np.zeros(n, np.int32)
    ww = np.zeros(n, np.int32)
    pending = []  # (row, bytes, was_original) to check with DALI
    for i in range(n):
        data, why = read_source(task["images"], rows["path"][i], rows["offset"][i], rows["size"][i], limits.max_bytes)
        reason[i] = why or ""
        if data is None:
            continue
        sha[i] = hashlib.sha256(data).digest()
        checked = jpeg_mod.check_image(data, limits)
        action[i], reason[i], detail[i] = checked.action, checked.reason, checked.detail
        hh[i], ww[i] = checked.height, checked.width
        if checked.action != "skipped":
            pending.append((i, checked.data, checked.action == "ok"))
    if task["dali"] and pending:
        checker = _dali_checker(task["dali_device"])
        shapes = checker.shapes([b for _, b, _ in pending])
        for pi, shape in enumerate(shapes):
            i, data, original = pending[pi]
            if shape == (hh[i], ww[i]):
                continue
            fixed = None
            if original:  # torchvision reads it, DALI does not: try a baseline re-encode
                try:
                    candidate = jpeg_mod.encode_baseline_jpeg(jpeg_mod.decode_rgb(data), limits.quality)
                    if checker.shapes([candidate])[0] == (hh[i], ww[i]):
                        fixed = candidate
                except Exception:
                    fixed = None
            if fixed is None:
                action[i], reason[i], detail[i] = "skipped", "dali_undecodable", f"DALI decode gave {shape}"
            else:
                action[i], reason[i] = "reencoded", "dali_rejected"
                pending[pi] = (i, fixed, False)
    blob_off = np.full(n, -1, np.int64)
    blob_len = np.full(n, -1, np.int64)
    out_sha = [b""] * n
    base = os.path.join(task["scan_dir"], "part-%06d" % task["part"])
    at = 0
    with open(base + ".bin.tmp", "wb") as f:
        for i, data, _ in pending:
            if action[i] == "reencoded":
                f.write(data)
                blob_off[i], blob_len[i] = at, len(data)
                out_sha[i] = hashlib.sha256(data).digest()
                at += len(data)
    table = pa.table({
        "action": action, "reason": reason, "detail": detail, "sha256": pa.array(sha, pa.binary()),
        "height": hh, "width": ww, "blob_offset": blob_off, "blob_size": blob_len,
        "out_sha256": pa.array(out_sha, pa.binary()),
    })
    pq.write_table(table, base + ".parquet.tmp")
    os.replace(base + ".bin.tmp", base + ".bin")
    os.replace(base + ".parquet.tmp", base + ".parquet")  # written last: marks the part done
    delay = float(os.environ.get("ENGINE_DATA_TEST_SCAN_DELAY", "0") or 0)  # tests: widen the kill window
    if delay:
        time.sleep(delay)
    by_action, by_reason = {}, {}
    for a, r in zip(action, reason):
        by_action[a] = by_action.get(a, 0) + 1
        if a == "skipped":
            by_reason[r] = by_reason.get(r, 0) + 1
    return {"part": task["part"], "rows": n, "by_action": by_action, "by_reason": by_reason}
