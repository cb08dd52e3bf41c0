"""Data pipeline throughput: images/s out of the loaders, no model, from shards on
local disk. Every peer in the same run (engine.data.bench):

  dali                    the training pipeline; mixed (GPU) decode on a GPU, CPU operators otherwise
  torch                   the PyTorch loader, one DataLoader worker per core
  torch_1core             the PyTorch loader in-process on one core (ms per image per core)
  torchvision_gpu_decode  torchvision.io.decode_jpeg(device="cuda"), decode only (GPU only)

Without --dataset it synthesises JPEGs (default 500x375-ish, like the DESIGN
figures) and builds shards under --work first (reused when present).

  python -m benchmarks.bench_data --out benchmarks/results/data_cpu.json            # this machine
  python -m benchmarks.bench_data --device cuda --out benchmarks/results/data_h100.json
  python -m benchmarks.bench_data --smoke                                           # seconds, for CI

Target (issue 3): >= 12,000 img/s per H100/H200 at 224 with resampling on.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from benchmarks.common import environment, write_json

# Batches each PyTorch DataLoader worker keeps ready (engine.data.loader_torch's default prefetch).
PREFETCH = 2


def prepare(work: str, n_images: int, min_side: int, max_side: int, workers: int) -> str:
    from engine.data.builder import BuildConfig, build
    from engine.data.synthetic import synth

    raw, ds = os.path.join(work, "raw"), os.path.join(work, "ds")
    if not os.path.isfile(os.path.join(raw, "metadata.jsonl")):
        synth(raw, n_images=n_images, vocab_size=200, seed=0, min_side=min_side, max_side=max_side, bad_files=False,
              n_duplicates=0, n_eval_overlap=0, n_eval=0)
    build(BuildConfig(images=os.path.join(raw, "images"), metadata=os.path.join(raw, "metadata.jsonl"), out=ds,
                      vocab_size=200, shard_size=1000, workers=workers,
                      # The work folder is this benchmark's own: a build made by an older builder or with
                      # other settings is replaced (an unchanged one is rebuilt from the builder's caches).
                      overwrite=True))
    return ds


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", help="a built dataset (default: synthesise and build one under --work)")
    p.add_argument("--work", default="/tmp/engine-bench-data", help="where to synthesise and build")
    p.add_argument("--n-images", type=int, default=2000)
    p.add_argument("--min-side", type=int, default=375)
    p.add_argument("--max-side", type=int, default=500)
    p.add_argument("--device", default="cpu")
    p.add_argument("--backends", default="all",
                   help="comma-separated subset of dali,torch,torch_1core,torchvision_gpu_decode")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batches", type=int, default=200, help="timed batches per loader")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed batches first (default: the PyTorch loader's whole prefetch queue, "
                        "2 per worker, plus 2)")
    p.add_argument("--threads", type=int, default=None, help="DALI threads / PyTorch workers (default: all cores)")
    p.add_argument("--hw-decoder-load", type=float, nargs="*", default=[0.65],
                   help="DALI mixed decode: one run per value (GPU only)")
    p.add_argument("--no-resample", action="store_true")
    p.add_argument("--smoke", action="store_true", help="tiny images, few batches: checks the script runs")
    p.add_argument("--out", default=None, help="JSON results file")
    args = p.parse_args(argv)
    if args.smoke:
        args.n_images, args.min_side, args.max_side = 96, 40, 80
        args.batch_size, args.size, args.batches = 16, 64, 3
        args.work = args.work.rstrip("/") + "-smoke"

    from engine.data.bench import measure_loaders

    # The PyTorch loader's workers fill a queue of PREFETCH batches each while the first batches are
    # taken; timing from there would count batches decoded before the clock started. The warm-up
    # drains that queue, so the timed batches come at the rate the workers decode them.
    workers = args.threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    if args.warmup is None:
        args.warmup = PREFETCH * workers + 2

    t0 = time.time()
    dataset = args.dataset or prepare(args.work, args.n_images, args.min_side, args.max_side, workers=0)
    payload = {"benchmark": "data_pipeline", "environment": environment(), "args": vars(args), "runs": []}
    loads = args.hw_decoder_load if args.device.startswith("cuda") else [args.hw_decoder_load[0]]
    for k, load in enumerate(loads):
        backends = args.backends if k == 0 else "dali"  # the peers once, DALI per decoder load
        run = measure_loaders(dataset, backends=backends, device=args.device, batch_size=args.batch_size,
                              size=args.size, batches=args.batches, warmup=args.warmup, threads=args.threads,
                              resample=not args.no_resample, hw_decoder_load=load)
        run["settings"] = {"warmup_batches": args.warmup, "timed_batches": args.batches,
                           "page_cache": "not dropped: shards built or read earlier on this machine are likely cached, "
                                         "so the figures are decode-bound, not disk-bound"}
        payload["runs"].append(run)
        if args.out:  # as it goes: a run cut short keeps what it measured
            write_json(args.out, payload)
        for name, r in run["results"].items():
            print(f"{name:24s} " + ", ".join(f"{k}={v}" for k, v in r.items()), flush=True)
    payload["seconds"] = round(time.time() - t0, 1)
    if args.out:
        write_json(args.out, payload)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
