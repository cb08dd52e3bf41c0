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

Faults: checkpoints every N steps, at the end and on SIGTERM/SIGINT (engine.checkpoint);
`train.resume=auto` continues from the newest one exactly (same losses); a non-finite
loss skips the step; `train.max_nonfinite` in a row stop the run naming the last good
checkpoint; out-of-memory errors name the knob to turn. A rank that dies makes the
others' collectives fail (or time out after train.dist_timeout_s) and torchrun ends the
job; with torchrun's --max-restarts the restarted job resumes from the last checkpoint.
"""

from __future__ import annotations

import argparse
import bisect
import datetime
import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Iterator, Optional, Union

import torch
import torch.distributed as dist
from torch import nn

from engine import checkpoint as ckpt_mod
from engine.config import Config, ConfigError, accumulation, to_json, validate
from engine.distributed import shutdown


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


class Trainer:
    """Everything a run needs, built in __init__ (checks first, then the process group,
    model, head, optimiser, data, and the resume); `fit()` runs the loop."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
        preflight(cfg, world)  # raises ConfigError before any work
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
        self.micro, self.accum = accumulation(cfg, self.dist.world)
        self.out_dir = cfg.train.out_dir
        self.ckpt_root = os.path.join(self.out_dir, "checkpoints")
        self.rank0 = self.dist.rank == 0
        if self.rank0:
            os.makedirs(self.out_dir, exist_ok=True)

        torch.manual_seed(cfg.train.seed)  # the same initial trunk on every rank
        self.vocab = vocab_size(cfg, self.dist.world)
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
        self.loader = build_loader(cfg, self.dist, self.device, self.micro, self.amp_dtype)
        self.state = TrainState()
        self._maybe_resume()
        self.model, self.ddp = wrap_trunk(cfg, self.trunk, self.dist, self.device, self.micro, self.amp_dtype)
        self.flops_per_image = model_flops_per_image(cfg, self.vocab)
        self.log = MetricLogger(cfg, self.dist, self.device, self.flops_per_image, self.micro)
        if self.rank0:
            write_json(os.path.join(self.out_dir, "config.json"), {**cfg.to_dict(), "resolved": self.resolved()})

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict:
        cfg, state = self.cfg.train, self.state
        batches = iter_forever(self.loader)
        start_step, status = state.step, "completed"
        self.log.start(self, start_step)
        with StopSignals() as stop:
            while state.step < cfg.steps:
                t0 = time.perf_counter()
                loss, lr, data_s = self.train_step(batches)
                stop_now, nonfinite = self.agree(stop.requested, not math.isfinite(loss))
                state.step += 1
                state.images += cfg.batch_size
                self.count_nonfinite(nonfinite)
                self.log.step(state.step, loss, lr, data_s, time.perf_counter() - t0)
                halted = cfg.halt_after and cfg.halt_after <= state.step - start_step and state.step < cfg.steps
                periodic = cfg.ckpt_every and state.step % cfg.ckpt_every == 0 and not state.nonfinite_in_row
                if cfg.checkpoints and (stop_now or halted or state.step == cfg.steps or periodic):
                    self.save()
                if stop_now or halted:
                    status = "preempted" if stop_now else "halted"
                    break
        return self.finish(status)

    def train_step(self, batches: Iterator[dict]) -> tuple[float, float, float]:
        """One optimizer step over `accum` micro-batches: (the global-batch mean loss, its lr,
        seconds spent waiting for data). A non-finite loss skips the update."""
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.zero_grad(set_to_none=True)
        total, data_s = torch.zeros((), device=self.device), 0.0
        try:
            for i in range(self.accum):
                t0 = time.perf_counter()
                batch = next(batches)
                data_s += time.perf_counter() - t0
                total += self.forward_backward(batch["images"], batch["tags"], sync=i == self.accum - 1)
            loss = total.item()
        except torch.OutOfMemoryError as e:
            raise OutOfMemory(oom_advice(self.cfg, self.micro, self.accum, self.device)) from e
        if math.isfinite(loss):
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.scheduler.step()  # the lr is a function of the step, skipped steps included
        return loss, lr, data_s

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
    def agree(self, stop: bool, nonfinite: bool) -> tuple[bool, bool]:
        """Every rank takes the same decision: stop if any rank got a signal."""
        if self.dist.world == 1:
            return stop, nonfinite
        flags = torch.tensor([float(stop), float(nonfinite)], device=self.dist.collective_device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.dist.group)
        return bool(flags[0]), bool(flags[1])

    def count_nonfinite(self, nonfinite: bool) -> None:
        s = self.state
        if not nonfinite:
            s.nonfinite_in_row = 0
            return
        s.skipped += 1
        s.nonfinite_in_row += 1
        self.log.note(f"step {s.step}: non-finite loss, update skipped ({s.nonfinite_in_row} in a row)")
        if s.nonfinite_in_row >= self.cfg.train.max_nonfinite:
            good = s.last_checkpoint or ckpt_mod.latest_checkpoint(self.ckpt_root)
            raise NonFiniteLossError(
                f"{s.nonfinite_in_row} non-finite losses in a row (train.max_nonfinite="
                f"{self.cfg.train.max_nonfinite}) at step {s.step}; the last good checkpoint is "
                f"{good or 'none (no checkpoint was written)'}. Lower optim.base_lr, lengthen optim.warmup_steps "
                "or use train.precision=bf16/fp32, then resume with --set train.resume=<that checkpoint>")

    def save(self) -> str:
        """A checkpoint of the current step (a collective: every rank calls it)."""
        model_sd = self.head.state_dict()  # the full vocabulary (a collective with a group)
        model_sd = {**self.trunk.state_dict(), **{"fc." + k: v for k, v in model_sd.items()}} if self.rank0 else None
        shared_opt, local_opt = ckpt_mod.split_optimizer_state(self.optimizer.state_dict(), self.head_param_ids)
        s = self.state
        shared = {"optimizer": shared_opt, "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                  "state": {"step": s.step, "skipped": s.skipped, "nonfinite_in_row": s.nonfinite_in_row,
                            "images": s.images}}
        rank_state = {"optimizer": local_opt, "data": self.loader.state_dict(),
                      "rng": ckpt_mod.rng_state(self.device), "rank": self.dist.rank}
        path = ckpt_mod.save_checkpoint(
            self.ckpt_root, s.step, rank=self.dist.rank, world_size=self.dist.world, rank_state=rank_state,
            shared=shared if self.rank0 else None, model={"model": model_sd} if self.rank0 else None,
            config=self.cfg.to_dict() if self.rank0 else None, keep_last=self.cfg.train.keep_last,
            barrier=self.dist.barrier)
        s.last_checkpoint = path
        self.log.note(f"checkpoint {path}")
        return path

    def _maybe_resume(self) -> None:
        resume = self.cfg.train.resume
        if resume == "never":
            return
        path = ckpt_mod.latest_checkpoint(self.ckpt_root) if resume == "auto" else ckpt_mod.resolve_checkpoint(resume)
        if path is None:
            if resume != "auto":
                raise ConfigError(f"train.resume: {resume!r} holds no complete checkpoint")
            return
        ck = ckpt_mod.load_checkpoint(path, self.dist.rank, self.dist.world)
        model_sd = ck["model"]
        self.trunk.load_state_dict({k: v for k, v in model_sd.items() if not k.startswith("fc.")})
        self.head.load_state_dict({k[3:]: v for k, v in model_sd.items() if k.startswith("fc.")})
        self.optimizer.load_state_dict(ckpt_mod.merge_optimizer_state(ck["shared"]["optimizer"],
                                                                      ck["rank"]["optimizer"]))
        self.scheduler.load_state_dict(ck["shared"]["scheduler"])
        self.scaler.load_state_dict(ck["shared"]["scaler"])
        self.loader.load_state_dict(ck["rank"]["data"])
        for k, v in ck["shared"]["state"].items():
            setattr(self.state, k, v)
        self.state.last_checkpoint = path
        ckpt_mod.set_rng_state(ck["rank"]["rng"], self.device)  # last: nothing after it draws
        if self.rank0:
            print(f"engine train: resumed from {path} (step {self.state.step})", flush=True)

    def finish(self, status: str) -> dict:
        summary = self.log.finish(self, status)
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
            self.log.close()
        finally:
            close = getattr(self.loader, "close", None)
            if close is not None:
                close()
            # The head holds its group; a group referred to after destruction keeps its threads.
            self.head = self.model = self.ddp = self.optimizer = None
            self.dist.close(orderly)


