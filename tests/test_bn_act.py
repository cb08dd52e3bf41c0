"""bn_act's Triton and CUDA backends against the reference: output, running stats and
every gradient, in both layouts, training and eval, with and without residual/ReLU."""

import os

import pytest
import torch
import torch.nn.functional as F

from engine.ops import BackendUnavailableError, BatchNormAct2d, bn_act

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
# Where the single-device tests run: the GPU when there is one, else Triton's interpreter.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FUSED = ["triton", "cuda"]
SHAPES = [
    (2, 37, 5, 7),   # channels not a multiple of the 32-channel tile, odd spatial size
    (1, 3, 4, 4),    # a batch of one
    (3, 70, 1, 1),   # 1x1 spatial, as after global pooling
    (2, 64, 11, 9),  # more rows than one tile in NHWC
    (3, 20, 11, 9),  # several row tiles and reduction splits in both layouts
]
# (residual, relu): the three ways the ResNeXt uses it
EPILOGUES = [(False, False), (False, True), (True, True)]
# (dtype, tol): the largest error of each result against the fp32 reference on the same rounded
# inputs, relative to that result's largest magnitude. Measured on the CPU backends (Triton's
# interpreter, the C++ loop) over every case below: fp16 at most 5.1e-4 (dx, half an ulp of
# 2^-10 at the scale), bf16 1.1e-3 (the output; bf16's ulp is 2^-7). Each bound is one ulp of
# its dtype at the value's scale: a dropped term or a scale off by 1% in a gradient fails.
DTYPES = [(torch.float32, 1e-5), (torch.float16, 2.0 ** -10), (torch.bfloat16, 2.0 ** -7)]


