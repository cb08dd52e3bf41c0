"""hashtag_ce: a linear classifier and softmax cross-entropy against sparse soft targets,
optionally vocabulary-parallel over a process group.

    z = x W^T + b                     x [B, D], W [V, D], b [V]
    q_i = sum_k w_ik e(tags_ik)       tags [B, K] padded with -1; w defaults to 1/k over
                                      the k valid tags of the row; duplicates add up
    loss_i = -sum_j q'_ij log softmax(z_i)_j + z_loss * lse_i^2,   q' = (1 - eps) q + eps / V

i.e. lse_i - q_i . z_i when the weights sum to 1 and eps = 0 (the weights are not
renormalised: this is F.cross_entropy with probability targets, the reference). Rows with
no valid tag have zero loss and gradient and are left out of the mean.

Vocabulary-parallel (DESIGN.md): with `process_group`, rank r holds rows
[start_r, start_r + V_r) of W, in rank order (V_r may differ; the head uses
`vocab_slices`). Features, tags and weights are all-gathered so each rank scores the
global batch against its slice; lse combines by all-reducing the per-row max and then
the rescaled sums of exp; the target logits (and, for smoothing, the logit sums) are
all-reduced; dx returns to the rank that owns the row by reduce-scatter. The mean is
over the global batch and is the same number on every rank; `reduction="none"` and the
returned lse give this rank's rows. Every rank must backward the loss (dW of a slice
needs the whole batch). Without a group the same code runs with no collectives.

Inputs are checked before any kernel or collective. Across ranks, every rank first
checks its own arguments, then all ranks exchange a verdict and their shapes in one
small all-gather, and all of them raise if any rank's inputs were bad: a bad tag on one
rank cannot leave the others waiting in a collective over data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from engine.ops import backends
from engine.ops.dispatch import define
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_TAG_DTYPES = (torch.int32, torch.int64)
REDUCTIONS = ("mean", "none")


@dataclass(frozen=True)
class Layout:
    """Who holds which batch rows and vocabulary rows: both are laid out in rank order."""
    rank: int
    row_sizes: tuple[int, ...]
    vocab_sizes: tuple[int, ...]

    @property
    def row_start(self) -> int:
        return sum(self.row_sizes[:self.rank])

    @property
    def vocab_start(self) -> int:
        return sum(self.vocab_sizes[:self.rank])

    @property
    def vocab_total(self) -> int:
        return sum(self.vocab_sizes)


def vocab_slices(vocab_size: int, world_size: int) -> list[tuple[int, int]]:
    """[start, stop) of each rank's classes: contiguous, in rank order, sizes differing by at most one."""
    base, extra = divmod(vocab_size, world_size)
    bounds = [0]
    for r in range(world_size):
        bounds.append(bounds[-1] + base + (1 if r < extra else 0))
    return list(zip(bounds[:-1], bounds[1:]))


