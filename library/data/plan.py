"""Reports about a built dataset group: the plan table printed before training, and kohya metadata."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from library.data.dataset import BuiltDataset, ImageItem


def _bucket_mode(ds: BuiltDataset) -> str:
    spec = ds.spec
    if not spec.enable_bucket:
        return "fixed size (bucketing off)"
    if spec.bucket_no_upscale:
        return f"buckets from image sizes, no upscale, step {spec.bucket_reso_steps}"
    return f"buckets {spec.min_bucket_reso}..{spec.max_bucket_reso} step {spec.bucket_reso_steps}"


def _table(header: list[str], rows: list[list[str]], indent: str = "  ") -> list[str]:
    """Right-aligned columns except the last, which is left-aligned (it holds paths)."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]

    def line(row: list[str]) -> str:
        cells = [cell.rjust(w) for cell, w in zip(row, widths, strict=False)]
        return (indent + "  ".join([*cells, row[-1]])).rstrip()

    return [line(header), *(line(r) for r in rows)]


def _subset_rows(ds: BuiltDataset) -> list[list[str]]:
    used = Counter(item.subset_index for item in ds.items)
    items = Counter()
    for item in ds.items:
        items[item.subset_index] += item.num_repeats
    rows = []
    for index, subset in enumerate(ds.spec.subsets):
        count = ds.subset_image_counts[index]
        images = str(used[index]) if used[index] == count else f"{used[index]} of {count}"
        repeats = str(subset.num_repeats)
        if subset.is_reg and items[index] != used[index] * subset.num_repeats:
            repeats += " (balanced)"
        kind = "reg" if subset.is_reg else "train"
        rows.append([kind, images, repeats, str(items[index]), str(subset.image_dir)])
    return rows


def _bucket_rows(ds: BuiltDataset) -> list[list[str]]:
    size = ds.spec.batch_size
    rows = []
    for (width, height), members in ds.buckets:
        images = len(set(members))
        rows.append([f"{width}x{height}", str(images), str(len(members)), str(-(-len(members) // size)), ""])
    total_items = sum(len(m) for _, m in ds.buckets)
    total_batches = sum(-(-len(m) // size) for _, m in ds.buckets)
    rows.append(["total", str(len(ds.items)), str(total_items), str(total_batches), ""])
    return rows


def plan_text(datasets: list[BuiltDataset], num_batches: int) -> str:
    """The table printed before training: datasets, subsets, buckets, batches, skips and notes."""
    lines: list[str] = []
    for n, ds in enumerate(datasets, 1):
        spec = ds.spec
        res = f"{spec.resolution[0]}x{spec.resolution[1]}"
        lines.append(
            f"Dataset {n}/{len(datasets)}: resolution {res}, batch size {spec.batch_size}, {_bucket_mode(ds)}"
        )
        lines += _table(["kind", "images", "repeats", "items", "folder"], _subset_rows(ds))
        lines += _table(["bucket", "images", "items", "batches", ""], _bucket_rows(ds))
        lines += [f"  note: {note}" for note in ds.notes]
        lines.append("")
    images = sum(len(ds.items) for ds in datasets)
    items = sum(len(m) for ds in datasets for _, m in ds.buckets)
    lines.append(
        f"Total: {len(datasets)} dataset(s), {images} images, {items} items (images x repeats), "
        f"{num_batches} batches per epoch"
    )
    skipped = [(path, reason) for ds in datasets for path, reason in ds.skipped]
    if skipped:
        lines.append(f"Skipped images ({len(skipped)}):")
        lines += [f"  {path}: {reason}" for path, reason in skipped]
    return "\n".join(lines)


def _mean_ar_error(items: list[ImageItem]) -> float:
    return float(sum(abs(i.assignment.ar_error) for i in items) / len(items)) if items else 0.0


def bucket_info(items: list[ImageItem], buckets: list[tuple[tuple[int, int], list[int]]]) -> dict[str, Any]:
    """kohya's bucket_info: {"buckets": {i: {"resolution": [w, h], "count": n}}, "mean_img_ar_error": x}.

    Counts include repeats; buckets with the same resolution (from several datasets) are merged.
    """
    counts: Counter[tuple[int, int]] = Counter()
    for reso, members in buckets:
        counts[reso] += len(members)
    return {
        "buckets": {
            i: {"resolution": list(reso), "count": counts[reso]} for i, reso in enumerate(sorted(counts))
        },
        "mean_img_ar_error": _mean_ar_error(items),
    }


def dataset_metadata(ds: BuiltDataset) -> dict[str, Any]:
    """One kohya ss_datasets entry (a DreamBooth-style dataset)."""
    spec = ds.spec
    subsets = [
        {
            "img_count": ds.subset_image_counts[i],
            "num_repeats": subset.num_repeats,
            "color_aug": False,
            "flip_aug": subset.flip_aug,
            "random_crop": subset.random_crop,
            "shuffle_caption": subset.shuffle_caption,
            "keep_tokens": subset.keep_tokens,
            "keep_tokens_separator": "",
            "secondary_separator": None,
            "enable_wildcard": False,
            "caption_prefix": subset.caption_prefix,
            "caption_suffix": subset.caption_suffix,
            "image_dir": subset.image_dir.name,
            "class_tokens": subset.class_tokens,
            "is_reg": subset.is_reg,
        }
        for i, subset in enumerate(spec.subsets)
    ]
    # kohya records bucket settings only when bucketing is on.
    bucketed = spec.enable_bucket
    return {
        "is_dreambooth": True,
        "batch_size_per_device": spec.batch_size,
        "num_train_images": ds.num_train_images,
        "num_reg_images": ds.num_reg_images,
        "resolution": list(spec.resolution),
        "enable_bucket": bucketed,
        "min_bucket_reso": spec.min_bucket_reso if bucketed else None,
        "max_bucket_reso": spec.max_bucket_reso if bucketed else None,
        "tag_frequency": ds.tag_frequency,
        "bucket_info": bucket_info(ds.items, ds.buckets) if bucketed else None,
        "subsets": subsets,
    }


def tag_frequency(datasets: list[BuiltDataset]) -> dict[str, dict[str, int]]:
    """Per image folder name; like kohya, the first dataset using a folder name wins."""
    merged: dict[str, dict[str, int]] = {}
    for ds in datasets:
        for name, counts in ds.tag_frequency.items():
            merged.setdefault(name, dict(counts))
    return merged


def dataset_dirs(datasets: list[BuiltDataset], *, reg: bool = False) -> dict[str, dict[str, int]]:
    """kohya's ss_dataset_dirs (or ss_reg_dataset_dirs with `reg`): folder name -> repeats and image count;
    repeated names get " (2)", " (3)" ... suffixes."""
    dirs: dict[str, dict[str, int]] = {}
    for ds in datasets:
        for index, subset in enumerate(ds.spec.subsets):
            if subset.is_reg != reg:
                continue
            name, n = subset.image_dir.name, 2
            while name in dirs:
                name, n = f"{subset.image_dir.name} ({n})", n + 1
            dirs[name] = {"n_repeats": subset.num_repeats, "img_count": ds.subset_image_counts[index]}
    return dirs
