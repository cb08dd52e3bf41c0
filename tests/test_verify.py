"""Verified before trusted (engine.ops.verify) on the CPU: ENGINE_VERIFY=1 makes CPU
tensors take the device path, and test-double backends (a wrong forward, a wrong
gradient, a process-killing crash, a good one) prove the gating, the verdict cache on disk
and in memory, the crash isolation, the autotuner's use of verdicts and results, the
compile-time behaviour, and the cache digest."""

import json
import os
import warnings

import pytest
import torch

from engine.ops import autotune, verify
from engine.ops.autotune import Autotuner
from engine.ops.dispatch import REGISTRY, define

pytestmark = pytest.mark.slow  # a minute or more together on 2 cores

SETUP = f"{__name__}:install"


class _ScaledGrad(torch.autograd.Function):
    """x * w forward, gradients scaled by 1.5: right values, wrong gradients."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return x * w

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        return 1.5 * g * w, 1.5 * (g * x).sum(0)


def _reference(x, w):
    return x * w


def _wrong_forward(x, w):
    return x * w + 0.5


def _crash(x, w):
    os.abort()


def _wrong_gradient(x, w):
    return _ScaledGrad.apply(x, w)


def _good(x, w):
    return (x.double() * w.double()).to(x.dtype)


def install():
    """The test doubles, in the test process and in every verification child."""
    wrong = define("double_wrong", _reference)
    wrong.register("cuda", _crash)
    wrong.register("triton", _wrong_forward)
    grads = define("double_grads", _reference)
    grads.register("cuda", _wrong_gradient)
    grads.register("triton", _good)


@pytest.fixture
def doubles(monkeypatch, tmp_path):
    monkeypatch.setenv("ENGINE_VERIFY", "1")
    monkeypatch.setenv("ENGINE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(verify, "CHILD_SETUP", [SETUP])
    verify.forget_memory()
    install()
    yield REGISTRY["double_wrong"], REGISTRY["double_grads"]
    for name in ("double_wrong", "double_grads"):
        REGISTRY.pop(name, None)
    verify.forget_memory()


def _inputs(n=4, c=3):
    return torch.randn(n, c, requires_grad=True), torch.randn(c, requires_grad=True)


def _spawns(monkeypatch):
    calls = []
    real = verify.run_jobs

    def counting(jobs, *a, **k):
        calls.append([(j["op"], j["backend"]) for j in jobs])
        return real(jobs, *a, **k)
    monkeypatch.setattr(verify, "run_jobs", counting)
    return calls


def test_wrong_and_crashing_backends_are_skipped_with_reasons(doubles, monkeypatch, capfd):
    wrong, grads = doubles
    spawns = _spawns(monkeypatch)
    x, w = _inputs()
    y = wrong(x, w)  # the crash kills only its child; this process goes on
    assert torch.equal(y, x * w)
    decision = wrong.last_decision
    assert decision.backend == "reference" and not decision.forced
    assert "crash" in decision.skipped["cuda"] and "SIGABRT" in decision.skipped["cuda"]
    assert "mismatch" in decision.skipped["triton"] and "output 0" in decision.skipped["triton"]
    # A wrong gradient with a right forward is caught too; the good backend then serves.
    grads(x, w).sum().backward()
    assert grads.last_decision.backend == "triton"
    assert "mismatch" in grads.last_decision.skipped["cuda"] and "gradient" in grads.last_decision.skipped["cuda"]
    # Each call's fused backends are checked together, one batch of checks per new key.
    assert spawns == [[("double_wrong", "cuda"), ("double_wrong", "triton")],
                      [("double_grads", "cuda"), ("double_grads", "triton")]]
    # `engine info` lists the failures with their reasons.
    from engine.info import collect, format_report
    info = collect()
    failed = {f["backend"]: f for f in info["verdicts"]["ops"]["double_wrong"]["failed"]}
    assert failed["cuda"]["status"] == "crash" and failed["triton"]["status"] == "mismatch"
    assert info["verdicts"]["ops"]["double_grads"] == {"passed": 1, "failed": [failed_grads := info["verdicts"][
        "ops"]["double_grads"]["failed"][0]]} and failed_grads["backend"] == "cuda"
    report = format_report(info)
    assert "double_wrong: 0 passed, 2 failed" in report and "killed by SIGABRT" in report
    # ENGINE_LOG_DISPATCH prints the decision with the reasons.
    monkeypatch.setenv("ENGINE_LOG_DISPATCH", "1")
    capfd.readouterr()
    wrong(x, w)
    out = capfd.readouterr().out
    assert "double_wrong: reference (auto)" in out and "crash" in out and "mismatch" in out


def test_verdicts_are_cached_in_memory_and_on_disk(doubles, monkeypatch, tmp_path):
    wrong, grads = doubles
    spawns = _spawns(monkeypatch)
    x, w = _inputs()
    grads(x, w)
    assert len(spawns) == 1
    grads(*_inputs())  # same key: no new check
    assert len(spawns) == 1
    with torch.no_grad():  # a different key: no gradients asked for, so the forward alone is checked
        grads(x, w)
    assert len(spawns) == 2 and grads.last_decision.backend == "cuda"
    grads(*_inputs(n=5))  # another shape, another check
    assert len(spawns) == 3
    saved = json.loads((tmp_path / "autotune.json").read_text())
    statuses = sorted(v["status"] for v in saved["verdicts"].values())
    assert statuses == ["mismatch", "mismatch", "pass", "pass", "pass", "pass"]
    assert all("cpu|double_grads|" in k for k in saved["verdicts"])
    # A new process (here: memory forgotten, a fresh tuner) reads the verdicts back without checking.
    verify.forget_memory()
    monkeypatch.setattr(autotune, "_DEFAULT", None)
    monkeypatch.setattr(verify, "run_jobs", lambda *a, **k: pytest.fail("checked again despite a cached verdict"))
    grads(x, w)
    assert grads.last_decision.backend == "triton" and "mismatch" in grads.last_decision.skipped["cuda"]


def test_stale_build_rechecks(doubles, monkeypatch):
    """A verdict belongs to a build: another kernel digest drops every verdict."""
    _, grads = doubles
    spawns = _spawns(monkeypatch)
    grads(*_inputs())
    assert len(spawns) == 1
    verify.forget_memory()
    monkeypatch.setattr(autotune, "_DEFAULT", None)
    monkeypatch.setattr(autotune, "_kernel_digest", lambda files=None: "another build")
    grads(*_inputs())
    assert len(spawns) == 2


def test_without_the_device_path_nothing_is_checked(doubles, monkeypatch):
    """CPU tensors by default: fused backends are not chosen, and no check runs (CI stays fast)."""
    monkeypatch.delenv("ENGINE_VERIFY")
    monkeypatch.setattr(verify, "run_jobs", lambda *a, **k: pytest.fail("checked on the CPU path"))
    assert not verify.required((torch.ones(2),), {})
    from engine.ops import bn_act
    x = torch.randn(2, 3, 4, 4)
    bn_act(x, None, None, training=True)
    # A forced backend is the caller's choice and is not gated.
    wrong, _ = doubles
    monkeypatch.setenv("ENGINE_VERIFY", "1")
    x, w = _inputs()
    assert not torch.equal(wrong(x, w, backend="triton"), x * w)


def test_run_jobs_contains_crashes_and_goes_on(doubles):
    x, w = _inputs()
    jobs = [verify.check_job("double_wrong", b, (x, w), {}) for b in ("triton", "cuda", "reference", "cuda")]
    jobs.insert(2, verify.check_job("double_grads", "triton", (x, w), {}))
    heard = []
    results = verify.run_jobs(jobs, on_result=lambda i, r: heard.append((i, r["status"])))
    assert [r["status"] for r in results] == ["mismatch", "crash", "pass", "pass", "crash"]
    # Each result as it settles, the crashes included, in order: selftest writes its JSON from these.
    assert heard == list(enumerate(r["status"] for r in results))
    assert "SIGABRT" in results[1]["detail"]
    assert results[2]["max_error"] < 1e-6 and results[2]["checked"] == {"output": 1, "gradient": 2,
                                                                        "updated input": 0}


def test_a_hang_is_a_crash(doubles, monkeypatch):
    monkeypatch.setattr(verify, "CHILD_SETUP", [SETUP, f"{__name__}:_install_hang"])
    results = verify.run_jobs([verify.check_job("double_wrong", "triton", _inputs(), {})], timeout_s=3)
    assert results[0]["status"] == "crash" and "timed out" in results[0]["detail"]


def _install_hang():
    import time
    REGISTRY["double_wrong"].backends["triton"].impl = lambda x, w: time.sleep(60)


def test_under_compile_an_unchecked_key_runs_the_reference_with_a_warning(doubles, monkeypatch):
    _, grads = doubles
    monkeypatch.setattr(verify, "run_jobs", lambda *a, **k: pytest.fail("a check ran while tracing"))
    torch._dynamo.reset()
    compiled = torch.compile(lambda x, w: grads(x, w), backend="aot_eager", fullgraph=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = compiled(*_inputs())
    assert any("has not been checked on this device" in str(c.message) for c in caught)
    assert y.shape == (4, 3)


@pytest.mark.parametrize("dynamic", [False, True])
def test_under_compile_checked_keys_are_found(doubles, monkeypatch, dynamic):
    """After an eager warm-up the compiled function serves the verified backend, with
    static and dynamic shapes (sizes are specialised into the key, never symbols)."""
    _, grads = doubles
    served = []
    monkeypatch.setitem(grads.backends["triton"].__dict__, "impl",
                        lambda x, w: served.append(tuple(x.shape)) or _good(x, w))
    x, w = _inputs()
    grads(x, w)  # eager: checks cuda (fails) and triton (passes)
    x5, w5 = _inputs(n=5)
    grads(x5, w5)
    served.clear()
    monkeypatch.setattr(verify, "run_jobs", lambda *a, **k: pytest.fail("a check ran while tracing"))
    torch._dynamo.reset()
    compiled = torch.compile(lambda x, w: grads(x, w), backend="aot_eager", fullgraph=True, dynamic=dynamic)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "not checked" warning
        compiled(x, w)
        compiled(x5, w5)
    assert served == [(4, 3), (5, 3)]  # traced once per shape, each through the verified backend


def test_autotuner_times_only_verified_candidates_and_checks_their_results(tmp_path):
    x = torch.randn(8)
    timed = []

    def timer(fn):
        fn()
        timed.append(fn)
        return {0: 3.0, 1: 1.0, 2: 2.0, 3: 0.5}[len(timed) - 1]

    candidates = {"reference": lambda: x * 2, "fast-wrong": lambda: x * 2 + 1, "ok": lambda: x * 2,
                  "crashes": lambda: pytest.fail("a candidate that failed its check was timed")}
    tuner = Autotuner(tmp_path / "a.json", timer, {"v": 1})
    asked = []

    def check(names):
        asked.append(names)
        return {n: ("crash: the check's process died" if n == "crashes" else None) for n in names}
    assert tuner.choose("k", candidates, verify=check) == "ok"
    assert asked == [["reference", "fast-wrong", "ok", "crashes"]]
    entry = json.loads((tmp_path / "a.json").read_text())["entries"]["k"]
    assert set(entry["rejected"]) == {"fast-wrong", "crashes"}
    assert "differs from the reference" in entry["rejected"]["fast-wrong"]
    assert entry["times_ms"]["crashes"] is None


def test_candidates_checker_checks_variants_in_one_child(doubles, monkeypatch):
    spawns = _spawns(monkeypatch)
    monkeypatch.setattr(verify, "CHILD_SETUP", [SETUP, f"{__name__}:_install_variants"])
    x, w = _inputs()
    checker = verify.candidates_checker("double_grads", (x, w), {})
    out = checker(["reference", "triton:1", "triton:2"])
    assert out["reference"] is None and out["triton:1"] is None and "mismatch" in out["triton:2"]
    assert spawns == [[("double_grads", "triton:1"), ("double_grads", "triton:2")]]
    assert checker(["triton:1", "triton:2"]) == {"triton:1": None, "triton:2": out["triton:2"]}
    assert len(spawns) == 1


def _install_variants():
    from engine.ops.dispatch import REGISTRY
    REGISTRY["double_grads"].run_variant = (
        lambda variant, x, w: _good(x, w) if variant == "triton:1" else _wrong_forward(x, w))


def test_an_autotuned_op_runs_what_its_tuner_chose(doubles, monkeypatch):
    """For a tuned op the tuner, not the gate, decides (its candidates were checked when it
    timed them): the chosen backend runs, the others are skipped saying so; where the tuner
    times nothing (None) the verification gate decides as for any op."""
    _, grads = doubles
    spawns = _spawns(monkeypatch)
    x, w = _inputs()
    grads.tune = lambda x, w: "triton:2"
    grads(x, w)
    assert grads.last_decision.backend == "triton"
    assert grads.last_decision.skipped == {"cuda": "autotuned: triton:2 is faster for this shape"}
    grads.tune = lambda x, w: "reference"
    grads(x, w)
    assert grads.last_decision.backend == "reference"
    assert set(grads.last_decision.skipped) == {"cuda", "triton"}
    assert "cuDNN (the reference) is faster" in grads.last_decision.skipped["triton"]
    assert spawns == []
    grads.tune = lambda x, w: None
    grads(x, w)
    # The gate checked both fused backends: cuda's wrong gradient failed, triton passed.
    assert grads.last_decision.backend == "triton" and "mismatch" in grads.last_decision.skipped["cuda"]
    assert len(spawns) == 1


def test_digest_covers_every_kernel_source_the_glue_and_the_extension(tmp_path):
    from engine import kernels
    from engine.ops import backends
    files = autotune.digested_files()
    names = {(p.parent.name, p.name) for p in files}
    kernel_dir = os.path.dirname(kernels.__file__)
    assert {("kernels", n) for n in os.listdir(kernel_dir) if n.endswith(".py")} <= names
    assert {("ops", n) for n in ("conv_bn.py", "grouped_conv.py", "bn_act.py", "_cuda_grouped_conv.py",
                                 "hashtag_ce.py", "verify.py", "check_child.py", "numerics.py")} <= names
    if backends.load_extension() is not None:
        assert any(p.suffix == ".so" for p in files)
    # One changed byte in any of them changes the digest.
    copies = []
    for p in files[:3] + files[-1:]:
        copy = tmp_path / f"{len(copies)}_{p.name}"
        copy.write_bytes(p.read_bytes())
        copies.append(copy)
    before = autotune._kernel_digest(copies)
    for copy in copies:
        data = copy.read_bytes()
        copy.write_bytes(data + b" ")
        assert autotune._kernel_digest(copies) != before, copy.name
        copy.write_bytes(data)
    assert autotune._kernel_digest(copies) == before


def test_grouped_conv_tuner_candidates_are_checked(monkeypatch, tmp_path):
    """The checker the grouped 3x3's autotuner passes as `verify`: each Triton span and the
    direct kernel run on the tuner's shapes in one child and pass; a broken variant fails."""
    monkeypatch.setenv("ENGINE_VERIFY", "1")
    monkeypatch.setenv("ENGINE_CACHE_DIR", str(tmp_path))
    verify.forget_memory()
    spawns = _spawns(monkeypatch)
    from engine.ops.grouped_conv import candidates_checker
    check = candidates_checker((2, 8, 5, 4), torch.float32, torch.device("cpu"), 8, 2, 4, True, True, True)
    out = check(["reference", "triton:16", "cuda"])
    assert out == {"reference": None, "triton:16": None, "cuda": None} and len(spawns) == 1
    monkeypatch.setattr(verify, "CHILD_SETUP", [f"{__name__}:_break_grouped_conv_wgrad"])
    verify.forget_memory()
    broken = candidates_checker((2, 8, 5, 4), torch.float32, torch.device("cpu"), 8, 2, 4, True, True,
                                True)(["triton:32"])
    assert "mismatch" in broken["triton:32"] and "gradient 1" in broken["triton:32"]
    verify.forget_memory()


