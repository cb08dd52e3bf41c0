"""ResNeXt as arguments (cardinality, base width, blocks per stage), with the block
class passed in, so the fused bottleneck plugs in without touching the network.

Module names, parameter and buffer shapes match torchvision's ResNet exactly
(conv1, bn1, layer1.0.conv1 ... fc): torchvision, WSL-Images and timm
`*.fb_wsl_ig1b_ft_in1k` state dicts load with no key mapping, in either mode.
"""

from __future__ import annotations

from typing import Callable, Optional, Type, Union

import torch
from torch import Tensor, nn

from engine.architectures import ARCHITECTURES
from engine.models.bn_act_bottleneck import BNActBottleneck
from engine.models.bottleneck import Bottleneck, conv1x1
from engine.models.conv_bn_bottleneck import ConvBNBottleneck
from engine.ops.bn_act import BatchNormAct2d


Block = Union[Type[Bottleneck], Type[BNActBottleneck], Type[ConvBNBottleneck]]
# How each block's batch norms run: plain PyTorch, bn_act passes, or fused into the 1x1 convolutions.
FUSED_MODES = (False, True, "bn_act", "conv")


class ResNeXt(nn.Module):
    """ResNet/ResNeXt trunk and classifier; `num_classes=0` leaves the trunk alone
    (`fc` is then an identity and forward returns pooled features)."""

    def __init__(self, block: Block, layers: list[int], groups: int = 32, width_per_group: int = 4,
                 num_classes: int = 1000, zero_init_residual: bool = False,
                 norm_layer: Callable[..., nn.Module] = nn.BatchNorm2d, stem_norm: Optional[nn.Module] = None):
        super().__init__()
        if len(layers) != 4 or any(n < 1 for n in layers):
            raise ValueError(f"layers must be 4 positive block counts, got {layers}")
        if groups < 1 or width_per_group < 1:
            raise ValueError(f"groups and width_per_group must be positive, got {groups}, {width_per_group}")
        self.block = block
        self.groups = groups
        self.base_width = width_per_group
        self.norm_layer = norm_layer
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        # The stem's norm + ReLU: a fused BatchNormAct2d, or BatchNorm2d followed by ReLU.
        self.bn1 = stem_norm if stem_norm is not None else nn.BatchNorm2d(64)
        self.relu = nn.Identity() if isinstance(self.bn1, BatchNormAct2d) else nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(64, layers[0])
        self.layer2 = self._make_layer(128, layers[1], stride=2)
        self.layer3 = self._make_layer(256, layers[2], stride=2)
        self.layer4 = self._make_layer(512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.num_features = 512 * block.expansion
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * self.block.expansion:
            downsample = nn.Sequential(conv1x1(self.inplanes, planes * self.block.expansion, stride),
                                       self.norm_layer(planes * self.block.expansion))
        layers = [self.block(self.inplanes, planes, stride, downsample, self.groups, self.base_width)]
        self.inplanes = planes * self.block.expansion
        layers += [self.block(self.inplanes, planes, groups=self.groups, base_width=self.base_width)
                   for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.forward_features(x))


def resnext(layers: list[int], groups: int, width_per_group: int, *, fused=False, **kwargs) -> ResNeXt:
    """A ResNeXt whose state dict is torchvision's in every mode. `fused`: False for plain
    PyTorch blocks; True or "bn_act" for every BN/add/ReLU through `bn_act`; "conv" for the
    blocks' batch norms fused into their 1x1 convolutions (`conv_bn_bottleneck`)."""
    if fused not in FUSED_MODES:
        raise ValueError(f"fused must be one of {FUSED_MODES}, got {fused!r}")
    if fused in (True, "bn_act"):
        return ResNeXt(BNActBottleneck, layers, groups, width_per_group,
                       norm_layer=lambda c: BatchNormAct2d(c, relu=False),
                       stem_norm=BatchNormAct2d(64, relu=True), **kwargs)
    if fused == "conv":
        return ResNeXt(ConvBNBottleneck, layers, groups, width_per_group,
                       stem_norm=BatchNormAct2d(64, relu=True), **kwargs)
    return ResNeXt(Bottleneck, layers, groups, width_per_group, **kwargs)


def create_model(name: str, *, fused=False, **kwargs) -> ResNeXt:
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(ARCHITECTURES)}")
    layers, groups, width = ARCHITECTURES[name]
    return resnext(layers, groups, width, fused=fused, **kwargs)


def _constructor(name: str):
    def build(*, fused=False, **kwargs) -> ResNeXt:
        return create_model(name, fused=fused, **kwargs)
    build.__name__ = name
    build.__doc__ = f"{name}: blocks {ARCHITECTURES[name][0]}, cardinality {ARCHITECTURES[name][1]}, " \
                    f"base width {ARCHITECTURES[name][2]}."
    return build


resnext50_32x4d = _constructor("resnext50_32x4d")
resnext101_32x4d = _constructor("resnext101_32x4d")
resnext101_32x8d = _constructor("resnext101_32x8d")
resnext101_32x16d = _constructor("resnext101_32x16d")
resnext101_32x32d = _constructor("resnext101_32x32d")
resnext101_32x48d = _constructor("resnext101_32x48d")
