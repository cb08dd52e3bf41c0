"""Fused linear + soft-target softmax cross-entropy (engine.ops.hashtag_ce): forward +
backward time and peak memory beyond the inputs and their gradients, with every peer
measured in the same run:

  engine    hashtag_ce, Triton backend (the B x V logits never exist)
  eager     the reference: dense target distribution, F.linear, F.cross_entropy on fp32 logits
  compile   torch.compile of the reference
  liger     Liger-Kernel's fused linear cross-entropy (hard targets: K=1 only; if installed)
  cce       Apple's Cut Cross-Entropy (hard targets: K=1 only; if installed)

Default grid (issue 7): B=512, D=2048, bf16, V in {17k, 131k, 1M}, K=3 for engine, eager
and compile and K=1 for all five; and B=4096 (a rank's all-gathered batch on an 8-GPU
node) at V=1M. A peer that is missing or runs out of memory is recorded with the reason.

  python -m benchmarks.bench_hashtag_ce --out benchmarks/results/hashtag_ce_h100.json
  python -m benchmarks.bench_hashtag_ce --smoke --out /tmp/hashtag_ce_smoke.json   # CPU

--smoke runs tiny fp32 shapes on CPU, the Triton kernels in the interpreter (a minute or
two on 2 cores, most of it torch.compile); it checks that every path runs and writes
the same JSON, but its times say nothing about speed and memory is not measured (no CPU
allocator statistics).

Targets (one H100/H200): V=1M, B=512: <= 9.5 ms and <= 64 MB beyond inputs and gradients;
V=1M, B=4096: <= 75 ms; V=17k: not slower than compile.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

MB = 1 << 20
# The compiled peer: inductor, the backend users compile with.
COMPILE_BACKEND = "inductor"
TARGETS = [  # (what, B, V, K, metric, limit or the peer to beat)
    ("V=1M time", 512, 1_048_576, 3, "ms", 9.5),
    ("V=1M memory", 512, 1_048_576, 3, "extra_mb", 64.0),
    ("B=4096 V=1M time", 4096, 1_048_576, 3, "ms", 75.0),
    ("V=17k not slower than compile", 512, 17_000, 3, "ms", "compile"),
]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/hashtag_ce_<device>.json)")
    p.add_argument("--smoke", action="store_true", help="tiny CPU shapes, Triton in its interpreter")
    p.add_argument("--vocab", type=int, nargs="+", default=[17_000, 131_072, 1_048_576])
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--big-batch", type=int, default=4096, help="also run this batch at the largest V (0: skip)")
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--methods", nargs="+", default=["engine", "eager", "compile", "liger", "cce"])
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args()
    if args.smoke:
        args.vocab, args.batch, args.big_batch, args.dim = [100, 300], 8, 16, 32
        args.dtype, args.warmup, args.repeats = "float32", 1, 2
    return args


ARGS = parse_args()
if ARGS.smoke:
    # Before triton is imported: the kernels are built for the interpreter at import.
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

from benchmarks.common import (REPO, DispatchRecord, compile_fresh, compiled_frames, environment,  # noqa: E402
                               peers_at_best, row_failed, row_settings, time_ms, write_json)
from engine.ops import hashtag_ce  # noqa: E402
from engine.ops import REGISTRY  # noqa: E402
from engine.ops.hashtag_ce import target_weights  # noqa: E402


def _version(dist: str):
    import importlib.metadata
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def make_inputs(b, v, d, k, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(b, d, device=device, dtype=dtype, generator=g).requires_grad_()
    weight = (torch.randn(v, d, device=device, dtype=dtype, generator=g) / d ** 0.5).requires_grad_()
    tags = torch.randint(0, v, (b, k), device=device, generator=g)
    if k > 1:  # rows with fewer than K hashtags, as in the data
        tags[::2, -1] = -1
    return x, weight, tags


def build_step(method, x, weight, tags):
    """A zero-argument forward + backward, or a string saying why the method does not apply."""
    k = tags.shape[1]
    if method == "engine":
        backend = "triton"
        return lambda: hashtag_ce(x, weight, tags, backend=backend).backward()
    if method in ("eager", "compile"):
        tw = target_weights(tags, None)

        def reference(x, weight):
            return REGISTRY["hashtag_ce"].reference(x, weight, tags, tw)[0]

        # Compiled fresh for each case with static shapes, as a model of that shape would be.
        fn = compile_fresh(reference, COMPILE_BACKEND) if method == "compile" else reference
        return lambda: fn(x, weight).backward()
    if k != 1:
        return "hard targets only: measured at K=1"
    if x.device.type != "cuda":
        return "needs CUDA"
    target = tags[:, 0].contiguous()
    if method == "liger":
        try:
            from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
        except ImportError as e:
            return f"not installed ({e})"
        loss_fn = LigerFusedLinearCrossEntropyLoss()
        return lambda: loss_fn(weight, x, target).backward()
    if method == "cce":
        try:
            from cut_cross_entropy import linear_cross_entropy
        except ImportError as e:
            return f"not installed ({e})"
        return lambda: linear_cross_entropy(x, weight, target).backward()
    raise ValueError(f"unknown method {method!r}")


def measure(step, leaves, warmup, repeats):
    def clear():
        for t in leaves:
            t.grad = None

    def fresh_step():
        # Gradients start absent, as in training after zero_grad(set_to_none=True).
        clear()
        step()

    out = {"ms": time_ms(fresh_step, warmup=warmup, repeat=repeats), "repeats": repeats}
    if leaves[0].device.type == "cuda":
        clear()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        grads = sum(t.grad.numel() * t.grad.element_size() for t in leaves)
        out["extra_mb"] = (torch.cuda.max_memory_allocated() - base - grads) / MB
    else:
        out["extra_mb"] = None
        out["memory_note"] = "not measured: no allocator statistics on CPU"
    return out


def evaluate_targets(results):
    index = {(r["B"], r["V"], r["K"], r["method"]): r for r in results if "ms" in r}
    verdicts = []
    for what, b, v, k, metric, limit in TARGETS:
        ours = index.get((b, v, k, "engine"))
        peer = index.get((b, v, k, limit)) if isinstance(limit, str) else None
        value = ours.get(metric) if ours else None
        bound = peer.get(metric) if peer else (limit if not isinstance(limit, str) else None)
        verdicts.append({"target": what, "metric": metric, "engine": value, "bound": bound,
                         "met": None if value is None or bound is None else value <= bound})
    return verdicts


def main():
    args = ARGS
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    dtype = getattr(torch, args.dtype)
    cases = []
    for v in args.vocab:
        for k in sorted({args.k, 1}, reverse=True):
            cases.append((args.batch, v, k))
    if args.big_batch:
        cases.append((args.big_batch, max(args.vocab), args.k))
    name = "smoke" if args.smoke else (torch.cuda.get_device_name().split()[-1].lower() if device.type == "cuda"
                                       else "cpu")
    out = args.out or str(REPO / "benchmarks" / "results" / f"hashtag_ce_{name}.json")
    env = dict(environment(), liger_kernel=_version("liger-kernel"), cut_cross_entropy=_version("cut-cross-entropy"))
    payload = {"benchmark": "hashtag_ce", "environment": env, "args": vars(args),
               "device": str(device), "dtype": args.dtype, "D": args.dim, "results": [], "targets": []}
    if device.type != "cuda":
        payload["unmeasured"] = "no CUDA device: times are CPU (interpreter) times, memory is not measured, " \
                                "and the targets, liger and cce are not evaluated"
    peers_at_best()
    for b, v, k in cases:
        for method in args.methods:
            row = {"B": b, "V": v, "K": k, "method": method}
            torch.manual_seed(0)
            x, weight, tags = make_inputs(b, v, args.dim, k, dtype, device)
            record = DispatchRecord()
            step = build_step(method, x, weight, tags)
            if isinstance(step, str):
                row["skipped"] = step
            else:
                compiled = method == "compile"
                row["settings"] = row_settings(warmup=args.warmup, repeats=args.repeats,
                                               compile=COMPILE_BACKEND if compiled else None,
                                               dynamic=False if compiled else None)
                try:
                    row.update(measure(step, [x, weight], args.warmup, args.repeats))
                    if compiled:
                        row["settings"].update(compiled_frames())
                except torch.OutOfMemoryError as e:
                    row["skipped"] = f"out of memory: {str(e).splitlines()[0]}"
                except Exception as e:  # a peer failing must not lose the other measurements
                    row["error"] = f"{type(e).__name__}: {e}"
                row.update(record.fields())
            del x, weight, tags, step
            if device.type == "cuda":
                torch.cuda.empty_cache()
            payload["results"].append(row)
            print(json.dumps(row), flush=True)
            write_json(out, payload)
    payload["targets"] = evaluate_targets(payload["results"]) if device.type == "cuda" else []
    failed = [r for r in payload["results"] if row_failed(r)]
    payload["failed_rows"] = len(failed)
    write_json(out, payload)
    print(f"wrote {out}" + (f"; {len(failed)} rows failed (error or failed check)" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
