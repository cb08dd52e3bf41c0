"""ConvBNBottleneck: the bottleneck block with its batch norms fused into the 1x1
convolutions (engine.ops.conv_bn), as a drop-in for engine.models.bottleneck.Bottleneck.

Same constructor, same submodules (conv1, bn1, conv2, bn2, conv3, bn3, downsample.0,
downsample.1) and so the same state dict as torchvision's Bottleneck: the convolutions and
batch norms are ordinary nn.Conv2d / nn.BatchNorm2d modules that hold the parameters and
buffers, and forward hands them to one conv_bn_bottleneck call instead of calling them.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from engine.models.bottleneck import Bottleneck
from engine.ops.bn_act import BatchNormAct2d
from engine.ops.conv_bn import BNParams, conv_bn_bottleneck


def _check_downsample(downsample: Optional[nn.Module], stride: int) -> None:
    if downsample is None:
        return
    ok = (isinstance(downsample, nn.Sequential) and len(downsample) == 2
          and isinstance(downsample[0], nn.Conv2d) and isinstance(downsample[1], nn.BatchNorm2d))
    if ok:
        conv, bn = downsample
        ok = (conv.kernel_size == (1, 1) and conv.bias is None and conv.groups == 1 and conv.padding == (0, 0)
              and conv.stride == (stride, stride) and not (isinstance(bn, BatchNormAct2d) and bn.relu))
    if not ok:
        raise ValueError("ConvBNBottleneck: downsample must be nn.Sequential(nn.Conv2d 1x1 without bias at the "
                         f"block's stride {stride}, nn.BatchNorm2d without ReLU), as ResNeXt._make_layer builds "
                         f"it; got {downsample}")


def _bn_params(bn: nn.BatchNorm2d, use_running: bool) -> BNParams:
    return BNParams(bn.weight, bn.bias, bn.running_mean if use_running else None,
                    bn.running_var if use_running else None)


class ConvBNBottleneck(Bottleneck):
    """torchvision's ResNet v1.5 bottleneck (stride on the grouped 3x3) computed by
    conv_bn_bottleneck. Its norms must agree on eps, momentum and track_running_stats;
    the downsample's norm is read as a plain batch norm (its own forward is not called).
    `backend` (an attribute, default None: automatic) forces a conv_bn_bottleneck backend."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None,
                 groups: int = 1, base_width: int = 64):
        _check_downsample(downsample, stride)
        super().__init__(inplanes, planes, stride, downsample, groups, base_width)
        del self.relu
        self.stride = stride
        self.groups = groups
        self.backend: Optional[str] = None

    def _norms(self) -> list[nn.BatchNorm2d]:
        return [self.bn1, self.bn2, self.bn3] + ([self.downsample[1]] if self.downsample is not None else [])

    def forward(self, x: Tensor) -> Tensor:
        norms = self._norms()
        settings = {(bn.eps, bn.momentum, bn.track_running_stats) for bn in norms}
        if len(settings) != 1:
            raise ValueError(f"ConvBNBottleneck: its batch norms must share eps, momentum and track_running_stats, "
                             f"got {sorted(settings, key=str)}")
        eps, momentum, tracking = settings.pop()
        training = self.training or not tracking
        cumulative = False
        if self.training and tracking:
            for bn in norms:
                bn.num_batches_tracked.add_(1)
            # momentum=None is nn.BatchNorm2d's cumulative moving average, factor 1/batches. As in
            # BatchNormAct2d the factor stays on the device (reading it would wait for the GPU): the
            # kernels write this batch's statistics (momentum 1) into fresh buffers, averaged in below.
            cumulative = momentum is None
        use_running = not self.training or tracking
        params = [_bn_params(bn, use_running) for bn in norms]
        if cumulative:
            params = [p._replace(running_mean=torch.zeros_like(p.running_mean),
                                 running_var=torch.zeros_like(p.running_var)) for p in params]
        wd = bnd = None
        if self.downsample is not None:
            wd, bnd = self.downsample[0].weight, params[3]
        y = conv_bn_bottleneck(x, self.conv1.weight, params[0], self.conv2.weight, params[1], self.conv3.weight,
                               params[2], wd, bnd, stride=self.stride, groups=self.groups, training=training,
                               momentum=1.0 if cumulative else momentum or 0.0, eps=eps, backend=self.backend)
        if cumulative:
            with torch.no_grad():
                factor = self.bn1.num_batches_tracked.reciprocal()
                for bn, p in zip(norms, params):
                    bn.running_mean.lerp_(p.running_mean, factor.to(p.running_mean.dtype))
                    bn.running_var.lerp_(p.running_var, factor.to(p.running_var.dtype))
        return y
