"""The dataset builder end to end on a synthetic set holding every kind of bad file."""

import json
import os
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
import torch
from torchvision.io import ImageReadMode, decode_jpeg

from engine.data import jpeg as jpeg_mod
from engine.data.builder import BuildConfig, BuildError, build
from engine.data.dataset import HashtagDataset, sample_key
from engine.data.synthetic import synth
from engine.data.vocab import canonicalize, extract_hashtags, load_synonyms, normalize_tag

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(raw: dict, out, **kw) -> BuildConfig:
    base = dict(images=raw["images"], metadata=raw["metadata"], out=str(out), vocab_size=100,
                synonyms=raw["synonyms"], eval_set=raw["eval_set"], shard_size=16, workers=1, progress=False)
    base.update(kw)
    return BuildConfig(**base)


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    root = tmp_path_factory.mktemp("raw")
    info = synth(str(root), n_images=60, vocab_size=20, seed=0, progress=False)
    with open(info["expected"]) as f:
        info["exp"] = json.load(f)
    return info


@pytest.fixture(scope="module")
def built(raw, tmp_path_factory):
    out = tmp_path_factory.mktemp("built") / "ds"
    report = build(_config(raw, out, workers=2))  # worker processes, as in production
    return str(out), report


def test_report_counts_every_bad_file(raw, built):
    out, report = built
    exp = raw["exp"]
    want_skipped, want_reencoded = {}, {}
    for key, e in exp["zoo"].items():
        if e["action"] == "skipped":
            want_skipped.setdefault(e["reason"], []).append(key)
        elif e["action"] == "reencoded":
            want_reencoded.setdefault(e["reason"], []).append(key)
    assert report["skipped"] == {r: len(k) for r, k in want_skipped.items()}
    assert report["reencoded"] == {r: len(k) for r, k in want_reencoded.items()}
    for r, keys in want_skipped.items():
        assert sorted(report["keys"]["skipped"][r]["keys"]) == sorted(keys)
    for r, keys in want_reencoded.items():
        assert sorted(report["keys"]["reencoded"][r]["keys"]) == sorted(keys)
    assert report["dropped"] == {"in_eval_set": len(exp["eval_overlap"]), "duplicate": len(exp["duplicates"]),
                                 "no_hashtag": len(exp["no_hashtag"])}
    assert sorted(report["keys"]["duplicate"]["keys"]) == sorted(exp["duplicates"])
    assert sorted(report["keys"]["in_eval_set"]["keys"]) == sorted(exp["eval_overlap"])
    assert sorted(report["keys"]["no_hashtag"]["keys"]) == sorted(exp["no_hashtag"])
    n_skipped = sum(report["skipped"].values())
    assert report["written"] == exp["rows"] - n_skipped - sum(report["dropped"].values())
    assert report["valid_as_is"] + sum(report["reencoded"].values()) + n_skipped == exp["rows"]
    with open(os.path.join(out, "report.json")) as f:
        assert json.load(f)["written"] == report["written"]
    rejected = [json.loads(line) for line in open(os.path.join(out, "rejected.jsonl"))]
    assert len(rejected) == n_skipped + sum(report["reencoded"].values()) + sum(report["dropped"].values())
    assert "torchvision and DALI" in report["validation"]


