"""`engine` command line: one subcommand per module, imported only when used so
that `engine info` works on a machine missing the heavier dependencies."""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module with add_arguments(parser) and run(args) -> int, one-line help)
COMMANDS = {
    "info": ("engine.info", "versions, devices and which op backends can run here"),
    "selftest": ("engine.selftest", "every op, backend and dtype against its reference on this device"),
    "bench": ("engine.bench", "training-step throughput of a ResNeXt on synthetic input"),
    "data": ("engine.data.cli", "build, synthesise and benchmark hashtag datasets"),
    "train": ("engine.train", "hashtag pretraining (presets, --set overrides; under torchrun for many GPUs)"),
    "export": ("engine.checkpoint", "a run's newest checkpoint as a torchvision-format model.pt (trunk + fc)"),
    "eval": ("engine.evaluate", "transfer: linear probe or fine-tuning on an ImageFolder set, top-1/top-5"),
    "plot": ("engine.plot", "loss and throughput curves of a run directory as PNG"),
    "demo": ("engine.demo", "end to end in minutes on a CPU: synthesise, build, pretrain, linear probe"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="engine", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    argv = sys.argv[1:] if argv is None else argv
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        # Only the chosen command's module is imported (and can add its arguments).
        if argv and argv[0] == name:
            importlib.import_module(module).add_arguments(p)
    args = parser.parse_args(argv)
    return int(importlib.import_module(COMMANDS[args.command][0]).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
