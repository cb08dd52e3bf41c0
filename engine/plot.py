"""`engine plot RUN_DIR`: loss, learning rate, throughput and data-wait curves of a
training run (RUN_DIR/metrics.jsonl) as RUN_DIR/curves.png."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Optional


def read_metrics(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{run_dir!r} holds no metrics.jsonl (is it a training run directory?)")
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue  # a line cut short by a killed run
    # A resumed run appends: keep the newest record of each step.
    by_step = {r["step"]: r for r in rows if "step" in r}
    return [by_step[s] for s in sorted(by_step)]


def plot_run(run_dir: str, out: Optional[str] = None) -> str:
    rows = read_metrics(run_dir)
    if not rows:
        raise ValueError(f"{run_dir}/metrics.jsonl has no records yet")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]

    def series(key):
        return [r.get(key) if r.get(key) is not None and math.isfinite(r.get(key)) else float("nan") for r in rows]

    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    ax = axes[0][0]
    ax.plot(steps, series("loss"), marker=".")
    ax.set_title("loss (mean per log interval)")
    ax.set_xlabel("step")
    ax = axes[0][1]
    ax.plot(steps, series("lr"), color="tab:orange")
    ax.set_title("learning rate")
    ax.set_xlabel("step")
    ax = axes[1][0]
    ax.plot(steps, series("img_per_s"), label="global")
    ax.plot(steps, series("img_per_s_per_rank"), label="per rank")
    ax.set_title("throughput (img/s)")
    ax.set_xlabel("step")
    ax.legend()
    ax = axes[1][1]
    ax.plot(steps, [100 * v for v in series("data_wait")], label="data wait %")
    mfu = series("mfu")
    if any(not math.isnan(v) for v in mfu):
        ax.plot(steps, [100 * v for v in mfu], label="MFU %")
    ax.set_title("data-wait share and MFU (%)")
    ax.set_xlabel("step")
    ax.legend()
    title = os.path.basename(os.path.abspath(run_dir))
    cfg_path = os.path.join(run_dir, "config.json")
    if os.path.isfile(cfg_path):
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.load(f)
        r = cfg.get("resolved", {})
        title += f" - {cfg.get('model', {}).get('name')}, batch {cfg.get('train', {}).get('batch_size')}, " \
                 f"{r.get('world_size', '?')} rank(s), {r.get('device', '?')}"
    fig.suptitle(title)
    fig.tight_layout()
    out = out or os.path.join(run_dir, "curves.png")
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a training run directory (holds metrics.jsonl)")
    parser.add_argument("--out", help="PNG path (default RUN_DIR/curves.png)")


def run(args: argparse.Namespace) -> int:
    try:
        path = plot_run(args.run_dir, args.out)
    except (FileNotFoundError, ValueError) as e:
        print(f"engine plot: error: {e}", file=sys.stderr)
        return 2
    except ImportError as e:
        print(f"engine plot: error: matplotlib is needed ({e}); pip install matplotlib", file=sys.stderr)
        return 2
    print(path)
    return 0
