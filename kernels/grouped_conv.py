"""Triton kernels for grouped_conv3x3: a grouped 3x3 convolution (padding 1, stride 1 or
2) on channels_last tensors as implicit GEMMs, with the previous batch norm + ReLU fused
into the input load and this output's batch-norm statistics into the epilogue.

A channels_last activation [N, C, H, W] is a row-major [M, C] matrix, M = N*H*W. For each
of the 9 taps, an output row reads the input row at (oh*s - 1 + kh, ow*s - 1 + kw), or
zero outside the image. A group of width 8 gives 8-deep, 8-wide GEMMs, under tl.dot's 16;
so a tile covers GP consecutive groups ("a pack") and multiplies by a block-diagonal
weight tile (entries across groups masked to zero). The wasted products are GP times the
useful ones, which a memory-bound shape can afford; the input is still read once per
pack, never per group. Wide groups (GP = 1) tile their channels like a dense GEMM.

    _conv_kernel   forward: Y = conv(prologue(X), W), epilogue partial statistics of Y.
                   With TRANSPOSED it is the data gradient: dX = conv^T(dY, W), which
                   gathers output pixel (ih + 1 - kh) / s, present only where divisible.
    _wgrad_kernel  dW[tap] = dY^T prologue(X shifted by the tap), rows split into fp32
                   partials (no atomics), summed on the host.

The prologue is h = relu(x * scale + shift) per input channel, rounded to x's dtype as a
stored normalised activation would be; the zero padding is applied after it (h is zero
outside the image), matching F.conv2d on the normalised tensor.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .bn_stats import finalize, store_tile_stats
from .common import dot_precision, load_bn_relu, nhwc_empty, strided_size

# Channels a packed tile aims to span: tl.dot's minimum in the interpreter (so the tests
# see packs, ragged packs and multi-tile groups), 32 on a GPU so that each pixel's slice
# of a pack is a 64-byte load in 16-bit types. Unmeasured (no GPU): the autotuner times
# the spans in SPANS against cuDNN.
SPANS = (16, 32, 64)
GPU_SPAN = 32
# Programs per SM the weight-gradient row split aims for.
WGRAD_PROGRAMS_PER_SM = 2


def _tiling(k_group: int, n_group: int, groups: int, dtype: torch.dtype, device: torch.device,
            span: int | None) -> dict:
    """Groups per pack and tile sizes for a GEMM whose groups are k_group deep, n_group wide."""
    on_gpu = device.type == "cuda"
    span = span if span is not None else (GPU_SPAN if on_gpu else 16)
    pack = max(1, min(groups, span // max(k_group, n_group)))
    # The interpreter caps tiles at 16 so that wide test groups span several tiles.
    cap = (128 if dtype != torch.float32 else 64) if on_gpu else 16
    block_n = min(cap, max(16, triton.next_power_of_2(pack * n_group)))
    block_k = min(cap, 64, max(16, triton.next_power_of_2(pack * k_group)))
    if on_gpu:
        block_m = 128 if dtype != torch.float32 else 64
        warps = 4 if block_n * block_m <= 64 * 128 else 8
    else:
        block_m, warps = 16, 4
    return dict(GP=pack, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps,
                num_stages=2 if on_gpu else 1)


@triton.jit
def _pack_channels(pack, idx, width, G, GP: tl.constexpr):
    # Local index within a pack -> (its group, the global channel, whether it exists).
    group = pack * GP + idx // width
    return group, pack * GP * width + idx, (idx < GP * width) & (group < G)


@triton.jit
def _conv_kernel(
    X,                  # [N, Hi, Wi, K_total] NHWC: x (forward) or dY (TRANSPOSED)
    WG,                 # [9, C_total, Kg]: per tap, each GEMM output channel's Kg inputs in its group
    IN_SCALE, IN_SHIFT, # [K_total] fp32: h = relu(x * scale + shift) on load (PROLOGUE)
    Y,                  # [N, Ho, Wo, C_total] NHWC out
    PART,               # [2, tiles_m, C_total] fp32 out: per row tile, sum and centred sum of squares of Y (STATS)
    M, Hi, Wi, Ho, Wo, K_total, C_total, G,
    # Group widths as constants: a runtime width defeats the vectorisation of the loads
    # (at width 8, 16-byte cp.async become scalar 2-byte loads; compile_gate shows both).
    Kg: tl.constexpr, Ng: tl.constexpr,
    STRIDE: tl.constexpr, TRANSPOSED: tl.constexpr, PROLOGUE: tl.constexpr, STATS: tl.constexpr,
    GP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    tiles_per_pack = tl.cdiv(GP * Ng, BLOCK_N)
    tiles_c = tl.cdiv(G, GP) * tiles_per_pack
    # Consecutive programs share a row tile, so its input pixels come from HBM about once.
    pid_m = pid // tiles_c
    pid_c = pid - pid_m * tiles_c
    pack = pid_c // tiles_per_pack
    j = (pid_c - pack * tiles_per_pack) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_grp, cols, col_ok = _pack_channels(pack, j, Ng, G, GP)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    r = rows.to(tl.int64)
    image = r // (Ho * Wo)
    pixel = r - image * (Ho * Wo)
    oh = pixel // Wo
    ow = pixel - oh * Wo
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for tap in range(9):
        kh = tap // 3
        kw = tap - kh * 3
        if TRANSPOSED:
            th = oh + 1 - kh
            tw = ow + 1 - kw
            # A negative th must not pass the divisibility test through C's rounding.
            ih = tl.where(th >= 0, th, 0) // STRIDE
            iw = tl.where(tw >= 0, tw, 0) // STRIDE
            valid = (th >= 0) & (tw >= 0) & (th == ih * STRIDE) & (tw == iw * STRIDE)
        else:
            ih = oh * STRIDE - 1 + kh
            iw = ow * STRIDE - 1 + kw
            valid = (ih >= 0) & (iw >= 0)
        valid = valid & row_ok & (ih < Hi) & (iw < Wi)
        src = (image * Hi + ih) * Wi + iw
        for k0 in range(0, GP * Kg, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            k_grp, ks, k_ok = _pack_channels(pack, kk, Kg, G, GP)
            ok = valid[:, None] & k_ok[None, :]
            a = load_bn_relu(X + src[:, None] * K_total + ks[None, :], ok, ks, k_ok, IN_SCALE, IN_SHIFT, PROLOGUE)
            same = (k_grp[:, None] == n_grp[None, :]) & k_ok[:, None] & col_ok[None, :]
            local_k = kk - (k_grp - pack * GP) * Kg
            w = tl.load(WG + (tap * C_total + cols.to(tl.int64)[None, :]) * Kg + local_k[:, None], mask=same, other=0.0)
            acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
    ok = row_ok[:, None] & col_ok[None, :]
    y = acc.to(Y.dtype.element_ty)
    tl.store(Y + r[:, None] * C_total + cols[None, :], y, mask=ok)
    if STATS:
        store_tile_stats(y, ok, col_ok, cols, PART, pid_m, M, C_total, BLOCK_M)


@triton.jit
def _wgrad_kernel(
    DY,                 # [N, Ho, Wo, Cout] NHWC
    X,                  # [N, H, W, Cin] NHWC, before the prologue
    IN_SCALE, IN_SHIFT, # [Cin] fp32 (PROLOGUE)
    PART,               # [splits, 9, Cout, Kg] fp32 out: dW per tap over each split's rows
    M, H, W, Ho, Wo, Cin, Cout, G, rows_per_split,
    Kg: tl.constexpr, Ng: tl.constexpr,  # group widths, constant as in _conv_kernel
    STRIDE: tl.constexpr, PROLOGUE: tl.constexpr, GP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    tap = tl.program_id(1)
    split = tl.program_id(2)
    tiles_k = tl.cdiv(GP * Kg, BLOCK_K)
    tiles_per_pack = tl.cdiv(GP * Ng, BLOCK_N) * tiles_k
    pack = pid // tiles_per_pack
    local = pid - pack * tiles_per_pack
    tile_n = local // tiles_k
    j = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    kk = (local - tile_n * tiles_k) * BLOCK_K + tl.arange(0, BLOCK_K)
    n_grp, cols, col_ok = _pack_channels(pack, j, Ng, G, GP)
    k_grp, ks, k_ok = _pack_channels(pack, kk, Kg, G, GP)
    kh = tap // 3
    kw = tap - kh * 3
    acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    row_start = split * rows_per_split
    row_stop = tl.minimum(row_start + rows_per_split, M)
    for r0 in range(row_start, row_stop, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        row_ok = rows < row_stop
        r = rows.to(tl.int64)
        image = r // (Ho * Wo)
        pixel = r - image * (Ho * Wo)
        oh = pixel // Wo
        ow = pixel - oh * Wo
        ih = oh * STRIDE - 1 + kh
        iw = ow * STRIDE - 1 + kw
        valid = row_ok & (ih >= 0) & (iw >= 0) & (ih < H) & (iw < W)
        dy_t = tl.load(DY + r[None, :] * Cout + cols[:, None], mask=row_ok[None, :] & col_ok[:, None], other=0.0)
        ok = valid[:, None] & k_ok[None, :]
        x = load_bn_relu(X + ((image * H + ih) * W + iw)[:, None] * Cin + ks[None, :], ok, ks, k_ok,
                         IN_SCALE, IN_SHIFT, PROLOGUE)
        acc = tl.dot(dy_t, x, acc, input_precision=DOT_PRECISION)
    # Only the block diagonal is a weight; the products across groups are discarded.
    keep = (n_grp[:, None] == k_grp[None, :]) & col_ok[:, None] & k_ok[None, :]
    local_k = kk - (k_grp - pack * GP) * Kg
    offs = ((split.to(tl.int64) * 9 + tap) * Cout + cols[:, None]) * Kg + local_k[None, :]
    tl.store(PART + offs, acc, mask=keep)


def _launch_conv(x, wg, in_scale, in_shift, out_hw, c_out, k_group, n_group, groups, stride, transposed, stats,
                 span):
    n, k_total, hi, wi = x.shape
    ho, wo = out_hw
    m = n * ho * wo
    y = nhwc_empty(n, c_out, ho, wo, x)
    cfg = _tiling(k_group, n_group, groups, x.dtype, x.device, span)
    tiles_m = triton.cdiv(m, cfg["BLOCK_M"])
    tiles_c = triton.cdiv(groups, cfg["GP"]) * triton.cdiv(cfg["GP"] * n_group, cfg["BLOCK_N"])
    part = torch.empty(2, tiles_m, c_out, device=x.device, dtype=torch.float32) if stats else y
    prologue = in_scale is not None
    _conv_kernel[(tiles_m * tiles_c,)](
        x, wg, in_scale if prologue else y, in_shift if prologue else y, y, part,
        m, hi, wi, ho, wo, k_total, c_out, groups, k_group, n_group,
        STRIDE=stride, TRANSPOSED=transposed, PROLOGUE=prologue, STATS=stats,
        DOT_PRECISION=dot_precision(x.dtype), **cfg)
    return y, (part if stats else x.new_empty(0, dtype=torch.float32)), cfg["BLOCK_M"]


@torch.library.custom_op("engine::grouped_conv_fwd_triton", mutates_args=())
def grouped_conv_fwd_triton(x: torch.Tensor, weight: torch.Tensor, in_scale: torch.Tensor | None,
                            in_shift: torch.Tensor | None, stride: int, groups: int, stats: bool,
                            span: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """y = conv3x3(relu(x * in_scale + in_shift) or x, weight, stride, padding 1, groups) for
    channels_last x [N, Cin, H, W] and weight [Cout, Cin/groups, 3, 3] in x's dtype. With
    stats, also part [2, tiles, Cout] fp32: per tile of part_rows(...) output rows, the sum
    and the centred sum of squares of y (kernels.bn_stats' partials format); else empty."""
    c_out, k_group = weight.shape[0], weight.shape[1]
    n, _, h, w = x.shape
    wg = weight.permute(2, 3, 0, 1).reshape(9, c_out, k_group).contiguous()
    y, part, _ = _launch_conv(x, wg, in_scale, in_shift, (strided_size(h, stride), strided_size(w, stride)),
                              c_out, k_group, c_out // groups, groups, stride, False, stats, span)
    return y, part


@grouped_conv_fwd_triton.register_fake
def _(x, weight, in_scale, in_shift, stride, groups, stats, span):
    n, _, h, w = x.shape
    c_out = weight.shape[0]
    ho, wo = strided_size(h, stride), strided_size(w, stride)
    y = nhwc_empty(n, c_out, ho, wo, x)
    if not stats:
        return y, x.new_empty(0, dtype=torch.float32)
    tiles = triton.cdiv(n * ho * wo, part_rows(x.dtype, x.device))
    return y, x.new_empty(2, tiles, c_out, dtype=torch.float32)


def part_rows(dtype: torch.dtype, device: torch.device) -> int:
    """Output rows per statistics partial of grouped_conv_fwd_triton."""
    return _tiling(1, 1, 1, dtype, device, None)["BLOCK_M"]


@torch.library.custom_op("engine::grouped_conv_bn_fwd_triton", mutates_args=("running_mean", "running_var"))
def grouped_conv_bn_fwd_triton(x: torch.Tensor, weight: torch.Tensor, in_scale: torch.Tensor,
                               in_shift: torch.Tensor, stride: int, groups: int, span: int | None,
                               bn_weight: torch.Tensor, bn_bias: torch.Tensor, running_mean: torch.Tensor | None,
                               running_var: torch.Tensor | None, momentum: float, eps: float
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The bottleneck's middle: a = conv3x3(relu(x * in_scale + in_shift)), then its batch
    norm's training statistics from the epilogue's partials, as kernels.conv_bn's
    conv_bn_fwd_triton returns them: a, mean, invstd, scale, shift."""
    c_out, k_group = weight.shape[0], weight.shape[1]
    n, _, h, w = x.shape
    ho, wo = strided_size(h, stride), strided_size(w, stride)
    wg = weight.permute(2, 3, 0, 1).reshape(9, c_out, k_group).contiguous()
    a, part, rows = _launch_conv(x, wg, in_scale, in_shift, (ho, wo), c_out, k_group, c_out // groups, groups, stride,
                                 False, True, span)
    return (a, *finalize(part, rows, n * ho * wo, bn_weight, bn_bias, running_mean, running_var, momentum, eps))


@grouped_conv_bn_fwd_triton.register_fake
def _(x, weight, in_scale, in_shift, stride, groups, span, bn_weight, bn_bias, running_mean, running_var, momentum,
      eps):
    n, _, h, w = x.shape
    c_out = weight.shape[0]
    a = nhwc_empty(n, c_out, strided_size(h, stride), strided_size(w, stride), x)
    return (a, *(x.new_empty(c_out, dtype=torch.float32) for _ in range(4)))


@torch.library.custom_op("engine::grouped_conv_dgrad_triton", mutates_args=())
def grouped_conv_dgrad_triton(grad_y: torch.Tensor, weight: torch.Tensor, input_hw: list[int], stride: int,
                              groups: int, span: int | None) -> torch.Tensor:
    """The gradient with respect to the convolution's input (after the prologue), channels_last."""
    c_out, k_group = weight.shape[0], weight.shape[1]
    n_group = c_out // groups
    # Per tap, each input channel's n_group weights from the output channels of its group.
    wg = (weight.reshape(groups, n_group, k_group, 3, 3).permute(3, 4, 0, 2, 1)
          .reshape(9, groups * k_group, n_group).contiguous())
    dx, _, _ = _launch_conv(grad_y.contiguous(memory_format=torch.channels_last), wg, None, None, tuple(input_hw),
                            groups * k_group, n_group, k_group, groups, stride, True, False, span)
    return dx


@grouped_conv_dgrad_triton.register_fake
def _(grad_y, weight, input_hw, stride, groups, span):
    return nhwc_empty(grad_y.shape[0], groups * weight.shape[1], input_hw[0], input_hw[1], grad_y)


@torch.library.custom_op("engine::grouped_conv_wgrad_triton", mutates_args=())
def grouped_conv_wgrad_triton(grad_y: torch.Tensor, x: torch.Tensor, in_scale: torch.Tensor | None,
                              in_shift: torch.Tensor | None, c_out: int, stride: int, groups: int,
                              span: int | None) -> torch.Tensor:
    """dW [Cout, Cin/groups, 3, 3] fp32, the prologue recomputed from x instead of stored."""
    n, c_in, h, w = x.shape
    k_group, n_group = c_in // groups, c_out // groups
    grad_y = grad_y.contiguous(memory_format=torch.channels_last)
    ho, wo = grad_y.shape[2], grad_y.shape[3]
    m = n * ho * wo
    cfg = _tiling(k_group, n_group, groups, x.dtype, x.device, span)
    tiles = (triton.cdiv(groups, cfg["GP"]) * triton.cdiv(cfg["GP"] * n_group, cfg["BLOCK_N"])
             * triton.cdiv(cfg["GP"] * k_group, cfg["BLOCK_K"]))
    row_tiles = triton.cdiv(m, cfg["BLOCK_M"])
    if x.device.type == "cuda":
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count
        splits = max(1, min(row_tiles, triton.cdiv(WGRAD_PROGRAMS_PER_SM * sms, tiles * 9)))
    else:
        # Two splits in the interpreter, so the tests go through the host-side sum.
        splits = min(row_tiles, 2)
    rows_per_split = triton.cdiv(row_tiles, splits) * cfg["BLOCK_M"]
    splits = triton.cdiv(m, rows_per_split)
    part = torch.empty(splits, 9, c_out, k_group, device=x.device, dtype=torch.float32)
    prologue = in_scale is not None
    _wgrad_kernel[(tiles, 9, splits)](
        grad_y, x, in_scale if prologue else part, in_shift if prologue else part, part,
        m, h, w, ho, wo, c_in, c_out, groups, rows_per_split, k_group, n_group,
        STRIDE=stride, PROLOGUE=prologue, DOT_PRECISION=dot_precision(x.dtype), **cfg)
    return part.sum(0).reshape(3, 3, c_out, k_group).permute(2, 3, 0, 1).contiguous()


@grouped_conv_wgrad_triton.register_fake
def _(grad_y, x, in_scale, in_shift, c_out, stride, groups, span):
    return x.new_empty(c_out, x.shape[1] // groups, 3, 3, dtype=torch.float32)
