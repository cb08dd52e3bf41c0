"""grouped_conv3x3: the Triton kernels and the direct CUDA kernels (forward, data and weight
gradients, the batch-norm prologue and the statistics epilogue) against F.conv2d with
groups, for group widths from 1 to 48 (packed and multi-tile groups; the CUDA kernels take
1, 2, 4 and 8 and run their C++ loop here on a CPU), strides 1 and 2, odd sizes and a batch
of one; the dispatcher's choice; the autotune cache, including corrupt and stale files."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import Bottleneck as TorchvisionBottleneck

from engine.kernels import grouped_conv as GK
from engine.models import ConvBNBottleneck
from engine.models.resnext import resnext
from engine.ops import BackendUnavailableError, backends
from engine.ops.autotune import Autotuner, default_path, default_tuner
from engine.ops.grouped_conv import grouped_conv3x3

pytestmark = pytest.mark.slow  # a minute or more together on 2 cores

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NHWC = torch.channels_last
# (dtype, tol): tol bounds the error relative to the largest expected magnitude, for a result
# stored in dtype against the fp32 reference from the same rounded inputs. bfloat16 only on
# a GPU: bf16 tl.dot is wrong in Triton's interpreter.
DTYPES = [(torch.float32, 1e-5), (torch.float16, 4e-3),
          pytest.param(torch.bfloat16, 3e-2, marks=pytest.mark.gpu)]
# The extension's C++ loop computes bf16 correctly on the CPU.
CUDA_DTYPES = [(torch.float32, 1e-5), (torch.float16, 4e-3), (torch.bfloat16, 3e-2)]
needs_extension = pytest.mark.skipif(backends.load_extension() is None, reason="engine._C is not built")

# (groups, group width, stride, batch, height, width): widths 1 and 3 pack 16 and 5 groups
# per tile (5 leaves a ragged last pack of 2), 4 packs 4, 8 packs 2, 16 fills a tile, 48
# spans three tiles each way in the interpreter. ResNeXt's 32 groups at every width, and
# fewer groups with larger images where the interpreter allows.
CASES = [
    (32, 1, 1, 1, 5, 7),
    (32, 3, 2, 2, 5, 7),
    (32, 4, 1, 1, 3, 3),
    (32, 8, 2, 1, 5, 3),
    (4, 8, 2, 1, 5, 7),
    (32, 16, 1, 1, 3, 3),
    (4, 16, 1, 2, 3, 5),
    (2, 48, 2, 1, 5, 5),
]
# ResNeXt-101 32x48d's first-stage width at stride 1, fp32 only: 5 groups, not its 32, since
# the interpreter runs each group's three-by-three tiles one program at a time (32 groups took
# 80 s per dtype), and a group's index enters no address differently from the 2nd to the 32nd.
CASE_X48 = (5, 48, 1, 1, 3, 3)


@pytest.fixture(autouse=True)
def _exact_fp32():
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    # No test reads or writes the developer's autotune cache.
    monkeypatch.setenv("ENGINE_CACHE_DIR", str(tmp_path / "cache"))


def assert_close_scaled(actual, expected, tol, what):
    err = (actual.float() - expected.float()).abs().max().item()
    bound = tol * max(expected.float().abs().max().item(), 1e-3)
    assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g} ({tol} x max |expected|)"


def assert_rel_close(actual, expected, tol, what):
    """Relative error of the whole tensor (train-mode batch norms over few values amplify
    rounding differences element by element)."""
    err = (actual.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-30)
    assert err <= tol, f"{what}: relative error {err:.2e} > {tol:.0e}"


def _inputs(groups, width, n, h, w, dtype, prologue):
    c = groups * width
    x = torch.randn(n, c, h, w).to(DEVICE, dtype).contiguous(memory_format=NHWC)
    weight = (torch.randn(c, width, 3, 3) / (9 * width) ** 0.5).to(DEVICE)
    scale = (torch.rand(c) + 0.5).to(DEVICE) if prologue else None
    shift = torch.randn(c).to(DEVICE) if prologue else None
    return x, weight, scale, shift


def _leaves(*tensors):
    return [None if t is None else t.detach().clone().requires_grad_() for t in tensors]


def _backend_cases():
    """(backend, dtype, tol, case): Triton for every case, the direct CUDA kernels for the
    group widths they take."""
    out = [pytest.param("triton", torch.float32, 1e-5, CASE_X48, id=f"triton-{torch.float32}-{CASE_X48}")]
    for case in CASES:
        for entry in DTYPES:
            (dtype, tol), marks = (entry.values, entry.marks) if hasattr(entry, "marks") else (entry, ())
            out.append(pytest.param("triton", dtype, tol, case, id=f"triton-{dtype}-{case}", marks=marks))
        if case[1] in (1, 2, 4, 8):
            for dtype, tol in CUDA_DTYPES:
                out.append(pytest.param("cuda", dtype, tol, case, id=f"cuda-{dtype}-{case}", marks=needs_extension))
    return out


@pytest.mark.parametrize("backend, dtype, tol, case", _backend_cases())
def test_matches_conv2d_with_prologue_and_stats(backend, dtype, tol, case):
    groups, width, stride, n, h, w = case
    x, weight, scale, shift = _inputs(groups, width, n, h, w, dtype, prologue=True)
    ours = _leaves(x, weight, scale, shift)
    theirs = _leaves(x.float(), weight, scale, shift)
    y, mean, var = grouped_conv3x3(ours[0], ours[1], stride=stride, groups=groups, in_scale=ours[2],
                                   in_shift=ours[3], stats=True, backend=backend)
    assert grouped_conv3x3.last_decision.backend == backend
    # The reference rounds the normalised activation to dtype, as the kernel does.
    h_ref = F.relu(theirs[0] * theirs[2].view(1, -1, 1, 1) + theirs[3].view(1, -1, 1, 1))
    h_ref = h_ref + (h_ref.detach().to(dtype).float() - h_ref.detach())
    y_ref = F.conv2d(h_ref, theirs[1].to(dtype).float(), None, stride, 1, 1, groups)
    assert y.dtype == dtype and y.is_contiguous(memory_format=NHWC) and y.shape == y_ref.shape
    assert_close_scaled(y, y_ref, tol, "y")
    # Statistics are those of y as stored.
    yd = y.detach().double()
    torch.testing.assert_close(mean.double(), yd.mean((0, 2, 3)), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(var.double(), yd.var((0, 2, 3), unbiased=False), atol=1e-5, rtol=1e-4)

    gy = torch.randn(y.shape).to(DEVICE, dtype)
    gm, gv = torch.randn_like(mean), torch.randn_like(var)
    ((y.float() * gy.float()).sum() + (mean * gm).sum() + (var * gv).sum()).backward()
    # The same loss on the reference, its statistics those of the rounded y.
    y_ref_rounded = y_ref + (y.detach().float() - y_ref.detach())
    ref_loss = ((y_ref_rounded * gy.float()).sum() + (y_ref_rounded.mean((0, 2, 3)) * gm).sum()
                + (y_ref_rounded.var((0, 2, 3), unbiased=False) * gv).sum())
    ref_loss.backward()
    for name, a, b in zip(("dx", "dweight", "dscale", "dshift"), ours, theirs):
        assert a.grad.dtype == a.dtype, name
        assert_close_scaled(a.grad, b.grad, 4 * tol, name)


@pytest.mark.parametrize("backend", ["triton", pytest.param("cuda", marks=needs_extension)])
@pytest.mark.parametrize("dtype, tol", DTYPES[:2])
@pytest.mark.parametrize("groups, width, stride, n, h, w", [CASES[2], CASES[3]])
def test_plain_convolution(backend, dtype, tol, groups, width, stride, n, h, w):
    x, weight, _, _ = _inputs(groups, width, n, h, w, dtype, prologue=False)
    ours, theirs = _leaves(x, weight), _leaves(x.float(), weight.to(dtype).float())
    y = grouped_conv3x3(ours[0], ours[1], stride=stride, groups=groups, backend=backend)
    y_ref = F.conv2d(theirs[0], theirs[1], None, stride, 1, 1, groups)
    assert_close_scaled(y, y_ref, tol, "y")
    gy = torch.randn(y.shape).to(DEVICE, dtype)
    y.backward(gy)
    y_ref.backward(gy.float())
    assert_close_scaled(ours[0].grad, theirs[0].grad, 4 * tol, "dx")
    assert_close_scaled(ours[1].grad, theirs[1].grad, 4 * tol, "dweight")


def test_reference_is_the_specification():
    x, weight, scale, shift = _inputs(4, 3, 2, 5, 4, torch.float32, prologue=True)
    y, mean, var = grouped_conv3x3.reference(x, weight, stride=2, groups=4, in_scale=scale, in_shift=shift,
                                             stats=True)
    h = F.relu(x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1))
    expected = F.conv2d(h, weight, None, 2, 1, 1, 4)
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(mean, expected.mean((0, 2, 3)))
    torch.testing.assert_close(var, expected.var((0, 2, 3), unbiased=False))


@pytest.mark.skipif(DEVICE != "cpu", reason="the CPU dispatch rule")
def test_cpu_runs_the_reference_unless_forced():
    x, weight, _, _ = _inputs(4, 4, 1, 3, 3, torch.float32, prologue=False)
    grouped_conv3x3(x, weight, groups=4)
    decision = grouped_conv3x3.last_decision
    assert decision.backend == "reference" and not decision.forced
    assert "CPU" in decision.skipped["triton"]
    assert "CPU" in decision.skipped["cuda"] or "not built" in decision.skipped["cuda"]


def test_forced_triton_names_what_it_cannot_run():
    x, weight, _, _ = _inputs(4, 4, 1, 3, 3, torch.float32, prologue=False)
    with pytest.raises(BackendUnavailableError, match="channels_last"):
        grouped_conv3x3(x.contiguous(), weight, groups=4, backend="triton")
    with pytest.raises(BackendUnavailableError, match="float64"):
        grouped_conv3x3(x.double(), weight, groups=4, backend="triton")


@needs_extension
def test_forced_cuda_names_what_it_cannot_run():
    x, weight, _, _ = _inputs(4, 3, 1, 3, 3, torch.float32, prologue=False)
    with pytest.raises(BackendUnavailableError, match="group width 3 is not 1, 2, 4 or 8"):
        grouped_conv3x3(x, weight, groups=4, backend="cuda")
    x, weight, _, _ = _inputs(4, 4, 1, 3, 3, torch.float32, prologue=False)
    with pytest.raises(BackendUnavailableError, match="channels_last"):
        grouped_conv3x3(x.contiguous(), weight, groups=4, backend="cuda")
    with pytest.raises(BackendUnavailableError, match="Cout 8 != Cin 16"):
        grouped_conv3x3(x, weight[:8], groups=4, backend="cuda")


@needs_extension
@pytest.mark.parametrize("call, message", [
    (lambda x, w, g: torch.ops.engine.grouped_conv3x3_fwd(x.contiguous(), w, None, None, 1, False, 8),
     "x must be channels_last"),
    (lambda x, w, g: torch.ops.engine.grouped_conv3x3_fwd(x, w.half(), None, None, 1, False, 8),
     "weight must be Float"),
    (lambda x, w, g: torch.ops.engine.grouped_conv3x3_fwd(x, w, None, None, 1, False, 0),
     "rows_per_part must be positive"),
    (lambda x, w, g: torch.ops.engine.grouped_conv3x3_fwd(x[:, 1:], w[1:], None, None, 1, False, 8),
     "must be channels_last|byte boundary"),
    (lambda x, w, g: torch.ops.engine.grouped_conv3x3_fwd(x, w, torch.ones(16), None, 1, False, 8),
     "both in_scale and in_shift"),
    (lambda x, w, g: torch.ops.engine.grouped_conv3x3_dgrad(g, w, [7, 7], 2), r"input_hw \[7, 7\]"),
    (lambda x, w, g: torch.ops.engine.grouped_conv3x3_wgrad(g, x, None, None, 4, 1),
     r"grad_y must have shape \[2, 16, 5, 5\]"),
    (lambda x, w, g: torch.ops.engine.grouped_conv3x3_wgrad(x, x, None, None, 3, 1),
     "group widths 1, 2, 4 or 8"),
])
def test_extension_checks_its_arguments(call, message):
    """The C++ boundary names the bad argument before any kernel runs (CPU and CUDA share it)."""
    x = torch.randn(2, 16, 5, 5).contiguous(memory_format=NHWC)
    weight = torch.randn(16, 4, 3, 3)
    grad = torch.randn(2, 16, 3, 3).contiguous(memory_format=NHWC)
    with pytest.raises(RuntimeError, match=message):
        call(x, weight, grad)


@needs_extension
def test_cuda_statistics_partials_merge_over_ragged_tiles():
    """The forward's per-tile partials (5 rows each on the CPU, the last one ragged) merge
    into the statistics of y; empty tiles never occur, one-row tiles do."""
    from engine.ops import _cuda_grouped_conv as C
    from engine.ops.grouped_conv import _merge_partials
    x, weight, scale, shift = _inputs(8, 2, 3, 4, 3, torch.float32, prologue=True)
    y, part, rows = C.forward(x, weight, scale, shift, 1, True)
    m = 3 * 4 * 3
    assert part.shape == (2, -(-m // rows), 16) and m % rows == 1
    mean, var = _merge_partials(part, rows, m)
    torch.testing.assert_close(mean, y.mean((0, 2, 3)), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(var, y.var((0, 2, 3), unbiased=False), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kwargs, message", [
    (dict(stride=3), "stride must be 1 or 2"),
    (dict(groups=5), "not divisible by groups=5"),
    (dict(groups=2), r"weight must have shape \[Cout, 8, 3, 3\]"),
    (dict(in_scale=torch.ones(16)), "both in_scale and in_shift"),
    (dict(in_scale=torch.ones(15), in_shift=torch.zeros(15)), r"in_scale must be fp32 \[16\]"),
])
def test_bad_input_is_named(kwargs, message):
    x = torch.randn(1, 16, 3, 3)
    weight = torch.randn(16, 4, 3, 3)
    kwargs = dict(dict(groups=4), **kwargs)
    with pytest.raises(ValueError, match=message):
        grouped_conv3x3(x, weight, **kwargs)


@pytest.mark.parametrize("backend", ["triton", pytest.param("cuda", marks=needs_extension)])
def test_traces_under_torch_compile(backend):
    """The fake implementations let torch.compile trace the kernels, forward and backward."""
    torch._dynamo.reset()
    x, weight, scale, shift = _inputs(8, 2, 1, 5, 3, torch.float32, prologue=True)

    def fn(x, w, s, b):
        y, mean, var = grouped_conv3x3(x, w, stride=2, groups=8, in_scale=s, in_shift=b, stats=True,
                                       backend=backend)
        return y.sum() + mean.sum() + var.sum()

    ours, theirs = _leaves(x, weight, scale, shift), _leaves(x, weight, scale, shift)
    torch.compile(fn, backend="aot_eager", fullgraph=True)(*ours).backward()
    fn(*theirs).backward()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-5)


def _compare_training_step(fused, plain, x):
    """One fp32 training step of two networks with the same weights: outputs, gradients
    (all together tightly; each alone loosely, as the stem's weight gradient is a sum with
    heavy cancellation that any change of summation order moves), running statistics."""
    fused.load_state_dict(plain.state_dict())
    for net in (fused, plain):
        net.to(DEVICE, memory_format=NHWC).train()
    x = x.to(DEVICE).contiguous(memory_format=NHWC)
    out, out_ref = fused(x), plain(x)
    torch.testing.assert_close(out, out_ref, atol=1e-4, rtol=1e-4)
    grad = torch.randn_like(out)
    out.backward(grad)
    out_ref.backward(grad)
    grads = {name: p.grad for name, p in fused.named_parameters()}
    grads_ref = {name: p.grad for name, p in plain.named_parameters()}
    assert_rel_close(torch.cat([grads[n].flatten() for n in grads_ref]),
                     torch.cat([g.flatten() for g in grads_ref.values()]), 1e-3, "all gradients")
    for name in grads_ref:
        assert_rel_close(grads[name], grads_ref[name], 1e-2, name)
    buffers = dict(plain.named_buffers())
    for name, b in fused.named_buffers():
        torch.testing.assert_close(b, buffers[name], atol=1e-5, rtol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


def _on_triton(net, monkeypatch, choice="triton"):
    import engine.ops.conv_bn as conv_bn
    # On a GPU the 3x3 is autotuned and may stay on cuDNN; these tests are for the fused kernels.
    monkeypatch.setattr(conv_bn, "_grouped_3x3_choice", lambda *args: choice)
    blocks = [m for m in net.modules() if isinstance(m, ConvBNBottleneck)]
    for block in blocks:
        block.backend = "triton"
    return blocks


def _block_chain(block):
    """A downsampling block, an identity block and a stride-2 block in a row (group widths 1, 1, 2)."""
    def down(c_in, c_out, stride):
        return nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))
    return nn.Sequential(block(16, 8, 1, down(16, 32, 1), 4, 8), block(32, 8, 1, None, 4, 8),
                         block(32, 16, 2, down(32, 64, 2), 4, 8))


def test_fused_blocks_match_torchvision(monkeypatch):
    """ConvBNBottleneck's Triton path, its grouped 3x3 fused with bn1 + ReLU on load and
    bn2's statistics in the epilogue, against torchvision's blocks."""
    plain, fused = _block_chain(TorchvisionBottleneck), _block_chain(ConvBNBottleneck)
    assert len(_on_triton(fused, monkeypatch)) == 3
    launches, launch = [], GK._launch_conv
    monkeypatch.setattr(GK, "_launch_conv", lambda *args: launches.append(args[10]) or launch(*args))
    _compare_training_step(fused, plain, torch.randn(2, 16, 7, 5))
    # Each block's 3x3 ran on the Triton kernel, forward and data gradient (transposed).
    assert sorted(launches) == [False] * 3 + [True] * 3


@needs_extension
def test_fused_blocks_on_the_direct_kernel_match_torchvision(monkeypatch):
    """The same blocks with the grouped 3x3 on the direct CUDA kernel (its C++ loop here):
    bn1 + ReLU on its load, bn2's statistics from its partials, its dgrad and wgrad."""
    from engine.ops import _cuda_grouped_conv as C
    plain, fused = _block_chain(TorchvisionBottleneck), _block_chain(ConvBNBottleneck)
    assert len(_on_triton(fused, monkeypatch, choice="cuda")) == 3
    calls = []
    for name in ("forward", "dgrad", "wgrad"):
        monkeypatch.setattr(C, name, lambda *a, name=name, fn=getattr(C, name): calls.append(name) or fn(*a))
    _compare_training_step(fused, plain, torch.randn(2, 16, 7, 5))
    assert sorted(calls) == ["dgrad"] * 3 + ["forward"] * 3 + ["wgrad"] * 3


