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
# A batch on which some activation lies within rounding of zero (the first test shows it).
TIED_BATCH_SEED = 7
# Calls of bn_act in one forward: the stem, three per block, one per downsample.
BN_ACT_CALLS = 1 + 3 * 4 + 4


def models_and_batch(mode="bn_act"):
    torch.manual_seed(0)
    plain = resnext(LAYERS, GROUPS, WIDTH, num_classes=10)
    fused = resnext(LAYERS, GROUPS, WIDTH, fused=mode, num_classes=10)
    fused.load_state_dict(plain.state_dict())
    gen = torch.Generator().manual_seed(TIED_BATCH_SEED)
    x = torch.randn(BATCH, 3, SIZE, SIZE, generator=gen).contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, 10, (BATCH,), generator=gen)
    nhwc = torch.channels_last
    return fused.to(memory_format=nhwc), plain.to(memory_format=nhwc), x, target


def gradients(model, x, target):
    model.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(model(x), target).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def test_this_batch_puts_an_activation_on_a_relu_kink():
    """The premise: the plain model against itself, its input moved by 1e-7 of each value
    (rounding), changes some gradient by more than the model check's fp32 allowance (2%)."""
    _, plain, x, target = models_and_batch()
    exact = gradients(plain, x, target)
    nudged = gradients(plain, x * (1 + 1e-7 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))),
                       target)
    worst = max(float((nudged[n] - exact[n]).abs().max() / exact[n].abs().max()) for n in exact)
    assert worst > 0.02, (f"no ReLU tie at TIED_BATCH_SEED={TIED_BATCH_SEED} on this machine (worst change "
                          f"{worst:.2e}): pick a seed whose batch has one")


FUSED_BACKENDS = ["triton", pytest.param("cuda", marks=pytest.mark.skipif(
    backends.extension_status() is not None, reason="engine._C is not built"))]


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_correct_kernels_pass_at_a_relu_kink(monkeypatch, backend_calls, backend):
    monkeypatch.setenv("ENGINE_BACKEND", backend)
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
