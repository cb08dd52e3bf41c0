"""One whole training step of a fused ResNeXt checked against the plain model, the plain
model following the fused run's ReLU decisions.

Why the plain model follows instead of running free: a ReLU network's gradient jumps
wherever a pre-activation crosses zero. Two correct computations that round differently
(the fused kernels and PyTorch's ops, or two convolution algorithms) disagree on the sign
of an activation whose exact value lies within their rounding distance of zero; that
element's gradient then flows in one model and not in the other, and the batch norm of its
channel spreads the difference over the channel's parameters and the convolution before
it. At the small batches a check can afford (16 to 256 values per channel) one such element
moves a gradient by several percent, and with about a million activations even in a
one-block-per-stage model, most batches hold one: the plain model against itself, its
input perturbed by 1e-7, moved `layer2.0.conv3.weight`'s gradient by 9%, exactly what the
fused model showed. A free-running comparison then fails correct kernels, on any backend,
depending on the batch.

So at every point where the fused model materialises an activation (each BatchNormAct2d's
output; each ConvBNBottleneck's block output, and the stem), the fused run's value is
recorded; the plain model computes its own value there from the same input, its ReLU takes
the recorded value's mask, the two values are compared (a forward check per point), and the
recorded value itself flows on (its gradient goes to the plain model's own computation).
Every later op then sees the same bits in both models, and the gradients differ only by the
rounding of the two backward passes: a defect in a value, a gradient, a running statistic
or the way calls compose (state kept between calls, reused buffers, the strides autograd
hands in) still shows, a tie at a ReLU does not. Inside a conv-fused block the fused kernels
never materialise the ReLUs after bn1 and bn2, so there the plain model decides for itself,
from the same block input (only that block's own rounding can flip them).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.models.bn_act_bottleneck import BNActBottleneck
from engine.models.bottleneck import Bottleneck
from engine.models.conv_bn_bottleneck import ConvBNBottleneck
from engine.models.resnext import ResNeXt
from engine.ops.bn_act import BatchNormAct2d
from engine.ops.numerics import TOLERANCE, compare

# A whole network compounds each op's rounding; its step is held to this multiple of the op tolerance.
MODEL_TOLERANCE_FACTOR = 4.0


class _FusedValue(torch.autograd.Function):
    """Forward: the fused run's recorded value. Backward: the gradient goes to the plain
    model's own value of the same activation."""

    @staticmethod
    def forward(ctx, own: Tensor, recorded: Tensor) -> Tensor:
        return recorded.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


class _Follower:
    """The recorded fused values, and the plain model's way of following them."""

    def __init__(self, recorded: dict[str, Tensor]):
        self.recorded = recorded
        self.pairs: list[tuple[str, Tensor, Tensor]] = []
        self.followed: list[str] = []

    def follow(self, name: str, own: Tensor, relu: bool) -> Tensor:
        recorded = self.recorded[name]
        self.followed.append(name)
        own_value = F.relu(own) if relu else own
        self.pairs.append((f"output {name}", recorded, own_value.detach()))
        if recorded.shape != own.shape or recorded.dtype != own.dtype:
            return own_value  # the mismatch is reported by the pair above
        if relu:
            own = torch.where(recorded > 0, own, torch.zeros_like(own))
        return _FusedValue.apply(own, recorded)


class _FollowingReLU(nn.Module):
    """Stands in for a plain block's ReLU module, which the block calls once per batch norm:
    the n-th call follows the n-th name (None: an ordinary ReLU, not recorded)."""

    def __init__(self, follower: _Follower, names: list[Optional[str]]):
        super().__init__()
        self.follower = follower
        self.names = list(names)

    def forward(self, x: Tensor) -> Tensor:
        if not self.names:
            raise RuntimeError("step check: a plain block called its ReLU more often than the fused model records")
        name = self.names.pop(0)
        return F.relu(x) if name is None else self.follower.follow(name, x, relu=True)


def _recording_points(fused: ResNeXt) -> dict[str, nn.Module]:
    return {name: m for name, m in fused.named_modules() if isinstance(m, (BatchNormAct2d, ConvBNBottleneck))}


