"""Triton kernels for conv_bn: the 1x1 convolutions of a ResNeXt bottleneck as NHWC
GEMMs with the batch norms fused into their prologues and epilogues, and the few
passes the grouped 3x3 convolution (a cuDNN call) still needs around it.

A channels_last activation [N, C, H, W] is a row-major [M, C] matrix with M = N*H*W,
so a 1x1 convolution with weight [Cout, Cin] is Y[M, Cout] = X[M, Cin] W^T; with stride
2 its rows of X are gathered from every other pixel of every other image row. Below, M
is rows, N the convolution's output channels and K its input channels.

Forward (training)
    _fwd_kernel        Y = prologue(X) W^T. The prologue applies the previous batch norm
                       (per-channel scale and shift) and the ReLU to each X tile as it is
                       loaded, so the normalised activation is never written; the epilogue
                       reduces each output tile to per-channel fp32 partials (sum, sum of
                       squares about the tile's mean) of the values as stored.
    _stats_kernel      the same partials for a tensor made elsewhere (the 3x3 output).
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
    _dgrad_kernel      dX = prologue(G) W: the prologue computes da tile by tile from the
                       gradient and the pre-norm output (batch-norm and ReLU backward in
                       the load); the epilogue applies the ReLU mask of the input's own
                       batch norm and reduces its backward sums, or adds the shortcut's
                       gradient (scattered onto the stride grid for a stride-2 shortcut).
    _wgrad_kernel      dW = prologue(G)^T prologue(X): da and the normalised input are both
                       recomputed on load instead of stored; rows split into fp32 partials.
Inference
    _fold_kernel       batch norm folded into weight and bias; _fwd_kernel then adds the
                       bias (+ residual) and applies the ReLU in its epilogue.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Elementwise and reduction tiles on a GPU: 4096 fp32 values per program at 4 warps.
TILE_ELEMENTS = 4096
# Row chunks per channel block in a reduction (as kernels/bn_act.py).
MAX_SPLITS = 256
TARGET_PROGRAMS = 1024
# Statistics partials are merged down to at most this many before the finalise, which
# runs one program per channel block and would otherwise walk thousands of row tiles.
FINAL_PARTS = 64
# Programs per SM the weight-gradient split aims for.
WGRAD_PROGRAMS_PER_SM = 2


def _gemm_config(dtype: torch.dtype, device: torch.device, prologue_operands: int = 1) -> dict:
    """Tiles of a GEMM whose first operand is computed from `prologue_operands` loaded
    tiles (the backward's da needs both the gradient and the pre-norm output)."""
    if device.type != "cuda":
        # The interpreter is for tests: 16 (tl.dot's minimum) on every axis, so small test
        # shapes span several tiles and leave ragged edges.
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, num_warps=4, num_stages=1)
    if dtype == torch.float32:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=2)
    # 128 x 128 output tiles with 64-deep operand slices, triple-buffered: the usual
    # Hopper bf16 starting point. Unmeasured here (no GPU); autotuning is part 2's.
    # With two tiles loaded behind da, 3 stages need 248,832-250,880 B of shared memory in
    # the data gradient, over sm_90's 232,448 per block, and 212,992-221,184 B in the weight
    # gradient, within 5% of it; 2 stages need 165-166 KB and 131-139 KB
    # (benchmarks/compile_gate.py). What the third stage would have bought is unmeasured.
    stages = 3 if prologue_operands == 1 else 2
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=stages)


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


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs get true fp32 products, as on the CPU interpreter; tf32 would not match.
    return "ieee" if dtype == torch.float32 else "tf32"


@triton.jit
def _input_rows(rows, H, W, Wo, HWo, STRIDE: tl.constexpr):
    # Output pixel -> the input pixel a 1x1 convolution with this stride reads.
    rows = rows.to(tl.int64)
    if STRIDE == 1:
        return rows
    image = rows // HWo
    pixel = rows - image * HWo
    oh = pixel // Wo
    ow = pixel - oh * Wo
    return (image * H + oh * STRIDE) * W + ow * STRIDE


