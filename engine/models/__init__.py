"""ResNeXt models with torchvision-compatible state dicts, plain or fused."""

from engine.architectures import ARCHITECTURES
from engine.models.bn_act_bottleneck import BNActBottleneck
from engine.models.bottleneck import Bottleneck
from engine.models.conv_bn_bottleneck import ConvBNBottleneck
from engine.models.resnext import (FUSED_MODES, ResNeXt, create_model, resnext, resnext50_32x4d, resnext101_32x4d,
                                   resnext101_32x8d, resnext101_32x16d, resnext101_32x32d, resnext101_32x48d)
from engine.models.warmup import autotune_fused_blocks

__all__ = ["ARCHITECTURES", "FUSED_MODES", "BNActBottleneck", "Bottleneck", "ConvBNBottleneck", "ResNeXt",
           "autotune_fused_blocks", "create_model", "resnext", "resnext50_32x4d", "resnext101_32x4d",
           "resnext101_32x8d", "resnext101_32x16d", "resnext101_32x32d", "resnext101_32x48d"]
