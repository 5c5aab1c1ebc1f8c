"""Reports about a built dataset group: the plan table printed before training, and kohya metadata."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from library.data.scan import BuiltDataset, ImageItem

_LISTED = 5  # images named in one plan line; the rest are counted
_MOST_CROPPED = 3


@dataclass(frozen=True)
class TrainingNumbers:
    """The training schedule as plain values, for the steps line of the plan."""

    max_train_steps: int
    num_epochs: int
    batches_per_epoch: int  # per process
    gradient_accumulation_steps: int = 1
    num_processes: int = 1
    from_epochs: bool = False  # True: the steps follow from --max_train_epochs, else --max_train_steps


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
        rows.append([kind, images, repeats, str(items[index]), str(subset.metadata_file or subset.image_dir)])
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


def _names(paths: Iterable[Path]) -> str:
    names = [p.name for p in paths]
    more = f" and {len(names) - _LISTED} more" if len(names) > _LISTED else ""
    return ", ".join(names[:_LISTED]) + more


def _validation_lines(ds: BuiltDataset, run_seed: int | None) -> list[str]:
    spec = ds.spec
    if not ds.validation_items:
        if spec.validation_split > 0:
            return [
                f"  note: validation_split {spec.validation_split} holds out no image (too few per subset)"
            ]
        return []
    counts = Counter(item.bucket for item in ds.validation_items)
    rows = [
        [f"{w}x{h}", str(n), str(math.ceil(n / spec.batch_size)), ""] for (w, h), n in sorted(counts.items())
    ]
    batches = sum(math.ceil(n / spec.batch_size) for n in counts.values())
    seed = spec.validation_seed if spec.validation_seed is not None else f"{run_seed} (the run's seed)"
    names = _names(i.path for i in ds.validation_items)
    return [
        f"  validation, held out and never trained on (validation_split {spec.validation_split}, seed "
        f"{seed}): {len(ds.validation_items)} images, {batches} batches, no repeats: {names}",
        *_table(["validation", "images", "batches", ""], rows),
    ]


def _small_bucket_lines(ds: BuiltDataset) -> list[str]:
    """Buckets with fewer items than a batch: kohya trains them as one smaller batch; say so."""
    size = ds.spec.batch_size
    return [
        f"  note: bucket {w}x{h} has {len(members)} item(s) (images x repeats), fewer than batch size "
        f"{size}, so it trains as a smaller batch of {len(members)}: "
        + _names(ds.items[i].path for i in dict.fromkeys(members))
        for (w, h), members in ds.buckets
        if len(members) < size
    ]


def _most_cropped_lines(ds: BuiltDataset) -> list[str]:
    """The images whose aspect ratio fits their bucket worst, with the share of pixels cut off."""
    cropped = [i for i in ds.items if i.assignment.resized_size != i.assignment.bucket]
    if not cropped:
        return []
    lines = [f"  most cropped ({len(cropped)} of {len(ds.items)} images are cropped to fit their bucket):"]
    for item in sorted(cropped, key=lambda i: -abs(i.assignment.ar_error))[:_MOST_CROPPED]:
        (w, h), (bw, bh), (rw, rh) = item.original_size, item.bucket, item.assignment.resized_size
        cut = 1 - (bw * bh) / (rw * rh)
        lines.append(
            f"    {item.path.name}: {w}x{h} -> {bw}x{bh}, aspect-ratio error "
            f"{abs(item.assignment.ar_error):.3f}, {cut:.1%} cut off"
        )
    return lines


def _steps_line(t: TrainingNumbers) -> str:
    per_epoch = math.ceil(t.batches_per_epoch / t.gradient_accumulation_steps)
    procs = f" per process ({t.num_processes} processes)" if t.num_processes > 1 else ""
    accum = (
        f", gradient accumulation {t.gradient_accumulation_steps}"
        if t.gradient_accumulation_steps > 1
        else ""
    )
    source = (
        f"--max_train_epochs {t.num_epochs}" if t.from_epochs else f"--max_train_steps {t.max_train_steps}"
    )
    partial = " (the last one partly)" if t.max_train_steps % per_epoch else ""
    return (
        f"Steps: {t.batches_per_epoch} batches per epoch{procs}{accum} = {per_epoch} optimizer steps per "
        f"epoch; {t.max_train_steps} steps in {t.num_epochs} epochs{partial}, from {source}"
    )


def plan_text(
    datasets: list[BuiltDataset],
    num_batches: int,
    training: TrainingNumbers | None = None,
    cache: str | None = None,
    seed: int | None = None,
) -> str:
    """The table printed before training: datasets, subsets, buckets, batches, validation, skips, notes and,
    when given, the training steps and a latent-cache summary (`cache`, one line)."""
    lines: list[str] = []
    for n, ds in enumerate(datasets, 1):
        spec = ds.spec
        res = f"{spec.resolution[0]}x{spec.resolution[1]}"
        lines.append(
            f"Dataset {n}/{len(datasets)}: resolution {res}, batch size {spec.batch_size}, {_bucket_mode(ds)}"
        )
        lines += _table(["kind", "images", "repeats", "items", "folder"], _subset_rows(ds))
        lines += _table(["bucket", "images", "items", "batches", ""], _bucket_rows(ds))
        lines += _validation_lines(ds, seed)
        lines += _small_bucket_lines(ds)
        lines += _most_cropped_lines(ds)
        lines += [f"  WARNING: {warning}" for warning in ds.warnings]
        lines += [f"  note: {note}" for note in ds.notes]
        lines.append("")
    images = sum(len(ds.items) for ds in datasets)
    items = sum(len(m) for ds in datasets for _, m in ds.buckets)
    lines.append(
        f"Total: {len(datasets)} dataset(s), {images} images, {items} items (images x repeats), "
        f"{num_batches} batches per epoch"
    )
    if training is not None:
        lines.append(_steps_line(training))
    if cache:
        lines.append(cache)
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
            "color_aug": subset.color_aug,
            "flip_aug": subset.flip_aug,
            "random_crop": subset.random_crop,
            "shuffle_caption": subset.shuffle_caption,
            "keep_tokens": subset.keep_tokens,
            "keep_tokens_separator": subset.keep_tokens_separator,
            "secondary_separator": subset.secondary_separator,
            "enable_wildcard": subset.enable_wildcard,
            "caption_prefix": subset.caption_prefix,
            "caption_suffix": subset.caption_suffix,
            "caption_dropout_rate": subset.caption_dropout_rate,
            "caption_dropout_every_n_epochs": subset.caption_dropout_every_n_epochs,
            "caption_tag_dropout_rate": subset.caption_tag_dropout_rate,
            "token_warmup_min": subset.token_warmup_min,
            "token_warmup_step": subset.token_warmup_step,
            "image_dir": subset.image_dir.name,
            "class_tokens": subset.class_tokens,
            "is_reg": subset.is_reg,
        }
        for i, subset in enumerate(spec.subsets)
    ]
    for entry, subset in zip(subsets, spec.subsets, strict=True):
        if subset.metadata_file is not None:  # kohya: a fine-tune subset names its metadata file instead
            del entry["class_tokens"], entry["is_reg"]
            entry["metadata_file"] = subset.metadata_file.name
    # kohya records bucket settings only when bucketing is on.
    bucketed = spec.enable_bucket
    return {
        "is_dreambooth": not any(subset.metadata_file for subset in spec.subsets),
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
            # kohya names a fine-tune subset after its metadata file
            base = (subset.metadata_file or subset.image_dir).name
            name, n = base, 2
            while name in dirs:
                name, n = f"{base} ({n})", n + 1
            dirs[name] = {"n_repeats": subset.num_repeats, "img_count": ds.subset_image_counts[index]}
    return dirs
