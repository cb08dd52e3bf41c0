"""Mutation check: breaks the code on purpose, once per named mutation, and runs the
tests that claim to catch that break. A mutation the tests pass on has survived: the
tests do not check what they say they check. Exits non-zero when any mutation survives,
or when one no longer applies (its pattern is gone or ambiguous, so it checks nothing).

    python tools/mutation_check.py            # every mutation
    python tools/mutation_check.py --list
    python tools/mutation_check.py --only sampled-head-detaches-features

Mutations run in scratch copies of the source tree, one per parallel job (no .git, no
virtual environment, no caches; the built extension is copied, so nothing is rebuilt). A
copy's `engine/kernels` is a link to its own `kernels/`, so the editable install's mapping
to the original checkout's kernels is never consulted. Only the tests named per mutation
run, stopping at the first failure, two mutations at a time on two cores or more (most of
a mutation's time is one Python process importing torch and running the interpreter), which
keeps the whole check to about three minutes on two cores.
"""

from __future__ import annotations

import argparse
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Never copied: version control, environments, build products that are not the extension, results.
SKIP_DIRS = {".git", ".venv", "build", "__pycache__", ".pytest_cache", "runs", "results", ".whl"}


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str          # file to break, relative to the repository root
    pattern: str       # exact text that must occur once in it
    replacement: str
    tests: tuple[str, ...]  # pytest arguments: the tests that must fail
    why: str


