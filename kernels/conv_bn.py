"""Triton kernels for conv_bn: the 1x1 convolutions of a ResNeXt bottleneck as NHWC GEMMs
with the batch norms fused into their prologues and epilogues. The batch-norm passes
still needed between the GEMMs (statistics, finalise, apply, backward sums) are
kernels/bn_stats.py.

A channels_last activation [N, C, H, W] is a row-major [M, C] matrix with M = N*H*W,
so a 1x1 convolution with weight [Cout, Cin] is Y[M, Cout] = X[M, Cin] W^T; with stride
2 its rows of X are gathered from every other pixel of every other image row. Below, M
is rows, N the convolution's output channels and K its input channels.

Forward (training)
    _fwd_kernel        Y = prologue(X) W^T. The prologue applies the previous batch norm
                       (per-channel scale and shift) and the ReLU to each X tile as it is
                       loaded, so the normalised activation is never written; the epilogue
                       reduces each output tile to bn_stats' statistics partials of the
                       values as stored.
Backward
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

from .bn_stats import finalize, store_tile_stats
from .common import dot_precision, interpreter_block, load_bn_relu, nhwc_empty, strided_size

# Programs per SM the weight-gradient split aims for.
WGRAD_PROGRAMS_PER_SM = 2


def _gemm_config(dtype: torch.dtype, device: torch.device, prologue_operands: int = 1, *,
                 m: int, n: int, k: int) -> dict:
    """Tiles of the GEMM [m, k] x [k, n] whose first operand is computed from
    `prologue_operands` loaded tiles (the backward's da needs both the gradient and the
    pre-norm output)."""
    if device.type != "cuda":
        return dict(BLOCK_M=interpreter_block(m), BLOCK_N=interpreter_block(n), BLOCK_K=interpreter_block(k),
                    num_warps=4, num_stages=1)
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
    return load_bn_relu(X + x_rows[:, None] * K + ks[None, :], ok, ks, k_ok, SCALE, SHIFT, BN_RELU)


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
        store_tile_stats(y, ok, col_ok, cols, PART, pid_m, M, N, BLOCK_M)


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
    ho, wo = strided_size(h, stride), strided_size(w, stride)
    m = n * ho * wo
    y = nhwc_empty(n, n_out, ho, wo, x)
    cfg = _gemm_config(x.dtype, x.device, m=m, n=n_out, k=k)
    tiles_m = triton.cdiv(m, cfg["BLOCK_M"])
    stats = bn_weight is not None
    part = torch.empty(2, tiles_m, n_out, device=x.device, dtype=torch.float32) if stats else y
    _fwd_kernel[(tiles_m * triton.cdiv(n_out, cfg["BLOCK_N"]),)](
        x, weight, in_scale if in_scale is not None else y, in_shift if in_shift is not None else y,
        bias if bias is not None else y, residual if residual is not None else y, y, part,
        m, n_out, k, h, w, wo, ho * wo,
        STRIDE=stride, IN_BN_RELU=in_scale is not None, HAS_BIAS=bias is not None, HAS_RES=residual is not None,
        RELU=relu, STATS=stats, DOT_PRECISION=dot_precision(x.dtype), **cfg)
    if not stats:
        return (y, *(x.new_empty(0, dtype=torch.float32) for _ in range(4)))
    return (y, *finalize(part, cfg["BLOCK_M"], m, bn_weight, bn_bias, running_mean, running_var, momentum, eps))


@conv_bn_fwd_triton.register_fake
def _(x, weight, in_scale, in_shift, bias, residual, stride, relu, bn_weight, bn_bias, running_mean, running_var,
      momentum, eps):
    n, _, h, w = x.shape
    n_out = weight.shape[0]
    y = nhwc_empty(n, n_out, strided_size(h, stride), strided_size(w, stride), x)
    c = n_out if bn_weight is not None else 0
    return (y, *(x.new_empty(c, dtype=torch.float32) for _ in range(4)))


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
    dx = nhwc_empty(n, k, h, w, grad)
    cfg = _gemm_config(grad.dtype, grad.device, prologue_operands=2, m=m, n=n_out, k=k)
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
        DOT_PRECISION=dot_precision(grad.dtype), **cfg)
    return dx, part.sum(1) if has_in else a.new_empty(0, dtype=torch.float32)


@conv_bn_dgrad_triton.register_fake
def _(grad, a, k_g, k_x, k_0, g_scale, g_shift, weight, x_in, in_scale, in_shift, in_mean, residual,
      residual_stride):
    n, _, h, w = a.shape
    k = weight.shape[1]
    sums = a.new_empty((2, k) if x_in is not None else (0,), dtype=torch.float32)
    return nhwc_empty(n, k, h, w, grad), sums


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
    cfg = _gemm_config(grad.dtype, grad.device, prologue_operands=2, m=m, n=n_out, k=k)
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
        STRIDE=stride, G_RELU=g_scale is not None, IN_BN_RELU=has_in, DOT_PRECISION=dot_precision(grad.dtype),
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
