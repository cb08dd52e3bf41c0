"""Metadata formats users already have: YFCC100M's dataset file, Parquet with
img2dataset/LAION columns, img2dataset webdataset tars; each builds a dataset
that trains."""

import io
import json
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


def _yfcc_line(i: int, photo_hash: str, user_tags: list[str], machine_tags: list[str], video: bool) -> str:
    from urllib.parse import quote_plus

    cells = [str(i), str(1000 + i), photo_hash, "12345678@N00", "someone", "2012-02-16 09:56:37.0", "1331840483",
             "Canon+PowerShot", "title", "a+description", ",".join(quote_plus(t) for t in user_tags),
             ",".join(quote_plus(t) for t in machine_tags), "", "", "", f"http://www.flickr.com/photos/x/{1000 + i}/",
             f"http://farm8.staticflickr.com/7205/{1000 + i}_abc.jpg", "Attribution License",
             "http://creativecommons.org/licenses/by/2.0/", "7205", "8", "abc", "def", "jpg", "1" if video else "0"]
    assert len(cells) == 25
    return "\t".join(cells)


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
        path = images / h[:3] / h[3:6] / f"{h}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        lines.append(_yfcc_line(i, h, user, machine, video=False))
    lines.append(_yfcc_line(99, "f" * 32, ["video"], [], video=True))  # no file: a video must never be looked up
    (root / "yfcc100m_dataset").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


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
    assert r.path == "{0}/{1}/{2}.jpg".format(*(lambda h: (h[:3], h[3:6], h))("%032x" % (0xABCDEF0123 + 2 * 7919)))
    assert rows[1].tags == ["sunset", "dog", "vision:outdoor=099"]
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
    table = pa.table({"key": keys, "url": [f"http://x/{k}" for k in keys], "caption": captions,
                      "shard": ["00000"] * len(keys)})
    pq.write_table(table, root / "00000.parquet", row_group_size=7)
    return root


def test_parquet_with_configurable_columns(parquet_set):
    rows = list(meta_mod.iter_rows(str(parquet_set / "00000.parquet"), str(parquet_set), "auto",
                                   meta_mod.Fields(path_template="{shard}/{key}.jpg"), {}))
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
        cfg = _cfg(yfcc / "images", yfcc / "yfcc100m_dataset", tmp_path / "ds", format="yfcc100m", yfcc_tags="both")
        expect = 24
    elif kind == "parquet":
        cfg = _cfg(parquet_set, parquet_set / "00000.parquet", tmp_path / "ds", path_template="{shard}/{key}.jpg")
        expect = 20
    else:
        cfg = _cfg(wds[0], wds[0], tmp_path / "ds")
        expect = 17
    report = build(cfg)
    assert report["written"] == expect and report["skipped"] == {}
    if kind == "yfcc100m":
        assert report["not_images"] == {"video": 1}
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
