"""Per-shape choice between an op's implementations, timed once and kept on disk.

The first call with a new key times every candidate and records the fastest in a JSON
file ($ENGINE_CACHE_DIR/autotune.json, default ~/.cache/engine/autotune.json); later
calls, in this process or the next, read the choice back. The file records the versions
it was made with (torch, CUDA, cuDNN, triton, engine, the Triton kernel sources and the
compiled extension): a file from
other versions, or one that cannot be read, is rebuilt from scratch with a one-line
message on stderr, never trusted and never fatal. Keys name the GPU, so one file serves
several cards. Processes that tune at once (data-parallel ranks) may each time a key and
the last to write wins; both choices are correct, and later runs read the same one.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from pathlib import Path
from typing import Callable, Optional

import torch

FORMAT = 1
# Kernel sources whose edits invalidate every timing.
_KERNEL_FILES = ("grouped_conv.py",)

Timer = Callable[[Callable[[], object]], float]


def default_path() -> Path:
    return Path(os.environ.get("ENGINE_CACHE_DIR") or Path.home() / ".cache" / "engine") / "autotune.json"


def _kernel_digest() -> str:
    from engine import kernels
    from engine.ops.backends import load_extension
    digest = hashlib.sha256()
    for name in _KERNEL_FILES:
        digest.update((Path(kernels.__file__).parent / name).read_bytes())
    # The compiled extension holds the direct CUDA kernels: a rebuild re-times them.
    extension = load_extension()
    if extension is not None:
        digest.update(Path(extension.__file__).read_bytes())
    return digest.hexdigest()[:16]


def current_versions() -> dict:
    import engine
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {"format": FORMAT, "torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": cudnn,
            "triton": triton_version, "engine": engine.__version__, "kernels": _kernel_digest()}


def cuda_timer(fn: Callable[[], object], warmup: int = 2, repeat: int = 5) -> float:
    """Median milliseconds per call, by CUDA events."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end))
    return sorted(samples)[len(samples) // 2]


class Autotuner:
    """choose(key, candidates) -> the name of the fastest candidate for key."""

    def __init__(self, path: Optional[os.PathLike] = None, timer: Timer = cuda_timer,
                 versions: Optional[dict] = None):
        self.path = Path(path) if path is not None else default_path()
        self.timer = timer
        self._versions = versions
        self._entries: Optional[dict] = None

    @property
    def versions(self) -> dict:
        if self._versions is None:
            self._versions = current_versions()
        return self._versions

    def _say(self, why: str) -> None:
        print(f"[engine] autotune cache {self.path} {why}; rebuilding it", file=sys.stderr)

    def _load(self) -> dict:
        if self._entries is not None:
            return self._entries
        self._entries = {}
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return self._entries
        except (OSError, ValueError) as e:
            self._say(f"is unreadable ({type(e).__name__}: {e})")
            return self._entries
        if not isinstance(data, dict) or not isinstance(data.get("entries"), dict):
            self._say("is not an autotune cache")
        elif data.get("versions") != self.versions:
            self._say(f"was made with {data.get('versions')}, not {self.versions}")
        else:
            self._entries = {k: v for k, v in data["entries"].items()
                             if isinstance(v, dict) and isinstance(v.get("choice"), str)}
        return self._entries

    def _save(self) -> None:
        payload = {"versions": self.versions, "entries": self._entries}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(payload, indent=1, sort_keys=True) + "\n")
            os.replace(tmp, self.path)
        except OSError as e:
            # A read-only home costs a re-timing per process, not the run.
            print(f"[engine] autotune cache {self.path} not written ({e})", file=sys.stderr)

    def lookup(self, key: str) -> Optional[str]:
        entry = self._load().get(key)
        return entry["choice"] if entry is not None else None

    def choose(self, key: str, candidates: dict[str, Callable[[], object]]) -> str:
        choice = self.lookup(key)
        if choice in candidates:
            return choice
        times: dict[str, Optional[float]] = {}
        for name, fn in candidates.items():
            try:
                times[name] = float(self.timer(fn))
            except Exception as e:  # a candidate that fails on this shape is simply not chosen
                print(f"[engine] autotune {key}: {name} failed ({type(e).__name__}: {e})", file=sys.stderr)
                times[name] = None
        timed = {name: t for name, t in times.items() if t is not None and math.isfinite(t)}
        if not timed:
            raise RuntimeError(f"autotune {key}: every candidate failed")
        choice = min(timed, key=timed.get)
        self._entries[key] = {"choice": choice, "times_ms": times}
        self._save()
        return choice


_DEFAULT: Optional[Autotuner] = None


def default_tuner() -> Autotuner:
    global _DEFAULT
    if _DEFAULT is None or _DEFAULT.path != default_path():
        _DEFAULT = Autotuner()
    return _DEFAULT
