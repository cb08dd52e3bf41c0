"""BNActBottleneck: the bottleneck block with each batch norm, its ReLU and the residual
add in one `bn_act` op (engine.ops.bn_act), as a drop-in for the plain Bottleneck with the
same submodules and state dict."""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from engine.models.bottleneck import Bottleneck
from engine.ops.bn_act import BatchNormAct2d


class BNActBottleneck(Bottleneck):
    """Bottleneck whose batch norms are BatchNormAct2d: bn1 and bn2 with their ReLU, bn3 with
    the residual add and the block's ReLU."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None,
                 groups: int = 1, base_width: int = 64):
        super().__init__(inplanes, planes, stride, downsample, groups, base_width)
        self.bn1 = BatchNormAct2d(self.bn1.num_features, relu=True)
        self.bn2 = BatchNormAct2d(self.bn2.num_features, relu=True)
        self.bn3 = BatchNormAct2d(self.bn3.num_features, relu=True)
        del self.relu

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.bn1(self.conv1(x))
        out = self.bn2(self.conv2(out))
        return self.bn3(self.conv3(out), residual=identity)