def _follow_plan(fused: ResNeXt, plain: ResNeXt) -> tuple[list[tuple[nn.Module, str, nn.Module]], dict[str, str]]:
    """Where the plain model follows: per module whose `relu` a plain block (or the stem) calls,
    the recorded name each call follows; and the plain batch norms without ReLU (downsample)
    whose output follows a recorded value, by name."""
    fused_modules = dict(fused.named_modules())
    if not isinstance(fused.bn1, BatchNormAct2d) or not isinstance(plain.relu, nn.ReLU):
        raise ValueError("step check: needs a fused model (its stem a BatchNormAct2d) and a plain one (stem ReLU)")
    relus: list[tuple[nn.Module, list[Optional[str]]]] = [(plain, ["bn1"])]
    norms: dict[str, str] = {}
    for name, block in plain.named_modules():
        if not isinstance(block, Bottleneck):
            continue
        if type(block) is not Bottleneck:
            raise ValueError(f"step check: the plain model's block {name} is a {type(block).__name__}")
        fused_block = fused_modules.get(name)
        if isinstance(fused_block, ConvBNBottleneck):
            relus.append((block, [None, None, name]))
        elif isinstance(fused_block, BNActBottleneck):
            relus.append((block, [f"{name}.bn1", f"{name}.bn2", f"{name}.bn3"]))
            if block.downsample is not None:
                norms[f"{name}.downsample.1"] = f"{name}.downsample.1"
        else:
            raise ValueError(f"step check: plain block {name} has no fused counterpart (got {type(fused_block)})")
    return relus, norms


def _step(model: nn.Module, x: Tensor, target: Tensor, dtype: torch.dtype):
    model.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
        logits = model(x)
        loss = F.cross_entropy(logits.float(), target)
    loss.backward()
    return loss.detach(), logits.detach().float()


def check_fused_step(fused: ResNeXt, plain: ResNeXt, x: Tensor, target: Tensor, dtype: torch.dtype) -> dict:
    """One training step (forward, cross-entropy against `target`, backward, running
    statistics updated) of `fused` and of `plain`, which must hold the same state, in train
    mode under autocast to `dtype`; the plain model follows the fused run (module docstring).
    Returns engine.ops.numerics.compare's verdict over the loss, the logits, every recorded
    activation, every gradient and every running statistic, each allowed
    MODEL_TOLERANCE_FACTOR times the op tolerance of `dtype`. Both models are left stepped."""
    relus, norms = _follow_plan(fused, plain)
    recorded: dict[str, Tensor] = {}
    hooks = [m.register_forward_hook(lambda mod, args, out, name=name: recorded.__setitem__(name, out.detach().clone()))
             for name, m in _recording_points(fused).items()]
    try:
        loss, logits = _step(fused.train(), x, target, dtype)
    finally:
        for h in hooks:
            h.remove()

    follower = _Follower(recorded)
    plain_modules = dict(plain.named_modules())
    originals = [(parent, parent.relu) for parent, _ in relus]
    hooks = [plain_modules[plain_name].register_forward_hook(
        lambda mod, args, out, name=name: follower.follow(name, out, relu=False)) for plain_name, name in norms.items()]
    try:
        for parent, names in relus:
            parent.relu = _FollowingReLU(follower, names)
        ref_loss, ref_logits = _step(plain.train(), x, target, dtype)
        unused = [parent for parent, _ in relus if parent.relu.names]
    finally:
        for parent, relu in originals:
            parent.relu = relu
        for h in hooks:
            h.remove()
    if unused or sorted(follower.followed) != sorted(recorded):
        missing = sorted(set(recorded) - set(follower.followed))
        raise RuntimeError(f"step check: the plain model did not follow every recorded fused value (missing "
                           f"{missing[:5]}); are the two models the same architecture?")

    pairs = [("loss", loss, ref_loss), ("logits", logits, ref_logits)] + follower.pairs
    ref_params = dict(plain.named_parameters())
    for name, p in fused.named_parameters():
        want = ref_params[name].grad
        if want is not None:
            # A gradient the fused model never produced is infinitely wrong.
            pairs.append((f"grad {name}", p.grad if p.grad is not None else torch.full_like(want, float("nan")), want))
    ref_buffers = dict(plain.named_buffers())
    pairs += [(f"buffer {name}", b, ref_buffers[name]) for name, b in fused.named_buffers()
              if b.is_floating_point()]
    floor = TOLERANCE[dtype] * MODEL_TOLERANCE_FACTOR / 2  # compare() allows twice a floor
    return compare(pairs, dtype, {name: floor for name, _, _ in pairs})
