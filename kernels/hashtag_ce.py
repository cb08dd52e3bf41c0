"""Triton kernels for hashtag_ce: a linear layer followed by softmax cross-entropy against
sparse soft targets, over one vocabulary slice, without materialising the B x V logits.

    z = x W^T + b        x [B, D], W [V, D] (this rank's rows), tags/weights [B, K]

Forward: tiled GEMMs whose epilogue keeps, per row, an online (max, sum of exp) in fp32,
the weighted logits at the row's tags and, for label smoothing, the plain sum of logits.
The grid splits the vocabulary so that a few batch tiles still fill the GPU; the caller
combines the splits (and the ranks) with max/sum reductions of [4, B] numbers.

Backward, per vocabulary chunk: recompute the logits tiles and write G = dloss/dz for the
chunk into a scratch buffer of at most GRAD_SCRATCH_BYTES (in x's dtype, which is what
the tensor cores would consume anyway), then two GEMMs over it:
    dW[chunk] = G^T x    one program per output tile reduces over the whole batch,
                         so dW needs no atomics and no fp32 copy of the weight;
    dx       += G W[chunk] into an fp32 [B, D] accumulator, read-modified-written by
                         one program per tile, so it is deterministic.
The logits are computed twice (forward, backward): with the B x V logits never stored,
that fourth GEMM is the price, and the backward needs only x, W, b, tags and lse.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .common import dot_precision

# The backward's G chunk ([B, chunk] in x's dtype). 32 MiB is 32k classes at B=512 in
# bf16: GEMMs large enough to fill an H100, and small enough to stay in its 50 MB L2
# between the kernel that writes it and the two GEMMs that read it.
GRAD_SCRATCH_BYTES = 32 << 20
# G is stored divided by a per-call scale so that no entry can exceed this bound: fp16
# then neither overflows nor flushes softmax values of 1e-6 (V = 1M) to zero, whatever
# the batch size or loss scale in the incoming gradient. A power of two keeps it exact.
G_BOUND = 2.0 ** 14
# Programs the forward grid aims for per streaming multiprocessor.
PROGRAMS_PER_SM = 4


def _config(dtype: torch.dtype, device: torch.device) -> dict:
    if device.type != "cuda":
        # The interpreter is for tests: tiles small enough that test shapes span several
        # tiles on every axis (tl.dot needs 16 at least).
        return dict(BLOCK_B=16, BLOCK_V=32, BLOCK_D=16, num_warps=4, num_stages=1)
    if dtype == torch.float32:
        return dict(BLOCK_B=64, BLOCK_V=64, BLOCK_D=32, num_warps=4, num_stages=2)
    # 128 x 128 output tiles with 64-deep operand slices, triple-buffered: 96 KB of shared
    # memory, the usual Hopper sweet spot for bf16 GEMMs in Triton.
    return dict(BLOCK_B=128, BLOCK_V=128, BLOCK_D=64, num_warps=8, num_stages=3)


@triton.jit
def _logits_tile(
    X,      # [B, D]
    W,      # [V, D]
    BIAS,   # [V rounded up to 16], zero-padded (unused unless HAS_BIAS)
    rows, cols, row_ok, col_ok, bias_ok, D,
    HAS_BIAS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    acc = tl.zeros((BLOCK_B, BLOCK_V), tl.float32)
    # W can hold 2**31 elements and more (1M classes x 2048), so its offsets are 64-bit.
    w_rows = cols.to(tl.int64) * D
    x_rows = rows.to(tl.int64) * D
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_ok = d < D
        x = tl.load(X + x_rows[:, None] + d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        w = tl.load(W + w_rows[None, :] + d[:, None], mask=col_ok[None, :] & d_ok[:, None], other=0.0)
        acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        # bias_ok is cols < V rounded up to 16 (the padding is zeros): a bound like 2,125
        # would make the mask vary within a vector and every load a 2-byte one.
        acc += tl.load(BIAS + cols, mask=bias_ok, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _forward_kernel(
    X,       # [B, D]
    W,       # [V, D]
    BIAS,    # [V rounded up to 16], zero-padded (unused unless HAS_BIAS)
    TAGS,    # [B, K] int: class ids within this slice, -1 for padding or another rank's class
    TW,      # [B, K] fp32 target weights
    STATS,   # [4, SPLITS, B] fp32 out: max of z, sum of exp(z - max), sum_k w_k z[tag_k], sum of z
    B, V, D, tiles_per_split,
    K: tl.constexpr, K_POW2: tl.constexpr, HAS_BIAS: tl.constexpr, WITH_LOGIT_SUM: tl.constexpr,
    V_ROUND: tl.constexpr,  # V is not a multiple of 16: the bias is read up to V rounded up to 16
    BLOCK_B: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_b = tl.program_id(0)
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    ks = tl.arange(0, K_POW2)
    tags = tl.load(TAGS + rows[:, None] * K + ks[None, :], mask=row_ok[:, None] & (ks < K)[None, :], other=-1)
    m = tl.full((BLOCK_B,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_B,), tl.float32)
    t = tl.zeros((BLOCK_B,), tl.float32)
    total = tl.zeros((BLOCK_B,), tl.float32)
    v_begin = split * tiles_per_split * BLOCK_V
    v_end = tl.minimum(v_begin + tiles_per_split * BLOCK_V, V)
    for v0 in range(v_begin, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        # Where V is a multiple of 16 the rounded bound is V, but the compiler cannot tell, and a
        # second mask costs registers (194 -> 252 at V = 1M, K = 8, bf16).
        bias_ok = cols < tl.cdiv(V, 16) * 16 if V_ROUND else col_ok
        z = _logits_tile(X, W, BIAS, rows, cols, row_ok, col_ok, bias_ok, D,
                         HAS_BIAS, BLOCK_B, BLOCK_V, BLOCK_D, DOT_PRECISION)
        z = tl.where(col_ok[None, :], z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, 1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), 1)
        m = m_new
        if WITH_LOGIT_SUM:
            total += tl.sum(tl.where(col_ok[None, :], z, 0.0), 1)
        # A batch tile's tags touch a few percent of the vocabulary tiles: test them
        # all at once and skip the per-tag compare-and-select where none falls here.
        in_tile = (tags >= v0) & (tags < v0 + BLOCK_V)
        if tl.max(in_tile.to(tl.int32)) > 0:
            # A loop, not unrolled: unrolled, all K tags' loads are hoisted next to the
            # 128 x 128 logits tile and at K = 32 they spill (compile_gate).
            for k in range(K):
                tag = tl.load(TAGS + rows * K + k, mask=row_ok, other=-1)
                weight = tl.load(TW + rows * K + k, mask=row_ok, other=0.0)
                hit = cols[None, :] == tag[:, None]
                t += tl.sum(tl.where(hit, z, 0.0), 1) * weight
    out = STATS + split * B + rows
    plane = splits * B
    tl.store(out, m, mask=row_ok)
    tl.store(out + plane, s, mask=row_ok)
    tl.store(out + 2 * plane, t, mask=row_ok)
    tl.store(out + 3 * plane, total, mask=row_ok)


@triton.jit
def _grad_logits_kernel(
    X,       # [B, D]
    W,       # [VC, D] this chunk's rows of the weight
    BIAS,    # [VC rounded up to 16], zero-padded (unused unless HAS_BIAS)
    TAGS,    # [B, K] int: class ids within the slice (not the chunk), -1 for none
    TW,      # [B, K] fp32 target weights
    LSE,     # [B] fp32 log-sum-exp over the whole vocabulary
    COEF,    # [3, B] fp32: G = COEF[0] * softmax(z) - COEF[1] * q - COEF[2], already divided by the G scale
    G,       # [B, >= VC] out, row stride `stride`, x's dtype
    DB,      # [cdiv(B, BLOCK_B), >= VC] fp32 out, row stride `stride`: column sums of G over this program's rows
    B, VC, D, v0, stride,
    K: tl.constexpr, K_POW2: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_v = tl.program_id(1)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < B
    col_ok = cols < VC
    # G and the bias are read and written up to VC rounded up to 16 columns (below).
    stored = tl.cdiv(VC, 16) * 16
    z = _logits_tile(X, W, BIAS, rows, cols, row_ok, col_ok, cols < stored, D,
                     HAS_BIAS, BLOCK_B, BLOCK_V, BLOCK_D, DOT_PRECISION)
    lse = tl.load(LSE + rows, mask=row_ok, other=0.0)
    c_p = tl.load(COEF + rows, mask=row_ok, other=0.0)
    c_q = tl.load(COEF + B + rows, mask=row_ok, other=0.0)
    c_u = tl.load(COEF + 2 * B + rows, mask=row_ok, other=0.0)
    g = c_p[:, None] * tl.exp(z - lse[:, None]) - c_u[:, None]
    ks = tl.arange(0, K_POW2)
    tags = tl.load(TAGS + rows[:, None] * K + ks[None, :], mask=row_ok[:, None] & (ks < K)[None, :], other=-1)
    first = v0 + pid_v * BLOCK_V
    in_tile = (tags >= first) & (tags < first + BLOCK_V)
    if tl.max(in_tile.to(tl.int32)) > 0:
        for k in range(K):  # not unrolled, as in _forward_kernel
            tag = tl.load(TAGS + rows * K + k, mask=row_ok, other=-1)
            weight = tl.load(TW + rows * K + k, mask=row_ok, other=0.0)
            hit = (v0 + cols)[None, :] == tag[:, None]
            g -= tl.where(hit, (c_q * weight)[:, None], 0.0)
    ok = row_ok[:, None] & col_ok[None, :]
    # Padding rows have z = b, whose exp may overflow: select, never multiply, them away.
    g = tl.where(ok, g, 0.0)
    # Stored (zeros past VC) up to VC rounded up to 16 columns, which the scratch's width
    # (a multiple of BLOCK_V) allows: a bound like 17,000 / 8 = 2,125 would otherwise make
    # the mask vary within a vector and every store a 2-byte one. The GEMMs read G as far.
    tl.store(G + rows[:, None] * stride + cols[None, :], g.to(G.dtype.element_ty),
             mask=row_ok[:, None] & (cols < stored)[None, :])
    if HAS_BIAS:
        tl.store(DB + pid_b * stride + cols, tl.sum(g, 0), mask=cols < stored)


@triton.jit
def _matmul_kernel(
    A,       # [M, K] with strides (stride_am, stride_ak)
    BMAT,    # [K, N] with strides (stride_bk, stride_bn)
    C,       # [M, N] row stride stride_cm, out: C = SCALE * A @ B, or C += it when ACCUMULATE
    SCALE,   # [1] fp32
    M, N, K, stride_am, stride_ak, stride_bk, stride_bn, stride_cm,
    A_M, A_K,  # A is readable, zero past M and K, up to A_M rows and A_K columns (G's 16-padding)
    ACCUMULATE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # Grouped ordering: GROUP_M row tiles sweep the column tiles together, so the B
    # operand's column panels are reused from L2 instead of re-read from HBM.
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = A + rm.to(tl.int64)[:, None] * stride_am + rk.to(tl.int64)[None, :] * stride_ak
    b_ptrs = BMAT + rk.to(tl.int64)[:, None] * stride_bk + rn[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + rk) < K
        a = tl.load(a_ptrs, mask=(rm < A_M)[:, None] & ((k0 + rk) < A_K)[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & (rn < N)[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    acc *= tl.load(SCALE)
    ok = (rm < M)[:, None] & (rn < N)[None, :]
    c_ptrs = C + rm.to(tl.int64)[:, None] * stride_cm + rn[None, :]
    if ACCUMULATE:
        acc += tl.load(c_ptrs, mask=ok, other=0.0)
    tl.store(c_ptrs, acc.to(C.dtype.element_ty), mask=ok)


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    # The interpreter: one "SM", so the forward still uses a few vocabulary splits and the
    # tests exercise their combination.
    return 1


def _padded_bias(bias: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The bias with zeros up to a multiple of 16 classes, as the kernels read it (one
    [V] copy when V is not such a multiple; a 2,125-class slice would load 2 bytes at a time)."""
    if bias is None or bias.shape[0] % 16 == 0:
        return bias
    return torch.nn.functional.pad(bias, (0, -bias.shape[0] % 16))


