"""Metadata readers for the dataset builder: each input format becomes a stream of
`Row`s, read in blocks so that no reader holds the whole file.

Formats (`format=`):

- jsonl: one object per line, e.g. {"path": "a/b.jpg", "caption": "sunset #beach"}
  or {"path": ..., "tags": ["beach", "sunset"]};
- csv / tsv: a header naming the same columns; a tags cell is split on spaces,
  commas, semicolons or bars;
- parquet: the same columns, read one record batch at a time (img2dataset's and
  LAION's layout key/url/caption: set `path_template`, e.g. "{key}.jpg");
- yfcc100m: the YFCC100M dataset file (tab-separated, one photo per line; 25 fields
  with line number and hash as in the multimedia-commons copy, or the 23 fields of
  the first release). User tags and machine tags are comma-separated and
  URL-encoded ('+' for a space); videos are left out; `yfcc_tags` picks user tags,
  machine tags or both as hashtags; the image path comes from `path_template`
  (default: the multimedia-commons layout "{hash[0:3]}/{hash[3:6]}/{hash}.jpg");
- webdataset: img2dataset output, a directory (or one file) of .tar shards holding
  <key>.jpg with its caption in <key>.txt or <key>.json; each tar is read member by
  member, once, and an image is addressed by its byte range in the tar (never
  unpacked). Hashtags come from the caption, or from `tags_field` in the JSON.

"auto" picks by extension (.jsonl/.ndjson/.json, .csv, .tsv, .parquet, or a
directory or .tar for webdataset). With an explicit format, the metadata may also be
a directory of such files (read in name order, one build task per file).
"""

from __future__ import annotations

import csv
import json
import os
import re
import tarfile
from dataclasses import dataclass
from typing import Iterator, Optional
from urllib.parse import unquote_plus

from engine.data import vocab as vocab_mod

FORMATS = ("auto", "jsonl", "csv", "tsv", "parquet", "yfcc100m", "webdataset")
YFCC_TAGS = ("user", "machine", "both")
YFCC_DEFAULT_TEMPLATE = "{hash[0:3]}/{hash[3:6]}/{hash}.jpg"
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")

# Field names of the two YFCC100M layouts (see the module docstring).
_YFCC25 = ("line", "id", "hash", "user_nsid", "user_nickname", "date_taken", "date_uploaded", "device", "title",
           "description", "user_tags", "machine_tags", "longitude", "latitude", "accuracy", "page_url",
           "download_url", "license_name", "license_url", "server", "farm", "secret", "secret_original",
           "extension", "marker")
_YFCC23 = tuple(f for f in _YFCC25 if f not in ("line", "hash"))


@dataclass
class Row:
    key: str
    path: str  # the image file, or the tar holding it, as written (relative to the image root)
    tags: list[str]  # canonical hashtags, in order of first appearance
    offset: int = -1  # byte range of the image inside `path` (a tar); -1: the whole file
    size: int = -1


@dataclass
class Fields:
    """Which metadata fields mean what (column names of JSONL, CSV and Parquet)."""

    path: str = "path"
    caption: str = "caption"
    tags: str = "tags"  # also accepted: "hashtags"
    key: str = "key"  # optional; the key defaults to the path as written
    path_template: Optional[str] = None  # image path from a row's fields, e.g. "{key}.jpg"
    yfcc_tags: str = "user"


_TAG_SPLIT = re.compile(r"[\s,;|]+")
_TEMPLATE_FIELD = re.compile(r"\{(\w+)(?:\[(\d*):(\d*)\])?\}")


def fill_template(template: str, obj: dict, where: str) -> str:
    """'{name}' is a field's value, '{name[a:b]}' a slice of it."""

    def sub(m: re.Match) -> str:
        value = obj.get(m.group(1))
        if value is None or value == "":
            raise ValueError(f"{where}: path template {template!r} needs field '{m.group(1)}', which is missing")
        value = str(value)
        if m.group(2) is not None or m.group(3) is not None:
            lo = int(m.group(2)) if m.group(2) else None
            hi = int(m.group(3)) if m.group(3) else None
            value = value[lo:hi]
        return value

    return _TEMPLATE_FIELD.sub(sub, template)


