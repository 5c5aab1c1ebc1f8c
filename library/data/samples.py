"""One sample of a batch: cached latents (RAM or disk) or decoded pixels, plus its loss mask.

Also the two places where images can turn out unusable:

* at scan time (`probe_image`): the file is skipped and listed in the plan, or, with --strict_dataset, an
  error; masks from a `conditioning_data_dir` are matched and checked here too (`MaskFolder`);
* at load time (damage inside a file whose header and end looked fine): the batch takes the next readable
  image of the same bucket instead, with one warning per file, so an epoch never dies half-way; with
  --strict_dataset it is a one-line error.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from library.data.images import UnreadableImage, list_image_files, load_image, probe_image
from library.data.latent_npz import read_cached
from library.errors import UserError

if TYPE_CHECKING:
    from library.data.dataset_config import SubsetSpec
    from library.data.scan import BuiltDataset, ImageItem

logger = logging.getLogger(__name__)
_MAX_LISTED = 5


class MaskFolder:
    """A subset's conditioning_data_dir: mask images matched to images by file stem, as kohya does."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.by_stem = {p.stem: p for p in list_image_files(folder)}
        self.missing: list[Path] = []
        self.wrong_size: list[str] = []

    def match(self, image: Path, size: tuple[int, int]) -> Path | None:
        """The image's mask; None (and noted for `problems`) when missing or of another size.

        Raises UnreadableImage (for the mask's path) when the mask cannot be read.
        """
        mask = self.by_stem.get(image.stem)
        if mask is None:
            self.missing.append(image)
            return None
        mask_size = probe_image(mask)
        if mask_size != size:
            self.wrong_size.append(
                f"mask {mask} is {mask_size[0]}x{mask_size[1]} but its image {image.name} is {size[0]}x{size[1]}; "
                "a mask must have its image's size"
            )
            return None
        return mask

    def problems(self) -> list[str]:
        lines = []
        if self.missing:
            names = ", ".join(p.name for p in self.missing[:3]) + (" ..." if len(self.missing) > 3 else "")
            lines.append(
                f"{len(self.missing)} image(s) have no mask in {self.folder} (conditioning_data_dir; a mask "
                f"has its image's name, any image extension): {names}"
            )
        lines += self.wrong_size[:_MAX_LISTED]
        if len(self.wrong_size) > _MAX_LISTED:
            lines.append(
                f"{len(self.wrong_size) - _MAX_LISTED} more masks in {self.folder} have the wrong size"
            )
        return lines


class ScanChecks:
    """Scan-time checks of one image folder: each image readable and complete, and matched to its mask when
    the subset has a mask folder. Unreadable files go to `skipped` (the plan lists them) or, when `strict`,
    become problems."""

    def __init__(self, subset: SubsetSpec, skipped: list[tuple[Path, str]], *, strict: bool) -> None:
        self.image_dir = subset.image_dir
        self.masks = MaskFolder(subset.conditioning_data_dir) if subset.conditioning_data_dir else None
        self.skipped = skipped
        self.strict = strict
        self.unreadable: list[str] = []
        self.skips = 0

    def check(self, image: Path) -> tuple[tuple[int, int], Path | None] | None:
        """(size, mask path) of a usable image, else None (skipped, or noted for `problems`)."""
        try:
            size = probe_image(image)
            mask = self.masks.match(image, size) if self.masks else None
        except UnreadableImage as e:
            if self.strict:
                self.unreadable.append(e.user_message())
            else:
                reason = "unreadable" if e.path == image else f"its mask {e.path} is unreadable"
                self.skipped.append((image, f"{reason} ({e.reason})"))
                self.skips += 1
            return None
        if self.masks and mask is None:
            return None
        return size, mask

    def problems(self) -> list[str]:
        lines = self.masks.problems() if self.masks else []
        lines += self.unreadable[:_MAX_LISTED]
        if len(self.unreadable) > _MAX_LISTED:
            extra = len(self.unreadable) - _MAX_LISTED
            lines.append(f"{extra} more unreadable images in {self.image_dir}; fix or remove them")
        return lines

    def warnings(self) -> list[str]:
        if not self.skips:
            return []
        return [
            f"{self.image_dir}: {self.skips} unreadable image(s) skipped (listed below); --strict_dataset makes "
            "this an error"
        ]


