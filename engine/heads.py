"""Classifier heads trained on top of the trunk's pooled features."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from engine.ops.hashtag_ce import gather_rows, hashtag_ce, tag_errors, validate, vocab_slices


class HashtagHead(nn.Module):
    """The hashtag classifier and its loss: softmax cross-entropy against the soft targets
    of engine.ops.hashtag_ce, never materialising the batch x vocabulary logits.

    With `process_group`, the weight is sharded by vocabulary: rank r holds classes
    vocab_slices(num_classes, world)[r] and scores the all-gathered batch against them, so
    per-rank memory is O(num_classes / world * in_features) for the weight, its gradient
    and optimiser state, plus O(global batch * in_features) of gathered features. Keep the
    head out of DDP: its gradient is already complete on each rank. Each rank's features
    get their exact gradient of the global-batch mean, so the trunk's true gradient is the
    sum over ranks of what each rank computes; DDP averages, i.e. divides it by the world
    size: have DDP sum (a communication hook) or scale the trunk's learning rate to match.

    `state_dict()` holds the full vocabulary ("weight" [V, D], "bias" [V], the layout of a
    torchvision `fc`) whatever the world size, and loading takes this rank's rows, so a
    checkpoint saved at one world size loads at any other. With a group, state_dict() is a
    collective: call it on every rank.

    Sampled mode (`sample_fraction` < 1, training only; Partial FC): each step every rank
    keeps all classes of its slice that are a tag anywhere in the global batch, plus
    uniformly drawn other classes up to round(sample_fraction * slice size), and the
    softmax runs over the kept classes only; only kept rows get a (nonzero) gradient. It
    is biased: the normaliser sees every positive class but each other class only with
    probability about sample_fraction, so the loss is lower than the full softmax's and
    classes absent from a batch are pushed down less often, as if their logits were
    log(1 / sample_fraction) lower during training. The trunk's features, which the paper transfers, suffer little
    (Partial FC reports face-recognition accuracy on par with the full softmax at 0.1);
    the head's own probabilities over-score rare classes, so finish training with
    sample_fraction = 1 when the head itself is used (eval mode is always the full
    softmax). Label smoothing then spreads over the kept classes. Optimiser momentum and
    weight decay still move rows that were not kept.
    """

    def __init__(self, in_features: int, num_classes: int, *, bias: bool = True, process_group=None,
                 sample_fraction: float = 1.0, label_smoothing: float = 0.0, z_loss: float = 0.0,
                 backend: Optional[str] = None, static_batch: bool = False, device=None, dtype=None):
        super().__init__()
        world = dist.get_world_size(process_group) if process_group is not None else 1
        rank = dist.get_rank(process_group) if process_group is not None else 0
        if num_classes < world:
            raise ValueError(f"HashtagHead: num_classes ({num_classes}) must be at least the world size ({world})")
        if not 0.0 < sample_fraction <= 1.0:
            raise ValueError(f"HashtagHead: sample_fraction must be in (0, 1], got {sample_fraction}")
        self.in_features = in_features
        self.num_classes = num_classes
        self.process_group = process_group
        self.sample_fraction = sample_fraction
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.backend = backend
        self.rank = rank
        self.slices = vocab_slices(num_classes, world)
        self.vocab_start, self.vocab_stop = self.slices[rank]
        factory = dict(device=device, dtype=dtype)
        self.weight = nn.Parameter(torch.empty(self.vocab_stop - self.vocab_start, in_features, **factory))
        self.bias = nn.Parameter(torch.empty(self.vocab_stop - self.vocab_start, **factory)) if bias else None
        # Rows of the local batches seen in training that had no valid tag (left out of the loss).
        self.register_buffer("empty_rows", torch.zeros((), dtype=torch.int64, device=device), persistent=False)
        # static_batch: every call on every rank has the same shapes (a training loop with a fixed
        # micro-batch). The first call's exchange of shapes is reused, and bad tag values are
        # counted here on the device instead of read back: a call makes no host sync. The
        # caller reads `bad_tags` when it syncs anyway. A rank whose shapes change alone would
        # leave the others waiting in the exchange: keep shapes fixed on every rank.
        self.static_batch = static_batch
        self.register_buffer("bad_tags", torch.zeros((), dtype=torch.int64, device=device), persistent=False)
        self._layout = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Linear's initialisation; its bounds depend on in_features only, so a shard is
        # distributed like the same rows of an unsharded head.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, features: Tensor, tags: Tensor, tag_weights: Optional[Tensor] = None, *,
                reduction: str = "mean", return_lse: bool = False):
        """hashtag_ce over the vocabulary (or the sampled part of it, in sampled training)."""
        weight, bias = self.weight, self.bias
        sampled = self.training and self.sample_fraction < 1.0
        if sampled:
            rows, tags = self._sample(features, tags, tag_weights)
            weight = weight[rows]
            bias = bias[rows] if bias is not None else None
        # As autocast does for a linear layer: compute in the features' dtype.
        if isinstance(features, Tensor) and weight.dtype != features.dtype:
            weight = weight.to(features.dtype)
            bias = bias.to(features.dtype) if bias is not None else None
        layout = None
        if self.static_batch and not sampled:
            key = (tuple(features.shape), tuple(tags.shape), features.dtype, tag_weights is not None, reduction)
            if self._layout is not None and self._layout[0] == key:
                layout = self._layout[1]
                with torch.no_grad():
                    self.bad_tags += tag_errors(tags, tag_weights, self.num_classes)
            else:
                layout = validate(features, weight, tags, tag_weights, bias, label_smoothing=self.label_smoothing,
                                  z_loss=self.z_loss, reduction=reduction, process_group=self.process_group,
                                  vocab_size=self.num_classes)
                self._layout = (key, layout)
        out = hashtag_ce(features, weight, tags, tag_weights, bias, label_smoothing=self.label_smoothing,
                         z_loss=self.z_loss, reduction=reduction, return_lse=return_lse,
                         process_group=self.process_group, backend=self.backend, layout=layout)
        if self.training:
            with torch.no_grad():
                self.empty_rows += (tags < 0).all(1).sum()
        return out

    def _sample(self, features: Tensor, tags: Tensor, tag_weights: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        """This rank's kept rows of the slice, and the local tags renumbered into the kept
        vocabulary (rank order, then each rank's positives in class order, then its negatives)."""
        group = self.process_group
        # Only shapes and tags matter before the tags are gathered; hashtag_ce checks the dtypes.
        probe = features.detach().to(self.weight.dtype) \
            if isinstance(features, Tensor) and features.is_floating_point() else features
        layout = validate(probe, self.weight, tags, tag_weights, self.bias, label_smoothing=self.label_smoothing,
                          z_loss=self.z_loss, process_group=group, vocab_size=self.num_classes)
        all_tags = gather_rows(tags, group, layout.row_sizes) if group is not None else tags
        device = tags.device
        bounds = torch.tensor([start for start, _ in self.slices] + [self.num_classes], device=device)
        sizes = bounds[1:] - bounds[:-1]
        positives = torch.unique(all_tags[all_tags >= 0].long())
        first = torch.searchsorted(positives, bounds)
        quota = torch.tensor([max(1, round(self.sample_fraction * (stop - start))) for start, stop in self.slices],
                             device=device)
        kept = torch.minimum(sizes, torch.maximum(first[1:] - first[:-1], quota))
        offsets = torch.cumsum(kept, 0) - kept
        local = tags.clamp_min(0).long()
        owner = torch.searchsorted(bounds, local, right=True) - 1
        renumbered = torch.where(tags >= 0, offsets[owner] + torch.searchsorted(positives, local) - first[owner], -1)
        lo, hi = first[self.rank:self.rank + 2].tolist()
        mine = positives[lo:hi] - self.vocab_start
        is_positive = torch.zeros(self.vocab_stop - self.vocab_start, dtype=torch.bool, device=device)
        is_positive[mine] = True
        others = (~is_positive).nonzero().squeeze(1)
        draw = int(kept[self.rank]) - (hi - lo)
        negatives = others[torch.randperm(others.numel(), device=device)[:draw]]
        return torch.cat([mine, negatives]), renumbered.to(tags.dtype)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.process_group is None:
            return
        sizes = tuple(stop - start for start, stop in self.slices)
        for name in ("weight", "bias"):
            param = getattr(self, name)
            if param is not None:
                destination[prefix + name] = gather_rows(param.detach(), self.process_group, sizes)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        mine = {}
        for name in ("weight", "bias"):
            key = prefix + name
            full = state_dict.get(key)
            if getattr(self, name) is None or not isinstance(full, Tensor):
                continue
            if full.dim() < 1 or full.shape[0] != self.num_classes:
                error_msgs.append(f"{key}: the checkpoint holds {full.shape[0] if full.dim() else 0} classes, "
                                  f"this HashtagHead {self.num_classes}")
                continue
            mine[key] = full[self.vocab_start:self.vocab_stop]
        super()._load_from_state_dict({**state_dict, **mine}, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, num_classes={self.num_classes}, "
                f"classes=[{self.vocab_start}, {self.vocab_stop}), bias={self.bias is not None}, "
                f"sample_fraction={self.sample_fraction}, label_smoothing={self.label_smoothing}, z_loss={self.z_loss}")
