"""Hashtag pretraining: `engine.train(config)` / `Trainer`, and `engine train`.

    from engine.config import get_preset, apply_overrides
    from engine.train import train
    summary = train(apply_overrides(get_preset("tiny"), ["data.dataset=ds", "train.steps=100"]))

Launch on one node or many with torchrun (its rendezvous):

    torchrun --nproc-per-node 8 --nnodes N --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        -m engine.cli train --preset paper-32x8d-17k --set data.dataset=/data/ig-17k

Layout (DESIGN.md): the trunk is data parallel (DDP; NCCL on GPUs, gloo on CPUs); the
hashtag head is vocabulary-parallel over the same ranks and stays out of DDP. The head
gives each rank's features the exact gradient of the global-batch mean loss, so the
trunk's gradient is the *sum* over ranks of the local ones: DDP runs a summing
all-reduce hook instead of its average (see `sum_allreduce_hook`). Model code holds no
distributed logic. bf16 autocast, channels_last, optional torch.compile and CUDA graphs,
per-GPU BN (the paper) or SyncBN, SGD + Nesterov (torch's fused kernel, or apex),
warm-up then step/cosine decay, gradient accumulation up to the global batch.

Elastic: with the global batch B = train.batch_size and the micro-batch m fixed, step s is
B / m micro-batches whose images and augmentations depend on (seed, s, micro-batch) only;
rank r of W runs B / (m W) of them (gradient accumulation). The step is the same at any W
(up to the summation order), so a checkpoint written by W1 ranks resumes at any W2 with
B % (m W2) == 0: the head's slices and their momentum are resharded, the data position is
the step. With train.micro_batch=0 a resumed run keeps the checkpoint's micro-batch.

Faults: checkpoints every N steps, at the end and on SIGTERM/SIGINT (engine.checkpoint),
written in the background by every rank; `train.resume=auto` continues from the newest one
exactly (same losses), at any world size that divides the batch; a non-finite
loss skips the step; `train.max_nonfinite` in a row stop the run naming the last good
checkpoint; out-of-memory errors name the knob to turn. A rank that dies makes the
others' collectives fail (or time out after train.dist_timeout_s) and torchrun ends the
job; with torchrun's --max-restarts the restarted job resumes from the last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.distributed as dist

from engine import checkpoint as ckpt_mod
from engine.builders import (build_head, build_optimizer, build_trunk, iter_forever,
                             load_init_weights, lr_lambda, model_flops_per_image, oom_advice, peak_lr, pick_device,
                             preflight, tag_width, wrap_trunk)
from engine.config import Config, ConfigError, accumulation, to_json, validate
from engine.distributed import init_distributed
from engine.metrics import MetricLogger


class NonFiniteLossError(RuntimeError):
    pass


class OutOfMemory(RuntimeError):
    pass


# =========================================================================== the API


def train(config: Config) -> dict:
    """Runs (or resumes) a training run; returns its summary (also RUN_DIR/summary.json)."""
    trainer = Trainer(config)
    try:
        summary = trainer.fit()
    except BaseException:
        trainer.close(orderly=False)
        raise
    trainer.close()
    return summary


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done (skipped ones included)
    skipped: int = 0  # steps skipped for a non-finite loss, in total
    nonfinite_in_row: int = 0
    images: int = 0  # images seen by the job (all ranks)
    last_checkpoint: Optional[str] = None


def host_read(t: torch.Tensor) -> list:
    """The loop's only read of device values (a blocking copy, which waits for the GPU to
    drain its queue). A step in steady state makes none; tests count the calls."""
    return t.tolist()


@dataclass
class Counters:
    loss_sum: float  # finite losses since the last read
    finite: int  # steps with a finite loss since the last read
    steps: int  # steps since the last read
    streak: int  # non-finite losses in a row, now
    skipped: int  # non-finite steps in the run
    limit_step: int  # the step at which the streak reached max_nonfinite, or -1
    stop: bool  # any rank asked to stop
    bad_tags: int  # the most bad tag values any rank counted


class StepCounters:
    """Per-step bookkeeping kept in one fp64 vector on the device (exact for counts up to
    2**53), updated by a few small kernels per step and read back in one copy."""

    def __init__(self, device: torch.device, state: TrainState, max_nonfinite: int):
        self.max_nonfinite = max_nonfinite
        # [loss_sum, finite, steps, streak, skipped, limit_step, step]
        self.v = torch.tensor([0, 0, 0, state.nonfinite_in_row, state.skipped, -1, state.step],
                              dtype=torch.float64, device=device)

    def record(self, loss: torch.Tensor, finite: torch.Tensor) -> None:
        v, ok = self.v, finite.double()
        streak = (v[3] + 1) * (1 - ok)
        step = v[6] + 1
        reached = (v[5] < 0) & (streak >= self.max_nonfinite)
        self.v = torch.stack([v[0] + torch.where(finite, loss.double(), 0.0), v[1] + ok, v[2] + 1, streak,
                              v[4] + 1 - ok, torch.where(reached, step, v[5]), step])

    def read(self, flags: torch.Tensor) -> Counters:
        """The counters and the (stop, bad tags) flags, in one copy."""
        values = host_read(torch.cat([self.v, flags.to(self.v)]))
        return Counters(values[0], int(values[1]), int(values[2]), int(values[3]), int(values[4]), int(values[5]),
                        values[7] > 0, int(values[8]))

    def reset_interval(self) -> None:
        self.v[:3] = 0


class Trainer:
    """Everything a run needs, built in __init__ (checks first, then the process group,
    model, head, optimiser, data, and the resume); `fit()` runs the loop."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
        self.vocab = preflight(cfg, world)  # raises ConfigError before any work
        self.dist = init_distributed(cfg)
        self.loader = None
        try:
            self._build(cfg)
        except BaseException:
            if self.loader is not None and hasattr(self.loader, "close"):
                self.loader.close()
            self.dist.close(orderly=False)
            raise

    def _build(self, cfg: Config) -> None:
        self.device, self.amp_dtype = pick_device(cfg, self.dist)
        self.resume_path = find_resume(cfg)
        self.micro, self.accum = resumed_accumulation(cfg, self.dist.world, self.resume_path)
        self.out_dir = cfg.train.out_dir
        self.ckpt_root = os.path.join(self.out_dir, "checkpoints")
        self.rank0 = self.dist.rank == 0
        if self.rank0:
            os.makedirs(self.out_dir, exist_ok=True)

        torch.manual_seed(cfg.train.seed)  # the same initial trunk on every rank
        self.trunk = build_trunk(cfg)
        if cfg.model.init:
            load_init_weights(self.trunk, cfg.model.init)
        self.head = build_head(cfg, self.trunk.num_features, self.vocab, self.dist, self.device)
        self.trunk.to(self.device)
        if cfg.model.channels_last:
            self.trunk.to(memory_format=torch.channels_last)
        self.optimizer, self.head_param_ids = build_optimizer(cfg, self.trunk, self.head)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.loader = self._build_input(cfg)
        self.head_names = head_param_names(self.optimizer, self.head)
        self.writer = ckpt_mod.Writer(self.ckpt_root, self.dist.rank, self.dist.world, keep_last=cfg.train.keep_last,
                                      timeout_s=cfg.train.dist_timeout_s)
        self.state = TrainState()
        self._maybe_resume()
        self.model, self.ddp = wrap_trunk(cfg, self.trunk, self.dist, self.device, self.micro, self.amp_dtype,
                                          self.head, tag_width(self.loader))
        self.log = MetricLogger(cfg, self.dist, self.device, self.amp_dtype, model_flops_per_image(cfg, self.vocab))
        self.counters = StepCounters(self.device, self.state, cfg.train.max_nonfinite)
        self._momentum_ready = False
        self.last_sync_step = self.state.step
        if self.rank0:
            write_json(os.path.join(self.out_dir, "config.json"), {**cfg.to_dict(), "resolved": self.resolved()})

    def _build_input(self, cfg: Config):
        """This rank's share of every step's micro-batches (engine.data.sampling)."""
        d, dc = self.dist, cfg.data
        # bf16 input on a GPU under bf16 autocast (the first conv reads half the bytes); fp32 otherwise.
        dtype = self.amp_dtype if self.device.type == "cuda" and self.amp_dtype != torch.float32 else torch.float32
        if dc.synthetic:
            from engine.data.synthetic import SyntheticMicroBatches

            return SyntheticMicroBatches(global_batch=cfg.train.batch_size, micro_batch=self.micro, rank=d.rank,
                                         world_size=d.world, seed=cfg.train.seed, image_size=dc.image_size,
                                         vocab_size=self.vocab, tags_per_image=max(1, dc.max_tags or 3),
                                         device=self.device, dtype=self.amp_dtype,
                                         channels_last=cfg.model.channels_last)
        from engine.data.loaders import make_train_loader

        return make_train_loader(
            dc.dataset, self.micro, rank=d.rank, world_size=d.world, seed=cfg.train.seed, device=self.device,
            dtype=dtype, size=dc.image_size, resample=dc.resample, samples_per_epoch=dc.samples_per_epoch or None,
            global_batch=cfg.train.batch_size, backend=dc.backend, layout="NCHW", scale=(dc.scale_min, 1.0),
            max_tags=dc.max_tags or None, num_threads=dc.num_threads or None,
            num_workers=None if dc.num_workers < 0 else dc.num_workers, hw_decoder_load=dc.hw_decoder_load,
            prefetch=dc.prefetch)

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict:
        """The loop. A step queues its work and returns without reading anything back from the
        device, so the host stays ahead of the GPU; the loss, the non-finite streak and the
        stop signal are read once per sync point (a log step, a checkpoint step, the last step)."""
        cfg, state = self.cfg.train, self.state
        batches = iter_forever(self.loader)
        start_step, status = state.step, "completed"
        self.log.start(start_step, self.resolved())
        with StopSignals() as stop:
            while state.step < cfg.steps:
                t0 = time.perf_counter()
                lr, data_s = self.train_step(batches)
                state.step += 1
                state.images += cfg.batch_size
                self.log.step(lr, data_s, time.perf_counter() - t0)
                halted = cfg.halt_after and cfg.halt_after <= state.step - start_step and state.step < cfg.steps
                periodic = cfg.ckpt_every and state.step % cfg.ckpt_every == 0
                if not (halted or periodic or state.step == cfg.steps or self.log.due(state.step)):
                    continue
                stop_now = self.sync(stop.requested, final=halted or state.step == cfg.steps)
                if cfg.checkpoints and (stop_now or halted or state.step == cfg.steps
                                        or (periodic and not state.nonfinite_in_row)):
                    self.save()
                if stop_now or halted:
                    status = "preempted" if stop_now else "halted"
                    break
        return self.finish(status)

    def train_step(self, batches: Iterator[dict]) -> tuple[float, float]:
        """One optimizer step over `accum` micro-batches: (its lr, seconds spent waiting for
        data). A non-finite global-batch loss skips the update (weights, momentum); the
        schedule advances either way. The loss stays on the device (`self.counters`)."""
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.zero_grad(set_to_none=True)
        total, data_s = torch.zeros((), device=self.device), 0.0
        try:
            for i in range(self.accum):
                t0 = time.perf_counter()
                batch = next(batches)
                data_s += time.perf_counter() - t0
                total += self.forward_backward(batch["images"], batch["tags"], sync=i == self.accum - 1)
        except torch.OutOfMemoryError as e:
            raise OutOfMemory(oom_advice(self.cfg, self.micro, self.accum, self.device)) from e
        finite = torch.isfinite(total)
        self.update(finite)
        self.scheduler.step()  # the lr is a function of the step, skipped steps included
        self.counters.record(total, finite)
        return lr, data_s

    def update(self, finite: torch.Tensor) -> None:
        """The optimizer step where `finite`, without reading it back when the optimizer can
        skip on the device: torch's fused SGD leaves parameters and momentum untouched where
        `found_inf` is 1. Its first step would still create the momentum buffers (uninitialised)
        for a skipped step, and fp16's GradScaler and other optimizers decide on the host, so
        those read the flag back (a sync)."""
        if self.skips_on_device():
            self.optimizer.found_inf = torch.logical_not(finite).float().reshape(1)
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.found_inf
        elif host_read(finite):
            self.scaler.step(self.optimizer)
            self.scaler.update()

    def skips_on_device(self) -> bool:
        # Once every momentum buffer exists it stays: the scan over parameters runs only until then.
        if self._momentum_ready:
            return True
        opt = self.optimizer
        if self.scaler.is_enabled() or not isinstance(opt, torch.optim.SGD) or not opt.defaults.get("fused"):
            return False
        self._momentum_ready = all(g["momentum"] == 0 or all(opt.state.get(p, {}).get("momentum_buffer") is not None
                                                             for p in g["params"] if p.grad is not None)
                                   for g in opt.param_groups)
        return self._momentum_ready

    def forward_backward(self, images: torch.Tensor, tags: torch.Tensor, sync: bool = True) -> torch.Tensor:
        """Loss of one micro-batch (divided by the accumulation steps) and its backward; the
        trunk's gradient all-reduce runs when `sync`."""
        if not self.cfg.model.channels_last:
            images = images.contiguous()
        no_sync = self.ddp.no_sync() if (self.ddp is not None and not sync) else nullcontext()
        with no_sync:
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype != torch.float32,
                                cache_enabled=not self.cfg.model.cuda_graphs):
                loss = self.head(self.model(images), tags) / self.accum
            self.scaler.scale(loss).backward()
        return loss.detach().float()

    # ------------------------------------------------------------------ helpers of the loop
    def sync(self, stop: bool, final: bool = False) -> bool:
        """A sync point: one read-back of the step counters, with this rank's stop request
        all-reduced beside them so that every rank stops at the same step. Returns whether
        to stop; raises NonFiniteLossError after train.max_nonfinite non-finite losses in a row.
        Writes the metrics record when a log step is due or the loop ends here (`final`)."""
        # This rank's stop request and its count of bad tag values, agreed by every rank.
        flags = torch.stack([torch.tensor(float(stop), device=self.head.bad_tags.device),
                             self.head.bad_tags.double()]).to(self.dist.collective_device)
        if self.dist.world > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.dist.group)
        c = self.counters.read(flags)
        if c.bad_tags:
            raise ValueError(f"training data: a batch between steps {self.last_sync_step + 1} and {self.state.step} "
                             f"held {c.bad_tags} tag value(s) outside [-1, {self.vocab}) or bad tag weights (the "
                             f"dataset's vocabulary has {self.vocab} hashtags); rebuild the dataset or check "
                             "head.vocab_size")
        self.last_sync_step = self.state.step
        s = self.state
        newly_skipped = c.skipped - s.skipped
        s.skipped, s.nonfinite_in_row = c.skipped, c.streak
        if newly_skipped:
            self.log.note(f"step {s.step}: {newly_skipped} non-finite loss(es) since the last sync, update(s) "
                          f"skipped ({s.nonfinite_in_row} in a row now)")
        if c.limit_step >= 0:
            good = s.last_checkpoint or ckpt_mod.latest_checkpoint(self.ckpt_root)
            limit = self.cfg.train.max_nonfinite
            raise NonFiniteLossError(
                f"{limit} non-finite losses in a row (train.max_nonfinite={limit}) at step {c.limit_step}; the last "
                f"good checkpoint is {good or 'none (no checkpoint was written)'}. Lower optim.base_lr, lengthen "
                "optim.warmup_steps or use train.precision=bf16/fp32, then resume with --set train.resume=<that "
                "checkpoint>")
        stop_now = c.stop
        if final or stop_now or self.log.due(s.step):
            self.log.flush(s.step, c.loss_sum, c.finite, c.steps)
            self.counters.reset_interval()
        return stop_now

    def save(self) -> str:
        """A checkpoint of the current step: every rank copies its share to host memory and
        returns; the files are written in the background (engine.checkpoint.Writer). No
        collective: the head is saved slice by slice, never gathered."""
        shared_opt, local_opt = ckpt_mod.split_optimizer_state(self.optimizer.state_dict(), self.head_param_ids)
        s = self.state
        # The slice itself: head.state_dict() would gather the full vocabulary.
        rank_state = {"head": {name: p for name, p in self.head.named_parameters()},
                      "head_optimizer": {self.head_names[i]: st for i, st in local_opt["state"].items()},
                      "data": self.loader.state_dict(), "rng": ckpt_mod.rng_state(self.device),
                      "rank": self.dist.rank}
        files = {ckpt_mod.rank_file(self.dist.rank): rank_state}
        meta = config = None
        if self.rank0:
            files["shared.pt"] = {
                "trunk": self.trunk.state_dict(), "optimizer": shared_opt, "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "state": {"step": s.step, "skipped": s.skipped, "nonfinite_in_row": s.nonfinite_in_row,
                          "images": s.images}}
            meta = {"global_batch": self.cfg.train.batch_size, "micro_batch": self.micro,
                    "num_classes": self.head.num_classes, "head_slices": [list(x) for x in self.head.slices]}
            config = self.cfg.to_dict()
        path = self.writer.save(s.step, files, meta=meta, config=config)
        s.last_checkpoint = path
        self.log.note(f"checkpoint {path} (host copy {1000 * self.writer.host_copy_s:.0f} ms, written in the "
                      "background)")
        return path

    def wait_for_checkpoints(self) -> None:
        """Until the last checkpoint is committed, on every rank (its files may be read next)."""
        self.writer.wait()
        self.dist.barrier()

    def _maybe_resume(self) -> None:
        path = self.resume_path
        if path is None:
            return
        meta = ckpt_mod.read_meta(path)
        if meta["format"] == ckpt_mod.FORMAT_1:
            self._resume_format_1(path)
        else:
            self._resume(path, meta)
        self.state.last_checkpoint = path
        if self.rank0:
            print(f"engine train: resumed from {path} (step {self.state.step}, written by {meta['world_size']} "
                  f"rank(s), now {self.dist.world}; {self.accum} accumulation step(s) of {self.micro})", flush=True)

    def _resume(self, path: str, meta: dict) -> None:
        if meta["num_classes"] != self.head.num_classes:
            raise ConfigError(f"train.resume: {path} has a head of {meta['num_classes']} classes, this run "
                              f"{self.head.num_classes}")
        shared = ckpt_mod.load_file(os.path.join(path, "shared.pt"))
        self.trunk.load_state_dict(shared["trunk"])
        start, stop = self.head.vocab_start, self.head.vocab_stop
        head = ckpt_mod.read_rows(path, "head", start, stop)
        with torch.no_grad():
            for name, value in head.items():
                getattr(self.head, name).copy_(value)
        head_opt = ckpt_mod.read_rows(path, "head_optimizer", start, stop)
        ids = {name: i for i, name in self.head_names.items()}
        local = {"state": {ids[name]: st for name, st in head_opt.items()}}
        self.optimizer.load_state_dict(ckpt_mod.merge_optimizer_state(shared["optimizer"], local))
        self.scheduler.load_state_dict(shared["scheduler"])
        self.scaler.load_state_dict(shared["scaler"])
        for k, v in shared["state"].items():
            setattr(self.state, k, v)
        own = os.path.join(path, ckpt_mod.rank_file(self.dist.rank))
        same_world = meta["world_size"] == self.dist.world
        rank_state = ckpt_mod.load_file(own if same_world else os.path.join(path, ckpt_mod.rank_file(0)), mmap=True)
        self.loader.load_state_dict(rank_state["data"])  # the step: the same in every rank's file
        if same_world:  # another world size has other ranks: their streams start afresh
            ckpt_mod.set_rng_state(rank_state["rng"], self.device)  # last: nothing after it draws

    def _resume_format_1(self, path: str) -> None:
        ck = ckpt_mod.load_checkpoint(path, self.dist.rank, self.dist.world)
        model_sd = ck["model"]
        self.trunk.load_state_dict({k: v for k, v in model_sd.items() if not k.startswith("fc.")})
        self.head.load_state_dict({k[3:]: v for k, v in model_sd.items() if k.startswith("fc.")})
        self.optimizer.load_state_dict(ckpt_mod.merge_optimizer_state(ck["shared"]["optimizer"],
                                                                      ck["rank"]["optimizer"]))
        self.scheduler.load_state_dict(ck["shared"]["scheduler"])
        self.scaler.load_state_dict(ck["shared"]["scaler"])
        for k, v in ck["shared"]["state"].items():
            setattr(self.state, k, v)
        if ck["rank"]["data"].get("kind") == "synthetic":
            self.loader.set_step(self.state.step)
        else:
            try:
                self.loader.load_state_dict(ck["rank"]["data"])
            except ValueError as e:
                raise ConfigError(f"train.resume: {path} ({ckpt_mod.FORMAT_1}): {e}") from None
        ckpt_mod.set_rng_state(ck["rank"]["rng"], self.device)

    def finish(self, status: str) -> dict:
        self.wait_for_checkpoints()
        s = self.state
        summary = self.log.finish(status, step=s.step, images=s.images, skipped=s.skipped,
                                  checkpoint=s.last_checkpoint, resolved=self.resolved())
        if self.rank0:
            write_json(os.path.join(self.out_dir, "summary.json"), summary)
        return summary

    def resolved(self) -> dict:
        return {"world_size": self.dist.world, "micro_batch": self.micro, "accumulation": self.accum,
                "peak_lr": peak_lr(self.cfg), "device": str(self.device), "autocast": str(self.amp_dtype),
                "vocab_size": self.vocab, "dist_backend": self.dist.backend}

    def close(self, orderly: bool = True) -> None:
        """orderly: every rank finished the loop (the ranks meet before leaving their groups)."""
        try:
            # A failed run still leaves its last checkpoint committed, unless a peer died before
            # writing its part (then rank 0 would wait for it in vain: bounded).
            self.writer.wait(None if orderly or self.dist.world == 1 else 60.0)
        except RuntimeError as e:
            print(f"engine train: {e}", file=sys.stderr, flush=True)
        try:
            self.log.close()
        finally:
            close = getattr(self.loader, "close", None)
            if close is not None:
                close()
            # The head holds its group; a group referred to after destruction keeps its threads.
            self.head = self.model = self.ddp = self.optimizer = None
            self.dist.close(orderly)


