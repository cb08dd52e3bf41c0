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
