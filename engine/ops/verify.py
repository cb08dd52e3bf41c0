"""Verified before trusted: on a device, a Triton or CUDA backend serves a call only after
a check against the reference for the call's key has passed.

A key is the op, the backend (or an autotuner's variant such as "triton:64"), the device
model and every argument's shape, dtype, layout and whether it needs a gradient; the
build is the autotune cache's version record (engine.ops.autotune), which digests every
kernel source, the ops' Python glue and the compiled extension, so a rebuild or an edit
re-checks everything. A check builds seeded random inputs of the key's shapes, runs the
backend and the reference on copies of them, forward and backward (random output
gradients), and compares every output, every gradient and every tensor the op updates in
place (running statistics) with a tolerance by dtype. The verdict (pass, mismatch with
the error, error with the exception, crash with the exit status) is cached in memory and
on disk beside the timings.

Checks run in a spawned child process: a kernel that faults leaves the CUDA context
unusable (the error is sticky) or kills the process, and the parent must survive both.
The parent records a crash when the child dies mid-check, then goes on with the next
check in a fresh child. Checks run only eagerly; under torch.compile tracing or CUDA-graph
capture an unchecked key runs the next backend (the reference) with a one-time warning,
which is why the training loop warms up eagerly first (engine.models.autotune_fused_blocks).

On CUDA tensors the gate is always on. ENGINE_VERIFY=1 turns it on for CPU tensors too
and lets the fused backends take CPU tensors without being forced (Triton's interpreter,
the extension's C++ loop): the device path, for testing on a machine without a GPU.

This module is the parent's side: keys, the verdict store, the gate and the child
processes. What runs inside a child is engine.ops.check_child; the comparison itself is
engine.ops.numerics.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import subprocess
import sys
import time
import warnings
from multiprocessing.connection import Connection
from typing import Callable, Optional

import torch
from torch import Tensor

from engine.ops.backends import verify_on_cpu
from engine.ops.numerics import tensors_in

FAILED = ("mismatch", "error", "crash")
# Seconds one check may take before its child is killed and the check called a crash (a hang).
TIMEOUT_S = float(os.environ.get("ENGINE_VERIFY_TIMEOUT", "600"))

# "module:function" callables every child runs before its checks: registrations the checks
# need that importing engine.ops does not make (test doubles).
CHILD_SETUP: list[str] = []

_IN_CHILD = False
_MEMORY: dict[str, dict] = {}
_WARNED: set[str] = set()


def mark_child() -> None:
    """In a check's child process: calls there are the checks themselves, never gated."""
    global _IN_CHILD
    _IN_CHILD = True


def required(args, kwargs) -> bool:
    """Whether a call with these arguments must be checked before a fused backend takes it."""
    if _IN_CHILD:
        return False
    if any(t.is_cuda for t in tensors_in((args, kwargs))):
        return True
    return verify_on_cpu()


def _layout(t: Tensor) -> str:
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        return "nhwc"
    return "dense" if t.is_contiguous() else "strided"


def describe(value) -> str:
    """The key text of one argument. Sizes go through int(): under torch.compile with
    dynamic shapes that specialises them, so a key never holds a symbol."""
    if isinstance(value, Tensor):
        shape = "x".join([f"{int(s)}" for s in value.shape])
        grad = "+grad" if value.requires_grad and torch.is_grad_enabled() else ""
        return f"{str(value.dtype)[6:]}[{shape}]{_layout(value)}{grad}"
    if value is None or isinstance(value, (bool, int, str)):
        return f"{value}"
    if isinstance(value, float):
        # The value of a float (momentum, eps) does not change which code runs; zero may.
        return "0.0" if value == 0.0 else "float"
    if isinstance(value, (tuple, list)):
        return "(" + ",".join([describe(v) for v in value]) + ")"
    return type(value).__name__


def call_key(op_name: str, backend: str, args, kwargs) -> str:
    device = "cpu"
    for t in tensors_in((args, kwargs)):
        if t.is_cuda:
            device = torch.cuda.get_device_name(t.device)
            break
    parts = [describe(a) for a in args] + [f"{k}={describe(v)}" for k, v in sorted(kwargs.items())]
    return f"{device}|{op_name}|{backend}|" + " ".join(parts)


# ------------------------------------------------------------------ verdict store

def _store():
    from engine.ops.autotune import default_tuner
    return default_tuner()


def lookup(key: str) -> Optional[dict]:
    verdict = _MEMORY.get(key)
    if verdict is None:
        verdict = _store().verdict(key)
        if verdict is not None:
            _MEMORY[key] = verdict
    return verdict


