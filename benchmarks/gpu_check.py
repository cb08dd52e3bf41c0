"""The GPU check: build the extension, run the GPU tests and the benchmarks beside their
peers, and write one JSON file, updated after every stage so a run cut short keeps what
it measured. Sized to finish within 8 minutes on one H100/H200.

    python -m benchmarks.gpu_check --out $OUT/gpu_check.json            # on the GPU machine
    python -m benchmarks.gpu_check --smoke --out /tmp/gpu_check.json    # proves it on a CPU
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import REPO, write_json

# Each stage: name, command (run from the repository root; {json} is the stage's own
# JSON path), extra arguments on the GPU, extra arguments in smoke mode, time limit (s).
STAGES = [
    ("build", [sys.executable, "setup.py", "build_ext", "--inplace"], [], [], 300),
    ("info", [sys.executable, "-m", "engine.info", "--json"], [], [], 60),
    ("gpu_tests", [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/test_bn_act.py",
                   "tests/test_hashtag_ce.py", "tests/test_conv_bn.py", "-p", "no:cacheprovider"], [], [], 240),
    ("bench_bn_act", [sys.executable, "-m", "benchmarks.bench_bn_act", "--out", "{json}"], [], ["--smoke"], 180),
    ("bench_hashtag_ce", [sys.executable, "-m", "benchmarks.bench_hashtag_ce", "--out", "{json}"],
     [], ["--smoke", "--methods", "engine", "eager"], 150),
    ("bench_conv_bn", [sys.executable, "-m", "benchmarks.bench_conv_bn", "--out", "{json}"],
     ["--archs", "32x8d"], ["--smoke", "--kinds", "first"], 300),
    ("bench_data", [sys.executable, "-m", "benchmarks.bench_data", "--out", "{json}"],
     ["--device", "cuda", "--hw-decoder-load", "0", "0.65", "1"], ["--smoke"], 150),
    ("bench_train_step", [sys.executable, "-m", "benchmarks.bench_train_step", "--out", "{json}"],
     ["--models", "resnext101_32x8d:256", "--steps", "10"], ["--smoke"], 300),
]


def _text(stream) -> str:
    return stream.decode(errors="replace") if isinstance(stream, bytes) else (stream or "")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="the JSON file; each stage's own JSON goes beside it")
    parser.add_argument("--smoke", action="store_true", help="CPU proof: tiny benchmarks, no build if built")
    parser.add_argument("--skip", default="", help="comma-separated stage names to skip")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    skip = {s for s in args.skip.split(",") if s}
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("MAX_JOBS", str(os.cpu_count() or 4))
    if args.smoke:
        env.setdefault("TRITON_INTERPRET", "1")
        if _extension_loads():
            skip.add("build")
    report = {"check": "gpu_check", "smoke": args.smoke, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "stages": {}}
    failed = 0
    for name, command, gpu_args, smoke_args, limit in STAGES:
        if name in skip:
            report["stages"][name] = {"skipped": True}
            continue
        stage_json = out.with_name(f"{out.stem}.{name}.json")
        cmd = [part.replace("{json}", str(stage_json)) for part in command]
        cmd += smoke_args if args.smoke else gpu_args
        print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
        start = time.monotonic()
        try:
            proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=limit)
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