@triton.jit
def _normalised_tile(
    X,              # [rows of the input, K]
    x_rows, row_ok, ks, K,
    SCALE, SHIFT,   # [K] fp32 (used when BN_RELU)
    BN_RELU: tl.constexpr,
):
    k_ok = ks < K
    ok = row_ok[:, None] & k_ok[None, :]
    x = tl.load(X + x_rows[:, None] * K + ks[None, :], mask=ok, other=0.0)
    if BN_RELU:
        scale = tl.load(SCALE + ks, mask=k_ok, other=0.0)
        shift = tl.load(SHIFT + ks, mask=k_ok, other=0.0)
        h = tl.maximum(x.to(tl.float32) * scale[None, :] + shift[None, :], 0.0)
        # Padding rows would hold relu(shift); rounded to the storage dtype, as the unfused
        # normalised activation would be.
        x = tl.where(ok, h, 0.0).to(X.dtype.element_ty)
    return x


@triton.jit
def _bn_grad_tile(
    G,                  # [M, C] gradient of the batch norm's output (of its ReLU when RELU_MASK)
    A,                  # [M, C] the batch norm's input
    rows, row_ok, cs, C,
    K_G, K_X, K_0,      # [C] fp32: da = k_g * g + k_x * a + k_0
    SCALE, SHIFT,       # [C] fp32: the batch norm, to recompute the ReLU mask (RELU_MASK)
    RELU_MASK: tl.constexpr,
):
    c_ok = cs < C
    ok = row_ok[:, None] & c_ok[None, :]
    offs = rows.to(tl.int64)[:, None] * C + cs[None, :]
    g = tl.load(G + offs, mask=ok, other=0.0).to(tl.float32)
    a = tl.load(A + offs, mask=ok, other=0.0).to(tl.float32)
    if RELU_MASK:
        scale = tl.load(SCALE + cs, mask=c_ok, other=0.0)
        shift = tl.load(SHIFT + cs, mask=c_ok, other=0.0)
        g = tl.where(a * scale[None, :] + shift[None, :] > 0.0, g, 0.0)
    k_g = tl.load(K_G + cs, mask=c_ok, other=0.0)
    k_x = tl.load(K_X + cs, mask=c_ok, other=0.0)
    k_0 = tl.load(K_0 + cs, mask=c_ok, other=0.0)
    da = g * k_g[None, :] + a * k_x[None, :] + k_0[None, :]
    # k_0 would otherwise leak into padding rows, which the dot products sum over.
    return tl.where(ok, da, 0.0).to(G.dtype.element_ty)