def test_autotune_fused_blocks_visits_every_block_and_restores_buffers(monkeypatch):
    """What the training loop runs before torch.compile or CUDA-graph capture: every fused
    block asks for its 3x3's choice (timed on a GPU), and the forward leaves no trace."""
    import engine.ops.conv_bn as conv_bn
    from engine.models import autotune_fused_blocks
    asked = []
    monkeypatch.setattr(conv_bn, "_grouped_3x3_choice", lambda x, *args: asked.append((tuple(x.shape), *args))
                        or "triton")
    model = _block_chain(ConvBNBottleneck).to(memory_format=NHWC).train()
    for block in model:
        block.backend = "triton"
    before = {name: b.clone() for name, b in model.named_buffers()}
    sample = torch.randn(2, 16, 7, 5).contiguous(memory_format=NHWC)
    state = torch.random.get_rng_state()
    assert autotune_fused_blocks(model, sample) == 3
    # (input shape, width, 3x3 output channels, stride, groups) per block.
    assert asked == [((2, 16, 7, 5), 4, 4, 1, 4), ((2, 32, 7, 5), 4, 4, 1, 4), ((2, 32, 7, 5), 8, 8, 2, 4)]
    for name, b in model.named_buffers():
        assert torch.equal(b, before[name]), name
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.random.get_rng_state(), state)
    assert autotune_fused_blocks(nn.Sequential(nn.Conv2d(3, 3, 1)), torch.randn(1, 3, 2, 2)) == 0


