"""Benchmark: data-loader throughput on uncached images, against PIL decoding alone.

The loader path is what training does per step without a latent cache: decode, resize to the bucket, crop,
convert to a float tensor in [-1, 1], stack a batch, through a torch DataLoader with 0, 1 and 2 worker
processes (`EpochBatchDataset` + `EpochBatchSampler`, as the training loop uses them). The floor is PIL
decoding alone (`Image.open(...).convert("RGB")`) in one process. Images are generated once into a temp
folder (JPEG photos-like sizes, not timed).

    python bench/bench_loader.py [--n 256] [--resolution 512] [--batch 4] [--workers 0 1 2]

Prints a table (images/s, and the loader's cost per image relative to decoding alone) and a JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def make_images(folder: Path, n: int) -> list[Path]:
    """n JPEGs of assorted camera-like sizes with some texture (so decoding costs what real photos cost)."""
    import numpy as np
    from PIL import Image

    images = folder / "1_photo"
    done = folder / f".complete-{n}"
    if not done.exists():
        images.mkdir(parents=True, exist_ok=True)
        rng = random.Random(0)
        noise = np.random.default_rng(0)
        for i in range(n):
            w, h = rng.choice([(768, 1024), (1024, 768), (896, 896), (1152, 640), (640, 960)])
            base = np.linspace(0, 255, w, dtype=np.float32)[None, :, None].repeat(h, 0).repeat(3, 2)
            pixels = np.clip(base + noise.normal(0, 24, (h, w, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(images / f"{i:04d}.jpg", quality=90)
            (images / f"{i:04d}.caption").write_text(f"photo {i}")
        done.touch()
    return sorted(images.glob("*.jpg"))


def pil_decode(paths: list[Path]) -> float:
    from PIL import Image

    started = time.perf_counter()
    for path in paths:
        with Image.open(path) as image:
            image.convert("RGB")
    return time.perf_counter() - started


def loader_epoch(group, workers: int) -> tuple[float, int]:
    import torch

    from library.data.loader import EpochBatchDataset, EpochBatchSampler, identity_collate

    loader = torch.utils.data.DataLoader(
        EpochBatchDataset(group),
        batch_size=None,
        sampler=EpochBatchSampler(group, epoch=0),
        num_workers=workers,
        collate_fn=identity_collate,
    )
    started = time.perf_counter()
    count = sum(batch["images"].shape[0] for batch in loader)
    return time.perf_counter() - started, count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=256, help="images")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--workers", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "loratrain_bench_loader")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)  # one core per process, as DataLoader workers get
    from library.data.dataset import build_dataset_group
    from library.data.dataset_config import DatasetDefaults, blueprint_from_dirs

    paths = make_images(args.dir / str(args.n), args.n)
    defaults = DatasetDefaults(
        resolution=(args.resolution, args.resolution), enable_bucket=True, train_batch_size=args.batch
    )
    group = build_dataset_group(blueprint_from_dirs(paths[0].parent.parent, None, defaults), seed=0)
    pil_decode(paths[:8])  # warm the page cache and PIL's plugins
    decode_s = pil_decode(paths)
    rows = [("PIL decode only", len(paths), decode_s)]
    for workers in args.workers:
        seconds, count = loader_epoch(group, workers)
        rows.append((f"loader, {workers} workers", count, seconds))
    floor = len(paths) / decode_s
    print(f"{'path':<22} {'images':>7} {'seconds':>8} {'images/s':>9} {'vs decode':>10}")
    for name, count, seconds in rows:
        rate = count / seconds
        print(f"{name:<22} {count:>7} {seconds:>8.2f} {rate:>9.1f} {rate / floor:>9.2f}x")
    setting = f"{args.resolution}px buckets, batch {args.batch}, {os.cpu_count()} cpus"
    print(f"({setting}; worker times include their start-up)")
    print(
        json.dumps(
            {
                "bench": "loader",
                "images": len(paths),
                "resolution": args.resolution,
                "batch": args.batch,
                "cpus": os.cpu_count(),
                "images_per_s": {name: round(count / seconds, 1) for name, count, seconds in rows},
            }
        )
    )


if __name__ == "__main__":
    main()