def detect_format(path: str, fmt: str) -> str:
    if fmt != "auto":
        if fmt not in FORMATS:
            raise ValueError(f"metadata format {fmt!r}: expected one of {', '.join(FORMATS)}")
        return fmt
    lower = path.lower()
    if os.path.isdir(path) or lower.endswith(".tar"):
        return "webdataset"
    for ext, name in ((".jsonl", "jsonl"), (".ndjson", "jsonl"), (".json", "jsonl"), (".csv", "csv"),
                      (".tsv", "tsv"), (".parquet", "parquet")):
        if lower.endswith(ext):
            return name
    raise ValueError(f"metadata {path!r}: expected a .jsonl, .csv, .tsv or .parquet file, a directory of "
                     "webdataset .tar shards, or format='yfcc100m'")


_DIR_EXTENSIONS = {"webdataset": (".tar",), "parquet": (".parquet",), "jsonl": (".jsonl", ".ndjson", ".json"),
                   "csv": (".csv",), "tsv": (".tsv",), "yfcc100m": ("",)}


def input_files(path: str, fmt: str) -> list[str]:
    """The files a metadata argument names: itself, or a directory's files of the
    format, in name order (e.g. img2dataset's tars, or a big file cut by `split -l`;
    each file is one read task)."""
    if os.path.isdir(path):
        exts = _DIR_EXTENSIONS[fmt]
        files = sorted(os.path.join(path, n) for n in os.listdir(path)
                       if not n.startswith(".") and n.lower().endswith(exts) and os.path.isfile(os.path.join(path, n)))
        if not files:
            raise ValueError(f"metadata directory {path!r} holds no {fmt} files ({' '.join(exts) or 'any name'})")
        return files
    if not os.path.isfile(path):
        raise FileNotFoundError(f"metadata file {path!r} does not exist")
    return [path]


def _row_tags(obj: dict, fields: Fields, where: str) -> list[str]:
    tags = obj.get(fields.tags)
    if tags is None and fields.tags == "tags":
        tags = obj.get("hashtags")
    caption = obj.get(fields.caption)
    if tags is not None and tags != "":
        if isinstance(tags, str):
            tags = _TAG_SPLIT.split(tags)
        if hasattr(tags, "tolist"):  # a Parquet list cell read through numpy
            tags = tags.tolist()
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise ValueError(f"{where}: '{fields.tags}' must be a list of strings or a string")
        return vocab_mod.unique(vocab_mod.normalize_tag(t) for t in tags)
    if caption is not None:
        if not isinstance(caption, str):
            raise ValueError(f"{where}: '{fields.caption}' must be a string")
        return vocab_mod.extract_hashtags(caption)
    if tags == "":
        return []
    raise ValueError(f"{where}: the row has neither '{fields.caption}' nor '{fields.tags}'")


def _row(obj: dict, fields: Fields, synonyms: dict, where: str) -> Row:
    if fields.path_template:
        p = fill_template(fields.path_template, obj, where)
    else:
        p = obj.get(fields.path)
        if not isinstance(p, str) or not p.strip():
            raise ValueError(f"{where}: missing or empty '{fields.path}'")
    key = obj.get(fields.key) or p
    return Row(str(key), p, vocab_mod.canonicalize(_row_tags(obj, fields, where), synonyms))


def _jsonl(path: str, fields: Fields, synonyms: dict) -> Iterator[Row]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"metadata {path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: invalid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            yield _row(obj, fields, synonyms, where)


def _csv(path: str, fields: Fields, synonyms: dict, tab: bool) -> Iterator[Row]:
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, dialect="excel-tab" if tab else "excel")
        if not fields.path_template and (not reader.fieldnames or fields.path not in reader.fieldnames):
            raise ValueError(f"metadata {path}: the header must name a '{fields.path}' column")
        for lineno, obj in enumerate(reader, 2):
            if None in obj:
                raise ValueError(f"metadata {path}:{lineno}: more cells than header columns")
            yield _row({k: v for k, v in obj.items() if v is not None}, fields, synonyms, f"metadata {path}:{lineno}")


