"""The inside of a check (engine.ops.verify): the code that runs in the child process.

The parent never imports this module; it starts `python -c "from engine.ops.check_child
import child_main; child_main()"` and sends it jobs. A check builds seeded random inputs of
the key's shapes, runs the backend and the reference on copies of them, forward and
backward (random output gradients), and compares every output, every gradient and every
tensor the op updates in place (running statistics) with engine.ops.numerics.compare.
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


def _fill(name: Optional[str], spec, gen: torch.Generator, named: dict, upcast: bool):
    """Seeded values an op accepts: a positive variance and scale, valid tags, weights over them.
    `upcast`: half-precision tensors in fp32, holding the same (rounded) values."""
    shape, dtype, layout, grad, device = spec[1:]
    # Drawn on the CPU (a generator serves one device), then placed and rounded: the same
    # values on any device.
    if name == "tags":
        rows = named["weight"].shape[0]
        t = torch.randint(-1, rows, shape, generator=gen)
        t[:, 0] = torch.randint(0, rows, (shape[0],), generator=gen)
    elif name == "tag_weights":
        valid = (named["tags"].cpu() >= 0).float()
        t = valid / valid.sum(1, keepdim=True).clamp(min=1)
    elif not dtype.is_floating_point:
        t = torch.randint(0, 2, shape, generator=gen)
    elif name in ("running_var", "in_scale"):
        t = torch.rand(shape, generator=gen).add_(0.5)
    else:
        t = torch.randn(shape, generator=gen)
    t = t.to(device=device, dtype=dtype)
    if upcast and dtype in (torch.float16, torch.bfloat16):
        t = t.float()
    if layout == "nhwc":
        t = t.contiguous(memory_format=torch.channels_last)
    return t.requires_grad_(grad)


def _build(spec, name, gen, named, leaves: list, upcast: bool):
    kind = spec[0]
    if kind == "tensor":
        t = _fill(name, spec, gen, named, upcast)
        if t.requires_grad:
            leaves.append(t)
        if name is not None:
            named[name] = t
        return t
    if kind == "namedtuple":
        module, qualname = spec[1].split(":")
        cls = getattr(importlib.import_module(module), qualname)
        return cls(*[_build(s, f, gen, named, leaves, upcast) for s, f in zip(spec[2], cls._fields)])
    if kind == "seq":
        items = [_build(s, None, gen, named, leaves, upcast) for s in spec[2]]
        return tuple(items) if spec[1] == "tuple" else items
    return spec[1]


def build_call(op, job: dict, seed: int = 0, upcast: bool = False):
    """(args, kwargs, leaves needing gradients) of a job, the same values for a given seed."""
    gen = torch.Generator().manual_seed(seed)
    names = list(inspect.signature(op.reference).parameters)
    named: dict[str, Tensor] = {}
    leaves: list[Tensor] = []
    args = [_build(s, names[i] if i < len(names) else None, gen, named, leaves, upcast)
            for i, s in enumerate(job["args"])]
    kwargs = {k: _build(s, k, gen, named, leaves, upcast) for k, s in job["kwargs"].items()}
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


def _run(op, backend: str, job: dict, upcast: bool = False) -> dict:
    """One run of a backend (or an autotuned op's variant) on the job's inputs: named
    outputs, gradients and the float arguments after the call (ops update running
    statistics in place)."""
    args, kwargs, leaves = build_call(op, job, upcast=upcast)
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
            # Output gradients hold the same values in every run: rounded to the least precise dtype.
            gen, rounding = torch.Generator().manual_seed(1), job_dtype(job)
            seeds = [torch.randn(o.shape, generator=gen).to(rounding).to(o.device, o.dtype) for o in differentiable]
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
    start = time.perf_counter()
    got = _run(op, job["backend"], job)
    seconds = round(time.perf_counter() - start, 4)
    want = _run(op, "reference", job, upcast=True)

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
            native = _run(op, "reference", job)["named"]
            floors = {name: relative_error(native[name], w) for name, _, w in pairs if native.get(name) is not None}
        except RuntimeError:
            pass  # the reference has no kernel for this dtype here: the dtype's tolerance alone
    verdict = compare(pairs, dtype, floors)
    verdict["seconds"] = seconds
    verdict["checked"] = {kind: sum(name.startswith(kind) for name, _, _ in pairs)
                          for kind in ("output", "gradient", "updated input")}
    return verdict
