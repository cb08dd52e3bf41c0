"""`python -m engine.info` (or `engine info`): versions, devices, per op which backends
can run here and, for each that cannot, why, and the verdicts of the checks against the
reference cached for this build (engine.ops.verify): failures with their reasons."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform
import sys

import torch

import engine
import engine.ops  # noqa: F401  (registers the ops)
from engine.ops import backends
from engine.ops.dispatch import BACKENDS, REGISTRY


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def verdicts() -> dict:
    """Per op: how many cached keys passed their check, and each failure (key, status, why)."""
    from engine.ops.autotune import default_tuner
    out: dict = {}
    tuner = default_tuner()
    for key, verdict in sorted(tuner.verdicts().items()):
        device, op, backend = key.split("|")[:3]
        entry = out.setdefault(op, {"passed": 0, "failed": []})
        if verdict["status"] == "pass":
            entry["passed"] += 1
        else:
            entry["failed"].append({"device": device, "backend": backend, "key": key, "status": verdict["status"],
                                    "detail": verdict["detail"]})
    return {"cache": str(tuner.path), "ops": out}


def collect() -> dict:
    cuda = torch.cuda.is_available()
    ext = backends.load_extension()
    return {
        "engine": engine.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "triton": _version("triton"),
        "numpy": _version("numpy"),
        "nvidia_dali": _version("nvidia-dali-cuda130"),
        "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
        "triton_interpret": backends.triton_interpreting(),
        "extension": {
            "built": ext is not None,
            "with_cuda": backends.extension_has_cuda(),
            "why_not": backends.extension_status(),
        },
        "ops": {name: {"why_not": op.availability(), "runs_on": op.scopes()} for name, op in sorted(REGISTRY.items())},
        "verdicts": verdicts(),
    }


def format_report(info: dict) -> str:
    lines = [f"engine {info['engine']}  python {info['python']}  torch {info['torch']} (CUDA {info['torch_cuda']})",
             f"triton {info['triton']}  numpy {info['numpy']}  cudnn {info['cudnn']}  dali {info['nvidia_dali']}",
             f"devices: {', '.join(info['devices']) or 'no CUDA device'}"
             + ("  [TRITON_INTERPRET=1]" if info["triton_interpret"] else "")]
    ext = info["extension"]
    if ext["built"]:
        lines.append(f"engine._C: built, {'with' if ext['with_cuda'] else 'without'} CUDA kernels")
    else:
        lines.append(f"engine._C: not usable: {ext['why_not']}")
    lines.append("ops:")
    for name, op in info["ops"].items():
        lines.append(f"  {name}")
        for backend in BACKENDS:
            why = op["why_not"][backend]
            state = f"usable on {op['runs_on'][backend]}" if why is None else f"not usable: {why}"
            lines.append(f"    {backend:<10} {state}")
    checked = info["verdicts"]
    lines.append(f"checks against the reference (cached in {checked['cache']}):")
    if not checked["ops"]:
        lines.append("  none yet for this build (they run on a device before a fused kernel serves a shape)")
    for name, entry in checked["ops"].items():
        lines.append(f"  {name}: {entry['passed']} passed, {len(entry['failed'])} failed")
        for failure in entry["failed"]:
            lines.append(f"    {failure['status']}: {failure['key']}: {failure['detail']}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args: argparse.Namespace) -> int:
    info = collect()
    print(json.dumps(info, indent=2) if args.json else format_report(info))
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m engine.info", description=__doc__)
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
