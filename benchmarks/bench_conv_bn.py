"""One bottleneck block per stage of ResNeXt-101 32x8d and 32x16d, forward and
forward+backward in training mode: ConvBNBottleneck (batch norms fused into the 1x1
convolutions, engine.ops.conv_bn) beside torchvision's Bottleneck in eager and under
torch.compile, in the same run, batch 256, channels_last, bf16 autocast. Per stage two
blocks: "first" (downsampling shortcut; stride 2 from stage 2 on) and "rest" (identity).

    python -m benchmarks.bench_conv_bn --out benchmarks/results/conv_bn_h100.json
    python -m benchmarks.bench_conv_bn --smoke --out /tmp/conv_bn_smoke.json   # CPU, tiny shapes

The issue's target: ConvBNBottleneck at least 1.3x torch.compile in fwd+bwd for every
32x8d stage ("speedup_vs_compile" in the JSON). The whole-network step (2,600 img/s for
32x8d at batch 256) is bench_train_step's to measure.
"""

from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="JSON path; a PNG plot is written beside it")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, few repeats: proves the script on a CPU")
    parser.add_argument("--archs", default="32x8d,32x16d", help="comma-separated, from 32x8d, 32x16d")
    parser.add_argument("--kinds", default="first,rest", help="comma-separated, from first, rest")
    parser.add_argument("--batch", type=int, default=256)
    return parser.parse_args(argv)


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None and ARGS.smoke:
    # Before triton is imported: the kernels are built for the interpreter at import.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from benchmarks.common import (DispatchRecord, compile_fresh, compiled_frames, environment, peers_at_best,  # noqa: E402
                               plot_results, row_failed, row_settings, time_ms, write_json)
from engine.models import ConvBNBottleneck  # noqa: E402

# name -> (cardinality, base width)
ARCHS = {"32x8d": (32, 8), "32x16d": (32, 16)}
# (stage index, name, planes, output resolution at 224)
STAGES = [(0, "stage1", 64, 56), (1, "stage2", 128, 28), (2, "stage3", 256, 14), (3, "stage4", 512, 7)]
# Smoke: cardinality 4, base width 8, so a width of 8 channels; a later stage, so that the
# "first" block downsamples with stride 2.
SMOKE_ARCHS = {"tiny": (4, 8)}
SMOKE_STAGES = [(1, "stage2", 8, 3)]


def block_shapes(stage_index: int, planes: int, resolution: int, kind: str):
    """(inplanes, stride, input resolution) of a stage's first block or of its other blocks."""
    if kind == "rest":
        return planes * 4, 1, resolution
    if stage_index == 0:
        return 64, 1, resolution
    return planes * 2, 2, resolution * 2


def make_blocks(inplanes, planes, stride, groups, base_width, device):
    from torchvision.models.resnet import Bottleneck

    def downsample():
        if stride == 1 and inplanes == planes * 4:
            return None
        return nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, stride=stride, bias=False), nn.BatchNorm2d(planes * 4))

    torchvision_block = Bottleneck(inplanes, planes, stride, downsample(), groups, base_width)
    fused = ConvBNBottleneck(inplanes, planes, stride, downsample(), groups, base_width)
    fused.load_state_dict(torchvision_block.state_dict())
    fused.backend = "triton"
    for block in (torchvision_block, fused):
        block.to(device=device, memory_format=torch.channels_last).train()
    return torchvision_block, fused


