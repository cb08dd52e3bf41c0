"""The whole-step check of a fused model (engine.models.step_check), at the selftest's
shapes: it passes correct kernels on a batch where an activation sits on a ReLU's kink
(where comparing two free-running models fails them), and it fails kernels that are wrong
only once many calls compose."""

import importlib
import types

import pytest
import torch

from engine.models import resnext
from engine.models.step_check import check_fused_step
from engine.ops import backends

# The module, not the function engine.ops exports under the same name.
bn_act_module = importlib.import_module("engine.ops.bn_act")

# The selftest's model step: one block per stage, 4 groups of width 16, batch 4 at 64 px.
LAYERS, GROUPS, WIDTH, BATCH, SIZE = [1, 1, 1, 1], 4, 16, 4, 64
# Calls of bn_act in one forward: the stem, three per block, one per downsample.
BN_ACT_CALLS = 1 + 3 * 4 + 4
# Where the models get a ReLU tie: the deepest grouped conv's batch norm, whose 16 values
# per channel (batch 4 at 2x2) each carry a large share of the weight gradient.
TIED_NORM = "layer4.0.bn2"
# Its channels: layer4's grouped width, the only bn_act call with them at 2x2.
TIED_CHANNELS = 512


def pre_activation(plain, x):
    norm = plain.get_submodule(TIED_NORM)
    seen = []
    hook = norm.register_forward_hook(lambda module, args, out: seen.append(out.detach().clone()))
    with torch.no_grad():
        plain(x)
    hook.remove()
    return seen[0]


def place_a_tie(plain, x):
    """Moves one channel's batch-norm bias so that one of its pre-activations is zero up to
    rounding, on any machine. Returns its index (n, c, h, w) and whether the plain model
    lets it through its ReLU."""
    pre = pre_activation(plain, x)
    where = tuple(int(i) for i in torch.unravel_index(pre.abs().argmin(), pre.shape))
    with torch.no_grad():
        plain.get_submodule(TIED_NORM).bias[where[1]] -= pre[where]
    return where, bool(pre_activation(plain, x)[where] > 0)


def tied_plain_model():
    """The plain model, a batch, its targets, and the tie (place_a_tie)."""
    torch.manual_seed(0)
    nhwc = torch.channels_last
    plain = resnext(LAYERS, GROUPS, WIDTH, num_classes=10).to(memory_format=nhwc)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, 3, SIZE, SIZE, generator=gen).contiguous(memory_format=nhwc)
    target = torch.randint(0, 10, (BATCH,), generator=gen)
    return plain, x, target, place_a_tie(plain, x)


def models_and_batch(mode="bn_act"):
    plain, x, target, _ = tied_plain_model()
    fused = resnext(LAYERS, GROUPS, WIDTH, fused=mode, num_classes=10).to(memory_format=torch.channels_last)
    fused.load_state_dict(plain.state_dict())
    return fused, plain, x, target


def gradients(model, x, target):
    model.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(model(x), target).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def test_the_tie_moves_gradients_beyond_the_check_allowance():
    """The premise: the tied activation pushed 1e-6 to either side of the kink (far below any
    allowance on a value) changes some gradient by more than the model check's fp32
    allowance (2%), so two free-running models would disagree wherever rounding sends it."""
    plain, x, target, ((_, channel, _, _), _) = tied_plain_model()
    bias = plain.get_submodule(TIED_NORM).bias
    sides = []
    for push in (1e-6, -1e-6):
        with torch.no_grad():
            bias[channel] += push
        sides.append(gradients(plain, x, target))
        with torch.no_grad():
            bias[channel] -= push
    above, below = sides
    worst = max(float((above[n] - below[n]).abs().max() / below[n].abs().max()) for n in below)
    assert worst > 0.02, f"the tie in {TIED_NORM} moves gradients by only {worst:.2e}"


FUSED_BACKENDS = ["triton", pytest.param("cuda", marks=pytest.mark.skipif(
    backends.extension_status() is not None, reason="engine._C is not built"))]


