"""The Hopper compile gate (benchmarks/compile_gate.py) in CI: every Triton kernel the
engine launches on a GPU compiles for sm_90 within the shared-memory limit and the spill
bound, under this environment's Triton and, when .venv-triton36 exists (make
triton36-venv), Triton 3.6. No GPU needed: the kernels are compiled, not run.

The CI tier gates every launch configuration (tiles, warps, stages, constexpr
switches) of every model at one batch size, in bf16 and fp32 (fp16 has bf16's tiles and
code paths), and under Triton 3.6 in bf16; the full gate (all batch sizes and dtypes,
sm_100, CUDA) is what benchmarks/results/compile_sm90.json records. A launch whose key
that record holds takes the recorded figures; the rest, and the first recorded launch of
each kernel and dtype, are compiled.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # a minute or more on 2 cores

ROOT = Path(__file__).resolve().parent.parent
CI_TIER = ["--batches", "100", "--other-batches", "100", "--dtypes", "bfloat16,float32", "--other-dtypes", "bfloat16",
           "--no-sm100", "--no-cuda"]


def _run_gate(tmp_path, *args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "gate.json"
    done = subprocess.run([sys.executable, "-m", "benchmarks.compile_gate", "--out", str(out), *args],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=1800)
    return done, (json.loads(out.read_text()) if out.exists() else None)


@pytest.fixture(scope="module")
def gate(tmp_path_factory):
    return _run_gate(tmp_path_factory.mktemp("gate"), *CI_TIER)


def _launched_kernels():
    """Every @triton.jit function of engine.kernels that the launchers call with a grid."""
    import re
    names = set()
    for path in (ROOT / "kernels").glob("*.py"):
        names |= {f"{path.stem}.{k}" for k in re.findall(r"\b(_\w+_kernel)\[", path.read_text())}
    return names


def test_gate_passes(gate):
    done, report = gate
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert report["verdict"] == "PASS" and report["problems"] == []
    assert "CPU machine" in report["produced_on"]
    for name, section in report["triton"].items():
        rows = section["rows"]
        assert section["compiled"] + section["from_record"] == len(rows) and all(len(r["key"]) == 64 for r in rows)
        # Every kernel and dtype that took figures from the record had one launch recompiled, matching.
        kind = lambda r: (r["module"], r["kernel"], r["dtype"])  # noqa: E731
        assert {kind(r) for r in rows if r.get("from_record")} <= {kind(r) for r in rows
                                                                   if r.get("checked_against_record")}, name


def test_every_kernel_compiled_for_sm90_under_each_triton(gate):
    _, report = gate
    expected = _launched_kernels()
    assert len(expected) >= 15
    names = list(report["triton"])
    assert any(n.endswith("sm_90") and not n.startswith("triton 3.6") for n in names)
    if (ROOT / ".venv-triton36" / "bin" / "python").exists():
        assert "triton 3.6 sm_90" in names
    for name in names:
        rows = report["triton"][name]["rows"]
        assert {f"{r['module']}.{r['kernel']}" for r in rows} == expected, name
        for r in rows:
            assert r["registers"] > 0 and 0 <= r["shared_bytes"] <= 232_448, r
        # The 16-bit GEMMs run on Hopper's warpgroup tensor-core instructions.
        fwd = [r for r in rows if r["kernel"] == "_fwd_kernel" and r["dtype"] == "bfloat16"]
        assert fwd and all(r["ptx"]["wgmma"] > 0 for r in fwd)


def test_gate_rejects_a_kernel_over_the_shared_memory_limit():
    """conv_bn's dgrad at its former bf16 configuration (128 x 128 x 64, 3 stages) needs
    about 249 KB of shared memory; the gate must fail it."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = r"""
import json, torch
from benchmarks import compile_gate as g
from benchmarks import compile_gate_capture as cap
from engine.kernels import conv_bn
rec = cap.Recorder()
with cap.intercepted(rec):
    n, k, c, h = 64, 256, 1024, 14
    cuda = dict(device="cuda")
    x = torch.empty(n, k, h, h, dtype=torch.bfloat16, **cuda).to(memory_format=torch.channels_last)
    a = torch.empty(n, c, h, h, dtype=torch.bfloat16, **cuda).to(memory_format=torch.channels_last)
    w = torch.empty(c, k, dtype=torch.bfloat16, **cuda)
    v = torch.empty(c, **cuda)
    conv_bn.conv_bn_dgrad_triton(a, a, v, v, v, None, None, w, None, None, None, None, None, 1)
(spec,) = [s for s in rec.specs.values() if s["kernel"] == "_dgrad_kernel"]
spec["options"]["num_stages"] = 3
row = g.compile_spec(spec, 90)
print("RESULT " + json.dumps({"row": row, "problems": g.verdict(row, 90)}))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(next(l for l in done.stdout.splitlines() if l.startswith("RESULT ")).removeprefix("RESULT "))
    assert result["row"]["shared_bytes"] > 232_448
    assert any("shared memory" in p for p in result["problems"])


def test_a_record_a_fresh_compile_contradicts_fails_the_gate():
    """The record lends figures only to launches with its key, and the first of each kernel
    and dtype is compiled anyway: a recorded figure that a compile does not reproduce (a
    stale or hand-edited record) fails that row, while the kernel's other launch still
    takes the record's figures."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = r"""