# =========================================================================== resuming


def find_resume(cfg: Config) -> Optional[str]:
    """The checkpoint train.resume names (auto: the run's newest), or None."""
    resume = cfg.train.resume
    if resume == "never":
        return None
    root = os.path.join(cfg.train.out_dir, "checkpoints")
    path = ckpt_mod.latest_checkpoint(root) if resume == "auto" else ckpt_mod.resolve_checkpoint(resume)
    if path is None and resume != "auto":
        raise ConfigError(f"train.resume: {resume!r} holds no complete checkpoint")
    return path


def resumed_accumulation(cfg: Config, world: int, path: Optional[str]) -> tuple[int, int]:
    """(micro-batch, accumulation steps) at `world` ranks, continuing checkpoint `path`: its
    global batch and micro-batch stay (train.micro_batch=0 takes the checkpoint's), so the
    resumed steps are the steps the checkpoint's run would have taken."""
    micro, accum = accumulation(cfg, world)
    meta = ckpt_mod.read_meta(path) if path else None
    if meta is None:
        return micro, accum
    if meta["format"] == ckpt_mod.FORMAT_1:
        if meta["world_size"] != world:
            raise ConfigError(f"train.resume: {path} was written by {meta['world_size']} ranks in the old format "
                              f"({ckpt_mod.FORMAT_1}), which resumes at its own world size only; this job has "
                              f"{world} (run it with {meta['world_size']} ranks, or start a new run from its weights "
                              f"with --set model.init={path})")
        return micro, accum
    batch, m = meta["global_batch"], meta["micro_batch"]
    if batch != cfg.train.batch_size:
        raise ConfigError(f"train.resume: {path} continues a run of global batch {batch}, this config has "
                          f"train.batch_size={cfg.train.batch_size} (set it back to resume, or start a new run)")
    if cfg.train.micro_batch and cfg.train.micro_batch != m:
        raise ConfigError(f"train.resume: {path} continues a run of micro-batch {m}, this config has "
                          f"train.micro_batch={cfg.train.micro_batch} (set it to {m} or 0 to resume)")
    if batch % (m * world):
        from engine.data.sampling import world_sizes

        raise ConfigError(f"train.resume: {path} (global batch {batch}, micro-batch {m}, written by "
                          f"{meta['world_size']} ranks) cannot continue at {world} ranks: {batch} is not a multiple "
                          f"of {m} x {world}; world sizes that work: {', '.join(map(str, world_sizes(batch, m)))}")
    return m, batch // (m * world)


