"""The build's scan rate (stage 1: read, sha256, validate, re-encode what must be) on
JPEGs of ordinary web sizes, per CPU core: the figure behind the part-size advice in
docs/datasets.md. The same function the builder runs per part (engine.data.scan.scan_part),
in this process, one thread, with the validators the builder can use:

    torchvision         libjpeg-turbo decode of every image (always on)
    torchvision+dali    and DALI's CPU decoder over the same bytes (validate_with=auto
                        when DALI is installed: what a default build runs)

Images: --per-size baseline JPEGs (quality 90) of each size in SIZES, a smooth random
field with fine grain, about 1.5 bits per pixel at that quality, as photographs (reported).
Rates are images per CPU second of this process (user + system, DALI's threads
included), so another job on the machine slows the wall clock, not the figure; the wall
clock rate is reported beside it.

    python -m benchmarks.bench_scan --out benchmarks/results/scan_cpu_2core.json
    python -m benchmarks.bench_scan --per-size 4 --out /tmp/scan.json   # seconds
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import sys
import tempfile
import time

import torch

from benchmarks.common import environment, write_json

# (height, width): Flickr's 500 px "medium", Instagram's square 640 and 1080, a 4:3 1024 px.
SIZES = [(375, 500), (640, 640), (768, 1024), (1080, 1080)]


def photo_like(h: int, w: int, gen: torch.Generator) -> torch.Tensor:
    """uint8 [3, h, w]: low-frequency colour fields plus grain, so the JPEG holds edges and
    texture in the proportions of a photograph rather than flat colour or pure noise."""
    coarse = torch.rand(3, max(2, h // 48), max(2, w // 48), generator=gen)
    field = torch.nn.functional.interpolate(coarse[None], size=(h, w), mode="bicubic", align_corners=False)[0]
    grain = torch.randn(3, h, w, generator=gen) * 0.015
    return ((field + grain).clamp(0, 1) * 255).to(torch.uint8)


def write_images(root: str, per_size: int) -> list[dict]:
    from engine.data.jpeg import encode_baseline_jpeg

    gen = torch.Generator().manual_seed(0)
    files = []
    for h, w in SIZES:
        for i in range(per_size):
            data = encode_baseline_jpeg(photo_like(h, w, gen), 90)
            path = f"{h}x{w}_{i:04d}.jpg"
            with open(os.path.join(root, path), "wb") as f:
                f.write(data)
            files.append({"path": path, "bytes": len(data), "pixels": h * w})
    return files


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def scan_once(root: str, files: list[dict], dali: bool, part: int) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from engine.data import scan as scan_mod
    from engine.data.jpeg import Limits

    scan_dir = os.path.join(root, "scan")
    os.makedirs(scan_dir, exist_ok=True)
    rows = os.path.join(root, f"rows-{part}.parquet")
    pq.write_table(pa.table({"path": [f["path"] for f in files], "offset": [-1] * len(files),
                             "size": [f["bytes"] for f in files]}), rows)
    task = {"part": part, "rows": rows, "images": root, "limits": dataclasses.asdict(Limits()), "dali": dali,
            "dali_device": "cpu", "scan_dir": scan_dir}
    if dali:  # the pipeline is built once per worker process and reused: not part of the rate
        scan_mod._dali_checker("cpu")
    cpu0, wall0 = cpu_seconds(), time.perf_counter()
    result = scan_mod.scan_part(task)
    cpu, wall = cpu_seconds() - cpu0, time.perf_counter() - wall0
    n = result["rows"]
    return {"images": n, "ok": result["by_action"].get("ok", 0), "cpu_s": round(cpu, 3), "wall_s": round(wall, 3),
            "images_per_cpu_s": round(n / cpu, 1), "images_per_wall_s": round(n / wall, 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--per-size", type=int, default=100, help="images of each size (default 100)")
    p.add_argument("--work", default=None, help="where the images go (default: a temporary directory)")
    p.add_argument("--out")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    from engine.data.jpeg import dali_available

    with tempfile.TemporaryDirectory(dir=args.work) as root:
        files = write_images(root, args.per_size)
        pixels, nbytes = sum(f["pixels"] for f in files), sum(f["bytes"] for f in files)
        modes = {"torchvision": False}
        why_not = dali_available()
        if why_not is None:
            modes["torchvision+dali"] = True
        rows = []
        for part, (mode, dali) in enumerate(modes.items()):
            by_size = {}
            for h, w in SIZES:
                subset = [f for f in files if f["path"].startswith(f"{h}x{w}_")]
                by_size[f"{h}x{w}"] = scan_once(root, subset, dali, 2 * part * len(SIZES) + len(by_size))
            total = scan_once(root, files, dali, 2 * part * len(SIZES) + len(SIZES))
            rows.append({"validators": mode, "all_sizes": total, "by_size": by_size})
            print(f"{mode:18s} {total['images_per_cpu_s']:7.1f} images per CPU second "
                  f"({total['images_per_wall_s']:.1f} per wall second); by size: "
                  + ", ".join(f"{k} {v['images_per_cpu_s']:.0f}" for k, v in by_size.items()), flush=True)
    payload = {"benchmark": "build scan rate per core", "environment": environment(),
               "images": {"sizes": [f"{h}x{w}" for h, w in SIZES], "per_size": args.per_size, "quality": 90,
                          "mean_bytes": round(nbytes / len(files)), "bits_per_pixel": round(8 * nbytes / pixels, 2)},
               "dali": why_not or "installed (CPU decoder)", "results": rows,
               "million_images_core_hours": {r["validators"]: round(1e6 / r["all_sizes"]["images_per_cpu_s"] / 3600, 2)
                                             for r in rows}}
    if args.out:
        write_json(args.out, payload)
    return 0 if all(r["all_sizes"]["ok"] == r["all_sizes"]["images"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
