"""The commands a user runs: `engine info`, `engine bench`, and the GPU check in its
CPU smoke mode (the same script the GPU machine runs)."""

import json
import os
import subprocess
import sys
from pathlib import Path

from engine.cli import main

REPO = Path(__file__).resolve().parent.parent


def test_info_names_every_backend_and_why(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "bn_act" in out
    for backend in ("reference", "triton", "cuda"):
        assert f"    {backend}" in out
    assert "reference  usable on any device" in out


def test_info_as_module_prints_json():
    proc = subprocess.run([sys.executable, "-m", "engine.info", "--json"], capture_output=True, text=True,
                          cwd=REPO, check=True)
    info = json.loads(proc.stdout)
    assert set(info["ops"]["bn_act"]["why_not"]) == {"reference", "triton", "cuda"}
    assert info["torch"]


def test_bench_prints_throughput(capsys):
    assert main(["bench", "--batch-size", "2", "--image-size", "32", "--steps", "1", "--warmup", "0",
                 "--variants", "plain,fused"]) == 0
    out = capsys.readouterr().out
    assert out.count("img/s") == 2


def test_bench_rejects_unknown_variant(capsys):
    assert main(["bench", "--variants", "fastest"]) == 2
    assert "unknown variant(s) ['fastest']" in capsys.readouterr().err


def test_gpu_check_smoke_mode(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--smoke", "--groups", "all",
                           "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    stages = report["stages"]
    assert all(stage.get("skipped") or stage["rc"] == 0 for stage in stages.values())
    bn = stages["bench_bn_act"]["results"]
    assert bn["environment"]["git_revision"] and bn["environment"]["device"]
    impls = {r["impl"] for r in bn["results"] if "fwd_bwd_ms" in r}
    assert {"eager", "triton", "cuda"} <= impls and any(i.startswith("compile") for i in impls)
    steps = stages["bench_train_step"]["results"]["results"]
    assert {r["variant"] for r in steps if "images_per_s" in r} >= {"plain", "fused", "torchvision"}
    assert (tmp_path / "gpu_check.bench_bn_act.png").exists()
    assert {"bench_hashtag_ce", "bench_data", "bench_conv_bn", "bench_grouped_conv", "bench_train_e2e",
            "bench_train_step_fused", "bench_loss_tracking"} <= set(stages)
    tracking = stages["bench_loss_tracking"]["results"]
    assert set(tracking["runs"]) == {"reference fp32", "reference bf16", "fused bf16"}
    assert isinstance(tracking["verdict"]["tracks"], bool)
