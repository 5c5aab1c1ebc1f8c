"""The dataset group: images scanned, captioned and bucketed; batches formed per bucket; seeded epochs.

Everything random is derived from (seed, epoch[, step]) through local `random.Random` instances, so a batch
can be rebuilt anywhere (a DataLoader worker, a resumed run) from its position alone:

* `batch_order(epoch)` shuffles the batch slots of all datasets together (kohya shuffles the concatenated
  datasets the same way through its DataLoader);
* each bucket's members (images x repeats) are reshuffled every epoch, so batch composition changes too;
* each sample of an epoch (one repeat of an image: a bucket member) has its own noise seed (`noise_seeds`
  in a batch): the training noise of a sample does not depend on the batch size, the process count or the
  step it lands in, so 2 processes x batch 1 train exactly like 1 process x batch 2;
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
from typing import Any

import torch

from library.data import plan
from library.data.captions import (
    StepSchedule,
    process_caption,
)
from library.data.dataset_config import DatasetSpec
from library.data.samples import load_or_replace, stack_masks
from library.data.scan import BuiltDataset, ImageItem, bucket_members, build_dataset
from library.data.sharing import stable_seed
from library.errors import UserError


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
        build_dataset(spec, f"dataset {i + 1}", latent_downscale, seed, problems, strict=strict_dataset)
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
            BuiltDataset(ds.spec, ds.validation_items, bucket_members(ds.validation_items),
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
            for b, (_, slots) in enumerate(ds.buckets):
                shuffled = list(slots)
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
        order, members = self._epoch(epoch)
        d, bucket, chunk = self._slots[order[step_in_epoch]]
        shuffled, size = members[(d, bucket)], ds.spec.batch_size
        # A sample is one repeat of an image: (item index, how many of its repeats the shuffle put before it).
        samples = [
            (shuffled[p], shuffled[:p].count(shuffled[p]))
            for p in range(chunk * size, min((chunk + 1) * size, len(shuffled)))
        ]
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
            "noise_seeds": [noise_seed(self.seed, epoch, d, item, repeat) for item, repeat in samples],
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


def noise_seed(seed: int, epoch: int, dataset: int, item: int, repeat: int) -> int:
    """The seed of one sample's training noise and timestep in this epoch: the sample is one repeat of an
    image (the dataset's item), named without the batch it landed in. A 63-bit int (for manual_seed)."""
    return stable_seed(f"{seed}/{epoch}/{dataset}/{item}/{repeat}")
