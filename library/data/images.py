"""Image files: discovery, header-only size reads, and loading into a bucket-sized tensor.

Augmentations that act on pixels live here so that new ones (colour, masks) have one obvious home.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from library.data.bucketing import BucketAssignment
from library.errors import UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def list_image_files(folder: Path) -> list[Path]:
    """Images directly inside folder (not recursive, as kohya), sorted by name for determinism."""
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def read_image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file header; PIL parses the header only until pixels are requested.

    Raises OSError/ValueError for unreadable or corrupt files; callers decide whether to skip.
    """
    with Image.open(path) as image:
        width, height = image.size
    if width < 1 or height < 1:
        raise ValueError(f"invalid size {width}x{height}")
    return width, height


def _resize(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    if image.size == size:
        return image
    # kohya: area interpolation when shrinking, Lanczos when enlarging. PIL's BOX filter is area averaging.
    shrinking = size[0] <= image.width and size[1] <= image.height
    return image.resize(size, Image.Resampling.BOX if shrinking else Image.Resampling.LANCZOS)


def load_image_tensor(
    path: Path,
    assignment: BucketAssignment,
    *,
    flip: bool = False,
    crop_rng: random.Random | None = None,
) -> torch.Tensor:
    """Decode, resize, crop (centre, or random when crop_rng is given) and optionally flip an image.

    Returns float32 [3, H, W] in [-1, 1] with (W, H) = assignment.bucket. Raises UserError if unreadable.
    """
    try:
        with Image.open(path) as opened:
            image = opened.convert("RGB")  # drops alpha like kohya; palette images are expanded first
    # PIL reports corrupt data as OSError ("image file is truncated"), SyntaxError ("broken PNG file") or
    # EOFError depending on the format and where the damage is.
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
        raise UserError(f"cannot read image {path}: {e}; fix or remove the file") from None
    image = _resize(image, assignment.resized_size)
    if crop_rng is None:
        left, top = assignment.crop_left, assignment.crop_top
    else:
        max_left, max_top = assignment.max_crop_offset
        left, top = crop_rng.randint(0, max_left), crop_rng.randint(0, max_top)
    width, height = assignment.bucket
    if image.size != (width, height):
        image = image.crop((left, top, left + width, top + height))
    array = np.array(image, dtype=np.uint8)  # a writable copy; torch warns on read-only arrays
    if flip:
        array = array[:, ::-1]
    tensor = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)
    return tensor.to(torch.float32).div_(127.5).sub_(1.0)
