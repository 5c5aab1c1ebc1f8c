"""Latent caching: encode every image once (per bucket, in batches) and serve latents instead of pixels.

The encoder is a plain callable (pixels in [-1, 1] -> unscaled latents), so this module knows no model
family; the cache id names the encoder (`encoder_cache_id`) so a cache from another VAE is not reused.
Disk caches record what they depend on (see latent_npz.py) and are rebuilt when any of it changes. The
caller names the family's file suffix (`_sd`, `_sdxl`, `_flux`) and whether its files hold several
resolutions (kohya's FLUX files: keys end with the latent size, see latent_npz.py).

Random pixel augmentations (random_crop, color_aug, face_crop_aug_range) cannot be cached: one frozen
sample would replace the augmentation. `cache_problems` reports them before any weights load.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from library.data.images import LoadedImage, PixelOptions, UnreadableImage, load_image
from library.data.latent_npz import (
    LatentDeps,
    file_stamp,
    is_valid_npz,
    key_suffix,
    latent_hw,
    latents_npz_path,
    write_npz,
)
from library.data.sharing import ALONE, Share, seeded_rng, stable_seed
from library.errors import UserError

if TYPE_CHECKING:
    from library.data.dataset import DatasetGroup
    from library.data.dataset_config import SubsetSpec
    from library.data.scan import BuiltDataset, ImageItem

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CacheReport:
    """How many images were served from an existing cache, encoded now, or found unreadable (skipped)."""

    reused: int
    encoded: int
    to_disk: bool
    unreadable: int = 0
    encoded_here: int | None = None  # several processes: how many this one encoded

    def __str__(self) -> str:
        where = "disk" if self.to_disk else "RAM"
        bad = f", {self.unreadable} unreadable (skipped)" if self.unreadable else ""
        here = f" ({self.encoded_here} by this process)" if self.encoded_here is not None else ""
        return f"latent cache ({where}): {self.encoded} encoded{here}, {self.reused} reused{bad}"


def encoder_cache_id(encoder_name: str, weights: Path) -> str:
    """An id for the encoder's weights: name, size and mtime of the file (or of a folder's files).

    Cheap (no hashing of gigabytes) and changes whenever the weights file is replaced.
    """
    weights = Path(weights)
    if weights.is_dir():
        folder = weights / "vae" if (weights / "vae").is_dir() else weights
        files = sorted(p for p in folder.iterdir() if p.is_file())
    else:
        files = [weights] if weights.exists() else []
    stamps = repr([(p.name, *file_stamp(p)) for p in files])
    return f"{encoder_name}:{weights.name}:{hashlib.sha256(stamps.encode()).hexdigest()[:12]}"


def cache_problems(subsets: Iterable[SubsetSpec], flag: str = "--cache_latents") -> list[str]:
    """One line per subset option that latent caching cannot honour (kohya asserts on the first two)."""
    problems = []
    for subset in subsets:
        for option, value in (
            ("random_crop", subset.random_crop),
            ("color_aug", subset.color_aug),
            ("face_crop_aug_range", subset.face_crop_aug_range),
        ):
            if value:
                shown = "true" if value is True else f"[{value[0]}, {value[1]}]"
                problems.append(
                    f"{flag} is not compatible with {option}: subset {subset.image_dir} has {option} = {shown} "
                    f"(a cached latent would freeze one augmented sample); remove {option} or {flag}"
                )
    return problems


@dataclass
class _Job:
    """One image to cache, shared by every item (dataset) that uses it at the same bucket and resampling."""

    items: list[ImageItem]
    interpolation: str | None
    need_flipped: bool
    mask_source: str | None
    mask_path: Path | None
    npz: Path | None
    multi_resolution: bool = False  # npz keys carry the latent size; other resolutions share the file

    @property
    def first(self) -> ImageItem:
        return self.items[0]

    def deps(self, cache_id: str) -> LatentDeps:
        item = self.first
        assignment = item.assignment
        return LatentDeps(
            cache_id=cache_id,
            image_file=file_stamp(item.path),
            original_size=item.original_size,
            bucket=item.bucket,
            pixel_crop=(*assignment.resized_size, assignment.crop_left, assignment.crop_top),
            crop_ltrb=item.crop_ltrb,
            resize_interpolation=self.interpolation or "auto",
            mask_source=self.mask_source,
        )


def _mask_source(item: ImageItem, subset: SubsetSpec) -> str | None:
    if item.mask_path is not None:
        size, mtime = file_stamp(item.mask_path)
        return f"file:{item.mask_path.name}:{size}:{mtime}"
    return "alpha" if subset.alpha_mask else None


def _collect_jobs(
    group: DatasetGroup, to_disk: bool, file_suffix: str, multi_resolution: bool = False
) -> list[_Job]:
    jobs: dict[tuple[Path, tuple[int, int], str | None], _Job] = {}
    problems: list[str] = []
    for ds, item in _cacheable_items(group):
        subset = ds.subset(item)
        key = (item.path, item.bucket, subset.resize_interpolation)
        try:
            mask = _mask_source(item, subset)
        except OSError:  # the mask file vanished after the scan: encoding will report it
            mask = f"file:{item.mask_path}"
        job = jobs.get(key)
        if job is None:
            npz = latents_npz_path(item.path, item.original_size, file_suffix) if to_disk else None
            jobs[key] = _Job([item], key[2], subset.flip_aug, mask, item.mask_path, npz, multi_resolution)
            continue
        job.items.append(item)
        job.need_flipped |= subset.flip_aug
        if job.mask_source is None:
            job.mask_source, job.mask_path = mask, item.mask_path
        elif mask is not None and mask != job.mask_source:
            problems.append(f"{item.path} has two different masks (alpha_mask and a mask file); use one")
    if to_disk:
        problems += _shared_file_problems(list(jobs.values()), group.latent_downscale, multi_resolution)
    if problems:
        raise UserError(*problems)
    return list(jobs.values())


def _shared_file_problems(jobs: list[_Job], downscale: int, multi_resolution: bool) -> list[str]:
    """A disk file holds one latent per image, or one per latent size in multi-resolution files."""
    per_slot: dict[tuple[Path, str], list[_Job]] = {}
    for job in jobs:
        slot = key_suffix(job.first.bucket, downscale, multi_resolution)
        per_slot.setdefault((job.npz, slot), []).append(job)
    problems = []
    for (npz, _), shared in per_slot.items():
        if len(shared) < 2:
            continue
        settings = ", ".join(
            f"{j.first.bucket[0]}x{j.first.bucket[1]} {j.interpolation or 'auto'}" for j in shared
        )
        if multi_resolution:
            problems.append(
                f"{shared[0].first.path} is used with {len(shared)} resize_interpolation values at one bucket "
                f"size ({settings}) but its disk cache file {npz.name} holds one latent per size; cache latents "
                "in RAM or use one interpolation for this folder"
            )
        else:
            problems.append(
                f"{shared[0].first.path} is used at {len(shared)} bucket sizes or resize_interpolation "
                f"values ({settings}) but its disk cache file {npz.name} holds one; cache latents in RAM or "
                "use one resolution and interpolation for this folder"
            )
    return problems


def _cacheable_items(group: DatasetGroup) -> Iterable[tuple[BuiltDataset, ImageItem]]:
    return ((ds, item) for ds, item in group.iter_items() if item.unusable is None)


def _ram_reusable(job: _Job, cache_id: str) -> bool:
    return all(
        i.latents is not None
        and i.latents_cache_id == cache_id
        and (i.latents_flipped is not None or not job.need_flipped)
        and (i.cached_mask is not None or job.mask_source is None)
        for i in job.items
    )


def _disk_reusable(job: _Job, cache_id: str, downscale: int, skip_check: bool) -> bool:
    try:
        deps = job.deps(cache_id)
    except OSError:  # the image vanished after the scan: encoding will report it
        return False
    return is_valid_npz(
        job.npz,
        deps,
        downscale=downscale,
        need_flipped=job.need_flipped,
        skip_check=skip_check,
        multi_resolution=job.multi_resolution,
    )


def check_latent_cache(
    group: DatasetGroup,
    cache_id: str,
    file_suffix: str = "_sd",
    skip_check: bool = False,
    multi_resolution: bool = False,
) -> tuple[int, int]:
    """(hits, misses) of the disk cache for every image of the group, without encoding or changing anything.

    Reads only npz headers and small keys (see latent_npz.py), so a dry run can report it cheaply.
    """
    hits = misses = 0
    for job in _collect_jobs(group, True, file_suffix, multi_resolution):
        if _disk_reusable(job, cache_id, group.latent_downscale, skip_check):
            hits += 1
        else:
            misses += 1
    return hits, misses


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


def _store(
    job: _Job, latents: torch.Tensor, flipped: torch.Tensor | None, mask: torch.Tensor | None, cache_id: str
) -> None:
    if job.npz is not None:
        write_npz(
            job.npz,
            latents,
            job.deps(cache_id),
            latents_flipped=flipped,
            alpha_mask=mask,
            multi_resolution=job.multi_resolution,
        )
    for target in job.items:
        # clone: a slice would keep (and pickle) the whole batch's storage
        in_ram = job.npz is None
        target.latents = latents.clone() if in_ram else None
        target.latents_flipped = flipped.clone() if in_ram and flipped is not None else None
        target.cached_mask = mask if in_ram else None
        target.latents_npz = job.npz
        target.latents_npz_multi_resolution = job.multi_resolution
        target.latents_cache_id = cache_id


def _use_disk_file(job: _Job, cache_id: str) -> None:
    for target in job.items:
        target.latents, target.latents_flipped, target.cached_mask = None, None, None
        target.latents_npz, target.latents_cache_id = job.npz, cache_id
        target.latents_npz_multi_resolution = job.multi_resolution


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


def _load(job: _Job, group: DatasetGroup) -> LoadedImage | None:
    """The job's pixels (centre crop, no augmentation) and mask; None when unreadable (items marked)."""
    item = job.first
    options = PixelOptions(resize_interpolation=job.interpolation, alpha_mask=job.mask_source == "alpha")
    try:
        return load_image(item.path, item.assignment, options, mask_path=job.mask_path)
    except UnreadableImage as e:
        if group.strict:
            raise UserError(e.user_message()) from None
        logger.warning("%s; skipping it (another image of its bucket is used in its place)", e)
        for target in job.items:
            target.unusable = e.reason
        return None