# =========================================================================== set-up helpers


def preflight(cfg: Config, world: int) -> None:
    """Every check that can fail before the process group, the model or the data exist."""
    validate(cfg, world)
    t = cfg.train
    if t.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: 'cuda' asked for, but torch sees no CUDA device (use auto or cpu)")
    on_gpu = t.device != "cpu" and torch.cuda.is_available()
    if t.dist_backend == "nccl" and not on_gpu:
        raise ConfigError("train.dist_backend: nccl needs GPUs; use gloo (or auto) on CPUs")
    if cfg.model.sync_bn and world > 1 and not on_gpu:
        raise ConfigError("model.sync_bn: torch's SyncBatchNorm runs on GPUs only; on CPUs keep per-rank BN "
                          "(model.sync_bn=false, the paper's setting)")
    if cfg.model.cuda_graphs and not on_gpu:
        raise ConfigError("model.cuda_graphs: CUDA graphs need a GPU")
    if cfg.optim.name.startswith("apex_"):
        try:
            import apex.optimizers  # noqa: F401
        except ImportError as e:
            alternative = ("optim.name=sgd (torch's fused SGD with optim.fused=true is the same update)"
                           if cfg.optim.name == "apex_sgd" else
                           "optim.name=sgd (torch has no LAMB), or install apex with its CUDA extensions")
            raise ConfigError(f"optim.name: {cfg.optim.name} needs NVIDIA apex, which does not import here ({e}); "
                              f"use {alternative}") from None
    if not cfg.data.synthetic:
        with open(os.path.join(cfg.data.dataset, "dataset.json"), encoding="utf-8") as f:
            meta = json.load(f)
        n, v = int(meta["num_samples"]), int(meta["vocab_size"])
        if cfg.head.vocab_size and cfg.head.vocab_size != v:
            raise ConfigError(f"head.vocab_size: {cfg.head.vocab_size} does not match the dataset's vocabulary "
                              f"({v} hashtags in {cfg.data.dataset}); set 0 to take the dataset's")
        if v < world:
            raise ConfigError(f"data.dataset: its vocabulary ({v} hashtags) is smaller than the world size ({world}); "
                              "the vocabulary-parallel head needs a class per rank")
        micro, _ = accumulation(cfg, world)
        length = cfg.data.samples_per_epoch or n
        if length // world < micro:
            raise ConfigError(f"train.batch_size: an epoch of {length} samples over {world} ranks is less than one "
                              f"micro-batch of {micro} per rank; raise data.samples_per_epoch or lower the batch")
    parent = os.path.dirname(os.path.abspath(t.out_dir))
    if os.path.exists(t.out_dir) and not os.path.isdir(t.out_dir):
        raise ConfigError(f"train.out_dir: {t.out_dir!r} exists and is not a directory")
    if not os.path.exists(t.out_dir) and os.path.isdir(parent) and not os.access(parent, os.W_OK):
        raise ConfigError(f"train.out_dir: cannot create {t.out_dir!r} ({parent} is not writable)")


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str = "none"
    group: object = None  # the trunk's data-parallel group (None: the default group)
    head_group: object = None  # the head's vocabulary-parallel group: the same ranks, its own communicator
    owned: bool = False  # this module initialised the default group (and destroys it)
    collective_device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier(group=self.group)

    def close(self, orderly: bool = True) -> None:
        """Destroys the head's group, and the default group when this module created it."""
        head_group, self.head_group = self.head_group, None
        if self.owned:
            shutdown(head_group, orderly=orderly)
        elif head_group is not None:
            if orderly:
                dist.barrier(group=head_group)
            dist.destroy_process_group(head_group)


