"""Scanning one dataset: images found, checked and captioned, validation split, reg balancing, buckets.

Only image headers and caption files are read here; pixels are loaded per batch by the dataset group.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from library.data.bucketing import BucketAssignment, BucketSelector, ImageTooSmallError, kohya_crop_ltrb
from library.data.captions import (
    caption_extension_warning,
    count_tags,
    read_caption,
)
from library.data.dataset_config import DatasetSpec, SubsetSpec
from library.data.finetune import scan_metadata_subset
from library.data.images import IMAGE_EXTENSIONS, list_image_files
from library.data.samples import ScanChecks
from library.data.validation_split import split_train_validation
from library.errors import UserError


@dataclass
class ImageItem:
    """One image (not one repeat). Latent fields are filled by latent caching."""

    path: Path
    caption: str  # raw caption (file or class tokens), processed per step
    subset_index: int
    is_reg: bool
    num_repeats: int  # after regularisation balancing
    original_size: tuple[int, int]  # (w, h)
    assignment: BucketAssignment
    latents: torch.Tensor | None = None
    latents_flipped: torch.Tensor | None = None
    latents_npz: Path | None = None
    latents_npz_multi_resolution: bool = False  # its keys carry the `_<h>x<w>` latent size (FLUX files)
    latents_cache_id: str | None = None
    mask_path: Path | None = None  # its mask image (conditioning_data_dir), for --masked_loss
    cached_mask: torch.Tensor | None = None  # uint8 [H, W], kept with RAM latents
    unusable: str | None = None  # why it failed to decode after the scan; batches then use another image
    tags: str | None = None  # fine-tune metadata tags; kohya's tag frequency counts only these

    @property
    def bucket(self) -> tuple[int, int]:
        return self.assignment.bucket

    @property
    def crop_ltrb(self) -> tuple[float, float, float, float]:
        return kohya_crop_ltrb(self.assignment.bucket, self.original_size)


@dataclass
class BuiltDataset:
    """A dataset after scanning: items, buckets (resolution -> item indices with repeats) and a report.

    `subset_image_counts` are the usable images per subset (kohya's img_count), before reg balancing and
    without the validation images, which are kept apart in `validation_items` (one repeat each).
    """

    spec: DatasetSpec
    items: list[ImageItem]
    buckets: list[tuple[tuple[int, int], list[int]]]
    subset_image_counts: list[int]
    num_train_images: int
    num_reg_images: int
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    tag_frequency: dict[str, dict[str, int]] = field(default_factory=dict)
    validation_items: list[ImageItem] = field(default_factory=list)  # held out: never trained on
    validation_image_counts: list[int] = field(default_factory=list)  # per subset
    warnings: list[str] = field(default_factory=list)  # printed in the plan; training still runs

    def subset(self, item: ImageItem) -> SubsetSpec:
        return self.spec.subsets[item.subset_index]


def _caption_fix_hint(image: Path, subset: SubsetSpec) -> str:
    others = sorted(
        p.suffix
        for p in image.parent.glob(f"{image.stem}.*")
        if p.suffix.lower() not in IMAGE_EXTENSIONS and p.suffix != subset.caption_extension
    )
    if others:
        return f'; found {image.stem}{others[0]}: set caption_extension = "{others[0]}"'
    return (
        f"; add {image.stem}{subset.caption_extension} files or set class_tokens for {subset.image_dir.name}"
    )


def _scan_subset(
    subset: SubsetSpec,
    index: int,
    selector: BucketSelector,
    built: BuiltDataset,
    problems: list[str],
    *,
    strict: bool = False,
) -> list[ImageItem]:
    checks = ScanChecks(subset, built.skipped, strict=strict)  # readable? complete? its mask?
    if subset.metadata_file is not None:
        scanned = scan_metadata_subset(subset, selector, built.skipped, problems, checks=checks)
        problems.extend(checks.problems())
        built.warnings.extend(checks.warnings())
        return [
            ImageItem(s.path, s.caption, index, False, subset.num_repeats, s.size, s.assignment, tags=s.tags)
            for s in scanned
        ]
    files = list_image_files(subset.image_dir)
    if not files:
        problems.append(
            f"no images in {subset.image_dir} (looked for {' '.join(IMAGE_EXTENSIONS)}; sub-folders are not "
            "searched); add images or remove this folder from the dataset"
        )
        return []
    items, uncaptioned, with_file = [], [], 0
    for path in files:
        checked = checks.check(path)
        if checked is None:
            continue
        size, mask_path = checked
        try:
            assignment = selector.select(*size)
        except ImageTooSmallError as e:
            built.skipped.append((path, str(e)))
            continue
        try:
            caption = read_caption(path, subset.caption_extension, all_lines=subset.enable_wildcard)
        except UserError as e:
            problems.extend(e.problems)
            continue
        with_file += caption is not None
        if caption is None:
            caption = subset.class_tokens
        if caption is None:
            uncaptioned.append(path)
            continue
        items.append(
            ImageItem(
                path, caption, index, subset.is_reg, subset.num_repeats, size, assignment, mask_path=mask_path
            )
        )
    problems.extend(checks.problems())
    built.warnings.extend(checks.warnings())
    if uncaptioned:
        names = ", ".join(p.name for p in uncaptioned[:3]) + (" ..." if len(uncaptioned) > 3 else "")
        problems.append(
            f"{len(uncaptioned)} image(s) in {subset.image_dir} have no caption file "
            f"({subset.caption_extension}) and the folder has no class_tokens: {names}"
            + _caption_fix_hint(uncaptioned[0], subset)
        )
    if items and not with_file:
        warning = caption_extension_warning(files, subset.caption_extension, subset.class_tokens)
        if warning:
            built.warnings.append(f"{subset.image_dir}: {warning}")
    return items


def _split_subset(
    spec: DatasetSpec, subset: SubsetSpec, items: list[ImageItem], built: BuiltDataset, seed: int
) -> list[ImageItem]:
    """The training part of a subset; its validation part (never of a reg subset) goes to `built`."""
    split = 0.0 if subset.is_reg else spec.validation_split
    train, held = split_train_validation(
        items, split, spec.validation_seed if spec.validation_seed is not None else seed
    )
    for item in held:
        item.num_repeats = 1  # kohya: repeats do not apply to validation
    built.validation_items += held
    built.subset_image_counts.append(len(train))
    built.validation_image_counts.append(len(held))
    # kohya counts a folder's captions under its name, but only a metadata file's tags under the file name.
    name = (subset.metadata_file or subset.image_dir).name
    texts = [i.tags or "" for i in train] if subset.metadata_file else [i.caption for i in train]
    tags = built.tag_frequency.setdefault(name, {})
    for tag, count in count_tags(texts).items():
        tags[tag] = tags.get(tag, 0) + count
    return train


def bucket_members(items: list[ImageItem]) -> list[tuple[tuple[int, int], list[int]]]:
    """Bucket resolution -> item indices, each index once per repeat."""
    by_bucket: dict[tuple[int, int], list[int]] = {}
    for index, item in enumerate(items):
        by_bucket.setdefault(item.bucket, []).extend([index] * item.num_repeats)
    return sorted(by_bucket.items())


def _balance_reg(reg: list[ImageItem], built: BuiltDataset) -> list[ImageItem]:
    """kohya: register reg images in order until their repeats reach the train total, then add repeats."""
    if not reg:
        return []
    target = built.num_train_images
    used, total = [], 0
    for item in reg:
        used.append(item)
        total += item.num_repeats
        if total >= target:
            break
    if len(used) < len(reg):
        built.notes.append(
            f"{len(reg) - len(used)} of {len(reg)} regularization images are not used: {len(used)} already "
            f"match the {target} training images (with repeats)"
        )
    if total < target:
        before = total
        while total < target:
            for item in used:
                item.num_repeats += 1
                total += 1
                if total >= target:
                    break
        built.notes.append(
            f"regularization repeats raised from {before} to {total} to match the {target} training images"
        )
    return used


def _check_latent_grid(spec: DatasetSpec, where: str, latent_downscale: int, problems: list[str]) -> None:
    if spec.enable_bucket and spec.bucket_reso_steps % latent_downscale:
        problems.append(
            f"{where}: bucket_reso_steps {spec.bucket_reso_steps} must be a multiple of the model's latent "
            f"downscale factor {latent_downscale}"
        )
    if not spec.enable_bucket and any(r % latent_downscale for r in spec.resolution):
        problems.append(
            f"{where}: resolution {spec.resolution[0]}x{spec.resolution[1]} must be a multiple of "
            f"{latent_downscale} when enable_bucket is false"
        )


def build_dataset(
    spec: DatasetSpec,
    where: str,
    latent_downscale: int,
    seed: int,
    problems: list[str],
    *,
    strict: bool = False,
) -> BuiltDataset:
    selector = BucketSelector(
        spec.resolution,
        enable_bucket=spec.enable_bucket,
        min_reso=spec.min_bucket_reso,
        max_reso=spec.max_bucket_reso,
        steps=spec.bucket_reso_steps,
        no_upscale=spec.bucket_no_upscale,
    )
    built = BuiltDataset(spec, [], [], [], 0, 0)
    _check_latent_grid(spec, where, latent_downscale, problems)
    train: list[ImageItem] = []
    reg: list[ImageItem] = []
    for index, subset in enumerate(spec.subsets):
        items = _scan_subset(subset, index, selector, built, problems, strict=strict)
        (reg if subset.is_reg else train).extend(_split_subset(spec, subset, items, built, seed))
    built.num_train_images = sum(item.num_repeats for item in train)
    built.num_reg_images = sum(item.num_repeats for item in reg)
    if reg and not train:
        problems.append(f"{where} has only regularization images; add a training subset (is_reg = false)")
    built.items = train + _balance_reg(reg, built)
    if not built.items and built.skipped:
        reasons = "; ".join(f"{p.name}: {r}" for p, r in built.skipped[:3])
        dirs = ", ".join(str(s.image_dir) for s in spec.subsets)
        problems.append(f"{where}: every image in {dirs} was skipped ({reasons})")
    built.buckets = bucket_members(built.items)
    return built
