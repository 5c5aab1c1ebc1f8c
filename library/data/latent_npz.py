"""kohya-compatible latent cache files: `<stem>_<WWWW>x<HHHH><suffix>.npz` next to each image.

Keys as kohya writes them: `latents` (C, h, w) float32, `original_size` [w, h], `crop_ltrb` [l, t, r, b],
optional `latents_flipped`. We add `cache_id` (a string naming the encoder) so a cache made by another VAE is
not reused; kohya files lack it and are accepted when everything else matches.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
import torch

from library.errors import UserError


def latents_npz_path(image_path: Path, original_size: tuple[int, int], file_suffix: str = "_sd") -> Path:
    """kohya's name: the ORIGINAL image size, 4-digit zero padded, then the family suffix."""
    width, height = original_size
    return image_path.with_name(f"{image_path.stem}_{width:04d}x{height:04d}{file_suffix}.npz")


def latent_hw(bucket: tuple[int, int], downscale: int) -> tuple[int, int]:
    return bucket[1] // downscale, bucket[0] // downscale


def is_valid_npz(
    path: Path,
    *,
    bucket: tuple[int, int],
    downscale: int,
    original_size: tuple[int, int],
    crop_ltrb: tuple[float, float, float, float],
    need_flipped: bool,
    cache_id: str,
    skip_check: bool = False,
) -> bool:
    """Whether a cache file can be used as is; any unreadable file counts as invalid (and gets rewritten)."""
    if not path.is_file():
        return False
    if skip_check:  # kohya's --skip_cache_check: existence only, for huge datasets on slow disks
        return True
    try:
        with np.load(path) as npz:
            files = set(npz.files)
            if not {"latents", "original_size", "crop_ltrb"} <= files:
                return False
            latents = npz["latents"]
            if latents.ndim != 3 or tuple(latents.shape[1:]) != latent_hw(bucket, downscale):
                return False
            if need_flipped and (
                "latents_flipped" not in files or npz["latents_flipped"].shape != latents.shape
            ):
                return False
            if "cache_id" in files and str(npz["cache_id"]) != cache_id:
                return False
            if npz["original_size"].tolist() != list(original_size):
                return False
            return bool(np.allclose(npz["crop_ltrb"].astype(np.float64), crop_ltrb))
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError):
        return False


def write_npz(
    path: Path,
    latents: torch.Tensor,
    *,
    original_size: tuple[int, int],
    crop_ltrb: tuple[float, float, float, float],
    cache_id: str,
    latents_flipped: torch.Tensor | None = None,
) -> None:
    """Write atomically (temp file, then rename) so an interrupted run never leaves a half-written cache."""
    arrays = {
        "latents": latents.to(torch.float32).numpy(),
        "original_size": np.array(original_size),
        "crop_ltrb": np.array(crop_ltrb),
        "cache_id": np.array(cache_id),
    }
    if latents_flipped is not None:
        arrays["latents_flipped"] = latents_flipped.to(torch.float32).numpy()
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(
            f"cannot write latent cache {path}: {e.strerror or e}; check the folder is writable"
        ) from None


def read_latents(path: Path, bucket: tuple[int, int], downscale: int, flipped: bool) -> torch.Tensor:
    """Latents (or flipped latents) of one image from its cache file, checked against its bucket."""
    key = "latents_flipped" if flipped else "latents"
    try:
        with np.load(path) as npz:
            array = npz[key]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError):
        raise UserError(
            f"latent cache {path} is missing, unreadable or lacks {key}; run latent caching again"
        ) from None
    if array.ndim != 3 or tuple(array.shape[1:]) != latent_hw(bucket, downscale):
        raise UserError(
            f"latent cache {path} has shape {tuple(array.shape)}, which does not fit bucket "
            f"{bucket[0]}x{bucket[1]}; run latent caching again"
        )
    return torch.from_numpy(array.astype(np.float32, copy=False))
