"""The GPU check: build the extension (or use the prebuilt one), run the GPU tests and the
benchmarks beside their peers, and gather everything in at most 8 files in the report's
folder, rewritten after every stage so a run cut short keeps what it measured:

    gpu_check.json              the report: every stage's rc, seconds, output tail and results
    gpu_check.log               every stage's whole output, appended as it runs
    gpu_check.plots.zip         the stages' PNG plots
    gpu_check.running.<stage>.json / .png   the running stage's own files (partial rows),
                                folded into the three above when it ends

--quick runs the stages in the order of what a first GPU hour is worth (correctness at
model shapes, then the blocks and the training step against cuDNN, torch.compile and
torchvision, then the hashtag head against its peers, DALI last and only when installed);
with --deadline-s each stage gets at most the time left, and a stage that would not fit its
minimum is skipped with the reason. Groups size the longer runs, one per area:

    python -m benchmarks.gpu_check --quick --deadline-s 480 --out $OUT/gpu_check.json
    python -m benchmarks.gpu_check --quick --stage-args selftest="--dtypes bfloat16,float16" --out ...
    python -m benchmarks.gpu_check --groups head,data --out $OUT/gpu_check.json
    python -m benchmarks.gpu_check --smoke --quick --deadline-s 540 --out /tmp/gc/gpu_check.json   # CPU proof

On a GPU the extension comes from .gpu-ext/ (`make gpu-ext`, carried to the machine) when
its hash of csrc/ and setup.py matches this checkout and it imports; else it is built here.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
GROUPS = ("foundation", "head", "data", "conv", "fused", "compile", "train")
GPU_EXT = REPO / ".gpu-ext"
MAX_FILES = 8
# Seconds kept back from the deadline: writing the report and the device call's own return.
RESERVE_S = 15


@dataclass
class Stage:
    name: str
    groups: tuple[str, ...]      # () = every group
    command: list[str]           # run from the repository root; {json} is the stage's own JSON path
    limit_s: int
    gpu_args: list[str] = field(default_factory=list)
    smoke_args: list[str] = field(default_factory=list)
    # Below this many seconds left the stage cannot return a number worth its time: skipped.
    min_s: int = 30
    # Why the stage cannot run on this machine (None: it can), asked just before it would run.
    unavailable: Optional[Callable[[], Optional[str]]] = None


def _pytest(*files: str) -> list[str]:
    return [PY, "-m", "pytest", "-q", "-m", "gpu", *files, "-p", "no:cacheprovider"]


def _bench(module: str) -> list[str]:
    return [PY, "-m", f"benchmarks.{module}", "--out", "{json}"]


def _without_dali() -> Optional[str]:
    try:
        found = importlib.util.find_spec("nvidia.dali") is not None
    except ModuleNotFoundError:  # no `nvidia` package at all
        found = False
    return None if found else "NVIDIA DALI is not installed"


BUILD = Stage("build", (), [PY, "setup.py", "build_ext", "--inplace"], 240, min_s=120)
INFO = Stage("info", (), [PY, "-m", "engine.info", "--json"], 60, min_s=10)

# The selftest in smoke mode: the small plan at 32 px, every op and backend once.
SELFTEST_SMOKE = ["--model", "tiny", "--size", "32", "--dtypes", "float32", "--no-model-step"]

STAGES = [
    BUILD,
    INFO,
    # Every op and backend against its reference on this device first: a kernel that fails here
    # is skipped by the dispatcher, and the stages after it measure what users would run.
    Stage("selftest", ("foundation",), [PY, "-m", "engine.cli", "selftest", "--out", "{json}"], 300,
          smoke_args=SELFTEST_SMOKE),
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

# --quick, in the order of what the first minutes on a GPU are worth (issue 18, ../shared/GPU.md).
QUICK = [
    BUILD,
    INFO,
    # Correctness first: bf16 at ResNeXt-101 32x8d's shapes, with the fused-model steps.
    Stage("selftest", (), [PY, "-m", "engine.cli", "selftest", "--out", "{json}"], 240,
          gpu_args=["--dtypes", "bfloat16"], smoke_args=SELFTEST_SMOKE, min_s=60),
    Stage("bench_conv_bn", (), _bench("bench_conv_bn"), 150,
          gpu_args=["--archs", "32x8d"], smoke_args=["--smoke", "--kinds", "first"], min_s=45),
    Stage("bench_grouped_conv", (), _bench("bench_grouped_conv"), 120,
          gpu_args=["--archs", "32x8d"], smoke_args=["--smoke"], min_s=45),
    Stage("bench_train_step", (), _bench("bench_train_step"), 240,
          gpu_args=["--models", "resnext101_32x8d:256", "--steps", "10",
                    "--variants", "fused,torchvision,torchvision-compile"],
          smoke_args=["--smoke", "--variants", "fused,torchvision,torchvision-compile"], min_s=90),
    Stage("bench_hashtag_ce", (), _bench("bench_hashtag_ce"), 150,
          gpu_args=["--vocab", "131072", "--big-batch", "0", "--methods", "engine", "eager", "compile", "liger", "cce"],
          smoke_args=["--smoke", "--methods", "engine", "eager"], min_s=45),
    Stage("bench_data", (), _bench("bench_data"), 150,
          gpu_args=["--device", "cuda", "--hw-decoder-load", "0.65"], smoke_args=["--smoke"], min_s=60,
          unavailable=_without_dali),
]


# ------------------------------------------------------------------ the prebuilt extension

def ext_hash(repo: Path = REPO) -> str:
    """What the extension is built from: every file under csrc/ and setup.py, by path and bytes."""
    digest = hashlib.sha256()
    for path in sorted(repo.glob("csrc/**/*")) + [repo / "setup.py"]:
        if path.is_file():
            digest.update(str(path.relative_to(repo)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def use_prebuilt(repo: Path = REPO) -> str:
    """Puts the prebuilt engine._C from repo/.gpu-ext into engine/ when its recorded hash
    matches the checkout and it imports in a fresh interpreter; returns what happened (the
    report keeps it). Otherwise engine/ keeps no copy, and the build stage builds."""
    folder = repo / GPU_EXT.name
    record = folder / "hash"
    built = sorted((folder / "engine").glob("_C.*.so"))
    if not record.is_file() or not built:
        return f"no prebuilt extension in {folder} (make gpu-ext)"
    if record.read_text().strip() != ext_hash(repo):
        return f"the prebuilt extension in {folder} was built from other sources (hash differs): not used"
    target = repo / "engine" / built[-1].name
    shutil.copy2(built[-1], target)
    # torch first: the extension links against libraries that importing torch loads.
    probe = subprocess.run([PY, "-c", "import torch, engine._C"], cwd=repo, capture_output=True, text=True)
    if probe.returncode != 0:
        target.unlink()
        return f"the prebuilt extension does not import here: {probe.stderr.strip()[-300:]}"
    return "prebuilt"


def extension_loads() -> bool:
    # A fresh interpreter: importing torch and engine here would hold a stale engine._C after a build.
    return subprocess.run([PY, "-c", "import torch, engine._C"], cwd=REPO, capture_output=True).returncode == 0


# ------------------------------------------------------------------ running stages

class Output:
    """The report's folder: the report, the whole log, the plots' archive and the running
    stage's own files, never more than MAX_FILES of this run's."""

    def __init__(self, report_path: Path, names: list[str]):
        self.report_path = report_path
        self.folder = report_path.parent
        self.folder.mkdir(parents=True, exist_ok=True)
        self.stem = report_path.stem
        self.log = self.folder / f"{self.stem}.log"
        self.plots = self.folder / f"{self.stem}.plots.zip"
        self.log.unlink(missing_ok=True)
        self.plots.unlink(missing_ok=True)
        for name in names:
            self.clear(name)

    def stage_json(self, name: str) -> Path:
        return self.folder / f"{self.stem}.running.{name}.json"

    def clear(self, name: str) -> None:
        # An earlier run's results must never be attached to this run's stage (say, one that crashes),
        # nor count among this run's files.
        stage_json = self.stage_json(name)
        stage_json.unlink(missing_ok=True)
        stage_json.with_suffix(".png").unlink(missing_ok=True)

    def fold_in(self, name: str, stage: dict) -> None:
        """The stage's JSON into its entry, its PNG into the archive; both files go."""
        stage_json = self.stage_json(name)
        if stage_json.exists():
            try:
                stage["results"] = json.loads(stage_json.read_text())
            except json.JSONDecodeError as e:
                stage["results_error"] = f"unreadable JSON ({e})"
            stage_json.unlink()
        png = stage_json.with_suffix(".png")
        if png.exists():
            with zipfile.ZipFile(self.plots, "a") as archive:
                archive.write(png, f"{name}.png")
            png.unlink()

    def write(self, report: dict) -> None:
        tmp = self.report_path.with_name(self.report_path.name + ".tmp")
        tmp.write_text(json.dumps(report, indent=2, default=str) + "\n")
        os.replace(tmp, self.report_path)