def init_distributed(cfg: Config) -> DistInfo:
    """Uses an initialised default group (tests, notebooks), else the torchrun environment
    (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT from its rendezvous), else one process."""
    env_world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    on_gpu = cfg.train.device != "cpu" and torch.cuda.is_available()
    owned = False
    if not dist.is_initialized() and env_world > 1:
        backend = cfg.train.dist_backend if cfg.train.dist_backend != "auto" else ("nccl" if on_gpu else "gloo")
        kwargs = {}
        if on_gpu:
            torch.cuda.set_device(local_rank)
            if backend == "nccl":
                kwargs["device_id"] = torch.device("cuda", local_rank)
        timeout = datetime.timedelta(seconds=cfg.train.dist_timeout_s)
        store = _elastic_store(env_world, timeout)
        if store is not None:
            kwargs.update(store=store, rank=int(os.environ["RANK"]), world_size=env_world)
        dist.init_process_group(backend, timeout=timeout, **kwargs)
        owned = True
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return DistInfo(local_rank=local_rank, owned=owned, backend="none")
    backend = dist.get_backend()
    info = DistInfo(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local_rank, backend=backend,
                    owned=owned)
    info.head_group = dist.new_group(backend=backend)
    if on_gpu and "nccl" in backend:
        torch.cuda.set_device(local_rank)
        info.collective_device = torch.device("cuda", local_rank)
    return info