def _parquet(path: str, fields: Fields, synonyms: dict, batch_rows: int = 65536) -> Iterator[Row]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    names = set(pf.schema_arrow.names)
    wanted = [c for c in (fields.path, fields.caption, fields.tags, "hashtags", fields.key) if c in names]
    if fields.path_template:
        wanted += [m.group(1) for m in _TEMPLATE_FIELD.finditer(fields.path_template) if m.group(1) in names]
    elif fields.path not in names:
        raise ValueError(f"metadata {path}: no '{fields.path}' column (columns: {sorted(names)}); "
                         "name it with path_field, or derive the path with path_template, e.g. '{key}.jpg'")
    row_no = 0
    for batch in pf.iter_batches(batch_size=batch_rows, columns=sorted(set(wanted))):
        for obj in batch.to_pylist():
            row_no += 1
            yield _row({k: v for k, v in obj.items() if v is not None}, fields, synonyms,
                       f"metadata {path} row {row_no}")


def _yfcc_tags(cell: str) -> list[str]:
    return [unquote_plus(t) for t in cell.split(",") if t]


def _yfcc(path: str, fields: Fields, synonyms: dict, skipped: dict) -> Iterator[Row]:
    if fields.yfcc_tags not in YFCC_TAGS:
        raise ValueError(f"yfcc_tags {fields.yfcc_tags!r}: expected one of {', '.join(YFCC_TAGS)}")
    template = fields.path_template or YFCC_DEFAULT_TEMPLATE
    with open(path, encoding="utf-8", newline="\n") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line:
                continue
            cells = line.split("\t")
            where = f"metadata {path}:{lineno}"
            if len(cells) == len(_YFCC25):
                obj = dict(zip(_YFCC25, cells))
            elif len(cells) == len(_YFCC23):
                obj = dict(zip(_YFCC23, cells))
            else:
                raise ValueError(f"{where}: a YFCC100M line has {len(_YFCC25)} (or {len(_YFCC23)}) "
                                 f"tab-separated fields, this one has {len(cells)}")
            if obj["marker"].strip() not in ("0", "1"):
                raise ValueError(f"{where}: photo/video marker {obj['marker']!r}, expected 0 or 1")
            if obj["marker"].strip() == "1":
                skipped["video"] = skipped.get("video", 0) + 1
                continue
            tags = []
            if fields.yfcc_tags in ("user", "both"):
                tags += _yfcc_tags(obj["user_tags"])
            if fields.yfcc_tags in ("machine", "both"):
                tags += _yfcc_tags(obj["machine_tags"])
            tags = vocab_mod.unique(vocab_mod.normalize_tag(t) for t in tags)
            yield Row(obj["id"], fill_template(template, obj, where), vocab_mod.canonicalize(tags, synonyms))


def _webdataset(path: str, rel: str, fields: Fields, synonyms: dict) -> Iterator[Row]:
    """One tar: images with their .txt / .json siblings (img2dataset writes a sample's
    members next to each other; they are grouped by key within the tar)."""
    groups: dict[str, dict] = {}
    order: list[str] = []
    try:
        with tarfile.open(path, mode="r:") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                base, _, ext = m.name.rpartition(".")
                if not base:
                    continue
                ext = ext.lower()
                g = groups.get(base)
                if g is None:
                    g = groups[base] = {}
                    order.append(base)
                if ext in IMAGE_EXTENSIONS:
                    g["image"] = (m.offset_data, m.size)
                elif ext in ("txt", "json"):
                    f = tar.extractfile(m)
                    g[ext] = f.read().decode("utf-8", errors="replace") if f is not None else ""
    except tarfile.TarError as e:
        raise ValueError(f"metadata {path}: not a readable tar ({e})") from None
    for base in order:
        g = groups[base]
        if "image" not in g:
            continue  # img2dataset leaves failed downloads out of the tar; other members are not samples
        where = f"metadata {path}:{base}"
        obj: dict = {}
        if "json" in g:
            try:
                loaded = json.loads(g["json"])
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}.json: invalid JSON ({e.msg})") from None
            if isinstance(loaded, dict):
                obj.update(loaded)
        if "txt" in g:
            obj[fields.caption] = g["txt"]
        obj.setdefault(fields.caption, "")
        key = str(obj.get(fields.key) or base.rsplit("/", 1)[-1])
        tags = vocab_mod.canonicalize(_row_tags(obj, fields, where), synonyms)
        yield Row(key, rel, tags, g["image"][0], g["image"][1])


