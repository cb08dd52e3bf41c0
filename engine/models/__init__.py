"""ResNeXt models with torchvision-compatible state dicts, plain or fused."""

from engine.models.fused_bottleneck import ConvBNBottleneck, autotune_fused_blocks
from engine.models.resnext import (ARCHITECTURES, FUSED_MODES, Bottleneck, FusedBottleneck, ResNeXt, create_model, resnext,
                                   resnext50_32x4d, resnext101_32x4d, resnext101_32x8d, resnext101_32x16d,
                                   resnext101_32x32d, resnext101_32x48d)

__all__ = ["ARCHITECTURES", "FUSED_MODES", "Bottleneck", "ConvBNBottleneck", "FusedBottleneck", "ResNeXt", "autotune_fused_blocks", "create_model",
           "resnext",
           "resnext50_32x4d", "resnext101_32x4d", "resnext101_32x8d", "resnext101_32x16d", "resnext101_32x32d",
           "resnext101_32x48d"]
