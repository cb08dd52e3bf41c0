"""conv_bn: each Triton kernel (forward and backward) against plain PyTorch, and the whole
fused bottleneck against torchvision's Bottleneck with the same weights: training
(output, running statistics, every gradient) and eval (output), fp32 and fp16, identity
and downsampling (stride 1 and 2) shortcuts, channels that are not multiples of the tiles."""


import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import Bottleneck as TorchvisionBottleneck

from engine.kernels import bn_stats
from engine.kernels import conv_bn as K
from engine.models import ConvBNBottleneck
from engine.ops import BackendUnavailableError
from engine.ops.conv_bn import BNParams, conv_bn_bottleneck

# The GPU when there is one, else Triton's interpreter (conftest sets TRITON_INTERPRET=1).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NHWC = torch.channels_last
# (dtype, tol): tol bounds a result stored in dtype against the fp32 reference computed from
# the same rounded inputs (a few half-ulps, both relative and absolute). bfloat16 only on a
# GPU: bf16 tl.dot is wrong in Triton's interpreter.
CPU_DTYPES = [(torch.float32, 1e-5), (torch.float16, 2e-3)]
BF16 = (torch.bfloat16, 1.6e-2)
DTYPES = CPU_DTYPES + [pytest.param(*BF16, marks=pytest.mark.gpu)]
# Results the kernels keep in fp32 (statistics, sums, weight gradients): summation order only.
FP32_ATOL, FP32_RTOL = 1e-4, 1e-5


@pytest.fixture(autouse=True)
def _exact_fp32():
    # fp32 references on a GPU must not use TF32 (the kernels compute fp32 exactly).
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def nhwc(shape, dtype=torch.float32, scale=1.0, offset=0.0):
    return (torch.randn(shape) * scale + offset).to(device=DEVICE, dtype=dtype).contiguous(memory_format=NHWC)


def vec(c, low=None, high=None):
    t = torch.randn(c) if low is None else torch.rand(c) * (high - low) + low
    return t.to(DEVICE)


def per_channel(v):
    return v.view(1, -1, 1, 1)


def assert_close(actual, expected, atol, rtol, what):
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


def assert_fp32_close(actual, expected, what):
    assert actual.dtype == torch.float32, what
    assert_close(actual, expected, FP32_ATOL, FP32_RTOL, what)


def assert_close_scaled(actual, expected, tol, what):
    """Within tol of the expected tensor's largest magnitude: for half-precision results
    whose error scales with the whole tensor (sums over the batch), not element by element."""
    err = (actual.float() - expected.float()).abs().max().item()
    bound = tol * max(expected.float().abs().max().item(), 1e-3)
    assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g} ({tol} x max |expected|)"


def batch_stats(y):
    y = y.double()
    return y.mean((0, 2, 3)), y.var((0, 2, 3), unbiased=False), y.var((0, 2, 3), unbiased=True)


# ---------------------------------------------------------------- forward kernels

