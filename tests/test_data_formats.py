"""Metadata formats users already have: YFCC100M's dataset file, Parquet with
img2dataset/LAION columns, img2dataset webdataset tars; each builds a dataset
that trains."""

import bz2
import gzip
import io
import json
import lzma
import os
import tarfile

import numpy as np
import pytest

from engine.data import metadata as meta_mod
from engine.data.builder import BuildConfig, build
from engine.data.dataset import HashtagDataset
from engine.data.synthetic import _image, _jpeg

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")

TAGS = ["beach", "sunset", "new york", "dog", "cat"]


def _jpegs(n: int, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    return [_jpeg(_image(rng, 40 + (i % 3) * 8, 48, i % 5), 90) for i in range(n)]


def _yfcc_line(i: int, photo_hash: str, user_tags: list[str], machine_tags: list[str], video: bool,
               user_cell: str = "") -> str:
    from urllib.parse import quote_plus

    cells = [str(i), str(1000 + i), photo_hash, "12345678@N00", "someone", "2012-02-16 09:56:37.0", "1331840483",
             "Canon+PowerShot", "title", "a+description", user_cell or ",".join(quote_plus(t) for t in user_tags),
             ",".join(quote_plus(t) for t in machine_tags), "", "", "", f"http://www.flickr.com/photos/x/{1000 + i}/",
             f"http://farm8.staticflickr.com/7205/{1000 + i}_abc.jpg", "Attribution License",
             "http://creativecommons.org/licenses/by/2.0/", "7205", "8", "abc", "def", "jpg", "1" if video else "0"]
    assert len(cells) == 25
    return "\t".join(cells)


def _yfcc_path(i: int) -> str:
    h = "%032x" % (0xABCDEF0123 + i * 7919)
    return f"{h[:3]}/{h[3:6]}/{h}.jpg"


@pytest.fixture(scope="module")
def yfcc(tmp_path_factory):
    """A 25-field YFCC100M file, images in the multimedia-commons layout, one video."""
    root = tmp_path_factory.mktemp("yfcc")
    images = root / "images"
    lines = []
    for i, data in enumerate(_jpegs(24)):
        h = "%032x" % (0xABCDEF0123 + i * 7919)
        user = [TAGS[i % 5], TAGS[(i + 2) % 5]]
        machine = ["vision:outdoor=099"] if i % 2 else []
        path = images / _yfcc_path(i)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        # Line 3: "café" composed and decomposed (one tag), and Latin-1 escapes (not UTF-8: rejected).
        cell = "dog,caf%C3%A9,Cafe%CC%81,%E9t%E9" if i == 3 else ""
        lines.append(_yfcc_line(i, h, user, machine, video=False, user_cell=cell))
    lines.append(_yfcc_line(99, "f" * 32, ["video"], [], video=True))  # no file: a video must never be looked up
    text = ("\n".join(lines) + "\n").encode()
    (root / "yfcc100m_dataset").write_bytes(text)
    for suffix, compress in _COMPRESSORS.items():  # as distributed: yfcc100m_dataset.bz2
        (root / ("yfcc100m_dataset" + suffix)).write_bytes(compress(text))
    return root


def _zstd(data: bytes) -> bytes:
    import zstandard

    return zstandard.ZstdCompressor().compress(data)


_COMPRESSORS = {".bz2": bz2.compress, ".gz": gzip.compress, ".xz": lzma.compress, ".zst": _zstd}


def _cfg(images, metadata, out, **kw) -> BuildConfig:
    return BuildConfig(images=str(images), metadata=str(metadata), out=str(out), vocab_size=50, shard_size=8,
                       workers=1, progress=False, validate_with="torchvision", **kw)


def test_yfcc100m_rows_tags_and_videos(yfcc):
    fields = meta_mod.Fields(yfcc_tags="both")
    skipped = {}
    rows = list(meta_mod.iter_rows(str(yfcc / "yfcc100m_dataset"), str(yfcc / "images"), "yfcc100m", fields, {},
                                   skipped))
    assert len(rows) == 24 and skipped == {"video": 1}
    r = rows[2]  # user tags URL-encoded: "new+york" is the tag "new york"
    assert r.key == "1002" and r.tags == ["new york", "cat"]
    assert r.path == _yfcc_path(2)
    assert rows[1].tags == ["sunset", "dog", "vision:outdoor=099"]
    assert rows[3].tags == ["dog", "café", "vision:outdoor=099"] and rows[3].bad_tags == [("%E9t%E9", "invalid_utf8")]
    user = list(meta_mod.iter_rows(str(yfcc / "yfcc100m_dataset"), "", "yfcc100m", meta_mod.Fields(), {}))
    machine = list(meta_mod.iter_rows(str(yfcc / "yfcc100m_dataset"), "", "yfcc100m",
                                      meta_mod.Fields(yfcc_tags="machine"), {}))
    assert user[1].tags == ["sunset", "dog"] and machine[1].tags == ["vision:outdoor=099"] and machine[0].tags == []


def test_yfcc100m_split_into_a_directory_reads_the_same_rows(yfcc, tmp_path):
    lines = (yfcc / "yfcc100m_dataset").read_text().splitlines(keepends=True)
    (tmp_path / "pieces").mkdir()
    (tmp_path / "pieces" / "yfcc-00").write_text("".join(lines[:10]))  # as `split -l 10 -d` names them
    (tmp_path / "pieces" / "yfcc-01").write_text("".join(lines[10:]))
    whole = meta_mod.iter_rows(str(yfcc / "yfcc100m_dataset"), "", "yfcc100m", meta_mod.Fields(), {})
    pieces = meta_mod.iter_rows(str(tmp_path / "pieces"), "", "yfcc100m", meta_mod.Fields(), {})
    assert [(r.key, r.path, r.tags) for r in pieces] == [(r.key, r.path, r.tags) for r in whole]
    assert meta_mod.input_files(str(tmp_path / "pieces"), "yfcc100m")[0].endswith("yfcc-00")


def test_yfcc100m_bad_lines_name_the_line(tmp_path):
    bad = tmp_path / "yfcc"
    bad.write_text(_yfcc_line(0, "a" * 32, ["x"], [], False) + "\nonly\tthree\tfields\n")
    with pytest.raises(ValueError, match=r"yfcc:2: a YFCC100M line has 25 \(or 23\) tab-separated fields, this one has 3"):
        list(meta_mod.iter_rows(str(bad), "", "yfcc100m", meta_mod.Fields(), {}))
    with pytest.raises(ValueError, match="path template .* needs field 'nope'"):
        list(meta_mod.iter_rows(str(bad), "", "yfcc100m", meta_mod.Fields(path_template="{nope}.jpg"), {}))


@pytest.fixture(scope="module")
def parquet_set(tmp_path_factory):
    """img2dataset's 'files' output: <shard>/<key>.jpg, with a Parquet of key/url/caption."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("pq")
    keys, captions = [], []
    for i, data in enumerate(_jpegs(20, seed=1)):
        key = "00000%04d" % i
        (root / "00000").mkdir(exist_ok=True)
        (root / "00000" / f"{key}.jpg").write_bytes(data)
        keys.append(key)
        captions.append(f"a photo #{TAGS[i % 5].replace(' ', '')} and #{TAGS[(i + 1) % 5].replace(' ', '')}")
    status = ["success"] * len(keys)
    for key in ("000000020", "000000021"):  # img2dataset lists failed downloads too; their files do not exist
        keys.append(key)
        captions.append("#beach")
        status.append("failed_to_download")
    table = pa.table({"key": keys, "url": [f"http://x/{k}" for k in keys], "caption": captions,
                      "shard": ["00000"] * len(keys), "status": status})
    pq.write_table(table, root / "00000.parquet", row_group_size=7)
    return root


def test_parquet_with_configurable_columns(parquet_set):
    skipped = {}
    rows = list(meta_mod.iter_rows(str(parquet_set / "00000.parquet"), str(parquet_set), "auto",
                                   meta_mod.Fields(path_template="{shard}/{key}.jpg"), {}, skipped))
    assert skipped == {"status:failed_to_download": 2}
    assert [r.key for r in rows] == ["00000%04d" % i for i in range(20)]
    assert rows[3].path == "00000/000000003.jpg" and rows[3].tags == ["dog", "cat"] and rows[4].tags == ["cat", "beach"]
    with pytest.raises(ValueError, match="no 'path' column"):
        list(meta_mod.iter_rows(str(parquet_set / "00000.parquet"), "", "parquet", meta_mod.Fields(), {}))


def _tar_add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


@pytest.fixture(scope="module")
def wds(tmp_path_factory):
    """img2dataset webdataset output: 00000.tar, 00001.tar with <key>.jpg/.txt/.json;
    one sample whose download failed has no .jpg."""
    root = tmp_path_factory.mktemp("wds")
    images = _jpegs(18, seed=2)
    for shard in range(2):
        with tarfile.open(root / ("%05d.tar" % shard), "w") as tar:
            for j in range(9):
                i = shard * 9 + j
                key = "%05d%04d" % (shard, j)
                caption = f"photo {i} #{TAGS[i % 5].replace(' ', '')}"
                if j == 4 and shard == 1:  # failed download: json only
                    _tar_add(tar, f"{key}.json", json.dumps({"key": key, "status": "failed"}).encode())
                    continue
                _tar_add(tar, f"{key}.jpg", images[i])
                if i % 2:
                    _tar_add(tar, f"{key}.txt", caption.encode())
                    _tar_add(tar, f"{key}.json", json.dumps({"key": key, "url": "u"}).encode())
                else:
                    _tar_add(tar, f"{key}.json", json.dumps({"key": key, "caption": caption}).encode())
    return root, images


def test_webdataset_tars_are_read_in_place(wds):
    root, images = wds
    rows = list(meta_mod.iter_rows(str(root), str(root), "auto", meta_mod.Fields(), {}))
    assert len(rows) == 17 and rows[0].key == "000000000" and rows[-1].key == "000010008"
    for r in rows:
        i = int(r.key[:5]) * 9 + int(r.key[5:])
        assert r.path == "%05d.tar" % int(r.key[:5]) and r.tags == [TAGS[i % 5].replace(" ", "")]
        data, why = meta_mod.read_member(str(root / r.path), r.offset, r.size, 1 << 20)
        assert why is None and data == images[i]  # the byte range is exactly the image


def _train_two_steps(dataset: str, tmp_path) -> dict:
    from engine.config import apply_overrides, get_preset
    from engine.train import train

    cfg = apply_overrides(get_preset("test"), [f"data.dataset={dataset}", f"train.out_dir={tmp_path / 'run'}",
                                               "train.steps=2", "optim.warmup_steps=1", "train.batch_size=4", "data.backend=torch",
                                               "train.resume=never"])
    return train(cfg)


@pytest.mark.parametrize("kind", ["yfcc100m", "parquet", "webdataset"])
def test_each_format_builds_a_dataset_that_trains(kind, yfcc, parquet_set, wds, tmp_path):
    if kind == "yfcc100m":
        # The file as distributed, bz2-compressed, read as it is.
        cfg = _cfg(yfcc / "images", yfcc / "yfcc100m_dataset.bz2", tmp_path / "ds", format="yfcc100m",
                   yfcc_tags="both")
        expect = 24
    elif kind == "parquet":
        cfg = _cfg(parquet_set, parquet_set / "00000.parquet", tmp_path / "ds", path_template="{shard}/{key}.jpg")
        expect = 20
    else:
        cfg = _cfg(wds[0], wds[0], tmp_path / "ds")
        expect = 17
    report = build(cfg)
    assert report["written"] == expect and report["skipped"] == {}  # failed downloads are not "missing"
    assert report["skipped_by_status"] == {"yfcc100m": {}, "parquet": {"failed_to_download": 2},
                                           "webdataset": {"failed": 1}}[kind]
    if kind == "yfcc100m":
        assert report["not_images"] == {"video": 1} and report["tags_rejected"] == {"invalid_utf8": 1}
        with open(tmp_path / "ds" / "rejected.jsonl", encoding="utf-8") as f:
            assert {"key": "1003", "path": _yfcc_path(3), "action": "tag_rejected",
                    "reason": "invalid_utf8", "tag": "%E9t%E9"} in [json.loads(line) for line in f]
    ds = HashtagDataset(str(tmp_path / "ds"))
    assert ds.num_samples == expect
    if kind == "webdataset":  # shards hold the very bytes of the source tars
        _, images = wds
        assert sorted(ds.read(i) for i in range(ds.num_samples)) == sorted(images[:13] + images[14:])
    summary = _train_two_steps(str(tmp_path / "ds"), tmp_path)
    assert summary["status"] == "completed" and np.isfinite(summary["final_loss"]), summary


def test_webdataset_read_per_tar_and_cut_into_any_parts_gives_the_same_dataset(wds, tmp_path):
    """A read task per tar writes its own parts (short ones at each tar's end): how the
    rows are cut into parts changes no output byte."""
    root, _ = wds
    small = build(_cfg(root, root, tmp_path / "small", chunk_size=3))
    large = build(_cfg(root, root, tmp_path / "large", chunk_size=100))
    assert small["written"] == large["written"] == 17
    names = []
    for dirpath, dirnames, filenames in os.walk(tmp_path / "large"):
        dirnames[:] = [d for d in dirnames if d != ".build"]
        names += [os.path.relpath(os.path.join(dirpath, n), tmp_path / "large") for n in filenames]
    assert "index/keys.txt" in names and "report.json" in names
    for name in names:
        assert (tmp_path / "small" / name).read_bytes() == (tmp_path / "large" / name).read_bytes(), name
    parts = sorted(os.listdir(tmp_path / "small" / ".build" / "rows"))
    assert parts[:2] == ["done.json", "file-000000"] and "file-000001" in parts  # one read task per tar
    # The parts, in the order the plan numbers them, hold the rows in metadata order.
    import pyarrow.parquet as pq

    with open(tmp_path / "small" / ".build" / "rows" / "done.json") as f:
        listed = json.load(f)["parts"]
    keys = [k for p in listed for k in pq.read_table(p, columns=["key"]).column("key").to_pylist()]
    want = ["%05d%04d" % (s, j) for s in range(2) for j in range(9) if (s, j) != (1, 4)]
    assert keys == want and len(listed) == 6  # 9 + 8 rows in parts of 3


def _keyed(rows) -> list:
    return [(r.key, r.path, r.tags, r.bad_tags) for r in rows]


def test_compressed_metadata_is_read_as_shipped_by_magic_bytes(yfcc, tmp_path):
    whole = _keyed(meta_mod.iter_rows(str(yfcc / "yfcc100m_dataset"), "", "yfcc100m", meta_mod.Fields(), {}))
    for suffix in _COMPRESSORS:
        assert _keyed(meta_mod.iter_rows(str(yfcc / ("yfcc100m_dataset" + suffix)), "", "yfcc100m",
                                         meta_mod.Fields(), {})) == whole, suffix
    renamed = tmp_path / "yfcc100m_dataset"  # bz2 content under a plain name: the bytes decide, not the name
    renamed.write_bytes((yfcc / "yfcc100m_dataset.bz2").read_bytes())
    assert _keyed(meta_mod.iter_rows(str(renamed), "", "yfcc100m", meta_mod.Fields(), {})) == whole
    # A compressed JSONL with img2dataset statuses: format from the name under .gz.
    lines = [{"path": "a.jpg", "caption": "#Ok", "status": "success"}, {"path": "b.jpg", "status": "failed_to_resize"}]
    (tmp_path / "m.jsonl.gz").write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in lines).encode()))
    skipped = {}
    rows = list(meta_mod.iter_rows(str(tmp_path / "m.jsonl.gz"), "", "auto", meta_mod.Fields(), {}, skipped))
    assert _keyed(rows) == [("a.jpg", "a.jpg", ["ok"], [])] and skipped == {"status:failed_to_resize": 1}


def test_decode_errors_name_the_file_the_line_and_the_fix(yfcc, tmp_path):
    good = (yfcc / "yfcc100m_dataset").read_bytes().split(b"\n")
    latin1 = tmp_path / "latin1"
    latin1.write_bytes(b"\n".join(good[:4] + [good[4].replace(b"title", b"caf\xe9")] + good[5:]))
    with pytest.raises(ValueError, match=r"latin1:5: not UTF-8 \(byte 0xe9 at column \d+\); .*iconv -f WINDOWS-1252"):
        list(meta_mod.iter_rows(str(latin1), "", "yfcc100m", meta_mod.Fields(), {}))
    packed = (yfcc / "yfcc100m_dataset.bz2").read_bytes()
    cut = tmp_path / "cut.bz2"
    cut.write_bytes(packed[: len(packed) // 2])
    with pytest.raises(ValueError, match=r"cut.bz2:\d+: the bz2 stream breaks here .*truncated or corrupt.*bzip2 -t"):
        list(meta_mod.iter_rows(str(cut), "", "yfcc100m", meta_mod.Fields(), {}))
    zipped = tmp_path / "m.jsonl"
    zipped.write_bytes(b"PK\x03\x04\x14\x00\x00\x00\x08\x00" + bytes(range(14, 31)) + b"\xff\n")
    with pytest.raises(ValueError, match=r"m.jsonl:1: not UTF-8 .*looks binary.*decompress it first"):
        list(meta_mod.iter_rows(str(zipped), "", "jsonl", meta_mod.Fields(), {}))


def test_byte_ranges_read_every_line_once_from_its_own_range(yfcc, tmp_path):
    path = str(yfcc / "yfcc100m_dataset")
    data = (yfcc / "yfcc100m_dataset").read_bytes()
    whole = _keyed(meta_mod.iter_rows(path, "", "yfcc100m", meta_mod.Fields(), {}))
    line_start = data.index(b"\n", 1000) + 1  # cuts at a line start, just after one, just before one, mid-line
    for cuts in ([0, line_start, line_start + 40, len(data)], [0, 500, line_start + 1, len(data) - 3, len(data)],
                 [0, line_start - 1, len(data)]):
        got, skipped = [], {}
        for start, end in zip(cuts, cuts[1:]):
            got += _keyed(meta_mod.rows_of_file(path, "", "yfcc100m", meta_mod.Fields(), {}, skipped, start, end))
        assert got == whole and skipped == {"video": 1}, cuts
    ranges = meta_mod.read_ranges(path, "yfcc100m", 1000)
    assert len(ranges) == -(-len(data) // 1000) and ranges[0][0] == 0 and ranges[-1][1] == len(data)
    assert meta_mod.read_ranges(str(yfcc / "yfcc100m_dataset.bz2"), "yfcc100m", 1000) == [(0, -1)]
    bad = tmp_path / "bad"  # an error in a later range names the line of the whole file
    bad.write_bytes(data + b"only\tthree\tfields\n")
    last = meta_mod.read_ranges(str(bad), "yfcc100m", 1000)[-1]
    with pytest.raises(ValueError, match=r"bad:26: a YFCC100M line has 25"):
        list(meta_mod.rows_of_file(str(bad), "", "yfcc100m", meta_mod.Fields(), {}, {}, *last))


def test_one_plain_file_read_by_several_tasks_and_the_hashtag_rule_in_the_fingerprint(yfcc, tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    from engine.data import vocab
    from engine.data.write import BuildError

    cfg = _cfg(yfcc / "images", yfcc / "yfcc100m_dataset", tmp_path / "ds", format="yfcc100m", split_bytes=2000,
               chunk_size=5)
    assert build(cfg)["written"] == 24
    with open(tmp_path / "ds" / ".build" / "rows" / "done.json") as f:
        parts = json.load(f)["parts"]
    assert len({os.path.dirname(p) for p in parts}) > 1  # more than one read task
    keys = [k for p in parts for k in pq.read_table(p, columns=["key"]).column("key").to_pylist()]
    assert keys == [str(1000 + i) for i in range(24)]  # every row once, in file order
    # Another hashtag rule reads the same metadata into other hashtags: never mixed with this build.
    monkeypatch.setattr(vocab, "RULE", vocab.RULE + " changed")
    with pytest.raises(BuildError, match="other inputs or settings"):
        build(cfg)