def cache_latents(
    group: DatasetGroup,
    encode: Callable[[torch.Tensor], torch.Tensor],
    *,
    cache_id: str,
    to_disk: bool,
    batch_size: int,
    file_suffix: str = "_sd",
    multi_resolution: bool = False,
    skip_check: bool = False,
    show_progress: bool = True,
    share: Share = ALONE,
    seed: int | None = None,
) -> CacheReport:
    """Make every image of the group served as latents; reuse valid disk files (or RAM latents).

    `encode` maps float32 CPU pixels [B, 3, H, W] in [-1, 1] to unscaled latents [B, C, H/d, W/d]
    (d = the group's latent_downscale) and handles device and dtype itself. Raises UserError when a subset
    uses a random augmentation (see `cache_problems`) or a cache file cannot be written. An image that fails
    to decode is skipped with a warning (an error with the group's `strict`). Disk files are named
    `<stem>_<W>x<H><file_suffix>.npz`; for `multi_resolution` see the module docstring.

    Several processes (`share`): encoding batch i falls to process i % world; after each round the processes
    exchange what they did (with `to_disk` only which files they wrote, in RAM the latents themselves), so
    every process ends with every image served. `seed`: each encoding batch runs with the global RNG seeded
    from its images (see `seeded_rng`), so a sampling VAE gives the same latents however the work is split.
    """
    if batch_size < 1:
        raise UserError(f"--vae_batch_size must be >= 1, got {batch_size}")
    problems = cache_problems(s for ds in group.datasets for s in ds.spec.subsets)
    if problems:
        raise UserError(*problems)
    pending: list[_Job] = []
    reused = 0
    for job in _collect_jobs(group, to_disk, file_suffix, multi_resolution):
        if job.npz is not None:
            valid = _disk_reusable(job, cache_id, group.latent_downscale, skip_check)
            if valid:
                _use_disk_file(job, cache_id)
        else:
            valid = _ram_reusable(job, cache_id)
        if valid:
            reused += 1
        else:
            pending.append(job)
    share.barrier()  # every process has judged the existing files before any process writes one
    progress = None
    if show_progress and pending and share.rank == 0:
        from tqdm import tqdm

        progress = tqdm(total=len(pending), desc="caching latents", unit="img")
    batches = _batches(pending, batch_size)
    unreadable = encoded_here = 0
    for start, mine in share.rounds(len(batches)):
        outcome = [] if mine is None else _encode_batch(batches[mine], group, encode, cache_id, seed)
        encoded_here += sum(reason is None for reason, _ in outcome)
        for index, outcomes in enumerate(share.gather(outcome), start):
            if index >= len(batches):
                break  # the last round: a process without a batch
            unreadable += sum(reason is not None for reason, _ in outcomes)
            if index != mine:
                _take_remote(batches[index], outcomes, cache_id)
            if progress is not None:
                progress.update(len(batches[index]))
    if progress is not None:
        progress.close()
    return CacheReport(
        reused=reused,
        encoded=len(pending) - unreadable,
        to_disk=to_disk,
        unreadable=unreadable,
        encoded_here=encoded_here if share.world > 1 else None,
    )


