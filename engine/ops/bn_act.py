"""bn_act: batch normalisation, then an optional residual add, then an optional ReLU,
in two passes over memory forward (statistics, apply) and two backward.

    y = relu?(batch_norm(x) + residual?)

Arguments follow `torch.nn.functional.batch_norm`. In training the batch statistics
normalise x and update the running statistics in place (unbiased variance, as torch);
in eval the running statistics are used. Backward saves x and y (y's sign gives the
ReLU mask) plus two per-channel vectors; residual's gradient is the masked output
gradient.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from engine.ops import backends
from engine.ops.dispatch import define


def memory_format_of(x: Tensor) -> Optional[torch.memory_format]:
    """The dense layout of a 4-D tensor the fused kernels can walk, else None."""
    if x.is_contiguous():
        return torch.contiguous_format
    if x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return None


def _check_inputs(x: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                  weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, training: bool = False,
                  momentum: float = 0.1, eps: float = 1e-5, residual: Optional[Tensor] = None,
                  relu: bool = False) -> None:
    """Errors every backend shares, raised before any work."""
    backends.check_image_batch("bn_act", x)
    channels = x.shape[1]
    for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean), ("running_var", running_var)):
        if t is not None:
            backends.check_parameter("bn_act", name, t, (channels,), x, f" (x has {channels} channels)")
    if (running_mean is None) != (running_var is None):
        raise ValueError("bn_act: pass both running_mean and running_var, or neither")
    if not training and running_mean is None:
        raise ValueError("bn_act: eval mode (training=False) needs running_mean and running_var")
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(f"bn_act: residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
        if residual.dtype != x.dtype or residual.device != x.device:
            raise TypeError(f"bn_act: residual must be {x.dtype} on {x.device} like x, "
                            f"got {residual.dtype} on {residual.device}")
    if training and x.numel() > 0 and x.numel() // channels == 1:
        raise ValueError(f"bn_act: training needs more than 1 value per channel, got x of shape {tuple(x.shape)}")


def _reference(x: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
               weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, training: bool = False,
               momentum: float = 0.1, eps: float = 1e-5, residual: Optional[Tensor] = None,
               relu: bool = False) -> Tensor:
    """Batch norm (+ residual) (+ ReLU): y = relu?(batch_norm(x) + residual?), arguments as
    `torch.nn.functional.batch_norm` (see the module docstring); `backend=` forces one.
    The reference: torch's batch norm, add and ReLU, one after the other."""
    y = F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    if residual is not None:
        y = y + residual
    return F.relu(y) if relu else y


def _fused_supports(accepts):
    def supports(x, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5,
                 residual=None, relu=False, *, forced):
        why = backends.fast_dtype_rejection(x)
        if why is not None:
            return why
        if memory_format_of(x) is None:
            return f"x must be contiguous in NCHW or channels_last layout, got strides {x.stride()}"
        if residual is not None and memory_format_of(residual) is None:
            return f"residual must be contiguous in NCHW or channels_last layout, got strides {residual.stride()}"
        return accepts(x, running_mean, running_var, weight, bias, residual, forced=forced)
    return supports


class _BnActFunction(torch.autograd.Function):
    """Autograd for the fused backends; `kernels` is the backend's namespace with
    `forward(...) -> (y, mean, invstd)` and `backward(...) -> (dx, dweight, dbias, masked_grad)`,
    masked_grad being the ReLU-masked output gradient when asked for (a residual's gradient)."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, running_mean, running_var, training, momentum, eps, relu, kernels):
        fmt = memory_format_of(x)
        if residual is not None:
            residual = residual.contiguous(memory_format=fmt)
        y, mean, invstd = kernels.forward(x, weight, bias, residual, running_mean, running_var,
                                          training, momentum, eps, relu)
        ctx.save_for_backward(x, y, weight, mean, invstd)
        ctx.flags = (training, relu, residual is not None, fmt, kernels)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, y, weight, mean, invstd = ctx.saved_tensors
        training, relu, has_residual, fmt, kernels = ctx.flags
        grad_y = grad_y.contiguous(memory_format=fmt)
        dx, dweight, dbias, masked_grad = kernels.backward(grad_y, x, y, weight, mean, invstd,
                                                           training, relu, has_residual and relu)
        dresidual = None
        if has_residual:
            dresidual = masked_grad if relu else grad_y
        return (dx, dweight.to(weight.dtype), dbias.to(weight.dtype), dresidual,
                None, None, None, None, None, None, None)


def _fused(kernels):
    def run(x, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5,
            residual=None, relu=False):
        channels = x.shape[1]
        # The kernels always take an affine pair; identity parameters cost two [C] vectors.
        if weight is None:
            weight = torch.ones(channels, device=x.device, dtype=torch.float32)
        if bias is None:
            bias = torch.zeros(channels, device=x.device, dtype=weight.dtype)
        return _BnActFunction.apply(x, weight, bias, residual, running_mean, running_var,
                                    bool(training), float(momentum), float(eps), bool(relu), kernels)
    return run


def _triton_kernels():
    from engine.kernels import bn_act as triton_bn_act
    return triton_bn_act


def _cuda_kernels():
    from engine.ops import _cuda_bn_act
    return _cuda_bn_act


bn_act = define("bn_act", _reference, validate=_check_inputs)
bn_act.register("triton", lambda *a, **k: _fused(_triton_kernels())(*a, **k),
                available=backends.triton_status, scope=backends.triton_scope,
                supports=_fused_supports(backends.triton_accepts))
bn_act.register("cuda", lambda *a, **k: _fused(_cuda_kernels())(*a, **k),
                available=backends.extension_status, scope=backends.cuda_ext_scope,
                supports=_fused_supports(backends.cuda_ext_accepts))


class BatchNormAct2d(torch.nn.BatchNorm2d):
    """nn.BatchNorm2d whose forward also adds a residual and applies ReLU through bn_act.

    Its parameters and buffers are BatchNorm2d's, so state dicts are unchanged.
    """

    def __init__(self, num_features: int, relu: bool = True, **kwargs):
        super().__init__(num_features, **kwargs)
        self.relu = relu

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        training = self.training or not self.track_running_stats
        use_running = not self.training or self.track_running_stats
        running_mean = self.running_mean if use_running else None
        running_var = self.running_var if use_running else None
        cumulative = False
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            # momentum=None is nn.BatchNorm2d's cumulative moving average, factor 1/batches. The
            # factor stays on the device (reading it would wait for the GPU): the op writes this
            # batch's statistics (momentum 1) into fresh buffers, averaged in below.
            cumulative = self.momentum is None
        if cumulative:
            running_mean, running_var = torch.zeros_like(self.running_mean), torch.zeros_like(self.running_var)
        y = bn_act(x, running_mean, running_var, self.weight, self.bias, training,
                   1.0 if cumulative else self.momentum or 0.0, self.eps, residual=residual, relu=self.relu)
        if cumulative:
            with torch.no_grad():
                factor = self.num_batches_tracked.reciprocal()
                self.running_mean.lerp_(running_mean, factor.to(running_mean.dtype))
                self.running_var.lerp_(running_var, factor.to(running_var.dtype))
        return y

    def extra_repr(self) -> str:
        return super().extra_repr() + f", relu={self.relu}"
