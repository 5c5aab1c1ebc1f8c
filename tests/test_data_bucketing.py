"""Aspect-ratio bucketing against kohya's algorithm: exact bucket lists and assignments."""

from __future__ import annotations

import math

import pytest

from library.data.bucketing import (
    BucketSelector,
    ImageTooSmallError,
    kohya_crop_ltrb,
    make_bucket_resolutions,
    snap_bucket_range,
)


def reference_buckets(
    max_w: int, max_h: int, lo: int = 256, hi: int = 1024, step: int = 64
) -> list[tuple[int, int]]:
    """Independent oracle: kohya's model_util.make_bucket_resolutions as described in the reference."""
    area = max_w * max_h
    out = set()
    side = math.floor(math.sqrt(area) / step) * step
    out.add((side, side))
    w = lo
    while w <= hi:
        h = min(hi, math.floor(area / w / step) * step)
        if h >= lo:
            out.add((w, h))
            out.add((h, w))
        w += step
    return sorted(out)


BUCKETS_512 = [
    (256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640), (448, 576),
    (512, 512),
    (576, 448), (640, 384), (704, 320), (768, 320), (832, 256), (896, 256), (960, 256), (1024, 256),
]  # fmt: skip


@pytest.mark.parametrize("reso", [512, 768, 1024])
def test_bucket_lists_match_reference(reso: int) -> None:
    assert make_bucket_resolutions((reso, reso)) == reference_buckets(reso, reso)


def test_bucket_list_512_literal() -> None:
    # Verified by hand: w=256 -> 262144//256 = 1024 -> (256, 1024); w=832 -> 315 -> 256 -> (832, 256).
    assert make_bucket_resolutions((512, 512)) == BUCKETS_512


def test_bucket_lists_768_1024_literal_entries() -> None:
    b768 = make_bucket_resolutions((768, 768))
    assert len(b768) == 19
    assert {(768, 768), (576, 960), (576, 1024), (640, 896), (704, 832), (1024, 256)} <= set(b768)
    assert (832, 832) not in b768
    b1024 = make_bucket_resolutions((1024, 1024))
    assert len(b1024) == 25
    assert b1024[0] == (256, 1024) and b1024[-1] == (1024, 1024)
    assert all(w * h <= 1024 * 1024 for w, h in b1024)


def test_non_square_and_custom_range() -> None:
    assert make_bucket_resolutions((768, 512), 256, 1024, 64) == reference_buckets(768, 512)
    assert make_bucket_resolutions((64, 64), 64, 128, 64) == [(64, 64)]
    assert make_bucket_resolutions((128, 128), 64, 256, 64) == [
        (64, 192),
        (64, 256),
        (128, 128),
        (192, 64),
        (256, 64),
    ]


@pytest.mark.parametrize(
    ("size", "bucket", "resized", "crop"),
    [
        ((512, 512), (512, 512), (512, 512), (0, 0)),
        ((640, 384), (640, 384), (640, 384), (0, 0)),  # exactly a bucket: kept as is
        ((1000, 700), (576, 448), (640, 448), (32, 0)),
        ((700, 1000), (448, 576), (448, 640), (0, 32)),
        ((1920, 1080), (640, 384), (683, 384), (21, 0)),
        ((300, 200), (640, 384), (640, 427), (0, 21)),  # enlarged to cover
        ((100, 100), (512, 512), (512, 512), (0, 0)),
    ],
)
def test_assignment_predefined(size, bucket, resized, crop) -> None:
    a = BucketSelector((512, 512)).select(*size)
    assert (a.bucket, a.resized_size, (a.crop_left, a.crop_top)) == (bucket, resized, crop)
    assert a.ar_error == pytest.approx(bucket[0] / bucket[1] - size[0] / size[1])


@pytest.mark.parametrize(
    ("size", "bucket", "resized"),
    [
        ((512, 512), (512, 512), (512, 512)),
        ((1000, 700), (576, 384), (576, 403)),  # width rounding wins: AR 1.5 vs 1.333 for AR 1.4286
        ((700, 1000), (384, 576), (403, 576)),
        ((1920, 1080), (640, 384), (683, 384)),
        ((300, 200), (256, 192), (300, 200)),  # small images are never enlarged, only cropped
        ((100, 100), (64, 64), (100, 100)),
        ((2000, 500), (1024, 256), (1024, 256)),  # min/max bucket reso are ignored
    ],
)
def test_assignment_no_upscale(size, bucket, resized) -> None:
    a = BucketSelector((512, 512), no_upscale=True).select(*size)
    assert (a.bucket, a.resized_size) == (bucket, resized)
    assert (a.crop_left, a.crop_top) == ((resized[0] - bucket[0]) // 2, (resized[1] - bucket[1]) // 2)


def test_no_upscale_too_small_image() -> None:
    with pytest.raises(ImageTooSmallError, match="bucket_reso_steps"):
        BucketSelector((512, 512), no_upscale=True).select(50, 300)


def test_bucketing_disabled_covers_fixed_size() -> None:
    selector = BucketSelector((512, 512), enable_bucket=False)
    big = selector.select(1000, 700)
    assert (big.bucket, big.resized_size, big.crop_left, big.crop_top) == ((512, 512), (731, 512), 109, 0)
    small = selector.select(300, 200)
    assert (small.bucket, small.resized_size, small.crop_left) == ((512, 512), (768, 512), 128)


def test_snap_bucket_range() -> None:
    assert snap_bucket_range(256, 1024, 64) == (256, 1024)
    assert snap_bucket_range(250, 1000, 64) == (192, 1024)


def test_kohya_crop_ltrb() -> None:
    # Fitted inside the bucket (kohya's SDXL convention), not the pixel crop.
    assert kohya_crop_ltrb((576, 448), (1000, 700)) == pytest.approx((0.0, 22.0, 576.0, 425.2))
    assert kohya_crop_ltrb((128, 128), (81, 128)) == (23.0, 0.0, 104.0, 128.0)
    assert kohya_crop_ltrb((512, 512), (512, 512)) == (0.0, 0.0, 512.0, 512.0)
