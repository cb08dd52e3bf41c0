"""Fused ops with reference, Triton and CUDA backends (see engine.ops.dispatch)."""

from engine.ops import backends as _backends
from engine.ops.bn_act import BatchNormAct2d, bn_act
from engine.ops.conv_bn import BNParams, conv_bn_bottleneck
from engine.ops.dispatch import REGISTRY, BackendUnavailableError
from engine.ops.grouped_conv import grouped_conv3x3
from engine.ops.hashtag_ce import hashtag_ce

__all__ = ["BatchNormAct2d", "BNParams", "bn_act", "conv_bn_bottleneck", "grouped_conv3x3", "hashtag_ce", "REGISTRY",
           "BackendUnavailableError"]

# Probe once, eagerly: torch.compile then reads the cached answers instead of tracing the probes.
_backends.triton_status()
_backends.load_extension()