def main(argv=None) -> int:
    args = ARGS if argv is None and ARGS is not None else parse_args(argv)
    smoke = args.smoke
    device = torch.device("cuda" if torch.cuda.is_available() and not smoke else "cpu")
    # bf16 on the GPU (autocast, fp32 weights, as in training); the CPU interpreter has no bf16 tl.dot.
    autocast_dtype = torch.bfloat16 if device.type == "cuda" else None
    input_dtype = autocast_dtype or torch.float32
    warmup, repeat = (1, 1) if smoke else (5, 20)
    archs = SMOKE_ARCHS if smoke else {a: ARCHS[a] for a in args.archs.split(",") if a}
    stages = SMOKE_STAGES if smoke else STAGES
    batch = 2 if smoke else args.batch
    compile_backend = "aot_eager" if smoke else "inductor"
    payload = {"benchmark": "conv_bn", "environment": environment(), "smoke": smoke, "batch": batch,
               "dtype": f"autocast {autocast_dtype}" if autocast_dtype else str(input_dtype),
               "layout": "channels_last", "training": True, "compile_backend": compile_backend, "results": []}

    def autocast():
        return torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None)

    peers_at_best()
    for arch, (groups, base_width) in archs.items():
        for stage_index, stage, planes, resolution in stages:
            for kind in [k for k in args.kinds.split(",") if k]:
                inplanes, stride, in_res = block_shapes(stage_index, planes, resolution, kind)
                torchvision_block, fused = make_blocks(inplanes, planes, stride, groups, base_width, device)
                compiled_name = f"compile[{compile_backend}]"
                # Compiled fresh per case with static shapes: every case is a new shape of the same code.
                impls = {"eager": torchvision_block,
                         compiled_name: compile_fresh(torchvision_block, compile_backend),
                         "conv_bn[triton]": fused}
                x = torch.randn(batch, inplanes, in_res, in_res, device=device, dtype=input_dtype)
                x = x.to(memory_format=torch.channels_last).requires_grad_()
                with autocast():
                    reference = torchvision_block(x).detach()
                grad = torch.randn_like(reference)
                times = {}
                for name, block in impls.items():
                    row = {"arch": arch, "stage": stage, "kind": kind, "impl": name,
                           "shape": [batch, inplanes, in_res, in_res], "stride": stride, "groups": groups,
                           "width": fused.conv1.out_channels,
                           "settings": row_settings(warmup=warmup, repeats=repeat,
                                                    compile=compile_backend if name == compiled_name else None,
                                                    dynamic=False if name == compiled_name else None)}

                    def forward(block=block):
                        with autocast():
                            return block(x)

                    def forward_backward(block=block):
                        x.grad = None
                        block.zero_grad(set_to_none=True)
                        forward(block).backward(grad)

                    record = DispatchRecord()
                    try:
                        with torch.no_grad():
                            row["max_abs_diff_vs_eager"] = (forward().float() - reference.float()).abs().max().item()
                            fwd = time_ms(forward, warmup=warmup, repeat=repeat)
                        both = time_ms(forward_backward, warmup=warmup, repeat=repeat)
                        if name == compiled_name:
                            row["settings"].update(compiled_frames())
                    except (RuntimeError, ValueError) as e:  # a backend that cannot run here, out of memory
                        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0]}"
                        row.update(record.fields())
                        print(f"{arch} {stage} {kind:<5} {name:<20} failed: {row['error']}", flush=True)
                        payload["results"].append(row)
                        write_json(args.out, payload)
                        continue
                    times[name] = both
                    row.update(record.fields())
                    row.update(fwd_ms=fwd, fwd_bwd_ms=both, bwd_ms=max(both - fwd, 0.0),
                               images_per_s=batch / both * 1e3, speedup_vs_eager=times["eager"] / both)
                    compiled = times.get(f"compile[{compile_backend}]")
                    if compiled:
                        row["speedup_vs_compile"] = compiled / both
                    payload["results"].append(row)
                    write_json(args.out, payload)
                    print(f"{arch} {stage} {kind:<5} {name:<20} fwd {fwd:8.3f} ms  fwd+bwd {both:8.3f} ms  "
                          f"x{row['speedup_vs_eager']:.2f} vs eager"
                          + (f"  x{row['speedup_vs_compile']:.2f} vs compile" if compiled else ""), flush=True)
                del torchvision_block, fused, impls, x, grad, reference
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    plot_results(args.out, f"bottleneck block fwd+bwd, {payload['environment']['device']}, {payload['dtype']}",
                 payload["results"], group=lambda r: f"{r['arch']} {r['stage']} {r['kind']}",
                 series=lambda r: r["impl"], value="fwd_bwd_ms", ylabel="ms")
    failed = [r for r in payload["results"] if row_failed(r)]
    if failed:
        print(f"{len(failed)} rows failed (error or failed check)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
