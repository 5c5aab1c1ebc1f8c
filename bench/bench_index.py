"""Benchmark: indexing a dataset before training (what every run and --dry_run does first).

Times `build_dataset_group` on a synthetic DreamBooth folder of N small images with caption files: list the
folder, read every image header (size and a truncation check), assign buckets, read captions, form batches,
and render the plan. The images are generated once into a temp folder (not timed) and reused by later runs.
A fine-tune variant (`--metadata`) indexes the same images from a JSONL metadata file with sizes, which
skips the header reads.

    python bench/bench_index.py [--n 10000] [--repeat 3] [--metadata] [--profile]

Target: under 2 s for 10,000 images on 2 cores. Prints a table and a JSON line.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def make_dataset(folder: Path, n: int) -> Path:
    """`folder/10_sks thing/` with n PNGs of assorted small sizes, captions, and a metadata.jsonl."""
    from PIL import Image

    images = folder / "10_sks thing"
    done = folder / f".complete-{n}"
    if done.exists():
        return images
    images.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    with open(folder / "metadata.jsonl", "w", encoding="utf-8") as meta:
        for i in range(n):
            size = (rng.choice([48, 64, 80, 96, 128]), rng.choice([48, 64, 80, 96, 128]))
            Image.new("RGB", size, (i % 251, (7 * i) % 253, 90)).save(images / f"{i:05d}.png")
            caption = f"sks thing, tag{i % 97}, tag{i % 13}, colour {i % 7}"
            (images / f"{i:05d}.caption").write_text(caption, encoding="utf-8")
            meta.write(
                json.dumps({"image_path": f"{i:05d}.png", "caption": caption, "image_size": list(size)})
            )
            meta.write("\n")
    done.touch()
    return images


def dataset_spec(images: Path, metadata: Path | None):
    from dataclasses import replace

    from library.data.dataset_config import DatasetDefaults, blueprint_from_dirs

    defaults = DatasetDefaults(
        resolution=(128, 128), enable_bucket=True, min_bucket_reso=64, max_bucket_reso=256, train_batch_size=4
    )
    (spec,) = blueprint_from_dirs(images.parent, None, defaults)
    if metadata is not None:
        spec = replace(spec, subsets=(replace(spec.subsets[0], metadata_file=metadata),))
    return spec


def index_once(spec) -> tuple[float, int, int]:
    from library.data.dataset import build_dataset_group

    started = time.perf_counter()
    group = build_dataset_group([spec], seed=0)
    group.plan_text()
    elapsed = time.perf_counter() - started
    return elapsed, sum(1 for _ in group.iter_items()), group.num_batches_per_epoch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=10_000, help="images in the synthetic dataset")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs; the best and median are reported")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "loratrain_bench_index")
    parser.add_argument("--metadata", action="store_true", help="index from metadata.jsonl (sizes given)")
    parser.add_argument("--profile", action="store_true", help="print the top functions of one run")
    args = parser.parse_args()

    t0 = time.perf_counter()
    images = make_dataset(args.dir / str(args.n), args.n)
    generated = time.perf_counter() - t0
    spec = dataset_spec(images, images.parent / "metadata.jsonl" if args.metadata else None)
    if args.profile:
        profiler = cProfile.Profile()
        profiler.runcall(index_once, spec)
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(25)
    times = []
    for _ in range(args.repeat):
        elapsed, count, batches = index_once(spec)
        times.append(elapsed)
    times.sort()
    best, median = times[0], times[len(times) // 2]
    source = "metadata.jsonl" if args.metadata else "folder + .caption files"
    print(f"{'images':>8} {'source':>24} {'best s':>8} {'median s':>9} {'images/s':>10} {'cpus':>5}")
    print(f"{count:>8} {source:>24} {best:>8.3f} {median:>9.3f} {count / best:>10.0f} {os.cpu_count():>5}")
    print(f"(dataset generated in {generated:.1f} s; {batches} batches per epoch)")
    result = {
        "bench": "index",
        "images": count,
        "source": source,
        "best_s": round(best, 4),
        "median_s": round(median, 4),
        "images_per_s": round(count / best),
        "cpus": os.cpu_count(),
        "target_s": 2.0,
        "ok": best < 2.0,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