def test_shards_hold_only_valid_decodable_samples(built):
    out, report = built
    ds = HashtagDataset(out)
    assert ds.num_samples == report["written"]
    assert ds.num_shards == -(-ds.num_samples // 16)
    seen = []
    checker = jpeg_mod.DaliChecker(batch_size=16) if jpeg_mod.dali_available() is None else None
    for s, path in enumerate(ds.shard_paths):
        with tarfile.open(path) as tar:
            names = tar.getnames()
            jpgs = [tar.extractfile(n).read() for n in names if n.endswith(".jpg")]
        assert names == [f"{sample_key(i)}.{ext}" for i in range(s * 16, s * 16 + len(jpgs)) for ext in ("jpg", "tags")]
        for data in jpgs:
            info = jpeg_mod.parse_jpeg_header(data)
            assert info.components in (1, 3) and info.sof in (0xC0, 0xC1) and info.has_eoi
            with jpeg_mod.captured_stderr() as err:
                decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
            assert not err[0], err[0]
        if checker is not None:
            assert all(shape is not None for shape in checker.shapes(jpgs))
        seen += jpgs
    assert len(seen) == ds.num_samples
    for i in range(ds.num_samples):  # the index points at the same bytes, with the decoded size
        assert ds.read(i) == seen[i]
        image = decode_jpeg(torch.frombuffer(bytearray(seen[i]), dtype=torch.uint8), apply_exif_orientation=True)
        assert tuple(image.shape[1:]) == (int(ds.height[i]), int(ds.width[i]))


def test_dali_index_matches_dali_tool_and_reader(built):
    out, _ = built
    ds = HashtagDataset(out)
    import shutil

    tool = shutil.which("wds2idx") or os.path.join(os.path.dirname(sys.executable), "wds2idx")
    if os.path.exists(tool):
        ref = os.path.join(out, "ref.idx")
        subprocess.run([tool, ds.shard_paths[1], ref], check=True, capture_output=True)
        assert open(ref).read() == open(ds.index_paths[1]).read()
        os.remove(ref)
    dali = pytest.importorskip("nvidia.dali", reason="nvidia-dali-cuda130 is not installed")
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types

    @dali.pipeline_def(batch_size=ds.num_samples, num_threads=1, device_id=None)
    def pipe():
        jpg, tags = fn.readers.webdataset(paths=ds.shard_paths, index_paths=ds.index_paths, ext=["jpg", "tags"],
                                          dtypes=[types.UINT8, types.INT32], random_shuffle=False, name="r")
        return jpg, tags

    p = pipe()
    p.build()
    jpgs, tags = p.run()
    for i in range(ds.num_samples):
        assert np.array(jpgs[i]).tobytes() == ds.read(i)
        assert np.array(tags[i]).tolist() == ds.tags_of(i).tolist()


def test_tags_round_trip_and_vocab(raw, built):
    out, report = built
    ds = HashtagDataset(out)
    synonyms = load_synonyms(raw["synonyms"])
    rows = {}
    for line in open(raw["metadata"], encoding="utf-8"):
        r = json.loads(line)
        tags = [normalize_tag(t) for t in r["tags"]] if "tags" in r else extract_hashtags(r["caption"])
        rows[r["path"]] = canonicalize(tags, synonyms)
    vocab = json.load(open(os.path.join(out, "vocab.json"), encoding="utf-8"))
    assert vocab["hashtags"] == ds.hashtags and len(ds.hashtags) == report["vocab"]["size"]
    assert all(vocab["hashtag_to_id"][t] == i for i, t in enumerate(ds.hashtags))
    assert "café" in ds.hashtags and "strasse" in ds.hashtags and "東京" in ds.hashtags
    assert not any(t.endswith("_alt") for t in ds.hashtags)  # synonyms folded
    assert not any(t != t.casefold() for t in ds.hashtags)
    keys = ds.keys()
    counts = np.zeros(ds.vocab_size, dtype=np.int64)
    for i, key in enumerate(keys):
        names = [ds.hashtags[t] for t in ds.tags_of(i)]
        assert names == rows[key]  # K covers the synthetic vocabulary: every tag kept, in order
        counts[ds.tags_of(i)] += 1
        with tarfile.open(ds.shard_paths[int(ds.shard[i])]) as tar:
            raw_tags = tar.extractfile(f"{sample_key(i)}.tags").read()
        assert np.frombuffer(raw_tags, dtype="<i4").tolist() == ds.tags_of(i).tolist()
    assert counts.tolist() == vocab["counts"]
    assert vocab["counts"] == sorted(vocab["counts"], reverse=True)
    expect_w = np.array([(1.0 / np.sqrt(counts[ds.tags_of(i)])).sum() for i in range(ds.num_samples)])
    np.testing.assert_allclose(ds.weight, expect_w)
    np.testing.assert_allclose(ds.weight_cdf, np.cumsum(expect_w))
    assert ds.max_tags == max(len(ds.tags_of(i)) for i in range(ds.num_samples))


def test_small_vocab_drops_images_left_without_hashtag(raw, tmp_path):
    report = build(_config(raw, tmp_path / "k3", vocab_size=3, eval_set=None))
    ds = HashtagDataset(str(tmp_path / "k3"))
    assert ds.vocab_size == 3
    assert report["dropped"]["no_hashtag"] > len(raw["exp"]["no_hashtag"])
    assert all(len(ds.tags_of(i)) >= 1 for i in range(ds.num_samples))
    assert report["dropped"]["in_eval_set"] == 0
    assert report["written"] + report["dropped"]["no_hashtag"] + report["dropped"]["duplicate"] == (
        report["valid_as_is"] + sum(report["reencoded"].values()))


def test_csv_metadata_and_hash_list_eval_set(tmp_path):
    raw = synth(str(tmp_path / "raw"), n_images=20, vocab_size=8, seed=3, metadata_format="csv", bad_files=False,
                progress=False)
    exp = json.load(open(raw["expected"]))
    import hashlib

    digests = tmp_path / "eval.sha256"  # sha256sum format
    lines = []
    for name in sorted(os.listdir(raw["eval_set"])):
        with open(os.path.join(raw["eval_set"], name), "rb") as f:
            lines.append(f"{hashlib.sha256(f.read()).hexdigest()}  {name}\n")
    digests.write_text("".join(lines))
    report = build(_config(raw, tmp_path / "ds", eval_set=str(digests), validate_with="torchvision"))
    assert report["dropped"]["in_eval_set"] == len(exp["eval_overlap"])
    assert report["validation"] == "validated with torchvision only"
    assert HashtagDataset(str(tmp_path / "ds")).num_samples == report["written"]


def test_same_seed_same_bytes_other_seed_other_order(raw, built, tmp_path):
    out, _ = built
    build(_config(raw, tmp_path / "again"))
    for name in sorted(os.listdir(os.path.join(out, "shards"))):
        assert open(os.path.join(out, "shards", name), "rb").read() == \
            open(tmp_path / "again" / "shards" / name, "rb").read(), name
    build(_config(raw, tmp_path / "seed1", seed=1))
    assert HashtagDataset(str(tmp_path / "seed1")).keys() != HashtagDataset(out).keys()
    assert sorted(HashtagDataset(str(tmp_path / "seed1")).keys()) == sorted(HashtagDataset(out).keys())


def test_resume_after_kill_gives_identical_shards(raw, built, tmp_path):
    out, _ = built
    target = tmp_path / "killed"
    code = (
        "import json, sys; from engine.data.builder import BuildConfig, build; "
        "build(BuildConfig(**json.loads(sys.argv[1])))"
    )
    cfg = dict(images=raw["images"], metadata=raw["metadata"], out=str(target), vocab_size=100,
               synonyms=raw["synonyms"], eval_set=raw["eval_set"], shard_size=16, workers=1, progress=False)
    env = dict(os.environ, ENGINE_DATA_TEST_SHARD_DELAY="1", PYTHONPATH=REPO)
    proc = subprocess.Popen([sys.executable, "-c", code, json.dumps(cfg)], env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    done_dir = target / ".build" / "shards"
    deadline = time.time() + 120
    try:
        while time.time() < deadline:
            if done_dir.is_dir() and len([n for n in os.listdir(done_dir) if n.endswith(".npz")]) >= 2:
                break
            if proc.poll() is not None:
                pytest.fail(f"the build ended before it could be killed: {proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.05)
        else:
            pytest.fail("the build wrote no shard in time")
    finally:
        proc.kill()
        proc.wait()
    assert not (target / "dataset.json").exists()  # an interrupted build is not a dataset
    with pytest.raises(FileNotFoundError, match="not a built dataset"):
        HashtagDataset(str(target))
    report = build(BuildConfig(**cfg))
    assert report["shards"]["reused"] >= 2
    assert report["shards"]["reused"] + report["shards"]["written"] == report["shards"]["count"]
    for sub in ("shards", "index"):
        names = sorted(os.listdir(os.path.join(out, sub)))
        assert names == sorted(os.listdir(target / sub))
        for name in names:
            assert open(os.path.join(out, sub, name), "rb").read() == open(target / sub / name, "rb").read(), name
    assert open(os.path.join(out, "vocab.json")).read() == open(target / "vocab.json").read()
    again = build(BuildConfig(**cfg))  # a finished build reruns as a no-op
    assert again["shards"]["written"] == 0


def test_other_settings_in_the_same_directory_need_overwrite(raw, tmp_path):
    build(_config(raw, tmp_path / "ds"))
    with pytest.raises(BuildError, match="overwrite"):
        build(_config(raw, tmp_path / "ds", vocab_size=5))
    report = build(_config(raw, tmp_path / "ds", vocab_size=5, overwrite=True))
    assert report["vocab"]["size"] == 5 and HashtagDataset(str(tmp_path / "ds")).vocab_size == 5


def test_bad_inputs_raise_naming_them(raw, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl"):
        build(_config(raw, tmp_path / "a", metadata=str(tmp_path / "nowhere.jsonl")))
    with pytest.raises(FileNotFoundError, match="image root"):
        build(_config(raw, tmp_path / "a", images=str(tmp_path / "no_images")))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"path": "img_000000.jpg", "caption": "#a"}\n{"path": "x.jpg", "caption": "#b"\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: invalid JSON"):
        build(_config(raw, tmp_path / "a", metadata=str(bad)))
    bad.write_text('{"caption": "#a"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: missing or empty 'path'"):
        build(_config(raw, tmp_path / "a", metadata=str(bad)))
    bad.write_text('{"path": "img_000000.jpg"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: the row has neither 'caption' nor 'tags'"):
        build(_config(raw, tmp_path / "a", metadata=str(bad)))
    csv_bad = tmp_path / "bad.csv"
    csv_bad.write_text("file,caption\nimg_000000.jpg,#a\n")
    with pytest.raises(ValueError, match=r"bad.csv: the header must name a 'path' column"):
        build(_config(raw, tmp_path / "a", metadata=str(csv_bad)))
    with pytest.raises(ValueError, match="vocab_size"):
        build(_config(raw, tmp_path / "a", vocab_size="lots"))
    with pytest.raises(ValueError, match="shard_size"):
        build(_config(raw, tmp_path / "a", shard_size=0))
    with pytest.raises(FileNotFoundError, match="evaluation set"):
        build(_config(raw, tmp_path / "a", eval_set=str(tmp_path / "no_eval.txt")))
    hashes = tmp_path / "h.txt"
    hashes.write_text("not-a-digest\n")
    with pytest.raises(ValueError, match=r"h.txt:1: expected a sha256"):
        build(_config(raw, tmp_path / "a", eval_set=str(hashes)))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        HashtagDataset(str(tmp_path / "missing_dataset"))