@pytest.mark.gpu
def test_fused_model_matches_the_plain_model(monkeypatch):
    """The whole fused="conv" ResNeXt on the Triton kernels against plain blocks (about six
    minutes in Triton's CPU interpreter, so GPU only)."""
    plain = resnext([1, 1, 1, 1], 4, 2, num_classes=10)
    fused = resnext([1, 1, 1, 1], 4, 2, fused="conv", num_classes=10)
    assert len(_on_triton(fused, monkeypatch)) == 4
    _compare_training_step(fused, plain, torch.randn(2, 3, 32, 32))


# ---------------------------------------------------------------- autotune cache

class FakeTimer:
    def __init__(self, times):
        self.times = times
        self.calls = []

    def __call__(self, fn):
        name = fn()
        self.calls.append(name)
        if isinstance(self.times[name], Exception):
            raise self.times[name]
        return self.times[name]


def _candidates(*names):
    return {name: (lambda name=name: name) for name in names}


VERSIONS = {"format": 1, "torch": "x", "triton": "y"}


def test_autotune_keeps_the_fastest_and_reads_it_back(tmp_path):
    path = tmp_path / "autotune.json"
    timer = FakeTimer({"reference": 2.0, "triton:16": 1.0, "triton:32": 1.5})
    tuner = Autotuner(path, timer, VERSIONS)
    assert tuner.choose("k", _candidates("reference", "triton:16", "triton:32")) == "triton:16"
    assert sorted(timer.calls) == ["reference", "triton:16", "triton:32"]
    saved = json.loads(path.read_text())
    assert saved["versions"] == VERSIONS and saved["entries"]["k"]["times_ms"]["reference"] == 2.0
    # A new process reads the choice instead of timing.
    again = Autotuner(path, FakeTimer({}), VERSIONS)
    assert again.choose("k", _candidates("reference", "triton:16")) == "triton:16"
    assert again.lookup("other") is None


