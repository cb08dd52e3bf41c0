"""The GPU check: build the extension, run the GPU tests and the benchmarks beside their
peers, and write one JSON file, updated after every stage so a run cut short keeps what
it measured.

Stages belong to groups, one per area of the engine, each sized for one device call:
the default group, `foundation` (build, bn_act tests and benchmark, training step),
finishes within 8 minutes on one H100/H200; `build` and `info` run with every group.

    python -m benchmarks.gpu_check --out $OUT/gpu_check.json                    # foundation
    python -m benchmarks.gpu_check --groups head,data --out $OUT/gpu_check.json
    python -m benchmarks.gpu_check --groups fused --out $OUT/gpu_check.json     # the fused model's targets, eager
    python -m benchmarks.gpu_check --groups compile --out $OUT/gpu_check.json   # ... and under torch.compile
    python -m benchmarks.gpu_check --smoke --groups all --out /tmp/gpu_check.json   # CPU proof
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.common import REPO, write_json

PY = sys.executable
GROUPS = ("foundation", "head", "data", "conv", "fused", "compile", "train")


@dataclass
class Stage:
    name: str
    groups: tuple[str, ...]      # () = every group
    command: list[str]           # run from the repository root; {json} is the stage's own JSON path
    limit_s: int
    gpu_args: list[str] = field(default_factory=list)
    smoke_args: list[str] = field(default_factory=list)


def _pytest(*files: str) -> list[str]:
    return [PY, "-m", "pytest", "-q", "-m", "gpu", *files, "-p", "no:cacheprovider"]


def _bench(module: str) -> list[str]:
    return [PY, "-m", f"benchmarks.{module}", "--out", "{json}"]


STAGES = [
    Stage("build", (), [PY, "setup.py", "build_ext", "--inplace"], 240),
    Stage("info", (), [PY, "-m", "engine.info", "--json"], 60),
    # Every op and backend against its reference on this device first: a kernel that fails here
    # is skipped by the dispatcher, and the stages after it measure what users would run.
    Stage("selftest", ("foundation",), [PY, "-m", "engine.cli", "selftest", "--out", "{json}"], 300,
          smoke_args=["--model", "tiny", "--dtypes", "float32", "--no-model-step"]),
    Stage("tests_bn_act", ("foundation",), _pytest("tests/test_bn_act.py"), 120),
    Stage("bench_bn_act", ("foundation",), _bench("bench_bn_act"), 150, smoke_args=["--smoke"]),
    Stage("bench_train_step", ("foundation",), _bench("bench_train_step"), 240,
          gpu_args=["--models", "resnext101_32x8d:256", "--steps", "10",
                    "--variants", "plain,fused,torchvision,torchvision-compile"], smoke_args=["--smoke"]),
    Stage("tests_hashtag_ce", ("head",), _pytest("tests/test_hashtag_ce.py"), 120),
    Stage("bench_hashtag_ce", ("head",), _bench("bench_hashtag_ce"), 240,
          smoke_args=["--smoke", "--methods", "engine", "eager"]),
    Stage("bench_data", ("data",), _bench("bench_data"), 240,
          gpu_args=["--device", "cuda", "--hw-decoder-load", "0", "0.65", "1"], smoke_args=["--smoke"]),
    Stage("tests_conv_bn", ("conv",), _pytest("tests/test_conv_bn.py"), 120),
    Stage("bench_conv_bn", ("conv",), _bench("bench_conv_bn"), 300,
          gpu_args=["--archs", "32x8d"], smoke_args=["--smoke", "--kinds", "first"]),
    Stage("tests_grouped_conv", ("conv",), _pytest("tests/test_grouped_conv.py"), 240),
    Stage("bench_grouped_conv", ("conv",), _bench("bench_grouped_conv"), 240,
          gpu_args=["--archs", "32x8d"], smoke_args=["--smoke"]),
    Stage("bench_train_step_fused", ("fused",), _bench("bench_train_step"), 240,
          gpu_args=["--models", "resnext101_32x8d:256,resnext101_32x16d:128,resnext101_32x48d:64", "--steps", "10",
                    "--variants", "conv,torchvision"],
          smoke_args=["--smoke", "--variants", "conv,torchvision"]),
    Stage("bench_loss_tracking", ("fused",), _bench("bench_loss_tracking"), 180, smoke_args=["--smoke"]),
    # Compiling a ResNeXt-101 takes minutes: its own group.
    Stage("bench_train_step_compiled", ("compile",), _bench("bench_train_step"), 420,
          gpu_args=["--models", "resnext101_32x8d:256", "--steps", "10",
                    "--variants", "conv-compile,torchvision-compile"],
          smoke_args=["--smoke", "--variants", "conv-compile"]),
    Stage("bench_train_e2e", ("train",), _bench("bench_train_e2e"), 300,
          gpu_args=["--images", "2048", "--steps", "30"], smoke_args=["--smoke"]),
    # Host syncs per steady-state step (CUDA's sync debug mode) and step time, lean loop beside
    # the per-step read-back.
    Stage("bench_lean_step", ("train",), _bench("bench_lean_step"), 240, smoke_args=["--smoke", "--steps", "3"]),
]


def _text(stream) -> str:
    return stream.decode(errors="replace") if isinstance(stream, bytes) else (stream or "")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="the JSON file; each stage's own JSON goes beside it")
    parser.add_argument("--smoke", action="store_true", help="CPU proof: tiny benchmarks, no build if built")
    parser.add_argument("--groups", default="foundation",
                        help=f"comma-separated, from {', '.join(GROUPS)}, or all (default: foundation)")
    parser.add_argument("--skip", default="", help="comma-separated stage names to skip")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    groups = set(GROUPS) if args.groups == "all" else {g for g in args.groups.split(",") if g}
    if not groups <= set(GROUPS):
        parser.error(f"--groups: unknown {sorted(groups - set(GROUPS))}; choose from {', '.join(GROUPS)} or all")
    skip = {s for s in args.skip.split(",") if s}
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("MAX_JOBS", str(os.cpu_count() or 4))
    if args.smoke:
        env.setdefault("TRITON_INTERPRET", "1")
        if _extension_loads():
            skip.add("build")
    report = {"check": "gpu_check", "smoke": args.smoke, "groups": sorted(groups),
              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "stages": {}}
    failed = 0
    for stage_def in STAGES:
        name = stage_def.name
        if stage_def.groups and not groups & set(stage_def.groups):
            continue
        if name in skip:
            report["stages"][name] = {"skipped": True}
            continue
        stage_json = out.with_name(f"{out.stem}.{name}.json")
        # An earlier run's results must never be attached to this run's stage (say, one that crashes).
        stage_json.unlink(missing_ok=True)
        stage_json.with_suffix(".png").unlink(missing_ok=True)
        cmd = [part.replace("{json}", str(stage_json)) for part in stage_def.command]
        cmd += stage_def.smoke_args if args.smoke else stage_def.gpu_args
        print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
        start = time.monotonic()
        try:
            proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=stage_def.limit_s)
            rc, output = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as e:
            rc, output = "timeout", _text(e.stdout) + _text(e.stderr)
        stage = {"rc": rc, "seconds": round(time.monotonic() - start, 1), "output_tail": output[-4000:]}
        if name == "info" and rc == 0:
            stage["info"] = json.loads(output[output.index("{"):])
        if stage_json.exists():
            stage["results"] = json.loads(stage_json.read_text())
        failed += rc != 0
        report["stages"][name] = stage
        write_json(out, report)
        print(output[-1500:], flush=True)
        print(f"== {name}: rc={rc} in {stage['seconds']} s", flush=True)
    report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    write_json(out, report)
    print(f"gpu_check: {len(report['stages'])} stages, {failed} failed; report in {out}")
    return 1 if failed else 0


def _extension_loads() -> bool:
    from engine.ops.backends import load_extension
    return load_extension() is not None


if __name__ == "__main__":
    sys.exit(main())
