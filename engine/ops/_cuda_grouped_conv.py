"""The `cuda` backend of grouped_conv3x3: engine._C's direct kernels for group widths 1,
2, 4 and 8 (csrc/grouped_conv_cuda.cu), with fake implementations so torch.compile can
trace through them, and the bottleneck's middle (the 3x3 with bn1 + ReLU on its load and
bn2's statistics from its epilogue) as one op."""

import torch

from engine.kernels.bn_stats import finalize
from engine.kernels.common import nhwc_empty, strided_size
from engine.ops.backends import load_extension

if load_extension() is None:
    raise ImportError("engine._C is not available")


def rows_per_part(device: torch.device) -> int:
    """Output rows per statistics partial: a block's share on a GPU; a few rows on the CPU,
    so that tests merge many partials, ragged last one included."""
    return 512 if device.type == "cuda" else 5


@torch.library.register_fake("engine::grouped_conv3x3_fwd")
def _(x, weight, in_scale, in_shift, stride, stats, rows):
    n, c, h, w = x.shape
    ho, wo = strided_size(h, stride), strided_size(w, stride)
    part = (x.new_empty(2, -(-n * ho * wo // rows), c, dtype=torch.float32) if stats
            else x.new_empty(0, dtype=torch.float32))
    return nhwc_empty(n, c, ho, wo, x), part


@torch.library.register_fake("engine::grouped_conv3x3_dgrad")
def _(grad_y, weight, input_hw, stride):
    return nhwc_empty(grad_y.shape[0], grad_y.shape[1], input_hw[0], input_hw[1], grad_y)


@torch.library.register_fake("engine::grouped_conv3x3_wgrad")
def _(grad_y, x, in_scale, in_shift, width, stride):
    return x.new_empty(x.shape[1], width, 3, 3, dtype=torch.float32)


def forward(x, weight, in_scale, in_shift, stride, stats):
    """(y, part, rows per part): part as kernels.bn_stats' statistics partials, or empty."""
    rows = rows_per_part(x.device)
    y, part = torch.ops.engine.grouped_conv3x3_fwd(x, weight, in_scale, in_shift, stride, stats, rows)
    return y, part, rows


def dgrad(grad_y, weight, input_hw, stride):
    return torch.ops.engine.grouped_conv3x3_dgrad(grad_y.contiguous(memory_format=torch.channels_last),
                                                       weight, list(input_hw), stride)


def wgrad(grad_y, x, in_scale, in_shift, stride, width):
    return torch.ops.engine.grouped_conv3x3_wgrad(grad_y.contiguous(memory_format=torch.channels_last), x,
                                                       in_scale, in_shift, width, stride)


@torch.library.custom_op("engine::grouped_conv_bn_fwd_cuda", mutates_args=("running_mean", "running_var"))
def grouped_conv_bn_fwd_cuda(x: torch.Tensor, weight: torch.Tensor, in_scale: torch.Tensor, in_shift: torch.Tensor,
                             stride: int, bn_weight: torch.Tensor, bn_bias: torch.Tensor,
                             running_mean: torch.Tensor | None, running_var: torch.Tensor | None, momentum: float,
                             eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """a = conv3x3(relu(x * in_scale + in_shift)) on the direct kernel, then its batch norm's
    training statistics from the epilogue's partials: a, mean, invstd, scale, shift (as
    kernels.conv_bn's conv_bn_fwd_triton returns them)."""
    a, part, rows = forward(x, weight, in_scale, in_shift, stride, True)
    m = a.shape[0] * a.shape[2] * a.shape[3]
    return (a, *finalize(part, rows, m, bn_weight, bn_bias, running_mean, running_var, momentum, eps))


@grouped_conv_bn_fwd_cuda.register_fake
def _(x, weight, in_scale, in_shift, stride, bn_weight, bn_bias, running_mean, running_var, momentum, eps):
    n, c, h, w = x.shape
    a = nhwc_empty(n, c, strided_size(h, stride), strided_size(w, stride), x)
    return (a, *(x.new_empty(c, dtype=torch.float32) for _ in range(4)))