def _elastic_store(world: int, timeout: datetime.timedelta):
    """Under torchrun, the agent's store with a prefix per restart attempt. torch 2.14 reuses
    the agent's store across elastic restarts without one, so a restarted rank could read
    the dead previous worker's gloo address and fail to connect (seen on CPU with gloo)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or "MASTER_ADDR" not in os.environ:
        return None
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                          timeout=timeout)
    return dist.PrefixStore(f"/engine/attempt_{attempt}", store)


def pick_device(cfg: Config, d: DistInfo) -> tuple[torch.device, torch.dtype]:
    on_gpu = cfg.train.device != "cpu" and torch.cuda.is_available()
    device = torch.device("cuda", d.local_rank) if on_gpu else torch.device("cpu")
    if on_gpu:
        torch.cuda.set_device(device)
    precision = cfg.train.precision
    if precision == "auto":
        precision = "bf16" if on_gpu else "fp32"
    return device, {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


def vocab_size(cfg: Config, world: int) -> int:
    if cfg.data.synthetic:
        return cfg.head.vocab_size or cfg.data.synthetic_vocab
    with open(os.path.join(cfg.data.dataset, "dataset.json"), encoding="utf-8") as f:
        return int(json.load(f)["vocab_size"])


def build_trunk(cfg: Config, fused: Optional[Union[bool, str]] = None) -> nn.Module:
    """The trunk alone (num_classes=0: forward returns pooled features); `fused` overrides
    model.fused (False: plain blocks)."""
    from engine.models.resnext import create_model, resnext

    m = cfg.model
    fused = m.fused if fused is None else fused
    fused = False if fused == "none" else fused
    if m.name == "custom":
        return resnext(list(m.layers), m.groups, m.width_per_group, fused=fused, num_classes=0,
                       zero_init_residual=m.zero_init_residual)
    return create_model(m.name, fused=fused, num_classes=0, zero_init_residual=m.zero_init_residual)


def load_init_weights(trunk: nn.Module, path: str) -> None:
    sd, _ = ckpt_mod.load_weights(path)
    sd = {k: v for k, v in sd.items() if not k.startswith("fc.")}
    missing, unexpected = trunk.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ConfigError(f"model.init: {path} does not fit model.name (missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]})")


def build_head(cfg: Config, in_features: int, vocab: int, d: DistInfo, device: torch.device) -> nn.Module:
    """The vocabulary-parallel HashtagHead, initialised like one unsharded nn.Linear from
    the run's seed (the same whatever the world size)."""
    from engine.heads import HashtagHead

    h = cfg.head
    head = HashtagHead(in_features, vocab, process_group=d.head_group if d.world > 1 else None,
                       sample_fraction=h.sample_fraction, label_smoothing=h.label_smoothing, z_loss=h.z_loss,
                       backend=h.backend or None, device=device)
    bound = 1.0 / math.sqrt(in_features)
    chunk = 4096
    with torch.no_grad():
        for c in range(head.vocab_start // chunk, (head.vocab_stop + chunk - 1) // chunk):
            lo, hi = c * chunk, min(vocab, (c + 1) * chunk)
            a, b = max(lo, head.vocab_start), min(hi, head.vocab_stop)
            if a >= b:
                continue
            g = torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + c)
            w = torch.empty(hi - lo, in_features).uniform_(-bound, bound, generator=g)
            bias = torch.empty(hi - lo).uniform_(-bound, bound, generator=g)
            head.weight[a - head.vocab_start:b - head.vocab_start].copy_(w[a - lo:b - lo])
            if head.bias is not None:
                head.bias[a - head.vocab_start:b - head.vocab_start].copy_(bias[a - lo:b - lo])
    return head


