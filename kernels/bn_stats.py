"""Triton kernels for conv_bn's batch norms on channels_last activations: the statistics,
their finalise, the elementwise apply and the backward's reductions; the GEMMs around
them are kernels/conv_bn.py (1x1) and kernels/grouped_conv.py (3x3).

A channels_last activation [N, C, H, W] is a row-major [M, C] matrix, M = N*H*W.

Statistics partials: [2, parts, C] fp32, per part of consecutive rows its sum and its sum
of squares about its own mean. A GEMM epilogue writes one part per row tile
(store_tile_stats), so the output is never read back for its statistics; so does the
direct CUDA 3x3 (engine/ops/_cuda_grouped_conv.py); _stats_kernel writes them for a
tensor made elsewhere.

Forward (training)
    _stats_kernel      the partials of a tensor, one part per row split.
    _merge_kernel, _finalize_kernel
                       combine the partials by Chan et al.'s parallel variance (so no
                       E[x^2] - E[x]^2 cancellation), then mean, 1/std, the scale and shift
                       the next prologue applies, and the running-statistics update.
    _apply_kernel      y = relu?(x * scale + shift (+ r, or + r * r_scale + r_shift)): the
                       3x3's input, and the block tail (bn3 + downsample bn + add + ReLU).
Backward
    _bwd_reduce_kernel batch-norm backward sums (sum g, sum g * (a - mean)) of the ReLU-masked
                       gradient, the mask recomputed from the pre-norm tensor; at the tail
                       also the downsample norm's sum, and the masked gradient written (it
                       is the residual's gradient).
    _bwd_coeff_kernel  sums -> parameter gradients and the coefficients of
                       da = k_g * g + k_x * a + k_0.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import interpreter_block, store_bn_affine, update_running_stats

# Elementwise and reduction tiles on a GPU: 4096 fp32 values per program at 4 warps.
TILE_ELEMENTS = 4096
# Row chunks per channel block in a reduction.
MAX_SPLITS = 256
TARGET_PROGRAMS = 1024
# Statistics partials are merged down to at most this many before the finalise, which
# runs one program per channel block and would otherwise walk thousands of row tiles.
FINAL_PARTS = 64


def _reduce_config(m: int, c: int, device: torch.device) -> tuple[int, int, int, int]:
    """(block_m, block_c, splits, rows_per_split) for the elementwise and reduction passes."""
    if device.type != "cuda":
        # Small tiles and few splits: test shapes cover several channel blocks, several
        # splits and several row chunks per split.
        block_c, block_m, target = 16, 16, 4
    else:
        block_c = min(128, max(16, triton.next_power_of_2(c)))
        block_m, target = TILE_ELEMENTS // block_c, TARGET_PROGRAMS
    c_blocks = triton.cdiv(c, block_c)
    splits = max(1, min(MAX_SPLITS, triton.cdiv(m, block_m), triton.cdiv(target, c_blocks)))
    rows_per_split = triton.cdiv(triton.cdiv(m, splits), block_m) * block_m
    return block_m, block_c, triton.cdiv(m, rows_per_split), rows_per_split


def _final_parts(device: torch.device) -> int:
    # Two in the interpreter so that the tests go through the merge kernel too.
    return FINAL_PARTS if device.type == "cuda" else 2


@triton.jit
def store_tile_stats(
    y,                  # [BLOCK_M, N-tile] a GEMM's output tile as stored
    ok, col_ok, cols,   # the tile's mask, which of its columns exist, their indices
    PART,               # [2, tiles_m, N] fp32 out: this row tile's sum and centred sum of squares
    pid_m, M, N,
    BLOCK_M: tl.constexpr,
):
    """A GEMM epilogue's statistics partial of one row tile, taken on the stored values,
    which are what an unfused batch norm would read back."""
    yf = tl.where(ok, y.to(tl.float32), 0.0)
    count = tl.minimum(M - pid_m * BLOCK_M, BLOCK_M).to(tl.float32)
    total = tl.sum(yf, 0)
    d = tl.where(ok, yf - (total / count)[None, :], 0.0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tl.store(PART + pid_m * N + cols, total, mask=col_ok)
    tl.store(PART + (tiles_m + pid_m) * N + cols, tl.sum(d * d, 0), mask=col_ok)


@triton.jit
def _chan_merge(n, mean, m2, n_b, mean_b, m2_b):
    # (count, mean, centred sum of squares) of two disjoint sets -> of their union.
    total = n + n_b
    delta = mean_b - mean
    frac = n_b / tl.maximum(total, 1.0)
    return total, mean + delta * frac, m2 + m2_b + delta * delta * n * frac


@triton.jit
def _stats_kernel(
    X,      # [M, C]
    PART,   # [2, splits, C] fp32 out: per split, sum and centred sum of squares
    M, C, rows_per_split, splits,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    split = tl.program_id(1)
    n = tl.zeros((BLOCK_C,), tl.float32)
    mean = tl.zeros((BLOCK_C,), tl.float32)
    m2 = tl.zeros((BLOCK_C,), tl.float32)
    row_start = split * rows_per_split
    row_stop = tl.minimum(row_start + rows_per_split, M)
    for r in range(row_start, row_stop, BLOCK_M):
        rows = r + tl.arange(0, BLOCK_M)
        ok = (rows < row_stop)[:, None] & col_ok[None, :]
        x = tl.load(X + rows.to(tl.int64)[:, None] * C + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        count = tl.minimum(row_stop - r, BLOCK_M).to(tl.float32)
        chunk_mean = tl.sum(x, 0) / count
        d = tl.where(ok, x - chunk_mean[None, :], 0.0)
        n, mean, m2 = _chan_merge(n, mean, m2, count, chunk_mean, tl.sum(d * d, 0))
    tl.store(PART + split * C + cols, mean * n, mask=col_ok)
    tl.store(PART + (splits + split) * C + cols, m2, mask=col_ok)


@triton.jit
def _merge_parts(
    PART,   # [2, P, C] fp32: sum and centred sum of squares per part; part p covers rows
            # [p * rows_per_part, min((p + 1) * rows_per_part, M))
    P, first, last, rows_per_part, M, C, cols, col_ok,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    n = tl.zeros((BLOCK_C,), tl.float32)
    mean = tl.zeros((BLOCK_C,), tl.float32)
    m2 = tl.zeros((BLOCK_C,), tl.float32)
    for p0 in range(first, last, BLOCK_P):
        ps = p0 + tl.arange(0, BLOCK_P)
        p_ok = ps < last
        ok = p_ok[:, None] & col_ok[None, :]
        count = tl.where(p_ok, tl.minimum(M - ps * rows_per_part, rows_per_part), 0).to(tl.float32)
        total = tl.load(PART + ps[:, None] * C + cols[None, :], mask=ok, other=0.0)
        sq = tl.load(PART + (P + ps)[:, None] * C + cols[None, :], mask=ok, other=0.0)
        n_b = tl.sum(count, 0)
        mean_b = tl.sum(total, 0) / n_b
        d = tl.where(ok, total / tl.maximum(count, 1.0)[:, None] - mean_b[None, :], 0.0)
        m2_b = tl.sum(sq, 0) + tl.sum(count[:, None] * d * d, 0)
        n, mean, m2 = _chan_merge(n, mean, m2, n_b, mean_b, m2_b)
    return n, mean, m2


@triton.jit
def _merge_kernel(
    PART,   # [2, P, C] fp32
    OUT,    # [2, groups, C] fp32 out: the same for groups of parts_per_group consecutive parts
    P, groups, parts_per_group, rows_per_part, M, C,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    group = tl.program_id(1)
    first = group * parts_per_group
    n, mean, m2 = _merge_parts(PART, P, first, tl.minimum(first + parts_per_group, P), rows_per_part, M, C,
                               cols, col_ok, BLOCK_P, BLOCK_C)
    tl.store(OUT + group * C + cols, mean * n, mask=col_ok)
    tl.store(OUT + (groups + group) * C + cols, m2, mask=col_ok)


@triton.jit
def _finalize_kernel(
    PART,               # [2, P, C] fp32
    BN_W, BN_B,         # [C]
    RMEAN, RVAR,        # [C], updated in place (HAS_RUNNING)
    MEAN, INVSTD,       # [C] fp32 out
    SCALE, SHIFT,       # [C] fp32 out: bn(a) = a * SCALE + SHIFT
    P, rows_per_part, M, C, momentum, eps,
    HAS_RUNNING: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    ok = cols < C
    n, mean, m2 = _merge_parts(PART, P, 0, P, rows_per_part, M, C, cols, ok, BLOCK_P, BLOCK_C)
    if HAS_RUNNING:
        update_running_stats(RMEAN, RVAR, cols, ok, mean, m2 / tl.maximum(n - 1.0, 1.0), momentum)
    store_bn_affine(BN_W, BN_B, MEAN, INVSTD, SCALE, SHIFT, cols, ok, mean, m2 / n, eps)


@triton.jit
def _apply_kernel(
    X,                  # [M, C]
    SCALE, SHIFT,       # [C] fp32
    R,                  # [M, C] added before the ReLU (HAS_RES)
    R_SCALE, R_SHIFT,   # [C] fp32: R's own per-channel affine (RES_AFFINE)
    Y,                  # [M, C] out
    M, C,
    HAS_RES: tl.constexpr, RES_AFFINE: tl.constexpr, RELU: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    ok = (rows < M)[:, None] & col_ok[None, :]
    offs = rows.to(tl.int64)[:, None] * C + cols[None, :]
    x = tl.load(X + offs, mask=ok, other=0.0).to(tl.float32)
    y = x * tl.load(SCALE + cols, mask=col_ok, other=0.0)[None, :] + tl.load(SHIFT + cols, mask=col_ok,
                                                                             other=0.0)[None, :]
    if HAS_RES:
        r = tl.load(R + offs, mask=ok, other=0.0).to(tl.float32)
        if RES_AFFINE:
            r = r * tl.load(R_SCALE + cols, mask=col_ok, other=0.0)[None, :] + tl.load(
                R_SHIFT + cols, mask=col_ok, other=0.0)[None, :]
        y += r
    if RELU:
        y = tl.maximum(y, 0.0)
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=ok)


@triton.jit
def _bwd_reduce_kernel(
    G,                  # [M, C] gradient of relu(bn(A) (+ residual))
    A,                  # [M, C] the batch norm's input
    SCALE, SHIFT, MEAN, # [C] fp32: that batch norm
    R,                  # [M, C] residual added before the ReLU (HAS_RES)
    R_SCALE, R_SHIFT, R_MEAN,  # [C] fp32: the residual's own batch norm (RES_BN)
    GM,                 # [M, C] out: the ReLU-masked gradient (WRITE_MASKED)
    PART,               # [2 (3 with RES_BN), splits, C] fp32 out: sum g', sum g' (A - mean), sum g' (R - r_mean)
    M, C, rows_per_split, splits,
    HAS_RES: tl.constexpr, RES_BN: tl.constexpr, WRITE_MASKED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    split = tl.program_id(1)
    scale = tl.load(SCALE + cols, mask=col_ok, other=0.0)
    shift = tl.load(SHIFT + cols, mask=col_ok, other=0.0)
    mean = tl.load(MEAN + cols, mask=col_ok, other=0.0)
    if RES_BN:
        r_scale = tl.load(R_SCALE + cols, mask=col_ok, other=0.0)
        r_shift = tl.load(R_SHIFT + cols, mask=col_ok, other=0.0)
        r_mean = tl.load(R_MEAN + cols, mask=col_ok, other=0.0)
    # Reduced chunk by chunk: three [BLOCK_M, BLOCK_C] fp32 accumulators would not fit in registers.
    acc_g = tl.zeros((BLOCK_C,), tl.float32)
    acc_ga = tl.zeros((BLOCK_C,), tl.float32)
    acc_gr = tl.zeros((BLOCK_C,), tl.float32)
    row_start = split * rows_per_split
    row_stop = tl.minimum(row_start + rows_per_split, M)
    for r0 in range(row_start, row_stop, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        ok = (rows < row_stop)[:, None] & col_ok[None, :]
        offs = rows.to(tl.int64)[:, None] * C + cols[None, :]
        g = tl.load(G + offs, mask=ok, other=0.0).to(tl.float32)
        a = tl.load(A + offs, mask=ok, other=0.0).to(tl.float32)
        y = a * scale[None, :] + shift[None, :]
        if HAS_RES:
            r = tl.load(R + offs, mask=ok, other=0.0).to(tl.float32)
            if RES_BN:
                y += r * r_scale[None, :] + r_shift[None, :]
            else:
                y += r
        g = tl.where(ok & (y > 0.0), g, 0.0)
        if WRITE_MASKED:
            tl.store(GM + offs, g.to(GM.dtype.element_ty), mask=ok)
        acc_g += tl.sum(g, 0)
        acc_ga += tl.sum(g * (a - mean[None, :]), 0)
        if RES_BN:
            acc_gr += tl.sum(g * (r - r_mean[None, :]), 0)
    tl.store(PART + split * C + cols, acc_g, mask=col_ok)
    tl.store(PART + (splits + split) * C + cols, acc_ga, mask=col_ok)
    if RES_BN:
        tl.store(PART + (2 * splits + split) * C + cols, acc_gr, mask=col_ok)


@triton.jit
def _bwd_coeff_kernel(
    SUM_G, SUM_GA,      # [C] fp32: sum g', sum g' * (a - mean)
    MEAN, INVSTD,       # [C] fp32
    BN_W,               # [C]
    DW, DB,             # [C] fp32 out
    K_G, K_X, K_0,      # [C] fp32 out: da = g' * K_G + a * K_X + K_0
    C, M,
    BLOCK_C: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    ok = cols < C
    sum_g = tl.load(SUM_G + cols, mask=ok, other=0.0)
    invstd = tl.load(INVSTD + cols, mask=ok, other=0.0)
    sum_g_xhat = tl.load(SUM_GA + cols, mask=ok, other=0.0) * invstd
    k_g = tl.load(BN_W + cols, mask=ok, other=0.0).to(tl.float32) * invstd
    # da = k_g * (g' - sum g' / M - xhat * sum(g' xhat) / M), xhat = (a - mean) * invstd
    k_x = -k_g * invstd * sum_g_xhat / M
    tl.store(DW + cols, sum_g_xhat, mask=ok)
    tl.store(DB + cols, sum_g, mask=ok)
    tl.store(K_G + cols, k_g, mask=ok)
    tl.store(K_X + cols, k_x, mask=ok)
    tl.store(K_0 + cols, -k_g * sum_g / M - k_x * tl.load(MEAN + cols, mask=ok, other=0.0), mask=ok)


def finalize(part, rows_per_part, m, bn_weight, bn_bias, running_mean, running_var, momentum, eps):
    """A batch norm's training statistics from partials ([2, parts, C], each part
    rows_per_part rows of m, the last one ragged): mean, invstd, scale, shift (fp32 [C]);
    running_mean and running_var, when given, updated in place."""
    c = part.shape[2]
    f32 = dict(device=part.device, dtype=torch.float32)
    on_gpu = part.device.type == "cuda"
    block_c, block_p = (32, 64) if on_gpu else (interpreter_block(c), 4)
    c_grid = triton.cdiv(c, block_c)
    parts = part.shape[1]
    final = _final_parts(part.device)
    if parts > final:
        per_group = triton.cdiv(parts, final)
        groups = triton.cdiv(parts, per_group)
        merged = torch.empty(2, groups, c, **f32)
        _merge_kernel[(c_grid, groups)](part, merged, parts, groups, per_group, rows_per_part, m, c,
                                        BLOCK_P=block_p, BLOCK_C=block_c)
        part, parts, rows_per_part = merged, groups, per_group * rows_per_part
    mean, invstd, scale, shift = (torch.empty(c, **f32) for _ in range(4))
    has_running = running_mean is not None
    _finalize_kernel[(c_grid,)](part, bn_weight, bn_bias, running_mean if has_running else mean,
                                running_var if has_running else mean, mean, invstd, scale, shift,
                                parts, rows_per_part, m, c, momentum, eps,
                                HAS_RUNNING=has_running, BLOCK_P=block_p, BLOCK_C=block_c)
    return mean, invstd, scale, shift


@torch.library.custom_op("engine::conv_bn_stats_triton", mutates_args=("running_mean", "running_var"))
def conv_bn_stats_triton(x: torch.Tensor, bn_weight: torch.Tensor, bn_bias: torch.Tensor,
                         running_mean: torch.Tensor | None, running_var: torch.Tensor | None, momentum: float,
                         eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training batch-norm statistics of channels_last x: mean, invstd, scale, shift."""
    n, c, h, w = x.shape
    m = n * h * w
    block_m, block_c, splits, rows_per_split = _reduce_config(m, c, x.device)
    part = torch.empty(2, splits, c, device=x.device, dtype=torch.float32)
    _stats_kernel[(triton.cdiv(c, block_c), splits)](x, part, m, c, rows_per_split, splits,
                                                    BLOCK_M=block_m, BLOCK_C=block_c)
    return finalize(part, rows_per_split, m, bn_weight, bn_bias, running_mean, running_var, momentum, eps)


