"""The `cuda` backend of bn_act: engine._C's ops, with fake implementations so
torch.compile can trace through them without running the kernels."""

import torch

from engine.ops.backends import load_extension

if load_extension() is None:
    raise ImportError("engine._C is not available")


@torch.library.register_fake("engine::bn_act_fwd")
def _(x, weight, bias, residual, running_mean, running_var, training, momentum, eps, relu):
    c = x.shape[1]
    return torch.empty_like(x), x.new_empty(c, dtype=torch.float32), x.new_empty(c, dtype=torch.float32)


@torch.library.register_fake("engine::bn_act_bwd")
def _(grad_y, x, y, weight, mean, invstd, training, relu, write_masked_grad):
    c = x.shape[1]
    return (torch.empty_like(x), x.new_empty(c, dtype=torch.float32), x.new_empty(c, dtype=torch.float32),
            torch.empty_like(x) if write_masked_grad else x.new_empty(0))


def forward(x, weight, bias, residual, running_mean, running_var, training, momentum, eps, relu):
    return torch.ops.engine.bn_act_fwd(x, weight, bias, residual, running_mean, running_var,
                                            training, momentum, eps, relu)


def backward(grad_y, x, y, weight, mean, invstd, training, relu, write_masked_grad):
    return torch.ops.engine.bn_act_bwd(grad_y, x, y, weight, mean, invstd, training, relu, write_masked_grad)