def run_command(cmd: list[str], env: dict, timeout_s: float, log: Path) -> tuple[object, str]:
    """(exit status or "timeout", the output) of one stage, its output appended to the log as
    it comes. On a timeout the whole process group goes, the checks' children included."""
    with open(log, "ab") as sink:
        start = sink.tell()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc: object = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = "timeout"
    with open(log, "rb") as f:
        f.seek(start)
        return rc, f.read().decode(errors="replace")


def run_stages(stages: list[Stage], out: Output, report: dict, *, smoke: bool, env: dict,
               deadline: Optional[float], extra: dict[str, list[str]], skip: dict[str, str]) -> int:
    """Runs the stages in order, each capped by the time left before `deadline` (a
    time.monotonic() value, or None), and writes the report after each; returns the failures."""
    failed = 0
    for stage_def in stages:
        name = stage_def.name
        left = None if deadline is None else deadline - time.monotonic() - RESERVE_S
        why = skip.get(name) or (stage_def.unavailable() if stage_def.unavailable else None)
        if why is None and left is not None and left < stage_def.min_s:
            why = f"{max(left, 0):.0f} s left before the deadline, the stage needs at least {stage_def.min_s} s"
        if why:
            report["stages"][name] = {"skipped": why}
            out.write(report)
            print(f"== {name}: skipped: {why}", flush=True)
            continue
        cmd = [part.replace("{json}", str(out.stage_json(name))) for part in stage_def.command]
        cmd += (stage_def.smoke_args if smoke else stage_def.gpu_args) + extra.get(name, [])
        limit = stage_def.limit_s if left is None else min(stage_def.limit_s, left)
        print(f"== {name} (at most {limit:.0f} s): {' '.join(cmd[1:])}", flush=True)
        report["stages"][name] = {"running": True, "command": cmd[1:], "limit_s": round(limit)}
        out.write(report)
        start = time.monotonic()
        with open(out.log, "ab") as f:
            f.write(f"\n== {name}: {' '.join(cmd[1:])}\n".encode())
        rc, output = run_command(cmd, env, limit, out.log)
        stage = {"rc": rc, "seconds": round(time.monotonic() - start, 1), "command": cmd[1:],
                 "limit_s": round(limit), "output_tail": output[-4000:]}
        if name == "info" and rc == 0 and "{" in output:
            try:
                stage["info"] = json.loads(output[output.index("{"):])
            except json.JSONDecodeError:
                pass  # the tail holds it as text
        out.fold_in(name, stage)
        failed += rc != 0
        report["stages"][name] = stage
        out.write(report)
        print(output[-1500:], flush=True)
        print(f"== {name}: rc={rc} in {stage['seconds']} s", flush=True)
    return failed