@conv_bn_stats_triton.register_fake
def _(x, bn_weight, bn_bias, running_mean, running_var, momentum, eps):
    return tuple(x.new_empty(x.shape[1], dtype=torch.float32) for _ in range(4))


@torch.library.custom_op("engine::conv_bn_apply_triton", mutates_args=())
def conv_bn_apply_triton(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, residual: torch.Tensor | None,
                         res_scale: torch.Tensor | None, res_shift: torch.Tensor | None,
                         relu: bool) -> torch.Tensor:
    """relu?(x * scale + shift + (residual * res_scale + res_shift, or residual)), channels_last."""
    n, c, h, w = x.shape
    m = n * h * w
    y = torch.empty_like(x, memory_format=torch.channels_last)
    block_m, block_c, _, _ = _reduce_config(m, c, x.device)
    _apply_kernel[(triton.cdiv(m, block_m), triton.cdiv(c, block_c))](
        x, scale, shift, residual if residual is not None else x, res_scale if res_scale is not None else scale,
        res_shift if res_shift is not None else shift, y, m, c,
        HAS_RES=residual is not None, RES_AFFINE=res_scale is not None, RELU=relu, BLOCK_M=block_m, BLOCK_C=block_c)
    return y


@conv_bn_apply_triton.register_fake
def _(x, scale, shift, residual, res_scale, res_shift, relu):
    return torch.empty_like(x, memory_format=torch.channels_last)