def rows_of_file(path: str, images: str, fmt: str, fields: Fields, synonyms: dict,
                 skipped: Optional[dict] = None) -> Iterator[Row]:
    """The rows of one input file of a resolved format (see input_files)."""
    skipped = {} if skipped is None else skipped
    if fmt == "jsonl":
        yield from _jsonl(path, fields, synonyms)
    elif fmt in ("csv", "tsv"):
        yield from _csv(path, fields, synonyms, tab=fmt == "tsv" or path.lower().endswith(".tsv"))
    elif fmt == "parquet":
        yield from _parquet(path, fields, synonyms)
    elif fmt == "yfcc100m":
        yield from _yfcc(path, fields, synonyms, skipped)
    elif fmt == "webdataset":
        rel = os.path.relpath(os.path.abspath(path), os.path.abspath(images))
        yield from _webdataset(path, rel, fields, synonyms)
    else:
        raise AssertionError(fmt)


def iter_rows(metadata: str, images: str, fmt: str, fields: Fields, synonyms: dict,
              skipped: Optional[dict] = None) -> Iterator[Row]:
    """Every row of the metadata, in order. `skipped` counts rows left out on
    purpose (YFCC100M videos), by reason."""
    fmt = detect_format(metadata, fmt)
    for path in input_files(metadata, fmt):
        yield from rows_of_file(path, images, fmt, fields, synonyms, skipped)


def write_parts(task: dict) -> dict:
    """Build stage 0, one task per input file: its rows as Parquet parts of at most
    `chunk` rows (key, path, offset, size, tags) in task["out_dir"], one part in memory
    at a time; done.json, written last, lists them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("key", pa.string()), ("path", pa.string()), ("offset", pa.int64()), ("size", pa.int64()),
                        ("tags", pa.list_(pa.string()))])
    os.makedirs(task["out_dir"], exist_ok=True)
    skipped: dict = {}
    parts: list = []  # [file name, rows]
    buf: list = []

    def flush():
        cols = list(zip(*[(r.key, r.path, r.offset, r.size, r.tags) for r in buf]))
        name = "part-%06d.parquet" % len(parts)
        path = os.path.join(task["out_dir"], name)
        pq.write_table(pa.table([pa.array(c, t) for c, t in zip(cols, schema.types)], schema=schema), path + ".tmp")
        os.replace(path + ".tmp", path)
        parts.append([name, len(buf)])
        buf.clear()

    fields = Fields(**task["fields"])
    for row in rows_of_file(task["file"], task["images"], task["format"], fields, task["synonyms"], skipped):
        buf.append(row)
        if len(buf) == task["chunk"]:
            flush()
    if buf:
        flush()
    info = {"parts": parts, "not_images": skipped}
    done = os.path.join(task["out_dir"], "done.json")
    with open(done + ".tmp", "w", encoding="utf-8") as f:
        json.dump(info, f)
    os.replace(done + ".tmp", done)
    return {"file": task["file"], "rows": sum(n for _, n in parts)}


def read_member(path: str, offset: int, size: int, max_bytes: int):
    """(bytes, None) or (None, reason) for a byte range of a file (an image in a tar)."""
    if size > max_bytes:
        return None, "file_too_large"
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(size)
    except FileNotFoundError:
        return None, "missing"
    except OSError:
        return None, "unreadable"
    if len(data) != size:
        return None, "truncated"
    return data, None

