"""Shared by the benchmarks: the environment record, timing, JSON written as results
arrive (a run cut short keeps what it measured), and plots."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from engine.bench import compile_fresh, compiled_frames  # noqa: F401 (shared by the benchmarks)
from engine.ops.autotune import cuda_timer

REPO = Path(__file__).resolve().parent.parent


def git_revision() -> Optional[str]:
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def environment() -> dict:
    from engine.info import collect
    info = collect()
    return {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)",
        "torch": info["torch"], "torch_cuda": info["torch_cuda"], "cudnn": info["cudnn"],
        "triton": info["triton"], "python": info["python"], "platform": platform.platform(),
        "extension": info["extension"], "git_revision": git_revision(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def peers_at_best() -> None:
    """Every peer at the setting its users run: cuDNN's benchmark mode times each
    convolution shape's algorithms once and keeps the fastest (our grouped 3x3 is
    autotuned against cuDNN, so cuDNN gets the same chance)."""
    torch.backends.cudnn.benchmark = True


def row_settings(*, warmup: int, repeats: int, compile: Optional[str] = None, dynamic: Optional[bool] = None,
                 **extra) -> dict:
    """The settings a result row was measured under, recorded in the row itself."""
    return {"cudnn_benchmark": bool(torch.backends.cudnn.benchmark), "compile": compile, "dynamic": dynamic,
            "warmup": warmup, "repeats": repeats, **extra}


class DispatchRecord:
    """What served a benchmark row's op calls: the backend of each fused op's last call (its
    decision) and every check that failed during the row, whose calls the reference served
    instead. Without it a failed kernel is measured as the reference and reads as the kernel."""

    def __init__(self):
        from engine.ops import REGISTRY, verify
        self._ops, self._verify = REGISTRY, verify
        for op in REGISTRY.values():
            op.last_decision = None
        self._failed_before = set(verify.failed_verdicts())

    def fields(self) -> dict:
        backends = {name: op.last_decision.backend + (" (forced)" if op.last_decision.forced else "")
                    for name, op in self._ops.items() if op.last_decision is not None}
        failed = {k: v for k, v in self._verify.failed_verdicts().items() if k not in self._failed_before}
        return {"backends": backends, **({"failed_checks": failed} if failed else {})}


def row_failed(row: dict) -> bool:
    """A row that counts against the run: it errored, or a check failed so the reference ran."""
    return "error" in row or bool(row.get("failed_checks"))


def write_json(path: str | os.PathLike, payload: dict) -> None:
    """Atomic: a reader never sees a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def time_ms(fn: Callable[[], object], *, warmup: int = 3, repeat: int = 20) -> float:
    """Median milliseconds per call: CUDA events on a GPU, a synchronised wall clock otherwise."""
    if torch.cuda.is_available():
        return cuda_timer(fn, warmup=warmup, repeat=repeat)
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    samples.sort()
    return samples[len(samples) // 2]


def plot_results(json_path: str | os.PathLike, title: str, rows: list[dict], group: Callable[[dict], str],
                 series: Callable[[dict], str], value: str, ylabel: str) -> None:
    """Bars of rows[value], grouped by group(row), one colour per series(row), as a PNG
    beside the JSON; rows without the value (failed or skipped) are left blank."""
    measured = [r for r in rows if r.get(value) is not None]
    groups = list(dict.fromkeys(group(r) for r in rows))
    names = list(dict.fromkeys(series(r) for r in rows))
    bars = {n: [next((r[value] for r in measured if group(r) == g and series(r) == n), None) for g in groups]
            for n in names}
    why_not = plot_bars(Path(json_path).with_suffix(".png"), title, groups, bars, ylabel)
    if why_not:
        print(why_not, file=sys.stderr)


def plot_bars(path: str | os.PathLike, title: str, groups: list[str], series: dict[str, list[Optional[float]]],
              ylabel: str) -> Optional[str]:
    """A grouped bar chart as PNG; returns why not when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib) — JSON only"
    width = 0.8 / max(len(series), 1)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups)), 4))
    for i, (name, values) in enumerate(series.items()):
        xs = [g + i * width for g in range(len(groups))]
        ax.bar(xs, [v if v is not None else 0 for v in values], width, label=name)
    ax.set_xticks([g + width * (len(series) - 1) / 2 for g in range(len(groups))])
    ax.set_xticklabels(groups, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
