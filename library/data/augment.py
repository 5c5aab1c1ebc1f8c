"""Pixel augmentations and resampling, with kohya's semantics and only PIL/numpy (no OpenCV).

* `resize`: kohya's `resize_interpolation` names; unset means area averaging when shrinking and Lanczos when
  enlarging (PIL's BOX filter is area averaging, like OpenCV's INTER_AREA).
* `color_augment`: with probability 0.33 either a hue shift of up to +-8 OpenCV hue units (+-16 degrees) or a
  gamma in [0.95, 1.05], half of the time each. kohya raises the raw 0..255 values to the gamma, which
  brightens or darkens by up to a third; we apply the gamma to values normalised to [0, 1], as the
  albumentations `RandomGamma` kohya replaced did, so the change stays the intended few percent.
* `face_crop_window`: kohya's face-centred crop. The face box is encoded in the file name as
  `<name>_<cx>_<cy>_<w>_<h>` (kohya's detect_face_rotate.py writes it). The image is scaled so the face
  spans 1/hi .. 1/lo of the target's shorter side (never enlarged beyond what covering the target needs),
  then cropped around the face with a little jitter. kohya applies it only with bucketing off; we apply it
  in every bucket, whose size is the target.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
from PIL import Image

from library.errors import UserError

INTERPOLATIONS: dict[str, Image.Resampling] = {
    "lanczos": Image.Resampling.LANCZOS,
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "linear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "cubic": Image.Resampling.BICUBIC,
    "area": Image.Resampling.BOX,
}
_HUE_SHIFT_LIMIT = 8 * 256 / 180  # kohya's +-8 in OpenCV hue units (0..180) as PIL hue units (0..256)


def resize(image: Image.Image, size: tuple[int, int], interpolation: str | None = None) -> Image.Image:
    """Resize to (w, h) with a kohya interpolation name, or kohya's default for the direction."""
    if image.size == size:
        return image
    if interpolation is None:
        shrinking = size[0] <= image.width and size[1] <= image.height
        interpolation = "area" if shrinking else "lanczos"
    return image.resize(size, INTERPOLATIONS[interpolation])


def color_augment(image: Image.Image, rng: random.Random) -> Image.Image:
    """kohya's color_aug on an RGB image: 1/3 of the time a hue shift or a gamma change."""
    if rng.random() > 0.33:
        return image
    if rng.random() > 0.5:
        shift = rng.uniform(-_HUE_SHIFT_LIMIT, _HUE_SHIFT_LIMIT)
        hsv = np.array(image.convert("HSV"))
        hue = hsv[:, :, 0].astype(np.float32) + shift
        hsv[:, :, 0] = np.round(hue).astype(np.int64) % 256
        return Image.fromarray(hsv, "HSV").convert("RGB")
    gamma = rng.uniform(0.95, 1.05)
    table = [round(255 * (i / 255) ** gamma) for i in range(256)]
    return image.point(table * 3)


def parse_face_box(path: Path) -> tuple[int, int, int, int] | None:
    """(cx, cy, w, h) from a `<name>_<cx>_<cy>_<w>_<h>` file name, or None when the name carries no box."""
    tokens = path.stem.split("_")
    if len(tokens) < 5:
        return None
    try:
        cx, cy, w, h = (int(t) for t in tokens[-4:])
    except ValueError:
        return None
    # kohya treats cx <= 0 as "no face"; a box without size cannot be scaled to.
    if cx <= 0 or max(w, h) <= 0:
        return None
    return cx, cy, w, h


def face_crop_window(
    image_size: tuple[int, int],
    target: tuple[int, int],
    box: tuple[int, int, int, int],
    face_range: tuple[float, float],
    *,
    random_crop: bool,
    rng: random.Random,
) -> tuple[tuple[int, int], int, int]:
    """(resized size, crop left, crop top) that puts the face near the centre of a `target`-sized crop."""
    width, height = image_size
    cx, cy, face_w, face_h = box
    face = max(face_w, face_h)
    side = min(target)
    cover = max(target[0] / width, target[1] / height)
    # kohya clamps both scales to 1 (never enlarge) and expects cover <= 1; keeping cover as the floor
    # also handles small images, which are enlarged just enough to fill the target.
    low = max(cover, min(1.0, side / (face * face_range[1])))
    high = max(low, min(1.0, side / (face * face_range[0])))
    scale = low if low >= high else rng.uniform(low, high)
    resized = (max(target[0], int(width * scale + 0.5)), max(target[1], int(height * scale + 0.5)))
    axes = (  # kohya crops height first, then width; the order matters for the random draws
        (target[1], resized[1], int(cy * scale + 0.5)),
        (target[0], resized[0], int(cx * scale + 0.5)),
    )
    offsets = []
    for size, length, centre in axes:
        start = centre - size // 2
        if random_crop:
            # Triangular jitter over the whole image: keeps the face likely central but shows background too.
            reach = max(length - centre, centre)
            start += rng.randint(0, reach) + rng.randint(0, reach) - reach
        elif face_range[0] != face_range[1] and face > side // 10 and face >= 40:
            start += rng.randint(-face // 20, face // 20)
        offsets.append(max(0, min(start, length - size)))
    top, left = offsets
    return resized, left, top


def parse_face_crop_range(
    text: str | None, flag: str = "--face_crop_aug_range"
) -> tuple[float, float] | None:
    """'2.0,4.0' -> (2.0, 4.0); None stays None. Raises UserError naming the flag."""
    if text is None:
        return None
    parts = [p.strip() for p in str(text).split(",")]
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 2 or not 0 < values[0] <= values[1]:
        raise UserError(
            f'{flag} must be two numbers "lo,hi" with 0 < lo <= hi (crop side / face size, e.g. 2.0,4.0), '
            f"got {text!r}"
        )
    return values[0], values[1]