def _break_grouped_conv_wgrad():
    from engine.ops import grouped_conv
    real = grouped_conv.conv_wgrad
    grouped_conv.conv_wgrad = lambda *a, **k: real(*a, **k) * 1.1


def test_an_untuned_key_under_compile_warns_once_and_answers_reference():
    """What grouped_conv.tuned_choice answers under tracing for a shape the warm-up missed."""
    verify.forget_memory()
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: x * (2 if verify.untuned_under_compile("k|n4") == "reference" else 3),
                             backend="aot_eager", fullgraph=True)
    with pytest.warns(UserWarning, match="was not autotuned") as caught:
        assert torch.equal(compiled(torch.ones(4)), torch.full((4,), 2.0))
        compiled(torch.ones(4))
    assert len([c for c in caught if "was not autotuned" in str(c.message)]) == 1
    verify.forget_memory()


def test_warm_up_checks_the_head_with_the_trunk_in_one_child(monkeypatch, tmp_path):
    """The training loop's warm-up (engine.models.autotune_fused_blocks, run by
    builders.wrap_trunk on a GPU) runs the hashtag head on the trunk's features too: its
    kernels are checked at the step's key in the same child as the trunk's, before any of
    them runs, and the step that follows checks nothing and runs the verified backends.
    The head's counters are left as they were."""
    from torch import nn

    from engine.heads import HashtagHead
    from engine.models import autotune_fused_blocks
    from engine.ops import REGISTRY, BatchNormAct2d, bn_act
    monkeypatch.setenv("ENGINE_VERIFY", "1")
    monkeypatch.setenv("ENGINE_CACHE_DIR", str(tmp_path))
    verify.forget_memory()
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Conv2d(3, 16, 3, bias=False), BatchNormAct2d(16), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten()).train()
    head = HashtagHead(16, 37, static_batch=True).train()
    tags = torch.randint(0, 37, (4, 3), dtype=torch.int32)
    tags[1] = -1  # a row without tags: counted in empty_rows by a training call
    spawns = _spawns(monkeypatch)
    assert autotune_fused_blocks(trunk, torch.randn(4, 3, 8, 8), head, tags) == 1
    assert len(spawns) == 1
    assert {op for op, _ in spawns[0]} == {"bn_act", "hashtag_ce"}
    assert ("hashtag_ce", "triton") in spawns[0]
    assert head.empty_rows.item() == 0
    monkeypatch.setattr(verify, "run_jobs", lambda *a, **k: pytest.fail("the step ran a check after the warm-up"))
    loss = head(trunk(torch.randn(4, 3, 8, 8)), tags)
    loss.backward()
    assert REGISTRY["hashtag_ce"].last_decision.backend == "triton", REGISTRY["hashtag_ce"].last_decision
    assert bn_act.last_decision.backend != "reference", bn_act.last_decision
    assert head.weight.grad is not None and head.empty_rows.item() == 1
    verify.forget_memory()