@pytest.mark.parametrize("dtype, tol", DTYPES)
@pytest.mark.parametrize("case", ["bn_relu_prologue_stats", "stride2_stats", "eval_epilogue"])
def test_forward_gemm(dtype, tol, case):
    n, k, n_out, h, w = 2, 19, 37, 7, 5
    stride = 2 if case == "stride2_stats" else 1
    # A mean far from zero against the spread checks that the statistics do not cancel.
    x = nhwc((n, k, h, w), dtype, scale=2.0, offset=3.0)
    weight = (torch.randn(n_out, k) / k ** 0.5).to(DEVICE, dtype)
    prologue = case != "stride2_stats"
    in_scale, in_shift = (vec(k, 0.5, 1.5), vec(k)) if prologue else (None, None)
    ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
    bias = vec(n_out) if case == "eval_epilogue" else None
    residual = nhwc((n, n_out, ho, wo), dtype) if case == "eval_epilogue" else None
    stats = case != "eval_epilogue"
    gamma, beta = vec(n_out, 0.5, 1.5), vec(n_out)
    running = (vec(n_out), vec(n_out, 0.5, 1.5)) if case == "bn_relu_prologue_stats" else (None, None)
    rm0, rv0 = (t.clone() if t is not None else None for t in running)
    y, mean, invstd, scale, shift = K.conv_bn_fwd_triton(
        x, weight, in_scale, in_shift, bias, residual, stride, case == "eval_epilogue",
        gamma if stats else None, beta if stats else None, *running, 0.1, 1e-5)

    inp = x.float()
    if prologue:
        inp = F.relu(inp * per_channel(in_scale) + per_channel(in_shift)).to(dtype).float()
    expected = F.conv2d(inp, weight.float().view(n_out, k, 1, 1), stride=stride)
    if case == "eval_epilogue":
        expected = F.relu(expected + per_channel(bias) + residual.float())
    assert y.shape == (n, n_out, ho, wo) and y.dtype == dtype and y.is_contiguous(memory_format=NHWC)
    assert_close(y, expected, tol, tol, "y")
    if not stats:
        assert mean.numel() == 0
        return
    # The statistics are those of y as stored.
    m, var, unbiased = batch_stats(y)
    invstd_ref = (var + 1e-5).rsqrt()
    assert_fp32_close(mean, m, "mean")
    assert_fp32_close(invstd, invstd_ref, "invstd")
    assert_fp32_close(scale, gamma.double() * invstd_ref, "scale")
    assert_fp32_close(shift, beta.double() - m * gamma.double() * invstd_ref, "shift")
    if running[0] is not None:
        assert_fp32_close(running[0], 0.9 * rm0.double() + 0.1 * m, "running_mean")
        assert_fp32_close(running[1], 0.9 * rv0.double() + 0.1 * unbiased, "running_var")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_stats_pass_does_not_cancel(dtype):
    # A mean 1000 standard deviations from zero: E[x^2] - E[x]^2 in fp32 would be off by
    # several percent of the variance (the ulp of 1e6 is 0.06).
    x = nhwc((3, 21, 6, 5), dtype, scale=1.0, offset=1000.0)
    c = x.shape[1]
    gamma, beta, rm, rv = vec(c, 0.5, 1.5), vec(c), torch.zeros(c, device=DEVICE), torch.ones(c, device=DEVICE)
    mean, invstd, scale, shift = bn_stats.conv_bn_stats_triton(x, gamma, beta, rm, rv, 0.3, 1e-5)
    m, var, unbiased = batch_stats(x)
    assert_close(mean, m, 0, 1e-6, "mean")
    assert_close(invstd, (var + 1e-5).rsqrt(), 0, 1e-4, "invstd")
    assert_close(scale, gamma.double() * (var + 1e-5).rsqrt(), 0, 1e-4, "scale")
    assert_close(rm, 0.3 * m, 0, 1e-6, "running_mean")
    assert_close(rv, 0.7 + 0.3 * unbiased, 0, 1e-4, "running_var")


@pytest.mark.parametrize("dtype, tol", CPU_DTYPES)
@pytest.mark.parametrize("residual", ["none", "plain", "affine"])
def test_apply(dtype, tol, residual):
    x = nhwc((2, 37, 5, 7), dtype)
    c = x.shape[1]
    scale, shift = vec(c), vec(c)
    r = nhwc(x.shape, dtype) if residual != "none" else None
    r_scale, r_shift = (vec(c), vec(c)) if residual == "affine" else (None, None)
    relu = residual != "none"
    y = bn_stats.conv_bn_apply_triton(x, scale, shift, r, r_scale, r_shift, relu)
    expected = x.float() * per_channel(scale) + per_channel(shift)
    if residual == "plain":
        expected = expected + r.float()
    if residual == "affine":
        expected = expected + r.float() * per_channel(r_scale) + per_channel(r_shift)
    expected = F.relu(expected) if relu else expected
    assert y.is_contiguous(memory_format=NHWC)
    assert_close(y, expected, tol, tol, "y")


