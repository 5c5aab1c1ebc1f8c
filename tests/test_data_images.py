"""Image loading: the readability probe, resampling, colour and face-crop augmentation, and masks that follow
their image through every resize, crop and flip."""

from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from library.data.augment import color_augment, face_crop_window, parse_face_box, parse_face_crop_range
from library.data.bucketing import BucketSelector
from library.data.images import PixelOptions, UnreadableImage, load_image, probe_image
from library.errors import UserError


class Draws(random.Random):
    """A Random whose random()/uniform() return queued values, to pin each augmentation branch."""

    def __init__(self, *values: float) -> None:
        super().__init__(0)
        self.values = list(values)

    def random(self) -> float:
        return self.values.pop(0)

    def uniform(self, a: float, b: float) -> float:
        return self.values.pop(0)


def encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def gradient(width: int, height: int) -> Image.Image:
    """R grows left to right, G top to bottom, B constant: every pixel tells where it came from."""
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None].repeat(width, 1)
    return Image.fromarray(np.stack([x, y, np.full_like(x, 90)], -1).round().astype(np.uint8))


# ----------------------------------------------------------------------------------------------- probe


def test_probe_reads_sizes_and_names_broken_files(tmp_path: Path) -> None:
    image = gradient(48, 32)
    cases = {
        "ok.png": encoded(image, "PNG"),
        "ok.jpg": encoded(image, "JPEG") + b"\0" * 6000,  # data after the end marker (phones do this)
        "empty.png": b"",
        "text.png": b"not an image",
        "cut.png": encoded(image, "PNG")[:-30],
        "cut.jpg": encoded(image, "JPEG")[:-100],
        "cut.bmp": encoded(image, "BMP")[:-10],
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    assert probe_image(tmp_path / "ok.png") == (48, 32)
    assert probe_image(tmp_path / "ok.jpg") == (48, 32)
    reasons = {}
    for name in ("empty.png", "text.png", "cut.png", "cut.jpg", "cut.bmp"):
        with pytest.raises(UnreadableImage) as info:
            probe_image(tmp_path / name)
        assert info.value.path == tmp_path / name
        reasons[name] = info.value.reason
    assert reasons == {
        "empty.png": "empty file (0 bytes)",
        "text.png": "unknown or corrupt image format",
        "cut.png": "image file is truncated",
        "cut.jpg": "image file is truncated (2 bytes not processed)",
        "cut.bmp": "image file is truncated (134 bytes not processed)",
    }
    assert (
        info.value.user_message()
        == f"cannot read image {tmp_path / 'cut.bmp'}: {reasons['cut.bmp']}; fix or remove the file"
    )


# -------------------------------------------------------------------------------------- interpolation


def test_resize_interpolation_names_and_default(tmp_path: Path) -> None:
    Image.fromarray(np.array([[[0, 0, 0], [255, 255, 255]]] * 2, np.uint8)).save(tmp_path / "x.png")  # 2x2
    assignment = BucketSelector((4, 4), enable_bucket=False).select(2, 2)
    nearest = load_image(tmp_path / "x.png", assignment, PixelOptions(resize_interpolation="nearest")).pixels
    assert nearest[0].tolist() == [[-1.0, -1.0, 1.0, 1.0]] * 4  # every pixel repeated, nothing blended
    default = load_image(tmp_path / "x.png", assignment).pixels  # enlarging: Lanczos blends the edge
    assert default[0, 0, 0] == -1.0 and -1.0 < default[0, 0, 1] < 1.0
    with pytest.raises(UserError) as info:
        parse_face_crop_range("4,2")
    assert info.value.problems == [
        '--face_crop_aug_range must be two numbers "lo,hi" with 0 < lo <= hi (crop side / face size, e.g. '
        "2.0,4.0), got '4,2'"
    ]
    assert parse_face_crop_range("2,4.5") == (2.0, 4.5)


# -------------------------------------------------------------------------------------------- color_aug


def test_color_aug_branches() -> None:
    image = Image.new("RGB", (2, 1), (200, 100, 0))
    assert color_augment(image, Draws(0.34)) is image  # 2 in 3 samples are untouched
    gamma = np.array(color_augment(image, Draws(0.2, 0.5, 1.05)))  # gamma on values normalised to [0, 1]
    assert gamma[0, 0].tolist() == [round(255 * (200 / 255) ** 1.05), round(255 * (100 / 255) ** 1.05), 0]
    shifted = color_augment(Image.new("RGB", (1, 1), (255, 0, 0)), Draws(0.2, 0.9, 8 * 256 / 180))
    # kohya's largest shift, +8 OpenCV hue units = +16 degrees, is 11.4 PIL hue units: pure red turns orange.
    assert shifted.getpixel((0, 0)) == Image.new("HSV", (1, 1), (11, 255, 255)).convert("RGB").getpixel(
        (0, 0)
    )
    assert shifted.getpixel((0, 0)) == (255, 66, 0)


# ------------------------------------------------------------------------------------------ face crop


def test_face_box_from_file_name() -> None:
    assert parse_face_box(Path("portrait_300_100_32_40.png")) == (300, 100, 32, 40)
    assert parse_face_box(Path("a_b_300_100_32_40.png")) == (300, 100, 32, 40)
    assert parse_face_box(Path("img_1_2_3.png")) is None  # fewer than 5 parts
    assert parse_face_box(Path("my_cat_on_the_sofa.png")) is None  # not numbers
    assert parse_face_box(Path("x_0_10_32_32.png")) is None  # kohya: cx 0 means no face


def test_face_crop_window_scales_and_centres_on_the_face() -> None:
    rng = random.Random(0)
    # 400x200 image, 64x64 target, 32px face at (300, 100). Range [2, 2]: the crop is 2 faces wide, which
    # needs no scaling (kohya never enlarges), and the crop is centred on the face without jitter.
    assert face_crop_window((400, 200), (64, 64), (300, 100, 32, 32), (2, 2), random_crop=False, rng=rng) == (
        (400, 200),
        268,
        68,
    )
    # Range [4, 4]: 4 faces wide, so the image is halved; the face moves to (150, 50).
    assert face_crop_window((400, 200), (64, 64), (300, 100, 32, 32), (4, 4), random_crop=False, rng=rng) == (
        (200, 100),
        118,
        18,
    )
    # A face at the border: the crop stays inside the image.
    assert face_crop_window((400, 200), (64, 64), (5, 5, 32, 32), (2, 2), random_crop=False, rng=rng) == (
        (400, 200),
        0,
        0,
    )
    # A range: the scale varies between covering the target and the face limits, always inside the image.
    for _ in range(50):
        (w, h), left, top = face_crop_window(
            (400, 200), (64, 64), (300, 100, 60, 60), (1.5, 6), random_crop=True, rng=rng
        )
        assert 64 <= h <= 200 and abs(w - 2 * h) <= 1
        assert 0 <= left <= w - 64 and 0 <= top <= h - 64


def test_face_crop_in_load_image(tmp_path: Path) -> None:
    image = Image.new("RGB", (400, 200), (0, 0, 255))
    image.paste((255, 0, 0), (284, 84, 316, 116))  # the "face": 32x32 red at (300, 100)
    image.save(tmp_path / "p_300_100_32_32.png")
    image.save(tmp_path / "plain.png")
    assignment = BucketSelector((64, 64), enable_bucket=False).select(400, 200)
    options = PixelOptions(face_crop_aug_range=(2.0, 2.0))
    face = load_image(tmp_path / "p_300_100_32_32.png", assignment, options).pixels
    assert face[:, 16:48, 16:48].eq(torch.tensor([1.0, -1.0, -1.0]).view(3, 1, 1)).all()  # face in the middle
    assert face[:, :16].eq(torch.tensor([-1.0, -1.0, 1.0]).view(3, 1, 1)).all()
    plain = load_image(tmp_path / "plain.png", assignment, options).pixels  # no box: the usual centre crop
    assert torch.equal(plain, load_image(tmp_path / "plain.png", assignment).pixels)


# ---------------------------------------------------------------------------------------------- masks


def test_alpha_mask_follows_resize_crop_and_flip(tmp_path: Path) -> None:
    rgba = gradient(120, 80).convert("RGBA")
    rgba.putalpha(gradient(120, 80).getchannel("R"))  # alpha = the R gradient
    rgba.save(tmp_path / "a.png")
    gradient(120, 80).save(tmp_path / "opaque.png")
    assignment = BucketSelector((64, 64), enable_bucket=True, min_reso=32, max_reso=128, steps=32).select(
        120, 80
    )
    assert assignment.bucket != assignment.resized_size  # resized and cropped
    options = PixelOptions(alpha_mask=True, random_crop=True)
    for flip in (False, True):
        loaded = load_image(tmp_path / "a.png", assignment, options, flip=flip, rng=random.Random(3))
        assert loaded.mask.dtype == torch.uint8 and loaded.mask.shape == loaded.pixels.shape[1:]
        red = ((loaded.pixels[0] + 1) * 127.5).round().to(torch.uint8)
        assert torch.equal(loaded.mask, red)  # the same resize, the same random crop, the same flip
    no_alpha = load_image(tmp_path / "opaque.png", assignment, PixelOptions(alpha_mask=True))
    assert no_alpha.mask.eq(255).all()  # kohya: an image without alpha is fully trained
    assert load_image(tmp_path / "a.png", assignment).mask is None


def test_mask_file_uses_its_red_channel(tmp_path: Path) -> None:
    gradient(96, 64).save(tmp_path / "x.png")
    mask = Image.merge(
        "RGB", [gradient(96, 64).getchannel("R"), Image.new("L", (96, 64), 7), Image.new("L", (96, 64), 9)]
    )
    mask.save(tmp_path / "x_mask.png")
    assignment = BucketSelector((64, 64), enable_bucket=False).select(96, 64)
    loaded = load_image(tmp_path / "x.png", assignment, flip=True, mask_path=tmp_path / "x_mask.png")
    assert torch.equal(loaded.mask, ((loaded.pixels[0] + 1) * 127.5).round().to(torch.uint8))
    (tmp_path / "bad_mask.png").write_bytes(b"junk")
    with pytest.raises(UnreadableImage) as info:
        load_image(tmp_path / "x.png", assignment, mask_path=tmp_path / "bad_mask.png")
    assert info.value.path == tmp_path / "bad_mask.png"


# ------------------------------------------------------------------------------------- dataset config


def test_image_keys_at_every_level_and_their_errors(tmp_path: Path) -> None:
    from library.data.dataset_config import DatasetDefaults, load_dataset_blueprint

    for name in ("a", "b", "masks"):
        (tmp_path / name).mkdir()
    cfg = tmp_path / "ds.toml"
    cfg.write_text(
        '[general]\nresolution = 64\ncolor_aug = true\n\n[[datasets]]\nresize_interpolation = "bicubic"\n'
        '  [[datasets.subsets]]\n  image_dir = "a"\n  face_crop_aug_range = [2, 4]\n  alpha_mask = true\n'
        '  [[datasets.subsets]]\n  image_dir = "b"\n  color_aug = false\n  conditioning_data_dir = "masks"\n'
    )
    defaults = DatasetDefaults(resize_interpolation="area", face_crop_aug_range=(1.0, 3.0), masked_loss=True)
    (spec,) = load_dataset_blueprint(cfg, defaults)
    a, b = spec.subsets
    assert (a.color_aug, a.resize_interpolation, a.face_crop_aug_range, a.alpha_mask) == (
        True,
        "bicubic",
        (2.0, 4.0),
        True,
    )
    assert (b.color_aug, b.face_crop_aug_range, b.alpha_mask, b.conditioning_data_dir) == (
        False,
        (1.0, 3.0),  # from the command line
        False,
        (tmp_path / "masks").resolve(),
    )
    assert a.pixel_options == PixelOptions(False, True, (2.0, 4.0), "bicubic", True)

    cfg.write_text(
        "[general]\nresolution = 64\nalpha_mask = true\n\n[[datasets]]\n  [[datasets.subsets]]\n"
        '  image_dir = "a"\n  face_crop_aug_range = [4, 2]\n  resize_interpolation = "cubicc"\n'
        '  [[datasets.subsets]]\n  image_dir = "b"\n'
    )
    with pytest.raises(UserError) as info:
        load_dataset_blueprint(cfg, DatasetDefaults(masked_loss=True))
    assert info.value.problems == [
        f"{cfg}: general.alpha_mask is not allowed in [general]; put it in [[datasets.subsets]]",
        f"{cfg}: datasets[0].subsets[0].face_crop_aug_range must be [lo, hi] with 0 < lo <= hi (crop side / face "
        "size, e.g. [2.0, 4.0]), got [4, 2]",
        f"{cfg}: datasets[0].subsets[0].resize_interpolation must be one of lanczos, nearest, bilinear, linear, "
        'bicubic, cubic, area, got "cubicc"',
        f'{cfg}: datasets[0].subsets[0] has no mask for --masked_loss; set conditioning_data_dir = "<folder of '
        "masks named like the images>\" or alpha_mask = true (the images' alpha channel)",
        f'{cfg}: datasets[0].subsets[1] has no mask for --masked_loss; set conditioning_data_dir = "<folder of '
        "masks named like the images>\" or alpha_mask = true (the images' alpha channel)",
    ]
