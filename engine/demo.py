"""`engine demo`: the whole engine end to end in a few minutes on a CPU.

1. synthesise a hashtag dataset (JPEGs whose stripe orientation and frequency follow their
   first hashtag, colours random per image; Zipf-distributed captions, a few broken files
   for the builder to reject);
2. build its shards (validate, deduplicate, vocabulary, webdataset tars + index);
3. pretrain a tiny ResNeXt on the hashtags (`tiny` preset) for a few hundred steps,
   printing loss, throughput and checkpoints;
4. transfer: a few-shot linear probe of the frozen trunk on new labelled images of the most
   frequent hashtags, beside the same probe of a randomly initialised trunk of the same
   shape. Colour says nothing about the class, and random features read colour well and
   stripes badly (engine.data.synthetic), so the random trunk stays near chance: the gap
   is what pretraining bought;
5. print the final metrics (also OUT/demo.json).

Everything lives under --out (default runs/demo); a rerun starts the training afresh.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="working directory (default runs/demo)")
    parser.add_argument("--steps", type=int, default=800, help="pretraining steps (default 800)")
    parser.add_argument("--images", type=int, default=1500, help="synthetic training images (default 1500)")
    parser.add_argument("--vocab", type=int, default=24, help="distinct synthetic hashtags (default 24)")
    parser.add_argument("--image-size", type=int, default=32, help="training crop size in pixels (default 32)")
    parser.add_argument("--batch-size", type=int, default=32, help="global batch (default 32)")
    parser.add_argument("--ranks", type=int, default=1, help="gloo ranks on this machine (default 1)")
    parser.add_argument("--probe-classes", type=int, default=8, help="classes of the linear-probe set (default 8)")
    parser.add_argument("--probe-shots", type=int, default=16, help="training images per probe class (default 16)")
    parser.add_argument("--probe-val", type=int, default=40, help="validation images per probe class (default 40)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="extra overrides of the tiny preset")


def _step(n: int, text: str) -> float:
    print(f"\n== {n}. {text}", flush=True)
    return time.perf_counter()


def run(args: argparse.Namespace) -> int:
    from engine.config import ConfigError

    try:
        demo(args)
    except ConfigError as e:
        print(f"engine demo: error: {e}", file=sys.stderr)
        return 2
    return 0


def demo(args: argparse.Namespace) -> dict:
    from engine import data
    from engine.config import apply_overrides, get_preset
    from engine.evaluate import TransferConfig, evaluate

    t_all = time.perf_counter()
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    times = {}

    t = _step(1, f"synthesise {args.images} hashtag-captioned JPEGs ({args.vocab} hashtags) -> {out}/raw")
    raw = data.synth(os.path.join(out, "raw"), n_images=args.images, vocab_size=args.vocab, seed=0, min_side=40,
                     max_side=96, n_eval=20, n_eval_overlap=4, progress=False, tag_colours=False)
    times["synth_s"] = time.perf_counter() - t
    print(f"   {raw['rows']} metadata rows in {times['synth_s']:.1f}s", flush=True)

    t = _step(2, f"build shards -> {out}/dataset")
    report = data.build(data.BuildConfig(images=raw["images"], metadata=raw["metadata"],
                                         out=os.path.join(out, "dataset"), vocab_size=args.vocab,
                                         synonyms=raw["synonyms"], eval_set=raw["eval_set"], shard_size=512,
                                         workers=1, progress=False, overwrite=True))
    times["build_s"] = time.perf_counter() - t
    print(f"   kept {report['written']} images in {report['shards']['count']} shards, vocabulary "
          f"{report['vocab']['size']}; skipped {sum(report['skipped'].values())} broken files, dropped "
          f"{report['dropped']['duplicate']} duplicates and {report['dropped']['in_eval_set']} eval-set copies "
          f"({times['build_s']:.1f}s)", flush=True)

    run_dir = os.path.join(out, "run")
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = apply_overrides(get_preset("tiny"), [
        f"data.dataset={os.path.join(out, 'dataset')}", f"train.out_dir={run_dir}", f"train.steps={args.steps}",
        f"train.batch_size={args.batch_size}", f"data.image_size={args.image_size}",
        f"train.log_every={max(1, args.steps // 12)}", f"train.ckpt_every={max(1, args.steps // 3)}",
        f"optim.warmup_steps={min(20, args.steps // 10)}", "optim.base_lr=0.2",
        "train.resume=never", *args.overrides])
    t = _step(3, f"pretrain a tiny ResNeXt on hashtags: {args.steps} steps, batch {args.batch_size}, "
                 f"{args.image_size}px, {args.ranks} rank(s) -> {run_dir}")
    if args.ranks > 1:
        summary = _train_ranks(cfg, args.ranks, out)
    else:
        from engine.train import train

        summary = train(cfg)
    times["train_s"] = time.perf_counter() - t

    t = _step(4, f"transfer: few-shot linear probe of the frozen trunk ({args.probe_classes} classes, "
                 f"{args.probe_shots} training images each)")
    probe = os.path.join(out, "probe")
    shutil.rmtree(probe, ignore_errors=True)
    for split, per_class, seed in (("train", args.probe_shots, 1), ("val", args.probe_val, 2)):
        data.synth_imagefolder(os.path.join(probe, split), num_classes=args.probe_classes, per_class=per_class,
                               seed=seed, min_side=40, max_side=96, first_tag=0, tag_colours=False)
    common = dict(mode="linear", train_dir=os.path.join(probe, "train"), val_dir=os.path.join(probe, "val"),
                  image_size=args.image_size, batch_size=64, epochs=60, backend="auto", num_workers=0,
                  device="cpu" if cfg.train.device == "cpu" else "auto")
    pretrained = evaluate(TransferConfig(weights=run_dir, out=os.path.join(out, "probe_pretrained.json"), **common))
    # The same probe on a randomly initialised trunk of the same shape: what pretraining adds.
    import torch

    from engine.builders import build_trunk

    torch.manual_seed(1)
    rand_path = os.path.join(out, "random_trunk.pt")
    torch.save(build_trunk(cfg, fused=False).state_dict(), rand_path)
    random_init = evaluate(TransferConfig(weights=rand_path, out=os.path.join(out, "probe_random.json"), **common))
    times["probe_s"] = time.perf_counter() - t

    result = {
        "pretrain": {k: summary.get(k) for k in ("status", "step", "first_loss", "final_loss", "img_per_s",
                                                 "skipped_steps", "checkpoint", "world_size", "device")},
        "linear_probe": {"top1": pretrained["top1"], "top5": pretrained["top5"],
                         "chance_top1": pretrained["chance_top1"],
                         "random_init_top1": random_init["top1"], "random_init_top5": random_init["top5"],
                         "classes": pretrained["num_classes"], "val_images": pretrained["val_images"]},
        "seconds": {**{k: round(v, 1) for k, v in times.items()}, "total_s": round(time.perf_counter() - t_all, 1)},
    }
    with open(os.path.join(out, "demo.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    p, lp = result["pretrain"], result["linear_probe"]
    print("\n== 5. final metrics", flush=True)
    print(f"   pretraining: loss {p['first_loss']:.3f} -> {p['final_loss']:.3f} over {p['step']} steps, "
          f"{p['img_per_s']:.0f} img/s on {p['world_size']} rank(s) ({p['device']}); checkpoint {p['checkpoint']}")
    print(f"   linear probe ({lp['classes']} classes, {lp['val_images']} val images): top-1 {lp['top1']:.1f}%, "
          f"top-5 {lp['top5']:.1f}% (random-init trunk: top-1 {lp['random_init_top1']:.1f}%; chance "
          f"{lp['chance_top1']:.1f}%)")
    print(f"   time: {result['seconds']['total_s']:.0f}s in all (synth {times['synth_s']:.0f}s, build "
          f"{times['build_s']:.0f}s, pretrain {times['train_s']:.0f}s, probe {times['probe_s']:.0f}s); curves: "
          f"engine plot {run_dir}", flush=True)
    return result


def _rank_job(rank: int, world: int, cfg, out: str) -> None:
    from engine.train import train, write_json

    summary = train(cfg)
    if rank == 0:
        write_json(os.path.join(out, "run_summary.json"), summary)


def _train_ranks(cfg, world: int, out: str) -> dict:
    from engine.distributed import spawn_ranks

    spawn_ranks(_rank_job, world, out, cfg, out, timeout_s=3600)
    with open(os.path.join(out, "run_summary.json"), encoding="utf-8") as f:
        return json.load(f)
