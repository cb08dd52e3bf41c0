"""The inside of a check (engine.ops.verify): the code that runs in the child process.

The parent never imports this module; it starts `python -c "from engine.ops.check_child
import child_main; child_main()"` and sends it jobs. A check draws seeded random inputs of
the key's shapes once, on the key's device, runs the backend and the reference on copies
of them, forward and backward (random output gradients), and compares every output, every
gradient and every tensor the op updates in place (running statistics) with
engine.ops.numerics.compare.
"""

from __future__ import annotations

import importlib
import inspect
import pickle
import sys
import time
import traceback
from multiprocessing.connection import Connection
from typing import Optional

import torch
from torch import Tensor

from engine.ops import autotune, verify
from engine.ops.dispatch import REGISTRY
from engine.ops.numerics import compare, lowest_precision, relative_error, tensors_in


def child_main() -> None:
    """Reads (sys.path, setup, jobs) from stdin, reports on the fd in argv[1]."""
    verify.mark_child()
    # A child reads the parent's choices and verdicts, never writes them.
    autotune.WRITABLE = False
    conn = Connection(int(sys.argv[1]), readable=False)
    path, setup, jobs = pickle.load(sys.stdin.buffer)
    sys.path[:0] = [p for p in path if p not in sys.path]
    try:
        import engine.ops  # noqa: F401  (registers the ops)
        for target in setup:
            module, name = target.split(":")
            getattr(importlib.import_module(module), name)()
    except Exception as e:
        conn.send(("setup-failed", f"{type(e).__name__}: {e}"))
        return
    for i, job in enumerate(jobs):
        conn.send(("start", i))
        try:
            if job["kind"] == "check":
                result = run_check(job)
            else:
                module, name = job["kind"].split(":")
                result = getattr(importlib.import_module(module), name)(job)
        except Exception as e:
            result = {"status": "error", "detail": f"{type(e).__name__}: {e}".strip()[:2000],
                      "trace": traceback.format_exc()[-4000:], "max_error": None, "seconds": None}
        conn.send(("done", i, result))
    conn.close()


class Draws:
    """A check's random values, drawn once (seeded, on each tensor's own device: a CUDA key's
    inputs come from the GPU's generator, not from one CPU thread) and copied for each of
    the check's runs (the backend, the fp32 reference, the reference in the inputs' dtype),
    which therefore see the same values, and none sees another's in-place updates."""

    def __init__(self, seed: int = 0):
        self.seed = seed
        self.inputs: list[Tensor] = []
        self.output_grads: dict[tuple, Tensor] = {}
        self._generators: dict[tuple[str, int], torch.Generator] = {}

    def generator(self, device, stream: int = 0) -> torch.Generator:
        key = (str(device), stream)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=device).manual_seed(self.seed + stream)
        return self._generators[key]

    def output_grad(self, i: int, out: Tensor, rounding: torch.dtype) -> Tensor:
        """The gradient seed of output i: the same values in every run, rounded to the least
        precise dtype of the check."""
        key = (i, tuple(out.shape), str(out.device))
        if key not in self.output_grads:
            self.output_grads[key] = torch.randn(out.shape, generator=self.generator(out.device, 1),
                                                 device=out.device).to(rounding)
        return self.output_grads[key].to(out.dtype)


def _fill(name: Optional[str], spec, gen: torch.Generator, named: dict) -> Tensor:
    """Seeded values an op accepts, in the spec's dtype, device and layout: a positive variance
    and scale, valid tags, weights over them."""
    shape, dtype, layout, grad, device = spec[1:]
    device = torch.device(device)
    if name == "tags":
        rows = named["weight"].shape[0]
        t = torch.randint(-1, rows, shape, generator=gen, device=device)
        t[:, 0] = torch.randint(0, rows, (shape[0],), generator=gen, device=device)
    elif name == "tag_weights":
        valid = (named["tags"] >= 0).float()
        t = valid / valid.sum(1, keepdim=True).clamp(min=1)
    elif not dtype.is_floating_point:
        t = torch.randint(0, 2, shape, generator=gen, device=device)
    elif name in ("running_var", "in_scale"):
        t = torch.rand(shape, generator=gen, device=device).add_(0.5)
    else:
        t = torch.randn(shape, generator=gen, device=device)
    t = t.to(dtype=dtype)
    if layout == "nhwc":
        t = t.contiguous(memory_format=torch.channels_last)
    return t


def _build(spec, name, draws: Draws, named, leaves: list, upcast: bool, counter: list[int]):
    kind = spec[0]
    if kind == "tensor":
        index = counter[0]
        counter[0] += 1
        if index == len(draws.inputs):
            draws.inputs.append(_fill(name, spec, draws.generator(spec[5]), named))
        t = draws.inputs[index].clone()
        if upcast and t.dtype in (torch.float16, torch.bfloat16):
            t = t.float()  # the same (rounded) values in fp32
        t.requires_grad_(spec[4])
        if t.requires_grad:
            leaves.append(t)
        if name is not None:
            named[name] = t
        return t
    if kind == "namedtuple":
        module, qualname = spec[1].split(":")
        cls = getattr(importlib.import_module(module), qualname)
        return cls(*[_build(s, f, draws, named, leaves, upcast, counter) for s, f in zip(spec[2], cls._fields)])
    if kind == "seq":
        items = [_build(s, None, draws, named, leaves, upcast, counter) for s in spec[2]]
        return tuple(items) if spec[1] == "tuple" else items
    return spec[1]


