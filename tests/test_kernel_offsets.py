"""64-bit element offsets where an activation can exceed 2**31 elements.

ResNeXt-101 32x48d's layer2 input batch norm sees [N, 3072, 56, 56]: 2**31 elements from
batch 223. Running a kernel on such a tensor in the interpreter would need 4+ GiB per
operand and minutes; instead each kernel is compiled (for sm_90, no GPU needed) with the
specialisation a real launch at batch 256 gets, and its Triton IR must offset every tile
of pointers by 64-bit integers: a 32-bit `rows * C + cols` shows up there as an i32
tensor added to the pointer tile, and would wrap on the device.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = r"""
import json, sys, torch
from benchmarks import compile_gate as g
from benchmarks import compile_gate_capture as cap
from engine.kernels import bn_act, bn_stats

rec = cap.Recorder()
with cap.intercepted(rec):
    for layout in (torch.channels_last, torch.contiguous_format):
        x = torch.empty(256, 3072, 56, 56, dtype=torch.bfloat16, device="cuda").to(memory_format=layout)
        assert x.numel() >= 2**31
        c = torch.empty(3072, device="cuda")
        for training in (True, False):
            y, mean, invstd = bn_act.forward(x, c, c, x, c, c, training, 0.1, 1e-5, True)
            bn_act.backward(y, x, y, c, mean, invstd, training, True, True)
        if layout == torch.channels_last:
            # conv_bn's elementwise and reduction passes on the same tensor (fused="conv").
            bn_stats.conv_bn_stats_triton(x, c, c, c, c, 0.1, 1e-5)
            bn_stats.conv_bn_apply_triton(x, c, c, x, c, c, True)
            bn_stats.conv_bn_bwd_reduce_triton(x, x, c, c, c, x, c, c, c, True)
out = []
for spec in rec.specs.values():
    row = g.compile_spec(spec, 90, keep_ttir=True)
    out.append({"kernel": spec["module"] + "." + spec["kernel"], "options": spec["options"],
                "large_args": spec["large_args"], "error": row.get("error"),
                "narrow": g.narrow_tile_offsets(row.get("ttir", ""), spec["large_args"])})
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(l for l in done.stdout.splitlines() if l.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def test_every_large_tensor_kernel_was_compiled(compiled):
    kernels = {r["kernel"] for r in compiled}
    assert {"bn_act._stats_kernel", "bn_act._apply_fwd_kernel", "bn_act._bwd_reduce_kernel",
            "bn_act._apply_bwd_kernel", "bn_stats._stats_kernel", "bn_stats._apply_kernel",
            "bn_stats._bwd_reduce_kernel"} <= kernels
    assert [r for r in compiled if r["error"]] == []
    # The check below looks at the accesses to these arguments.
    assert {a for r in compiled if r["kernel"] == "bn_act._apply_fwd_kernel" for a in r["large_args"]} == {"X", "RES", "Y"}


def test_tile_offsets_are_64_bit(compiled):
    narrow = {f"{r['kernel']} {r['options']}": r["narrow"] for r in compiled if r["narrow"]}
    assert narrow == {}, "32-bit offsets into a >2**31-element tensor:\n" + json.dumps(narrow, indent=1)
