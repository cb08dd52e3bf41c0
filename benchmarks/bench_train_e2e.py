"""End-to-end training throughput: the same training step (engine.train.Trainer: trunk,
vocabulary-parallel hashtag head, SGD, bf16 autocast, channels_last) fed by the real
input pipeline reading JPEG shards, beside the same step on one synthetic batch already
on the GPU. The target (one H100/H200, ResNeXt-101 32x8d): the real-data run within 5%
of the synthetic one, i.e. the input pipeline is never the bottleneck.

    python -m benchmarks.bench_train_e2e --out benchmarks/results/train_e2e_h100.json
    python -m benchmarks.bench_train_e2e --smoke --out /tmp/train_e2e_smoke.json      # CPU, tiny

Without --dataset it synthesises --images JPEGs of ImageNet-like sizes (about 400 x 350)
and builds shards from them under --work first (not timed).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

from benchmarks.common import environment, plot_bars, write_json

TARGET = 0.95


def drop_from_page_cache(dataset_dir: str) -> int:
    """Asks the kernel to evict every file of the dataset from the page cache (no root
    needed: posix_fadvise DONTNEED on clean pages), so the real-data run reads the disk as a
    dataset larger than memory would. Returns the bytes advised."""
    total = 0
    for folder, _, files in os.walk(dataset_dir):
        for name in files:
            path = os.path.join(folder, name)
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fdatasync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                total += os.fstat(fd).st_size
            finally:
                os.close(fd)
    return total


def make_dataset(work: str, images: int, vocab: int, smoke: bool) -> str:
    from engine.data import BuildConfig, build, synth

    ds = os.path.join(work, "dataset")
    if os.path.isfile(os.path.join(ds, "dataset.json")):
        return ds
    side = (40, 96) if smoke else (300, 500)
    raw = synth(os.path.join(work, "raw"), n_images=images, vocab_size=vocab, seed=0, min_side=side[0],
                max_side=side[1], bad_files=False, n_duplicates=0, n_eval=0, n_eval_overlap=0, progress=not smoke)
    build(BuildConfig(images=raw["images"], metadata=raw["metadata"], out=ds, vocab_size=vocab,
                      synonyms=raw["synonyms"], shard_size=1024, workers=1 if smoke else 0, progress=not smoke,
                      validate_with="torchvision"))
    return ds


def measure(overrides: list[str], warmup: int) -> dict:
    from engine.config import apply_overrides, get_preset
    from engine.train import train

    cfg = apply_overrides(get_preset("paper-32x8d-1.5k"), overrides)
    summary = train(cfg)
    timed = [h for h in summary["history"] if h["step"] > warmup]
    batch = cfg.train.batch_size
    wall = sum(batch / h["img_per_s"] for h in timed)
    row = {"img_per_s": len(timed) * batch / wall, "step_ms": 1e3 * wall / len(timed),
           "data_wait": sum(h["data_wait"] * batch / h["img_per_s"] for h in timed) / wall,
           "mfu": (sum(h["mfu"] for h in timed) / len(timed)) if all(h["mfu"] is not None for h in timed) else None,
           "peak_mem_gib": max(h["mem_gib"] for h in timed), "timed_steps": len(timed), "warmup_steps": warmup,
           "loss_first": summary["first_loss"], "loss_last": summary["final_loss"],
           "resolved": {k: summary[k] for k in ("world_size", "micro_batch", "device", "autocast", "vocab_size")}}
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="JSON path; a PNG plot is written beside it")
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run proving the script")
    parser.add_argument("--model", default="resnext101_32x8d")
    parser.add_argument("--batch-size", type=int, default=None, help="per GPU (default 64; smoke 8)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 40; smoke 3)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 10; smoke 2)")
    parser.add_argument("--images", type=int, default=None, help="images to synthesise (default 4096; smoke 64)")
    parser.add_argument("--vocab", type=int, default=1500)
    parser.add_argument("--dataset", help="a built dataset to read instead of synthesising one")
    parser.add_argument("--work", default=None, help="where to synthesise and build (default: under $TMPDIR; "
                        "an existing build there is reused)")
    parser.add_argument("--backend", default="auto", help="data loader backend: auto, dali, torch")
    parser.add_argument("--threads", type=int, default=0, help="DALI threads (0: DALI's default)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the trunk in both runs")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="extra config overrides")
    parser.add_argument("--page-cache", choices=["dropped", "warm"], default="dropped",
                        help="the real-data run reads shards evicted from the page cache first (dropped, the "
                             "default: a run over a dataset larger than memory), or as just written (warm)")
    args = parser.parse_args(argv)
    smoke = args.smoke
    if not smoke and not torch.cuda.is_available():
        print("bench_train_e2e: no GPU here; use --smoke for the CPU check", file=sys.stderr)
        return 2
    batch = args.batch_size or (8 if smoke else 64)
    steps = args.steps or (3 if smoke else 40)
    warmup = args.warmup or (2 if smoke else 10)
    images = args.images or (64 if smoke else 4096)
    vocab = min(args.vocab, 16) if smoke else args.vocab
    work = args.work or os.path.join(tempfile.gettempdir(),
                                     f"engine_bench_train_e2e_{images}x{vocab}" + ("_smoke" if smoke else ""))
    payload = {"benchmark": "train_e2e", "environment": environment(), "smoke": smoke, "target": TARGET,
               "settings": {"model": "custom tiny" if smoke else args.model, "batch_per_gpu": batch, "steps": steps,
                            "warmup": warmup, "images": images, "vocab": vocab, "backend": args.backend,
                            "compile": args.compile}, "results": []}
    t0 = time.perf_counter()
    ds = args.dataset or make_dataset(work, images, vocab, smoke)
    payload["dataset"] = {"path": ds, "prepare_s": time.perf_counter() - t0}
    write_json(args.out, payload)
    common = [f"train.batch_size={batch}", "train.micro_batch=0", f"train.steps={warmup + steps}",
              "optim.warmup_steps=0", "train.log_every=1", "train.checkpoints=false", "train.resume=never",
              "train.progress=false", "train.tensorboard=false", f"train.out_dir={os.path.join(work, 'runs')}",
              f"data.backend={args.backend}", f"model.compile={str(args.compile).lower()}"]
    if args.threads:
        common.append(f"data.num_threads={args.threads}")
    if smoke:
        common += ["model.name=custom", "model.layers=[1,1,1,1]", "model.groups=4", "model.width_per_group=4",
                   "model.fused=none", "data.image_size=32", "train.precision=fp32", "train.device=cpu",
                   "data.num_workers=0", "data.num_threads=1"]
    else:
        common += [f"model.name={args.model}"]
    common += args.overrides
    import json

    with open(os.path.join(ds, "dataset.json"), encoding="utf-8") as f:
        vocab = int(json.load(f)["vocab_size"])  # the synthetic run scores the same vocabulary
    payload["dataset"]["vocab_size"] = vocab
    for name, extra in (("synthetic", ["data.synthetic=true", f"data.synthetic_vocab={vocab}"]),
                        ("real", [f"data.dataset={ds}"])):
        page_cache = None
        if name == "real":
            page_cache = "warm (shards as just written or read)"
            if args.page_cache == "dropped":
                page_cache = f"dropped ({drop_from_page_cache(ds) / 2**20:.0f} MiB evicted with posix_fadvise first)"
        settings = {"warmup": warmup, "repeats": steps, "compile": "model.compile=true" if args.compile else None,
                    "page_cache": page_cache}
        try:
            row = {"input": name, **measure(common + extra, warmup), "settings": settings}
            # Whatever the training engine left it at; both inputs run under the same.
            settings["cudnn_benchmark"] = bool(torch.backends.cudnn.benchmark)
            print(f"{name:<10} {row['img_per_s']:9.1f} img/s  {row['step_ms']:8.1f} ms/step  "
                  f"data wait {100 * row['data_wait']:.1f}%", flush=True)
        except (RuntimeError, ValueError) as e:  # out of memory, a loader failure: recorded
            row = {"input": name, "settings": settings,
                   "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
            print(f"{name:<10} failed: {row['error']}", flush=True)
        payload["results"].append(row)
        write_json(args.out, payload)
    rows = {r["input"]: r for r in payload["results"]}
    if all("img_per_s" in r for r in rows.values()):
        ratio = rows["real"]["img_per_s"] / rows["synthetic"]["img_per_s"]
        payload["real_over_synthetic"] = ratio
        payload["meets_target"] = ratio >= TARGET
        verdict = "" if smoke else (" -> met" if ratio >= TARGET else " -> NOT met")
        print(f"real / synthetic = {ratio:.3f} (target >= {TARGET}){verdict}")
    write_json(args.out, payload)
    why = plot_bars(os.path.splitext(args.out)[0] + ".png",
                    f"end-to-end training img/s, {payload['settings']['model']}, batch {batch}/GPU, "
                    f"{payload['environment']['device']}", ["img/s"],
                    {r["input"]: [r.get("img_per_s")] for r in payload["results"]}, "img/s")
    if why:
        print(why, file=sys.stderr)
    return 0 if all("img_per_s" in r for r in payload["results"]) else 1


if __name__ == "__main__":
    sys.exit(main())
