"""Latent caching: encode every image once (per bucket, in batches) and serve latents instead of pixels.

The encoder is a plain callable (pixels in [-1, 1] -> unscaled latents), so this module knows no model
family; the cache id names the encoder (e.g. a VAE hash) so a cache from another VAE is not reused.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from library.data.images import load_image_tensor
from library.data.latent_npz import is_valid_npz, latent_hw, latents_npz_path, write_npz
from library.errors import UserError

if TYPE_CHECKING:
    from library.data.dataset import DatasetGroup, ImageItem


@dataclass(frozen=True)
class CacheReport:
    """How many images were served from an existing cache and how many were encoded now."""

    reused: int
    encoded: int
    to_disk: bool

    def __str__(self) -> str:
        where = "disk" if self.to_disk else "RAM"
        return f"latent cache ({where}): {self.encoded} encoded, {self.reused} reused"


@dataclass
class _Job:
    """One image to cache, shared by every item (dataset) that uses it at the same bucket."""

    items: list[ImageItem]
    need_flipped: bool
    npz: Path | None

    @property
    def first(self) -> ImageItem:
        return self.items[0]


def _check_cacheable(group: DatasetGroup) -> None:
    problems = [
        f"cache_latents is not compatible with random_crop: subset {subset.image_dir} has random_crop = true; "
        "set random_crop = false or do not cache latents"
        for ds in group.datasets
        for subset in ds.spec.subsets
        if subset.random_crop
    ]
    if problems:
        raise UserError(*problems)


def _collect_jobs(group: DatasetGroup, to_disk: bool, file_suffix: str) -> list[_Job]:
    jobs: dict[tuple[Path, tuple[int, int]], _Job] = {}
    buckets_per_path: dict[Path, set[tuple[int, int]]] = {}
    for ds, item in group.iter_items():
        flip = ds.subset(item).flip_aug
        job = jobs.get((item.path, item.bucket))
        if job is None:
            npz = latents_npz_path(item.path, item.original_size, file_suffix) if to_disk else None
            jobs[(item.path, item.bucket)] = _Job([item], flip, npz)
        else:
            job.items.append(item)
            job.need_flipped |= flip
        buckets_per_path.setdefault(item.path, set()).add(item.bucket)
    if to_disk:
        clashes = [(p, b) for p, b in buckets_per_path.items() if len(b) > 1]
        if clashes:
            raise UserError(
                *(
                    f"{p} is used at {len(b)} bucket sizes ({', '.join(f'{w}x{h}' for w, h in sorted(b))}) but a "
                    "disk cache file holds one; cache latents in RAM or use one resolution for this folder"
                    for p, b in clashes
                )
            )
    return list(jobs.values())


def _ram_reusable(job: _Job, cache_id: str) -> bool:
    return all(
        i.latents is not None
        and i.latents_cache_id == cache_id
        and (i.latents_flipped is not None or not job.need_flipped)
        for i in job.items
    )


def _encode(
    encode: Callable[[torch.Tensor], torch.Tensor],
    pixels: torch.Tensor,
    bucket: tuple[int, int],
    downscale: int,
) -> torch.Tensor:
    with torch.no_grad():
        latents = encode(pixels)
    expected = latent_hw(bucket, downscale)
    if latents.ndim != 4 or latents.shape[0] != pixels.shape[0] or tuple(latents.shape[2:]) != expected:
        raise ValueError(
            f"encode returned shape {tuple(latents.shape)} for pixels {tuple(pixels.shape)}; expected "
            f"[{pixels.shape[0]}, C, {expected[0]}, {expected[1]}] (latent_downscale {downscale})"
        )
    return latents.detach().to("cpu", torch.float32)


def _store(job: _Job, latents: torch.Tensor, flipped: torch.Tensor | None, cache_id: str) -> None:
    item = job.first
    if job.npz is not None:
        write_npz(
            job.npz,
            latents,
            original_size=item.original_size,
            crop_ltrb=item.crop_ltrb,
            cache_id=cache_id,
            latents_flipped=flipped,
        )
    for target in job.items:
        # clone: a slice would keep (and pickle) the whole batch's storage
        target.latents = None if job.npz is not None else latents.clone()
        target.latents_flipped = None if job.npz is not None or flipped is None else flipped.clone()
        target.latents_npz = job.npz
        target.latents_cache_id = cache_id


def _batches(pending: list[_Job], batch_size: int) -> list[list[_Job]]:
    """Consecutive jobs with the same bucket and flip need, at most batch_size each (kohya's grouping)."""
    pending = sorted(
        pending, key=lambda j: (j.first.bucket[0] * j.first.bucket[1], j.first.bucket, j.need_flipped)
    )
    batches: list[list[_Job]] = []
    for job in pending:
        last = batches[-1] if batches else None
        same = last and last[0].first.bucket == job.first.bucket and last[0].need_flipped == job.need_flipped
        if last and same and len(last) < batch_size:
            last.append(job)
        else:
            batches.append([job])
    return batches


def cache_latents(
    group: DatasetGroup,
    encode: Callable[[torch.Tensor], torch.Tensor],
    *,
    cache_id: str,
    to_disk: bool,
    batch_size: int,
    file_suffix: str = "_sd",
    skip_check: bool = False,
    show_progress: bool = True,
) -> CacheReport:
    """Make every image of the group served as latents; reuse valid disk files (or RAM latents).

    `encode` maps float32 CPU pixels [B, 3, H, W] in [-1, 1] to unscaled latents [B, C, H/d, W/d]
    (d = the group's latent_downscale) and handles device and dtype itself. Raises UserError when a subset
    uses random_crop (a cached crop would be frozen) or a cache file cannot be written.
    """
    if batch_size < 1:
        raise UserError(f"--vae_batch_size must be >= 1, got {batch_size}")
    _check_cacheable(group)
    downscale = group.latent_downscale
    pending: list[_Job] = []
    reused = 0
    for job in _collect_jobs(group, to_disk, file_suffix):
        item = job.first
        if job.npz is not None:
            valid = is_valid_npz(
                job.npz,
                bucket=item.bucket,
                downscale=downscale,
                original_size=item.original_size,
                crop_ltrb=item.crop_ltrb,
                need_flipped=job.need_flipped,
                cache_id=cache_id,
                skip_check=skip_check,
            )
            if valid:
                for target in job.items:
                    target.latents, target.latents_flipped = None, None
                    target.latents_npz, target.latents_cache_id = job.npz, cache_id
        else:
            valid = _ram_reusable(job, cache_id)
        if valid:
            reused += 1
        else:
            pending.append(job)
    progress = None
    if show_progress and pending:
        from tqdm import tqdm

        progress = tqdm(total=len(pending), desc="caching latents", unit="img")
    for batch in _batches(pending, batch_size):
        bucket, need_flipped = batch[0].first.bucket, batch[0].need_flipped
        pixels = torch.stack([load_image_tensor(j.first.path, j.first.assignment) for j in batch])
        latents = _encode(encode, pixels, bucket, downscale)
        flipped = _encode(encode, torch.flip(pixels, dims=[3]), bucket, downscale) if need_flipped else None
        for i, job in enumerate(batch):
            _store(job, latents[i], None if flipped is None else flipped[i], cache_id)
        if progress is not None:
            progress.update(len(batch))
    if progress is not None:
        progress.close()
    return CacheReport(reused=reused, encoded=len(pending), to_disk=to_disk)
