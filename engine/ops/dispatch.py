"""The op contract, and how one call of an op finds the implementation that runs it.

Every fused op is an `Op`: a callable with the reference implementation's signature
(plain PyTorch: the specification, always available) and optionally `triton` and `cuda`
backends checked against it. A call goes through these steps, in this order, and
`op.last_decision` says what was chosen and why every other backend was skipped
(`ENGINE_LOG_DISPATCH=1` prints it):

1. Validation. The op's `validate` raises on bad input, before any backend is considered.
2. Forcing. `backend=` on the call, else the ENGINE_BACKEND environment variable, names a
   backend: it runs if it can take the inputs, else BackendUnavailableError says why. It
   is never silently replaced and never checked (the caller's explicit choice; `engine
   selftest` checks every backend that way).
3. Candidates. The op's backends in its preference order (cuda, triton, reference) that
   this machine can run (`available`) and that take these inputs (`supports`: device,
   dtype, layout, shape).
4. Trust. On a device (CUDA tensors; CPU tensors with ENGINE_VERIFY=1 for tests) a fused
   candidate serves a call only after its check against the reference at the call's key
   has passed (engine.ops.verify: run in a child process, the verdict cached on disk).
   An autotuned op (`tune`: grouped_conv3x3) decides here instead: its tuner checks its
   candidates the same way (each backend, and variants of one such as the Triton kernel
   at a tile span, named "triton:64"), times those that passed on this shape, keeps the
   fastest (engine.ops.autotune) and answers its name; the dispatcher runs that backend.
5. The first candidate left runs; the reference ends every list.

Under torch.compile tracing or CUDA-graph capture nothing can be checked or timed: a key
without a verdict or a choice runs the reference, with a one-time warning, which is why
the training loop runs one eager warm-up step first (engine.models.autotune_fused_blocks).
"""

from __future__ import annotations

import functools
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from engine.ops import verify

BACKENDS = ("reference", "triton", "cuda")

# A check returns None when it accepts, or a sentence saying why not.
Check = Callable[..., Optional[str]]


class BackendUnavailableError(RuntimeError):
    """A forced backend cannot run the given inputs (the message says why)."""


@dataclass
class Backend:
    name: str
    impl: Callable[..., Any]
    # Whether this machine can run the backend at all (import, build, device).
    available: Callable[[], Optional[str]]
    # Whether it takes these particular inputs; `forced` lets a backend accept
    # inputs it would not be picked for automatically (e.g. Triton's CPU interpreter).
    supports: Callable[..., Optional[str]]
    # What a usable backend runs on here, for `engine.info`.
    scope: Callable[[], str]


@dataclass
class Decision:
    backend: str
    forced: bool
    skipped: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        how = "forced" if self.forced else "auto"
        why = "; ".join(f"{b}: {r}" for b, r in self.skipped.items())
        return f"{self.backend} ({how})" + (f", skipped {why}" if why else "")


def _always() -> Optional[str]:
    return None


def forced_backend(backend: Optional[str]) -> Optional[str]:
    """The backend a call is forced to: its `backend=` argument, else ENGINE_BACKEND."""
    chosen = backend if backend is not None else os.environ.get("ENGINE_BACKEND") or None
    if chosen is not None and chosen not in BACKENDS:
        source = "backend=" if backend is not None else "ENGINE_BACKEND"
        raise ValueError(f"{source} must be one of {', '.join(BACKENDS)}, got {chosen!r}")
    return chosen