@triton.jit
def _store_tile_stats(y, ok, col_ok, cols, PART, pid_m, M, N, BLOCK_M: tl.constexpr):
    """A GEMM epilogue's per-channel statistics partials of one row tile: the sum and the
    sum of squares about the tile's own mean (merged later with Chan's formula), taken on
    the stored values, which are what an unfused batch norm would read back."""
    yf = tl.where(ok, y.to(tl.float32), 0.0)
    count = tl.minimum(M - pid_m * BLOCK_M, BLOCK_M).to(tl.float32)
    total = tl.sum(yf, 0)
    d = tl.where(ok, yf - (total / count)[None, :], 0.0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tl.store(PART + pid_m * N + cols, total, mask=col_ok)
    tl.store(PART + (tiles_m + pid_m) * N + cols, tl.sum(d * d, 0), mask=col_ok)


@triton.jit
def _fwd_kernel(
    X,                  # [rows of the input, K] NHWC input
    WT,                 # [N, K] weight
    IN_SCALE, IN_SHIFT, # [K] fp32: the input's batch norm, applied with a ReLU (IN_BN_RELU)
    BIAS,               # [N] fp32 (HAS_BIAS)
    RES,                # [M, N] added before the ReLU (HAS_RES)
    Y,                  # [M, N] out
    PART,               # [2, tiles_m, N] fp32 out: per row tile, sum and centred sum of squares of Y (STATS)
    M, N, K, H, W, Wo, HWo,
    STRIDE: tl.constexpr, IN_BN_RELU: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
    RELU: tl.constexpr, STATS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    tiles_n = tl.cdiv(N, BLOCK_N)
    # Consecutive programs share a row tile, so each X tile comes from HBM about once.
    pid_m = pid // tiles_n
    pid_n = pid - pid_m * tiles_n
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    x_rows = _input_rows(rows, H, W, Wo, HWo, STRIDE)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = _normalised_tile(X, x_rows, row_ok, ks, K, IN_SCALE, IN_SHIFT, IN_BN_RELU)
        w = tl.load(WT + cols.to(tl.int64)[None, :] * K + ks[:, None],
                    mask=col_ok[None, :] & (ks < K)[:, None], other=0.0)
        acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)
    ok = row_ok[:, None] & col_ok[None, :]
    offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
    if HAS_BIAS:
        acc += tl.load(BIAS + cols, mask=col_ok, other=0.0)[None, :]
    if HAS_RES:
        acc += tl.load(RES + offs, mask=ok, other=0.0).to(tl.float32)
    if RELU:
        acc = tl.maximum(acc, 0.0)
    y = acc.to(Y.dtype.element_ty)
    tl.store(Y + offs, y, mask=ok)
    if STATS:
        _store_tile_stats(y, ok, col_ok, cols, PART, pid_m, M, N, BLOCK_M)


@triton.jit
def _dgrad_kernel(
    G,                  # [M, N] gradient at the convolution's batch norm (at its ReLU when G_RELU)
    A,                  # [M, N] the convolution's output (its batch norm's input)
    K_G, K_X, K_0,      # [N] fp32 batch-norm backward coefficients
    G_SCALE, G_SHIFT,   # [N] fp32: that batch norm, for the ReLU mask (G_RELU)
    WT,                 # [N, K] weight
    XIN,                # [M, K] the convolution's input before its batch norm (IN_BN_RELU)
    IN_SCALE, IN_SHIFT, IN_MEAN,  # [K] fp32: the input's batch norm (IN_BN_RELU)
    RES,                # [rows of the shortcut output, K] gradient added to dX (HAS_RES)
    DX,                 # [M, K] out
    PART,               # [2, tiles_m, K] fp32 out: sum g', sum g' * (XIN - mean) of the masked dX (IN_BN_RELU)
    M, N, K, H, W, Wo, HWo,
    G_RELU: tl.constexpr, IN_BN_RELU: tl.constexpr, HAS_RES: tl.constexpr, RES_STRIDE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    tiles_k = tl.cdiv(K, BLOCK_K)
    pid_m = pid // tiles_k
    pid_k = pid - pid_m * tiles_k
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = ks < K
    acc = tl.zeros((BLOCK_M, BLOCK_K), tl.float32)
    for n0 in range(0, N, BLOCK_N):
        ns = n0 + tl.arange(0, BLOCK_N)
        da = _bn_grad_tile(G, A, rows, row_ok, ns, N, K_G, K_X, K_0, G_SCALE, G_SHIFT, G_RELU)
        w = tl.load(WT + ns.to(tl.int64)[:, None] * K + ks[None, :], mask=(ns < N)[:, None] & k_ok[None, :],
                    other=0.0)
        acc = tl.dot(da, w, acc, input_precision=DOT_PRECISION)
    ok = row_ok[:, None] & k_ok[None, :]
    offs = rows.to(tl.int64)[:, None] * K + ks[None, :]
    if IN_BN_RELU:
        xin = tl.load(XIN + offs, mask=ok, other=0.0).to(tl.float32)
        in_scale = tl.load(IN_SCALE + ks, mask=k_ok, other=0.0)
        in_shift = tl.load(IN_SHIFT + ks, mask=k_ok, other=0.0)
        acc = tl.where(xin * in_scale[None, :] + in_shift[None, :] > 0.0, acc, 0.0)
    if HAS_RES:
        if RES_STRIDE == 1:
            acc += tl.load(RES + offs, mask=ok, other=0.0).to(tl.float32)
        else:
            # Only pixels on the stride grid fed the shortcut convolution.
            r = rows.to(tl.int64)
            hw = H * W
            image = r // hw
            h = (r - image * hw) // W
            w_ = r - image * hw - h * W
            on_grid = (h % RES_STRIDE == 0) & (w_ % RES_STRIDE == 0)
            res_rows = image * HWo + (h // RES_STRIDE) * Wo + w_ // RES_STRIDE
            acc += tl.load(RES + res_rows[:, None] * K + ks[None, :], mask=ok & on_grid[:, None],
                           other=0.0).to(tl.float32)
    dx = acc.to(DX.dtype.element_ty)
    tl.store(DX + offs, dx, mask=ok)
    if IN_BN_RELU:
        in_mean = tl.load(IN_MEAN + ks, mask=k_ok, other=0.0)
        g = tl.where(ok, dx.to(tl.float32), 0.0)
        tiles_m = tl.cdiv(M, BLOCK_M)
        tl.store(PART + pid_m * K + ks, tl.sum(g, 0), mask=k_ok)
        tl.store(PART + (tiles_m + pid_m) * K + ks, tl.sum(g * (xin - in_mean[None, :]), 0), mask=k_ok)


@triton.jit
def _wgrad_kernel(
    G, A, K_G, K_X, K_0, G_SCALE, G_SHIFT,   # as in _dgrad_kernel
    X,                  # [rows of the input, K] the convolution's input (before its batch norm when IN_BN_RELU)
    IN_SCALE, IN_SHIFT, # [K] fp32: the input's batch norm (IN_BN_RELU)
    PART,               # [splits, N, K] fp32 out: dW over each split's rows
    M, N, K, H, W, Wo, HWo, rows_per_split,
    STRIDE: tl.constexpr, G_RELU: tl.constexpr, IN_BN_RELU: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    tiles_k = tl.cdiv(K, BLOCK_K)
    pid_n = pid // tiles_k
    pid_k = pid - pid_n * tiles_k
    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    row_start = split * rows_per_split
    row_stop = tl.minimum(row_start + rows_per_split, M)
    for r in range(row_start, row_stop, BLOCK_M):
        rows = r + tl.arange(0, BLOCK_M)
        row_ok = rows < row_stop
        da = _bn_grad_tile(G, A, rows, row_ok, ns, N, K_G, K_X, K_0, G_SCALE, G_SHIFT, G_RELU)
        x = _normalised_tile(X, _input_rows(rows, H, W, Wo, HWo, STRIDE), row_ok, ks, K,
                             IN_SCALE, IN_SHIFT, IN_BN_RELU)
        acc = tl.dot(tl.trans(da), x, acc, input_precision=DOT_PRECISION)
    ok = (ns < N)[:, None] & (ks < K)[None, :]
    tl.store(PART + split.to(tl.int64) * N * K + ns[:, None] * K + ks[None, :], acc, mask=ok)


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
    var = m2 / n
    invstd = 1.0 / tl.sqrt(var + eps)
    if HAS_RUNNING:
        rm = tl.load(RMEAN + cols, mask=ok, other=0.0).to(tl.float32)
        rv = tl.load(RVAR + cols, mask=ok, other=0.0).to(tl.float32)
        unbiased = m2 / tl.maximum(n - 1.0, 1.0)
        tl.store(RMEAN + cols, ((1.0 - momentum) * rm + momentum * mean).to(RMEAN.dtype.element_ty), mask=ok)
        tl.store(RVAR + cols, ((1.0 - momentum) * rv + momentum * unbiased).to(RVAR.dtype.element_ty), mask=ok)
    scale = tl.load(BN_W + cols, mask=ok, other=0.0).to(tl.float32) * invstd
    tl.store(MEAN + cols, mean, mask=ok)
    tl.store(INVSTD + cols, invstd, mask=ok)
    tl.store(SCALE + cols, scale, mask=ok)
    tl.store(SHIFT + cols, tl.load(BN_B + cols, mask=ok, other=0.0).to(tl.float32) - mean * scale, mask=ok)


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


@triton.jit
def _fold_kernel(
    W,                  # [Cout, L] a convolution's weight, flattened
    BN_W, BN_B, RMEAN, RVAR,  # [Cout]
    WOUT,               # [Cout, L] out: W * gamma / sqrt(running_var + eps)
    BOUT,               # [Cout] fp32 out: beta - running_mean * gamma / sqrt(running_var + eps)
    L, eps,
    BLOCK_L: tl.constexpr,
):
    row = tl.program_id(0)
    scale = tl.load(BN_W + row).to(tl.float32) / tl.sqrt(tl.load(RVAR + row).to(tl.float32) + eps)
    tl.store(BOUT + row, tl.load(BN_B + row).to(tl.float32) - tl.load(RMEAN + row).to(tl.float32) * scale)
    base = row.to(tl.int64) * L
    for l0 in range(0, L, BLOCK_L):
        ls = l0 + tl.arange(0, BLOCK_L)
        ok = ls < L
        w = tl.load(W + base + ls, mask=ok, other=0.0).to(tl.float32)
        tl.store(WOUT + base + ls, (w * scale).to(WOUT.dtype.element_ty), mask=ok)


def _nhwc_empty(n: int, c: int, h: int, w: int, like: torch.Tensor) -> torch.Tensor:
    return torch.empty((n, c, h, w), device=like.device, dtype=like.dtype, memory_format=torch.channels_last)


def _strided_size(size: int, stride: int) -> int:
    return (size - 1) // stride + 1


def _finalize(part, rows_per_part, m, bn_weight, bn_bias, running_mean, running_var, momentum, eps):
    c = part.shape[2]
    f32 = dict(device=part.device, dtype=torch.float32)
    on_gpu = part.device.type == "cuda"
    block_c, block_p = (32, 64) if on_gpu else (16, 4)
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


@torch.library.custom_op("engine::conv_bn_fwd_triton", mutates_args=("running_mean", "running_var"))
def conv_bn_fwd_triton(x: torch.Tensor, weight: torch.Tensor, in_scale: torch.Tensor | None,
                       in_shift: torch.Tensor | None, bias: torch.Tensor | None, residual: torch.Tensor | None,
                       stride: int, relu: bool, bn_weight: torch.Tensor | None, bn_bias: torch.Tensor | None,
                       running_mean: torch.Tensor | None, running_var: torch.Tensor | None, momentum: float,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """y = relu?(conv1x1(relu(x * in_scale + in_shift) or x, weight, stride) + bias? + residual?)
    for channels_last x [N, K, H, W] and weight [N_out, K] in x's dtype. With bn_weight
    given, also this output's batch-norm statistics (training): returns y, mean, invstd,
    scale, shift (the last four fp32 [N_out]; empty without bn_weight)."""
    n, k, h, w = x.shape
    n_out = weight.shape[0]
    ho, wo = _strided_size(h, stride), _strided_size(w, stride)
    m = n * ho * wo
    y = _nhwc_empty(n, n_out, ho, wo, x)
    cfg = _gemm_config(x.dtype, x.device)
    tiles_m = triton.cdiv(m, cfg["BLOCK_M"])
    stats = bn_weight is not None
    part = torch.empty(2, tiles_m, n_out, device=x.device, dtype=torch.float32) if stats else y
    _fwd_kernel[(tiles_m * triton.cdiv(n_out, cfg["BLOCK_N"]),)](
        x, weight, in_scale if in_scale is not None else y, in_shift if in_shift is not None else y,
        bias if bias is not None else y, residual if residual is not None else y, y, part,
        m, n_out, k, h, w, wo, ho * wo,
        STRIDE=stride, IN_BN_RELU=in_scale is not None, HAS_BIAS=bias is not None, HAS_RES=residual is not None,
        RELU=relu, STATS=stats, DOT_PRECISION=_dot_precision(x.dtype), **cfg)
    if not stats:
        return (y, *(x.new_empty(0, dtype=torch.float32) for _ in range(4)))
    return (y, *_finalize(part, cfg["BLOCK_M"], m, bn_weight, bn_bias, running_mean, running_var, momentum, eps))


@conv_bn_fwd_triton.register_fake
def _(x, weight, in_scale, in_shift, bias, residual, stride, relu, bn_weight, bn_bias, running_mean, running_var,
      momentum, eps):
    n, _, h, w = x.shape
    n_out = weight.shape[0]
    y = _nhwc_empty(n, n_out, _strided_size(h, stride), _strided_size(w, stride), x)
    c = n_out if bn_weight is not None else 0
    return (y, *(x.new_empty(c, dtype=torch.float32) for _ in range(4)))


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
    return _finalize(part, rows_per_split, m, bn_weight, bn_bias, running_mean, running_var, momentum, eps)


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


@torch.library.custom_op("engine::conv_bn_dgrad_triton", mutates_args=())
def conv_bn_dgrad_triton(grad: torch.Tensor, a: torch.Tensor, k_g: torch.Tensor, k_x: torch.Tensor,
                         k_0: torch.Tensor, g_scale: torch.Tensor | None, g_shift: torch.Tensor | None,
                         weight: torch.Tensor, x_in: torch.Tensor | None, in_scale: torch.Tensor | None,
                         in_shift: torch.Tensor | None, in_mean: torch.Tensor | None, residual: torch.Tensor | None,
                         residual_stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Input gradient of a 1x1 convolution (stride 1 rows) followed by a training batch norm:
    dx = da @ weight, da = k_g * g' + k_x * a + k_0, g' = grad masked by relu(a * g_scale +
    g_shift) > 0 when g_scale is given, else grad. With x_in (the input before its own batch
    norm in_scale/in_shift + ReLU), dx is masked by that ReLU and the sums (sum dx, sum
    dx (x_in - in_mean)) [2, K] come back too; with residual, it is added (from every
    residual_stride-th pixel's row of a stride-2 shortcut's input gradient)."""
    n, n_out, h, w = a.shape
    k = weight.shape[1]
    m = n * h * w
    dx = _nhwc_empty(n, k, h, w, grad)
    cfg = _gemm_config(grad.dtype, grad.device, prologue_operands=2)
    tiles_m = triton.cdiv(m, cfg["BLOCK_M"])
    has_in = x_in is not None
    part = torch.empty(2, tiles_m, k, device=a.device, dtype=torch.float32) if has_in else dx
    ho, wo = (residual.shape[2], residual.shape[3]) if residual is not None else (h, w)
    _dgrad_kernel[(tiles_m * triton.cdiv(k, cfg["BLOCK_K"]),)](
        grad, a, k_g, k_x, k_0, g_scale if g_scale is not None else k_g, g_shift if g_shift is not None else k_g,
        weight, x_in if has_in else dx, in_scale if has_in else k_g, in_shift if has_in else k_g,
        in_mean if has_in else k_g, residual if residual is not None else dx, dx, part,
        m, n_out, k, h, w, wo, ho * wo,
        G_RELU=g_scale is not None, IN_BN_RELU=has_in, HAS_RES=residual is not None, RES_STRIDE=residual_stride,
        DOT_PRECISION=_dot_precision(grad.dtype), **cfg)
    return dx, part.sum(1) if has_in else a.new_empty(0, dtype=torch.float32)


@conv_bn_dgrad_triton.register_fake
def _(grad, a, k_g, k_x, k_0, g_scale, g_shift, weight, x_in, in_scale, in_shift, in_mean, residual,
      residual_stride):
    n, _, h, w = a.shape
    k = weight.shape[1]
    sums = a.new_empty((2, k) if x_in is not None else (0,), dtype=torch.float32)
    return _nhwc_empty(n, k, h, w, grad), sums


@torch.library.custom_op("engine::conv_bn_wgrad_triton", mutates_args=())
def conv_bn_wgrad_triton(grad: torch.Tensor, a: torch.Tensor, k_g: torch.Tensor, k_x: torch.Tensor,
                         k_0: torch.Tensor, g_scale: torch.Tensor | None, g_shift: torch.Tensor | None,
                         x: torch.Tensor, in_scale: torch.Tensor | None, in_shift: torch.Tensor | None,
                         stride: int) -> torch.Tensor:
    """Weight gradient [N_out, K] (fp32) of a 1x1 convolution of x (normalised and ReLU'd
    on load when in_scale is given), da as in conv_bn_dgrad_triton."""
    n, n_out, ho, wo = a.shape
    _, k, h, w = x.shape
    m = n * ho * wo
    cfg = _gemm_config(grad.dtype, grad.device, prologue_operands=2)
    tiles = triton.cdiv(n_out, cfg["BLOCK_N"]) * triton.cdiv(k, cfg["BLOCK_K"])
    tiles_m = triton.cdiv(m, cfg["BLOCK_M"])
    if grad.device.type == "cuda":
        sms = torch.cuda.get_device_properties(grad.device).multi_processor_count
        splits = min(tiles_m, max(1, triton.cdiv(WGRAD_PROGRAMS_PER_SM * sms, tiles)))
    else:
        splits = min(tiles_m, 2)  # more than one, so the tests cover the partial sums
    rows_per_split = triton.cdiv(tiles_m, splits) * cfg["BLOCK_M"]
    splits = triton.cdiv(m, rows_per_split)
    part = torch.empty(splits, n_out, k, device=a.device, dtype=torch.float32)
    has_in = in_scale is not None
    _wgrad_kernel[(tiles, splits)](
        grad, a, k_g, k_x, k_0, g_scale if g_scale is not None else k_g, g_shift if g_shift is not None else k_g,
        x, in_scale if has_in else k_g, in_shift if has_in else k_g, part,
        m, n_out, k, h, w, wo, ho * wo, rows_per_split,
        STRIDE=stride, G_RELU=g_scale is not None, IN_BN_RELU=has_in, DOT_PRECISION=_dot_precision(grad.dtype),
        **cfg)
    return part.sum(0)


@conv_bn_wgrad_triton.register_fake
def _(grad, a, k_g, k_x, k_0, g_scale, g_shift, x, in_scale, in_shift, stride):
    return a.new_empty(a.shape[1], x.shape[1], dtype=torch.float32)


@torch.library.custom_op("engine::conv_bn_fold_triton", mutates_args=())
def conv_bn_fold_triton(weight: torch.Tensor, bn_weight: torch.Tensor, bn_bias: torch.Tensor,
                        running_mean: torch.Tensor, running_var: torch.Tensor, eps: float,
                        dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Inference: conv then batch norm on running statistics == conv with the returned
    weight (weight's shape, in dtype) plus the returned bias (fp32 [Cout])."""
    c_out = weight.shape[0]
    flat = weight.reshape(c_out, -1).contiguous()
    folded = torch.empty(flat.shape, device=weight.device, dtype=dtype)
    bias = torch.empty(c_out, device=weight.device, dtype=torch.float32)
    length = flat.shape[1]
    _fold_kernel[(c_out,)](flat, bn_weight, bn_bias, running_mean, running_var, folded, bias, length, eps,
                           BLOCK_L=min(1024, max(16, triton.next_power_of_2(length))))
    return folded.view(weight.shape), bias


@conv_bn_fold_triton.register_fake
def _(weight, bn_weight, bn_bias, running_mean, running_var, eps, dtype):
    return weight.new_empty(weight.shape, dtype=dtype), weight.new_empty(weight.shape[0], dtype=torch.float32)
