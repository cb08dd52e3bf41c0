"""Transfer evaluation (`engine eval`): how good are the pretrained trunk's features on a
labelled ImageFolder-style set (<dir>/<class>/<image>)?

- `linear`: the trunk frozen (eval mode); its pooled features of the training images
  (centre crops) are standardised and a linear classifier is trained on them with SGD
  (momentum, cosine lr), then scored on the validation images.
- `finetune`: the whole network (trunk + a new linear layer) trained on the training
  images with random-resized crops and flips, then scored on the validation images.

Both report top-1 and top-5 accuracy (top-k with k capped at the number of classes).
A `TransferConfig` describes a run (the fields behind `engine eval`'s flags).
Weights: an engine checkpoint or run directory (its newest checkpoint), a torchvision /
WSL-Images / timm state dict file (torchvision ResNet keys; the architecture is inferred
from the shapes unless --model says), or "random" (a baseline; needs --model).

    engine eval linear --weights runs/tiny --train-dir probe/train --val-dir probe/val
    torchrun --nproc-per-node 8 -m engine.cli eval finetune --weights ig_32x8d.pth \\
        --train-dir imagenet/train --val-dir imagenet/val --epochs 30

Under torchrun, feature extraction and fine-tuning are split over the ranks (DDP for
fine-tuning); the linear classifier is trained on every rank alike on the gathered features.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from engine import checkpoint as ckpt_mod
from engine.architectures import ARCHITECTURES
from engine.config import ConfigError
from engine.distributed import shutdown


# --------------------------------------------------------------------------- configuration


@dataclass
class TransferConfig:
    """`engine eval`: a linear probe on frozen trunk features, or fine-tuning the whole network."""

    mode: str = "linear"  # linear | finetune
    weights: str = ""  # engine checkpoint, run dir, torchvision/WSL state dict file, or "random"
    model: str = ""  # architecture when the weights do not say (state dict files: inferred from shapes)
    train_dir: str = ""  # ImageFolder: <dir>/<class>/<image>
    val_dir: str = ""
    out: str = ""  # write the result here as JSON
    image_size: int = 224
    batch_size: int = 256  # per rank
    epochs: int = 0  # 0: 100 for linear, 10 for finetune
    lr: float = 0.0  # 0: 0.1 x batch/256 (linear), 0.01 x batch/256 (finetune)
    weight_decay: float = 0.0  # linear default 0; finetune 1e-4 when 0 is not forced
    momentum: float = 0.9
    backend: str = "auto"  # data loader backend
    num_workers: int = -1
    num_threads: int = 0
    device: str = "auto"
    precision: str = "auto"
    channels_last: bool = True
    seed: int = 0
    progress: bool = True


def validate_transfer(cfg: TransferConfig) -> None:
    """Raises ConfigError naming the field."""
    if cfg.mode not in ("linear", "finetune"):
        raise ConfigError(f"mode: {cfg.mode!r} is not 'linear' or 'finetune'")
    if not cfg.weights:
        raise ConfigError("weights: no weights given: an engine checkpoint or run directory, a state dict file, "
                          "or 'random'")
    if cfg.weights != "random" and not os.path.exists(cfg.weights):
        raise ConfigError(f"weights: {cfg.weights!r} does not exist")
    for key in ("train_dir", "val_dir"):
        path = getattr(cfg, key)
        if not path:
            raise ConfigError(f"{key}: no ImageFolder directory given")
        if not os.path.isdir(path):
            raise ConfigError(f"{key}: {path!r} does not exist or is not a directory")
    if cfg.model and cfg.model not in ARCHITECTURES:
        raise ConfigError(f"model: unknown model {cfg.model!r} (known: {', '.join(ARCHITECTURES)})")
    if cfg.batch_size < 2:
        raise ConfigError(f"batch_size: must be at least 2, got {cfg.batch_size}")
    if cfg.epochs < 0:
        raise ConfigError(f"epochs: must be >= 0, got {cfg.epochs}")
    if cfg.lr < 0:
        raise ConfigError(f"lr: must be >= 0, got {cfg.lr}")
    if cfg.backend not in ("auto", "dali", "torch"):
        raise ConfigError(f"backend: {cfg.backend!r} is not auto, dali or torch")
    if cfg.device not in ("auto", "cuda", "cpu"):
        raise ConfigError(f"device: {cfg.device!r} is not auto, cuda or cpu")
    if cfg.precision not in ("auto", "bf16", "fp16", "fp32"):
        raise ConfigError(f"precision: {cfg.precision!r} is not auto, bf16, fp16 or fp32")


# --------------------------------------------------------------------------- weights


def load_trunk(weights: str, model: str = "", fused: bool = False) -> tuple[nn.Module, dict]:
    """(the trunk, num_classes=0, with the weights loaded; a description of where from)."""
    from engine.models.resnext import create_model, resnext

    if weights == "random":
        if not model:
            raise ConfigError("model: random weights need --model to name the architecture")
        torch.manual_seed(0)
        return create_model(model, fused=fused, num_classes=0), {"weights": "random", "arch": model}
    sd, model_cfg = ckpt_mod.load_weights(weights)
    trunk_sd = {k: v for k, v in sd.items() if not k.startswith("fc.")}
    if model:
        trunk, arch = create_model(model, fused=fused, num_classes=0), model
    elif model_cfg is not None and model_cfg.get("name") in ARCHITECTURES:
        trunk, arch = create_model(model_cfg["name"], fused=fused, num_classes=0), model_cfg["name"]
    else:
        a = ckpt_mod.infer_architecture(trunk_sd)
        trunk = resnext(a["layers"], a["groups"], a["width_per_group"], fused=fused, num_classes=0)
        arch = f"resnext(layers={a['layers']}, groups={a['groups']}, width_per_group={a['width_per_group']})"
    missing, unexpected = trunk.load_state_dict(trunk_sd, strict=False)
    if missing or unexpected:
        raise ConfigError(f"weights: {weights} does not fit {arch} "
                          f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    return trunk, {"weights": weights, "arch": arch}


# --------------------------------------------------------------------------- helpers


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict:
    """{k: number of rows whose label is among the k highest logits}, k capped at the classes."""
    out = {}
    maxk = min(max(ks), logits.shape[1])
    pred = logits.topk(maxk, dim=1).indices
    hit = pred == labels[:, None]
    for k in ks:
        out[k] = int(hit[:, :min(k, logits.shape[1])].any(1).sum())
    return out


def _dist_info():
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
        return dist.get_rank(), world, True
    return 0, 1, False


def _device(cfg: TransferConfig) -> tuple[torch.device, torch.dtype]:
    on_gpu = cfg.device != "cpu" and torch.cuda.is_available()
    if cfg.device == "cuda" and not on_gpu:
        raise ConfigError("device: 'cuda' asked for, but torch sees no CUDA device")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if on_gpu else torch.device("cpu")
    precision = cfg.precision if cfg.precision != "auto" else ("bf16" if on_gpu else "fp32")
    return device, {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


def _loader(cfg: TransferConfig, root: str, train: bool, rank: int, world: int, device, amp):
    from engine.data.loaders import make_imagefolder_loader

    dtype = amp if device.type == "cuda" and amp != torch.float32 else torch.float32
    return make_imagefolder_loader(root, cfg.batch_size, train=train, rank=rank, world_size=world, seed=cfg.seed,
                                   device=device, dtype=dtype, size=cfg.image_size, backend=cfg.backend,
                                   layout="NCHW", num_workers=None if cfg.num_workers < 0 else cfg.num_workers,
                                   num_threads=cfg.num_threads or None)


def _images(batch, channels_last: bool) -> torch.Tensor:
    x = batch["images"]
    return x if channels_last else x.contiguous()


def _gather(t: torch.Tensor, world: int) -> torch.Tensor:
    """Concatenate every rank's rows (rank order), sizes may differ."""
    if world == 1:
        return t
    device = t.device if dist.get_backend() != "gloo" else torch.device("cpu")
    n = torch.tensor([t.shape[0]], device=device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    pad = torch.zeros((max(sizes),) + t.shape[1:], dtype=t.dtype, device=device)
    pad[:t.shape[0]] = t.to(device)
    parts = [torch.empty_like(pad) for _ in range(world)]
    dist.all_gather(parts, pad)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)]).to(t.device)