@pytest.mark.parametrize("dtype, tol", CPU_DTYPES)
def test_fold_matches_conv_then_batch_norm(dtype, tol):
    eps = 1e-5
    x = nhwc((2, 12, 5, 6), dtype)
    for weight, groups, padding in [(torch.randn(20, 12, 1, 1), 1, 0), (torch.randn(12, 3, 3, 3), 4, 1)]:
        weight = weight.to(DEVICE)
        c = weight.shape[0]
        gamma, beta, rm, rv = vec(c, 0.5, 1.5), vec(c), vec(c), vec(c, 0.5, 1.5)
        folded, bias = K.conv_bn_fold_triton(weight, gamma, beta, rm, rv, eps, dtype)
        assert folded.shape == weight.shape and folded.dtype == dtype and bias.dtype == torch.float32
        y = F.conv2d(x.float(), folded.float(), bias, 1, padding, 1, groups)
        expected = F.batch_norm(F.conv2d(x.float(), weight, None, 1, padding, 1, groups), rm, rv, gamma, beta,
                                False, 0.0, eps)
        # The folded weight is rounded to dtype once: a few ulps of each product.
        assert_close_scaled(y, expected, 2 * tol, f"folded conv, groups={groups}")


# ---------------------------------------------------------------- backward kernels

@pytest.mark.parametrize("dtype, tol", CPU_DTYPES)
@pytest.mark.parametrize("residual", ["none", "plain", "batch_norm"])
def test_bwd_reduce_and_coefficients_match_autograd(dtype, tol, residual):
    """The tail (bn3 [+ downsample bn] + add + ReLU) and bn1's backward, against autograd
    through F.batch_norm in training mode."""
    shape = (2, 37, 6, 5)
    c, count = shape[1], shape[0] * shape[2] * shape[3]
    a = nhwc(shape, dtype, scale=2.0, offset=1.0)
    r = nhwc(shape, dtype, offset=0.5) if residual != "none" else None
    g = nhwc(shape, dtype)
    gamma, beta, eps = vec(c, 0.5, 1.5), vec(c), 1e-5
    r_gamma, r_beta = vec(c, 0.5, 1.5), vec(c)

    leaves = [t.detach().float().requires_grad_() for t in (a, gamma, beta, r_gamma, r_beta)]
    ar = r.detach().float().requires_grad_() if r is not None else None
    y = F.batch_norm(leaves[0], None, None, leaves[1], leaves[2], True, 0.0, eps)
    if residual == "plain":
        y = y + ar
    if residual == "batch_norm":
        y = y + F.batch_norm(ar, None, None, leaves[3], leaves[4], True, 0.0, eps)
    y = F.relu(y)
    wanted = leaves[:3] + ([ar] if r is not None else []) + (leaves[3:] if residual == "batch_norm" else [])
    expected = torch.autograd.grad(y, wanted, g.float())

    def forward_stats(t):
        m, var, _ = batch_stats(t)
        return m.float(), (var + eps).rsqrt().float()

    mean, invstd = forward_stats(a)
    scale, shift = gamma * invstd, beta - mean * gamma * invstd
    r_bn = residual == "batch_norm"
    if r_bn:
        r_mean, r_invstd = forward_stats(r)
        r_scale, r_shift = r_gamma * r_invstd, r_beta - r_mean * r_gamma * r_invstd
    masked, sums = bn_stats.conv_bn_bwd_reduce_triton(g, a, scale, shift, mean, r, r_scale if r_bn else None,
                                               r_shift if r_bn else None, r_mean if r_bn else None, r is not None)
    assert sums.shape == (3 if r_bn else 2, c)
    dweight, dbias, k_g, k_x, k_0 = bn_stats.conv_bn_bwd_coeff_triton(sums[0], sums[1], mean, invstd, gamma, count)
    da = masked.float() if r is not None else torch.where(a.float() * per_channel(scale) + per_channel(shift) > 0,
                                                          g.float(), 0.0)
    da = da * per_channel(k_g) + a.float() * per_channel(k_x) + per_channel(k_0)
    # All in fp32 from the same rounded inputs; batch-norm gradients subtract batch means, so
    # their error is compared with each tensor's scale.
    assert_close_scaled(da, expected[0], FP32_RTOL, "da")
    assert_close_scaled(dweight, expected[1], FP32_RTOL, "dweight")
    assert_close_scaled(dbias, expected[2], FP32_RTOL, "dbias")
    if r is not None:
        if residual == "plain":
            assert_close(masked, expected[3], 0, 0, "residual gradient (the masked gradient)")
        else:
            dgd, dbd, kgd, kxd, k0d = bn_stats.conv_bn_bwd_coeff_triton(sums[0], sums[2], r_mean, r_invstd, r_gamma, count)
            dr = masked.float() * per_channel(kgd) + r.float() * per_channel(kxd) + per_channel(k0d)
            assert_close_scaled(dr, expected[3], FP32_RTOL, "d residual")
            assert_close_scaled(dgd, expected[4], FP32_RTOL, "residual bn dweight")
            assert_close_scaled(dbd, expected[5], FP32_RTOL, "residual bn dbias")
    else:
        assert masked.numel() == 0