def _forward_impl(x, weight, bias, tags, tag_weights, with_logit_sum):
    b, d = x.shape
    v = weight.shape[0]
    stats = torch.zeros(4, b, device=x.device, dtype=torch.float32)
    stats[0].fill_(float("-inf"))
    if b == 0 or v == 0:
        return stats
    cfg = _config(x.dtype, x.device)
    tiles_b = triton.cdiv(b, cfg["BLOCK_B"])
    tiles_v = triton.cdiv(v, cfg["BLOCK_V"])
    splits = max(1, min(tiles_v, triton.cdiv(PROGRAMS_PER_SM * _sm_count(x.device), tiles_b)))
    tiles_per_split = triton.cdiv(tiles_v, splits)
    splits = triton.cdiv(tiles_v, tiles_per_split)
    part = torch.empty(4, splits, b, device=x.device, dtype=torch.float32)
    k = tags.shape[1]
    bias = _padded_bias(bias)
    _forward_kernel[(tiles_b, splits)](
        x, weight, bias if bias is not None else weight, tags, tag_weights, part,
        b, v, d, tiles_per_split,
        K=k, K_POW2=triton.next_power_of_2(k), HAS_BIAS=bias is not None, WITH_LOGIT_SUM=with_logit_sum,
        V_ROUND=v % 16 != 0, DOT_PRECISION=dot_precision(x.dtype), **cfg)
    m = part[0].amax(0)
    stats[0] = m
    stats[1] = (part[1] * torch.exp(part[0] - m)).sum(0)
    stats[2] = part[2].sum(0)
    stats[3] = part[3].sum(0)
    return stats


