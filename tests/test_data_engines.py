"""Both build engines: the same inputs give byte-identical datasets on the local
process pool and on Ray Data (a local cluster started by the test), and a Ray
build whose driver and cluster are killed mid-scan and mid-write resumes, redoing
only unfinished parts, to the same bytes."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from engine.data.builder import BuildConfig, build
from engine.data.synthetic import synth

pytestmark = [pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data.context")]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    return synth(str(tmp_path_factory.mktemp("raw")), n_images=60, vocab_size=20, seed=0, progress=False)


def _cfg(raw: dict, out, **kw) -> dict:
    base = dict(images=raw["images"], metadata=raw["metadata"], out=str(out), vocab_size=100,
                synonyms=raw["synonyms"], eval_set=raw["eval_set"], shard_size=16, workers=2, progress=False,
                chunk_size=16, plan_buckets=3, validate_with="torchvision")
    base.update(kw)
    return base


def _outputs(root) -> dict:
    """Every file of a built dataset (its .build working directory aside), by relative path."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d != ".build"]
        for name in filenames:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


def _assert_same(a, b) -> None:
    fa, fb = _outputs(a), _outputs(b)
    assert sorted(fa) == sorted(fb)
    assert {"dataset.json", "vocab.json", "report.json", "rejected.jsonl", "index/keys.txt",
            "index/weight_cdf.npy", "shards/shard-000000.tar", "shards/shard-000000.idx"} <= set(fa)
    different = [name for name in fa if fa[name] != fb[name]]
    assert not different, different


@pytest.fixture(scope="module")
def local_build(raw, tmp_path_factory):
    out = tmp_path_factory.mktemp("local") / "ds"
    report = build(BuildConfig(**_cfg(raw, out)))
    return str(out), report


def _ray_processes() -> set:
    r = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True)
    return {int(line.split()[0]) for line in r.stdout.splitlines() if "raylet" in line or "gcs_server" in line}


def _no_new_ray_processes(before: set, wait_s: float = 30.0) -> bool:
    """Ray's node processes share the fate of the driver that started them (they are
    told when their parent dies); give them a moment to go."""
    deadline = time.time() + wait_s
    while time.time() < deadline:
        if _ray_processes() <= before:
            return True
        time.sleep(0.5)
    return False


@pytest.mark.slow
def test_ray_and_local_engines_write_identical_datasets(raw, local_build, tmp_path):
    before = _ray_processes()
    out, local = local_build
    report = build(BuildConfig(**_cfg(raw, tmp_path / "ray", engine="ray")))
    assert report["engine"] == "ray" and report["written"] == local["written"] > 0
    assert report["dropped"]["duplicate"] > 0 and report["skipped"]  # the plan had work to do
    _assert_same(out, tmp_path / "ray")
    assert len(report["peak_rss_bytes"]) >= 2  # the driver and at least one Ray worker
    assert _no_new_ray_processes(before)  # the cluster the build started is gone


def _start(cfg: dict, env: dict) -> subprocess.Popen:
    code = "import json, sys; from engine.data.builder import BuildConfig, build; build(BuildConfig(**json.loads(sys.argv[1])))"
    return subprocess.Popen([sys.executable, "-c", code, json.dumps(cfg)], cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO, **env),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)


def _kill_when(proc: subprocess.Popen, directory, suffix: str, count: int) -> None:
    """Waits until `count` files ending in `suffix` exist, then kills the build's whole
    session: the driver and the Ray workers and node processes it started."""
    deadline = time.time() + 180
    try:
        while time.time() < deadline:
            if directory.is_dir() and len([n for n in os.listdir(directory) if n.endswith(suffix)]) >= count:
                return
            if proc.poll() is not None:
                pytest.fail(f"the build ended before it could be killed: {proc.stderr.read().decode()[-3000:]}")
            time.sleep(0.1)
        pytest.fail(f"the build wrote {count} {suffix} files in {directory} too late")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.mark.slow
def test_ray_build_killed_mid_scan_and_mid_write_resumes_to_the_same_bytes(raw, local_build, tmp_path):
    out, local = local_build
    target = tmp_path / "killed"
    cfg = _cfg(raw, target, engine="ray")
    scan_dir = target / ".build" / "scan"
    before = _ray_processes()

    _kill_when(_start(cfg, {"ENGINE_DATA_TEST_SCAN_DELAY": "2"}), scan_dir, ".parquet", 2)
    scanned = {n: os.stat(scan_dir / n).st_mtime_ns for n in os.listdir(scan_dir) if n.endswith(".parquet")}
    assert 2 <= len(scanned) < 5 and not (target / "dataset.json").exists()

    _kill_when(_start(cfg, {"ENGINE_DATA_TEST_SHARD_DELAY": "2"}), target / ".build" / "shards", ".npz", 2)
    for name, mtime in scanned.items():  # parts scanned before the first kill were not scanned again
        assert os.stat(scan_dir / name).st_mtime_ns == mtime, name
    assert not (target / "dataset.json").exists()
    assert _no_new_ray_processes(before)  # killing the driver took the cluster with it

    report = build(BuildConfig(**cfg))
    assert report["shards"]["reused"] >= 2
    assert report["shards"]["reused"] + report["shards"]["written"] == report["shards"]["count"]
    _assert_same(out, target)
    # The same directory finished by the other engine: nothing left to do, same bytes.
    again = build(BuildConfig(**dict(cfg, engine="local")))
    assert again["shards"]["written"] == 0
    _assert_same(out, target)