def _bn_backward_inputs(shape, dtype, with_mask):
    """A gradient, a pre-norm tensor and arbitrary coefficients: the GEMM kernels' contract
    is da = k_g * g' + k_x * a + k_0 whatever the coefficients."""
    c = shape[1]
    g, a = nhwc(shape, dtype), nhwc(shape, dtype, offset=0.3)
    k_g, k_x, k_0 = vec(c), vec(c), vec(c)
    g_scale, g_shift = (vec(c, 0.5, 1.5), vec(c)) if with_mask else (None, None)
    gm = g.float()
    if with_mask:
        gm = torch.where(a.float() * per_channel(g_scale) + per_channel(g_shift) > 0, gm, 0.0)
    da = (gm * per_channel(k_g) + a.float() * per_channel(k_x) + per_channel(k_0)).to(dtype).float()
    return g, a, (k_g, k_x, k_0), (g_scale, g_shift), da


def _conv1x1(t, weight, stride=1):
    return F.conv2d(t, weight.float().view(weight.shape[0], weight.shape[1], 1, 1), stride=stride)


def _dgrad_reference(da, weight):
    # The input gradient of a stride-1 1x1 convolution: da [n, N, h, w] @ weight [N, K].
    return torch.einsum("bnhw,nk->bkhw", da, weight.float())


@pytest.mark.parametrize("dtype, tol", DTYPES)
@pytest.mark.parametrize("case", ["epilogue_bn_relu_sums", "prologue_relu_residual", "stride2_shortcut"])
def test_dgrad(dtype, tol, case):
    n, n_out, k, h, w = 2, 37, 21, 6, 7
    g, a, coeffs, masks, da = _bn_backward_inputs((n, n_out, h, w), dtype, with_mask=case != "epilogue_bn_relu_sums")
    weight = (torch.randn(n_out, k) / n_out ** 0.5).to(DEVICE, dtype)
    x_in = in_scale = in_shift = in_mean = residual = None
    res_stride = 1
    if case == "epilogue_bn_relu_sums":
        x_in, in_scale, in_shift, in_mean = nhwc((n, k, h, w), dtype), vec(k, 0.5, 1.5), vec(k), vec(k)
    elif case == "prologue_relu_residual":
        residual = nhwc((n, k, h, w), dtype)
    else:
        res_stride = 2
        residual = nhwc((n, k, (h - 1) // 2 + 1, (w - 1) // 2 + 1), dtype)
    dx, sums = K.conv_bn_dgrad_triton(g, a, *coeffs, *masks, weight, x_in, in_scale, in_shift, in_mean, residual,
                                      res_stride)
    expected = _dgrad_reference(da, weight)
    if x_in is not None:
        expected = torch.where(x_in.float() * per_channel(in_scale) + per_channel(in_shift) > 0, expected, 0.0)
    if residual is not None:
        if res_stride == 1:
            expected = expected + residual.float()
        else:
            # The shortcut read pixels (2i, 2j): its input gradient lands there and nowhere else.
            expected[:, :, ::2, ::2] += residual.float()
    assert dx.shape == (n, k, h, w) and dx.dtype == dtype and dx.is_contiguous(memory_format=NHWC)
    assert_close(dx, expected, tol, tol, "dx")
    if x_in is None:
        assert sums.numel() == 0
        return
    dxf = dx.float()
    assert_fp32_close(sums[0], dxf.sum((0, 2, 3)), "sum of masked dx")
    assert_fp32_close(sums[1], (dxf * (x_in.float() - per_channel(in_mean))).sum((0, 2, 3)),
                 "sum of masked dx * (x - mean)")


@pytest.mark.parametrize("dtype, tol", DTYPES)
@pytest.mark.parametrize("case", ["prologue_relu_mask", "normalised_input", "stride2"])
def test_wgrad(dtype, tol, case):
    n, n_out, k, h, w = 2, 37, 21, 7, 6
    stride = 2 if case == "stride2" else 1
    ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
    g, a, coeffs, masks, da = _bn_backward_inputs((n, n_out, ho, wo), dtype, with_mask=case == "prologue_relu_mask")
    x = nhwc((n, k, h, w), dtype, offset=0.2)
    in_scale, in_shift = (vec(k, 0.5, 1.5), vec(k)) if case == "normalised_input" else (None, None)
    dw = K.conv_bn_wgrad_triton(g, a, *coeffs, *masks, x, in_scale, in_shift, stride)
    inp = x.float()
    if in_scale is not None:
        inp = F.relu(inp * per_channel(in_scale) + per_channel(in_shift)).to(dtype).float()
    expected = torch.einsum("bnhw,bkhw->nk", da, inp[:, :, ::stride, ::stride])
    assert dw.shape == (n_out, k) and dw.dtype == torch.float32
    assert_fp32_close(dw, expected, "dweight")


# ---------------------------------------------------------------- the whole block

def make_pair(inplanes, planes, stride, with_downsample, groups=4, base_width=8):
    """torchvision's Bottleneck and ours with the same (non-trivial) weights."""
    def downsample():
        if not with_downsample:
            return None
        return nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, stride=stride, bias=False), nn.BatchNorm2d(planes * 4))

    theirs = TorchvisionBottleneck(inplanes, planes, stride, downsample(), groups, base_width)
    for m in theirs.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.normal_(m.bias, 0.0, 0.5)
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 1.5)
    ours = ConvBNBottleneck(inplanes, planes, stride, downsample(), groups, base_width)
    ours.load_state_dict(theirs.state_dict())
    return theirs.to(DEVICE), ours.to(DEVICE)