def make_inputs(shape, dtype, device, channels_last, residual, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    # A large mean relative to the spread checks that the statistics do not cancel.
    x = torch.randn(shape, generator=g) * 3 + 20
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = x.to(device=device, dtype=dtype).to(memory_format=fmt)
    res = torch.randn(shape, generator=g).to(device=device, dtype=dtype).to(memory_format=fmt) if residual else None
    params = dict(weight=torch.randn(c, generator=g).to(device), bias=torch.randn(c, generator=g).to(device),
                  running_mean=torch.randn(c, generator=g).to(device),
                  running_var=(torch.rand(c, generator=g) + 0.5).to(device))
    grad = torch.randn(shape, generator=g).to(device=device, dtype=dtype).to(memory_format=fmt)
    return x, res, params, grad


def run(fn, x, res, params, grad, training, relu, **kw):
    x = x.detach().clone().requires_grad_()
    res = res.detach().clone().requires_grad_() if res is not None else None
    w = params["weight"].clone().requires_grad_()
    b = params["bias"].clone().requires_grad_()
    rm, rv = params["running_mean"].clone(), params["running_var"].clone()
    y = fn(x, rm, rv, w, b, training, 0.1, 1e-5, residual=res, relu=relu, **kw)
    inputs = [x, w, b] + ([res] if res is not None else [])
    grads = torch.autograd.grad(y, inputs, grad)
    return y, rm, rv, grads


def reference_fp32(x, rm, rv, w, b, training, momentum, eps, residual=None, relu=False):
    """The reference on upcast inputs: what a half-precision kernel should approximate."""
    out = bn_act.reference(x.float(), rm, rv, w, b, training, momentum, eps,
                           residual=residual.float() if residual is not None else None, relu=relu)
    return out.to(x.dtype)


def assert_close(actual, expected, atol, rtol, what):
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


def assert_close_scaled(actual, expected, tol, what):
    """max |actual - expected| <= tol * max |expected|: rounding to a dtype errs relative to
    the values' scale, and batch-norm gradients subtract means, so many elements are near 0."""
    actual, expected = actual.float(), expected.float()
    scale = expected.abs().max().clamp_min(1e-30)
    err = ((actual - expected).abs().max() / scale).item()
    assert err <= tol, f"{what}: error {err:.2e} of the scale {scale.item():.3g} > {tol:.2e}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype, tol", DTYPES, ids=["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("residual, relu", EPILOGUES, ids=["bn", "bn_relu", "bn_add_relu"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_matches_reference(device, backend, dtype, tol, shape, channels_last, residual, relu, training):
    if device == "cpu" and backend == "triton":
        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("Triton runs on CPU tensors only under TRITON_INTERPRET=1 (set by conftest without a GPU)")
        if dtype == torch.bfloat16:
            pytest.skip("Triton's CPU interpreter has no bfloat16 (numpy has no such type); covered on GPU")
    x, res, params, grad = make_inputs(shape, dtype, device, channels_last, residual)
    y, rm, rv, grads = run(bn_act, x, res, params, grad, training, relu, backend=backend)
    y_ref, rm_ref, rv_ref, grads_ref = run(reference_fp32, x, res, params, grad, training, relu)

    assert y.dtype == dtype and y.shape == x.shape
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert_close_scaled(y, y_ref, tol, "output")
    assert_close(rm, rm_ref, 1e-5, 1e-4, "running_mean")
    assert_close(rv, rv_ref, 1e-5, 1e-3, "running_var")
    for name, g, g_ref in zip(["dx", "dweight", "dbias", "dresidual"], grads, grads_ref):
        assert g.dtype == g_ref.dtype
        assert_close_scaled(g, g_ref, tol, name)


def _reduction_grid(shape, channels_last, sms, monkeypatch):
    """(programs, geometry) of the Triton statistics pass for a CUDA tensor of `shape` on a
    device with `sms` SMs, without a GPU: a fake tensor carries the shape and device."""
    import types

    from torch._subclasses.fake_tensor import FakeTensorMode

    from engine.kernels import bn_act as kernels
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda *_: types.SimpleNamespace(multi_processor_count=sms))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    with FakeTensorMode():
        geo = kernels._geometry(torch.empty(shape, dtype=torch.bfloat16, device="cuda").to(memory_format=fmt))
    return -(-shape[1] // geo.block_c) * geo.splits, geo


@pytest.mark.parametrize("shape, channels_last", [
    ((256, 64, 112, 112), True),   # the stem: one channel block, so only the rows can spread out
    ((256, 3072, 56, 56), True),   # ResNeXt-101 32x48d layer2's input norm
    ((256, 3072, 56, 56), False),
    ((64, 1536, 56, 56), True),    # 32x48d layer1's bn1
])
def test_reduction_grid_fills_the_gpu(shape, channels_last, monkeypatch):
    """The reduction passes launch programs by the SM count, several waves of them (they
    were capped at 1,024 programs: 256 for the stem, a quarter wave of resident programs on
    132 SMs), and their row chunks cover every row exactly once."""
    n, c, h, w = shape
    programs, geo = _reduction_grid(shape, channels_last, 132, monkeypatch)
    assert 12 * 132 <= programs <= 20 * 132, (programs, geo)
    assert (geo.splits - 1) * geo.rows_per_split < n * h * w <= geo.splits * geo.rows_per_split
    assert geo.rows_per_split % geo.block_m == 0
    # Twice the SMs, about twice the programs.
    bigger, _ = _reduction_grid(shape, channels_last, 264, monkeypatch)
    assert bigger >= 1.8 * programs


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and DEVICE == "cpu",
                    reason="Triton runs on CPU tensors only under TRITON_INTERPRET=1")
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_partial_sums_are_added_in_steps_deterministically(channels_last, monkeypatch):
    """The finalise adds the row chunks' partial sums a block of chunks at a time: here 4 per
    step over 11 chunks (the last step partial), forward and backward; the result matches
    the reference and is bitwise the same on a second run."""
    from engine.kernels import bn_act as kernels
    monkeypatch.setattr(kernels, "FINALIZE_ELEMENTS", 4 * (32 if channels_last else 16))
    shape = (3, 8, 30, 30) if not channels_last else (3, 20, 22, 20)
    x, res, params, grad = make_inputs(shape, torch.float32, DEVICE, channels_last, True)
    geo = kernels._geometry(x)
    assert geo.block_s == 4 and geo.splits > 2 * geo.block_s and geo.splits % geo.block_s, geo
    first = run(bn_act, x, res, params, grad, True, True, backend="triton")
    second = run(bn_act, x, res, params, grad, True, True, backend="triton")
    ref = run(reference_fp32, x, res, params, grad, True, True)
    for a, b in zip(torch.utils._pytree.tree_leaves(first), torch.utils._pytree.tree_leaves(second)):
        assert torch.equal(a, b)
    y, rm, rv, grads = first
    assert_close_scaled(y, ref[0], 1e-5, "output")
    assert_close(rm, ref[1], 1e-5, 1e-4, "running_mean")
    assert_close(rv, ref[2], 1e-5, 1e-3, "running_var")
    for name, g, g_ref in zip(["dx", "dweight", "dbias", "dresidual"], grads, ref[3]):
        assert_close_scaled(g, g_ref, 1e-5, name)


@pytest.mark.parametrize("backend", FUSED)
def test_empty_batch(backend):
    x, _, params, _ = make_inputs((2, 5, 3, 3), torch.float32, DEVICE, False, False)
    x = x[:0].clone().requires_grad_()
    rm, rv = params["running_mean"].clone(), params["running_var"].clone()
    w = params["weight"].clone().requires_grad_()
    y = bn_act(x, rm, rv, w, params["bias"], True, relu=True, backend=backend)
    assert y.shape == (0, 5, 3, 3)
    torch.testing.assert_close(rm, params["running_mean"])
    torch.testing.assert_close(rv, params["running_var"])
    y.sum().backward()
    assert torch.count_nonzero(w.grad) == 0


@pytest.mark.parametrize("backend", FUSED)
def test_no_affine_and_no_running_stats(backend):
    x, _, _, grad = make_inputs((3, 6, 4, 5), torch.float32, DEVICE, True, False)
    x1 = x.clone().requires_grad_()
    x2 = x.clone().requires_grad_()
    y = bn_act(x1, None, None, training=True, relu=True, backend=backend)
    y_ref = bn_act.reference(x2, None, None, training=True, relu=True)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(torch.autograd.grad(y, x1, grad)[0], torch.autograd.grad(y_ref, x2, grad)[0],
                               atol=1e-5, rtol=1e-4)


def test_module_matches_batchnorm_then_relu():
    torch.manual_seed(0)
    fused = BatchNormAct2d(8, relu=True, momentum=None)
    plain = torch.nn.BatchNorm2d(8, momentum=None)
    plain.load_state_dict(fused.state_dict())
    assert set(fused.state_dict()) == set(plain.state_dict())
    for _ in range(3):
        x = torch.randn(4, 8, 5, 5)
        torch.testing.assert_close(fused(x), F.relu(plain(x)))
    torch.testing.assert_close(fused.running_var, plain.running_var)
    assert int(fused.num_batches_tracked) == 3
    fused.eval()
    plain.eval()
    x = torch.randn(2, 8, 3, 3)
    torch.testing.assert_close(fused(x), F.relu(plain(x)))


def test_auto_dispatch_on_cpu_picks_reference_and_says_why():
    x, _, params, _ = make_inputs((2, 4, 3, 3), torch.float32, "cpu", False, False)
    bn_act(x, params["running_mean"], params["running_var"], training=True)
    decision = bn_act.last_decision
    assert decision.backend == "reference" and not decision.forced
    assert "triton" in decision.skipped and "cuda" in decision.skipped
    assert "CPU" in decision.skipped["cuda"]


def test_environment_variable_forces_a_backend(monkeypatch):
    x, _, params, _ = make_inputs((2, 4, 3, 3), torch.float32, "cpu", False, False)
    monkeypatch.setenv("ENGINE_BACKEND", "cuda")
    bn_act(x, params["running_mean"], params["running_var"], training=True)
    assert bn_act.last_decision.backend == "cuda" and bn_act.last_decision.forced
    monkeypatch.setenv("ENGINE_BACKEND", "fastest")
    with pytest.raises(ValueError, match="ENGINE_BACKEND must be one of reference, triton, cuda"):
        bn_act(x, params["running_mean"], params["running_var"], training=True)


@pytest.mark.parametrize("backend", FUSED)
def test_forced_backend_refuses_what_it_cannot_run(backend):
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    with pytest.raises(BackendUnavailableError, match="float64"):
        bn_act(x, None, None, training=True, backend=backend)
    strided = torch.randn(2, 4, 6, 6)[:, :, ::2, ::2]
    with pytest.raises(BackendUnavailableError, match="NCHW or channels_last"):
        bn_act(strided, None, None, training=True, backend=backend)
    # The reference takes both.
    bn_act(x, None, None, training=True, backend="reference")
    bn_act(strided, None, None, training=True, backend="reference")


@pytest.mark.parametrize("bad, message", [
    (dict(x=torch.randn(4, 3)), "x must be 4-D"),
    (dict(x=torch.randint(0, 3, (2, 3, 2, 2))), "floating-point"),
    (dict(weight=torch.ones(4)), r"weight must have shape \[3\]"),
    (dict(running_var=None), "both running_mean and running_var"),
    (dict(training=False, running_mean=None, running_var=None), "eval mode"),
    (dict(residual=torch.randn(2, 3, 2, 3)), "residual must have x's shape"),
    (dict(residual=torch.randn(2, 3, 2, 2, dtype=torch.float64)), "residual must be torch.float32"),
    (dict(x=torch.randn(1, 3, 1, 1)), "more than 1 value per channel"),
])
def test_bad_input_is_named(bad, message):
    args = dict(x=torch.randn(2, 3, 2, 2), running_mean=torch.zeros(3), running_var=torch.ones(3),
                weight=torch.ones(3), bias=torch.zeros(3), training=True, residual=None)
    args.update(bad)
    with pytest.raises((ValueError, TypeError), match=message):
        bn_act(args.pop("x"), args.pop("running_mean"), args.pop("running_var"), **args)


def test_extension_checks_its_arguments():
    ops = pytest.importorskip("engine.ops._cuda_bn_act")
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(RuntimeError, match=r"weight must have shape \[3\]"):
        ops.forward(x, torch.ones(4), torch.zeros(3), None, None, None, True, 0.1, 1e-5, False)
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        ops.forward(x.double(), torch.ones(3), torch.zeros(3), None, None, None, True, 0.1, 1e-5, False)
    with pytest.raises(RuntimeError, match="must have x's layout"):
        ops.forward(x, torch.ones(3), torch.zeros(3), x.to(memory_format=torch.channels_last), None, None,
                    True, 0.1, 1e-5, False)


@pytest.mark.parametrize("backend", FUSED)
def test_traces_under_torch_compile(backend):
    """The fake implementations let torch.compile trace the custom ops, forward and backward."""
    torch._dynamo.reset()
    x, res, params, grad = make_inputs((2, 5, 3, 4), torch.float32, DEVICE, True, True)

    def step(x, res, rm, rv, w, b):
        return bn_act(x, rm, rv, w, b, True, 0.1, 1e-5, residual=res, relu=True, backend=backend)

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    y, rm, rv, grads = run(lambda x, rm, rv, w, b, t, m, e, residual, relu: compiled(x, residual, rm, rv, w, b),
                           x, res, params, grad, True, True)
    y_ref, rm_ref, rv_ref, grads_ref = run(bn_act.reference, x, res, params, grad, True, True)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(rm, rm_ref)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, atol=1e-4, rtol=1e-4)