# Per job of a batch: (None, (latents, flipped, mask) or None when written to disk), or (reason, None) for
# an unreadable image.
Outcome = list[tuple[str | None, tuple | None]]


def _encode_batch(
    batch: list[_Job],
    group: DatasetGroup,
    encode: Callable[[torch.Tensor], torch.Tensor],
    cache_id: str,
    seed: int | None,
) -> Outcome:
    loaded = [(job, _load(job, group)) for job in batch]
    readable = [(job, image) for job, image in loaded if image is not None]
    results: dict[int, tuple | None] = {}
    if readable:
        bucket = batch[0].first.bucket
        pixels = torch.stack([image.pixels for _, image in readable])
        # File names, not paths: the same images draw the same latents wherever the dataset lives (two
        # images sharing a name would only share a seed).
        key = "|".join(f"{job.first.path.name}:{job.first.bucket}" for job, _ in readable)
        with seeded_rng(None if seed is None else stable_seed(f"{seed}/{key}")):
            latents = _encode(encode, pixels, bucket, group.latent_downscale)
            flipped = None
            if batch[0].need_flipped:
                flipped = _encode(encode, torch.flip(pixels, dims=[3]), bucket, group.latent_downscale)
        for i, (job, image) in enumerate(readable):
            one = (latents[i], None if flipped is None else flipped[i], image.mask)
            _store(job, *one, cache_id)
            # Disk: the others read the file. RAM: copies, as a row of the batch would pickle the whole batch.
            results[id(job)] = None if job.npz is not None else tuple(_copy(t) for t in one)
    return [
        (None, results[id(job)]) if image is not None else (job.first.unusable, None) for job, image in loaded
    ]


def _copy(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.clone()


def _take_remote(batch: list[_Job], outcomes: Outcome, cache_id: str) -> None:
    """Apply another process's results for `batch` to this process's items."""
    for job, (reason, latents) in zip(batch, outcomes, strict=True):
        if reason is not None:
            for target in job.items:
                target.unusable = reason
        elif latents is not None:
            _store(job, *latents, cache_id)
        elif job.npz is not None and job.npz.is_file():
            _use_disk_file(job, cache_id)
        else:
            raise UserError(
                f"{job.npz}: another process wrote this latent cache file but it is not visible here; "
                "caching to disk with several machines needs the dataset on a filesystem they share (or "
                "use --cache_latents)"
            )
