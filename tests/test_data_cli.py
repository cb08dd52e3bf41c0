"""`engine data synth | build | inspect | bench` through the engine CLI."""

import json
import os
import subprocess
import sys

import pytest

from engine.cli import main

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_synth_build_inspect_bench(tmp_path, capsys):
    raw, ds = tmp_path / "raw", tmp_path / "ds"
    assert main(["data", "synth", str(raw), "--n-images", "24", "--vocab-size", "10", "--quiet"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert os.path.isfile(info["metadata"]) and info["rows"] > 24
    assert main(["data", "build", "--images", info["images"], "--metadata", info["metadata"], "--out", str(ds),
                 "--vocab-size", "8", "--synonyms", info["synonyms"], "--eval-set", info["eval_set"],
                 "--shard-size", "8", "--workers", "1", "--split-bytes", "1024", "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out)
    # The metadata file (several KB) is read in 1 KB byte ranges, every row exactly once.
    assert summary["read_tasks"] > 1 and summary["metadata_rows"] == info["rows"]
    assert summary["vocab"]["size"] == 8 and summary["written"] > 0 and summary["skipped"]["truncated"] == 2
    assert main(["data", "inspect", str(ds), "--top", "3"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["meta"]["num_samples"] == summary["written"] and len(out["top_hashtags"]) == 3
    assert main(["data", "bench", str(ds), "--backend", "torch", "--device", "cpu", "--batch-size", "4",
                 "--size", "32", "--batches", "2", "--threads", "1", "--json", str(tmp_path / "b.json")]) == 0
    res = json.load(open(tmp_path / "b.json"))
    assert res["results"]["torch"]["img_per_s"] > 0


def test_errors_name_the_input(tmp_path, capsys):
    assert main(["data", "build", "--images", str(tmp_path), "--metadata", str(tmp_path / "meta.jsonl"),
                 "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "meta.jsonl" in capsys.readouterr().err
    assert main(["data", "inspect", str(tmp_path / "nothing")]) == 2
    assert "nothing" in capsys.readouterr().err


def test_module_entry_point_help():
    r = subprocess.run([sys.executable, "-m", "engine.cli", "data", "--help"], cwd=REPO, capture_output=True,
                       text=True, env=dict(os.environ, PYTHONPATH=REPO))
    assert r.returncode == 0 and "synth" in r.stdout and "build" in r.stdout


def test_bench_script_smoke(tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "bench_data.py"), "--smoke",
                        "--work", str(tmp_path / "work"), "--backends", "dali,torch,torch_1core", "--out", str(out)],
                       cwd=REPO, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=REPO), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    payload = json.load(open(out))
    run = payload["runs"][0]
    # Timed past the start-up: the warm-up drains every worker's prefetch queue first.
    assert run["settings"]["warmup_batches"] >= 2 * run["threads"] + 2 and "page_cache" in run["settings"]
    results = run["results"]
    assert results["torch"]["img_per_s"] > 0 and results["torch_1core"]["ms_per_image_per_core"] > 0
    assert "img_per_s" in results["dali"] or "skipped" in results["dali"]


def test_scan_benchmark_smoke(tmp_path):
    """The scan-rate benchmark behind docs/datasets.md's part-size advice: it scans with the
    builder's own function and every image of ordinary size passes."""
    from benchmarks import bench_scan

    out = tmp_path / "scan.json"
    assert bench_scan.main(["--per-size", "1", "--work", str(tmp_path), "--out", str(out)]) == 0
    rows = json.load(open(out))["results"]
    assert rows[0]["validators"] == "torchvision"
    assert all(r["all_sizes"]["images"] == r["all_sizes"]["ok"] == len(bench_scan.SIZES) for r in rows)
    assert all(r["all_sizes"]["images_per_cpu_s"] > 0 for r in rows)