def test_the_whole_step_check_passes_a_sound_fused_model_and_leaves_the_random_state():
    from engine.models.warmup import whole_step_verdict

    state = torch.random.get_rng_state()
    verdict = whole_step_verdict("bn_act", 2, 8, 4, 32, torch.device("cpu"), torch.float32)
    assert verdict["status"] == "pass", verdict
    assert torch.equal(torch.random.get_rng_state(), state)


def test_fused_blocks_that_fail_the_whole_step_give_way_to_plain_blocks_on_the_same_state(monkeypatch, capsys):
    """The optimizer and checkpoints hold the fused trunk: the plain trunk must train those very tensors."""
    from engine import builders
    from engine.config import load
    from engine.models import Bottleneck, warmup

    cfg = load(overrides=["model.name=custom", "model.layers=[1,1,1,1]", "model.groups=2",
                          "model.width_per_group=8", "model.fused=bn_act", "data.image_size=32"])
    trunk = builders.build_trunk(cfg)
    optimizer = torch.optim.SGD(trunk.parameters(), lr=0.1)
    seen = []
    monkeypatch.setattr(warmup, "whole_step_verdict", lambda *a, **k: seen.append(a) or {"status": "pass"})
    assert builders.fused_or_plain(cfg, trunk, torch.device("cpu"), 8, torch.bfloat16) is trunk
    assert seen == [("bn_act", 2, 8, 8, 32, torch.device("cpu"), torch.bfloat16)]
    monkeypatch.setattr(warmup, "whole_step_verdict", lambda *a, **k: {"status": "mismatch", "detail": "grad off"})
    plain = builders.fused_or_plain(cfg, trunk, torch.device("cpu"), 8, torch.bfloat16)
    assert "training with plain blocks" in capsys.readouterr().err
    assert warmup.fused_mode(plain) is None and any(isinstance(m, Bottleneck) for m in plain.modules())
    assert [id(p) for p in plain.parameters()] == [id(p) for p in optimizer.param_groups[0]["params"]]
    x = torch.randn(2, 3, 32, 32)
    plain(x).sum().backward()
    before = trunk.state_dict()["layer1.0.conv1.weight"].clone()
    optimizer.step()
    assert not torch.equal(trunk.state_dict()["layer1.0.conv1.weight"], before)
    running = dict(plain.named_buffers())["bn1.running_mean"]
    assert running is dict(trunk.named_buffers())["bn1.running_mean"] and running.abs().sum() > 0


