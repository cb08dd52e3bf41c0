"""`engine selftest` as CI runs it on a CPU: every op and backend (Triton's interpreter, the
extension's C++ loop) against its reference at a small model's shapes, one fused-model
training step, and two injected test doubles, a wrong backend and one that kills its
process, which must both be reported while the run goes on."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_selftest_catches_a_wrong_and_a_crashing_backend_and_goes_on(tmp_path):
    out = tmp_path / "selftest.json"
    proc = subprocess.run([sys.executable, "-m", "engine.cli", "selftest", "--inject-faults", "--dtypes", "float16",
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    faults = {r["backend"]: r for r in rows if r["op"] == "selftest_fault"}
    assert faults["triton"]["status"] == "mismatch" and "output 0" in faults["triton"]["detail"]
    assert faults["cuda"]["status"] == "crash" and "SIGSEGV" in faults["cuda"]["detail"]
    real = [r for r in rows if r["op"] != "selftest_fault"]
    # Everything else ran, after the crash too, and passed: every op, both backends where they apply.
    assert real and all(r["status"] == "pass" for r in real), [r for r in real if r["status"] != "pass"]
    assert {(r["op"], r["backend"]) for r in real} >= {
        ("bn_act", "triton"), ("bn_act", "cuda"), ("grouped_conv3x3", "triton"), ("grouped_conv3x3", "cuda"),
        ("conv_bn_bottleneck", "triton"), ("hashtag_ce", "triton"), ("model step", "fused=bn_act cuda")}
    assert all(r["max_error"] is not None and r["seconds"] is not None for r in real)
    # The table on stdout says the same.
    assert "crash" in proc.stdout and "mismatch" in proc.stdout and "failed" in proc.stdout.splitlines()[-1]
