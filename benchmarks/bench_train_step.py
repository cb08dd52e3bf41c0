"""Training-step throughput (synthetic input, SGD, channels_last): our ResNeXt in plain
and fused mode beside torchvision's, eager and under torch.compile, in the same run.

    python -m benchmarks.bench_train_step --out benchmarks/results/train_step_h100.json
    python -m benchmarks.bench_train_step --smoke --out /tmp/train_step_smoke.json   # CPU
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict

import torch

from benchmarks.common import (DispatchRecord, environment, peers_at_best, plot_results, row_failed, row_settings,
                               write_json)
from engine.bench import VARIANTS, measure

# (model, batch): the design's peer measurements on one H200 and the fused bottleneck's
# targets (32x8d at 256, 32x16d at 128, 32x48d at 64).
GPU_CASES = [("resnext50_32x4d", 256), ("resnext101_32x8d", 256), ("resnext101_32x16d", 128),
             ("resnext101_32x48d", 64)]
GPU_VARIANTS = ("plain", "fused", "conv", "torchvision", "torchvision-compile", "fused-compile", "conv-compile")
SMOKE_CASES = [("resnext50_32x4d", 2)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="JSON path; a PNG plot is written beside it")
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run proving the script")
    parser.add_argument("--variants", default=",".join(GPU_VARIANTS), help=f"from {', '.join(VARIANTS)}")
    parser.add_argument("--models", default=None, help="comma-separated model:batch pairs, e.g. resnext101_32x8d:256")
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args(argv)
    smoke = args.smoke
    device = torch.device("cuda" if torch.cuda.is_available() and not smoke else "cpu")
    cases = SMOKE_CASES if smoke else GPU_CASES
    if args.models:
        cases = [(m.split(":")[0], int(m.split(":")[1])) for m in args.models.split(",")]
    variants = [v for v in args.variants.split(",") if v]
    settings = dict(image_size=64 if smoke else 224, steps=args.steps or (1 if smoke else 20),
                    warmup=1 if smoke else 5, dtype="fp32" if smoke else "bf16", device=device,
                    compile_backend="aot_eager" if smoke else "inductor")
    payload = {"benchmark": "train_step", "environment": environment(), "smoke": smoke,
               "settings": {k: str(v) for k, v in settings.items()}, "results": []}
    peers_at_best()
    for model, batch in cases:
        for variant in variants:
            compiled = settings["compile_backend"] if variant.endswith("-compile") else None
            row_config = row_settings(warmup=settings["warmup"], repeats=settings["steps"], compile=compiled,
                                      dynamic=False if compiled else None)
            record = DispatchRecord()
            try:
                result = asdict(measure(variant, model, batch_size=batch, **settings))
                row_config.update(frames_compiled=result.pop("frames_compiled"),
                                  graph_breaks=result.pop("graph_breaks"))
                for key in ("warmup", "cudnn_benchmark", "compile", "dynamic"):
                    result.pop(key)
                row = {**result, "settings": row_config}
                print(f"{model} b{batch} {variant:<20} {row['images_per_s']:9.1f} img/s  {row['step_ms']:8.1f} ms",
                      flush=True)
            except (RuntimeError, ValueError) as e:  # out of memory, a compile failure: recorded, not fatal
                row = {"variant": variant, "model": model, "batch_size": batch, "settings": row_config,
                       "error": f"{type(e).__name__}: {str(e).splitlines()[0]}"}
                print(f"{model} b{batch} {variant:<20} failed: {row['error']}", flush=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            row.update(record.fields())
            payload["results"].append(row)
            write_json(args.out, payload)
    plot_results(args.out, f"training step, {payload['environment']['device']}", payload["results"],
                 group=lambda r: f"{r['model']} b{r['batch_size']}", series=lambda r: r["variant"],
                 value="images_per_s", ylabel="images/s")
    failed = [r for r in payload["results"] if row_failed(r)]
    if failed:
        print(f"{len(failed)} rows failed (error or failed check): "
              f"{', '.join(r['model'] + ' ' + r['variant'] for r in failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