def test_autotune_skips_a_failing_candidate(tmp_path, capsys):
    timer = FakeTimer({"reference": 2.0, "triton:16": RuntimeError("out of resources")})
    tuner = Autotuner(tmp_path / "a.json", timer, VERSIONS)
    assert tuner.choose("k", _candidates("reference", "triton:16")) == "reference"
    assert "triton:16 failed" in capsys.readouterr().err


@pytest.mark.parametrize("content, message", [
    ("{not json", "unreadable"),
    ("[1, 2]", "not an autotune cache"),
    (json.dumps({"versions": dict(VERSIONS, torch="old"), "entries": {"k": {"choice": "reference"}}}),
     "was made with"),
])
def test_autotune_rebuilds_a_corrupt_or_stale_cache(tmp_path, capsys, content, message):
    path = tmp_path / "autotune.json"
    path.write_text(content)
    timer = FakeTimer({"reference": 2.0, "triton:16": 1.0})
    tuner = Autotuner(path, timer, VERSIONS)
    assert tuner.choose("k", _candidates("reference", "triton:16")) == "triton:16"
    err = capsys.readouterr().err
    assert message in err and "rebuilding" in err and err.count("\n") == 1
    assert len(timer.calls) == 2
    assert json.loads(path.read_text())["entries"]["k"]["choice"] == "triton:16"