# (inplanes, planes, stride, downsample): a later block, layer1.0 (stride-1 downsample), a stage's first block
BLOCKS = {"identity": (32, 8, 1, False), "downsample_s1": (16, 8, 1, True), "downsample_s2": (16, 8, 2, True)}


# Every block in every dtype, except the stride-1 downsample (layer1.0) in fp32 only: it
# differs from the others in no kernel path that depends on the dtype.
BLOCK_CASES = ([(*spec, block) for spec in CPU_DTYPES for block in ("identity", "downsample_s2")]
               + [pytest.param(*BF16, block, marks=pytest.mark.gpu) for block in ("identity", "downsample_s2")]
               + [(*CPU_DTYPES[0], "downsample_s1")])


@pytest.mark.parametrize("dtype, tol, block", BLOCK_CASES)
def test_block_matches_torchvision(dtype, tol, block):
    check_block_against_torchvision(dtype, tol, block)


# How the training block runs its grouped 3x3 besides the Triton kernel the CPU picks: "reference"
# is bn1's apply pass, ATen's convolution (cuDNN on a GPU) and a statistics pass, what the block
# runs whenever the autotuner picks cuDNN; "cuda" is the direct kernels (their C++ loop here).
@pytest.mark.parametrize("choice", ["reference", "cuda"], ids=["aten_3x3", "direct_3x3"])
@pytest.mark.parametrize("dtype, tol, block", [(*spec, block) for spec in CPU_DTYPES
                                               for block in ("identity", "downsample_s2")])
def test_block_3x3_paths_match_torchvision(monkeypatch, choice, dtype, tol, block):
    if choice == "cuda":
        pytest.importorskip("engine.ops._cuda_grouped_conv")
    import engine.ops.conv_bn as conv_bn_module
    chosen = []

    def forced_choice(*args):
        chosen.append(choice)
        return choice

    monkeypatch.setattr(conv_bn_module, "_grouped_3x3_choice", forced_choice)
    check_block_against_torchvision(dtype, tol, block)
    assert chosen, "the training block never asked how to run its 3x3"