def _matmul(a, a_strides, a_bounds, bmat, c, scale, m, n, k, accumulate, cfg, precision):
    block_m, block_n = cfg["BLOCK_B"], cfg["BLOCK_V"]
    # dx is only [B, D]: at B=512, D=2048 its 128 x 128 tiles would leave half of an H100's
    # 132 SMs idle through a long reduction over the chunk, so halve the tile rows instead.
    if triton.cdiv(m, block_m) * triton.cdiv(n, block_n) < _sm_count(c.device) and block_m >= 32:
        block_m //= 2
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)
    _matmul_kernel[grid](a, bmat, c, scale, m, n, k, a_strides[0], a_strides[1], bmat.stride(0), bmat.stride(1),
                         c.stride(0), *a_bounds, ACCUMULATE=accumulate, BLOCK_M=block_m, BLOCK_N=block_n,
                         BLOCK_K=cfg["BLOCK_D"], GROUP_M=8, DOT_PRECISION=precision,
                         num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


def chunk_classes(batch: int, vocab: int, dtype: torch.dtype, device: torch.device) -> int:
    """Classes per backward chunk: the G scratch is [batch, chunk] in `dtype`."""
    block_v = _config(dtype, device)["BLOCK_V"]
    fit = GRAD_SCRATCH_BYTES // max(1, batch * dtype.itemsize) // block_v * block_v
    return max(block_v, min(fit, triton.cdiv(vocab, block_v) * block_v))


def _backward_impl(x, weight, bias, tags, tag_weights, lse, coef, need_dx, need_dw):
    b, d = x.shape
    v = weight.shape[0]
    # dx accumulates over chunks; dW and db are written once per chunk (zeroing a 4 GB
    # dW first would cost a millisecond of bandwidth), unless there is nothing to write.
    dx = torch.zeros(b, d, device=x.device, dtype=torch.float32) if need_dx else x.new_empty(0, dtype=torch.float32)
    dw = torch.empty_like(weight) if need_dw else weight.new_empty(0)
    db = torch.empty(v, device=x.device, dtype=bias.dtype) if bias is not None else weight.new_empty(0)
    if b == 0 or v == 0:
        return dx, dw.zero_(), db.zero_()
    # |G_ij| <= |coef0_i| + |coef1_i| sum_k w_ik + |coef2_i| since softmax <= 1 and q_ij <= sum_k w_ik.
    bound = (coef[0].abs() + coef[1].abs() * tag_weights.sum(1) + coef[2].abs()).amax()
    scale = (bound / G_BOUND).clamp_min(torch.finfo(torch.float32).tiny).reshape(1)
    coef = (coef / scale).contiguous()
    cfg = _config(x.dtype, x.device)
    precision = dot_precision(x.dtype)
    k = tags.shape[1]
    chunk = chunk_classes(b, v, x.dtype, x.device)
    g = torch.empty(b, chunk, device=x.device, dtype=x.dtype)
    tiles_b = triton.cdiv(b, cfg["BLOCK_B"])
    db_part = torch.empty(tiles_b, chunk, device=x.device, dtype=torch.float32) if bias is not None else g
    launch = {key: cfg[key] for key in ("BLOCK_B", "BLOCK_V", "BLOCK_D", "num_warps", "num_stages")}
    padded_bias = _padded_bias(bias)
    for v0 in range(0, v, chunk):
        vc = min(chunk, v - v0)
        padded = triton.cdiv(vc, 16) * 16  # G's columns as _grad_logits_kernel stores them
        w_chunk = weight[v0:v0 + vc]
        _grad_logits_kernel[(tiles_b, triton.cdiv(vc, cfg["BLOCK_V"]))](
            x, w_chunk, padded_bias[v0:v0 + padded] if bias is not None else w_chunk, tags, tag_weights, lse, coef, g,
            db_part,
            b, vc, d, v0, chunk,
            K=k, K_POW2=triton.next_power_of_2(k), HAS_BIAS=bias is not None, DOT_PRECISION=precision, **launch)
        if need_dw:
            # G^T is G read with swapped strides: the reduction runs over the batch.
            _matmul(g, (1, chunk), (padded, b), x, dw[v0:v0 + vc], scale, vc, d, b, False, cfg, precision)
        if need_dx:
            _matmul(g, (chunk, 1), (b, padded), w_chunk, dx, scale, b, d, vc, True, cfg, precision)
        if bias is not None:
            db[v0:v0 + vc] = (db_part[:, :vc].sum(0) * scale).to(db.dtype)
    return dx, dw, db


@torch.library.custom_op("engine::hashtag_ce_fwd_triton", mutates_args=())
def hashtag_ce_fwd_triton(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], tags: torch.Tensor,
                          tag_weights: torch.Tensor, with_logit_sum: bool) -> torch.Tensor:
    return _forward_impl(x, weight, bias, tags, tag_weights, with_logit_sum)