def test_autotune_candidates_run_forward_and_backward(tmp_path):
    """What the tuner times on a GPU, run here once each: the reference and one Triton
    candidate per distinct tiling, forward and backward, with the prologue and statistics."""
    from engine.ops.grouped_conv import _candidates
    candidates = _candidates((1, 32, 3, 5), 32, 2, 16, torch.float32, torch.device(DEVICE), True, True, True)
    if DEVICE == "cpu":
        # 16 groups of width 2: span 16 packs 8 groups, 32 and 64 all 16; the direct kernel takes width 2.
        expected = {"reference", "triton:16", "triton:32"} | ({"cuda"} if backends.extension_has_cuda() else set())
        assert set(candidates) == expected
    tuner = Autotuner(tmp_path / "a.json", lambda fn: (fn(), 1.0)[1], VERSIONS)
    assert tuner.choose("k", candidates) == "reference"  # a tie goes to the first
    # Each candidate returns its output and gradients, so the tuner compared them with the
    # reference's: every fused candidate agreed on this shape.
    assert "rejected" not in tuner._entries["k"]


def test_autotune_cache_lives_under_engine_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("ENGINE_CACHE_DIR", str(tmp_path / "c"))
    assert default_path() == tmp_path / "c" / "autotune.json"
    assert default_tuner().path == default_path()
    # The real version record names the kernel sources, so an edit to them invalidates timings.
    assert set(default_tuner().versions) >= {"torch", "triton", "cudnn", "kernels"}


@pytest.mark.gpu
def test_cuda_dispatch_autotunes_once():
    x, weight, _, _ = _inputs(32, 8, 4, 14, 14, torch.float16, prologue=False)
    grouped_conv3x3(x, weight, groups=32)
    first = grouped_conv3x3.last_decision.backend
    tuner = default_tuner()
    assert len(tuner._entries) == 1 and default_path().exists()
    grouped_conv3x3(x, weight, groups=32)
    assert grouped_conv3x3.last_decision.backend == first and len(tuner._entries) == 1