class Op:
    """A fused op, called like its reference implementation (plus `backend=`).

    `tune(*args, **kwargs) -> name or None`: for an autotuned op, the name of the fastest
    checked implementation for a call on a GPU ("reference", a backend, or
    "backend:variant"); None where nothing is timed (CPU tensors).
    `run_variant(name, *args, **kwargs)`: runs one such implementation as named (the checks'
    child process runs every non-reference candidate of a tuned op this way)."""

    def __init__(self, name: str, reference: Callable[..., Any], *, validate: Optional[Callable[..., None]] = None,
                 preference: tuple[str, ...] = ("cuda", "triton", "reference")):
        self.name = name
        self.reference = reference
        self.validate = validate
        self.preference = preference
        self.backends: dict[str, Backend] = {"reference": Backend("reference", reference, _always,
                                                                  lambda *a, **k: None, lambda: "any device")}
        self.tune: Optional[Callable[..., Optional[str]]] = None
        self.run_variant: Optional[Callable[..., Any]] = None
        self.last_decision: Optional[Decision] = None
        self._warned_missing: set[str] = set()
        # help(op) and inspect.signature(op) show the reference's documentation and signature.
        functools.update_wrapper(self, reference, updated=())
        self.__name__ = self.__qualname__ = name

    def register(self, name: str, impl: Callable[..., Any], *, available: Callable[[], Optional[str]] = _always,
                 supports: Check = lambda *a, **k: None, scope: Callable[[], str] = lambda: "any device") -> None:
        if name not in BACKENDS or name == "reference":
            raise ValueError(f"unknown fused backend {name!r}; expected one of {BACKENDS[1:]}")
        self.backends[name] = Backend(name, impl, available, supports, scope)

    def availability(self) -> dict[str, Optional[str]]:
        """Per backend: None if this machine can run it, else why not."""
        out: dict[str, Optional[str]] = {}
        for name in BACKENDS:
            b = self.backends.get(name)
            out[name] = "not implemented for this op" if b is None else b.available()
        return out

    def scopes(self) -> dict[str, str]:
        """Per usable backend: what it runs on here."""
        return {name: self.backends[name].scope() for name, why in self.availability().items() if why is None}

    def _rejects(self, b: Backend, args, kwargs, forced: bool) -> Optional[str]:
        reason = b.available()
        if reason is None:
            reason = b.supports(*args, forced=forced, **kwargs)
        return reason

    def _forced(self, backend: Optional[str]) -> Optional[str]:
        forced = forced_backend(backend)
        if forced is not None and forced not in self.backends:
            if backend is not None:
                raise BackendUnavailableError(f"{self.name}: has no {forced!r} backend; it has {sorted(self.backends)}")
            if forced not in self._warned_missing:
                self._warned_missing.add(forced)
                warnings.warn(f"ENGINE_BACKEND={forced}: {self.name} has no such backend, choosing automatically")
            forced = None
        return forced

    def select(self, *args, backend: Optional[str] = None, **kwargs) -> Decision:
        forced = self._forced(backend)
        if forced is not None:
            reason = self._rejects(self.backends[forced], args, kwargs, forced=True)
            if reason is not None:
                raise BackendUnavailableError(f"{self.name}: backend {forced!r} was forced but cannot run: {reason}")
            return Decision(forced, True)
        reasons = {name: self._rejects(self.backends[name], args, kwargs, forced=False)
                   for name in self.preference if name in self.backends}
        fused = [name for name, reason in reasons.items() if reason is None and name != "reference"]
        tuned = self.tune(*args, **kwargs) if fused and self.tune is not None else None
        if tuned is not None:
            chosen = tuned.split(":")[0]
            what = "cuDNN (the reference)" if chosen == "reference" else tuned
            reasons.update({name: f"autotuned: {what} is faster for this shape" for name in fused if name != chosen})
        else:
            # Every fused backend that takes the call, checked together (one child process).
            reasons.update({name: why for name, why in verify.gate(self, fused, args, kwargs).items() if why})
        skipped: dict[str, str] = {}
        for name, reason in reasons.items():
            if reason is None:
                return Decision(name, False, skipped)
            skipped[name] = reason
        raise BackendUnavailableError(f"{self.name}: no backend can run these inputs: {skipped}")

    def __call__(self, *args, backend: Optional[str] = None, **kwargs):
        if self.validate is not None:
            self.validate(*args, **kwargs)
        decision = self.select(*args, backend=backend, **kwargs)
        self.last_decision = decision
        if os.environ.get("ENGINE_LOG_DISPATCH"):
            print(f"[engine] {self.name}: {decision}")
        return self.backends[decision.backend].impl(*args, **kwargs)


REGISTRY: dict[str, Op] = {}


def define(name: str, reference: Callable[..., Any], **kwargs) -> Op:
    op = Op(name, reference, **kwargs)
    REGISTRY[name] = op
    return op