def _stage_args(values: list[str], known: set[str]) -> dict[str, list[str]]:
    extra: dict[str, list[str]] = {}
    for value in values:
        name, sep, args = value.partition("=")
        if not sep or name not in known:
            raise SystemExit(f"--stage-args: expected STAGE=ARGS with STAGE from {', '.join(sorted(known))}, "
                             f"got {value!r}")
        extra.setdefault(name, []).extend(shlex.split(args))
    return extra


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="the report's JSON path; the log and the plots go beside it")
    parser.add_argument("--smoke", action="store_true", help="CPU proof: tiny benchmarks, no build if built")
    parser.add_argument("--quick", action="store_true",
                        help="the most valuable stages in priority order (for a first, short GPU call)")
    parser.add_argument("--deadline-s", type=float, default=None,
                        help="finish within this many seconds: each stage gets the time left, and the stages "
                             "that no longer fit are skipped with the reason")
    parser.add_argument("--groups", default="foundation",
                        help=f"without --quick: comma-separated, from {', '.join(GROUPS)}, or all "
                             "(default: foundation)")
    parser.add_argument("--skip", default="", help="comma-separated stage names to skip")
    parser.add_argument("--stage-args", action="append", default=[], metavar="STAGE=ARGS",
                        help="more arguments for one stage, after its own (later options win), e.g. "
                             "selftest=\"--dtypes bfloat16,float32\"; repeatable")
    parser.add_argument("--ext-hash", action="store_true", help="print the hash of csrc/ and setup.py and exit")
    args = parser.parse_args(argv)
    if args.ext_hash:
        print(ext_hash())
        return 0
    if not args.out:
        parser.error("--out is required")
    started = time.monotonic()
    deadline = None if args.deadline_s is None else started + args.deadline_s
    if args.quick:
        stages = QUICK
    else:
        groups = set(GROUPS) if args.groups == "all" else {g for g in args.groups.split(",") if g}
        if not groups <= set(GROUPS):
            parser.error(f"--groups: unknown {sorted(groups - set(GROUPS))}; choose from {', '.join(GROUPS)} or all")
        stages = [s for s in STAGES if not s.groups or groups & set(s.groups)]
    extra = _stage_args(args.stage_args, {s.name for s in stages})
    skip = {s: "--skip" for s in args.skip.split(",") if s}
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("MAX_JOBS", str(os.cpu_count() or 4))
    out = Output(Path(args.out).resolve(), [s.name for s in stages])
    report = {"check": "gpu_check", "smoke": args.smoke, "quick": args.quick, "deadline_s": args.deadline_s,
              "stages_planned": [s.name for s in stages], "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "stages": {}}
    if args.smoke:
        env.setdefault("TRITON_INTERPRET", "1")
        if "build" not in skip and extension_loads():
            skip["build"] = "engine._C already loads (smoke)"
    elif "build" not in skip:
        report["extension"] = use_prebuilt()
        if report["extension"] == "prebuilt":
            skip["build"] = f"the prebuilt engine._C from {GPU_EXT.name}/ matches csrc/ and setup.py and loads"
    out.write(report)
    failed = run_stages(stages, out, report, smoke=args.smoke, env=env, deadline=deadline, extra=extra, skip=skip)
    report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    report["seconds"] = round(time.monotonic() - started, 1)
    report["failed"] = failed
    out.write(report)
    skipped = sum("skipped" in s for s in report["stages"].values())
    print(f"gpu_check: {len(report['stages'])} stages, {failed} failed, {skipped} skipped in {report['seconds']} s; "
          f"report in {out.report_path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
