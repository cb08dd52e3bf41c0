"""The commands a user runs: `engine info`, `engine bench`, and the GPU check's quick plan
in its CPU smoke mode (the same script and stages the GPU machine runs first)."""

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from engine.cli import main
from engine.ops import backends

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


@pytest.mark.slow
def test_gpu_check_quick_smoke_fits_its_deadline(tmp_path):
    """The GPU machine's first call (README, On a GPU machine) on this CPU: every stage of the
    quick plan runs its real script in smoke mode within the deadline, and the folder holds the
    report, the log and the plots' archive only."""
    out = tmp_path / "gpu_check.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--quick", "--smoke", "--deadline-s", "540",
                           "--out", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["seconds"] < 540 and report["finished"]
    stages = report["stages"]
    assert list(stages) == report["stages_planned"]
    assert stages.pop("build")["skipped"] == "engine._C already loads (smoke)"
    assert all(stage.get("rc") == 0 for stage in stages.values()), {k: v.get("skipped") for k, v in stages.items()}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu_check.json", "gpu_check.log", "gpu_check.plots.zip"]
    assert {"bench_conv_bn.png", "bench_train_step.png"} <= set(zipfile.ZipFile(tmp_path / "gpu_check.plots.zip").namelist())
    selftest = stages["selftest"]["results"]
    assert selftest["finished"] and selftest["rows"] and not selftest["failed"]
    steps = stages["bench_train_step"]["results"]["results"]
    assert {r["variant"] for r in steps if "images_per_s" in r} == {"fused", "torchvision", "torchvision-compile"}
    # Every row says what ran it and how it was measured, peers with cuDNN's benchmark mode on.
    for name in ("bench_conv_bn", "bench_train_step", "bench_hashtag_ce"):
        rows = stages[name]["results"]["results"]
        assert rows and all({"warmup", "repeats", "compile", "cudnn_benchmark"} <= set(r["settings"]) for r in rows), name
        assert all("backends" in r for r in rows), name
    for name in ("bench_conv_bn", "bench_train_step"):
        assert all(r["settings"]["cudnn_benchmark"] is True for r in stages[name]["results"]["results"]), name
    compiled = [r for r in steps if r["variant"] == "torchvision-compile"]
    assert compiled and all(r["settings"]["dynamic"] is False and r["settings"]["frames_compiled"] >= 1
                            for r in compiled)
    # The op benchmarks' rows (their only run in the suite): every implementation, checked against eager.
    conv_bn = stages["bench_conv_bn"]["results"]["results"]
    assert {r["impl"] for r in conv_bn if "fwd_bwd_ms" in r} == {"eager", "compile[aot_eager]", "conv_bn[triton]"}
    fused = next(r for r in conv_bn if r["impl"] == "conv_bn[triton]")
    assert fused["stride"] == 2 and fused["max_abs_diff_vs_eager"] < 1e-3 and "speedup_vs_compile" in fused
    grouped = stages["bench_grouped_conv"]["results"]["results"]
    impls = {"triton", "triton[fused]", "cudnn[nhwc]", "cudnn[nchw]", "engine[auto]"}
    if backends.load_extension() is not None:
        impls |= {"cuda", "cuda[fused]"}
    assert {r["impl"] for r in grouped} == impls
    assert {r["direction"] for r in grouped} == {"fwd", "dgrad", "wgrad", "fwd+bwd"}
    # What automatic dispatch ran (the reference on a CPU), beside cuDNN for the training step.
    auto = [r for r in grouped if r["impl"] == "engine[auto]"]
    assert auto and all(r["backend"] == "reference" and r["ms"] > 0 for r in auto)
    assert {r["impl"] for r in grouped if r["direction"] == "fwd+bwd"} == {"engine[auto]", "cudnn[nhwc]"}
    assert all(r["max_abs_diff_vs_nchw"] < 1e-3 for r in grouped if r["impl"] in ("triton", "cuda"))


def test_loss_tracking_smoke_runs_three_curves_and_a_verdict(tmp_path):
    from benchmarks import bench_loss_tracking

    out = tmp_path / "tracking.json"
    assert bench_loss_tracking.main(["--smoke", "--out", str(out)]) == 0
    tracking = json.loads(out.read_text())
    assert set(tracking["runs"]) == {"reference fp32", "reference bf16", "fused bf16"}
    assert isinstance(tracking["verdict"]["tracks"], bool)


