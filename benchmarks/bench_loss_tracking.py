"""Does the fused ResNeXt train like the reference? Three runs from the same initial
weights on the same batches (a learnable synthetic task: each class adds its own fixed
pattern to noise), SGD with Nesterov momentum after a linear warm-up, channels_last:

    reference fp32     plain blocks, fp32: the anchor
    reference bf16     plain blocks under bf16 autocast: how far bf16 alone moves the loss
    fused bf16         fused="conv" blocks (Triton / direct CUDA / cuDNN 3x3, autotuned) in bf16

"bf16 noise" at step t is |reference bf16 - reference fp32|; the fused model tracks the
reference when |fused bf16 - reference bf16|, averaged over the last quarter of the run,
is at most `--tolerance` times the bf16 noise averaged over the same steps (losses are
smoothed over 10 steps first). JSON with the three curves and the verdict; a PNG beside it.

    python -m benchmarks.bench_loss_tracking --out benchmarks/results/loss_tracking_h100.json
    python -m benchmarks.bench_loss_tracking --smoke --out /tmp/loss_tracking_smoke.json   # CPU, tiny
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

import torch
import torch.nn.functional as F

from benchmarks.common import environment, write_json
from engine.models import autotune_fused_blocks, create_model, resnext


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="JSON path; a PNG plot is written beside it")
    parser.add_argument("--smoke", action="store_true", help="a tiny model for a few steps on the CPU")
    parser.add_argument("--model", default="resnext101_32x8d")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--lr", type=float, default=0.02, help="peak learning rate, after a linear warm-up")
    parser.add_argument("--warmup", type=int, default=20, help="warm-up steps")
    parser.add_argument("--tolerance", type=float, default=2.0,
                        help="allowed ratio of the fused model's gap to the bf16 noise")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def batches(steps, batch, size, classes, device, seed):
    """The same (images, labels) sequence for every run: noise plus 0.5 x a fixed per-class pattern."""
    gen = torch.Generator(device).manual_seed(seed)
    patterns = torch.randn(classes, 3, size, size, device=device, generator=gen)
    for _ in range(steps):
        labels = torch.randint(0, classes, (batch,), device=device, generator=gen)
        noise = torch.randn(batch, 3, size, size, device=device, generator=gen)
        yield (noise + 0.5 * patterns[labels]).contiguous(memory_format=torch.channels_last), labels


def train(model, args, device, amp_dtype):
    model = model.to(device=device, memory_format=torch.channels_last).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / args.warmup))
    losses = []
    start = time.perf_counter()
    for step, (images, labels) in enumerate(batches(args.steps, args.batch, args.image_size, args.classes, device,
                                                    args.seed)):
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            if step == 0:
                autotune_fused_blocks(model, images)
            loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if not torch.isfinite(loss):
            raise RuntimeError(f"non-finite loss at step {step}")
    return losses, time.perf_counter() - start


def smooth(values, window=10):
    out = []
    for i in range(len(values)):
        chunk = values[max(0, i - window + 1):i + 1]
        out.append(sum(chunk) / len(chunk))
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if args.smoke:
        args.steps, args.batch, args.image_size, args.classes = min(args.steps, 4), 4, 32, 4

    def build(fused):
        torch.manual_seed(args.seed)
        if args.smoke:
            return resnext([1, 1, 1, 1], 4, 2, fused=fused, num_classes=args.classes)
        return create_model(args.model, fused=fused, num_classes=args.classes)

    reference = build(False)
    fused = build("conv")
    fused.load_state_dict(reference.state_dict())
    # On the CPU bf16 autocast runs the reference backends only, which proves the script, not the kernels.
    runs = {"reference fp32": (copy.deepcopy(reference), None),
            "reference bf16": (copy.deepcopy(reference), torch.bfloat16),
            "fused bf16": (fused, torch.bfloat16)}
    del reference
    payload = {"benchmark": "loss_tracking", "environment": environment(), "smoke": args.smoke,
               "settings": {k: v for k, v in vars(args).items() if k != "out"}, "runs": {}}
    for name, (model, amp_dtype) in runs.items():
        losses, seconds = train(model, args, device, amp_dtype)
        payload["runs"][name] = {"losses": losses, "seconds": round(seconds, 2)}
        print(f"{name:<16} loss {losses[0]:.4f} -> {losses[-1]:.4f} in {seconds:.1f} s", flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        write_json(args.out, payload)

    curves = {name: smooth(run["losses"]) for name, run in payload["runs"].items()}
    tail = slice(args.steps - max(1, args.steps // 4), args.steps)
    noise = [abs(a - b) for a, b in zip(curves["reference bf16"][tail], curves["reference fp32"][tail])]
    gap = [abs(a - b) for a, b in zip(curves["fused bf16"][tail], curves["reference bf16"][tail])]
    mean_noise, mean_gap = sum(noise) / len(noise), sum(gap) / len(gap)
    payload["verdict"] = {"bf16_noise": mean_noise, "fused_gap": mean_gap, "tolerance": args.tolerance,
                          "tracks": mean_gap <= args.tolerance * max(mean_noise, 1e-6),
                          "steps_compared": [tail.start, tail.stop]}
    write_json(args.out, payload)
    print(f"last {tail.stop - tail.start} steps: fused gap {mean_gap:.4f}, bf16 noise {mean_noise:.4f} -> "
          f"{'tracks' if payload['verdict']['tracks'] else 'DOES NOT track'} the reference", flush=True)
    _plot(args.out, curves, payload["environment"]["device"])
    return 0


def _plot(out, curves, device_name):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, values in curves.items():
        ax.plot(values, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (10-step mean)")
    ax.set_title(f"fused vs reference ResNeXt, {device_name}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(str(out).rsplit(".", 1)[0] + ".png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
