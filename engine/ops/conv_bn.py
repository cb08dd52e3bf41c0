"""conv_bn_bottleneck: a ResNeXt (v1.5) bottleneck block with its batch norms fused into
the 1x1 convolutions, training and inference.

    shortcut = x                                  or bn_d(conv1x1(x, w_d, stride))
    out = relu(bn1(conv1x1(x, w1)))
    out = relu(bn2(conv3x3(out, w2, stride, groups)))
    out = relu(bn3(conv1x1(out, w3)) + shortcut)

The reference backend is exactly that (torchvision's Bottleneck as functions); it is the
specification. The triton backend (engine.kernels.conv_bn) computes the same thing with
fewer passes over memory:

training forward
    conv1 GEMM, bn1 statistics in its epilogue            a1 written
    grouped 3x3, one of three ways, autotuned per shape on a GPU (engine.ops.grouped_conv;
    always the Triton kernel in Triton's CPU interpreter):
      Triton (engine.kernels.grouped_conv) or, for group widths up to 8, the direct CUDA
      kernel (csrc/grouped_conv_cuda.cu): bn1 + ReLU on its load, bn2 statistics in its
      epilogue                                            a2 written; h1 never exists
      cuDNN: bn1 + ReLU apply pass, F.conv2d, bn2 statistics pass
                                                          h1 and a2 written
    conv3 GEMM, bn2 + ReLU in its prologue, bn3 statistics in its epilogue
                                                          a3 written; h2 never exists
    [downsample GEMM, bn_d statistics in its epilogue]    a_d written
    tail: bn3 + [bn_d] + add + ReLU in one pass           out written
training backward
    tail reduce: ReLU mask, bn3 [and bn_d] sums           masked gradient written (the shortcut's)
    conv3 dgrad: bn3 backward in its prologue; bn2's ReLU mask and backward sums in its epilogue
    conv3 wgrad: bn3 backward and bn2 + ReLU recomputed in its prologues
    bn2 backward apply pass (the 3x3's output gradient), then the 3x3's backward: the fused
    kernels' dgrad and wgrad (bn1 + ReLU recomputed from a1 on load), or cuDNN's from h1
    bn1 reduce: ReLU mask recomputed, backward sums      (read only)
    [downsample dgrad and wgrad: bn_d backward in their prologues]
    conv1 dgrad: bn1 ReLU + backward in its prologue, shortcut gradient added in its epilogue
    conv1 wgrad: bn1 ReLU + backward recomputed in its prologue
eval (running statistics)
    every batch norm folded into its convolution's weight and a bias; conv1's epilogue adds
    bias and ReLU, bn2's bias and ReLU go into conv3's prologue, conv3's epilogue adds bias,
    shortcut and ReLU: three GEMMs, the 3x3 (grouped_conv3x3, autotuned on a GPU), and
    nothing else.

The triton backend takes channels_last (NHWC) x in fp32, fp16 or bf16 with weights in any
float dtype (they are cast to x's, as autocast would). All four batch norms share momentum
and eps. In eval mode it has no backward (the folded path): with gradients required, the
dispatcher picks the reference.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from engine.ops import backends
from engine.ops.dispatch import define

NHWC = torch.channels_last


class BNParams(NamedTuple):
    """A batch norm's parameters and buffers, as nn.BatchNorm2d holds them."""
    weight: Optional[Tensor]
    bias: Optional[Tensor]
    running_mean: Optional[Tensor]
    running_var: Optional[Tensor]


def _strided(size: int, stride: int) -> int:
    return (size - 1) // stride + 1