# The three slowest (tens of seconds each) first, so that parallel jobs finish together.
MUTATIONS = [
    Mutation(
        "pretraining-trunk-gets-no-gradient", "engine/train.py",
        "loss = self.head(self.model(images), tags) / self.accum",
        "loss = self.head(self.model(images).detach(), tags) / self.accum",
        ("tests/test_transfer_probe.py", "-k", "linear_probe"),
        "pretraining trains the head alone: the loss falls, but the trunk stays random"),
    Mutation(
        "step-check-plain-model-runs-free", "engine/models/step_check.py",
        "        return _FusedValue.apply(own, recorded)\n", "        return own_value\n",
        ("tests/test_step_check.py", "-k", "kink and triton"),
        "the whole-step check compares two free-running models again, failing correct kernels at a ReLU tie"),
    Mutation(
        "bn_act-backward-ignores-gradient-layout", "engine/ops/bn_act.py",
        "        grad_y = grad_y.contiguous(memory_format=fmt)\n", "",
        ("tests/test_step_check.py", "-k", "kink and triton"),
        "bn_act reads an NCHW output gradient (what the pooling hands to the last block) as channels_last"),
    Mutation(
        "sampled-head-detaches-features", "engine/heads.py",
        "            rows, tags = self._sample(features, tags, tag_weights)\n",
        "            rows, tags = self._sample(features, tags, tag_weights)\n            features = features.detach()\n",
        ("tests/test_hashtag_ce.py", "-k", "head_sampl"),
        "sampled mode (sample_fraction < 1) gives the trunk no gradient"),
    Mutation(
        "sampled-head-drops-bias-gradient", "engine/heads.py",
        "            bias = bias[rows] if bias is not None else None\n",
        "            bias = bias[rows].detach() if bias is not None else None\n",
        ("tests/test_hashtag_ce.py", "-k", "head_sampl"),
        "sampled mode trains no bias"),
    Mutation(
        "fused-block-aten-3x3-drops-bn1-relu", "engine/ops/conv_bn.py",
        "h1 = bn.conv_bn_apply_triton(a1, s1, t1, None, None, None, True)",
        "h1 = bn.conv_bn_apply_triton(a1, s1, t1, None, None, None, False)",
        ("tests/test_conv_bn.py", "-k", "3x3_paths and aten"),
        "the fused block's cuDNN/ATen 3x3 path (what runs when the autotuner picks cuDNN) skips bn1's ReLU"),
    Mutation(
        "fused-block-direct-3x3-drops-bn1-shift", "engine/ops/grouped_conv.py",
        "grouped_conv_bn_fwd_cuda(x, weight, in_scale, in_shift,",
        "grouped_conv_bn_fwd_cuda(x, weight, in_scale, in_shift * 0,",
        ("tests/test_conv_bn.py", "-k", "3x3_paths and direct"),
        "the fused block's direct-kernel 3x3 loses bn1's shift in its prologue"),
    Mutation(
        "engine-backend-variable-ignored", "engine/ops/dispatch.py",
        'chosen = backend if backend is not None else os.environ.get("ENGINE_BACKEND") or None',
        "chosen = backend",
        ("tests/test_models.py", "-k", "forced_fused and bn_act-cpp"),
        "ENGINE_BACKEND is ignored: the model-level 'fused' tests would compare torchvision with itself"),
    Mutation(
        "bn_act-dx-scaled-by-1pct", "kernels/bn_act.py",
        "k_g = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32) * invstd\n",
        "k_g = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32) * invstd * 1.01\n",
        ("tests/test_bn_act.py", "-k", "matches_reference and float16 and triton"),
        "bn_act's Triton dx is 1% off: the half-precision tolerances must see it"),
    Mutation(
        "bn_act-dx-drops-xhat-term", "kernels/bn_act.py",
        "dx += x * tl.load(K_X + cols",
        "dx += 0.0 * x * tl.load(K_X + cols",
        ("tests/test_bn_act.py", "-k", "matches_reference and float16 and triton"),
        "bn_act's Triton dx loses the batch-statistics term through xhat, seen in half precision"),
    Mutation(
        "gpu-check-keeps-stale-stage-json", "benchmarks/gpu_check.py",
        "        stage_json.unlink(missing_ok=True)\n", "",
        ("tests/test_cli_and_benchmarks.py", "-k", "earlier_runs_results"),
        "gpu_check attaches an earlier run's JSON to a stage that crashed"),
    Mutation(
        "benchmark-peers-without-cudnn-benchmark", "benchmarks/common.py",
        "    torch.backends.cudnn.benchmark = True\n", "    torch.backends.cudnn.benchmark = False\n",
        ("tests/test_cli_and_benchmarks.py", "-k", "record_their_settings"),
        "the benchmarks' cuDNN peers run untuned"),
    Mutation(
        "training-step-peers-without-cudnn-benchmark", "engine/bench.py",
        "    torch.backends.cudnn.benchmark = cudnn_benchmark\n", "",
        ("tests/test_cli_and_benchmarks.py", "-k", "each_run_compiled"),
        "the training-step benchmark's cuDNN peers run untuned"),
    Mutation(
        "compiled-variant-not-checked", "engine/bench.py",
        '    if stats["graphs"] < 1:\n', "    if False:\n",
        ("tests/test_cli_and_benchmarks.py", "-k", "ran_eagerly"),
        "a 'compiled' benchmark row that ran eagerly is reported as compiled"),
    Mutation(
        "train-preempted-exits-0", "engine/train.py",
        '(143 if summary["status"] == "preempted" else 1)', '(0 if summary["status"] == "preempted" else 1)',
        ("tests/test_train_cli.py", "-k", "preempted"),
        "a preempted run exits 0, so a scheduler would not requeue it"),
    Mutation(
        "train-nonfinite-exits-0", "engine/train.py",
        "    except (NonFiniteLossError, OutOfMemory) as e:\n",
        "    except (NonFiniteLossError, OutOfMemory) as e:\n        return 0\n",
        ("tests/test_train_cli.py", "-k", "nonfinite or out_of_memory"),
        "a run stopped by non-finite losses or out of memory exits 0"),
    Mutation(
        "train-model-init-ignored", "engine/train.py",
        "            load_init_weights(self.trunk, cfg.model.init)\n", "            pass\n",
        ("tests/test_train_cli.py", "-k", "model_init_starts"),
        "model.init is accepted but the weights are never loaded"),
    Mutation(
        "autotune-digest-is-a-constant", "engine/ops/autotune.py",
        "    return digest.hexdigest()[:16]\n", '    return "0" * 16\n',
        ("tests/test_verify.py", "-k", "digest"),
        "the autotune cache is never invalidated when a kernel, its glue or the extension changes"),
    Mutation(
        "transfer-never-loads-the-weights", "engine/evaluate.py",
        "    missing, unexpected = trunk.load_state_dict(trunk_sd, strict=False)\n",
        "    missing, unexpected = [], []\n",
        ("tests/test_train_eval_plot.py", "-k", "holds_the_weights"),
        "engine eval probes a randomly initialised trunk whatever weights it is given"),
    Mutation(
        "compile-gate-trusts-the-record-unchecked", "benchmarks/compile_gate.py",
        "        if key not in record or kind not in checked:\n", "        if key not in record:\n",
        ("tests/test_compile_gate.py", "-k", "record_a_fresh"),
        "the compile gate takes every recorded row's figures without compiling one, so a stale or edited record "
        "passes"),
]


