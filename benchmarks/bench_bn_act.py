"""bn_act at the ResNeXt-101 32x8d stage shapes: forward, backward and both, for each
backend beside the eager reference and torch.compile of it, in the same run.

    python -m benchmarks.bench_bn_act --out benchmarks/results/bn_act_h100.json
    python -m benchmarks.bench_bn_act --smoke --out /tmp/bn_act_smoke.json   # CPU, tiny shapes
"""

from __future__ import annotations

import argparse
import sys

import torch

from benchmarks.common import (DispatchRecord, compile_fresh, compiled_frames, environment, peers_at_best,
                               plot_results, row_settings, time_ms, write_json)
from engine.ops import BackendUnavailableError, bn_act

# (name, N, C, H, W): batch 256, the bottleneck width (= output channels for 32x8d) per stage.
STAGES = [("stage1", 256, 256, 56, 56), ("stage2", 256, 512, 28, 28),
          ("stage3", 256, 1024, 14, 14), ("stage4", 256, 2048, 7, 7)]
SMOKE_STAGES = [("tiny1", 2, 37, 5, 7), ("tiny2", 2, 64, 8, 8)]
# bn1/bn2 of a block apply BN + ReLU; bn3 adds the residual first.
EPILOGUES = {"bn_relu": False, "bn_add_relu": True}


def min_bytes(shape, itemsize, residual):
    """Fewest bytes each direction must move: forward reads x (and residual), writes y;
    backward reads grad_y, x, y and writes dx (and the residual's gradient)."""
    n = shape[0] * shape[1] * shape[2] * shape[3] * itemsize
    fwd = n * (3 if residual else 2)
    bwd = n * (5 if residual else 4)
    return fwd, bwd


def make_case(shape, dtype, device, residual):
    c = shape[1]
    x = torch.randn(shape, device=device, dtype=dtype).to(memory_format=torch.channels_last).requires_grad_()
    res = (torch.randn(shape, device=device, dtype=dtype).to(memory_format=torch.channels_last).requires_grad_()
           if residual else None)
    w = torch.ones(c, device=device, requires_grad=True)
    b = torch.zeros(c, device=device, requires_grad=True)
    rm, rv = torch.zeros(c, device=device), torch.ones(c, device=device)
    grad = torch.randn(shape, device=device, dtype=dtype).to(memory_format=torch.channels_last)
    return x, res, w, b, rm, rv, grad


def implementations(compile_backend: str):
    """name -> (a fresh callable for one shape, its compile backend or None). The compiled
    peer is compiled anew for every shape with static shapes, as a user compiling a model
    of that shape gets it (one shared compiled function would go dynamic after its first
    shape, then eager at dynamo's recompile limit)."""
    return {
        "eager": (lambda: bn_act.reference, None),
        f"compile[{compile_backend}]": (lambda: compile_fresh(bn_act.reference, compile_backend), compile_backend),
        "triton": (lambda: lambda *a, **k: bn_act(*a, backend="triton", **k), None),
        "cuda": (lambda: lambda *a, **k: bn_act(*a, backend="cuda", **k), None),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="JSON path; a PNG plot is written beside it")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, few repeats: proves the script on a CPU")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    args = parser.parse_args(argv)
    smoke = args.smoke
    device = "cuda" if torch.cuda.is_available() and not smoke else "cpu"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    if device == "cpu" and dtype == torch.bfloat16:
        dtype = torch.float32  # Triton's CPU interpreter has no bfloat16
    warmup, repeat = (1, 3) if smoke else (5, 30)
    stages = SMOKE_STAGES if smoke else STAGES
    payload = {"benchmark": "bn_act", "environment": environment(), "dtype": str(dtype), "layout": "channels_last",
               "training": True, "smoke": smoke, "results": []}
    peers_at_best()
    impls = implementations("aot_eager" if smoke else "inductor")
    for stage, *shape in stages:
        for epilogue, residual in EPILOGUES.items():
            fwd_bytes, bwd_bytes = min_bytes(shape, torch.tensor([], dtype=dtype).element_size(), residual)
            eager_ms = None
            for name, (make, compile_backend) in impls.items():
                fn = make()
                x, res, w, b, rm, rv, grad = make_case(shape, dtype, device, residual)
                row = {"stage": stage, "shape": shape, "epilogue": epilogue, "impl": name,
                       "settings": row_settings(warmup=warmup, repeats=repeat, compile=compile_backend,
                                                dynamic=False if compile_backend else None)}

                def forward():
                    return fn(x, rm, rv, w, b, True, 0.1, 1e-5, residual=res, relu=True)

                def forward_backward():
                    inputs = [x, w, b] + ([res] if res is not None else [])
                    torch.autograd.grad(forward(), inputs, grad)

                record = DispatchRecord()
                try:
                    with torch.no_grad():
                        fwd = time_ms(forward, warmup=warmup, repeat=repeat)
                    both = time_ms(forward_backward, warmup=warmup, repeat=repeat)
                    if compile_backend:
                        row["settings"].update(compiled_frames())
                except (BackendUnavailableError, RuntimeError) as e:
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0]}"
                    row.update(record.fields())
                    print(f"{stage} {epilogue:<12} {name:<20} skipped: {row['error']}", flush=True)
                    payload["results"].append(row)
                    write_json(args.out, payload)
                    continue
                row.update(record.fields())
                row.update(fwd_ms=fwd, fwd_bwd_ms=both, bwd_ms=max(both - fwd, 0.0),
                           fwd_gb_per_s=fwd_bytes / fwd / 1e6, fwd_bwd_gb_per_s=(fwd_bytes + bwd_bytes) / both / 1e6)
                if name == "eager":
                    eager_ms = both
                if eager_ms:
                    row["speedup_vs_eager"] = eager_ms / both
                payload["results"].append(row)
                write_json(args.out, payload)
                print(f"{stage} {epilogue:<12} {name:<20} fwd {fwd:8.3f} ms  fwd+bwd {both:8.3f} ms  "
                      f"{row['fwd_bwd_gb_per_s']:7.1f} GB/s  x{row.get('speedup_vs_eager', 1.0):.2f} vs eager",
                      flush=True)
    plot_results(args.out, f"bn_act fwd+bwd, {payload['environment']['device']}, {dtype}", payload["results"],
                 group=lambda r: f"{r['stage']} {r['epilogue']}", series=lambda r: r["impl"], value="fwd_bwd_ms",
                 ylabel="ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
