"""Triton kernels for bn_act: batch norm (+ residual) (+ ReLU), NCHW or NHWC.

A 4-D activation is walked as M = N*H*W rows by C channels. In NHWC a row is C
contiguous values; in NCHW a channel is H*W contiguous values per image, so the
row index splits into (image, pixel). Forward: one reduction pass for per-channel
statistics, a tiny finalise, one elementwise pass. Backward: one reduction pass,
a tiny finalise, one elementwise pass. Statistics accumulate in fp32 on values
shifted by each channel's first element, so E[x^2] - E[x]^2 does not cancel
catastrophically when |mean| >> std.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .common import store_bn_affine, update_running_stats

# Elements per tile: 4096 keeps the fp32 accumulators of a reduction in registers at 4 warps.
TILE_ELEMENTS = 4096
# Programs a reduction pass aims for per SM: its kernels use 96-150 registers at 4 warps
# (compile_gate), so 3-5 are resident per SM, and four waves of them keep every SM
# streaming until the end instead of idling through one partial last wave.
PROGRAMS_PER_SM = 16
# Without a GPU (Triton's interpreter): a fixed program count, as for a 64-SM device.
DEFAULT_PROGRAMS = 1024
# Partial sums one finalise step adds up (a power of two), [splits, BLOCK_C] at a time: the
# splits are summed in this fixed order, so a reduction's result does not vary from run to run.
FINALIZE_ELEMENTS = 2048


@triton.jit
def _offsets(rows, cols, C, S, CHANNELS_LAST: tl.constexpr):
    # 64-bit: an activation can hold 2**31 elements and more (C = 3072 at 56 x 56 px from
    # batch 223), and the row index times the row length would wrap in 32 bits.
    rows = rows.to(tl.int64)
    if CHANNELS_LAST:
        return rows[:, None] * C + cols[None, :]
    image = rows // S
    pixel = rows - image * S
    return image[:, None] * (C * S) + cols[None, :] * S + pixel[:, None]


@triton.jit
def _stats_kernel(
    X,      # [N, C, H, W] in either layout
    SHIFT,  # [C] fp32
    PSUM,   # [splits, C] fp32
    PSQ,    # [splits, C] fp32
    M, C, S, rows_per_split,
    CHANNELS_LAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_c = tl.program_id(0)
    split = tl.program_id(1)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    shift = tl.load(SHIFT + cols, mask=col_ok, other=0.0)
    acc = tl.zeros((BLOCK_M, BLOCK_C), tl.float32)
    acc_sq = tl.zeros((BLOCK_M, BLOCK_C), tl.float32)
    row_start = split * rows_per_split
    row_stop = tl.minimum(row_start + rows_per_split, M)
    for r in range(row_start, row_stop, BLOCK_M):
        rows = r + tl.arange(0, BLOCK_M)
        ok = (rows < row_stop)[:, None] & col_ok[None, :]
        x = tl.load(X + _offsets(rows, cols, C, S, CHANNELS_LAST), mask=ok, other=0.0).to(tl.float32)
        d = tl.where(ok, x - shift[None, :], 0.0)
        acc += d
        acc_sq += d * d
    tl.store(PSUM + split * C + cols, tl.sum(acc, axis=0), mask=col_ok)
    tl.store(PSQ + split * C + cols, tl.sum(acc_sq, axis=0), mask=col_ok)


@triton.jit
def _sum_splits(
    A, B,   # [splits, C] fp32 partial sums
    cols, ok, splits, C, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    # BLOCK_S splits per load: thousands of them (a small C at a large batch) would take
    # as many dependent load round trips one split at a time.
    acc_a = tl.zeros((BLOCK_S, BLOCK_C), tl.float32)
    acc_b = tl.zeros((BLOCK_S, BLOCK_C), tl.float32)
    for s0 in range(0, splits, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        offs = s[:, None] * C + cols[None, :]
        m = (s < splits)[:, None] & ok[None, :]
        acc_a += tl.load(A + offs, mask=m, other=0.0)
        acc_b += tl.load(B + offs, mask=m, other=0.0)
    return tl.sum(acc_a, axis=0), tl.sum(acc_b, axis=0)


@triton.jit
def _finalize_fwd_kernel(
    PSUM, PSQ,        # [splits, C] fp32
    SHIFT,            # [C] fp32
    W, B,             # [C]
    RMEAN, RVAR,      # [C], updated in place when TRAINING and HAS_RUNNING
    MEAN, INVSTD,     # [C] fp32 out
    SCALE, OFFSET,    # [C] fp32 out: y = x * SCALE + OFFSET
    splits, C, M, momentum, eps,
    TRAINING: tl.constexpr, HAS_RUNNING: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    ok = cols < C
    if TRAINING:
        total, total_sq = _sum_splits(PSUM, PSQ, cols, ok, splits, C, BLOCK_C, BLOCK_S)
        shifted_mean = total / M
        var = tl.maximum(total_sq / M - shifted_mean * shifted_mean, 0.0)
        mean = shifted_mean + tl.load(SHIFT + cols, mask=ok, other=0.0)
        if HAS_RUNNING:
            update_running_stats(RMEAN, RVAR, cols, ok, mean, var * (M / tl.maximum(M - 1.0, 1.0)), momentum)
    else:
        mean = tl.load(RMEAN + cols, mask=ok, other=0.0).to(tl.float32)
        var = tl.load(RVAR + cols, mask=ok, other=1.0).to(tl.float32)
    store_bn_affine(W, B, MEAN, INVSTD, SCALE, OFFSET, cols, ok, mean, var, eps)


@triton.jit
def _apply_fwd_kernel(
    X,              # [N, C, H, W]
    RES,            # [N, C, H, W], same layout as X (unused unless HAS_RESIDUAL)
    Y,              # [N, C, H, W] out, same layout as X
    SCALE, OFFSET,  # [C] fp32
    M, C, S,
    HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr, CHANNELS_LAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    ok = (rows < M)[:, None] & col_ok[None, :]
    offs = _offsets(rows, cols, C, S, CHANNELS_LAST)
    x = tl.load(X + offs, mask=ok, other=0.0).to(tl.float32)
    scale = tl.load(SCALE + cols, mask=col_ok, other=0.0)
    offset = tl.load(OFFSET + cols, mask=col_ok, other=0.0)
    y = x * scale[None, :] + offset[None, :]
    if HAS_RESIDUAL:
        y += tl.load(RES + offs, mask=ok, other=0.0).to(tl.float32)
    if RELU:
        y = tl.maximum(y, 0.0)
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=ok)


@triton.jit
def _bwd_reduce_kernel(
    GY,            # [N, C, H, W] gradient of y
    Y,             # [N, C, H, W] forward output (ReLU mask)
    X,             # [N, C, H, W] forward input
    MEAN,          # [C] fp32
    GRES,          # [N, C, H, W] out: ReLU-masked gradient, the residual's gradient (when WRITE_GRES)
    PSUM, PSUMX,   # [splits, C] fp32: sum of g, sum of g * (x - mean)
    M, C, S, rows_per_split,
    RELU: tl.constexpr, WRITE_GRES: tl.constexpr, CHANNELS_LAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_c = tl.program_id(0)
    split = tl.program_id(1)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    mean = tl.load(MEAN + cols, mask=col_ok, other=0.0)
    acc = tl.zeros((BLOCK_M, BLOCK_C), tl.float32)
    acc_x = tl.zeros((BLOCK_M, BLOCK_C), tl.float32)
    row_start = split * rows_per_split
    row_stop = tl.minimum(row_start + rows_per_split, M)
    for r in range(row_start, row_stop, BLOCK_M):
        rows = r + tl.arange(0, BLOCK_M)
        ok = (rows < row_stop)[:, None] & col_ok[None, :]
        offs = _offsets(rows, cols, C, S, CHANNELS_LAST)
        g = tl.load(GY + offs, mask=ok, other=0.0).to(tl.float32)
        if RELU:
            y = tl.load(Y + offs, mask=ok, other=0.0).to(tl.float32)
            g = tl.where(y > 0.0, g, 0.0)
        if WRITE_GRES:
            tl.store(GRES + offs, g.to(GRES.dtype.element_ty), mask=ok)
        x = tl.load(X + offs, mask=ok, other=0.0).to(tl.float32)
        acc += g
        acc_x += tl.where(ok, g * (x - mean[None, :]), 0.0)
    tl.store(PSUM + split * C + cols, tl.sum(acc, axis=0), mask=col_ok)
    tl.store(PSUMX + split * C + cols, tl.sum(acc_x, axis=0), mask=col_ok)


@triton.jit
def _finalize_bwd_kernel(
    PSUM, PSUMX,       # [splits, C] fp32
    MEAN, INVSTD, W,   # [C]
    DW, DB,            # [C] fp32 out
    K_G, K_X, K_0,     # [C] fp32 out: dx = g * K_G + x * K_X + K_0
    splits, C, M,
    TRAINING: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    ok = cols < C
    sum_g, sum_gx = _sum_splits(PSUM, PSUMX, cols, ok, splits, C, BLOCK_C, BLOCK_S)
    invstd = tl.load(INVSTD + cols, mask=ok, other=0.0)
    mean = tl.load(MEAN + cols, mask=ok, other=0.0)
    k_g = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32) * invstd
    sum_g_xhat = sum_gx * invstd
    tl.store(DW + cols, sum_g_xhat, mask=ok)
    tl.store(DB + cols, sum_g, mask=ok)
    if TRAINING:
        # dx = k_g * (g - sum_g / M - xhat * sum_g_xhat / M), xhat = (x - mean) * invstd
        k_x = -k_g * invstd * sum_g_xhat / M
        k_0 = -k_g * sum_g / M - k_x * mean
    else:
        k_x = tl.zeros((BLOCK_C,), tl.float32)
        k_0 = tl.zeros((BLOCK_C,), tl.float32)
    tl.store(K_G + cols, k_g, mask=ok)
    tl.store(K_X + cols, k_x, mask=ok)
    tl.store(K_0 + cols, k_0, mask=ok)


@triton.jit
def _apply_bwd_kernel(
    G,                # [N, C, H, W] gradient of y, or the already masked gradient when MASKED
    Y,                # [N, C, H, W] forward output (used when RELU and not MASKED)
    X,                # [N, C, H, W] forward input
    DX,               # [N, C, H, W] out
    K_G, K_X, K_0,    # [C] fp32
    M, C, S,
    RELU: tl.constexpr, MASKED: tl.constexpr, TRAINING: tl.constexpr, CHANNELS_LAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    ok = (rows < M)[:, None] & col_ok[None, :]
    offs = _offsets(rows, cols, C, S, CHANNELS_LAST)
    g = tl.load(G + offs, mask=ok, other=0.0).to(tl.float32)
    if RELU and not MASKED:
        y = tl.load(Y + offs, mask=ok, other=0.0).to(tl.float32)
        g = tl.where(y > 0.0, g, 0.0)
    dx = g * tl.load(K_G + cols, mask=col_ok, other=0.0)[None, :]
    if TRAINING:
        x = tl.load(X + offs, mask=ok, other=0.0).to(tl.float32)
        dx += x * tl.load(K_X + cols, mask=col_ok, other=0.0)[None, :]
        dx += tl.load(K_0 + cols, mask=col_ok, other=0.0)[None, :]
    tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=ok)


class _Geometry(NamedTuple):
    m: int               # rows: N * H * W
    c: int
    s: int               # pixels per image: H * W
    channels_last: bool
    block_m: int
    block_c: int
    splits: int          # row chunks per channel block in a reduction
    rows_per_split: int
    block_s: int         # splits per step of the finalise sum


def _target_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    return DEFAULT_PROGRAMS


def _geometry(x: torch.Tensor) -> _Geometry:
    n, c, h, w = x.shape
    m, s = n * h * w, h * w
    channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    if channels_last:
        # Channels are the contiguous axis: as wide a channel tile as C allows, for long loads.
        block_c = min(128, max(16, triton.next_power_of_2(c)))
    else:
        # Pixels are the contiguous axis: a narrow channel tile, long rows.
        block_c = 16
    block_m = TILE_ELEMENTS // block_c
    c_blocks = triton.cdiv(c, block_c)
    # At least one row tile per split; the SM count, not the channels, sets the program count.
    splits = max(1, min(triton.cdiv(max(m, 1), block_m), triton.cdiv(_target_programs(x.device), c_blocks)))
    rows_per_split = triton.cdiv(triton.cdiv(max(m, 1), splits), block_m) * block_m
    splits = triton.cdiv(max(m, 1), rows_per_split)
    block_s = min(max(1, FINALIZE_ELEMENTS // block_c), triton.next_power_of_2(splits))
    return _Geometry(m, c, s, channels_last, block_m, block_c, splits, rows_per_split, block_s)


def _forward_impl(x, weight, bias, residual, running_mean, running_var, training, momentum, eps, relu, y):
    g = _geometry(x)
    m, c = g.m, g.c
    f32 = dict(device=x.device, dtype=torch.float32)
    mean, invstd = torch.empty(c, **f32), torch.empty(c, **f32)
    scale, offset = torch.empty(c, **f32), torch.empty(c, **f32)
    if m == 0:
        mean.fill_(float("nan"))
        invstd.fill_(float("nan"))
        return mean, invstd
    has_running = running_mean is not None
    c_grid = triton.cdiv(c, g.block_c)
    if training:
        splits = g.splits
        shift = x[0, :, 0, 0].float().contiguous()
        psum, psq = torch.empty(splits, c, **f32), torch.empty(splits, c, **f32)
        _stats_kernel[(c_grid, splits)](x, shift, psum, psq, m, c, g.s, g.rows_per_split,
                                        CHANNELS_LAST=g.channels_last, BLOCK_M=g.block_m, BLOCK_C=g.block_c)
    else:
        splits, shift, psum, psq = 0, mean, mean, mean
    rm = running_mean if has_running else mean
    rv = running_var if has_running else mean
    _finalize_fwd_kernel[(c_grid,)](psum, psq, shift, weight, bias, rm, rv, mean, invstd, scale, offset,
                                    splits, c, float(m), momentum, eps,
                                    TRAINING=training, HAS_RUNNING=has_running, BLOCK_C=g.block_c,
                                    BLOCK_S=g.block_s if training else 1)
    _apply_fwd_kernel[(triton.cdiv(m, g.block_m), c_grid)](
        x, residual if residual is not None else x, y, scale, offset, m, c, g.s,
        HAS_RESIDUAL=residual is not None, RELU=relu, CHANNELS_LAST=g.channels_last,
        BLOCK_M=g.block_m, BLOCK_C=g.block_c)
    return mean, invstd


@torch.library.custom_op("engine::bn_act_fwd_triton", mutates_args=("running_mean", "running_var"))
def bn_act_fwd_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor | None,
                      running_mean: torch.Tensor | None, running_var: torch.Tensor | None, training: bool,
                      momentum: float, eps: float, relu: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    y = torch.empty_like(x)
    mean, invstd = _forward_impl(x, weight, bias, residual, running_mean, running_var,
                                 training, momentum, eps, relu, y)
    return y, mean, invstd


@bn_act_fwd_triton.register_fake
def _(x, weight, bias, residual, running_mean, running_var, training, momentum, eps, relu):
    c = x.shape[1]
    return (torch.empty_like(x), x.new_empty(c, dtype=torch.float32), x.new_empty(c, dtype=torch.float32))


@torch.library.custom_op("engine::bn_act_bwd_triton", mutates_args=())
def bn_act_bwd_triton(grad_y: torch.Tensor, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor,
                      mean: torch.Tensor, invstd: torch.Tensor, training: bool, relu: bool,
                      write_masked_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = _geometry(x)
    m, c = g.m, g.c
    f32 = dict(device=x.device, dtype=torch.float32)
    dx = torch.empty_like(x)
    gres = torch.empty_like(x) if write_masked_grad else x.new_empty(0)
    dweight, dbias = torch.zeros(c, **f32), torch.zeros(c, **f32)
    if m == 0:
        return dx, dweight, dbias, gres
    c_grid = triton.cdiv(c, g.block_c)
    psum, psumx = torch.empty(g.splits, c, **f32), torch.empty(g.splits, c, **f32)
    _bwd_reduce_kernel[(c_grid, g.splits)](grad_y, y, x, mean, gres if write_masked_grad else dx, psum, psumx,
                                           m, c, g.s, g.rows_per_split, RELU=relu, WRITE_GRES=write_masked_grad,
                                           CHANNELS_LAST=g.channels_last, BLOCK_M=g.block_m, BLOCK_C=g.block_c)
    k_g, k_x, k_0 = torch.empty(c, **f32), torch.empty(c, **f32), torch.empty(c, **f32)
    _finalize_bwd_kernel[(c_grid,)](psum, psumx, mean, invstd, weight, dweight, dbias, k_g, k_x, k_0,
                                    g.splits, c, float(m), TRAINING=training, BLOCK_C=g.block_c, BLOCK_S=g.block_s)
    # When the masked gradient is already in memory, read it instead of grad_y and y.
    _apply_bwd_kernel[(triton.cdiv(m, g.block_m), c_grid)](
        gres if write_masked_grad else grad_y, y, x, dx, k_g, k_x, k_0, m, c, g.s,
        RELU=relu, MASKED=write_masked_grad, TRAINING=training, CHANNELS_LAST=g.channels_last,
        BLOCK_M=g.block_m, BLOCK_C=g.block_c)
    return dx, dweight, dbias, gres


@bn_act_bwd_triton.register_fake
def _(grad_y, x, y, weight, mean, invstd, training, relu, write_masked_grad):
    c = x.shape[1]
    return (torch.empty_like(x), x.new_empty(c, dtype=torch.float32), x.new_empty(c, dtype=torch.float32),
            torch.empty_like(x) if write_masked_grad else x.new_empty(0))


def forward(x, weight, bias, residual, running_mean, running_var, training, momentum, eps, relu):
    return bn_act_fwd_triton(x, weight, bias, residual, running_mean, running_var, training, momentum, eps, relu)


def backward(grad_y, x, y, weight, mean, invstd, training, relu, write_masked_grad):
    return bn_act_bwd_triton(grad_y, x, y, weight, mean, invstd, training, relu, write_masked_grad)