@dataclass
class Sample:
    """Exactly one of pixels (float32 [3, H, W]) and latents is set; mask is float32 [1, H, W] in [0, 1]."""

    pixels: torch.Tensor | None
    latents: torch.Tensor | None
    mask: torch.Tensor | None


def wants_mask(item: ImageItem, subset: SubsetSpec) -> bool:
    return subset.alpha_mask or item.mask_path is not None


def _as_float(mask: torch.Tensor, flip: bool) -> torch.Tensor:
    mask = mask.unsqueeze(0).to(torch.float32).div_(255.0)
    return mask.flip(-1) if flip else mask


def load_sample(
    item: ImageItem, subset: SubsetSpec, *, flip: bool, rng: random.Random, downscale: int
) -> Sample:
    """Latents from the RAM or disk cache, else pixels (augmented per the subset). Raises UnreadableImage."""
    if item.unusable is not None:
        raise UnreadableImage(item.path, item.unusable)
    mask_wanted = wants_mask(item, subset)
    if item.latents is not None:
        latents = item.latents_flipped if flip else item.latents
        if latents is None or (mask_wanted and item.cached_mask is None):
            missing = "flipped latents" if latents is None else "mask"
            raise RuntimeError(f"{missing} missing for {item.path}; re-run latent caching")
        mask = _as_float(item.cached_mask, flip) if mask_wanted else None
        return Sample(None, latents, mask)
    if item.latents_npz is not None:
        latents, mask = read_cached(
            item.latents_npz,
            item.bucket,
            downscale,
            flipped=flip,
            mask=mask_wanted,
            multi_resolution=item.latents_npz_multi_resolution,
        )
        return Sample(None, latents, mask)
    loaded = load_image(
        item.path, item.assignment, subset.pixel_options, flip=flip, rng=rng, mask_path=item.mask_path
    )
    return Sample(loaded.pixels, None, None if loaded.mask is None else _as_float(loaded.mask, False))


def _next_usable(
    ds: BuiltDataset, bucket_members: list[int], failed: ImageItem, tried: set[int]
) -> ImageItem | None:
    """The next image of the bucket after `failed` (cyclic, fixed order) not known to be unreadable."""
    indices = list(dict.fromkeys(bucket_members))
    start = next(n for n, i in enumerate(indices) if ds.items[i] is failed)
    for i in indices[start + 1 :] + indices[:start]:
        candidate = ds.items[i]
        if candidate.unusable is None and id(candidate) not in tried:
            return candidate
    return None


def load_or_replace(
    ds: BuiltDataset,
    bucket_members: list[int],
    item: ImageItem,
    rng: random.Random,
    *,
    downscale: int,
    strict: bool,
) -> tuple[ImageItem, bool, Sample]:
    """(the item actually used, whether it is flipped, its sample); an unreadable image is replaced."""
    tried: set[int] = set()
    while True:
        subset = ds.subset(item)
        flip = subset.flip_aug and rng.random() < 0.5
        try:
            return item, flip, load_sample(item, subset, flip=flip, rng=rng, downscale=downscale)
        except UnreadableImage as e:
            if strict:
                raise UserError(e.user_message()) from None
            if item.unusable is None:
                item.unusable = e.reason
                logger.warning("%s; another image of its bucket is used in its place", e)
            tried.add(id(item))
            replacement = _next_usable(ds, bucket_members, item, tried)
            if replacement is None:
                w, h = item.bucket
                raise UserError(
                    f"no image of bucket {w}x{h} can be read (the last: {e}); fix or remove these images"
                ) from None
            item = replacement


def stack_masks(masks: list[torch.Tensor | None], size_hw: tuple[int, int]) -> torch.Tensor | None:
    """[B, 1, H, W] with all-ones rows for samples without a mask, or None when no sample has one."""
    if all(m is None for m in masks):
        return None
    ones = torch.ones(1, *size_hw)
    return torch.stack([ones if m is None else m for m in masks])
