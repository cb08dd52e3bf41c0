"""What a training run is built from: checks before any work, the device, trunk (and its
FLOPs per image), head, optimiser, learning-rate schedule, the wrapped (DDP / compiled /
graphed) trunk and the input batches. `engine.train.Trainer` assembles them."""

from __future__ import annotations

import bisect
import inspect
import json
import math
import os
import sys
from typing import Iterator, Optional, Union

import torch
from torch import nn

from engine import checkpoint as ckpt_mod
from engine.architectures import ARCHITECTURES
from engine.config import Config, ConfigError, accumulation, validate
from engine.distributed import DistInfo, SumHookState, sum_allreduce_hook


def preflight(cfg: Config, world: int) -> int:
    """Every check that can fail before the process group, the model or the data exist;
    returns the run's vocabulary size (from the dataset's description, read here once)."""
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
    vocab = (cfg.head.vocab_size or cfg.data.synthetic_vocab) if cfg.data.synthetic else dataset_vocab(cfg, world)
    parent = os.path.dirname(os.path.abspath(t.out_dir))
    if os.path.exists(t.out_dir) and not os.path.isdir(t.out_dir):
        raise ConfigError(f"train.out_dir: {t.out_dir!r} exists and is not a directory")
    if not os.path.exists(t.out_dir) and os.path.isdir(parent) and not os.access(parent, os.W_OK):
        raise ConfigError(f"train.out_dir: cannot create {t.out_dir!r} ({parent} is not writable)")
    return vocab


def dataset_vocab(cfg: Config, world: int) -> int:
    """The dataset's vocabulary size, from its description (dataset.json; config.validate
    has found it), and the checks that need the description."""
    with open(os.path.join(cfg.data.dataset, "dataset.json"), encoding="utf-8") as f:
        meta = json.load(f)
    n, vocab = int(meta["num_samples"]), int(meta["vocab_size"])
    if cfg.head.vocab_size and cfg.head.vocab_size != vocab:
        raise ConfigError(f"head.vocab_size: {cfg.head.vocab_size} does not match the dataset's vocabulary "
                          f"({vocab} hashtags in {cfg.data.dataset}); set 0 to take the dataset's")
    if vocab < world:
        raise ConfigError(f"data.dataset: its vocabulary ({vocab} hashtags) is smaller than the world size ({world}); "
                          "the vocabulary-parallel head needs a class per rank")
    micro, _ = accumulation(cfg, world)
    length = cfg.data.samples_per_epoch or n
    if length // world < micro:
        raise ConfigError(f"train.batch_size: an epoch of {length} samples over {world} ranks is less than one "
                          f"micro-batch of {micro} per rank; raise data.samples_per_epoch or lower the batch")
    return vocab


def pick_device(cfg: Config, d: DistInfo) -> tuple[torch.device, torch.dtype]:
    on_gpu = cfg.train.device != "cpu" and torch.cuda.is_available()
    device = torch.device("cuda", d.local_rank) if on_gpu else torch.device("cpu")
    if on_gpu:
        torch.cuda.set_device(device)
    precision = cfg.train.precision
    if precision == "auto":
        precision = "bf16" if on_gpu else "fp32"
    return device, {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


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
                       backend=h.backend or None, static_batch=True, device=device)
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


def tag_width(loader) -> Optional[int]:
    """Tags per image in the loader's batches (their [micro, K] int32 tensor's K), or None
    when the loader does not say."""
    return getattr(loader, "tag_width", None) or getattr(getattr(loader, "source", None), "max_tags", None)


def wrap_trunk(cfg: Config, trunk: nn.Module, d: DistInfo, device: torch.device, micro: int,
               amp_dtype: torch.dtype, head: Optional[nn.Module] = None, tags_per_image: Optional[int] = None):
    """(the callable that maps images to features, the DDP module or None): cuDNN's benchmark
    mode, SyncBN, the fused kernels' checks and tuning (GPU), CUDA graphs, DDP with the summing hook, torch.compile,
    in that order. With `head` and the loader's `tags_per_image`, the head's kernels are
    checked in the same warm-up, at the step's shapes."""
    m = cfg.model
    # Before the fused blocks' tuning too: the grouped 3x3 is timed against cuDNN at its best.
    torch.backends.cudnn.benchmark = m.cudnn_benchmark
    if device.type == "cuda":
        trunk = fused_or_plain(cfg, trunk, device, micro, amp_dtype)
    if m.sync_bn and d.world > 1:
        trunk = nn.SyncBatchNorm.convert_sync_batchnorm(trunk, process_group=d.group)
    trunk.train()
    if device.type == "cuda":
        from engine.models import autotune_fused_blocks

        fmt = torch.channels_last if m.channels_last else torch.contiguous_format
        sample = torch.randn(micro, 3, cfg.data.image_size, cfg.data.image_size, device=device, dtype=amp_dtype,
                             generator=torch.Generator(device).manual_seed(0)).contiguous(memory_format=fmt)
        # A sampled head's vocabulary changes every step, and so does its key: nothing to check ahead.
        check_head = bool(head is not None and tags_per_image and getattr(head, "sample_fraction", 1.0) == 1.0)
        tags = torch.randint(0, head.num_classes, (micro, tags_per_image), dtype=torch.int32,
                             generator=torch.Generator().manual_seed(0)).to(device) if check_head else None
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype != torch.float32, cache_enabled=False):
            # Every fused kernel and the head's are checked against the reference (all shapes in one
            # child process) and the grouped 3x3 is timed before the first step: in eager mode this
            # saves a child process per shape, and neither tracing nor capture can check or time at all.
            autotune_fused_blocks(trunk, sample, head if check_head else None, tags)
            if m.cuda_graphs:
                trunk = torch.cuda.make_graphed_callables(trunk, (sample,))
    ddp = None
    model = trunk
    if d.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

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


def fused_or_plain(cfg: Config, trunk: nn.Module, device: torch.device, micro: int, amp_dtype: torch.dtype
                   ) -> nn.Module:
    """The trunk, or, when its fused blocks fail one whole training step against the plain
    model on this device (engine.models.warmup.whole_step_verdict, at the run's micro-batch
    and image size), a plain trunk holding its very parameters and buffers (the optimizer
    and checkpoints built over `trunk` carry on), with a message saying why."""
    from engine.models.warmup import fused_mode, share_state, whole_step_verdict

    mode = fused_mode(trunk)
    if mode is None:
        return trunk
    m = cfg.model
    groups, width = (m.groups, m.width_per_group) if m.name == "custom" else ARCHITECTURES[m.name][1:]
    verdict = whole_step_verdict(mode, groups, width, micro, cfg.data.image_size, device, amp_dtype,
                                 channels_last=m.channels_last)
    if verdict["status"] == "pass":
        return trunk
    print(f"[engine] the fused blocks (fused={mode}) failed one whole training step against the plain model on "
          f"{device} ({verdict['status']}: {verdict.get('detail', '')}); training with plain blocks instead "
          "(model.fused=none skips this check)", file=sys.stderr)
    return share_state(trunk, build_trunk(cfg, fused=False))


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
