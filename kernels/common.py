"""Helpers shared by the kernel files.

Host side: the channels_last output buffers and strided output sizes of the convolution
launchers, the tl.dot precision every GEMM takes for its dtype, and the interpreter's tile
sizes.

Kernel side (@triton.jit, inlined into each caller, so the callers' code is what it was
with the lines written out):
    load_bn_relu          an operand tile loaded with the previous batch norm + ReLU
                          applied on the load (conv_bn's 1x1 GEMMs, grouped_conv's 3x3);
    update_running_stats  the momentum update of a batch norm's running statistics;
    store_bn_affine       a batch norm's per-channel results: mean, 1/std and the affine
                          pair the apply passes and prologues use (bn_act and bn_stats
                          finalise their own partial sums, then share these two).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs get true fp32 products, as torch's default matmul and the CPU
    # interpreter compute them; tf32 would not match them (the head's logits would move in
    # their fourth significant digit).
    return "ieee" if dtype == torch.float32 else "tf32"


def interpreter_block(extent: int) -> int:
    """A tile's size along an axis of this extent in Triton's interpreter, which is for
    tests: 16 (tl.dot's minimum) up to 128, so the kernel tests' small shapes span several
    tiles and leave ragged edges; 64 beyond, the fp32 GPU tile, so that a whole model's 256
    to 2048 channels are not thousands of programs, which the interpreter runs one by one
    (at 16, minutes per training step of a one-block-per-stage ResNeXt)."""
    return 16 if extent <= 128 else 64


def nhwc_empty(n: int, c: int, h: int, w: int, like: torch.Tensor) -> torch.Tensor:
    return torch.empty((n, c, h, w), device=like.device, dtype=like.dtype, memory_format=torch.channels_last)


def strided_size(size: int, stride: int) -> int:
    """Output size of a convolution with this stride that keeps the size at stride 1."""
    return (size - 1) // stride + 1


@triton.jit
def load_bn_relu(
    ptrs,           # [rows, channels] pointers into the operand
    ok, ks, k_ok,   # the tile's mask, its channels and which of them exist
    SCALE, SHIFT,   # [channels] fp32: the batch norm as x * SCALE + SHIFT (BN_RELU)
    BN_RELU: tl.constexpr,
):
    x = tl.load(ptrs, mask=ok, other=0.0)
    if BN_RELU:
        scale = tl.load(SCALE + ks, mask=k_ok, other=0.0)
        shift = tl.load(SHIFT + ks, mask=k_ok, other=0.0)
        h = tl.maximum(x.to(tl.float32) * scale[None, :] + shift[None, :], 0.0)
        # Masked entries would hold relu(shift): zero, as the unfused convolution's padding
        # and edge rows are. Rounded to the operand's dtype, as the stored normalised
        # activation of the unfused block would be.
        x = tl.where(ok, h, 0.0).to(x.dtype)
    return x


@triton.jit
def update_running_stats(
    RMEAN, RVAR,    # [C], updated in place
    cols, ok, mean, unbiased_var, momentum,
):
    rm = tl.load(RMEAN + cols, mask=ok, other=0.0).to(tl.float32)
    rv = tl.load(RVAR + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(RMEAN + cols, ((1.0 - momentum) * rm + momentum * mean).to(RMEAN.dtype.element_ty), mask=ok)
    tl.store(RVAR + cols, ((1.0 - momentum) * rv + momentum * unbiased_var).to(RVAR.dtype.element_ty), mask=ok)


@triton.jit
def store_bn_affine(
    W, B,           # [C] the batch norm's weight and bias
    MEAN, INVSTD,   # [C] fp32 out
    SCALE, SHIFT,   # [C] fp32 out: bn(x) = x * SCALE + SHIFT
    cols, ok, mean, var, eps,
):
    invstd = 1.0 / tl.sqrt(var + eps)
    scale = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32) * invstd
    tl.store(MEAN + cols, mean, mask=ok)
    tl.store(INVSTD + cols, invstd, mask=ok)
    tl.store(SCALE + cols, scale, mask=ok)
    tl.store(SHIFT + cols, tl.load(B + cols, mask=ok, other=0.0).to(tl.float32) - mean * scale, mask=ok)