def build_optimizer(cfg: Config, trunk: nn.Module, head: nn.Module):
    """(optimizer, indices of the head's params in its state dict). lr = peak_lr (the
    scheduler scales it); weight decay optionally off for BN parameters and biases."""
    o = cfg.optim
    groups, index, head_ids = [], 0, set()
    for owner, module in (("trunk", trunk), ("head", head)):
        decay, no_decay = [], []
        for p in module.parameters():
            if p.requires_grad:
                (no_decay if o.no_decay_bn_bias and p.ndim <= 1 else decay).append(p)
        for params, wd in ((decay, o.weight_decay), (no_decay, 0.0)):
            if params:
                groups.append({"params": params, "weight_decay": wd, "name": f"{owner}"})
                if owner == "head":
                    head_ids.update(range(index, index + len(params)))
                index += len(params)
    lr = peak_lr(cfg)
    if o.name == "sgd":
        fused = o.fused and all(p.device.type in ("cuda", "cpu") for g in groups for p in g["params"])
        return torch.optim.SGD(groups, lr=lr, momentum=o.momentum, nesterov=o.nesterov,
                               weight_decay=o.weight_decay, fused=fused or None), head_ids
    from apex.optimizers import FusedLAMB, FusedSGD

    if o.name == "apex_sgd":
        return FusedSGD(groups, lr=lr, momentum=o.momentum, nesterov=o.nesterov, weight_decay=o.weight_decay), head_ids
    return FusedLAMB(groups, lr=lr, betas=tuple(o.lamb_betas), weight_decay=o.weight_decay), head_ids


def peak_lr(cfg: Config) -> float:
    return cfg.optim.base_lr * cfg.train.batch_size / cfg.optim.reference_batch


def lr_lambda(cfg: Config):
    """Multiplier of the peak lr at optimizer step s (0-based): linear warm-up from
    warmup_start, then step decay (milestones, or num_decays equally spaced), cosine, or constant."""
    o, total = cfg.optim, cfg.train.steps
    w = o.warmup_steps
    milestones = list(o.milestones) or [w + round((total - w) * i / (o.num_decays + 1))
                                        for i in range(1, o.num_decays + 1)]

    def factor(step: int) -> float:
        if step < w:
            return o.warmup_start + (1.0 - o.warmup_start) * step / w
        if o.schedule == "constant":
            return 1.0
        if o.schedule == "cosine":
            p = min(1.0, (step - w) / max(1, total - w))
            return o.min_lr_factor + (1.0 - o.min_lr_factor) * 0.5 * (1.0 + math.cos(math.pi * p))
        return o.decay_factor ** bisect.bisect_right(milestones, step)

    return factor


def wrap_trunk(cfg: Config, trunk: nn.Module, d: DistInfo, device: torch.device, micro: int,
               amp_dtype: torch.dtype):
    """(the callable that maps images to features, the DDP module or None): SyncBN, CUDA
    graphs, DDP with the summing hook, torch.compile, in that order."""
    m = cfg.model
    if m.sync_bn and d.world > 1:
        trunk = nn.SyncBatchNorm.convert_sync_batchnorm(trunk, process_group=d.group)
    trunk.train()
    if device.type == "cuda" and (m.compile or m.cuda_graphs):
        from engine.models import autotune_fused_blocks

        fmt = torch.channels_last if m.channels_last else torch.contiguous_format
        sample = torch.randn(micro, 3, cfg.data.image_size, cfg.data.image_size, device=device, dtype=amp_dtype,
                             generator=torch.Generator(device).manual_seed(0)).contiguous(memory_format=fmt)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype != torch.float32, cache_enabled=False):
            # Fused blocks choose their grouped 3x3 by timing, which neither tracing nor capture can do.
            autotune_fused_blocks(trunk, sample)
            if m.cuda_graphs:
                trunk = torch.cuda.make_graphed_callables(trunk, (sample,))
    ddp = None
    model = trunk
    if d.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        import inspect

        # Per-rank BN statistics (the paper): no buffer broadcast before each forward.
        no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in
                          inspect.signature(DDP.__init__).parameters else {"broadcast_buffers": False})
        ddp = DDP(trunk, device_ids=[device.index] if device.type == "cuda" else None,
                  bucket_cap_mb=cfg.train.bucket_cap_mb, process_group=d.group, **no_buffer_sync)
        ddp.register_comm_hook(SumHookState(d.group, cfg.train.grad_reduce_dtype), sum_allreduce_hook)
        model = ddp
    if m.compile:
        model = torch.compile(model, mode=None if m.compile_mode == "default" else m.compile_mode)
    return model, ddp


