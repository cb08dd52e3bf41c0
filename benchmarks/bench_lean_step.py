"""The lean step against the per-step read-back it replaced, in the same run: the training
loop (engine.train.Trainer, synthetic batch on the device) with sync points only at log
steps, beside the same loop made to read back every step (a sync point every step and the
host-side skip, which is what each step did before). Per variant: step time, img/s, and the
device-to-host synchronisations per steady-state step, counted by CUDA's sync debug mode on
a GPU and by the loop's read-back hook (engine.train.host_read) everywhere.

    python -m benchmarks.bench_lean_step --out benchmarks/results/lean_step_h200.json
    python -m benchmarks.bench_lean_step --smoke --out /tmp/lean_smoke.json          # CPU, tiny
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings

import torch

from benchmarks.common import environment, write_json


def run_variant(name: str, overrides: list[str], per_step_sync: bool, warmup: int, steps: int) -> dict:
    import engine.train as train_mod
    from engine.config import apply_overrides, get_preset

    log_every = 1 if per_step_sync else warmup + steps  # lean: one sync point, the last step
    cfg = apply_overrides(get_preset(overrides[0]), overrides[1:] + [
        f"train.steps={warmup + steps}", f"train.log_every={log_every}", "train.ckpt_every=0",
        "train.checkpoints=false", "train.progress=false", "train.tensorboard=false", "train.resume=never",
        f"train.out_dir={tempfile.mkdtemp(prefix='lean-')}"])
    trainer = train_mod.Trainer(cfg)
    reads = {"steady": 0}
    real_read = train_mod.host_read
    try:
        if per_step_sync:
            trainer.skips_on_device = lambda: False
        trainer.log.start(0, trainer.resolved())
        # Warm-up: the first step's checks and first update, autotuning, allocator growth.
        batches = train_mod.iter_forever(trainer.loader)
        for _ in range(warmup):
            trainer.train_step(batches)
            trainer.state.step += 1
            trainer.log.step(0.0, 0.0, 0.0)
        trainer.sync(False, final=True)
        if torch.cuda.is_available():
            torch.cuda.synchronize()

        def counted(t):
            reads["steady"] += 1
            return real_read(t)

        train_mod.host_read = counted
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if torch.cuda.is_available():
                torch.cuda.set_sync_debug_mode("warn")
            t0 = time.perf_counter()
            for _ in range(steps):
                lr, data_s = trainer.train_step(batches)
                trainer.state.step += 1
                trainer.log.step(lr, data_s, 0.0)
                if trainer.log.due(trainer.state.step) or trainer.state.step == cfg.train.steps:
                    trainer.sync(False)
            if torch.cuda.is_available():
                torch.cuda.set_sync_debug_mode(0)
                torch.cuda.synchronize()
            wall = time.perf_counter() - t0
        cuda_syncs = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message).lower()]
    finally:
        train_mod.host_read = real_read
        trainer.close()
    return {"variant": name, "per_step_sync": per_step_sync, "log_every": log_every, "warmup_steps": warmup,
            "timed_steps": steps, "step_ms": 1e3 * wall / steps, "img_per_s": steps * cfg.train.batch_size / wall,
            "host_reads_per_step": reads["steady"] / steps,
            "cuda_syncs_per_step": len(cuda_syncs) / steps if torch.cuda.is_available() else None,
            "cuda_sync_examples": sorted(set(cuda_syncs))[:5]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU")
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args(argv)
    if args.smoke:
        overrides = ["test", "data.synthetic=true", "data.synthetic_vocab=9", "train.batch_size=4"]
        steps, warmup = args.steps or 10, 2
    else:
        # One GPU: ResNeXt-50 32x4d at 64 images, bf16, channels_last, the fused bn_act blocks, 1.5k hashtags.
        overrides = ["resnext50-1.5k", "data.synthetic=true", "train.batch_size=64", "train.micro_batch=64"]
        steps, warmup = args.steps or 50, 10
    result = {"benchmark": "lean_step", "environment": environment(), "smoke": args.smoke, "overrides": overrides,
              "rows": []}
    for name, per_step in (("lean (sync at log steps)", False), ("per-step read-back (before)", True)):
        result["rows"].append(run_variant(name, overrides, per_step, warmup, steps))
        write_json(args.out, result)
    lean, before = result["rows"]
    result["speedup"] = before["step_ms"] / lean["step_ms"]
    write_json(args.out, result)
    for row in result["rows"]:
        syncs = "-" if row["cuda_syncs_per_step"] is None else f"{row['cuda_syncs_per_step']:.2f}"
        print(f"{row['variant']:30s} {row['step_ms']:8.2f} ms/step {row['img_per_s']:9.1f} img/s "
              f"host reads/step {row['host_reads_per_step']:.2f} CUDA syncs/step {syncs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