def check_block_against_torchvision(dtype, tol, block):
    inplanes, planes, stride, with_downsample = BLOCKS[block]
    theirs, ours = make_pair(inplanes, planes, stride, with_downsample)
    ours.backend = "triton"
    x = nhwc((2, inplanes, 7, 6), torch.float32)
    x_ours = x.to(dtype).requires_grad_()
    # torchvision's block in fp32 on the same (rounded) input: what half precision approximates.
    x_theirs = x_ours.detach().float().requires_grad_()

    y_theirs = theirs(x_theirs)
    y_ours = ours(x_ours)
    grad = torch.randn_like(y_theirs)
    y_theirs.backward(grad)
    y_ours.backward(grad.to(dtype))
    assert y_ours.dtype == dtype and y_ours.is_contiguous(memory_format=NHWC)
    assert conv_bn_bottleneck.last_decision.backend == "triton"
    # Three convolutions and batch norms deep, with every intermediate rounded to dtype: a
    # few ulps of the output's scale; the running statistics are fp32 sums.
    assert_close_scaled(y_ours, y_theirs, 2 * tol, "train output")
    theirs_state, ours_state = theirs.state_dict(), ours.state_dict()
    for key, value in theirs_state.items():
        if "running" in key or "num_batches" in key:
            assert_close_scaled(ours_state[key], value, 2 * tol, key)
    grads = [("x", x_ours.grad, x_theirs.grad)] + [
        (name, p.grad, dict(theirs.named_parameters())[name].grad) for name, p in ours.named_parameters()]
    assert len(grads) == 1 + len(list(theirs.parameters()))
    for name, actual, expected in grads:
        assert actual is not None, name
        assert actual.dtype == (dtype if name == "x" else expected.dtype), name
        # Batch-norm backward subtracts batch means: compare against each gradient's scale.
        assert_close_scaled(actual, expected, 3 * tol, f"gradient of {name}")

    theirs.eval()
    ours.eval()
    with torch.no_grad():
        y_theirs = theirs(x_theirs)
        y_ours = ours(x_ours)
    assert conv_bn_bottleneck.last_decision.backend == "triton"
    assert_close_scaled(y_ours, y_theirs, 2 * tol, "eval output")


def test_state_dict_is_torchvisions():
    for inplanes, planes, stride, with_downsample in BLOCKS.values():
        theirs, ours = make_pair(inplanes, planes, stride, with_downsample)
        ours_state, theirs_state = ours.state_dict(), theirs.state_dict()
        assert list(ours_state) == list(theirs_state)
        assert all(ours_state[k].shape == v.shape for k, v in theirs_state.items())
        theirs.load_state_dict(ours_state)


def test_reference_backend_is_torchvisions_block():
    """On CPU tensors the dispatcher picks the reference and says why not Triton; the reference
    matches torchvision, including momentum=None (a cumulative average)."""
    theirs, ours = make_pair(16, 8, 2, True)
    for module in list(theirs.modules()) + list(ours.modules()):
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None
    x = nhwc((2, 16, 6, 6))
    for _ in range(2):
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-4)
    if DEVICE == "cpu":
        decision = conv_bn_bottleneck.last_decision
        assert decision.backend == "reference" and not decision.forced
        assert "CPU" in decision.skipped["triton"]
    for key, value in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_cumulative_average_has_no_host_sync(backend, host_reads):
    """momentum=None (nn.BatchNorm2d's cumulative moving average): the factor 1/batches stays
    on the device, and the four norms' running statistics match torchvision's block."""
    theirs, ours = make_pair(16, 8, 2, True)
    ours.backend = backend
    for module in list(theirs.modules()) + list(ours.modules()):
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None
    for _ in range(3):
        x = nhwc((2, 16, 6, 5))
        with host_reads() as mode:
            y = ours(x)
        assert mode.reads == 0
        torch.testing.assert_close(y, theirs(x), atol=1e-4, rtol=1e-4)
    for key, value in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value, atol=1e-5, rtol=1e-5, msg=lambda m: f"{key}: {m}")
    assert ours.bn1.num_batches_tracked.item() == 3