@dataclass
class SumHookState:
    group: object
    dtype: str = "fp32"


def sum_allreduce_hook(state: SumHookState, bucket):
    """DDP communication hook: all-reduce SUM (no division by the world size), optionally
    in bf16 on the wire. The vocabulary-parallel head already gives each rank's features
    the gradient of the global mean, so the sum is the trunk's true gradient."""
    buf = bucket.buffer()
    wire = buf.to(torch.bfloat16) if state.dtype == "bf16" and buf.dtype != torch.bfloat16 else buf
    fut = dist.all_reduce(wire, op=dist.ReduceOp.SUM, group=state.group, async_op=True).get_future()

    def done(f):
        out = f.value()[0]
        if out is not buf:
            buf.copy_(out)
        return buf

    return fut.then(done)


class SyntheticBatches:
    """One fixed random batch, already on the device, handed out again and again: the same
    step as training on real data, without the input pipeline (benchmarks)."""

    def __init__(self, cfg: Config, d: DistInfo, device: torch.device, micro: int, dtype: torch.dtype, vocab: int):
        g = torch.Generator().manual_seed(cfg.train.seed * 7919 + d.rank)
        s = cfg.data.image_size
        fmt = torch.channels_last if cfg.model.channels_last else torch.contiguous_format
        self.images = torch.randn(micro, 3, s, s, generator=g).to(device, dtype).contiguous(memory_format=fmt)
        k = max(1, cfg.data.max_tags or 3)
        tags = torch.randint(0, vocab, (micro, k), generator=g, dtype=torch.int32)
        keep = torch.rand(micro, k, generator=g) < 0.6
        keep[:, 0] = True
        self.tags = torch.where(keep, tags, -1).to(device)
        self.steps = 0

    def __iter__(self):
        while True:
            self.steps += 1
            yield {"images": self.images, "tags": self.tags}

    def state_dict(self) -> dict:
        return {"kind": "synthetic", "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.steps = int(state.get("steps", 0))


def build_loader(cfg: Config, d: DistInfo, device: torch.device, micro: int, amp_dtype: torch.dtype):
    if cfg.data.synthetic:
        return SyntheticBatches(cfg, d, device, micro, amp_dtype, vocab_size(cfg, d.world))
    from engine.data.loaders import make_train_loader

    dc = cfg.data
    # bf16 input on a GPU under bf16 autocast (the first conv reads half the bytes); fp32 otherwise.
    dtype = amp_dtype if device.type == "cuda" and amp_dtype != torch.float32 else torch.float32
    return make_train_loader(
        dc.dataset, micro, rank=d.rank, world_size=d.world, seed=cfg.train.seed, device=device, dtype=dtype,
        size=dc.image_size, resample=dc.resample, samples_per_epoch=dc.samples_per_epoch or None,
        backend=dc.backend, layout="NCHW", scale=(dc.scale_min, 1.0), max_tags=dc.max_tags or None,
        num_threads=dc.num_threads or None, num_workers=None if dc.num_workers < 0 else dc.num_workers,
        hw_decoder_load=dc.hw_decoder_load, prefetch=dc.prefetch)


def iter_forever(loader) -> Iterator[dict]:
    """Batches across epochs; the loader's state_dict() stays that of the last batch handed out."""
    while True:
        yield from loader


def oom_advice(cfg: Config, micro: int, accum: int, device: torch.device) -> str:
    mem = ""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        mem = (f" ({torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB peak allocated of "
               f"{total / 2**30:.1f} GiB)")
    hints = [f"lower train.micro_batch (now {micro} per rank; the global train.batch_size={cfg.train.batch_size} "
             f"is kept by gradient accumulation, now {accum} steps)"]
    if cfg.train.precision in ("fp32",) or (cfg.train.precision == "auto" and device.type == "cpu"):
        hints.append("train.precision=bf16")
    if not cfg.model.channels_last:
        hints.append("model.channels_last=true")
    if cfg.head.sample_fraction == 1.0:
        hints.append("head.sample_fraction<1 for a very large vocabulary")
    hints.append("or a smaller model.name / data.image_size")
    return f"out of memory in a training step{mem}: " + "; ".join(hints)


# =========================================================================== metrics


PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "GH200": 989.0, "B200": 2250.0, "A100": 312.0,
                    "A800": 312.0, "L40S": 362.0, "A10G": 70.0, "L4": 121.0}


