"""How long a checkpoint stops the step loop: a synchronous write (every rank writes, rank 0
commits, then the loop goes on) against engine.checkpoint.Writer's background write (the loop
waits for the copy to host memory only), on gloo CPU ranks, with each rank's peak resident
memory. The state is that of a real run: a ResNeXt-101 32x16d trunk and its momentum on rank
0, and a vocabulary-parallel head of V x 2048 (weight + momentum) split over the ranks.

    # the largest head whose two copies fit 24 GiB on 2 ranks (20 GiB peak in all):
    python -m benchmarks.bench_checkpoint --vocab 524288 --step-s 2 --out benchmarks/results/checkpoint_cpu_2core.json
    python -m benchmarks.bench_checkpoint --vocab 1048576   # the paper's largest head: ~40 GiB of host memory
    python -m benchmarks.bench_checkpoint --smoke            # seconds: a small trunk and head

The "stall" is the time save() takes in the loop; "committed" is the time until the
checkpoint is complete on disk (for the background writer, overlapped with the steps that
follow; here the loop sleeps `--step-s` per step in their place, as a GPU would compute).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import tempfile
import time

import torch

from benchmarks.common import environment, write_json
from engine import checkpoint as ck
from engine.distributed import spawn_ranks


def _state(rank: int, world: int, vocab: int, dim: int, smoke: bool) -> dict:
    from engine.models.resnext import resnext
    from engine.ops.hashtag_ce import vocab_slices

    lo, hi = vocab_slices(vocab, world)[rank]
    weight = torch.randn(hi - lo, dim)
    files = {ck.rank_file(rank): {"head": {"weight": weight, "bias": torch.zeros(hi - lo)},
                                  "head_optimizer": {"weight": {"momentum_buffer": torch.randn_like(weight)}}}}
    if rank == 0:
        trunk = resnext([1, 1, 1, 1], 4, 4, num_classes=10) if smoke else resnext([3, 4, 23, 3], 32, 16,
                                                                                   num_classes=10)
        sd = {k: v for k, v in trunk.state_dict().items() if not k.startswith("fc.")}
        files["shared.pt"] = {"trunk": sd, "optimizer": {i: {"momentum_buffer": torch.zeros_like(v)}
                                                         for i, v in enumerate(sd.values())}}
    return files


def _job(rank, world, root, mode, vocab, dim, saves, step_s, smoke, result):
    files = _state(rank, world, vocab, dim, smoke)
    nbytes = sum(t.numel() * t.element_size() for f in files.values() for t in _tensors(f))
    writer = ck.Writer(root, rank, world, keep_last=1, background=mode == "background")
    stalls, committed = [], []
    import torch.distributed as dist

    for step in range(1, saves + 1):
        dist.barrier()
        t0 = time.perf_counter()
        meta = {"num_classes": vocab, "head_slices": []} if rank == 0 else None
        writer.save(step, files, meta=meta)
        stalls.append(time.perf_counter() - t0)
        time.sleep(step_s)  # the steps that follow the save
        writer.wait()
        committed.append(time.perf_counter() - t0)
    dist.barrier()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    with open(f"{result}.{rank}", "w") as f:
        json.dump({"rank": rank, "bytes": nbytes, "stall_s": stalls, "until_committed_s": committed,
                   "peak_rss_gib": peak}, f)


def _tensors(tree):
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, dict):
        for v in tree.values():
            yield from _tensors(v)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=131072, help="head classes (the paper's largest: 1048576)")
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--saves", type=int, default=3)
    p.add_argument("--step-s", type=float, default=0.0, help="seconds of simulated steps after each save")
    p.add_argument("--dir", help="where checkpoints go (default: a temporary directory)")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out")
    args = p.parse_args()
    if args.smoke:
        args.vocab, args.dim, args.saves = 1024, 64, 2
    torch.set_num_threads(1)
    rows = []
    base = args.dir or tempfile.mkdtemp(prefix="bench_ckpt_")
    try:
        for mode in ("sync", "background"):
            root = os.path.join(base, mode, "checkpoints")
            result = os.path.join(base, f"{mode}.json")
            spawn_ranks(_job, args.world, base, root, mode, args.vocab, args.dim, args.saves, args.step_s,
                        args.smoke, result, timeout_s=3600)
            ranks = []
            for r in range(args.world):
                with open(f"{result}.{r}") as f:
                    ranks.append(json.load(f))
            # The loop's stall is the slowest rank's (the next step's collectives wait for it).
            stall = [max(x["stall_s"][i] for x in ranks) for i in range(args.saves)]
            done = [max(x["until_committed_s"][i] for x in ranks) for i in range(args.saves)]
            rows.append({"mode": mode, "stall_s_per_checkpoint": stall, "until_committed_s": done,
                         "stall_s_median": sorted(stall)[len(stall) // 2], "ranks": ranks})
            print(f"{mode:10s} stall per checkpoint {', '.join(f'{s:.2f}' for s in stall)} s; committed after "
                  f"{', '.join(f'{s:.2f}' for s in done)} s; peak RSS per rank "
                  f"{', '.join('%.2f' % x['peak_rss_gib'] for x in ranks)} GiB", flush=True)
            shutil.rmtree(os.path.join(base, mode), ignore_errors=True)
    finally:
        if not args.dir:
            shutil.rmtree(base, ignore_errors=True)
    payload = {"benchmark": "checkpoint stall, sync vs background", "environment": environment(),
               "settings": {"vocab": args.vocab, "dim": args.dim, "world": args.world, "saves": args.saves,
                            "step_s": args.step_s, "trunk": "smoke" if args.smoke else "resnext101_32x16d",
                            "dtype": "fp32"},
               "results": rows}
    if args.out:
        write_json(args.out, payload)


if __name__ == "__main__":
    main()