import json, torch
from benchmarks import compile_gate as g
from benchmarks import compile_gate_capture as cap
from engine.kernels import hashtag_ce
rec = cap.Recorder()
with cap.intercepted(rec):
    for v in (2048, 2125):  # a vocabulary slice divisible by 16 and one that is not: two specialisations
        x, w = torch.empty(512, 256, dtype=torch.bfloat16, device="cuda"), torch.empty(v, 256, dtype=torch.bfloat16, device="cuda")
        tags, tw = torch.empty(512, 8, dtype=torch.int64, device="cuda"), torch.empty(512, 8, device="cuda")
        hashtag_ce.forward(x, w, None, tags, tw, True)
specs = [s for s in rec.specs.values() if s["kernel"] == "_forward_kernel"]
fresh = g.gate_rows(specs, 90, {}, 1)
record = {r["key"]: dict(r) for r in fresh}
honest = g.gate_rows(specs, 90, record, 1)
record[fresh[0]["key"]]["registers"] += 8
edited = g.gate_rows(specs, 90, record, 1)
print("RESULT " + json.dumps({"fresh": fresh, "honest": honest, "edited": edited,
                              "verdicts": [g.verdict(r, 90) for r in honest + edited]}))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(next(l for l in done.stdout.splitlines() if l.startswith("RESULT ")).removeprefix("RESULT "))
    fresh, honest, edited = result["fresh"], result["honest"], result["edited"]
    assert len(fresh) == 2 and fresh[0]["key"] != fresh[1]["key"] and not any(r.get("from_record") for r in fresh)
    assert [r["key"] for r in honest] == [r["key"] for r in fresh]
    assert honest[0]["checked_against_record"] and "record_differs" not in honest[0]
    assert honest[1]["from_record"] and honest[1]["registers"] == fresh[1]["registers"]
    assert edited[0]["record_differs"] == [f"registers {fresh[0]['registers'] + 8} recorded, "
                                           f"{fresh[0]['registers']} compiled"]
    assert result["verdicts"][:2] == [[], []]
    assert "differs from the record" in result["verdicts"][2][0] and result["verdicts"][3] == []


def test_verdict_bounds():
    sys.path.insert(0, str(ROOT))
    from benchmarks import compile_gate as g
    ok = {"shared_bytes": 232_448, "local_bytes": g.SPILL_BOUND_BYTES, "registers": 255}
    assert g.verdict(ok, 90) == []
    assert g.verdict(dict(ok, local_bytes=g.SPILL_BOUND_BYTES + 4), 90)
    assert g.verdict({"error": "PTXASError: ptxas failed"}, 90)
    assert g.narrow_tile_offsets(
        "%t = tt.splat %X : !tt.ptr<bf16> -> tensor<32x128x!tt.ptr<bf16>>\n"
        "%p = tt.addptr %t, %o : tensor<32x128x!tt.ptr<bf16>>, tensor<32x128xi32>", ["X"])
    assert not g.narrow_tile_offsets(
        "%t = tt.splat %X : !tt.ptr<bf16> -> tensor<32x128x!tt.ptr<bf16>>\n"
        "%p = tt.addptr %t, %o : tensor<32x128x!tt.ptr<bf16>>, tensor<32x128xi64>", ["X"])


def test_head_slices_not_a_multiple_of_16_keep_wide_accesses():
    """17,000 classes over 8 ranks is 2,125 per rank. A mask bound that is not a multiple of
    16 turns a tile's vectorised accesses into 2-byte ones: the bias loads, the G store and
    the GEMMs' G loads must be padded to 16 columns, which leaves no 2-byte global access in
    any of the head's bf16 kernels (as at V = 2,048)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = r"""
import json, torch
from benchmarks import compile_gate as g
from benchmarks import compile_gate_capture as cap
from engine.kernels import hashtag_ce
rec = cap.Recorder()
with cap.intercepted(rec):
    b, d, v, k = 512, 2048, 2125, 32
    cuda = dict(device="cuda")
    x, w = torch.empty(b, d, dtype=torch.bfloat16, **cuda), torch.empty(v, d, dtype=torch.bfloat16, **cuda)
    bias = torch.empty(v, dtype=torch.bfloat16, **cuda)
    tags, tw = torch.empty(b, k, dtype=torch.int64, **cuda), torch.empty(b, k, **cuda)
    hashtag_ce.forward(x, w, bias, tags, tw, True)
    hashtag_ce.backward(x, w, bias, tags, tw, torch.empty(b, **cuda), torch.empty(3, b, **cuda), True, True)
rows = []
for spec in rec.specs.values():
    row = g.compile_spec(spec, 90)
    rows.append({"kernel": spec["kernel"], "error": row.get("error"), "ptx": row.get("ptx")})
print("RESULT " + json.dumps(rows))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(next(l for l in done.stdout.splitlines() if l.startswith("RESULT ")).removeprefix("RESULT "))
    assert {r["kernel"] for r in rows} == {"_forward_kernel", "_grad_logits_kernel", "_matmul_kernel"}
    assert [r for r in rows if r["error"]] == []
    narrow = {r["kernel"]: {k: r["ptx"][k] for k in ("ld_global_b16", "st_global_b16") if r["ptx"][k]}
              for r in rows}
    assert not any(narrow.values()), narrow