@torch.no_grad()
def extract_features(trunk: nn.Module, loader, device, amp, channels_last: bool, world: int):
    """(features [N, D] fp32, labels [N]) of every image, in dataset order, on `device`."""
    trunk.eval()
    feats, labels = [], []
    for batch in loader:
        with torch.autocast(device.type, dtype=amp, enabled=amp != torch.float32):
            f = trunk(_images(batch, channels_last))
        feats.append(f.float())
        labels.append(batch["labels"].to(device))
    return _gather(torch.cat(feats), world), _gather(torch.cat(labels), world)


def train_linear(x: torch.Tensor, y: torch.Tensor, num_classes: int, *, epochs: int, lr: float, weight_decay: float,
                 momentum: float, batch_size: int, seed: int) -> nn.Linear:
    """A linear classifier on (standardised) features: SGD + momentum, cosine lr."""
    g = torch.Generator().manual_seed(seed)
    clf = nn.Linear(x.shape[1], num_classes).to(x.device)
    nn.init.zeros_(clf.weight)
    nn.init.zeros_(clf.bias)
    opt = torch.optim.SGD(clf.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    n = x.shape[0]
    bs = min(batch_size, n)
    steps_per_epoch = max(1, n // bs)
    total = epochs * steps_per_epoch
    step = 0
    for _ in range(epochs):
        order = torch.randperm(n, generator=g).to(x.device)
        for s in range(steps_per_epoch):
            idx = order[s * bs:(s + 1) * bs]
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
            loss = F.cross_entropy(clf(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    return clf


# --------------------------------------------------------------------------- the two protocols


def evaluate(cfg: TransferConfig) -> dict:
    """Runs `cfg.mode` and returns {"top1", "top5", ...} (percent)."""
    validate_transfer(cfg)
    rank, world, owned = _dist_info()
    try:
        result = _evaluate(cfg, rank, world)
    except BaseException:
        if owned:
            shutdown(orderly=False)
        raise
    if owned:
        shutdown()
    return result


def _evaluate(cfg: TransferConfig, rank: int, world: int) -> dict:
    t0 = time.perf_counter()
    device, amp = _device(cfg)
    say = print if (rank == 0 and cfg.progress) else (lambda *a, **k: None)
    trunk, where = load_trunk(cfg.weights, cfg.model, fused=device.type == "cuda")
    trunk.to(device)
    if cfg.channels_last:
        trunk.to(memory_format=torch.channels_last)
    val = _loader(cfg, cfg.val_dir, False, rank, world, device, amp)
    classes = val.classes
    say(f"engine eval {cfg.mode}: {where['arch']} from {where['weights']}; {len(classes)} classes; "
        f"{device}, {world} rank(s)", flush=True)
    if cfg.mode == "linear":
        train = _loader(cfg, cfg.train_dir, False, rank, world, device, amp)
        if train.classes != classes:
            raise ConfigError(f"train_dir: its classes differ from val_dir's ({train.classes[:5]} vs {classes[:5]})")
        xtr, ytr = extract_features(trunk, train, device, amp, cfg.channels_last, world)
        xva, yva = extract_features(trunk, val, device, amp, cfg.channels_last, world)
        say(f"  features: train {tuple(xtr.shape)}, val {tuple(xva.shape)} ({time.perf_counter() - t0:.1f}s)",
            flush=True)
        mean, std = xtr.mean(0), xtr.std(0).clamp_min(1e-6)
        epochs = cfg.epochs or 100
        lr = cfg.lr or 0.1 * min(cfg.batch_size, xtr.shape[0]) / 256
        clf = train_linear((xtr - mean) / std, ytr, len(classes), epochs=epochs, lr=lr,
                           weight_decay=cfg.weight_decay, momentum=cfg.momentum, batch_size=cfg.batch_size,
                           seed=cfg.seed)
        with torch.no_grad():
            hits = topk_correct(clf((xva - mean) / std), yva)
            train_hits = topk_correct(clf((xtr - mean) / std), ytr)
        n_val, n_train = int(yva.numel()), int(ytr.numel())
        extra = {"train_top1": 100.0 * train_hits[1] / n_train}
    else:
        train = _loader(cfg, cfg.train_dir, True, rank, world, device, amp)
        if train.classes != classes:
            raise ConfigError(f"train_dir: its classes differ from val_dir's ({train.classes[:5]} vs {classes[:5]})")
        epochs = cfg.epochs or 10
        lr = cfg.lr or 0.01 * cfg.batch_size * world / 256
        model, n_train = _finetune(cfg, trunk, train, len(classes), device, amp, world, epochs, lr, say)
        hits, n_val = _score(model, val, device, amp, cfg.channels_last, world)
        extra = {}
    result = {"mode": cfg.mode, **where, "num_classes": len(classes), "train_images": n_train, "val_images": n_val,
              "epochs": epochs, "lr": lr, "top1": 100.0 * hits[1] / n_val, "top5": 100.0 * hits[5] / n_val,
              "top5_k": min(5, len(classes)), "chance_top1": 100.0 / len(classes), **extra,
              "seconds": time.perf_counter() - t0}
    say(f"engine eval {cfg.mode}: top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  "
        f"(chance {result['chance_top1']:.1f}%; {n_val} val images, {result['seconds']:.1f}s)", flush=True)
    if cfg.out and rank == 0:
        os.makedirs(os.path.dirname(os.path.abspath(cfg.out)), exist_ok=True)
        with open(cfg.out + ".tmp", "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
        os.replace(cfg.out + ".tmp", cfg.out)
    for loader in (train, val):
        loader.close()
    return result


class _Classifier(nn.Module):
    def __init__(self, trunk: nn.Module, num_classes: int):
        super().__init__()
        self.trunk = trunk
        self.fc = nn.Linear(trunk.num_features, num_classes)
        nn.init.normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x):
        return self.fc(self.trunk(x))


def _finetune(cfg, trunk, loader, num_classes, device, amp, world, epochs, lr, say):
    model = _Classifier(trunk, num_classes).to(device)
    params = [{"params": [p for p in model.parameters() if p.ndim > 1], "weight_decay": cfg.weight_decay or 1e-4},
              {"params": [p for p in model.parameters() if p.ndim <= 1], "weight_decay": 0.0}]
    opt = torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
    net = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    total = epochs * len(loader)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    step, n_train = 0, 0
    model.train()
    for epoch in range(epochs):
        seen, loss_sum = 0, 0.0
        for batch in loader:
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
            with torch.autocast(device.type, dtype=amp, enabled=amp != torch.float32):
                loss = F.cross_entropy(net(_images(batch, cfg.channels_last)), batch["labels"].to(device))
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            step += 1
            seen += batch["labels"].numel()
            loss_sum += float(loss.detach()) * batch["labels"].numel()
        n_train = seen * world
        say(f"  epoch {epoch + 1}/{epochs}: loss {loss_sum / max(seen, 1):.4f}", flush=True)
    return model, n_train


@torch.no_grad()
def _score(model, loader, device, amp, channels_last, world):
    model.eval()
    hits = {1: 0, 5: 0}
    n = 0
    for batch in loader:
        with torch.autocast(device.type, dtype=amp, enabled=amp != torch.float32):
            logits = model(_images(batch, channels_last)).float()
        h = topk_correct(logits, batch["labels"].to(device))
        hits = {k: hits[k] + h[k] for k in hits}
        n += batch["labels"].numel()
    if world > 1:
        t = torch.tensor([hits[1], hits[5], n], dtype=torch.float64,
                         device=device if dist.get_backend() != "gloo" else "cpu")
        dist.all_reduce(t)
        hits, n = {1: int(t[0]), 5: int(t[1])}, int(t[2])
    return hits, n


# --------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("mode", choices=("linear", "finetune"))
    parser.add_argument("--weights", required=True,
                        help="engine checkpoint or run dir, torchvision/WSL state dict file, or 'random'")
    parser.add_argument("--model", default="", help="architecture (needed for 'random'; else inferred)")
    parser.add_argument("--train-dir", required=True, help="ImageFolder training set: <dir>/<class>/<image>")
    parser.add_argument("--val-dir", required=True, help="ImageFolder validation set")
    parser.add_argument("--out", default="", help="write the result as JSON here")
    d = TransferConfig()
    parser.add_argument("--image-size", type=int, default=d.image_size)
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help="per rank")
    parser.add_argument("--epochs", type=int, default=0, help="0: 100 (linear), 10 (finetune)")
    parser.add_argument("--lr", type=float, default=0.0,
                        help="0: 0.1 x batch/256 (linear), 0.01 x batch/256 (finetune)")
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--backend", default="auto", choices=("auto", "dali", "torch"))
    parser.add_argument("--num-workers", type=int, default=-1)
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    parser.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp16", "fp32"))
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    cfg = TransferConfig(mode=args.mode, weights=args.weights, model=args.model, train_dir=args.train_dir,
                         val_dir=args.val_dir, out=args.out, image_size=args.image_size, batch_size=args.batch_size,
                         epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay, backend=args.backend,
                         num_workers=args.num_workers, device=args.device, precision=args.precision, seed=args.seed)
    try:
        evaluate(cfg)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"engine eval: error: {e}", file=sys.stderr)
        return 2
    return 0