def build_call(op, job: dict, draws: Draws, upcast: bool = False):
    """(args, kwargs, leaves needing gradients) of a job: copies of `draws`' values (drawn on
    the first call). `upcast`: half-precision tensors in fp32, holding the same values."""
    names = list(inspect.signature(op.reference).parameters)
    named: dict[str, Tensor] = {}
    leaves: list[Tensor] = []
    counter = [0]
    args = [_build(s, names[i] if i < len(names) else None, draws, named, leaves, upcast, counter)
            for i, s in enumerate(job["args"])]
    kwargs = {k: _build(s, k, draws, named, leaves, upcast, counter) for k, s in job["kwargs"].items()}
    return args, kwargs, leaves


def _dtypes(spec):
    if spec[0] == "tensor":
        yield spec[2]
    elif spec[0] in ("namedtuple", "seq"):
        for s in spec[2]:
            yield from _dtypes(s)


def job_dtype(job: dict) -> torch.dtype:
    specs = list(job["args"]) + list(job["kwargs"].values())
    return lowest_precision(d for spec in specs for d in _dtypes(spec))


def _run(op, backend: str, job: dict, draws: Draws, upcast: bool = False) -> dict:
    """One run of a backend (or an autotuned op's variant) on the job's inputs: named
    outputs, gradients and the float arguments after the call (ops update running
    statistics in place)."""
    args, kwargs, leaves = build_call(op, job, draws, upcast=upcast)
    with torch.set_grad_enabled(job["grad"]):
        if backend != "reference" and op.run_variant is not None:
            # An autotuned op's implementation runs as named, never tuned again in here.
            out = op.run_variant(backend, *args, **kwargs)
        else:
            out = op.backends[backend].impl(*args, **kwargs)
        outs = list(tensors_in(out))
        grads: list[Optional[Tensor]] = []
        differentiable = [o for o in outs if o.requires_grad]
        if leaves and differentiable:
            rounding = job_dtype(job)
            seeds = [draws.output_grad(i, o, rounding) for i, o in enumerate(differentiable)]
            grads = list(torch.autograd.grad(differentiable, leaves, seeds, allow_unused=True))
    if outs and outs[0].is_cuda:
        torch.cuda.synchronize()
    named = {f"output {i}": o for i, o in enumerate(outs)}
    named.update({f"gradient {i}": g for i, g in enumerate(grads)})
    updated = [t for t in tensors_in((args, kwargs)) if not t.requires_grad and t.is_floating_point()]
    named.update({f"updated input {i}": t for i, t in enumerate(updated)})
    return {"named": named, "needs_grad": [o.requires_grad for o in outs], "outputs": len(outs)}


def run_check(job: dict) -> dict:
    """One check: the backend against the reference. The reference runs in fp32 on
    half-precision inputs' values (the specification's answer) and, for the tolerance, once
    more in the inputs' own dtype: a half-precision backend must come within twice the error
    the reference itself makes at that precision."""
    op = REGISTRY[job["op"]]
    draws = Draws()
    # Drawn before the clock starts: the seconds are the backend's.
    build_call(op, job, draws)
    start = time.perf_counter()
    got = _run(op, job["backend"], job, draws)
    seconds = round(time.perf_counter() - start, 4)
    want = _run(op, "reference", job, draws, upcast=True)

    def mismatch(detail):
        return {"status": "mismatch", "max_error": None, "seconds": seconds, "detail": detail}
    if got["outputs"] != want["outputs"]:
        return mismatch(f"returned {got['outputs']} tensors, the reference {want['outputs']}")
    if any(n.startswith("gradient") for n in want["named"]) and got["needs_grad"] != want["needs_grad"]:
        return mismatch(f"which outputs carry gradients differs from the reference: {got['needs_grad']} vs "
                        f"{want['needs_grad']}")
    for name, w in want["named"].items():
        if (got["named"].get(name) is None) != (w is None):
            return mismatch(f"{name} is {'missing' if w is not None else 'present'}, unlike the reference's")
    pairs = [(name, got["named"][name], w) for name, w in want["named"].items() if w is not None]
    dtype = job_dtype(job)
    floors = None
    if dtype in (torch.float16, torch.bfloat16):
        try:
            native = _run(op, "reference", job, draws)["named"]
            floors = {name: relative_error(native[name], w) for name, _, w in pairs if native.get(name) is not None}
        except RuntimeError:
            pass  # the reference has no kernel for this dtype here: the dtype's tolerance alone
    verdict = compare(pairs, dtype, floors)
    verdict["seconds"] = seconds
    verdict["checked"] = {kind: sum(name.startswith(kind) for name, _, _ in pairs)
                          for kind in ("output", "gradient", "updated input")}
    return verdict
