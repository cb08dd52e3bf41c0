"""Per-shape choice between an op's implementations, timed once and kept on disk.

The first call with a new key times every candidate and records the fastest in a JSON
file ($ENGINE_CACHE_DIR/autotune.json, default ~/.cache/engine/autotune.json); later
calls, in this process or the next, read the choice back. Only candidates whose check
against the reference passed are timed (`verify`, run in a child process by
engine.ops.verify), and a timed candidate whose result differs from the reference's on
the timing inputs is not chosen. The same file keeps those verdicts (engine.ops.verify).
It records the versions it was made with (torch, CUDA, cuDNN, triton, engine, and a
digest of every kernel source, every module of the ops' Python glue and the compiled
extension): a file from other versions, or one that cannot be read, is rebuilt from
scratch with a one-line message on stderr, never trusted and never fatal. Keys name the GPU, so one file serves
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

from engine.ops.numerics import compare, lowest_precision, tensors_in

FORMAT = 2
# False in a verification child: it reads the parent's choices and verdicts, never writes them.
WRITABLE = True

Timer = Callable[[Callable[[], object]], float]
Verify = Callable[[list], dict]


def default_path() -> Path:
    return Path(os.environ.get("ENGINE_CACHE_DIR") or Path.home() / ".cache" / "engine") / "autotune.json"


def digested_files() -> list[Path]:
    """What a timing or a verdict depends on: every Triton kernel source, every module of
    the ops' Python glue (launchers, candidates, autograd), and the compiled extension,
    which holds the direct CUDA kernels."""
    from engine import kernels
    from engine.ops.backends import load_extension
    files = sorted(Path(kernels.__file__).parent.glob("*.py")) + sorted(Path(__file__).parent.glob("*.py"))
    extension = load_extension()
    if extension is not None:
        files.append(Path(extension.__file__))
    return files


def _kernel_digest(files: Optional[list[Path]] = None) -> str:
    digest = hashlib.sha256()
    for path in digested_files() if files is None else files:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
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
    """choose(key, candidates) -> the name of the fastest candidate for key; verdicts of
    engine.ops.verify's checks beside the choices."""

    def __init__(self, path: Optional[os.PathLike] = None, timer: Timer = cuda_timer,
                 versions: Optional[dict] = None):
        self.path = Path(path) if path is not None else default_path()
        self.timer = timer
        self._versions = versions
        self._entries: Optional[dict] = None
        self._verdicts: dict = {}

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
            verdicts = data.get("verdicts")
            self._verdicts = {k: v for k, v in (verdicts if isinstance(verdicts, dict) else {}).items()
                              if isinstance(v, dict) and isinstance(v.get("status"), str)}
        return self._entries

    def _save(self) -> None:
        if not WRITABLE:
            return
        payload = {"versions": self.versions, "entries": self._entries, "verdicts": self._verdicts}
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

    def verdict(self, key: str) -> Optional[dict]:
        self._load()
        return self._verdicts.get(key)

    def verdicts(self) -> dict:
        self._load()
        return dict(self._verdicts)

    def record_verdict(self, key: str, verdict: dict) -> None:
        self._load()
        self._verdicts[key] = {k: verdict.get(k) for k in ("status", "detail", "max_error", "seconds")}
        self._save()

    def choose(self, key: str, candidates: dict[str, Callable[[], object]], verify: Optional[Verify] = None) -> str:
        """The fastest of the candidates that pass `verify` (names -> {name: None or why
        not}) and whose results match the reference candidate's (when it has one and the
        candidates return their outputs)."""
        choice = self.lookup(key)
        if choice in candidates:
            return choice
        rejected: dict[str, str] = {}
        if verify is not None:
            rejected = {name: why for name, why in verify(list(candidates)).items() if why is not None}
        outputs: dict[str, object] = {}

        def keeping(name, fn):
            def call():
                outputs[name] = fn()
                return outputs[name]
            return call

        times: dict[str, Optional[float]] = {}
        for name, fn in candidates.items():
            if name in rejected:
                times[name] = None
                continue
            try:
                times[name] = float(self.timer(keeping(name, fn)))
            except Exception as e:  # a candidate that fails on this shape is simply not chosen
                print(f"[engine] autotune {key}: {name} failed ({type(e).__name__}: {e})", file=sys.stderr)
                times[name] = None
        rejected.update(_wrong_results(outputs, times))
        for name, why in rejected.items():
            print(f"[engine] autotune {key}: {name} not chosen: {why}", file=sys.stderr)
        timed = {name: t for name, t in times.items() if t is not None and math.isfinite(t) and name not in rejected}
        if not timed:
            raise RuntimeError(f"autotune {key}: every candidate failed")
        choice = min(timed, key=timed.get)
        self._entries[key] = {"choice": choice, "times_ms": times, **({"rejected": rejected} if rejected else {})}
        self._save()
        return choice


def _wrong_results(outputs: dict[str, object], times: dict) -> dict[str, str]:
    """Timed candidates whose last result differs from the reference candidate's."""
    want = list(tensors_in(outputs.get("reference")))
    if not want or times.get("reference") is None:
        return {}
    dtype = lowest_precision(t.dtype for t in want)
    wrong = {}
    for name, out in outputs.items():
        got = list(tensors_in(out))
        if name == "reference" or times.get(name) is None:
            continue
        if len(got) != len(want):
            wrong[name] = f"returned {len(got)} tensors, the reference {len(want)}"
            continue
        verdict = compare([(f"result {i}", g, w) for i, (g, w) in enumerate(zip(got, want))], dtype)
        if verdict["status"] != "pass":
            wrong[name] = f"its result differs from the reference's: {verdict['detail']}"
    return wrong


_DEFAULT: Optional[Autotuner] = None


def default_tuner() -> Autotuner:
    global _DEFAULT
    if _DEFAULT is None or _DEFAULT.path != default_path():
        _DEFAULT = Autotuner()
    return _DEFAULT
