"""kohya-compatible latent cache files: `<stem>_<WWWW>x<HHHH><suffix>.npz` next to each image.

Keys as kohya writes them: `latents` (C, h, w) float32, `original_size` [w, h], `crop_ltrb` [l, t, r, b],
optional `latents_flipped` and `alpha_mask` (H, W) float32 in [0, 1] at the bucket's pixel size. kohya
users can keep their caches: a file without our keys is reused when its shapes, sizes, crop, flipped
latents and mask match, which is all kohya itself checks.

We add keys recording everything else the latents depend on, so a cache we wrote is never stale:

* `cache_id`: the encoder (VAE) identity;
* `image_file`: [size in bytes, mtime in ns] of the image. A content hash would read every image in full at
  each start (minutes for a large dataset on a slow disk); size and mtime change whenever an image is
  edited or replaced, and a copy that resets the mtime only costs a rebuild, never a stale latent;
* `bucket_reso` [w, h] and `pixel_crop` [resized w, resized h, left, top]: the exact pixels that were encoded;
* `resize_interpolation`: the resampling filter ("auto" = kohya's default);
* `mask_source`: where `alpha_mask` came from ("alpha", or a mask file with its size and mtime).

A file holding more than needed (flipped latents or a mask nobody asks for) is still valid.

Multi-resolution files (kohya's FLUX `_flux.npz`): every key, ours included, ends with the latent size
`_<h>x<w>` (`latents_8x8`), so one image cached at several bucket sizes shares one file. Writing replaces
that resolution's keys and keeps the others; checking and reading look at the wanted resolution only.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from library.data.npz_io import save_npz_atomically
from library.errors import UserError

_KOHYA_KEYS = {"latents", "original_size", "crop_ltrb"}
# Every key one resolution may hold: a rewrite drops all of them, so no stale mask or flipped latent survives.
_ALL_KEYS = (
    *sorted(_KOHYA_KEYS),
    "latents_flipped",
    "alpha_mask",
    "cache_id",
    "image_file",
    "bucket_reso",
    "pixel_crop",
    "resize_interpolation",
    "mask_source",
)
_READ_ERRORS = (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError)


def latents_npz_path(image_path: Path, original_size: tuple[int, int], file_suffix: str = "_sd") -> Path:
    """kohya's name: the ORIGINAL image size, 4-digit zero padded, then the family suffix."""
    width, height = original_size
    return image_path.with_name(f"{image_path.stem}_{width:04d}x{height:04d}{file_suffix}.npz")


def latent_hw(bucket: tuple[int, int], downscale: int) -> tuple[int, int]:
    return bucket[1] // downscale, bucket[0] // downscale


def key_suffix(bucket: tuple[int, int], downscale: int, multi_resolution: bool) -> str:
    """kohya's `_<h>x<w>` (latent height x width) on every key of a multi-resolution file, else ""."""
    if not multi_resolution:
        return ""
    height, width = latent_hw(bucket, downscale)
    return f"_{height}x{width}"


def file_stamp(path: Path) -> tuple[int, int]:
    """(size in bytes, mtime in ns): cheap evidence that a file is unchanged."""
    st = path.stat()
    return st.st_size, st.st_mtime_ns


@dataclass(frozen=True)
class LatentDeps:
    """Everything a cached latent depends on; a cache file is valid when all of it matches."""

    cache_id: str
    image_file: tuple[int, int]  # file_stamp of the image
    original_size: tuple[int, int]
    bucket: tuple[int, int]
    pixel_crop: tuple[int, int, int, int]  # resized w, h, crop left, top
    crop_ltrb: tuple[float, float, float, float]  # kohya's value (not the pixel crop)
    resize_interpolation: str  # "auto" = area when shrinking, lanczos when enlarging
    mask_source: str | None  # None (no mask), "alpha", or "file:<name>:<size>:<mtime_ns>"

    def recorded(self) -> dict[str, np.ndarray]:
        """Our extra npz keys without the resolution suffix (mask_source only with a mask)."""
        arrays = {
            "cache_id": np.array(self.cache_id),
            "image_file": np.array(self.image_file, dtype=np.int64),
            "bucket_reso": np.array(self.bucket, dtype=np.int64),
            "pixel_crop": np.array(self.pixel_crop, dtype=np.int64),
            "resize_interpolation": np.array(self.resize_interpolation),
        }
        if self.mask_source is not None:
            arrays["mask_source"] = np.array(self.mask_source)
        return arrays


def _shape(npz: np.lib.npyio.NpzFile, key: str) -> tuple[int, ...] | None:
    """An array's shape from its .npy header only: validating 10k files must not read 10k latents."""
    if key not in npz.files:
        return None
    with npz.zip.open(f"{key}.npy") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, _ = np.lib.format.read_array_header_1_0(f)
        else:
            shape, _, _ = np.lib.format.read_array_header_2_0(f)
    return tuple(shape)


