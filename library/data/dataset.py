"""The dataset group: images scanned, captioned and bucketed; batches formed per bucket; seeded epochs.

Everything random is derived from (seed, epoch[, step]) through local `random.Random` instances, so a batch
can be rebuilt anywhere (a DataLoader worker, a resumed run) from its position alone:

* `batch_order(epoch)` shuffles the batch slots of all datasets together (kohya shuffles the concatenated
  datasets the same way through its DataLoader);
* each bucket's members (images x repeats) are reshuffled every epoch, so batch composition changes too;
* flips and random crops use a generator seeded from (seed, epoch, step); the caption pipeline (dropout,
  wildcards, shuffle, tag dropout) has its own, so toggling an augmentation does not change captions;
* token warmup and caption dropout per epoch need the training position: `set_training_steps` tells the
  group how batch positions map to optimizer steps (call it before DataLoader workers copy the group).

Counts follow kohya's metadata meaning: `num_train_images` and `num_reg_images` include repeats, and the reg
count is taken before balancing.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler, get_worker_info

from library.data import plan
from library.data.bucketing import BucketAssignment, BucketSelector, ImageTooSmallError, kohya_crop_ltrb
from library.data.captions import (
    StepSchedule,
    caption_extension_warning,
    count_tags,
    process_caption,
    read_caption,
)
from library.data.dataset_config import DatasetSpec, SubsetSpec
from library.data.finetune import scan_metadata_subset
from library.data.images import IMAGE_EXTENSIONS, list_image_files
from library.data.samples import ScanChecks, load_or_replace, stack_masks
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


def _buckets(items: list[ImageItem]) -> list[tuple[tuple[int, int], list[int]]]:
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


def _build_dataset(
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
    built.buckets = _buckets(built.items)
    return built


def build_dataset_group(
    specs: list[DatasetSpec],
    *,
    seed: int,
    prior_loss_weight: float = 1.0,
    latent_downscale: int = 8,
    strict_dataset: bool = False,
) -> DatasetGroup:
    """Scan every dataset (image headers and captions only) and form buckets. Raises UserError.

    Unreadable images are skipped (listed in the plan) or, with `strict_dataset`, errors; see samples.py.
    """
    problems: list[str] = []
    if not specs:
        raise UserError("no datasets to train on; give --dataset_config or --train_data_dir")
    datasets = [
        _build_dataset(spec, f"dataset {i + 1}", latent_downscale, seed, problems, strict=strict_dataset)
        for i, spec in enumerate(specs)
    ]
    if problems:
        raise UserError(*problems)
    return DatasetGroup(
        datasets,
        seed=seed,
        prior_loss_weight=prior_loss_weight,
        latent_downscale=latent_downscale,
        strict=strict_dataset,
    )


class DatasetGroup:
    """All datasets of a run, addressed by (epoch, step in epoch). Picklable for DataLoader workers."""

    def __init__(
        self,
        datasets: list[BuiltDataset],
        *,
        seed: int,
        prior_loss_weight: float,
        latent_downscale: int,
        shuffle: bool = True,
        strict: bool = False,
    ) -> None:
        self.datasets = datasets
        self.seed = seed
        self.strict = strict  # an image that fails to decode: error (True) or replaced by another (False)
        self.shuffle = shuffle  # False: batches in a fixed order (validation)
        self.prior_loss_weight = prior_loss_weight
        self.latent_downscale = latent_downscale
        # A slot is one batch position: (dataset, bucket, chunk). Its members change per epoch.
        self._slots = [
            (d, b, k)
            for d, ds in enumerate(datasets)
            for b, (_, members) in enumerate(ds.buckets)
            for k in range(-(-len(members) // ds.spec.batch_size))
        ]
        self._epoch_cache: tuple[int, list[int], dict[tuple[int, int], list[int]]] | None = None
        self.steps = StepSchedule(batches_per_epoch=len(self._slots))

    def set_training_steps(
        self, max_train_steps: int, *, gradient_accumulation_steps: int = 1, num_processes: int = 1
    ) -> None:
        """Where batches fall in training, for token warmup (fractional `token_warmup_step` needs the total)."""
        self.steps = StepSchedule(
            max_train_steps, len(self._slots), gradient_accumulation_steps, num_processes
        )

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_epoch_cache"] = None
        return state

    @property
    def num_batches_per_epoch(self) -> int:
        return len(self._slots)

    @property
    def num_train_images(self) -> int:
        return sum(ds.num_train_images for ds in self.datasets)

    @property
    def num_reg_images(self) -> int:
        return sum(ds.num_reg_images for ds in self.datasets)

    @property
    def num_validation_images(self) -> int:
        return sum(len(ds.validation_items) for ds in self.datasets)

    @property
    def latents_cached(self) -> bool:
        return all(
            i.latents is not None or i.latents_npz is not None or i.unusable for _, i in self.iter_items()
        )

    def latents_in_memory(self) -> bool:
        """True when every image is served from RAM latents (nothing left to decode or read per step)."""
        return all(i.latents is not None or i.unusable for _, i in self.iter_items())

    def validation(self) -> DatasetGroup | None:
        """The held-out images as a group of their own: no repeats, no reg images, batches in a fixed order
        (augmentations stay seeded by position); None when no dataset holds any out."""
        parts = [
            BuiltDataset(ds.spec, ds.validation_items, _buckets(ds.validation_items),
                         ds.validation_image_counts, len(ds.validation_items), 0)
            for ds in self.datasets
            if ds.validation_items
        ]  # fmt: skip
        if not parts:
            return None
        return DatasetGroup(
            parts,
            seed=self.seed,
            prior_loss_weight=self.prior_loss_weight,
            latent_downscale=self.latent_downscale,
            shuffle=False,
            strict=self.strict,
        )

    def iter_items(self) -> Iterator[tuple[BuiltDataset, ImageItem]]:
        """Every image once (not per repeat), with its dataset."""
        for ds in self.datasets:
            for item in ds.items:
                yield ds, item

    def _epoch(self, epoch: int) -> tuple[list[int], dict[tuple[int, int], list[int]]]:
        if self._epoch_cache is not None and self._epoch_cache[0] == epoch:
            return self._epoch_cache[1], self._epoch_cache[2]
        # A string seed is hashed with SHA-512 by `random`, so it is stable across processes and runs.
        rng = random.Random(f"{self.seed}/{epoch}")
        order = list(range(len(self._slots)))
        shuffle = rng.shuffle if self.shuffle else lambda _: None
        shuffle(order)
        members: dict[tuple[int, int], list[int]] = {}
        for d, ds in enumerate(self.datasets):
            for b, (_, bucket_members) in enumerate(ds.buckets):
                shuffled = list(bucket_members)
                shuffle(shuffled)
                members[(d, b)] = shuffled
        self._epoch_cache = (epoch, order, members)
        return order, members

    def batch_order(self, epoch: int) -> list[int]:
        """The order in which this epoch visits the batch slots; deterministic for (seed, epoch)."""
        return list(self._epoch(epoch)[0])

    def batch_items(self, epoch: int, step_in_epoch: int) -> tuple[BuiltDataset, list[ImageItem]]:
        """Dataset and items of the batch at this position."""
        if not 0 <= step_in_epoch < len(self._slots):
            raise IndexError(f"step_in_epoch {step_in_epoch} out of range 0..{len(self._slots) - 1}")
        order, members = self._epoch(epoch)
        d, b, k = self._slots[order[step_in_epoch]]
        ds = self.datasets[d]
        size = ds.spec.batch_size
        return ds, [ds.items[i] for i in members[(d, b)][k * size : (k + 1) * size]]

    def load_batch(self, epoch: int, step_in_epoch: int) -> dict[str, Any]:
        """Pixels or cached latents, processed captions and size conditioning for one batch."""
        ds, items = self.batch_items(epoch, step_in_epoch)
        _, bucket, _ = self._slots[self._epoch(epoch)[0][step_in_epoch]]
        rng = random.Random(f"{self.seed}/{epoch}/{step_in_epoch}")
        caption_rng = random.Random(f"{self.seed}/{epoch}/{step_in_epoch}/caption")
        global_step = self.steps.global_step(epoch, step_in_epoch)
        images, latents, masks, used, captions, flipped, originals, crops, targets = ([] for _ in range(9))
        for item in items:
            item, flip, sample = load_or_replace(
                ds, ds.buckets[bucket][1], item, rng, downscale=self.latent_downscale, strict=self.strict
            )
            subset = ds.subset(item)
            if sample.latents is not None:
                latents.append(sample.latents)
            else:
                images.append(sample.pixels)
            masks.append(sample.mask)
            used.append(item)
            captions.append(
                process_caption(
                    item.caption,
                    subset.caption_options,
                    caption_rng,
                    epoch=epoch + 1,  # kohya counts epochs from 1 (caption_dropout_every_n_epochs)
                    step=global_step,
                    max_train_steps=self.steps.max_train_steps,
                )
            )
            width, height = item.bucket
            left, top, right, _ = item.crop_ltrb
            # kohya: crop_ltrb is mirrored with the image, so a flipped crop starts at width - right.
            crops.append((int(top), int(width - right if flip else left)))
            originals.append((item.original_size[1], item.original_size[0]))
            targets.append((height, width))
            flipped.append(flip)
        if images and latents:
            raise RuntimeError("batch mixes cached and uncached images; cache latents for the whole group")
        weights = [self.prior_loss_weight if item.is_reg else 1.0 for item in used]
        return {
            "images": torch.stack(images) if images else None,
            "latents": torch.stack(latents).to(torch.float32) if latents else None,
            "masks": stack_masks(masks, (targets[0][0], targets[0][1])),  # [B, 1, H, W] in [0, 1], or None
            "captions": captions,
            "loss_weights": torch.tensor(weights, dtype=torch.float32),
            "original_sizes_hw": torch.tensor(originals, dtype=torch.int64),
            "crop_top_lefts": torch.tensor(crops, dtype=torch.int64),
            "target_sizes_hw": torch.tensor(targets, dtype=torch.int64),
            "flipped": flipped,
            "image_paths": [str(item.path) for item in used],
        }

    def plan_text(self, training: plan.TrainingNumbers | None = None, cache: str | None = None) -> str:
        """Human-readable table of datasets, buckets, batches, validation, skipped images and notes; with
        the training schedule and a latent-cache summary line when given."""
        return plan.plan_text(self.datasets, self.num_batches_per_epoch, training, cache, self.seed)

    def bucket_info(self) -> dict[str, Any]:
        """kohya ss_bucket_info: buckets of all datasets merged by resolution, and the mean AR error."""
        return plan.bucket_info(
            [item for _, item in self.iter_items()], [b for ds in self.datasets for b in ds.buckets]
        )

    def dataset_metadata(self) -> list[dict[str, Any]]:
        """kohya ss_datasets entries, one per dataset."""
        return [plan.dataset_metadata(ds) for ds in self.datasets]

    def dataset_dirs(self, *, reg: bool = False) -> dict[str, dict[str, int]]:
        """kohya ss_dataset_dirs (training folders) or, with `reg`, ss_reg_dataset_dirs."""
        return plan.dataset_dirs(self.datasets, reg=reg)

    def tag_frequency(self) -> dict[str, dict[str, int]]:
        """kohya ss_tag_frequency: per image folder name, tag counts of the raw captions."""
        return plan.tag_frequency(self.datasets)


class EpochBatchDataset(Dataset):
    """Map-style adapter: `dataset[(epoch, step_in_epoch)]` is `group.load_batch(epoch, step_in_epoch)`."""

    def __init__(self, group: DatasetGroup) -> None:
        self.group = group

    def __len__(self) -> int:
        return self.group.num_batches_per_epoch

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any] | FailedBatch:
        epoch, step = key
        try:
            return self.group.load_batch(epoch, step)
        except UserError as e:
            if get_worker_info() is None:
                raise
            return FailedBatch(tuple(e.problems))


@dataclass(frozen=True)
class FailedBatch:
    """What a DataLoader worker returns instead of raising a UserError (e.g. an image that fails to decode).

    The DataLoader re-raises a worker's exception with the worker's traceback pasted into its message, which
    would turn a one-line user error into a wall of text; `raise_if_failed` raises it cleanly instead.
    """

    problems: tuple[str, ...]


def raise_if_failed(batch: dict[str, Any] | FailedBatch) -> dict[str, Any]:
    """The batch from an EpochBatchDataset DataLoader, or the worker's UserError raised in this process."""
    if isinstance(batch, FailedBatch):
        raise UserError(*batch.problems)
    return batch


class EpochBatchSampler(Sampler):
    """Yields (epoch, step) for step in [start_step, num_batches): one epoch, resumable mid-way.

    Use with `DataLoader(EpochBatchDataset(group), batch_size=None, sampler=..., collate_fn=identity_collate)`.
    """

    def __init__(self, group: DatasetGroup, epoch: int, start_step: int = 0) -> None:
        self.num_batches = group.num_batches_per_epoch
        self.epoch = epoch
        self.start_step = start_step

    def __len__(self) -> int:
        return max(0, self.num_batches - self.start_step)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for step in range(self.start_step, self.num_batches):
            yield self.epoch, step


def identity_collate(batch: dict[str, Any]) -> dict[str, Any]:
    """Batches are formed inside the dataset, so the DataLoader must pass them through unchanged."""
    return batch
