"""Aspect-ratio bucketing, matching kohya sd-scripts exactly.

Every image is assigned a bucket resolution (W, H), a size to resize to before cropping, and a crop. Images
in the same bucket can share a batch. The rules follow kohya so that a dataset buckets the same way in both
trainers (and kohya latent caches, which depend on the bucket, stay reusable):

* Predefined buckets (default): candidate sizes with area <= resolution's area; an image keeps its own size
  if that is exactly a candidate, otherwise it takes the candidate with the closest aspect ratio, is scaled
  to cover it (rounded with +0.5) and the overflow is cropped (centre, or random with random_crop).
* bucket_no_upscale: no candidates; large images are shrunk to the resolution's area, then the bucket is
  the size floored to multiples of the step. Images are cropped, never padded nor enlarged.
* Bucketing disabled: a single bucket equal to the resolution. Unlike kohya (which demands random_crop
  for larger images and rejects smaller ones) every image is scaled to cover it and centre-cropped, which is
  what users expect from a fixed-size dataset.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def make_bucket_resolutions(
    max_reso: tuple[int, int], min_size: int = 256, max_size: int = 1024, divisible: int = 64
) -> list[tuple[int, int]]:
    """Candidate (w, h) buckets for a training resolution, sorted and unique (kohya's algorithm)."""
    max_area = max_reso[0] * max_reso[1]
    side = int(math.sqrt(max_area) // divisible) * divisible
    resos = {(side, side)}
    for width in range(min_size, max_size + 1, divisible):
        height = min(max_size, (max_area // width) // divisible * divisible)
        if height >= min_size:
            resos.add((width, height))
            resos.add((height, width))
    return sorted(resos)


def snap_bucket_range(min_reso: int, max_reso: int, steps: int) -> tuple[int, int]:
    """Floor min and ceil max to multiples of steps, as kohya does before building buckets."""
    if min_reso % steps:
        min_reso -= min_reso % steps
    if max_reso % steps:
        max_reso += steps - max_reso % steps
    return min_reso, max_reso


@dataclass(frozen=True)
class BucketAssignment:
    """Where one image goes. Sizes are (w, h); the crop is taken from the resized image."""

    bucket: tuple[int, int]
    resized_size: tuple[int, int]
    crop_left: int
    crop_top: int
    ar_error: float  # bucket aspect ratio minus image aspect ratio (kohya's sign)

    @property
    def max_crop_offset(self) -> tuple[int, int]:
        """Largest (left, top) offset a random crop may use."""
        return self.resized_size[0] - self.bucket[0], self.resized_size[1] - self.bucket[1]


class ImageTooSmallError(ValueError):
    """With bucket_no_upscale an image narrower than one bucket step has no bucket."""


def kohya_crop_ltrb(
    bucket: tuple[int, int], original_size: tuple[int, int]
) -> tuple[float, float, float, float]:
    """kohya's crop_ltrb: where the image would sit if fitted *inside* the bucket (centred).

    kohya stores this in latent caches and derives SDXL's crop_top_left conditioning from it ("Stability AI's
    convention"). It is not the pixel crop actually applied; we reproduce it so that caches and SDXL size
    conditioning match kohya. Values can be fractional, as in kohya.
    """
    bucket_ar = bucket[0] / bucket[1]
    image_ar = original_size[0] / original_size[1]
    if bucket_ar > image_ar:
        fit_w, fit_h = bucket[1] * image_ar, float(bucket[1])
    else:
        fit_w, fit_h = float(bucket[0]), bucket[0] / image_ar
    left = (bucket[0] - fit_w) // 2
    top = (bucket[1] - fit_h) // 2
    return float(left), float(top), float(left + fit_w), float(top + fit_h)


def _cover(width: int, height: int, bucket: tuple[int, int]) -> tuple[int, int]:
    """Scale (width, height) so that it covers bucket, kohya's rounding."""
    aspect = width / height
    if aspect > bucket[0] / bucket[1]:
        scale = bucket[1] / height  # wider than the bucket: match heights, crop the sides
    else:
        scale = bucket[0] / width
    return int(width * scale + 0.5), int(height * scale + 0.5)


def select_predefined_bucket(width: int, height: int, resos: list[tuple[int, int]]) -> tuple[int, int]:
    """The image's own size if it is a candidate, else the candidate with the smallest |AR error|."""
    if (width, height) in resos:
        return width, height
    aspect = width / height
    # min() keeps the first of equal errors, like numpy's argmin in kohya.
    return min(resos, key=lambda r: abs(r[0] / r[1] - aspect))


def _round_to_steps(x: float, steps: int) -> int:
    rounded = int(x + 0.5)
    return rounded - rounded % steps


def no_upscale_resized_size(width: int, height: int, max_area: int, steps: int) -> tuple[int, int]:
    """bucket_no_upscale: the size an image is resized to (unchanged unless its area exceeds max_area)."""
    if width * height <= max_area:
        return width, height
    aspect = width / height
    target_w = math.sqrt(max_area * aspect)
    target_h = max_area / target_w
    # Round one side to the step and derive the other; keep whichever distorts the aspect ratio less.
    w_rounded = _round_to_steps(target_w, steps)
    ar_w = w_rounded / _round_to_steps(w_rounded / aspect, steps)
    h_rounded = _round_to_steps(target_h, steps)
    ar_h = _round_to_steps(h_rounded * aspect, steps) / h_rounded
    if abs(ar_w - aspect) < abs(ar_h - aspect):
        return w_rounded, int(w_rounded / aspect + 0.5)
    return int(h_rounded * aspect + 0.5), h_rounded


class BucketSelector:
    """Assigns images to buckets for one dataset's bucket settings."""

    def __init__(
        self,
        resolution: tuple[int, int],
        *,
        enable_bucket: bool = True,
        min_reso: int = 256,
        max_reso: int = 1024,
        steps: int = 64,
        no_upscale: bool = False,
    ) -> None:
        self.resolution = resolution
        self.enable_bucket = enable_bucket
        self.no_upscale = enable_bucket and no_upscale
        self.steps = steps
        self.max_area = resolution[0] * resolution[1]
        if not enable_bucket:
            self.predefined: list[tuple[int, int]] | None = [resolution]
        elif self.no_upscale:
            self.predefined = None
        else:
            self.predefined = make_bucket_resolutions(resolution, min_reso, max_reso, steps)

    def select(self, width: int, height: int) -> BucketAssignment:
        """Bucket, resized size and centre crop for an image of (width, height)."""
        if self.predefined is not None:
            bucket = select_predefined_bucket(width, height, self.predefined)
            resized = (width, height) if bucket == (width, height) else _cover(width, height, bucket)
        else:
            resized = no_upscale_resized_size(width, height, self.max_area, self.steps)
            bucket = (resized[0] - resized[0] % self.steps, resized[1] - resized[1] % self.steps)
            if bucket[0] == 0 or bucket[1] == 0:
                raise ImageTooSmallError(
                    f"{width}x{height} is smaller than bucket_reso_steps ({self.steps}) on one side and "
                    "bucket_no_upscale never enlarges images"
                )
        return BucketAssignment(
            bucket=bucket,
            resized_size=resized,
            crop_left=(resized[0] - bucket[0]) // 2,
            crop_top=(resized[1] - bucket[1]) // 2,
            ar_error=bucket[0] / bucket[1] - width / height,
        )