def _check_inputs(x: Tensor, w1: Tensor, bn1: BNParams, w2: Tensor, bn2: BNParams, w3: Tensor, bn3: BNParams,
                  wd: Optional[Tensor] = None, bnd: Optional[BNParams] = None, *, stride: int = 1, groups: int = 1,
                  training: bool = True, momentum: float = 0.1, eps: float = 1e-5) -> None:
    """Errors every backend shares, raised before any work."""
    name = "conv_bn_bottleneck"
    backends.check_image_batch(name, x)
    if x.shape[0] == 0:
        raise ValueError(f"{name}: x has an empty batch, shape {tuple(x.shape)}")
    if stride < 1 or groups < 1:
        raise ValueError(f"{name}: stride and groups must be positive, got stride={stride}, groups={groups}")
    cin = x.shape[1]
    width, c_out = w1.shape[0], w3.shape[0]
    expected = [("conv1", w1, (width, cin, 1, 1)), ("conv2", w2, (width, width // groups, 3, 3)),
                ("conv3", w3, (c_out, width, 1, 1))]
    if wd is not None:
        expected.append(("downsample", wd, (c_out, cin, 1, 1)))
    for conv, w, shape in expected:
        backends.check_parameter(name, f"{conv} weight", w, shape, x,
                                 f" (x has {cin} channels, width {width}, groups {groups}, {c_out} output channels)")
    if width % groups:
        raise ValueError(f"{name}: width {width} is not divisible by groups {groups}")
    if (wd is None) != (bnd is None):
        raise ValueError(f"{name}: pass both the downsample weight and its batch norm, or neither")
    if wd is None and (cin != c_out or stride != 1):
        raise ValueError(f"{name}: without a downsample the shortcut is x itself, so x's {cin} channels must equal "
                         f"the {c_out} output channels and stride must be 1 (got {stride})")
    bns = [("bn1", bn1, width), ("bn2", bn2, width), ("bn3", bn3, c_out)] + ([("downsample bn", bnd, c_out)]
                                                                          if bnd is not None else [])
    for bn_name, bn, channels in bns:
        for field, t in zip(BNParams._fields, bn):
            if t is not None:
                backends.check_parameter(name, f"{bn_name} {field}", t, (channels,), x)
        if (bn.running_mean is None) != (bn.running_var is None):
            raise ValueError(f"{name}: {bn_name}: pass both running_mean and running_var, or neither")
        if not training and bn.running_mean is None:
            raise ValueError(f"{name}: eval mode (training=False) needs {bn_name}'s running statistics")
    if training:
        n, _, h, w = x.shape
        if min(n * h * w, n * _strided(h, stride) * _strided(w, stride)) == 1:
            raise ValueError(f"{name}: training needs more than 1 value per channel in every batch norm, "
                             f"got x of shape {tuple(x.shape)} with stride {stride}")


def _reference(x: Tensor, w1: Tensor, bn1: BNParams, w2: Tensor, bn2: BNParams, w3: Tensor, bn3: BNParams,
               wd: Optional[Tensor] = None, bnd: Optional[BNParams] = None, *, stride: int = 1, groups: int = 1,
               training: bool = True, momentum: float = 0.1, eps: float = 1e-5) -> Tensor:
    """One bottleneck block (see the module docstring). x [N, Cin, H, W]; w1 [width, Cin, 1, 1],
    w2 [width, width/groups, 3, 3] (stride and groups apply to it), w3 [Cout, width, 1, 1],
    wd [Cout, Cin, 1, 1] (stride) with bnd for a downsampling shortcut; each bn* a BNParams.
    Training uses batch statistics and updates the running statistics in place (unbiased
    variance, like torch). `backend=` forces one.
    The reference: torchvision's Bottleneck, one op after the other (convolutions in x's
    dtype, as under autocast)."""
    def conv_bn(t, weight, bn, conv_stride=1, padding=0, conv_groups=1):
        a = F.conv2d(t, weight.to(t.dtype), None, conv_stride, padding, 1, conv_groups)
        return F.batch_norm(a, bn.running_mean, bn.running_var, bn.weight, bn.bias, training, momentum, eps)

    shortcut = x if wd is None else conv_bn(x, wd, bnd, stride)
    out = F.relu(conv_bn(x, w1, bn1))
    out = F.relu(conv_bn(out, w2, bn2, stride, 1, groups))
    return F.relu(conv_bn(out, w3, bn3) + shortcut)


def _kernels():
    from engine.kernels import conv_bn as triton_conv_bn
    return triton_conv_bn


def _bn_kernels():
    from engine.kernels import bn_stats
    return bn_stats


def _grouped_ops():
    from engine.ops import grouped_conv
    return grouped_conv


def _grouped_3x3_choice(x: Tensor, width: int, c_out3x3: int, stride: int, groups: int) -> str:
    """How the training block runs its grouped 3x3 (an engine.ops.grouped_conv choice):
    "reference" on cuDNN (bn1's apply pass before it, a statistics pass after), else a
    fused kernel with both in it. On CUDA the fastest, autotuned per shape; on CPU (the
    interpreter, tests) always the Triton kernel, so that the tests check it."""
    if not x.is_cuda:
        return "triton"
    from engine.ops.grouped_conv import tuned_choice
    return tuned_choice((x.shape[0], width, x.shape[2], x.shape[3]), x.dtype, x.device, c_out3x3, stride, groups,
                        True, True, True)


def _triton_supports(x, w1, bn1, w2, bn2, w3, bn3, wd=None, bnd=None, *, stride=1, groups=1, training=True,
                     momentum=0.1, eps=1e-5, forced):
    why = backends.fast_dtype_rejection(x, tensor_core_dots=True)
    if why is not None:
        return why
    if not x.is_contiguous(memory_format=NHWC):
        layout = "NCHW (contiguous)" if x.is_contiguous() else "non-contiguous"
        return (f"x must be channels_last (NHWC): the 1x1 convolutions are GEMMs over [N*H*W, C] rows; "
                f"got {layout} strides {x.stride()}")
    params = [w1, w2, w3, wd] + [t for bn in (bn1, bn2, bn3, bnd) if bn is not None for t in bn]
    if not training and torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in [x] + params):
        return "eval mode runs the folded-weights path, which has no backward; gradients are required here"
    return backends.triton_accepts(x, *params, forced=forced)


def _affine(bn: BNParams, channels: int, like: Tensor) -> BNParams:
    """The kernels always take an affine pair; identity parameters cost two [C] vectors."""
    weight = bn.weight if bn.weight is not None else torch.ones(channels, device=like.device)
    bias = bn.bias if bn.bias is not None else torch.zeros(channels, device=like.device)
    return BNParams(weight, bias, bn.running_mean, bn.running_var)


class _TrainFunction(torch.autograd.Function):
    """The training block on the Triton kernels; running statistics are updated in place."""

    @staticmethod
    def forward(ctx, x, w1, w2, w3, wd, g1, b1, g2, b2, g3, b3, gd, bd, rm1, rv1, rm2, rv2, rm3, rv3, rmd, rvd,
                stride, groups, momentum, eps, choice3):
        k, bn = _kernels(), _bn_kernels()
        dtype = x.dtype
        cin, width, c_out = x.shape[1], w1.shape[0], w3.shape[0]
        # Weights in x's dtype, as autocast would hand them to cuDNN.
        w1c = w1.to(dtype).reshape(width, cin)
        w2c = w2.to(dtype)
        w3c = w3.to(dtype).reshape(c_out, width)
        a1, mean1, invstd1, s1, t1 = k.conv_bn_fwd_triton(x, w1c, None, None, None, None, 1, False,
                                                          g1, b1, rm1, rv1, momentum, eps)
        if choice3 == "reference":
            h1 = bn.conv_bn_apply_triton(a1, s1, t1, None, None, None, True)
            a2 = F.conv2d(h1, w2c, None, stride, 1, 1, groups).contiguous(memory_format=NHWC)
            mean2, invstd2, s2, t2 = bn.conv_bn_stats_triton(a2, g2, b2, rm2, rv2, momentum, eps)
        else:
            # bn1 + ReLU applied on the 3x3's load and bn2's statistics in its epilogue: h1 never exists.
            h1 = None
            a2, mean2, invstd2, s2, t2 = _grouped_ops().conv_bn_forward(
                choice3, a1, w2c, s1, t1, stride, groups, g2, b2, rm2, rv2, momentum, eps)
        a3, mean3, invstd3, s3, t3 = k.conv_bn_fwd_triton(a2, w3c, s2, t2, None, None, 1, False,
                                                          g3, b3, rm3, rv3, momentum, eps)
        if wd is None:
            wdc = ad = meand = invstdd = sd = td = None
            out = bn.conv_bn_apply_triton(a3, s3, t3, x, None, None, True)
        else:
            wdc = wd.to(dtype).reshape(c_out, cin)
            ad, meand, invstdd, sd, td = k.conv_bn_fwd_triton(x, wdc, None, None, None, None, stride, False,
                                                              gd, bd, rmd, rvd, momentum, eps)
            out = bn.conv_bn_apply_triton(a3, s3, t3, ad, sd, td, True)
        ctx.save_for_backward(x, a1, h1, a2, a3, ad, w1c, w2c, w3c, wdc, g1, g2, g3, gd,
                              mean1, invstd1, s1, t1, mean2, invstd2, s2, t2, mean3, invstd3, s3, t3,
                              meand, invstdd, sd, td)
        # Gradients come back in each parameter's own shape and dtype (fp32 master weights under autocast).
        ctx.config = (stride, groups, choice3, [(t.shape, t.dtype) if t is not None else None
                                       for t in (w1, w2, w3, wd, g1, b1, g2, b2, g3, b3, gd, bd)])
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (x, a1, h1, a2, a3, ad, w1c, w2c, w3c, wdc, g1, g2, g3, gd, mean1, invstd1, s1, t1, mean2, invstd2, s2, t2,
         mean3, invstd3, s3, t3, meand, invstdd, sd, td) = ctx.saved_tensors
        stride, groups, choice3, param_specs = ctx.config
        k, bn = _kernels(), _bn_kernels()
        n, _, h, w = x.shape
        m_in = n * h * w
        m_out = n * a3.shape[2] * a3.shape[3]
        g = grad_out.contiguous(memory_format=NHWC)
        has_ds = ad is not None
        gm, sums3 = bn.conv_bn_bwd_reduce_triton(g, a3, s3, t3, mean3, ad if has_ds else x, sd, td, meand, True)
        dg3, db3, kg3, kx3, k03 = bn.conv_bn_bwd_coeff_triton(sums3[0], sums3[1], mean3, invstd3, g3, m_out)
        dh2, sums2 = k.conv_bn_dgrad_triton(gm, a3, kg3, kx3, k03, None, None, w3c, a2, s2, t2, mean2, None, 1)
        dw3 = k.conv_bn_wgrad_triton(gm, a3, kg3, kx3, k03, None, None, a2, s2, t2, 1)
        dg2, db2, kg2, kx2, k02 = bn.conv_bn_bwd_coeff_triton(sums2[0], sums2[1], mean2, invstd2, g2, m_out)
        # The 3x3's output gradient: bn2's backward, a pass of its own that cuDNN's opaque call forces
        # (the fused 3x3 could take it in its dgrad and wgrad prologues instead; not done yet).
        da2 = bn.conv_bn_apply_triton(a2, kx2, k02, dh2, kg2, torch.zeros_like(k02), False)
        if h1 is not None:
            dh1, dw2, _ = torch.ops.aten.convolution_backward(da2, h1, w2c, None, [stride, stride], [1, 1], [1, 1],
                                                              False, [0, 0], groups, [True, True, False])
            dh1 = dh1.contiguous(memory_format=NHWC)
        else:
            gc = _grouped_ops()
            dh1 = gc.conv_dgrad(choice3, da2, w2c, [h, w], stride, groups)
            # h1 recomputed from a1 on load, as in the forward.
            dw2 = gc.conv_wgrad(choice3, da2, a1, s1, t1, w2c.shape[0], stride, groups)
        _, sums1 = bn.conv_bn_bwd_reduce_triton(dh1, a1, s1, t1, mean1, None, None, None, None, False)
        dg1, db1, kg1, kx1, k01 = bn.conv_bn_bwd_coeff_triton(sums1[0], sums1[1], mean1, invstd1, g1, m_in)
        dwd = dgd = dbd = None
        if has_ds:
            dgd, dbd, kgd, kxd, k0d = bn.conv_bn_bwd_coeff_triton(sums3[0], sums3[2], meand, invstdd, gd, m_out)
            dwd = k.conv_bn_wgrad_triton(gm, ad, kgd, kxd, k0d, None, None, x, None, None, stride)
        dx = None
        if ctx.needs_input_grad[0]:
            if has_ds:
                shortcut, _ = k.conv_bn_dgrad_triton(gm, ad, kgd, kxd, k0d, None, None, wdc, None, None, None, None,
                                                     None, 1)
            else:
                shortcut = gm
            dx, _ = k.conv_bn_dgrad_triton(dh1, a1, kg1, kx1, k01, s1, t1, w1c, None, None, None, None,
                                           shortcut, stride if has_ds else 1)
        dw1 = k.conv_bn_wgrad_triton(dh1, a1, kg1, kx1, k01, s1, t1, x, None, None, 1)

        grads = (dw1, dw2, dw3, dwd, dg1, db1, dg2, db2, dg3, db3, dgd, dbd)
        param_grads = [None if d is None else d.reshape(spec[0]).to(spec[1]) for d, spec in zip(grads, param_specs)]
        return (dx, *param_grads, *([None] * 13))


def _folded_forward(x, w1, bn1, w2, bn2, w3, bn3, wd, bnd, stride, groups, eps):
    k = _kernels()
    dtype = x.dtype
    cin, width, c_out = x.shape[1], w1.shape[0], w3.shape[0]

    def fold(w, bn):
        return k.conv_bn_fold_triton(w, bn.weight, bn.bias, bn.running_mean, bn.running_var, eps, dtype)

    w1f, b1f = fold(w1, bn1)
    w2f, b2f = fold(w2, bn2)
    w3f, b3f = fold(w3, bn3)
    h1 = k.conv_bn_fwd_triton(x, w1f.reshape(width, cin), None, None, b1f, None, 1, True,
                              None, None, None, None, 0.0, eps)[0]
    # bn2's bias and ReLU are applied in conv3's prologue, so the 3x3's output is final as written. The
    # 3x3 is the grouped_conv3x3 op: on a GPU the fastest of cuDNN and the fused kernels for this shape.
    a2 = _grouped_ops().grouped_conv3x3(h1, w2f, stride=stride, groups=groups).contiguous(memory_format=NHWC)
    shortcut = x
    if wd is not None:
        wdf, bdf = fold(wd, bnd)
        shortcut = k.conv_bn_fwd_triton(x, wdf.reshape(c_out, cin), None, None, bdf, None, stride, False,
                                        None, None, None, None, 0.0, eps)[0]
    return k.conv_bn_fwd_triton(a2, w3f.reshape(c_out, width), torch.ones_like(b2f), b2f, b3f, shortcut, 1, True,
                                None, None, None, None, 0.0, eps)[0]


def _triton(x, w1, bn1, w2, bn2, w3, bn3, wd=None, bnd=None, *, stride=1, groups=1,
                              training=True, momentum=0.1, eps=1e-5):
    width, c_out = w1.shape[0], w3.shape[0]
    bn1, bn2, bn3 = _affine(bn1, width, x), _affine(bn2, width, x), _affine(bn3, c_out, x)
    bnd = _affine(bnd, c_out, x) if bnd is not None else BNParams(None, None, None, None)
    if not training:
        return _folded_forward(x, w1, bn1, w2, bn2, w3, bn3, wd, bnd, stride, groups, eps)
    return _TrainFunction.apply(x, w1, w2, w3, wd, bn1.weight, bn1.bias, bn2.weight, bn2.bias, bn3.weight, bn3.bias,
                                bnd.weight, bnd.bias, bn1.running_mean, bn1.running_var, bn2.running_mean,
                                bn2.running_var, bn3.running_mean, bn3.running_var, bnd.running_mean,
                                bnd.running_var, int(stride), int(groups), float(momentum), float(eps),
                                _grouped_3x3_choice(x, w1.shape[0], w2.shape[0], stride, groups))


conv_bn_bottleneck = define("conv_bn_bottleneck", _reference, validate=_check_inputs)
conv_bn_bottleneck.register("triton", _triton, available=backends.triton_status,
                            scope=backends.triton_scope, supports=_triton_supports)