def _matches(
    npz: np.lib.npyio.NpzFile, deps: LatentDeps, downscale: int, need_flipped: bool, suffix: str
) -> bool:
    files = set(npz.files)
    if not files >= {key + suffix for key in _KOHYA_KEYS}:
        return False
    shape = _shape(npz, "latents" + suffix)
    if shape is None or len(shape) != 3 or shape[1:] != latent_hw(deps.bucket, downscale):
        return False
    if need_flipped and _shape(npz, "latents_flipped" + suffix) != shape:
        return False
    mask_shape = (deps.bucket[1], deps.bucket[0])
    if deps.mask_source is not None and _shape(npz, "alpha_mask" + suffix) != mask_shape:
        return False
    if npz["original_size" + suffix].tolist() != list(deps.original_size):
        return False
    if not np.allclose(npz["crop_ltrb" + suffix].astype(np.float64), deps.crop_ltrb):
        return False
    if "cache_id" + suffix in files and str(npz["cache_id" + suffix]) != deps.cache_id:
        return False
    if "image_file" + suffix not in files:
        # Made by kohya (or by an older version of ours): only what kohya records can be checked. kohya masks
        # are always alpha masks; a mask file's version is unknown, so such a cache is rebuilt.
        return deps.mask_source in (None, "alpha")
    for key, expected in deps.recorded().items():
        if key + suffix not in files or npz[key + suffix].tolist() != expected.tolist():
            return False
    return True


def is_valid_npz(
    path: Path,
    deps: LatentDeps,
    *,
    downscale: int,
    need_flipped: bool,
    skip_check: bool = False,
    multi_resolution: bool = False,
) -> bool:
    """Whether a cache file can be used as is; any unreadable file counts as invalid (and gets rewritten).

    With `multi_resolution` only the keys of this bucket's latent size count (see the module docstring)."""
    if not path.is_file():
        return False
    if skip_check:  # kohya's --skip_cache_check: existence only, for huge datasets on slow disks
        return True
    suffix = key_suffix(deps.bucket, downscale, multi_resolution)
    try:
        with np.load(path) as npz:
            return _matches(npz, deps, downscale, need_flipped, suffix)
    except _READ_ERRORS:
        return False


def _other_resolutions(path: Path, suffix: str) -> dict[str, np.ndarray]:
    """The arrays of an existing multi-resolution file except this resolution's (and keys without a size,
    from older single-resolution files, which nothing reads); {} when there is none or it is unreadable."""
    if not path.is_file():
        return {}
    replaced = {key + suffix for key in _ALL_KEYS} | set(_ALL_KEYS)
    try:
        with np.load(path) as npz:
            return {key: npz[key] for key in npz.files if key not in replaced}
    except _READ_ERRORS:
        return {}


def write_npz(
    path: Path,
    latents: torch.Tensor,
    deps: LatentDeps,
    *,
    latents_flipped: torch.Tensor | None = None,
    alpha_mask: torch.Tensor | None = None,
    multi_resolution: bool = False,
) -> None:
    """Write atomically (temp file, then rename) so an interrupted run never leaves a half-written cache.

    `alpha_mask` is uint8 [H, W] (0..255) and stored as kohya does: float32 in [0, 1]. With
    `multi_resolution` the keys carry the latent size and the file's other resolutions are kept.
    """
    # From the latents' own size, as kohya names them (the encoder's output was checked against the bucket).
    suffix = f"_{latents.shape[1]}x{latents.shape[2]}" if multi_resolution else ""
    own = {
        "latents": latents.to(torch.float32).numpy(),
        "original_size": np.array(deps.original_size),
        "crop_ltrb": np.array(deps.crop_ltrb),
        **deps.recorded(),
    }
    if latents_flipped is not None:
        own["latents_flipped"] = latents_flipped.to(torch.float32).numpy()
    if alpha_mask is not None:
        own["alpha_mask"] = alpha_mask.numpy().astype(np.float32) / 255.0
    arrays = _other_resolutions(path, suffix) if multi_resolution else {}
    arrays.update({key + suffix: value for key, value in own.items()})
    save_npz_atomically(path, arrays, "latent cache")


def read_cached(
    path: Path,
    bucket: tuple[int, int],
    downscale: int,
    *,
    flipped: bool,
    mask: bool,
    multi_resolution: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Latents (or flipped latents) of one image, and its mask (float32 [1, H, W], flipped too) when asked."""
    suffix = key_suffix(bucket, downscale, multi_resolution)
    key = ("latents_flipped" if flipped else "latents") + suffix
    try:
        with np.load(path) as npz:  # lazy: only the keys read here leave the disk
            array = npz[key]
            mask_array = npz["alpha_mask" + suffix] if mask else None
    except _READ_ERRORS:
        wanted = f"{key} and alpha_mask{suffix}" if mask else key
        raise UserError(
            f"latent cache {path} is missing, unreadable or lacks {wanted}; run latent caching again"
        ) from None
    if array.ndim != 3 or tuple(array.shape[1:]) != latent_hw(bucket, downscale):
        raise UserError(
            f"latent cache {path} has shape {tuple(array.shape)}, which does not fit bucket "
            f"{bucket[0]}x{bucket[1]}; run latent caching again"
        )
    latents = torch.from_numpy(array.astype(np.float32, copy=False))
    if mask_array is None:
        return latents, None
    if mask_array.shape != (bucket[1], bucket[0]):
        raise UserError(
            f"latent cache {path} has an alpha_mask of shape {mask_array.shape}, which does not fit bucket "
            f"{bucket[0]}x{bucket[1]}; run latent caching again"
        )
    mask_tensor = torch.from_numpy(mask_array.astype(np.float32, copy=False)).unsqueeze(0)
    return latents, mask_tensor.flip(-1) if flipped else mask_tensor
