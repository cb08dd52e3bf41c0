"""The grouped 3x3 convolution of every ResNeXt-101 32xCd stage, forward, data gradient and
weight gradient: the Triton kernels (engine.kernels.grouped_conv, best tile span) and, for
group widths up to 8, the direct CUDA kernels (csrc/grouped_conv_cuda.cu) beside cuDNN on
channels_last and on NCHW tensors, in the same run. Per row: milliseconds,
effective bandwidth (the bytes the operation must move at least: its input, output and
weight, once) and useful TFLOP/s. "triton[fused]" is the forward with the previous batch
norm + ReLU applied on load and its own batch-norm statistics in the epilogue, which
cuDNN would need two extra passes for; "cuda[fused]" the same on the direct kernel.
"engine[auto]" is what a user gets: engine.ops.grouped_conv3x3 with automatic dispatch
(autotuned on a GPU; its first calls, in the warm-up, do the timing), forward alone and
forward + both gradients ("fwd+bwd", beside cuDNN's), with the implementation it chose:
the issue asks that no stage be slower than cuDNN.

    python -m benchmarks.bench_grouped_conv --out benchmarks/results/grouped_conv_h100.json
    python -m benchmarks.bench_grouped_conv --smoke --out /tmp/grouped_conv_smoke.json   # CPU, tiny shapes

The issue's target: the stage-1 32x8d forward at 2.5 TB/s effective or better ("gb_per_s").
"""

from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="JSON path; a PNG plot is written beside it")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, few repeats: proves the script on a CPU")
    parser.add_argument("--archs", default="32x4d,32x8d,32x16d,32x32d,32x48d",
                        help="comma-separated, from " + ", ".join(["32x4d", "32x8d", "32x16d", "32x32d", "32x48d"]))
    parser.add_argument("--kinds", default="rest,first",
                        help="rest: the stride-1 3x3 of a stage; first: its stride-2 3x3 (stages 2-4)")
    return parser.parse_args(argv)


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None and ARGS.smoke:
    # Before triton is imported: the kernels are built for the interpreter at import.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.common import (DispatchRecord, environment, peers_at_best, plot_results, time_ms,  # noqa: E402
                               write_json)
from engine.kernels import grouped_conv as K  # noqa: E402
from engine.ops import backends  # noqa: E402
from engine.ops.grouped_conv import grouped_conv3x3  # noqa: E402

# name -> (groups, base width, batch): the batches, 64 for the widest.
ARCHS = {"32x4d": (32, 4, 256), "32x8d": (32, 8, 256), "32x16d": (32, 16, 256), "32x32d": (32, 32, 256),
         "32x48d": (32, 48, 64)}
# (stage name, width multiplier over the base width, output resolution at 224)
STAGES = [("stage1", 1, 56), ("stage2", 2, 28), ("stage3", 4, 14), ("stage4", 8, 7)]
SMOKE_ARCHS = {"tiny": (4, 2, 2)}
SMOKE_STAGES = [("stage1", 1, 5), ("stage2", 2, 3)]


def conv_backward(grad, x, weight, stride, groups, mask):
    return torch.ops.aten.convolution_backward(grad, x, weight, None, [stride] * 2, [1, 1], [1, 1], False, [0, 0],
                                               groups, mask)