def _check_local(x, weight, tags, tag_weights, bias, label_smoothing, z_loss, reduction,
                 vocab_size: Optional[int], values: bool = True) -> int:
    """Every check that needs only this process's arguments; raises TypeError/ValueError
    naming the argument. Tags are checked against vocab_size (None: weight's rows are the
    whole vocabulary; 0: not known on this rank). Returns the largest tag (-1 if none).
    values=False checks types and shapes only, which needs no read-back from the device."""
    for name, t in (("x", x), ("weight", weight), ("tags", tags)):
        if not isinstance(t, Tensor):
            raise TypeError(f"hashtag_ce: {name} must be a torch.Tensor, got {type(t).__name__}")
    for name, t in (("tag_weights", tag_weights), ("bias", bias)):
        if t is not None and not isinstance(t, Tensor):
            raise TypeError(f"hashtag_ce: {name} must be a torch.Tensor or None, got {type(t).__name__}")
    if x.dim() != 2:
        raise ValueError(f"hashtag_ce: x must be 2-D [B, D], got shape {tuple(x.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"hashtag_ce: weight must be 2-D [V, D], got shape {tuple(weight.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"hashtag_ce: x must be float32, float16 or bfloat16 (float64 for the reference), "
                        f"got {x.dtype}")
    if weight.dtype != x.dtype:
        raise TypeError(f"hashtag_ce: weight must have x's dtype {x.dtype}, got {weight.dtype} "
                        "(cast one of them; the head casts its weight to the features' dtype)")
    if weight.shape[1] != x.shape[1]:
        raise ValueError(f"hashtag_ce: weight must be [V, {x.shape[1]}] to match x's feature size D={x.shape[1]}, "
                         f"got {tuple(weight.shape)}")
    if bias is not None:
        if bias.dim() != 1 or bias.shape[0] != weight.shape[0]:
            raise ValueError(f"hashtag_ce: bias must have shape [{weight.shape[0]}] (weight's rows), "
                             f"got {tuple(bias.shape)}")
        if bias.dtype != x.dtype:
            raise TypeError(f"hashtag_ce: bias must have x's dtype {x.dtype}, got {bias.dtype}")
    if tags.dtype not in _TAG_DTYPES:
        raise TypeError(f"hashtag_ce: tags must be int32 or int64, got {tags.dtype}")
    if tags.dim() != 2 or tags.shape[0] != x.shape[0] or tags.shape[1] < 1:
        raise ValueError(f"hashtag_ce: tags must be [B, K] with B={x.shape[0]} (x's rows) and K >= 1, "
                         f"got shape {tuple(tags.shape)}")
    if tag_weights is not None:
        if not tag_weights.is_floating_point():
            raise TypeError(f"hashtag_ce: tag_weights must be floating point, got {tag_weights.dtype}")
        if tag_weights.shape != tags.shape:
            raise ValueError(f"hashtag_ce: tag_weights must have tags' shape {tuple(tags.shape)}, "
                             f"got {tuple(tag_weights.shape)}")
    named = [("x", x), ("weight", weight), ("tags", tags), ("tag_weights", tag_weights), ("bias", bias)]
    for name, t in named[1:]:
        if t is not None and t.device != x.device:
            raise ValueError(f"hashtag_ce: {name} is on {t.device} but x is on {x.device}; "
                             "all inputs must share a device")
    for name, t in named:
        if t is not None and not t.is_contiguous():
            raise ValueError(f"hashtag_ce: {name} must be contiguous (strides {t.stride()} for shape "
                             f"{tuple(t.shape)}); call .contiguous() on it")
    if not 0.0 <= float(label_smoothing) < 1.0:
        raise ValueError(f"hashtag_ce: label_smoothing must be in [0, 1), got {label_smoothing}")
    if not 0.0 <= float(z_loss) < float("inf"):
        raise ValueError(f"hashtag_ce: z_loss must be finite and >= 0, got {z_loss}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"hashtag_ce: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if vocab_size is None:
        vocab_size = weight.shape[0]
        if vocab_size == 0:
            raise ValueError("hashtag_ce: the vocabulary is empty (weight has no rows)")
    if tags.numel() == 0 or not values:
        return -1
    # The value checks read the data: one device-to-host copy for all of them.
    bad_weights = torch.zeros((), dtype=torch.int64, device=tags.device)
    if tag_weights is not None:
        bad_weights = (((tag_weights < 0) | ~torch.isfinite(tag_weights)) & (tags >= 0)).sum()
    lowest, highest, n_bad = torch.stack([tags.min().long(), tags.max().long(), bad_weights]).tolist()
    if lowest < -1:
        raise ValueError(f"hashtag_ce: tags must be class ids >= 0 or -1 for padding, found {lowest}")
    if vocab_size > 0 and highest >= vocab_size:
        raise ValueError(f"hashtag_ce: tags must be < the vocabulary size {vocab_size}, found {highest}")
    if n_bad:
        raise ValueError(f"hashtag_ce: tag_weights must be finite and >= 0 where tags are valid; {n_bad} are not")
    return highest


def _group_device(group) -> torch.device:
    # NCCL moves only CUDA tensors; gloo (and the CPU half of a mixed group) takes CPU ones.
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" \
        else torch.device("cpu")


def _agree(group, error: Optional[Exception], x, weight, tags, bias, highest: int) -> Layout:
    """One all-gather of each rank's verdict and shapes; every rank raises if any rank's
    inputs were bad or the ranks disagree, otherwise every rank gets the same Layout."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if error is None:
        mine = [1, x.shape[0], weight.shape[0], x.shape[1], tags.shape[1], _FLOAT_DTYPES.index(x.dtype),
                int(bias is not None), highest]
    else:
        mine = [0] + [-1] * 7
    local = torch.tensor(mine, dtype=torch.int64, device=_group_device(group))
    table = torch.empty(world * len(mine), dtype=torch.int64, device=local.device)
    dist.all_gather_single(table, local, group=group)
    table = table.view(world, len(mine)).tolist()
    if error is not None:
        raise error
    bad = [r for r, row in enumerate(table) if row[0] == 0]
    if bad:
        raise ValueError(f"hashtag_ce: rank(s) {bad} of {world} rejected their inputs (their own errors say why); "
                         "every rank stops before any collective on the data")
    for column, what in ((3, "the feature size D"), (4, "the tags width K"), (5, "the dtype"), (6, "having a bias")):
        values = [row[column] for row in table]
        if len(set(values)) > 1:
            if column == 5:
                values = [str(_FLOAT_DTYPES[v]) for v in values]
            raise ValueError(f"hashtag_ce: the ranks disagree on {what}: {values} (rank order)")
    vocab_sizes = tuple(row[2] for row in table)
    total = sum(vocab_sizes)
    if total == 0:
        raise ValueError("hashtag_ce: the vocabulary is empty (weight has no rows on any rank)")
    offenders = [r for r, row in enumerate(table) if row[7] >= total]
    if offenders:
        raise ValueError(f"hashtag_ce: tags must be < the vocabulary size {total} (the sum of the ranks' weight rows); "
                         f"rank(s) {offenders} have tags up to {max(table[r][7] for r in offenders)}")
    return Layout(rank, tuple(row[1] for row in table), vocab_sizes)


def validate(x: Tensor, weight: Tensor, tags: Tensor, tag_weights: Optional[Tensor] = None,
             bias: Optional[Tensor] = None, *, label_smoothing: float = 0.0, z_loss: float = 0.0,
             reduction: str = "mean", process_group=None, vocab_size: Optional[int] = None) -> Layout:
    """hashtag_ce's argument checks; across ranks a collective that every rank must reach.
    `vocab_size` (the global one) lets a rank check its tags before the exchange."""
    if process_group is None:
        _check_local(x, weight, tags, tag_weights, bias, label_smoothing, z_loss, reduction, None)
        return Layout(0, (x.shape[0],), (weight.shape[0],))
    error, highest = None, -1
    try:
        # 0: the global vocabulary is not known before the exchange; tags are checked after it.
        highest = _check_local(x, weight, tags, tag_weights, bias, label_smoothing, z_loss, reduction,
                               vocab_size if vocab_size is not None else 0)
    except (TypeError, ValueError) as e:
        error = e
    return _agree(process_group, error, x, weight, tags, bias, highest)


def tag_errors(tags: Tensor, tag_weights: Optional[Tensor], vocab_size: int) -> Tensor:
    """How many values `validate` would reject (tags outside [-1, vocab_size), tag weights
    negative or not finite where the tag is valid), counted on the device: no read-back.
    Such values cannot fault the kernels (a tag outside this rank's slice is ignored), so a
    caller can count them per step and raise at its next sync point."""
    bad = ((tags < -1) | (tags >= vocab_size)).sum()
    if tag_weights is not None:
        bad = bad + (((tag_weights < 0) | ~torch.isfinite(tag_weights)) & (tags >= 0)).sum()
    return bad


def target_weights(tags: Tensor, tag_weights: Optional[Tensor]) -> Tensor:
    """[B, K] fp32 weights, zero at padding; the default puts 1/k on each of a row's k valid tags."""
    valid = tags >= 0
    if tag_weights is None:
        return (valid / valid.sum(1, keepdim=True).clamp_min(1)).float()
    return torch.where(valid, tag_weights.float(), 0.0)


def gather_rows(t: Tensor, group, sizes: tuple[int, ...]) -> Tensor:
    """Concatenate every rank's rows of t (sizes[r] rows on rank r) in rank order, on every rank."""
    most = max(sizes)
    world = len(sizes)
    if t.shape[0] < most:
        t = torch.cat([t, t.new_zeros((most - t.shape[0],) + t.shape[1:])])
    out = t.new_empty((world * most,) + t.shape[1:])
    dist.all_gather_single(out, t.contiguous(), group=group)
    if min(sizes) == most:
        return out
    return torch.cat([out[r * most:r * most + n] for r, n in enumerate(sizes)])


def _reduce_scatter_rows(t: Tensor, group, layout: Layout) -> Tensor:
    """Sum t [sum(row_sizes), ...] over ranks; each rank gets the sum of its own rows."""
    sizes = layout.row_sizes
    most = max(sizes)
    if min(sizes) != most:
        padded = t.new_zeros((len(sizes) * most,) + t.shape[1:])
        start = 0
        for r, n in enumerate(sizes):
            padded[r * most:r * most + n] = t[start:start + n]
            start += n
        t = padded
    out = t.new_empty((most,) + t.shape[1:])
    dist.reduce_scatter_single(out, t.contiguous(), group=group)
    return out[:sizes[layout.rank]]


def _accumulation_dtype(x: Tensor) -> torch.dtype:
    """fp32, or fp64 for fp64 inputs (the reference's gradient checks)."""
    return torch.promote_types(x.dtype, torch.float32)


def _dense_logits(x, weight, bias):
    dtype = _accumulation_dtype(x)
    return F.linear(x.to(dtype), weight.to(dtype), bias.to(dtype) if bias is not None else None)


def _dense_targets(tags, tag_weights, vocab):
    q = torch.zeros(tags.shape[0], vocab, device=tags.device, dtype=torch.float32)
    # Tags past the vocabulary add nothing: with a layout given (checks deferred to `tag_errors`)
    # they reach here, and an out-of-range index would fault on a GPU.
    valid = (tags >= 0) & (tags < vocab)
    return q.scatter_add_(1, torch.where(valid, tags, 0).long(), torch.where(valid, tag_weights.float(), 0.0))


class _DenseKernels:
    """The Triton kernels' contract (engine.kernels.hashtag_ce.forward/backward) in plain
    PyTorch, materialising [B, V_slice] logits in fp32: the reference backend across ranks."""

    @staticmethod
    def forward(x, weight, bias, tags, tag_weights, with_logit_sum):
        stats = torch.zeros(4, x.shape[0], device=x.device, dtype=_accumulation_dtype(x))
        stats[0].fill_(float("-inf"))
        if weight.shape[0] == 0 or x.shape[0] == 0:
            return stats
        z = _dense_logits(x, weight, bias)
        m = z.amax(1)
        stats[0] = m
        stats[1] = torch.exp(z - m[:, None]).sum(1)
        stats[2] = (_dense_targets(tags, tag_weights, z.shape[1]) * z).sum(1)
        if with_logit_sum:
            stats[3] = z.sum(1)
        return stats

    @staticmethod
    def backward(x, weight, bias, tags, tag_weights, lse, coef, need_dx, need_dw):
        z = _dense_logits(x, weight, bias)
        g = coef[0][:, None] * torch.exp(z - lse[:, None]) - coef[1][:, None] * \
            _dense_targets(tags, tag_weights, z.shape[1]) - coef[2][:, None]
        dx = g @ weight.to(g.dtype) if need_dx else x.new_empty(0, dtype=g.dtype)
        dw = (g.t() @ x.to(g.dtype)).to(weight.dtype) if need_dw else weight.new_empty(0)
        db = g.sum(0).to(bias.dtype) if bias is not None else weight.new_empty(0)
        return dx, dw, db


class _HashtagCEFunction(torch.autograd.Function):
    """The vocabulary-parallel loss over a slice; `kernels` is the backend's namespace with
    forward(x, W, b, slice_tags, weights, with_logit_sum) -> [4, B] per-row (max, sum exp,
    target logit, logit sum) over the slice, and backward(x, W, b, slice_tags, weights, lse,
    coef, need_dx, need_dw) -> (dx fp32, dW, db) for dz = coef[0] softmax - coef[1] q - coef[2].
    Saves the (gathered) inputs and lse only."""

    @staticmethod
    def forward(ctx, x, weight, bias, tags, tag_weights, label_smoothing, z_loss, mean, group, layout, kernels):
        if group is not None:
            x_all = gather_rows(x, group, layout.row_sizes)
            # Tags and fp32 weights travel together as fp64, which holds both exactly: one collective, not two.
            packed = gather_rows(torch.cat([tags.double(), tag_weights.double()], 1), group, layout.row_sizes)
            k = tags.shape[1]
            tags_all, weights_all = packed[:, :k].long(), packed[:, k:].float()
        else:
            x_all, tags_all, weights_all = x, tags, tag_weights
        slice_tags = _slice_tags(tags_all, layout, weight.shape[0])
        stats = kernels.forward(x_all, weight, bias, slice_tags, weights_all, label_smoothing > 0)
        m, s, rest = stats[0], stats[1], stats[2:]
        if group is not None:
            m = m.clone()
            dist.all_reduce(m, dist.ReduceOp.MAX, group=group)
            # A rank with no classes has max -inf; its sum is 0 and must stay 0, not NaN.
            s = torch.where(s > 0, s * torch.exp(stats[0] - m), 0.0)
            rest = torch.cat([s[None], rest])
            dist.all_reduce(rest, group=group)
            s, rest = rest[0], rest[1:]
        lse = m + torch.log(s)
        target_logit, logit_sum = rest[0], rest[1]
        valid = (tags_all >= 0).any(1)
        eps = label_smoothing
        per_row = ((1 - eps) * weights_all.sum(1) + eps) * lse - (1 - eps) * target_logit \
            - (eps / layout.vocab_total) * logit_sum + z_loss * lse * lse
        per_row = torch.where(valid, per_row, 0.0)
        ctx.save_for_backward(x_all, weight, bias, tags_all, weights_all, lse)
        ctx.options = (label_smoothing, z_loss, mean, group, layout, kernels, x.dtype)
        rows = slice(layout.row_start, layout.row_start + x.shape[0])
        loss = per_row.sum() / valid.sum().clamp_min(1) if mean else per_row[rows]
        lse_out = lse[rows]
        ctx.mark_non_differentiable(lse_out)
        return loss, lse_out

    @staticmethod
    def backward(ctx, grad_loss, grad_lse):
        x_all, weight, bias, tags_all, weights_all, lse = ctx.saved_tensors
        eps, z_loss, mean, group, layout, kernels, x_dtype = ctx.options
        valid = (tags_all >= 0).any(1)
        if mean:
            g = valid * (grad_loss.to(lse.dtype) / valid.sum().clamp_min(1))
        else:
            g = grad_loss.to(lse.dtype).contiguous()
            if group is not None:
                g = gather_rows(g, group, layout.row_sizes)
            g = torch.where(valid, g, 0.0)
        # dz = g * ((c + 2 z_loss lse) softmax - (1 - eps) q - eps / V), c = (1 - eps) sum(w) + eps
        a = (1 - eps) * weights_all.sum(1) + eps + 2 * z_loss * lse
        coef = torch.stack([g * a, g * (1 - eps), g * (eps / layout.vocab_total)])
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        dx_all, dw, db = kernels.backward(x_all, weight, bias, _slice_tags(tags_all, layout, weight.shape[0]),
                                          weights_all, lse, coef, need_dx, need_dw)
        dx = None
        if need_dx:
            dx = (_reduce_scatter_rows(dx_all, group, layout) if group is not None else dx_all).to(x_dtype)
        return (dx, dw if need_dw else None, db if need_db else None) + (None,) * 8


def _slice_tags(tags, layout: Layout, vocab_rows: int) -> Tensor:
    """Tags as class ids within this rank's slice, -1 where the class lives on another rank."""
    start = layout.vocab_start
    inside = (tags >= start) & (tags < start + vocab_rows)
    return torch.where(inside, tags - start, -1).contiguous()


def _reference(x: Tensor, weight: Tensor, tags: Tensor, tag_weights: Tensor, bias: Optional[Tensor] = None, *,
               label_smoothing: float = 0.0, z_loss: float = 0.0, reduction: str = "mean", process_group=None,
               layout: Optional[Layout] = None) -> tuple[Tensor, Tensor]:
    """The specification: the dense target distribution and F.cross_entropy with probability
    targets, on fp32 logits (fp64 for fp64 inputs). `tag_weights` are target_weights(...)'s.
    Returns (loss, lse).
    Across ranks it runs the vocabulary-parallel path with plain PyTorch per-slice math."""
    if process_group is not None:
        return _HashtagCEFunction.apply(x, weight, bias, tags, tag_weights, label_smoothing, z_loss,
                                        reduction == "mean", process_group, layout, _DenseKernels)
    logits = F.linear(x, weight, bias).to(_accumulation_dtype(x))
    targets = _dense_targets(tags, tag_weights, weight.shape[0])
    per_row = F.cross_entropy(logits, targets, reduction="none", label_smoothing=label_smoothing)
    lse = torch.logsumexp(logits, 1)
    if z_loss:
        per_row = per_row + z_loss * lse * lse
    valid = (tags >= 0).any(1)
    per_row = torch.where(valid, per_row, 0.0)
    loss = per_row.sum() / valid.sum().clamp_min(1) if reduction == "mean" else per_row
    return loss, lse.detach()


def _triton_kernels():
    from engine.kernels import hashtag_ce as triton_hashtag_ce
    return triton_hashtag_ce


def _triton(x, weight, tags, tag_weights, bias=None, *, label_smoothing=0.0, z_loss=0.0, reduction="mean",
                      process_group=None, layout=None) -> tuple[Tensor, Tensor]:
    """The fused kernels; the same autograd function with or without a process group."""
    return _HashtagCEFunction.apply(x, weight, bias, tags, tag_weights, label_smoothing, z_loss, reduction == "mean",
                                    process_group, layout, _triton_kernels())


def _triton_supports(x, weight, tags, tag_weights, bias=None, *, forced, **options):
    why = backends.fast_dtype_rejection(x, tensor_core_dots=True)
    if why is not None:
        return why
    return backends.triton_accepts(x, weight, tags, tag_weights, bias, forced=forced)


# The op behind hashtag_ce (after validation and the soft targets' weights), as the
# dispatcher and the checks see it.
_op = define("hashtag_ce", _reference)
_op.register("triton", _triton, available=backends.triton_status, scope=backends.triton_scope,
             supports=_triton_supports)


def hashtag_ce(x: Tensor, weight: Tensor, tags: Tensor, tag_weights: Optional[Tensor] = None,
               bias: Optional[Tensor] = None, *, label_smoothing: float = 0.0, z_loss: float = 0.0,
               reduction: str = "mean", return_lse: bool = False, process_group=None,
               backend: Optional[str] = None, layout: Optional[Layout] = None) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """Softmax cross-entropy of x W^T + b against the soft targets (tags, tag_weights);
    see the module docstring for the formula, reductions and the distributed layout.

    x [B, D] float32/float16/bfloat16 (float64: reference only); weight [V, D] (this rank's
    slice with a process group) and bias [V] in x's dtype; tags [B, K] int32/int64, -1 for
    padding; tag_weights [B, K] >= 0 (ignored at padding), default 1/k per valid tag.
    Returns the loss in fp32 (fp64 for fp64 inputs; scalar for "mean", [B] for "none"), and
    with return_lse also the per-row log-sum-exp [B] (not differentiable). `backend` forces one.

    `layout`: what `validate` returned for inputs of these shapes on every rank (a training
    loop with a fixed batch). It skips the exchange and the checks that read tag values back
    from the device, so the call makes no host sync; the caller counts bad values with
    `tag_errors` instead.
    """
    if layout is None:
        layout = validate(x, weight, tags, tag_weights, bias, label_smoothing=label_smoothing, z_loss=z_loss,
                          reduction=reduction, process_group=process_group)
    else:
        _check_local(x, weight, tags, tag_weights, bias, label_smoothing, z_loss, reduction, 0, values=False)
    loss, lse = _op(x, weight, tags, target_weights(tags, tag_weights), bias,
                              label_smoothing=float(label_smoothing), z_loss=float(z_loss), reduction=reduction,
                              process_group=process_group, layout=layout, backend=backend)
    return (loss, lse) if return_lse else loss
