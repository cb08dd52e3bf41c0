"""examples/slurm/train.sbatch: the command it would run on 1 and 4 nodes (ENGINE_DRY_RUN=1),
parsed by torchrun's and `engine train`'s own argument parsers."""

import os
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "slurm" / "train.sbatch"


def dry_run(tmp_path, nodes: int, nodelist: str, **env) -> list[str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    scontrol = bin_dir / "scontrol"
    # Slurm's own expansion of the node list; the script reads only the first host.
    hosts = "\n".join(f"gpu{i:02d}" for i in range(1, nodes + 1))
    scontrol.write_text(f"#!/bin/sh\n[ \"$1 $2 $3\" = \"show hostnames {nodelist}\" ] || exit 3\n"
                        f"cat <<'EOF'\n{hosts}\nEOF\n")
    scontrol.chmod(scontrol.stat().st_mode | stat.S_IEXEC)
    full_env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242", "SLURM_NNODES": str(nodes),
                "SLURM_JOB_NODELIST": nodelist, "SLURM_JOB_NAME": "engine-train", "ENGINE_DRY_RUN": "1", **env}
    out = subprocess.run(["bash", str(SCRIPT)], env=full_env, capture_output=True, text=True, check=True).stdout
    return shlex.split(out)


def split(cmd: list[str]) -> tuple[list[str], list[str], list[str]]:
    """(srun's arguments, torchrun's arguments, engine train's arguments)."""
    run = cmd.index("torch.distributed.run")
    engine = cmd.index("engine.cli")
    assert cmd[run - 1] == "-m" and cmd[engine - 1] == "-m" and cmd[engine + 1] == "train"
    return cmd[1:run - 2], cmd[run + 1:engine - 1], cmd[engine + 2:]


@pytest.mark.parametrize("nodes, nodelist", [(1, "gpu01"), (4, "gpu[01-04]")])
def test_command_line_for_n_nodes(tmp_path, nodes, nodelist):
    from torch.distributed.run import get_args_parser

    cmd = dry_run(tmp_path, nodes, nodelist)
    assert cmd[0] == "srun"
    srun, torchrun, train = split(cmd)
    assert srun[srun.index("--nodes") + 1] == str(nodes)
    assert srun[srun.index("--ntasks-per-node") + 1] == "1"  # one torchrun per node
    # torchrun's own parser: every flag exists, and the values are what a 8-GPU node needs.
    args = get_args_parser().parse_args(torchrun + ["-m", "engine.cli"])
    assert args.nnodes == str(nodes) and args.nproc_per_node == "8"
    assert args.rdzv_backend == "c10d" and args.rdzv_endpoint == "gpu01:29500" and args.rdzv_id == "4242"
    assert args.max_restarts == 3
    assert train == ["--preset", "paper-32x8d-17k", "--set", "data.dataset=/data/ig-17k",
                     "--set", "train.out_dir=runs/engine-train-4242"]


def test_overrides_reach_engine_train(tmp_path):
    cmd = dry_run(tmp_path, 4, "gpu[01-04]", PRESET="tiny", DATASET="/data/my set", OUT="/ckpt/run 1",
                  GPUS_PER_NODE="4", EXTRA="--set train.steps=7")
    _, torchrun, train = split(cmd)
    assert torchrun[torchrun.index("--nproc-per-node") + 1] == "4"
    # `engine train` takes the arguments as they arrive (spaces in paths survive the quoting).
    out = subprocess.run([sys.executable, "-m", "engine.cli", "train", *train, "--print-config"],
                         capture_output=True, text=True, check=True).stdout
    assert '"dataset": "/data/my set"' in out and '"out_dir": "/ckpt/run 1"' in out and '"steps": 7' in out


def test_outside_slurm_it_says_so(tmp_path):
    env = {"PATH": os.environ["PATH"], "ENGINE_DRY_RUN": "1"}
    proc = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True)
    assert proc.returncode != 0 and "not inside a Slurm job" in proc.stderr
