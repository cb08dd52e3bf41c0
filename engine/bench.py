"""Training-step throughput of a ResNeXt on synthetic input (`engine bench`).

One step = forward, cross-entropy, backward, SGD update, on a batch already on the
device. Variants: our model with plain PyTorch blocks ("plain"), with bn_act blocks
("fused"), or with batch norms fused into the 1x1 convolutions ("conv"), and
torchvision's same model as the peer, each optionally under torch.compile ("-compile").
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from engine.models import ARCHITECTURES, autotune_fused_blocks, create_model

# Our model's block modes (engine.models.resnext `fused=`), then torchvision's model as the peer.
MODES = {"plain": False, "fused": "bn_act", "conv": "conv"}
VARIANTS = tuple(m + c for m in (*MODES, "torchvision") for c in ("", "-compile"))
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class StepResult:
    variant: str
    model: str
    batch_size: int
    image_size: int
    dtype: str
    channels_last: bool
    steps: int
    step_ms: float
    images_per_s: float
    peak_memory_gb: Optional[float]
    # How the row was measured: every peer at its best setting, and proof a compiled variant ran compiled.
    warmup: int = 0
    cudnn_benchmark: bool = False
    compile: Optional[str] = None
    dynamic: Optional[bool] = None
    frames_compiled: Optional[int] = None
    graph_breaks: Optional[int] = None
    peer: str = ""


class NotCompiledError(RuntimeError):
    """A compiled variant ran (partly) eagerly: its timing would be mislabelled."""


def compile_fresh(fn, backend: str):
    """torch.compile(fn) with static shapes after torch._dynamo.reset(): no earlier
    variant's graphs, guards or recompile count carry over (dynamo caches by code object,
    so closures of one function share a cache and, past its recompile limit, run eagerly).
    Call `compiled_frames` after running it to prove it ran compiled."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    return torch.compile(fn, backend=backend, dynamic=False)


def compiled_frames(expect_no_breaks: bool = True) -> dict:
    """Dynamo's counts since the last `compile_fresh`: frames compiled, graphs, graph breaks.
    Raises NotCompiledError when nothing was compiled (or, by default, when a graph broke)."""
    from torch._dynamo.utils import counters

    stats = {"frames_compiled": int(counters["frames"]["ok"]), "graphs": int(counters["stats"]["unique_graphs"]),
             "graph_breaks": int(sum(counters["graph_break"].values()))}
    if stats["graphs"] < 1:
        raise NotCompiledError(f"torch.compile produced no graph: the 'compiled' variant ran eagerly ({stats})")
    if expect_no_breaks and stats["graph_breaks"]:
        raise NotCompiledError(f"torch.compile broke the graph {stats['graph_breaks']} time(s): "
                               f"{sorted(counters['graph_break'])[:1]}")
    return stats


def build(variant: str, name: str, num_classes: int) -> tuple[torch.nn.Module, str]:
    """The model and what it is. torchvision has no constructor for some of the family
    (32x16d, 32x48d): its ResNet class built at the same depth, cardinality and width is
    then the peer, and labelled so."""
    if variant.startswith("torchvision"):
        import torchvision
        if hasattr(torchvision.models, name):
            return getattr(torchvision.models, name)(num_classes=num_classes), f"torchvision.models.{name}"
        layers, groups, width = ARCHITECTURES[name]
        model = torchvision.models.resnet.ResNet(torchvision.models.resnet.Bottleneck, layers, groups=groups,
                                                 width_per_group=width, num_classes=num_classes)
        return model, f"torchvision ResNet(Bottleneck, {layers}, groups={groups}, width_per_group={width})"
    mode = MODES[variant.removesuffix("-compile")]
    return create_model(name, fused=mode, num_classes=num_classes), f"engine {name} fused={mode!r}"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(variant: str, name: str, *, batch_size: int, image_size: int, steps: int, warmup: int,
            device: torch.device, dtype: str = "bf16", channels_last: bool = True,
            num_classes: int = 1000, compile_backend: str = "inductor", cudnn_benchmark: bool = True) -> StepResult:
    """One variant's training step; a "-compile" variant is compiled fresh with static
    shapes and raises NotCompiledError unless dynamo compiled it without graph breaks.
    cuDNN's benchmark mode (on by default, as users run it) is set for the process."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
    torch.backends.cudnn.benchmark = cudnn_benchmark
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model, peer = build(variant, name, num_classes)
    model = model.to(device=device, memory_format=fmt).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
    images = torch.randn(batch_size, 3, image_size, image_size, device=device).to(memory_format=fmt)
    labels = torch.randint(0, num_classes, (batch_size,), device=device)
    amp = DTYPES[dtype]

    def forward_loss():
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            return F.cross_entropy(model(images), labels)

    loss_fn = forward_loss
    if variant.endswith("compile"):
        if device.type == "cuda":
            # Fused blocks time their grouped 3x3 eagerly first: tracing cannot, and would keep cuDNN.
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                autotune_fused_blocks(model, images)
        loss_fn = compile_fresh(forward_loss, compile_backend)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss_fn().backward()
        optimizer.step()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(max(warmup, 1) if loss_fn is not forward_loss else warmup):
        step()
    compiled = compiled_frames() if loss_fn is not forward_loss else {}
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    elapsed = time.perf_counter() - start
    step_ms = elapsed / steps * 1e3
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return StepResult(variant, name, batch_size, image_size, dtype, channels_last, steps, step_ms,
                      batch_size / (step_ms / 1e3), peak, warmup=warmup,
                      cudnn_benchmark=bool(torch.backends.cudnn.benchmark),
                      compile=compile_backend if compiled else None, dynamic=False if compiled else None,
                      frames_compiled=compiled.get("frames_compiled"), graph_breaks=compiled.get("graph_breaks"),
                      peer=peer)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    gpu = torch.cuda.is_available()
    parser.add_argument("--model", default="resnext50_32x4d", choices=sorted(ARCHITECTURES))
    parser.add_argument("--variants", default="plain,fused",
                        help=f"comma-separated, from: {', '.join(VARIANTS)} (default: plain,fused)")
    parser.add_argument("--batch-size", type=int, default=256 if gpu else 8)
    parser.add_argument("--image-size", type=int, default=224 if gpu else 112)
    parser.add_argument("--steps", type=int, default=20 if gpu else 3)
    parser.add_argument("--warmup", type=int, default=5 if gpu else 1)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16" if gpu else "fp32",
                        help="autocast dtype (fp32: no autocast)")
    parser.add_argument("--nchw", action="store_true", help="NCHW instead of channels_last")
    parser.add_argument("--device", default="cuda" if gpu else "cpu")


def run(args: argparse.Namespace) -> int:
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        print(f"engine bench: unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    if args.batch_size < 2:
        print("engine bench: --batch-size must be at least 2 (batch norm in training)", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    layout = "NCHW" if args.nchw else "channels_last"
    print(f"{args.model}, batch {args.batch_size}, {args.image_size}px, {args.dtype}, {layout}, on "
          f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}; "
          f"{args.warmup} warm-up + {args.steps} timed steps per variant", flush=True)
    for variant in variants:
        print(f"  {variant:<20}", end="", flush=True)
        result = measure(variant, args.model, batch_size=args.batch_size, image_size=args.image_size,
                         steps=args.steps, warmup=args.warmup, device=device, dtype=args.dtype,
                         channels_last=not args.nchw)
        mem = f", peak {result.peak_memory_gb:.1f} GiB" if result.peak_memory_gb is not None else ""
        print(f"{result.images_per_s:9.1f} img/s  ({result.step_ms:.1f} ms/step{mem})", flush=True)
    return 0