def test_traces_under_torch_compile():
    """The fake implementations let torch.compile trace every custom op, forward and backward."""
    torch._dynamo.reset()
    theirs, ours = make_pair(16, 8, 2, True)
    ours.backend = "triton"
    x = nhwc((2, 16, 6, 5))
    compiled = torch.compile(ours, backend="aot_eager", fullgraph=True)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = compiled(x1)
    y_ref = theirs(x2)
    grad = torch.randn_like(y_ref)
    y.backward(grad)
    y_ref.backward(grad)
    torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours.bn2.running_var, theirs.bn2.running_var)
    torch.testing.assert_close(ours.conv1.weight.grad, theirs.conv1.weight.grad, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- bad input

def _block_args(cin=16, width=8, c_out=32, groups=4, dtype=torch.float32):
    def bn(c):
        return BNParams(*(f(c, dtype=dtype) for f in (torch.ones, torch.zeros, torch.zeros, torch.ones)))
    return dict(x=torch.randn(2, cin, 5, 5, dtype=dtype).contiguous(memory_format=NHWC),
                w1=torch.randn(width, cin, 1, 1, dtype=dtype), bn1=bn(width),
                w2=torch.randn(width, width // groups, 3, 3, dtype=dtype), bn2=bn(width),
                w3=torch.randn(c_out, width, 1, 1, dtype=dtype), bn3=bn(c_out),
                wd=torch.randn(c_out, cin, 1, 1, dtype=dtype), bnd=bn(c_out), stride=2, groups=groups, training=True)


def _call(args, **overrides):
    args = dict(args, **overrides)
    return conv_bn_bottleneck(args.pop("x"), args.pop("w1"), args.pop("bn1"), args.pop("w2"), args.pop("bn2"),
                              args.pop("w3"), args.pop("bn3"), args.pop("wd"), args.pop("bnd"), **args)


def test_forced_triton_names_what_it_cannot_run():
    args = _block_args()
    with pytest.raises(BackendUnavailableError, match=r"channels_last \(NHWC\).*got NCHW"):
        _call(args, x=args["x"].contiguous(), backend="triton")
    with pytest.raises(BackendUnavailableError, match="float64"):
        _call(_block_args(dtype=torch.float64), backend="triton")
    w1 = args["w1"].clone().requires_grad_()
    with pytest.raises(BackendUnavailableError, match="no backward"):
        _call(args, w1=w1, training=False, backend="triton")
    # The reference takes all of them.
    _call(args, x=args["x"].contiguous(), backend="reference")
    _call(_block_args(dtype=torch.float64), backend="reference")


@pytest.mark.parametrize("bad, message", [
    (dict(x=torch.randint(0, 3, (2, 16, 5, 5))), "floating-point"),
    (dict(x=torch.randn(2, 16, 5)), "4-D"),
    (dict(x=torch.randn(0, 16, 5, 5)), "empty batch"),
    (dict(x=torch.randn(2, 12, 5, 5)), r"conv1 weight must have shape \[8, 12, 1, 1\]"),
    (dict(w3=torch.randn(32, 6, 1, 1)), r"conv3 weight must have shape \[32, 8, 1, 1\]"),
    (dict(w2=torch.randn(8, 8, 3, 3)), r"conv2 weight must have shape \[8, 2, 3, 3\]"),
    (dict(bn2=BNParams(torch.ones(7), None, None, None)), r"bn2 weight must have shape \[8\]"),
    (dict(wd=None), "both the downsample weight and its batch norm"),
    (dict(wd=None, bnd=None), "shortcut is x itself"),
    (dict(training=False, bn3=BNParams(None, None, None, None)), "eval mode .* needs bn3's running statistics"),
    (dict(x=torch.randn(1, 16, 2, 1).contiguous(memory_format=NHWC)), "more than 1 value per channel"),
])
def test_bad_input_is_named(bad, message):
    with pytest.raises((ValueError, TypeError), match=message):
        _call(_block_args(), **bad)


def test_module_rejects_a_downsample_it_cannot_fuse():
    conv = nn.Conv2d(16, 32, 1, stride=2, bias=False)
    with pytest.raises(ValueError, match="downsample must be nn.Sequential"):
        ConvBNBottleneck(16, 8, 2, nn.Sequential(conv, nn.ReLU()), 4, 8)
    with pytest.raises(ValueError, match="at the block's stride 1"):
        ConvBNBottleneck(16, 8, 1, nn.Sequential(conv, nn.BatchNorm2d(32)), 4, 8)
    block = ConvBNBottleneck(32, 8, 1, None, 4, 8)
    block.bn2.eps = 1e-3
    with pytest.raises(ValueError, match="must share eps"):
        block(torch.randn(2, 32, 4, 4))