@hashtag_ce_fwd_triton.register_fake
def _(x, weight, bias, tags, tag_weights, with_logit_sum):
    return x.new_empty(4, x.shape[0], dtype=torch.float32)


@torch.library.custom_op("engine::hashtag_ce_bwd_triton", mutates_args=())
def hashtag_ce_bwd_triton(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], tags: torch.Tensor,
                          tag_weights: torch.Tensor, lse: torch.Tensor, coef: torch.Tensor,
                          need_dx: bool, need_dw: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward_impl(x, weight, bias, tags, tag_weights, lse, coef, need_dx, need_dw)


@hashtag_ce_bwd_triton.register_fake
def _(x, weight, bias, tags, tag_weights, lse, coef, need_dx, need_dw):
    dx = x.new_empty(x.shape if need_dx else (0,), dtype=torch.float32)
    dw = weight.new_empty(weight.shape if need_dw else (0,))
    db = bias.new_empty(bias.shape) if bias is not None else weight.new_empty(0)
    return dx, dw, db


def forward(x, weight, bias, tags, tag_weights, with_logit_sum):
    """[4, B] fp32 per-row statistics over this slice: max of z, sum of exp(z - max),
    sum_k w_k z[tag_k] over tags inside the slice, sum of z (when with_logit_sum)."""
    return hashtag_ce_fwd_triton(x, weight, bias, tags, tag_weights, with_logit_sum)


def backward(x, weight, bias, tags, tag_weights, lse, coef, need_dx, need_dw):
    """(dx fp32 [B, D], dW [V, D], db [V]) for dz = coef[0] * softmax(z) - coef[1] * q - coef[2],
    coef [3, B] fp32; a gradient that is not needed comes back empty."""
    return hashtag_ce_bwd_triton(x, weight, bias, tags, tag_weights, lse, coef, need_dx, need_dw)