def model_flops_per_image(cfg: Config, vocab: int) -> float:
    """Forward + backward FLOPs of one image: 3 x the forward (convolutions and the head's
    matmul), counted once on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        trunk = build_trunk(cfg, fused=False).eval()
        x = torch.empty(1, 3, cfg.data.image_size, cfg.data.image_size)
    with FlopCounterMode(display=False) as counter:
        trunk(x)
    return 3.0 * (counter.get_total_flops() + 2.0 * trunk.num_features * vocab)


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

    def __init__(self, cfg: Config, d: DistInfo, device: torch.device, flops_per_image: float, micro: int):
        self.cfg, self.d, self.device = cfg, d, device
        self.rank0 = d.rank == 0
        self.every = cfg.train.log_every
        self.flops = flops_per_image
        self.peak = None
        self.history: list[dict] = []
        self.notes: list[str] = []
        self.tb = None
        self._jsonl = None
        self._reset()

    def _reset(self):
        self.n = 0
        self.loss_sum = 0.0
        self.loss_n = 0
        self.data_s = 0.0
        self.step_s = 0.0
        self.t_start = time.perf_counter()

    def start(self, trainer: Trainer, step: int) -> None:
        self.peak = peak_flops(self.cfg, self.device, trainer.amp_dtype)
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
        r = trainer.resolved()
        print(f"engine train: {self.cfg.preset or 'custom config'} on {r['world_size']} rank(s), {r['device']}, "
              f"{self.cfg.model.name}, global batch {self.cfg.train.batch_size} = {r['micro_batch']} x "
              f"{r['world_size']} ranks x {r['accumulation']} accumulation, peak lr {r['peak_lr']:.4g}, "
              f"vocab {r['vocab_size']}, steps {step} -> {self.total}, out {self.cfg.train.out_dir}", flush=True)

    def step(self, step: int, loss: float, lr: float, data_s: float, step_s: float) -> None:
        self.n += 1
        if math.isfinite(loss):
            self.loss_sum += loss
            self.loss_n += 1
        self.data_s += data_s
        self.step_s += step_s
        self.lr = lr
        if step % self.every == 0 or step == self.total:
            self.flush(step)

    def flush(self, step: int) -> None:
        if self.n == 0:
            return
        wall = time.perf_counter() - self.t_start
        images = self.n * self.cfg.train.batch_size
        ips = images / wall
        rec = {"step": step, "loss": self.loss_sum / self.loss_n if self.loss_n else None, "lr": self.lr,
               "img_per_s": ips, "img_per_s_per_rank": ips / self.d.world,
               "data_wait": self.data_s / wall, "step_ms": 1e3 * self.step_s / self.n,
               "mfu": ips * self.flops / (self.d.world * self.peak) if self.peak else None,
               "mem_gib": self._memory(), "skipped": self.n - self.loss_n, "time": time.time()}
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
        self.notes.append(text)
        if self.rank0 and self.cfg.train.progress:
            print(f"engine train: {text}", flush=True)

    def finish(self, trainer: Trainer, status: str) -> dict:
        self.flush(trainer.state.step)
        losses = [h["loss"] for h in self.history if h["loss"] is not None]
        timed = self.history[1:] or self.history  # the first interval holds the warm-up
        s = trainer.state
        summary = {"status": status, "step": s.step, "steps": self.total, "images": s.images,
                   "skipped_steps": s.skipped, "first_loss": losses[0] if losses else None,
                   "final_loss": losses[-1] if losses else None,
                   "img_per_s": (sum(h["img_per_s"] for h in timed) / len(timed)) if timed else None,
                   "checkpoint": s.last_checkpoint, "out_dir": self.cfg.train.out_dir,
                   "wall_s": time.perf_counter() - self.t0, **trainer.resolved()}
        if self.rank0:
            print(f"engine train: {status} at step {s.step}/{self.total}; loss {summary['first_loss']} -> "
                  f"{summary['final_loss']}; {s.skipped} step(s) skipped; checkpoint {s.last_checkpoint}", flush=True)
        summary["history"] = self.history
        return summary

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None


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
            try:
                validate(cfg, int(os.environ.get("WORLD_SIZE", "1")))
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
