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

Text formats (jsonl, csv, tsv, yfcc100m) are read as shipped: plain or gzip, bz2,
xz, zstd compressed, told apart by magic bytes (engine.data.lines). A large plain
jsonl or yfcc100m file is read as byte ranges in parallel (`split_bytes`).

Hashtag text follows engine.data.vocab's rule everywhere. A tag that cannot be read
(a URL-encoded tag that is not UTF-8) is left out of its row and listed in
`Row.bad_tags` with a reason; the row keeps its other tags.

img2dataset's `status` column or JSON field: a row whose status is not "success"
(a failed download or resize) is left out before the scan on every route, counted
by status, never looked up as a missing image.
"""

from __future__ import annotations

import csv
import json
import os
import re
import tarfile
from dataclasses import dataclass, field
from typing import Iterator, Optional

from engine.data import lines as lines_mod
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
    bad_tags: list = field(default_factory=list)  # [(tag as written, reason)], left out of `tags`


@dataclass
class Fields:
    """Which metadata fields mean what (column names of JSONL, CSV and Parquet)."""

    path: str = "path"
    caption: str = "caption"
    tags: str = "tags"  # also accepted: "hashtags"
    key: str = "key"  # optional; the key defaults to the path as written
    path_template: Optional[str] = None  # image path from a row's fields, e.g. "{key}.jpg"
    yfcc_tags: str = "user"


STATUS_FIELD = "status"  # img2dataset's download outcome
STATUS_OK = "success"
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
    lower = lines_mod.strip_suffix(path).lower()
    if os.path.isdir(path) or lower.endswith(".tar"):
        return "webdataset"
    for ext, name in ((".jsonl", "jsonl"), (".ndjson", "jsonl"), (".json", "jsonl"), (".csv", "csv"),
                      (".tsv", "tsv"), (".parquet", "parquet")):
        if lower.endswith(ext):
            return name
    raise ValueError(f"metadata {path!r}: expected a .jsonl, .csv, .tsv or .parquet file (the text ones may end "
                     "in .gz, .bz2, .xz or .zst), a directory of webdataset .tar shards, or format='yfcc100m'")


_DIR_EXTENSIONS = {"webdataset": (".tar",), "parquet": (".parquet",), "jsonl": (".jsonl", ".ndjson", ".json"),
                   "csv": (".csv",), "tsv": (".tsv",), "yfcc100m": ("",)}
_DIR_EXTENSIONS.update({fmt: tuple(e + z for e in _DIR_EXTENSIONS[fmt] for z in ("",) + lines_mod.SUFFIXES)
                        for fmt in ("jsonl", "csv", "tsv")})


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


def _row_tags(obj: dict, fields: Fields, where) -> tuple[list[str], list]:
    """(tags, [(tag, reason)] of those rejected)."""
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
        return vocab_mod.normalize_tags(tags)
    if caption is not None:
        if not isinstance(caption, str):
            raise ValueError(f"{where}: '{fields.caption}' must be a string")
        return vocab_mod.extract_hashtags_checked(caption)
    if tags == "":
        return [], []
    raise ValueError(f"{where}: the row has neither '{fields.caption}' nor '{fields.tags}'")


def _failed_download(obj: dict, skipped: dict) -> bool:
    status = obj.get(STATUS_FIELD)
    if status is None or status == STATUS_OK:
        return False
    name = "status:" + str(status)
    skipped[name] = skipped.get(name, 0) + 1
    return True


def _row(obj: dict, fields: Fields, synonyms: dict, where) -> Row:
    if fields.path_template:
        p = fill_template(fields.path_template, obj, where)
    else:
        p = obj.get(fields.path)
        if not isinstance(p, str) or not p.strip():
            raise ValueError(f"{where}: missing or empty '{fields.path}'")
    key = obj.get(fields.key) or p
    tags, bad = _row_tags(obj, fields, where)
    return Row(str(key), p, vocab_mod.canonicalize(tags, synonyms), bad_tags=bad)


def _jsonl(path: str, fields: Fields, synonyms: dict, skipped: dict, start: int, end: int) -> Iterator[Row]:
    for where, line in lines_mod.Lines(path, start, end):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: invalid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        if not _failed_download(obj, skipped):
            yield _row(obj, fields, synonyms, where)


def _csv(path: str, fields: Fields, synonyms: dict, skipped: dict, tab: bool) -> Iterator[Row]:
    reader = csv.DictReader((line + "\n" for _, line in lines_mod.Lines(path)),
                            dialect="excel-tab" if tab else "excel")
    if not fields.path_template and (not reader.fieldnames or fields.path not in reader.fieldnames):
        raise ValueError(f"metadata {path}: the header must name a '{fields.path}' column")
    for obj in reader:
        where = f"metadata {path}:{reader.line_num}"
        if None in obj:
            raise ValueError(f"{where}: more cells than header columns")
        obj = {k: v for k, v in obj.items() if v is not None}
        if not _failed_download(obj, skipped):
            yield _row(obj, fields, synonyms, where)


def _parquet(path: str, fields: Fields, synonyms: dict, skipped: dict, batch_rows: int = 65536) -> Iterator[Row]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    names = set(pf.schema_arrow.names)
    wanted = [c for c in (fields.path, fields.caption, fields.tags, "hashtags", fields.key, STATUS_FIELD) if c in names]
    if fields.path_template:
        wanted += [m.group(1) for m in _TEMPLATE_FIELD.finditer(fields.path_template) if m.group(1) in names]
    elif fields.path not in names:
        raise ValueError(f"metadata {path}: no '{fields.path}' column (columns: {sorted(names)}); "
                         "name it with path_field, or derive the path with path_template, e.g. '{key}.jpg'")
    row_no = 0
    for batch in pf.iter_batches(batch_size=batch_rows, columns=sorted(set(wanted))):
        for obj in batch.to_pylist():
            row_no += 1
            obj = {k: v for k, v in obj.items() if v is not None}
            if not _failed_download(obj, skipped):
                yield _row(obj, fields, synonyms, f"metadata {path} row {row_no}")


def _yfcc_tags(cell: str, tags: list, bad: list) -> None:
    for raw in cell.split(","):
        if raw:
            text = vocab_mod.decode_percent_tag(raw)
            if text is None:
                bad.append((raw, "invalid_utf8"))
            else:
                tags.append(text)


def _yfcc(path: str, fields: Fields, synonyms: dict, skipped: dict, start: int, end: int) -> Iterator[Row]:
    if fields.yfcc_tags not in YFCC_TAGS:
        raise ValueError(f"yfcc_tags {fields.yfcc_tags!r}: expected one of {', '.join(YFCC_TAGS)}")
    template = fields.path_template or YFCC_DEFAULT_TEMPLATE
    for where, line in lines_mod.Lines(path, start, end):
        if not line:
            continue
        cells = line.split("\t")
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
        tags: list = []
        bad: list = []
        if fields.yfcc_tags in ("user", "both"):
            _yfcc_tags(obj["user_tags"], tags, bad)
        if fields.yfcc_tags in ("machine", "both"):
            _yfcc_tags(obj["machine_tags"], tags, bad)
        tags, replaced = vocab_mod.normalize_tags(tags)
        yield Row(obj["id"], fill_template(template, obj, where), vocab_mod.canonicalize(tags, synonyms),
                  bad_tags=bad + replaced)


def _webdataset(path: str, rel: str, fields: Fields, synonyms: dict, skipped: dict) -> Iterator[Row]:
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
        where = f"metadata {path}:{base}"
        obj: dict = {}
        if "json" in g:
            try:
                loaded = json.loads(g["json"])
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}.json: invalid JSON ({e.msg})") from None
            if isinstance(loaded, dict):
                obj.update(loaded)
        if _failed_download(obj, skipped) or "image" not in g:
            continue  # members without an image and no status (a stray .txt) are not samples
        if "txt" in g:
            obj[fields.caption] = g["txt"]
        obj.setdefault(fields.caption, "")
        key = str(obj.get(fields.key) or base.rsplit("/", 1)[-1])
        tags, bad = _row_tags(obj, fields, where)
        yield Row(key, rel, vocab_mod.canonicalize(tags, synonyms), g["image"][0], g["image"][1], bad)


SPLITTABLE = ("jsonl", "yfcc100m")  # a line is a row; a CSV cell may hold a line break


def read_ranges(path: str, fmt: str, split_bytes: int) -> list[tuple[int, int]]:
    """The byte ranges one input file is read in, one task each (lines.byte_ranges)."""
    return lines_mod.byte_ranges(path, split_bytes) if fmt in SPLITTABLE else [(0, -1)]


def rows_of_file(path: str, images: str, fmt: str, fields: Fields, synonyms: dict,
                 skipped: Optional[dict] = None, start: int = 0, end: int = -1) -> Iterator[Row]:
    """The rows of one input file of a resolved format (see input_files), or of the
    lines starting in its byte range [start, end) (read_ranges)."""
    skipped = {} if skipped is None else skipped
    if fmt == "jsonl":
        yield from _jsonl(path, fields, synonyms, skipped, start, end)
    elif fmt in ("csv", "tsv"):
        tab = fmt == "tsv" or lines_mod.strip_suffix(path).lower().endswith(".tsv")
        yield from _csv(path, fields, synonyms, skipped, tab)
    elif fmt == "parquet":
        yield from _parquet(path, fields, synonyms, skipped)
    elif fmt == "yfcc100m":
        yield from _yfcc(path, fields, synonyms, skipped, start, end)
    elif fmt == "webdataset":
        rel = os.path.relpath(os.path.abspath(path), os.path.abspath(images))
        yield from _webdataset(path, rel, fields, synonyms, skipped)
    else:
        raise AssertionError(fmt)


def iter_rows(metadata: str, images: str, fmt: str, fields: Fields, synonyms: dict,
              skipped: Optional[dict] = None) -> Iterator[Row]:
    """Every row of the metadata, in order. `skipped` counts rows left out on
    purpose (YFCC100M videos: "video"; failed downloads: "status:<status>"), by reason."""
    fmt = detect_format(metadata, fmt)
    for path in input_files(metadata, fmt):
        yield from rows_of_file(path, images, fmt, fields, synonyms, skipped)


def write_parts(task: dict) -> dict:
    """Build stage 0, one task per input file or byte range of one: its rows as Parquet
    parts of at most `chunk` rows (key, path, offset, size, tags, bad_tags as
    [tag, reason] pairs) in task["out_dir"], one part in memory at a time; done.json,
    written last, lists them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("key", pa.string()), ("path", pa.string()), ("offset", pa.int64()), ("size", pa.int64()),
                        ("tags", pa.list_(pa.string())), ("bad_tags", pa.list_(pa.list_(pa.string())))])
    os.makedirs(task["out_dir"], exist_ok=True)
    skipped: dict = {}
    parts: list = []  # [file name, rows]
    buf: list = []

    def flush():
        cols = list(zip(*[(r.key, r.path, r.offset, r.size, r.tags, [list(b) for b in r.bad_tags]) for r in buf]))
        name = "part-%06d.parquet" % len(parts)
        path = os.path.join(task["out_dir"], name)
        pq.write_table(pa.table([pa.array(c, t) for c, t in zip(cols, schema.types)], schema=schema), path + ".tmp")
        os.replace(path + ".tmp", path)
        parts.append([name, len(buf)])
        buf.clear()

    fields = Fields(**task["fields"])
    for row in rows_of_file(task["file"], task["images"], task["format"], fields, task["synonyms"], skipped,
                            task.get("start", 0), task.get("end", -1)):
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