def test_gpu_check_never_attaches_an_earlier_runs_results(tmp_path, monkeypatch, capsys):
    """A stage that crashes carries no results, even with an earlier run's JSON beside the report."""
    from benchmarks import gpu_check

    out = tmp_path / "gpu_check.json"
    stale = {"benchmark": "earlier run", "results": [{"ms": 1.0}]}
    for name in ("crashes", "writes"):
        out.with_name(f"gpu_check.running.{name}.json").write_text(json.dumps(stale))
    write = "import json, sys; json.dump({'benchmark': 'this run'}, open(sys.argv[1], 'w'))"
    monkeypatch.setattr(gpu_check, "STAGES", [
        gpu_check.Stage("crashes", (), [sys.executable, "-c", "raise SystemExit(3)"], 60),
        gpu_check.Stage("writes", (), [sys.executable, "-c", write, "{json}"], 60),
    ])
    assert gpu_check.main(["--out", str(out)]) == 1
    stages = json.loads(out.read_text())["stages"]
    assert stages["crashes"]["rc"] == 3 and "results" not in stages["crashes"]
    assert not out.with_name("gpu_check.running.crashes.json").exists()
    assert stages["writes"]["rc"] == 0 and stages["writes"]["results"] == {"benchmark": "this run"}


def test_benchmark_rows_record_their_settings(tmp_path):
    """Every row of a benchmark's JSON says how it was measured; peers run with cuDNN's
    benchmark mode on, and the compiled peer was compiled (static shapes) for each shape."""
    from benchmarks import bench_bn_act

    out = tmp_path / "bn_act.json"
    assert bench_bn_act.main(["--smoke", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert rows and all({"cudnn_benchmark", "compile", "dynamic", "warmup", "repeats"} <= set(r["settings"])
                        for r in rows)
    assert all(r["settings"]["cudnn_benchmark"] is True for r in rows)
    compiled = [r for r in rows if r["impl"].startswith("compile")]
    assert compiled and all("fwd_bwd_ms" in r for r in compiled)
    for r in compiled:
        assert r["settings"]["compile"] == "aot_eager" and r["settings"]["dynamic"] is False
        # A forward without and one with gradients, compiled fresh for this shape, nothing run eagerly.
        assert r["settings"]["graphs"] == 2 and r["settings"]["graph_breaks"] == 0


def test_compiled_training_steps_each_run_compiled(monkeypatch):
    """Each compiled variant is compiled afresh: the second model's step is still compiled.
    A model torchvision has no constructor for gets torchvision's ResNet class at its width."""
    import torch

    from engine.bench import measure
    from engine.models import ARCHITECTURES

    monkeypatch.setitem(ARCHITECTURES, "resnext_tiny_4x4d", ([1, 1, 1, 1], 4, 4))
    for variant in ("torchvision-compile", "plain-compile", "torchvision-compile"):
        r = measure(variant, "resnext_tiny_4x4d", batch_size=2, image_size=32, steps=1, warmup=1,
                    device=torch.device("cpu"), dtype="fp32", num_classes=10, compile_backend="aot_eager")
        assert r.compile == "aot_eager" and r.dynamic is False and r.cudnn_benchmark is True
        assert r.frames_compiled >= 1 and r.graph_breaks == 0
    assert r.peer == "torchvision ResNet(Bottleneck, [1, 1, 1, 1], groups=4, width_per_group=4)"
    eager = measure("plain", "resnext_tiny_4x4d", batch_size=2, image_size=32, steps=1, warmup=0,
                    device=torch.device("cpu"), dtype="fp32", num_classes=10)
    assert eager.compile is None and eager.frames_compiled is None and eager.peer.startswith("engine ")


def test_a_compiled_variant_that_ran_eagerly_is_refused():
    import pytest
    import torch

    from engine.bench import NotCompiledError, compile_fresh, compiled_frames

    def fn(x):
        return x.sin() + 1

    compiled = compile_fresh(fn, "aot_eager")
    with torch.compiler.set_stance("force_eager"):
        compiled(torch.randn(3))
    with pytest.raises(NotCompiledError, match="ran eagerly"):
        compiled_frames()
    compiled(torch.randn(3))
    assert compiled_frames()["graphs"] == 1