def test_a_check_draws_its_inputs_once_for_all_its_runs(doubles, monkeypatch):
    """Half precision: the backend, the fp32 reference and the native reference all run, on
    one draw of the inputs (drawing costs minutes of CPU at training shapes), and see the
    same values (else the good backend would mismatch)."""
    from engine.ops import check_child

    drawn = []
    fill = check_child._fill
    monkeypatch.setattr(check_child, "_fill", lambda name, spec, *a: drawn.append(spec[1]) or fill(name, spec, *a))
    x, w = (t.half().requires_grad_() for t in _inputs())
    verdict = check_child.run_check(verify.check_job("double_grads", "triton", (x, w), {}))
    assert verdict["status"] == "pass" and verdict["checked"]["gradient"] == 2, verdict
    assert len(drawn) == 2


def test_a_benchmark_row_names_the_backend_that_ran_and_the_checks_that_failed(doubles):
    """A failed check hands the call to the reference without a word: the row must say so."""
    from benchmarks.common import DispatchRecord, row_failed

    wrong, grads = doubles
    x, w = _inputs()
    record = DispatchRecord()
    grads(x, w)
    row = record.fields()
    # Its cuda backend failed (a wrong gradient), so triton served: both said, and the row counts as failed.
    assert row["backends"] == {"double_grads": "triton"} and row_failed(row)
    assert [key.split("|")[2] for key in row["failed_checks"]] == ["cuda"]
    record = DispatchRecord()
    wrong(x, w)
    row = record.fields()
    assert row["backends"] == {"double_wrong": "reference"} and row_failed(row)
    assert {key.split("|")[2] for key in row["failed_checks"]} == {"triton", "cuda"}