def copy_tree(dest: Path) -> None:
    def ignore(folder, names):
        return [n for n in names if n in SKIP_DIRS or n.startswith(".venv") or n.endswith((".pyc", ".egg-info"))]
    shutil.copytree(ROOT, dest, ignore=ignore, symlinks=True)
    link = dest / "engine" / "kernels"
    if not link.exists():
        link.symlink_to(Path("..") / "kernels", target_is_directory=True)


def apply(tree: Path, m: Mutation) -> str:
    """Writes the mutated file; returns the original text."""
    target = tree / m.path
    if not target.is_file():
        raise LookupError(f"{m.name}: {m.path} does not exist")
    text = target.read_text()
    count = text.count(m.pattern)
    if count != 1:
        raise LookupError(f"{m.name}: its pattern occurs {count} times in {m.path} (must be exactly once)")
    target.write_text(text.replace(m.pattern, m.replacement))
    return text


def run_tests(tree: Path, m: Mutation, timeout: float) -> tuple[str, float, str]:
    """('killed' | 'survived' | 'error', seconds, tail of the output)."""
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    env.pop("ENGINE_BACKEND", None)
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *m.tests]
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "error", time.monotonic() - start, f"timed out after {timeout:.0f} s"
    seconds = time.monotonic() - start
    tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
    # pytest: 0 all passed, 1 some failed; anything else (collection error, nothing
    # selected, interrupted) means the tests did not really run against the mutation.
    outcome = {0: "survived", 1: "killed"}.get(proc.returncode, "error")
    return outcome, seconds, tail


def check_imports_copy(tree: Path) -> None:
    """The scratch copy must import its own engine and kernels, not the checkout's."""
    code = "import engine, engine.kernels, sys; print(engine.__file__); print(engine.kernels.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tree, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"), check=True).stdout.split()
    for path in out:
        if not Path(path).resolve().is_relative_to(tree.resolve()):
            raise RuntimeError(f"the scratch copy imports {path}, outside {tree}: mutations would not be seen")


def run_one(m: Mutation, trees: queue.Queue, timeout: float) -> tuple[str, float, str]:
    """Applies m in a free scratch copy, runs its tests, restores the file; the outcome."""
    tree = trees.get()
    try:
        try:
            original = apply(tree, m)
        except LookupError as e:
            return "stale", 0.0, str(e)
        try:
            return run_tests(tree, m, timeout)
        finally:
            (tree / m.path).write_text(original)
    finally:
        trees.put(tree)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--only", action="append", default=[], metavar="NAME", help="run this mutation (repeatable)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per mutation's tests")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="mutations checked at once, each in its own copy (default: 2, or 1 on one core)")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only]
    unknown = set(args.only) - {m.name for m in MUTATIONS}
    if unknown:
        parser.error(f"unknown mutation(s) {sorted(unknown)}; --list shows them")
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    if args.list:
        for m in MUTATIONS:
            print(f"{m.name}: {m.path}: {m.why}\n    tests: {' '.join(m.tests)}")
        return 0
    failed = []
    jobs = min(args.jobs, len(chosen)) or 1
    with tempfile.TemporaryDirectory(prefix="mutation-check-") as tmp:
        trees = queue.Queue()
        for i in range(jobs):
            tree = Path(tmp) / f"repo{i}"
            copy_tree(tree)
            check_imports_copy(tree)
            trees.put(tree)
        with ThreadPoolExecutor(jobs) as pool:
            futures = {pool.submit(run_one, m, trees, args.timeout): m for m in chosen}
            for future in futures:
                m = futures[future]
                outcome, seconds, tail = future.result()
                if outcome == "stale":
                    print(f"STALE     {tail}", flush=True)
                    failed.append(m.name)
                    continue
                label = {"killed": "killed", "survived": "SURVIVED", "error": "ERROR"}[outcome]
                print(f"{label:9} {m.name} ({seconds:.0f} s): {m.why}", flush=True)
                if outcome != "killed":
                    failed.append(m.name)
                    print("    " + tail.replace("\n", "\n    "), flush=True)
    print(f"{len(chosen) - len(failed)} of {len(chosen)} mutations caught"
          + (f"; not caught: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