def head_param_names(optimizer: torch.optim.Optimizer, head: torch.nn.Module) -> dict[int, str]:
    """{index in the optimizer's state dict: name in the head} of the head's parameters."""
    names = {id(p): name for name, p in head.named_parameters()}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return {i: names[id(p)] for i, p in enumerate(params) if id(p) in names}


# =========================================================================== signals, files


class StopSignals:
    """SIGTERM / SIGINT set a flag; the loop checkpoints at the end of the step and stops.
    A second SIGINT interrupts at once."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def _handler(self, signum, frame):
        if signum == signal.SIGINT and self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


def write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, default=str)
    os.replace(tmp, path)


# =========================================================================== CLI: engine train


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", help="a named preset (--list-presets)")
    parser.add_argument("--config", help="a JSON config (e.g. a run's config.json), applied after the preset")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override one field (repeatable), e.g. --set train.steps=100 --set data.dataset=ds")
    parser.add_argument("--list-presets", action="store_true", help="list the presets and exit")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def run(args: argparse.Namespace) -> int:
    from engine import config as config_mod

    if args.list_presets:
        for name in config_mod.PRESETS:
            print(name)
        return 0
    try:
        cfg = config_mod.load(args.preset, args.overrides, args.config)
        if args.print_config:
            print(to_json(cfg))
            world = int(os.environ.get("WORLD_SIZE", "1"))
            try:
                validate(cfg, world)
                path = find_resume(cfg)
                micro, accum = resumed_accumulation(cfg, world, path)
                print(f"engine train: at {world} rank(s): micro-batch {micro} x {accum} accumulation step(s) per "
                      f"rank, global batch {cfg.train.batch_size}"
                      + (f"; resumes {path}" if path else ""), file=sys.stderr)
            except ConfigError as e:
                print(f"engine train: this config would fail: {e}", file=sys.stderr)
            return 0
        summary = train(cfg)
    except ConfigError as e:
        print(f"engine train: error: {e}", file=sys.stderr)
        return 2
    except (NonFiniteLossError, OutOfMemory) as e:
        print(f"engine train: error: {e}", file=sys.stderr)
        return 1
    return 0 if summary["status"] in ("completed", "halted") else (143 if summary["status"] == "preempted" else 1)
