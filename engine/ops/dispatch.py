"""The op contract: every fused op has a `reference` backend (plain PyTorch, the
specification) and optionally `triton` and `cuda` backends checked against it.

Per call, the dispatcher picks the first backend in the op's preference order that
supports the inputs, and records why it skipped the others. `backend=` on a call,
or the ENGINE_BACKEND environment variable, forces one; a forced backend that
cannot take the inputs raises instead of silently running something else, so a
benchmark or test never measures a backend it did not ask for.

Chosen automatically on a device, a Triton or CUDA backend must also have passed its
check against the reference for the call's key (engine.ops.verify); one that failed, or
that is unchecked under torch.compile or CUDA-graph capture, is skipped with the reason.
A forced backend is the caller's explicit choice and is not gated (`engine selftest`
checks every backend that way).
"""

from __future__ import annotations

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
    """A fused op with several backends, called like a function."""

    def __init__(self, name: str, preference: tuple[str, ...] = ("cuda", "triton", "reference")):
        self.name = name
        self.preference = preference
        self.backends: dict[str, Backend] = {}
        self.last_decision: Optional[Decision] = None
        self._warned_missing: set[str] = set()

    def register(self, name: str, impl: Callable[..., Any], *, available: Callable[[], Optional[str]] = _always,
                 supports: Check = lambda *a, **k: None, scope: Callable[[], str] = lambda: "any device") -> None:
        if name not in BACKENDS:
            raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")
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

    def select(self, *args, backend: Optional[str] = None, **kwargs) -> Decision:
        forced = forced_backend(backend)
        if forced is not None and forced not in self.backends:
            if backend is not None:
                raise BackendUnavailableError(f"{self.name}: has no {forced!r} backend; it has {sorted(self.backends)}")
            if forced not in self._warned_missing:
                self._warned_missing.add(forced)
                warnings.warn(f"ENGINE_BACKEND={forced}: {self.name} has no such backend, choosing automatically")
            forced = None
        if forced is not None:
            reason = self._rejects(self.backends[forced], args, kwargs, forced=True)
            if reason is not None:
                raise BackendUnavailableError(f"{self.name}: backend {forced!r} was forced but cannot run: {reason}")
            return Decision(forced, True)
        reasons = {name: self._rejects(self.backends[name], args, kwargs, forced=False)
                   for name in self.preference if name in self.backends}
        # Every fused backend that takes the call, checked together (one child process).
        fused = [name for name, reason in reasons.items() if reason is None and name != "reference"]
        reasons.update({name: why for name, why in verify.gate(self, fused, args, kwargs).items() if why})
        skipped: dict[str, str] = {}
        for name, reason in reasons.items():
            if reason is None:
                return Decision(name, False, skipped)
            skipped[name] = reason
        raise BackendUnavailableError(f"{self.name}: no backend can run these inputs: {skipped}")

    def __call__(self, *args, backend: Optional[str] = None, **kwargs):
        decision = self.select(*args, backend=backend, **kwargs)
        self.last_decision = decision
        if os.environ.get("ENGINE_LOG_DISPATCH"):
            print(f"[engine] {self.name}: {decision}")
        return self.backends[decision.backend].impl(*args, **kwargs)


REGISTRY: dict[str, Op] = {}


def define(name: str, **kwargs) -> Op:
    op = Op(name, **kwargs)
    REGISTRY[name] = op
    return op