def record(key: str, verdict: dict) -> None:
    _MEMORY[key] = verdict
    _store().record_verdict(key, verdict)


def failed_verdicts() -> dict[str, str]:
    """{key: what failed} of every failed check this process has run or read: the keys whose
    calls the reference served instead (a benchmark row must say so)."""
    return {key: f"{v['status']}: {v['detail']}" for key, v in _MEMORY.items() if v["status"] != "pass"}


def forget_memory() -> None:
    """Drops this process's copies, so the next lookup reads the disk (tests)."""
    _MEMORY.clear()
    _WARNED.clear()


def reason(verdict: dict) -> Optional[str]:
    """None for a pass, else why the backend may not serve the key."""
    if verdict["status"] == "pass":
        return None
    return f"failed its check against the reference ({verdict['status']}: {verdict['detail']})"


# ------------------------------------------------------------------ the gate

def gate(op, names: list[str], args, kwargs) -> dict[str, Optional[str]]:
    """Per backend name, why it may not serve this call of `op` (None: it may). Unknown
    keys are checked eagerly, all in one child; under tracing or capture only read."""
    if not names or not required(args, kwargs):
        return {name: None for name in names}
    keys = {name: call_key(op.name, name, args, kwargs) for name in names}
    if torch.compiler.is_compiling() or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()):
        return {name: _traced_gate(key) for name, key in keys.items()}
    verdicts = {name: lookup(key) for name, key in keys.items()}
    todo = [name for name, verdict in verdicts.items() if verdict is None]
    if todo and _QUEUE is not None:
        for name in todo:
            _QUEUE.setdefault(keys[name], check_job(op.name, name, args, kwargs))
        return {name: reason(v) if v is not None else "queued for its check (engine.ops.verify.deferred)"
                for name, v in verdicts.items()}
    if todo:
        for name, verdict in zip(todo, run_jobs([check_job(op.name, name, args, kwargs) for name in todo])):
            _record_checked(keys[name], verdict)
            verdicts[name] = verdict
    return {name: reason(verdict) for name, verdict in verdicts.items()}


_QUEUE: Optional[dict[str, dict]] = None


@contextlib.contextmanager
def deferred():
    """Within it, calls with unchecked keys queue their checks and run the next backend
    (the reference); on leaving, every queued check runs in one child. A warm-up pass over
    a model in this context costs one child process instead of one per shape. Yields the
    queue ({key: job}), which holds what was checked once the context has closed."""
    global _QUEUE
    if _QUEUE is not None:  # nested: the outer context runs the checks
        yield _QUEUE
        return
    _QUEUE = {}
    try:
        yield _QUEUE
        queued, _QUEUE = _QUEUE, None
        if queued:
            for key, verdict in zip(queued, run_jobs(list(queued.values()))):
                _record_checked(key, verdict)
    finally:
        _QUEUE = None


def _record_checked(key: str, verdict: dict) -> None:
    record(key, verdict)
    if verdict["status"] != "pass":
        print(f"[engine] verify {key}: {verdict['status']}: {verdict['detail']}", file=sys.stderr)


def _traced_gate(key: str) -> Optional[str]:
    # Runs as plain Python while torch.compile traces, and its answer is a constant of the graph.
    verdict = lookup(key)
    if verdict is not None:
        return reason(verdict)
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(f"engine: {key} has not been checked on this device, and checks cannot run inside "
                      "torch.compile tracing or CUDA-graph capture, so the reference runs there instead; run "
                      "one eager step first (engine.models.autotune_fused_blocks)", stacklevel=2)
    return "not verified for this shape yet (checks run in eager warm-up only), so it is not used under " \
           "torch.compile or CUDA-graph capture"


def untuned_under_compile(key: str) -> str:
    """For an autotuned op whose key has no choice under tracing or capture: warns once
    (the eager warm-up was skipped or ran another shape) and answers "reference"."""
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(f"engine: {key} was not autotuned in an eager warm-up, and tuning cannot run inside "
                      "torch.compile tracing or CUDA-graph capture, so the reference runs there instead; run "
                      "one eager step first (engine.models.autotune_fused_blocks)", stacklevel=2)
    return "reference"


# torch.compile runs _traced_gate as plain Python while tracing and folds its answer into the
# graph as a constant: torch.compiler.assume_constant_result sets this mark, but importing it
# imports torch._dynamo (seconds), which `import engine` must not pay.
_traced_gate._dynamo_marked_constant = True
untuned_under_compile._dynamo_marked_constant = True


