"""Training metrics: the GPU's peak FLOP rate, and the logger that writes metrics.jsonl,
TensorBoard event files and the progress line. The loop hands the logger plain values
(timings, counts, its resolved settings); the logger reads nothing of the loop's."""

from __future__ import annotations

import json
import os
import time
from typing import Optional

import torch

from engine.config import Config
from engine.distributed import DistInfo


PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "GH200": 989.0, "B200": 2250.0, "A100": 312.0,
                    "A800": 312.0, "L40S": 362.0, "A10G": 70.0, "L4": 121.0}


def peak_flops(cfg: Config, device: torch.device, amp_dtype: torch.dtype) -> Optional[float]:
    if cfg.train.peak_tflops:
        return cfg.train.peak_tflops * 1e12
    if device.type != "cuda" or amp_dtype == torch.float32:
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in sorted(PEAK_BF16_TFLOPS.items(), key=lambda kv: -len(kv[0])):
        if key in name:
            return tflops * 1e12
    return None


class MetricLogger:
    """Per log interval: loss, lr, img/s (global, per rank), data-wait share, step time,
    MFU, memory; JSONL (RUN_DIR/metrics.jsonl) and TensorBoard on rank 0, a progress line
    on stdout."""

    def __init__(self, cfg: Config, d: DistInfo, device: torch.device, amp_dtype: torch.dtype,
                 flops_per_image: float):
        self.cfg, self.d, self.device = cfg, d, device
        self.rank0 = d.rank == 0
        self.every = cfg.train.log_every
        self.flops = flops_per_image
        self.peak = peak_flops(cfg, device, amp_dtype)
        self.history: list[dict] = []
        self.tb = None
        self._jsonl = None
        self._reset()

    def _reset(self):
        self.n = 0
        self.data_s = 0.0
        self.step_s = 0.0
        self.t_start = time.perf_counter()

    def start(self, step: int, resolved: dict) -> None:
        """`resolved`: the run's settings as engine.train.Trainer.resolved() gives them."""
        self.total = self.cfg.train.steps
        self.first_step = step
        self.t0 = time.perf_counter()
        if not self.rank0:
            return
        os.makedirs(self.cfg.train.out_dir, exist_ok=True)
        self._jsonl = open(os.path.join(self.cfg.train.out_dir, "metrics.jsonl"), "a", encoding="utf-8")
        if self.cfg.train.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(os.path.join(self.cfg.train.out_dir, "tb"))
            except Exception as e:  # tensorboard not installed
                print(f"engine train: TensorBoard logs skipped ({type(e).__name__}: {e}); JSONL only", flush=True)
        world = resolved["world_size"]
        print(f"engine train: {self.cfg.preset or 'custom config'} on {world} rank(s), {resolved['device']}, "
              f"{self.cfg.model.name}, global batch {self.cfg.train.batch_size} = {resolved['micro_batch']} x "
              f"{world} ranks x {resolved['accumulation']} accumulation, peak lr {resolved['peak_lr']:.4g}, "
              f"vocab {resolved['vocab_size']}, steps {step} -> {self.total}, out {self.cfg.train.out_dir}",
              flush=True)

    def step(self, lr: float, data_s: float, step_s: float) -> None:
        """Host-side timings of one step (the loss is counted on the device: engine.train.StepCounters)."""
        self.n += 1
        self.data_s += data_s
        self.step_s += step_s
        self.lr = lr

    def due(self, step: int) -> bool:
        return step % self.every == 0 or step == self.total

    def flush(self, step: int, loss_sum: float, finite: int, steps: int) -> None:
        """One record for the steps since the last flush: `steps` of them, `finite` with a
        finite loss summing to `loss_sum` (read back from the device)."""
        if self.n == 0:
            return
        wall = time.perf_counter() - self.t_start
        images = self.n * self.cfg.train.batch_size
        ips = images / wall
        rec = {"step": step, "loss": loss_sum / finite if finite else None, "lr": self.lr,
               "img_per_s": ips, "img_per_s_per_rank": ips / self.d.world,
               "data_wait": self.data_s / wall, "step_ms": 1e3 * self.step_s / self.n,
               "mfu": ips * self.flops / (self.d.world * self.peak) if self.peak else None,
               "mem_gib": self._memory(), "skipped": steps - finite, "time": time.time()}
        self.history.append(rec)
        self._reset()
        if not self.rank0:
            return
        self._jsonl.write(json.dumps(rec) + "\n")
        self._jsonl.flush()
        if self.tb is not None:
            for k in ("loss", "lr", "img_per_s", "img_per_s_per_rank", "data_wait", "step_ms", "mfu", "mem_gib"):
                if rec[k] is not None:
                    self.tb.add_scalar(f"train/{k}", rec[k], step)
        if self.cfg.train.progress:
            done = step / self.total
            bar = "#" * int(20 * done) + "." * (20 - int(20 * done))
            elapsed = time.perf_counter() - self.t0
            eta = elapsed / max(1, step - self.first_step) * (self.total - step)
            mfu = f"{100 * rec['mfu']:.1f}%" if rec["mfu"] is not None else "-"
            loss = f"{rec['loss']:.4f}" if rec["loss"] is not None else "nan (skipped)"
            print(f"[{bar}] step {step}/{self.total} loss {loss} lr {rec['lr']:.4g} | "
                  f"{ips:,.0f} img/s ({rec['img_per_s_per_rank']:,.0f}/rank) | data {100 * rec['data_wait']:.0f}% | "
                  f"step {rec['step_ms']:.1f} ms | mfu {mfu} | mem {rec['mem_gib']:.2f} GiB | eta {eta:.0f}s",
                  flush=True)

    def _memory(self) -> float:
        if self.device.type == "cuda":
            m = torch.cuda.max_memory_allocated(self.device) / 2**30
            torch.cuda.reset_peak_memory_stats(self.device)
            return m
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB

    def note(self, text: str) -> None:
        if self.rank0 and self.cfg.train.progress:
            print(f"engine train: {text}", flush=True)

    def finish(self, status: str, *, step: int, images: int, skipped: int, checkpoint: Optional[str],
               resolved: dict) -> dict:
        """The run's summary: `status`, where the run stands (optimizer steps, images seen,
        skipped steps, the last checkpoint), its `resolved` settings and the history."""
        losses = [h["loss"] for h in self.history if h["loss"] is not None]
        timed = self.history[1:] or self.history  # the first interval holds the warm-up
        summary = {"status": status, "step": step, "steps": self.total, "images": images,
                   "skipped_steps": skipped, "first_loss": losses[0] if losses else None,
                   "final_loss": losses[-1] if losses else None,
                   "img_per_s": (sum(h["img_per_s"] for h in timed) / len(timed)) if timed else None,
                   "checkpoint": checkpoint, "out_dir": self.cfg.train.out_dir,
                   "wall_s": time.perf_counter() - self.t0, **resolved}
        if self.rank0:
            print(f"engine train: {status} at step {step}/{self.total}; loss {summary['first_loss']} -> "
                  f"{summary['final_loss']}; {skipped} step(s) skipped; checkpoint {checkpoint}", flush=True)
        summary["history"] = self.history
        return summary

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None
