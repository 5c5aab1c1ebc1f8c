"""Image files: discovery, a cheap readability probe, and loading into a bucket-sized tensor (with its mask).

Unreadable files are found in two places, and both raise `UnreadableImage` so callers decide (skip or fail):

* `probe_image` at scan time: the header (PIL reads it lazily) plus a check that the file is complete, from
  its last few KiB (PNG IEND chunk, JPEG end-of-image marker) or its declared size (WebP RIFF, BMP). That is
  one extra small read per image, so 10k images scan in seconds; only a file that fails the check is decoded
  in full, to tell a truncated file from one with data appended after its end (some phones write that).
* `load_image` at load time, for damage inside a file whose header and end are intact.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from library.data.augment import color_augment, face_crop_window, parse_face_box, resize
from library.data.bucketing import BucketAssignment

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_TAIL_BYTES = 4096
# PIL reports corrupt data as OSError ("image file is truncated"), SyntaxError ("broken PNG file"), EOFError
# or ValueError depending on the format and where the damage is.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)
# Pixels an image may have: the point where PIL refuses to open one (2 x its default MAX_IMAGE_PIXELS), as a
# guard against decompression bombs (a small file whose header claims 30000x30000 would take 2.7 GB once
# decoded). Checked from the header by us too, so it holds where another library set PIL's limit to None.
MAX_IMAGE_PIXELS = 178_956_970
TOO_LARGE_FIX = "resize it (e.g. to 4096 pixels on its long side) or remove it"


class UnreadableImage(Exception):
    """An image (or mask) file that cannot be decoded; `reason` says why in a few words."""

    def __init__(self, path: Path, reason: str, fix: str = "fix or remove the file") -> None:
        self.path = path
        self.reason = reason
        self.fix = fix
        super().__init__(f"cannot read image {path}: {reason}")

    def __reduce__(self) -> tuple[type, tuple[Path, str, str]]:  # crosses DataLoader worker processes
        return (type(self), (self.path, self.reason, self.fix))

    def user_message(self) -> str:
        return f"cannot read image {self.path}: {self.reason}; {self.fix}"


def _too_large(path: Path, size: str) -> UnreadableImage:
    reason = f"{size} pixels is over the limit of {MAX_IMAGE_PIXELS:,} (a guard against decompression bombs)"
    return UnreadableImage(path, reason, TOO_LARGE_FIX)


def _check_pixels(path: Path, width: int, height: int) -> None:
    """Before anything is decoded: an image over MAX_IMAGE_PIXELS is refused."""
    if width * height > MAX_IMAGE_PIXELS:
        raise _too_large(path, f"{width}x{height} = {width * height:,}")


def _bomb(path: Path, error: Image.DecompressionBombError) -> UnreadableImage:
    """PIL's own refusal (it raises while opening, before the size is known): its pixel count."""
    import re

    match = re.search(r"\((\d+) pixels\)", str(error))
    return _too_large(path, f"{int(match.group(1)):,}" if match else "its size in")


def list_image_files(folder: Path) -> list[Path]:
    """Images directly inside folder (not recursive, as kohya), sorted by name for determinism."""
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def _reason(error: BaseException) -> str:
    if isinstance(error, UnidentifiedImageError):
        return "unknown or corrupt image format"
    return str(error) or type(error).__name__


def _looks_complete(f: BinaryIO, image_format: str | None, file_size: int) -> bool:
    """Whether the file ends where its format says it should (False = probably truncated)."""
    if image_format in ("PNG", "JPEG"):
        f.seek(max(0, file_size - _TAIL_BYTES))
        tail = f.read()
        return (b"IEND\xaeB`\x82" if image_format == "PNG" else b"\xff\xd9") in tail
    if image_format in ("WEBP", "BMP"):
        f.seek(0)
        head = f.read(12)
        if image_format == "WEBP":
            return len(head) == 12 and int.from_bytes(head[4:8], "little") + 8 <= file_size
        return int.from_bytes(head[2:6], "little") <= file_size  # some writers leave the size 0
    return True


def probe_image(path: Path) -> tuple[int, int]:
    """(width, height) of a usable image; raises UnreadableImage for empty, unknown or truncated files."""
    try:
        file_size = path.stat().st_size
        if file_size == 0:
            raise UnreadableImage(path, "empty file (0 bytes)")
        with open(path, "rb") as f, Image.open(f) as image:
            width, height = image.size
            _check_pixels(path, width, height)
            if not _looks_complete(f, image.format, file_size):
                image.load()  # decode in full: raises if the file really is truncated
    except UnreadableImage:
        raise
    except Image.DecompressionBombError as e:
        raise _bomb(path, e) from None
    except Exception as e:  # any decoder failure means the same thing: this file cannot be used
        raise UnreadableImage(path, _reason(e)) from None
    if width < 1 or height < 1:
        raise UnreadableImage(path, f"invalid size {width}x{height}")
    return width, height