def main(argv=None) -> int:
    args = ARGS if argv is None and ARGS is not None else parse_args(argv)
    smoke = args.smoke
    device = torch.device("cuda" if torch.cuda.is_available() and not smoke else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    warmup, repeat = (1, 1) if smoke else (5, 20)
    archs = SMOKE_ARCHS if smoke else {a: ARCHS[a] for a in args.archs.split(",") if a}
    stages = SMOKE_STAGES if smoke else STAGES
    payload = {"benchmark": "grouped_conv", "environment": environment(), "smoke": smoke, "dtype": str(dtype),
               "note": "gb_per_s counts input + output + weight once; tflops counts useful products only",
               "results": []}
    element = torch.finfo(dtype).bits // 8
    # cuDNN at its best: the Triton kernels are autotuned per shape, so cuDNN picks its algorithms too.
    peers_at_best()
    payload["cudnn_benchmark"] = torch.backends.cudnn.benchmark

    for arch, (groups, base_width, batch) in archs.items():
        for stage, mult, res in stages:
            for kind in [k for k in args.kinds.split(",") if k]:
                stride = 2 if kind == "first" else 1
                if stride == 2 and stage == "stage1":
                    continue  # stage 1's first block keeps the resolution
                width = groups * base_width * mult
                in_res = res * stride
                gw = width // groups
                x = torch.randn(batch, width, in_res, in_res, device=device, dtype=dtype)
                weight = torch.randn(width, gw, 3, 3, device=device, dtype=dtype) / (9 * gw) ** 0.5
                scale = torch.rand(width, device=device) + 0.5
                shift = torch.randn(width, device=device)
                x_nhwc = x.contiguous(memory_format=torch.channels_last)
                y_ref = F.conv2d(x, weight, None, stride, 1, 1, groups)
                grad = torch.randn_like(y_ref)
                grad_nhwc = grad.contiguous(memory_format=torch.channels_last)
                act_in, act_out = x.numel() * element, y_ref.numel() * element
                w_bytes = weight.numel() * element
                flops = 2.0 * y_ref.numel() * gw * 9
                bytes_moved = {"fwd": act_in + act_out + w_bytes, "dgrad": act_out + act_in + w_bytes,
                               "wgrad": act_out + act_in + weight.numel() * 4}
                dx_ref, dw_ref, _ = conv_backward(grad, x, weight, stride, groups, [True, True, False])
                expected = {"fwd": y_ref, "dgrad": dx_ref, "wgrad": dw_ref}

                def triton_fn(direction, span, fused=False):
                    if direction == "fwd":
                        if fused:
                            return lambda: K.grouped_conv_fwd_triton(x_nhwc, weight, scale, shift, stride, groups,
                                                                     True, span)[0]
                        return lambda: K.grouped_conv_fwd_triton(x_nhwc, weight, None, None, stride, groups,
                                                                 False, span)[0]
                    if direction == "dgrad":
                        return lambda: K.grouped_conv_dgrad_triton(grad_nhwc, weight, [in_res, in_res], stride,
                                                                   groups, span)
                    return lambda: K.grouped_conv_wgrad_triton(grad_nhwc, x_nhwc, None, None, width, stride,
                                                               groups, span)

                def cudnn_fn(direction, xs, gs):
                    if direction == "fwd":
                        return lambda: F.conv2d(xs, weight, None, stride, 1, 1, groups)
                    mask = [True, False, False] if direction == "dgrad" else [False, True, False]
                    index = 0 if direction == "dgrad" else 1
                    return lambda: conv_backward(gs, xs, weight, stride, groups, mask)[index]

                def cuda_fn(direction, fused=False):
                    from engine.ops import _cuda_grouped_conv as C
                    if direction == "fwd":
                        if fused:
                            return lambda: C.forward(x_nhwc, weight, scale, shift, stride, True)[0]
                        return lambda: C.forward(x_nhwc, weight, None, None, stride, False)[0]
                    if direction == "dgrad":
                        return lambda: C.dgrad(grad_nhwc, weight, [in_res, in_res], stride)
                    return lambda: C.wgrad(grad_nhwc, x_nhwc, None, None, stride, gw)

                # On a GPU only a CUDA build runs them; on the CPU (smoke) the same ops run their C++ loop.
                with_cuda = (gw in (1, 2, 4, 8) and backends.load_extension() is not None
                             and (device.type == "cpu" or backends.extension_has_cuda()))

                spans = {}
                for span in K.SPANS:
                    tiling = K._tiling(gw, gw, groups, dtype, device, span)
                    spans.setdefault(tuple(sorted(tiling.items())), span)
                for direction in ("fwd", "dgrad", "wgrad"):
                    base = {"arch": arch, "stage": stage, "kind": kind, "direction": direction, "batch": batch,
                            "shape": [batch, width, in_res, in_res], "stride": stride, "groups": groups,
                            "group_width": gw}
                    impls = {"cudnn[nhwc]": cudnn_fn(direction, x_nhwc, grad_nhwc),
                             "cudnn[nchw]": cudnn_fn(direction, x, grad)}
                    for name, fn in impls.items():
                        _record(payload, args.out, dict(base, impl=name), fn, warmup, repeat,
                                bytes_moved[direction], flops)
                    per_span = {}
                    for span in spans.values():
                        try:
                            per_span[span] = time_ms(triton_fn(direction, span), warmup=warmup, repeat=repeat)
                        except (RuntimeError, ValueError) as e:  # out of resources for this tiling
                            per_span[span] = None
                            print(f"{arch} {stage} {kind} {direction} triton span {span}: {e}", file=sys.stderr)
                    timed = {s: t for s, t in per_span.items() if t is not None}
                    if not timed:
                        continue
                    best = min(timed, key=timed.get)
                    diff = (triton_fn(direction, best)().float() - expected[direction].float()).abs().max().item()
                    row = dict(base, impl="triton", span=best, ms_per_span=per_span, max_abs_diff_vs_nchw=diff)
                    _record(payload, args.out, row, None, warmup, repeat, bytes_moved[direction], flops,
                            ms=timed[best])
                    if direction == "fwd":
                        _record(payload, args.out, dict(base, impl="triton[fused]", span=best),
                                triton_fn(direction, best, fused=True), warmup, repeat, bytes_moved[direction],
                                flops)
                    if with_cuda:
                        diff = (cuda_fn(direction)().float() - expected[direction].float()).abs().max().item()
                        _record(payload, args.out, dict(base, impl="cuda", max_abs_diff_vs_nchw=diff),
                                cuda_fn(direction), warmup, repeat, bytes_moved[direction], flops)
                        if direction == "fwd":
                            _record(payload, args.out, dict(base, impl="cuda[fused]"), cuda_fn(direction, True),
                                    warmup, repeat, bytes_moved[direction], flops)
                _record_dispatch(payload, args.out, dict(base, direction="fwd"), x_nhwc, weight, grad_nhwc, stride,
                                 groups, warmup, repeat, bytes_moved, flops)
                del x, x_nhwc, weight, grad, grad_nhwc, y_ref, dx_ref, dw_ref, expected
                if device.type == "cuda":
                    torch.cuda.empty_cache()

    plot_results(args.out, f"grouped 3x3 forward, {payload['environment']['device']}, {dtype}",
                 [r for r in payload["results"] if r["direction"] == "fwd"],
                 group=lambda r: f"{r['arch']} {r['stage']} s{r['stride']}", series=lambda r: r["impl"],
                 value="gb_per_s", ylabel="effective GB/s")
    return 0


def _record_dispatch(payload, out, base, x, weight, grad, stride, groups, warmup, repeat, bytes_moved, flops):
    """engine[auto] forward alone, then forward + both gradients beside cuDNN's."""
    def auto_fwd():
        with torch.no_grad():
            return grouped_conv3x3(x, weight, stride=stride, groups=groups)

    x_leaf, w_leaf = x.detach().requires_grad_(), weight.detach().requires_grad_()

    def train_step(conv):
        return lambda: torch.autograd.grad(conv(x_leaf, w_leaf), (x_leaf, w_leaf), grad)

    auto_train = train_step(lambda t, w: grouped_conv3x3(t, w, stride=stride, groups=groups))
    cudnn_train = train_step(lambda t, w: F.conv2d(t, w, None, stride, 1, 1, groups))
    train_bytes = bytes_moved["fwd"] + bytes_moved["dgrad"] + bytes_moved["wgrad"]
    for direction, fn, impl, nbytes, work in (("fwd", auto_fwd, "engine[auto]", bytes_moved["fwd"], flops),
                                              ("fwd+bwd", cudnn_train, "cudnn[nhwc]", train_bytes, 3 * flops),
                                              ("fwd+bwd", auto_train, "engine[auto]", train_bytes, 3 * flops)):
        row = dict(base, direction=direction, impl=impl)
        record = DispatchRecord()
        _record(payload, out, row, fn, warmup, repeat, nbytes, work)
        if impl == "engine[auto]":
            row.update(record.fields())
            row["backend"] = row["backends"].get("grouped_conv3x3")
            write_json(out, payload)


def _record(payload, out, row, fn, warmup, repeat, nbytes, flops, ms=None):
    try:
        if ms is None:
            ms = time_ms(fn, warmup=warmup, repeat=repeat)
    except (RuntimeError, ValueError) as e:  # out of memory, or cuDNN without an algorithm for the layout
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0]}"
    else:
        row.update(ms=ms, gb_per_s=nbytes / ms / 1e6, tflops=flops / ms / 1e9)
    payload["results"].append(row)
    write_json(out, payload)
    what = f"{row['arch']} {row['stage']} s{row['stride']} {row['direction']:<5} {row['impl']:<14}"
    print(what + (f" {ms:8.3f} ms {row['gb_per_s']:8.1f} GB/s {row['tflops']:6.1f} TFLOP/s" if "ms" in row
                  else f" skipped: {row['error']}"), flush=True)


if __name__ == "__main__":
    sys.exit(main())