@pytest.mark.slow
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_correct_kernels_pass_at_a_relu_kink(monkeypatch, backend_calls, backend):
    """The fused run puts the tied activation on the other side of the kink from the plain
    model's, by a rounding-sized move (what another order of additions does): still a pass."""
    _, _, _, (where, plain_lets_it_through) = tied_plain_model()

    def forward(real):
        def other_side(x, *rest):
            y, mean, invstd = real(x, *rest)
            if x.shape[1:] == (TIED_CHANNELS, 2, 2):
                y[where] = 0.0 if plain_lets_it_through else torch.finfo(y.dtype).eps * y.abs().max()
            return y, mean, invstd
        return other_side

    with_kernels(monkeypatch, backend, forward=forward)
    fused, plain, x, target = models_and_batch()
    verdict = check_fused_step(fused, plain, x, target, torch.float32)
    assert verdict["status"] == "pass", verdict["detail"]
    # Far inside the allowance: only the two backward passes' rounding differs.
    assert verdict["max_error"] < 1e-4, verdict["detail"]
    assert backend_calls[("bn_act", backend)] == BN_ACT_CALLS
    assert backend_calls[("bn_act", "reference")] == 0
    recorded = [name for name in verdict["errors"] if name.startswith("output ")]
    assert len(recorded) == BN_ACT_CALLS


def fastest_fused_backend():
    return "cuda" if backends.extension_status() is None else "triton"


def with_kernels(monkeypatch, backend, forward=None, backward=None):
    """Runs bn_act on `backend` with its kernels' forward or backward wrapped."""
    monkeypatch.setenv("ENGINE_BACKEND", backend)
    getter = "_cuda_kernels" if backend == "cuda" else "_triton_kernels"
    real = getattr(bn_act_module, getter)()
    wrapped = types.SimpleNamespace(forward=forward(real.forward) if forward else real.forward,
                                    backward=backward(real.backward) if backward else real.backward)
    monkeypatch.setattr(bn_act_module, getter, lambda: wrapped)


def test_catches_state_kept_between_calls(monkeypatch):
    """A backward that reuses an earlier call's weight gradient for a later call of the same
    width: every call on its own is right, only the composed model shows it."""
    def backward(real):
        first = {}

        def stale(grad_y, x, *rest):
            dx, dweight, dbias, masked = real(grad_y, x, *rest)
            dweight = first.setdefault(x.shape[1], dweight)
            return dx, dweight, dbias, masked
        return stale

    with_kernels(monkeypatch, fastest_fused_backend(), backward=backward)
    verdict = check_fused_step(*models_and_batch(), torch.float32)
    assert verdict["status"] == "mismatch"
    assert verdict["detail"].startswith("grad ") and ".weight" in verdict["detail"], verdict["detail"]


def test_catches_a_misread_gradient_layout(monkeypatch):
    """The output gradient read in NCHW order while x is channels_last."""
    def nchw_memory_as_nhwc(grad_y, *rest):
        nchw = grad_y.contiguous()
        return nchw.as_strided(grad_y.shape, grad_y.stride()), *rest

    def misread(real):
        return lambda *args: real(*nchw_memory_as_nhwc(*args))

    with_kernels(monkeypatch, fastest_fused_backend(), backward=misread)
    verdict = check_fused_step(*models_and_batch(), torch.float32)
    assert verdict["status"] == "mismatch"
    assert verdict["detail"].startswith("grad "), verdict["detail"]


def test_catches_a_wrong_activation(monkeypatch):
    """One value of one call's output 5% of the largest off: reported at that activation."""
    def forward(real):
        calls = []

        def off(x, *rest):
            y, mean, invstd = real(x, *rest)
            calls.append(1)
            if len(calls) == 5:
                y[0, 7, 0, 0] += 0.05 * y.abs().max()
            return y, mean, invstd
        return off

    with_kernels(monkeypatch, fastest_fused_backend(), forward=forward)
    verdict = check_fused_step(*models_and_batch(), torch.float32)
    assert verdict["status"] == "mismatch"
    assert verdict["errors"]["output layer1.0.bn3"] > 0.04, verdict["detail"]
