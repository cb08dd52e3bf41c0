"""grouped_conv3x3: ResNeXt's grouped 3x3 convolution (padding 1, stride 1 or 2), with the
previous batch norm + ReLU as an optional prologue and this output's batch-norm
statistics as an optional epilogue.

    h = relu(x * in_scale + in_shift)    per input channel, in x's dtype (or h = x)
    y = conv2d(h, weight, stride, padding=1, groups)
    stats: also mean and biased variance of y per output channel (fp32)

The reference backend is exactly that in PyTorch (cuDNN on a GPU); it is the
specification. Two fused implementations compute the same thing with h recomputed on load
instead of stored and the statistics reduced in the forward's epilogue:
  triton  (engine.kernels.grouped_conv) one implicit-GEMM kernel per direction, several
          narrow groups packed into each tensor-core tile; any group width.
  cuda    (csrc/grouped_conv_cuda.cu) direct kernels, one thread per (pixel, group) on
          the CUDA cores, for group widths 1, 2, 4 and 8 with as many outputs as inputs.

On CUDA tensors the choice is autotuned: the first call with a shape times the reference,
the Triton kernel at each tile span and the CUDA kernel, forward and (when gradients are
needed) backward, and the fastest is kept in the autotune cache (engine.ops.autotune), so
the op is never slower than cuDNN on a shape it has timed. A choice is a string:
"reference", "triton", "triton:<span>" or "cuda". On CPU tensors there is no timing: the
reference runs, and the others (Triton's interpreter, the extension's C++ loop) only
when forced (tests).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from engine.ops import backends, verify
from engine.ops.autotune import default_tuner
from engine.ops.dispatch import define

NHWC = torch.channels_last


def _check_inputs(x: Tensor, weight: Tensor, *, stride: int = 1, groups: int = 1, in_scale: Optional[Tensor] = None,
                  in_shift: Optional[Tensor] = None, stats: bool = False) -> None:
    """Errors every backend shares, raised before any work."""
    name = "grouped_conv3x3"
    if not isinstance(x, Tensor) or x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"{name}: x must be a 4-D floating-point tensor [N, C, H, W], got "
                         f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    if x.shape[0] == 0 or x.shape[2] == 0 or x.shape[3] == 0:
        raise ValueError(f"{name}: x is empty, shape {tuple(x.shape)}")
    if stride not in (1, 2):
        raise ValueError(f"{name}: stride must be 1 or 2, got {stride}")
    if groups < 1 or x.shape[1] % groups:
        raise ValueError(f"{name}: x's {x.shape[1]} channels are not divisible by groups={groups}")
    c_in = x.shape[1]
    if weight.dim() != 4 or weight.shape[1:] != (c_in // groups, 3, 3) or weight.shape[0] % groups:
        raise ValueError(f"{name}: weight must have shape [Cout, {c_in // groups}, 3, 3] with Cout divisible by "
                         f"{groups} (x has {c_in} channels, groups {groups}), got {list(weight.shape)}")
    if not weight.is_floating_point() or weight.device != x.device:
        raise ValueError(f"{name}: weight must be floating point on {x.device}, got {weight.dtype} on {weight.device}")
    if (in_scale is None) != (in_shift is None):
        raise ValueError(f"{name}: pass both in_scale and in_shift (the prologue), or neither")
    for field, t in (("in_scale", in_scale), ("in_shift", in_shift)):
        if t is not None and (t.shape != (c_in,) or t.dtype != torch.float32 or t.device != x.device):
            raise ValueError(f"{name}: {field} must be fp32 [{c_in}] on {x.device}, got {t.dtype} "
                             f"{list(t.shape)} on {t.device}")
    if stats:
        n, _, h, w = x.shape
        if n * ((h - 1) // stride + 1) * ((w - 1) // stride + 1) < 2:
            raise ValueError(f"{name}: statistics need more than 1 value per channel, x is {tuple(x.shape)}")


def _prologue(x: Tensor, in_scale: Optional[Tensor], in_shift: Optional[Tensor]) -> Tensor:
    if in_scale is None:
        return x
    return F.relu(x.float() * in_scale.view(1, -1, 1, 1) + in_shift.view(1, -1, 1, 1)).to(x.dtype)


def _reference(x: Tensor, weight: Tensor, *, stride: int = 1, groups: int = 1, in_scale: Optional[Tensor] = None,
               in_shift: Optional[Tensor] = None, stats: bool = False):
    """y = conv2d(relu(x * in_scale + in_shift) or x, weight, stride, padding=1, groups) for
    x [N, Cin, H, W] (channels_last for the fused backends), weight [Cout, Cin/groups, 3, 3],
    in_scale and in_shift fp32 [Cin]. With stats, returns (y, mean, var): y's per-channel
    mean and biased variance in fp32, differentiable. `backend=` forces one.
    The reference: the prologue, F.conv2d (weight cast to x's dtype, as under autocast),
    and the statistics of y as stored."""
    y = F.conv2d(_prologue(x, in_scale, in_shift), weight.to(x.dtype), None, stride, 1, 1, groups)
    if not stats:
        return y
    yf = y.float()
    return y, yf.mean((0, 2, 3)), yf.var((0, 2, 3), unbiased=False)


def _kernels():
    from engine.kernels import grouped_conv
    return grouped_conv


def _cuda_kernels():
    from engine.ops import _cuda_grouped_conv
    return _cuda_grouped_conv


def conv_forward(choice: str, x: Tensor, weight: Tensor, in_scale: Optional[Tensor], in_shift: Optional[Tensor],
                 stride: int, groups: int, stats: bool) -> tuple[Tensor, Tensor, int]:
    """The forward on a fused implementation: (y, statistics partials or empty, rows per
    partial); weight already in x's dtype."""
    if choice == "cuda":
        return _cuda_kernels().forward(x, weight, in_scale, in_shift, stride, stats)
    k = _kernels()
    y, part = k.grouped_conv_fwd_triton(x, weight, in_scale, in_shift, stride, groups, stats, span_of(choice))
    return y, part, k.part_rows(x.dtype, x.device)


def conv_bn_forward(choice: str, x: Tensor, weight: Tensor, in_scale: Tensor, in_shift: Tensor, stride: int,
                    groups: int, bn_weight: Tensor, bn_bias: Tensor, running_mean: Optional[Tensor],
                    running_var: Optional[Tensor], momentum: float, eps: float):
    """The bottleneck's middle on a fused implementation: the 3x3 with the previous batch
    norm + ReLU on its load, then its own batch norm's training statistics (running
    statistics updated): a, mean, invstd, scale, shift."""
    if choice == "cuda":
        return _cuda_kernels().grouped_conv_bn_fwd_cuda(x, weight, in_scale, in_shift, stride, bn_weight, bn_bias,
                                                         running_mean, running_var, momentum, eps)
    return _kernels().grouped_conv_bn_fwd_triton(x, weight, in_scale, in_shift, stride, groups, span_of(choice),
                                                  bn_weight, bn_bias, running_mean, running_var, momentum, eps)


def conv_dgrad(choice: str, grad_y: Tensor, weight: Tensor, input_hw, stride: int, groups: int) -> Tensor:
    """The gradient with respect to the convolution's input (after the prologue), channels_last."""
    if choice == "cuda":
        return _cuda_kernels().dgrad(grad_y, weight, input_hw, stride)
    return _kernels().grouped_conv_dgrad_triton(grad_y, weight, list(input_hw), stride, groups, span_of(choice))


def conv_wgrad(choice: str, grad_y: Tensor, x: Tensor, in_scale: Optional[Tensor], in_shift: Optional[Tensor],
               c_out: int, stride: int, groups: int) -> Tensor:
    """dW [Cout, Cin/groups, 3, 3] fp32, the prologue recomputed from x."""
    if choice == "cuda":
        return _cuda_kernels().wgrad(grad_y, x, in_scale, in_shift, stride, x.shape[1] // groups)
    return _kernels().grouped_conv_wgrad_triton(grad_y, x, in_scale, in_shift, c_out, stride, groups,
                                                span_of(choice))


def _merge_partials(part: Tensor, rows_per_part: int, m: int) -> tuple[Tensor, Tensor]:
    """Per-tile (sum, centred sum of squares) -> mean and biased variance (Chan et al.)."""
    tiles = part.shape[1]
    counts = (m - torch.arange(tiles, device=part.device) * rows_per_part).clamp(max=rows_per_part)
    counts = counts.to(torch.float32)[:, None]
    mean = part[0].sum(0) / m
    tile_mean = part[0] / counts
    m2 = part[1].sum(0) + (counts * (tile_mean - mean) ** 2).sum(0)
    return mean, m2 / m


class _Function(torch.autograd.Function):
    """The op on a fused implementation (`choice`); the prologue's backward in PyTorch."""

    @staticmethod
    def forward(ctx, x, weight, in_scale, in_shift, stride, groups, stats, choice):
        w = weight.to(x.dtype)
        y, part, rows = conv_forward(choice, x, w, in_scale, in_shift, stride, groups, stats)
        ctx.config = (stride, groups, choice, weight.dtype)
        if not stats:
            ctx.save_for_backward(x, w, in_scale, in_shift, None, None)
            return y
        n, _, ho, wo = y.shape
        mean, var = _merge_partials(part, rows, n * ho * wo)
        ctx.save_for_backward(x, w, in_scale, in_shift, y, mean)
        return y, mean, var

    @staticmethod
    def backward(ctx, grad_y, grad_mean=None, grad_var=None):
        x, w, in_scale, in_shift, y, mean = ctx.saved_tensors
        stride, groups, choice, weight_dtype = ctx.config
        g = grad_y
        if y is not None:
            m = y.shape[0] * y.shape[2] * y.shape[3]
            # mean = sum(y) / m and var = sum((y - mean)^2) / m, so d/dy = 1/m and 2 (y - mean) / m.
            g = (g.float() + grad_mean.view(1, -1, 1, 1) / m
                 + grad_var.view(1, -1, 1, 1) * 2.0 / m * (y.float() - mean.view(1, -1, 1, 1)))
        g = g.to(x.dtype).contiguous(memory_format=NHWC)
        dx = dw = dscale = dshift = None
        if ctx.needs_input_grad[1]:
            dw = conv_wgrad(choice, g, x, in_scale, in_shift, w.shape[0], stride, groups).to(weight_dtype)
        if any(ctx.needs_input_grad[i] for i in (0, 2, 3)):
            dh = conv_dgrad(choice, g, w, [x.shape[2], x.shape[3]], stride, groups)
            if in_scale is None:
                dx = dh
            else:
                xf = x.float()
                scale, shift = in_scale.view(1, -1, 1, 1), in_shift.view(1, -1, 1, 1)
                dpre = torch.where(xf * scale + shift > 0, dh.float(), 0.0)
                dx = (dpre * scale).to(x.dtype)
                dscale = (dpre * xf).sum((0, 2, 3))
                dshift = dpre.sum((0, 2, 3))
        return dx, dw, dscale, dshift, None, None, None, None


def _fused(name: str):
    """The triton or cuda backend: on CUDA tensors as the tuner chose it (the Triton kernel
    at its tile span), else as named (forced, or a CPU test)."""
    def run(x, weight, *, stride=1, groups=1, in_scale=None, in_shift=None, stats=False):
        choice = _tune(x, weight, stride=stride, groups=groups, in_scale=in_scale, stats=stats)
        if choice is None or choice.split(":")[0] != name:
            choice = name
        return _run_variant(choice, x, weight, stride=stride, groups=groups, in_scale=in_scale, in_shift=in_shift,
                            stats=stats)
    return run


def _run_variant(choice, x, weight, *, stride=1, groups=1, in_scale=None, in_shift=None, stats=False):
    return _Function.apply(x, weight, in_scale, in_shift, int(stride), int(groups), bool(stats), choice)


def _tune(x, weight, *, stride=1, groups=1, in_scale=None, in_shift=None, stats=False) -> Optional[str]:
    """The tuned choice for a CUDA call; None on other devices, where nothing is timed."""
    if not x.is_cuda:
        return None
    return tuned_choice(x.shape, x.dtype, x.device, weight.shape[0], stride, groups, in_scale is not None, stats,
                        _wants_grad(x, weight, in_scale))


def _wants_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# This process's choices by shape, which torch.compile's tracing reads (it cannot time or read files).
_CHOICES: dict[str, str] = {}


def tuned_choice(shape, dtype: torch.dtype, device: torch.device, c_out: int, stride: int, groups: int,
                 prologue: bool, stats: bool, train: bool) -> str:
    """'reference' (cuDNN) or 'triton:<span>', the fastest for a CUDA input of this shape,
    timed on random inputs the first time and cached (engine.ops.autotune). Under
    torch.compile only the choices made eagerly in this process are known; an unknown
    shape gets cuDNN there, with a one-time warning."""
    n, c, h, w = shape
    key = (f"grouped_conv3x3|{'fwd+bwd' if train else 'fwd'}|{str(dtype)[6:]}|n{n} c{c} h{h} w{w}|"
           f"cout{c_out} g{groups} s{stride}|prologue={prologue} stats={stats}")
    if torch.compiler.is_compiling():
        return _CHOICES.get(key) or verify.untuned_under_compile(key)
    if key not in _CHOICES:
        tuner_key = f"{torch.cuda.get_device_name(device)}|{key}"
        # Only candidates checked against the reference on this device are timed, and a timed
        # candidate whose result differs from cuDNN's is dropped.
        _CHOICES[key] = default_tuner().choose(
            tuner_key, _candidates(tuple(shape), c_out, stride, groups, dtype, device, prologue, stats, train),
            verify=candidates_checker(tuple(shape), dtype, device, c_out, stride, groups, prologue, stats, train))
    return _CHOICES[key]


def candidates_checker(shape, dtype: torch.dtype, device: torch.device, c_out: int, stride: int, groups: int,
                       prologue: bool, stats: bool, train: bool):
    """verify.candidates_checker for the tuner, from the arguments of tuned_choice: the
    timing inputs' shapes, dtypes and layouts (the values are the check's)."""
    n, c, h, w = shape
    x = torch.empty(shape, dtype=dtype, device=device).contiguous(memory_format=NHWC)
    weight = torch.empty(c_out, c // groups, 3, 3, device=device)
    scale = torch.empty(c, device=device).requires_grad_(train) if prologue else None
    shift = torch.empty(c, device=device).requires_grad_(train) if prologue else None
    return verify.candidates_checker("grouped_conv3x3", (x.requires_grad_(train), weight.requires_grad_(train)),
                                     {"stride": stride, "groups": groups, "in_scale": scale, "in_shift": shift,
                                      "stats": stats})


def span_of(choice: str) -> Optional[int]:
    """The Triton tile span of a 'triton:<span>' choice; None for any other (the kernel's default)."""
    return int(choice.split(":")[1]) if choice.startswith("triton:") else None


def cuda_kernel_accepts(c_in: int, c_out: int, groups: int) -> Optional[str]:
    """Why the direct CUDA kernels cannot take this convolution, or None."""
    width = c_in // groups
    if c_out != c_in:
        return f"the direct kernels keep each group's width: Cout {c_out} != Cin {c_in}"
    if width not in (1, 2, 4, 8):
        return (f"group width {width} is not 1, 2, 4 or 8 (wider groups would be compute bound on CUDA cores; "
                "the tensor-core paths take them)")
    return None


def _candidates(shape, c_out, stride, groups, dtype, device, prologue, stats, train) -> dict:
    """Callables running the op, forward and (train) backward, on random inputs of the
    shape: the reference, the Triton kernel at each tile span with a distinct tiling, and
    the direct CUDA kernel where it takes the shape and the extension has it."""
    k = _kernels()
    n, c, h, w = shape
    tilings = {}
    for span in k.SPANS:
        tiling = k._tiling(c // groups, c_out // groups, groups, dtype, device, span)
        tilings.setdefault(tuple(sorted(tiling.items())), span)
    # A private generator: tuning must not move the global random state a run's results depend on.
    rng = dict(device=device, generator=torch.Generator(device).manual_seed(0))
    x = torch.randn(shape, dtype=dtype, **rng).contiguous(memory_format=NHWC).requires_grad_(train)
    weight = torch.randn(c_out, c // groups, 3, 3, **rng).requires_grad_(train)
    scale = torch.rand(c, **rng).add_(0.5).requires_grad_(train) if prologue else None
    shift = torch.randn(c, **rng).requires_grad_(train) if prologue else None
    grad = torch.randn(n, c_out, (h - 1) // stride + 1, (w - 1) // stride + 1, dtype=dtype,
                       **rng).contiguous(memory_format=NHWC)
    inputs = [t for t in (x, weight, scale, shift) if t is not None]

    def runner(fn):
        def call():
            # The outputs and gradients, which the tuner compares with the reference candidate's.
            out = fn()
            if train:
                return out, torch.autograd.grad(out[0] if stats else out, inputs, grad)
            return out
        return call

    out = {"reference": runner(lambda: _reference(x, weight, stride=stride, groups=groups, in_scale=scale,
                                                  in_shift=shift, stats=stats))}
    for span in tilings.values():
        choice = f"triton:{span}"
        out[choice] = runner(lambda choice=choice: _Function.apply(x, weight, scale, shift, stride, groups, stats,
                                                                   choice))
    if backends.extension_has_cuda() and cuda_kernel_accepts(c, c_out, groups) is None:
        out["cuda"] = runner(lambda: _Function.apply(x, weight, scale, shift, stride, groups, stats, "cuda"))
    return out


def _triton_supports(x, weight, *, stride=1, groups=1, in_scale=None, in_shift=None, stats=False, forced):
    why = backends.fast_dtype_rejection(x, tensor_core_dots=True)
    if why is not None:
        return why
    if not x.is_contiguous(memory_format=NHWC):
        return f"x must be channels_last (NHWC), got strides {x.stride()}"
    return backends.triton_accepts(x, weight, in_scale, in_shift, forced=forced)


def _cuda_supports(x, weight, *, stride=1, groups=1, in_scale=None, in_shift=None, stats=False, forced):
    why = backends.fast_dtype_rejection(x)
    if why is not None:
        return why
    if not x.is_contiguous(memory_format=NHWC):
        return f"x must be channels_last (NHWC), got strides {x.stride()}"
    reason = cuda_kernel_accepts(x.shape[1], weight.shape[0], groups)
    if reason is None:
        reason = backends.cuda_ext_accepts(x, weight, in_scale, in_shift, forced=forced)
    return reason


grouped_conv3x3 = define("grouped_conv3x3", _reference, validate=_check_inputs)
grouped_conv3x3.register("triton", _fused("triton"), available=backends.triton_status, scope=backends.triton_scope,
                         supports=_triton_supports)
grouped_conv3x3.register("cuda", _fused("cuda"), available=backends.extension_status, scope=backends.cuda_ext_scope,
                         supports=_cuda_supports)
grouped_conv3x3.tune = _tune
grouped_conv3x3.run_variant = _run_variant
