"""The eager warm-up a training loop runs before torch.compile traces its model or CUDA
graphs capture it: neither can check or time kernels (engine.ops.dispatch)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from engine.models.conv_bn_bottleneck import ConvBNBottleneck
from engine.ops import verify
from engine.ops.bn_act import BatchNormAct2d


def autotune_fused_blocks(model: nn.Module, sample: Tensor, head: Optional[nn.Module] = None,
                          tags: Optional[Tensor] = None) -> int:
    """The eager warm-up the training loop runs before torch.compile traces the model or
    CUDA graphs capture it, neither of which can check or time kernels:
    1. a training-mode forward on `sample` that queues a check against the reference for
       every fused op's key (engine.ops.verify; all run in one child process, each
       verdict cached on disk), and, with `head` (an engine.heads.HashtagHead), its loss on
       the model's output against `tags` (shaped like the loop's), so that the head's
       kernels are checked in the same child at the loop's key instead of at its first step;
    2. when anything was checked, a second forward on the backends that passed. In the
       last forward every ConvBNBottleneck's grouped 3x3 gets its autotuned implementation
       (engine.ops.grouped_conv).
    Without it an unchecked or untuned shape runs the reference under compile or capture.
    Call it in the step's autocast context, with the step's batch shape. The running
    statistics, batch counters and the head's counters the forwards update are restored.
    Returns the number of fused modules (ConvBNBottleneck blocks and BatchNormAct2d norms)."""
    fused = sum(isinstance(m, (ConvBNBottleneck, BatchNormAct2d)) for m in model.modules())
    if not fused and head is None:
        return 0
    buffers = list(model.buffers()) + (list(head.buffers()) if head is not None else [])
    saved = [b.detach().clone() for b in buffers]
    with verify.deferred() as checked:
        features = model(sample)
        if head is not None:
            head(features, tags)
        # The activations go before the checks' child allocates on the same device.
        del features
    if checked and fused:
        model(sample)
    with torch.no_grad():
        for buffer, value in zip(buffers, saved):
            buffer.copy_(value)
    return fused


def fused_mode(model: nn.Module) -> Optional[str]:
    """The fused mode a trunk was built with ("conv", "bn_act"), None for plain blocks."""
    if any(isinstance(m, ConvBNBottleneck) for m in model.modules()):
        return "conv"
    if any(isinstance(m, BatchNormAct2d) for m in model.modules()):
        return "bn_act"
    return None


def whole_step_verdict(mode: str, groups: int, width_per_group: int, batch: int, size: int, device: torch.device,
                       dtype: torch.dtype, channels_last: bool = True) -> dict:
    """One whole training step of a stand-in for the run's trunk (one block per stage, the
    run's cardinality and group width, so the same kernels at the same channel counts, at
    the run's micro-batch and image size) with `mode`'s fused blocks, against the plain
    model from the same weights (engine.models.step_check; a per-op check cannot see a
    defect in how the calls compose). Returns its verdict (engine.ops.numerics.compare).
    The global random state is left as it was: the run's own draws do not move."""
    from engine.models.resnext import resnext
    from engine.models.step_check import check_fused_step

    fmt = torch.channels_last if channels_last else torch.contiguous_format
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(0)
        plain = resnext([1, 1, 1, 1], groups, width_per_group, num_classes=10)
        fused = resnext([1, 1, 1, 1], groups, width_per_group, fused=mode, num_classes=10)
        for model in (plain, fused):
            model.to(device=device, memory_format=fmt)
        x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=fmt)
        target = torch.randint(0, 10, (batch,), device=device)
        # Every fused key's own check first, all in one child; the step then runs the kernels that passed.
        with verify.deferred(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            fused(x)
        fused.load_state_dict(plain.state_dict())
        return check_fused_step(fused, plain, x, target, dtype)


def share_state(source: nn.Module, target: nn.Module) -> nn.Module:
    """`target` holding `source`'s very parameters and buffers (the same tensors, by
    state-dict name): an optimizer built over `source`, and checkpoints saved from or loaded
    into it, serve `target` unchanged. The two must have the same state-dict names."""
    names = {n for n, _ in source.named_parameters()} | {n for n, _ in source.named_buffers()}
    theirs = {n for n, _ in target.named_parameters()} | {n for n, _ in target.named_buffers()}
    if names != theirs:
        raise ValueError(f"share_state: the models differ in {sorted(names ^ theirs)[:5]}")
    modules = dict(target.named_modules())
    for name, p in source.named_parameters():
        owner, _, attr = name.rpartition(".")
        setattr(modules[owner], attr, p)
    for name, b in source.named_buffers():
        owner, _, attr = name.rpartition(".")
        modules[owner].register_buffer(attr, b)
    return target
