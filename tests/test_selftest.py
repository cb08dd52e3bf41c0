"""`engine selftest` as CI runs it on a CPU: every op and backend (Triton's interpreter, the
extension's C++ loop) against its reference at a small model's shapes, one fused-model
training step, and two injected test doubles, a wrong backend and one that kills its
process, which must both be reported while the run goes on."""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.ops import backends

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.parametrize("extension", [
    pytest.param(True, marks=pytest.mark.skipif(backends.extension_status() is not None,
                                                reason="engine._C is not built")),
    False], ids=["with-extension", "without-extension"])
def test_selftest_catches_a_wrong_and_a_crashing_backend_and_goes_on(tmp_path, extension):
    out = tmp_path / "selftest.json"
    env = dict(os.environ) if extension else dict(os.environ, ENGINE_SKIP_EXT="1")
    # 32 px rather than the CPU default 64: every op and backend still runs, in half the time.
    proc = subprocess.run([sys.executable, "-m", "engine.cli", "selftest", "--inject-faults", "--dtypes", "float16",
                           "--size", "32", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    faults = {r["backend"]: r for r in rows if r["op"] == "selftest_fault"}
    assert faults["triton"]["status"] == "mismatch" and "output 0" in faults["triton"]["detail"]
    assert faults["cuda"]["status"] == "crash" and "SIGSEGV" in faults["cuda"]["detail"]
    skipped = [r for r in rows if r["status"] == "skip"]
    if not extension:
        # The extension's rows say why they did not run.
        assert skipped and all(r["backend"] == "cuda" and "ENGINE_SKIP_EXT" in r["detail"] for r in skipped)
    real = [r for r in rows if r["op"] != "selftest_fault" and r["status"] != "skip"]
    # Everything else ran, after the crash too, and passed: every op, both backends where they apply.
    assert real and all(r["status"] == "pass" for r in real), [r for r in real if r["status"] != "pass"]
    expected = {("bn_act", "triton"), ("grouped_conv3x3", "triton"), ("conv_bn_bottleneck", "triton"),
                ("hashtag_ce", "triton")}
    if extension:
        expected |= {("bn_act", "cuda"), ("grouped_conv3x3", "cuda"), ("model step", "fused=bn_act cuda")}
    else:
        # The fused model's step on Triton: its ReLU ties once failed this row (engine.models.step_check).
        expected |= {("model step", "fused=bn_act triton")}
    assert {(r["op"], r["backend"]) for r in real} >= expected
    assert all(r["max_error"] is not None and r["seconds"] is not None for r in real)
    # The table on stdout says the same.
    assert "crash" in proc.stdout and "mismatch" in proc.stdout and "failed" in proc.stdout.splitlines()[-1]


def test_selftest_json_holds_each_row_as_it_settles(tmp_path, monkeypatch):
    """A run killed after its first check leaves that verdict on disk, the rest still pending."""
    from engine import selftest
    from engine.ops import verify

    out = tmp_path / "selftest.json"
    seen = []

    def first_then_killed(jobs, on_result=None, **_):
        on_result(0, {"status": "mismatch", "max_error": 0.5, "seconds": 0.1, "detail": "off"})
        seen.append(json.loads(out.read_text()))
        raise KeyboardInterrupt

    monkeypatch.setattr(verify, "run_jobs", first_then_killed)
    parser = argparse.ArgumentParser()
    selftest.add_arguments(parser)
    with pytest.raises(KeyboardInterrupt):
        selftest.run(parser.parse_args(["--dtypes", "float32", "--no-model-step", "--out", str(out)]))
    rows = seen[0]["rows"]
    assert rows[0]["status"] == "mismatch" and rows[0]["max_error"] == 0.5
    assert {r["status"] for r in rows[1:]} <= {"?", "skip"} and "?" in {r["status"] for r in rows[1:]}
    assert seen[0]["failed"] == 1 and seen[0]["finished"] is False
