"""What a compiled fused model calls, on the CPU with backend="aot_eager": after the eager
warm-up (engine.models.autotune_fused_blocks) the fused kernels are in the traced graph
for every block, with dynamic=False and dynamic=True; without it, the reference runs and
says so. The device path (fused backends chosen automatically, each checked first) runs
on CPU tensors under ENGINE_VERIFY=1. Also: BatchNormAct2d(momentum=None) never reads a
value back to the host."""

import warnings

import pytest
import torch

from engine.models import autotune_fused_blocks, resnext
from engine.ops import backends, bn_act, verify
from engine.ops.bn_act import BatchNormAct2d

pytestmark = pytest.mark.skipif(backends.load_extension() is None, reason="needs engine._C (its C++ loop)")


def _graph_recorder(seen: list):
    """aot_eager that keeps the call targets of each forward graph it compiles."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def target(node):
        # Ops that update their arguments in place (running statistics) come wrapped.
        if "auto_functionalized" in str(node.target):
            return str(node.args[0])
        return str(node.target)

    def forward(gm, example_inputs):
        seen.append([target(n) for n in gm.graph.nodes if n.op == "call_function"])
        return make_boxed_func(gm.forward)

    def backward(gm, example_inputs):
        return make_boxed_func(gm.forward)
    return aot_autograd(fw_compiler=forward, bw_compiler=backward)


def _model():
    torch.manual_seed(0)
    model = resnext([1, 1, 1, 1], 4, 2, fused="bn_act", num_classes=10)
    return model.to(memory_format=torch.channels_last).train()


def _batch(n):
    return torch.randn(n, 3, 32, 32).contiguous(memory_format=torch.channels_last)


@pytest.fixture
def device_path(monkeypatch, tmp_path):
    monkeypatch.setenv("ENGINE_VERIFY", "1")
    monkeypatch.setenv("ENGINE_CACHE_DIR", str(tmp_path))
    verify.forget_memory()
    torch._dynamo.reset()
    yield
    verify.forget_memory()
    torch._dynamo.reset()


@pytest.mark.slow
def test_compiled_fused_model_calls_the_fused_kernels_after_warm_up(device_path, monkeypatch):
    model = _model()
    norms = sum(isinstance(m, BatchNormAct2d) for m in model.modules())
    spawns = []
    real = verify.run_jobs
    monkeypatch.setattr(verify, "run_jobs", lambda jobs, *a, **k: spawns.append(len(jobs)) or real(jobs, *a, **k))
    assert autotune_fused_blocks(model, _batch(2)) == norms
    # Every distinct bn_act key, both fused backends, checked in one child.
    assert len(spawns) == 1 and spawns[0] >= 2
    monkeypatch.setattr(verify, "run_jobs", lambda *a, **k: pytest.fail("a check ran while tracing"))
    for dynamic in (False, True):
        torch._dynamo.reset()
        seen = []
        compiled = torch.compile(model, backend=_graph_recorder(seen), dynamic=dynamic)
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            x = _batch(2)
            eager = model(x)
            out = compiled(x)
        torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-4)
        # Each block's norms ran on the first backend in the order: the extension's kernel (its C++ loop here).
        calls = [t for graph in seen for t in graph if "bn_act" in t]
        assert calls == ["engine.bn_act_fwd.default"] * norms, (dynamic, calls)
        assert bn_act.last_decision.backend == "cuda"


@pytest.mark.slow
def test_compiled_without_warm_up_runs_the_reference_and_says_so(device_path, monkeypatch):
    model = _model()
    monkeypatch.setattr(verify, "run_jobs", lambda *a, **k: pytest.fail("a check ran while tracing"))
    seen = []
    compiled = torch.compile(model, backend=_graph_recorder(seen), dynamic=True)
    with pytest.warns(UserWarning, match="has not been checked on this device"):
        compiled(_batch(2))
    assert not [t for graph in seen for t in graph if "engine." in t]
    assert any("native_batch_norm" in t for graph in seen for t in graph)


def test_keys_hold_concrete_sizes_under_dynamic_shapes(device_path, monkeypatch):
    """With dynamic=True the keys the gate looks up are the batch's real sizes, so a warm-up
    at that batch is found; a new batch size is a new key (and, here, unchecked)."""
    looked_up = []
    real = verify._traced_gate
    monkeypatch.setattr(verify, "_traced_gate", lambda key: looked_up.append(key) or real(key))
    verify._traced_gate._dynamo_marked_constant = True
    norm = BatchNormAct2d(8).train()
    x = torch.randn(4, 8, 5, 5, requires_grad=True)
    norm(x)  # eager: checks this key
    compiled = torch.compile(norm, backend="aot_eager", dynamic=True)
    compiled(torch.randn(4, 8, 5, 5, requires_grad=True))
    assert looked_up and all("float32[4x8x5x5]" in k for k in looked_up)
    with pytest.warns(UserWarning, match="has not been checked"):
        compiled(torch.randn(6, 8, 5, 5, requires_grad=True))
    assert any("float32[6x8x5x5]" in k for k in looked_up)


@pytest.mark.parametrize("backend", ["reference", "cuda", "triton"])
def test_cumulative_batch_norm_has_no_host_sync(monkeypatch, backend, host_reads):
    monkeypatch.setenv("ENGINE_BACKEND", backend)
    ours = BatchNormAct2d(6, relu=True, momentum=None)
    theirs = torch.nn.BatchNorm2d(6, momentum=None)
    for _ in range(3):
        x = torch.randn(3, 6, 4, 5)
        with host_reads() as mode:
            y = ours(x)
        assert mode.reads == 0
        torch.testing.assert_close(y, torch.relu(theirs(x)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.running_mean, theirs.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.running_var, theirs.running_var, rtol=1e-5, atol=1e-6)
    assert ours.num_batches_tracked.item() == 3