@torch.library.custom_op("engine::conv_bn_bwd_reduce_triton", mutates_args=())
def conv_bn_bwd_reduce_triton(grad: torch.Tensor, a: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                              mean: torch.Tensor, residual: torch.Tensor | None, res_scale: torch.Tensor | None,
                              res_shift: torch.Tensor | None, res_mean: torch.Tensor | None,
                              write_masked: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """For y = relu(a * scale + shift (+ residual, or + residual * res_scale + res_shift)),
    g' = grad masked by y > 0: returns (g' when write_masked else empty, sums) with sums
    fp32 [2, C] = (sum g', sum g' (a - mean)), and a third row sum g' (residual - res_mean)
    when the residual has its own batch norm."""
    n, c, h, w = a.shape
    m = n * h * w
    block_m, block_c, splits, rows_per_split = _reduce_config(m, c, a.device)
    res_bn = res_scale is not None
    part = torch.empty(3 if res_bn else 2, splits, c, device=a.device, dtype=torch.float32)
    masked = torch.empty_like(a, memory_format=torch.channels_last) if write_masked else a.new_empty(0)
    _bwd_reduce_kernel[(triton.cdiv(c, block_c), splits)](
        grad, a, scale, shift, mean, residual if residual is not None else a,
        res_scale if res_bn else scale, res_shift if res_bn else shift, res_mean if res_bn else mean,
        masked if write_masked else a, part, m, c, rows_per_split, splits,
        HAS_RES=residual is not None, RES_BN=res_bn, WRITE_MASKED=write_masked, BLOCK_M=block_m, BLOCK_C=block_c)
    return masked, part.sum(1)


@conv_bn_bwd_reduce_triton.register_fake
def _(grad, a, scale, shift, mean, residual, res_scale, res_shift, res_mean, write_masked):
    masked = torch.empty_like(a, memory_format=torch.channels_last) if write_masked else a.new_empty(0)
    return masked, a.new_empty(3 if res_scale is not None else 2, a.shape[1], dtype=torch.float32)


@torch.library.custom_op("engine::conv_bn_bwd_coeff_triton", mutates_args=())
def conv_bn_bwd_coeff_triton(sum_g: torch.Tensor, sum_ga: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor,
                             bn_weight: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                          torch.Tensor, torch.Tensor]:
    """Training batch-norm backward from its sums over `count` values per channel:
    dweight, dbias, and k_g, k_x, k_0 with da = g' * k_g + a * k_x + k_0 (all fp32 [C])."""
    c = mean.shape[0]
    dweight, dbias, k_g, k_x, k_0 = (torch.empty(c, device=mean.device, dtype=torch.float32) for _ in range(5))
    block_c = min(1024, max(16, triton.next_power_of_2(c)))
    _bwd_coeff_kernel[(triton.cdiv(c, block_c),)](sum_g, sum_ga, mean, invstd, bn_weight, dweight, dbias,
                                                 k_g, k_x, k_0, c, float(count), BLOCK_C=block_c)
    return dweight, dbias, k_g, k_x, k_0


@conv_bn_bwd_coeff_triton.register_fake
def _(sum_g, sum_ga, mean, invstd, bn_weight, count):
    return tuple(torch.empty_like(mean) for _ in range(5))