def candidates_checker(op_name: str, args, kwargs) -> Callable[[list[str]], dict[str, Optional[str]]]:
    """For an autotuner: checks its candidates (backends and variants such as "triton:64",
    run in the child by the op's `run_variant`; "reference" is never checked) on these
    inputs, all in one child, and returns {name: None if passed else why not}. Verdicts
    are cached by key."""
    def run(names: list[str]) -> dict[str, Optional[str]]:
        out: dict[str, Optional[str]] = {}
        todo: list[tuple[str, str]] = []
        for name in names:
            if name == "reference" or not required(args, kwargs):
                out[name] = None
                continue
            key = call_key(op_name, name, args, kwargs)
            verdict = lookup(key)
            if verdict is None:
                todo.append((name, key))
            else:
                out[name] = reason(verdict)
        verdicts = run_jobs([check_job(op_name, name, args, kwargs) for name, _ in todo]) if todo else []
        for (name, key), verdict in zip(todo, verdicts):
            _record_checked(key, verdict)
            out[name] = reason(verdict)
        return out
    return run


# ------------------------------------------------------------------ jobs and the child

def _spec(value):
    """A picklable recipe for a like argument: tensors by shape, dtype, layout and grad."""
    if isinstance(value, Tensor):
        return ("tensor", tuple(value.shape), value.dtype, _layout(value),
                bool(value.requires_grad and torch.is_grad_enabled()), str(value.device))
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return ("namedtuple", f"{type(value).__module__}:{type(value).__qualname__}", [_spec(v) for v in value])
    if isinstance(value, (tuple, list)):
        return ("seq", type(value).__name__, [_spec(v) for v in value])
    try:
        return ("value", pickle.loads(pickle.dumps(value)))
    except Exception:
        # A process group: a check runs one process's math, without collectives.
        return ("value", None)


def check_job(op_name: str, backend: str, args, kwargs) -> dict:
    return {"kind": "check", "op": op_name, "backend": backend, "args": [_spec(a) for a in args],
            "kwargs": {k: _spec(v) for k, v in kwargs.items()}, "grad": torch.is_grad_enabled()}


def run_jobs(jobs: list[dict], timeout_s: Optional[float] = None,
             on_result: Optional[Callable[[int, dict], None]] = None) -> list[dict]:
    """Runs jobs in order in child processes, one child for as many as it survives: a
    child that dies or hangs marks its current job a crash, and a fresh child goes on.
    The child is a fresh interpreter (not a fork: CUDA cannot be forked, and not
    multiprocessing's spawn, which would re-run the user's main script). `on_result(i,
    result)` hears each job's result as it settles (a caller killed mid-run keeps those)."""
    timeout_s = TIMEOUT_S if timeout_s is None else timeout_s
    results: list[Optional[dict]] = [None] * len(jobs)

    def settle(i: int, result: dict) -> None:
        results[i] = result
        if on_result is not None:
            on_result(i, result)
    pending = list(range(len(jobs)))
    while pending:
        read_fd, write_fd = os.pipe()
        child = subprocess.Popen([sys.executable, "-c", "from engine.ops.check_child import child_main; child_main()",
                                  str(write_fd)], stdin=subprocess.PIPE, pass_fds=(write_fd,))
        os.close(write_fd)
        receiver = Connection(read_fd, writable=False)
        child.stdin.write(pickle.dumps((sys.path, list(CHILD_SETUP), [jobs[i] for i in pending])))
        child.stdin.close()
        current: Optional[int] = None
        started = time.monotonic()
        while True:
            if not receiver.poll(timeout_s if current is not None else max(timeout_s, 120.0)):
                child.kill()
                child.wait()
                why = f"timed out after {timeout_s:.0f} s" if current is not None else "child did not start"
                break
            try:
                message = receiver.recv()
            except EOFError:
                why = _exit_text(child.wait())
                break
            if message[0] == "start":
                current, started = pending[message[1]], time.monotonic()
            elif message[0] == "done":
                settle(current, message[2])
                current = None
            elif message[0] == "setup-failed":
                child.wait()
                for i in pending:
                    settle(i, {"status": "error", "detail": f"child setup failed: {message[1]}",
                               "max_error": None, "seconds": None})
                return results  # type: ignore[return-value]
        receiver.close()
        pending = [i for i in pending if results[i] is None]
        if not pending:
            break
        if current is None:
            # Died before its first job or between two: the next one takes the blame, so that
            # every round settles one job and a child that cannot start ends the loop.
            current = pending[0]
        settle(current, {"status": "crash", "detail": f"the check's process died: {why}", "max_error": None,
                         "seconds": round(time.monotonic() - started, 3)})
        pending.remove(current)
    return results  # type: ignore[return-value]


def _exit_text(code: Optional[int]) -> str:
    if code is not None and code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"