@dataclass(frozen=True)
class PixelOptions:
    """A subset's pixel settings: augmentations, resampling and which mask to load."""

    random_crop: bool = False
    color_aug: bool = False
    face_crop_aug_range: tuple[float, float] | None = None
    resize_interpolation: str | None = None
    alpha_mask: bool = False


@dataclass
class LoadedImage:
    """pixels: float32 [3, H, W] in [-1, 1]; mask: uint8 [H, W] (255 = full loss weight) or None."""

    pixels: torch.Tensor
    mask: torch.Tensor | None


def _decode(path: Path, alpha_mask: bool) -> tuple[Image.Image, Image.Image | None]:
    try:
        with Image.open(path) as opened:
            _check_pixels(path, *opened.size)
            if not alpha_mask:
                return opened.convert("RGB"), None  # drops alpha like kohya; palettes are expanded first
            # kohya: RGBA -> alpha is the mask; an image without alpha gets a full (all-ones) mask.
            rgba = opened.convert("RGBA")
            return rgba.convert("RGB"), rgba.getchannel("A")
    except Image.DecompressionBombError as e:
        raise _bomb(path, e) from None
    except _DECODE_ERRORS as e:
        raise UnreadableImage(path, _reason(e)) from None


def _decode_mask(path: Path) -> Image.Image:
    """A mask image's R channel (grey images: their only channel), as kohya's conditioning masks."""
    try:
        with Image.open(path) as opened:
            _check_pixels(path, *opened.size)
            return opened.convert("RGB").getchannel("R")
    except Image.DecompressionBombError as e:
        raise _bomb(path, e) from None
    except _DECODE_ERRORS as e:
        raise UnreadableImage(path, _reason(e)) from None


def _geometry(
    path: Path,
    size: tuple[int, int],
    assignment: BucketAssignment,
    options: PixelOptions,
    rng: random.Random | None,
) -> tuple[tuple[int, int], int, int]:
    """(resized size, crop left, crop top) for this load: face crop, random crop or the centre crop."""
    box = parse_face_box(path) if options.face_crop_aug_range is not None else None
    if box is not None:
        return face_crop_window(
            size,
            assignment.bucket,
            box,
            options.face_crop_aug_range,
            random_crop=options.random_crop,
            rng=rng or random.Random(0),
        )
    if options.random_crop and rng is not None:
        max_left, max_top = assignment.max_crop_offset
        return assignment.resized_size, rng.randint(0, max_left), rng.randint(0, max_top)
    return assignment.resized_size, assignment.crop_left, assignment.crop_top


def load_image(
    path: Path,
    assignment: BucketAssignment,
    options: PixelOptions = PixelOptions(),
    *,
    flip: bool = False,
    rng: random.Random | None = None,
    mask_path: Path | None = None,
) -> LoadedImage:
    """Decode, resize, crop, colour-augment and flip an image; its mask gets the same resize, crop and flip.

    Random augmentations draw from `rng` (none without it: centre crop, no colour change). The mask comes
    from `mask_path` (R channel) or, with `options.alpha_mask`, from the alpha channel. Raises UnreadableImage.
    """
    image, mask = _decode(path, options.alpha_mask and mask_path is None)
    if mask_path is not None:
        mask = _decode_mask(mask_path)
    resized, left, top = _geometry(path, image.size, assignment, options, rng)
    width, height = assignment.bucket
    interpolation = options.resize_interpolation
    image = resize(image, resized, interpolation)
    if image.size != (width, height):
        image = image.crop((left, top, left + width, top + height))
    if mask is not None:
        mask = resize(mask, resized, interpolation)
        if mask.size != (width, height):
            mask = mask.crop((left, top, left + width, top + height))
    if options.color_aug and rng is not None:
        image = color_augment(image, rng)
    array = np.array(image, dtype=np.uint8)  # a writable copy; torch warns on read-only arrays
    mask_array = None if mask is None else np.array(mask, dtype=np.uint8)
    if flip:
        array = array[:, ::-1]
        mask_array = None if mask_array is None else mask_array[:, ::-1]
    pixels = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)
    # contiguous: a channels-last float tensor (what .to keeps after permute) makes torch.stack of a batch
    # gather strided memory, about 2x slower per image (bench/bench_loader.py)
    pixels = pixels.to(torch.float32, memory_format=torch.contiguous_format).div_(127.5).sub_(1.0)
    return LoadedImage(
        pixels, None if mask_array is None else torch.from_numpy(np.ascontiguousarray(mask_array))
    )
