"""Loss masks in batches (mask folders, alpha), latent caches that are never stale, and unreadable images met
after the scan (skipped while caching, replaced in batches)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from library.data.dataset import build_dataset_group
from library.data.dataset_config import DatasetSpec, SubsetSpec
from library.data.latent_cache import cache_latents, cache_problems, check_latent_cache
from library.errors import UserError


class PoolEncoder:
    """A deterministic stand-in for a VAE (8x8 average pooling to 4 channels); counts encoded images."""

    def __init__(self) -> None:
        self.images = 0

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        self.images += pixels.shape[0]
        return F.avg_pool2d(pixels, 8)[:, [0, 1, 2, 0]]


def half_mask(size: tuple[int, int], value: int) -> Image.Image:
    """`value` on the left half, 0 on the right: a flip moves it."""
    mask = Image.new("L", size, 0)
    mask.paste(value, (0, 0, size[0] // 2, size[1]))
    return mask


def make_images(folder: Path, sizes: dict[str, tuple[int, int]], *, alpha: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for n, (name, size) in enumerate(sizes.items()):
        image = Image.new("RGB", size, (40 * n, 200, 30))
        image.paste((250, 250, 250), (0, 0, size[0] // 3, size[1]))
        if alpha:
            image.putalpha(half_mask(size, 100 + 50 * n))
        image.save(folder / f"{name}.png")
    return folder


def subset(image_dir: Path, **kw) -> SubsetSpec:
    values = {"flip_aug": False, "random_crop": False, **kw}
    flip, crop = values.pop("flip_aug"), values.pop("random_crop")
    return SubsetSpec(
        image_dir, 1, False, "thing", ".caption", False, ",", 0, None, None, flip, crop, **values
    )


def dataset(*subsets: SubsetSpec, batch_size: int = 4) -> DatasetSpec:
    return DatasetSpec((64, 64), batch_size, True, 64, 128, 64, False, subsets)


def cache(group, *, to_disk: bool = True, cache_id: str = "v"):
    encoder = PoolEncoder()
    report = cache_latents(
        group, encoder, cache_id=cache_id, to_disk=to_disk, batch_size=2, show_progress=False
    )
    return report.reused, report.encoded


SQUARES = {"a": (64, 64), "b": (64, 64), "c": (64, 64)}


# ----------------------------------------------------------------------------------------------- masks


def test_mask_folder_masks_in_batches_follow_flips(tmp_path: Path) -> None:
    images = make_images(tmp_path / "img", SQUARES)
    masks = tmp_path / "masks"
    masks.mkdir()
    for n, name in enumerate(SQUARES):
        half_mask((64, 64), 51 * (n + 1)).save(masks / f"{name}.png")
    spec = dataset(subset(images, flip_aug=True, conditioning_data_dir=masks), batch_size=3)
    group = build_dataset_group([spec], seed=1)
    seen = set()
    for epoch in range(4):
        batch = group.load_batch(epoch, 0)
        assert batch["masks"].shape == (3, 1, 64, 64) and batch["masks"].dtype == torch.float32
        for path, mask, flipped in zip(batch["image_paths"], batch["masks"], batch["flipped"], strict=True):
            value = 51 * (list(SQUARES).index(Path(path).stem) + 1) / 255
            expected = torch.tensor(
                np.array(half_mask((64, 64), 255))[None] / 255 * value, dtype=torch.float32
            )
            assert torch.allclose(mask, expected.flip(-1) if flipped else expected, atol=1e-6)
            seen.add(flipped)
    assert seen == {True, False}
    plain = build_dataset_group([dataset(subset(images))], seed=1)
    assert plain.load_batch(0, 0)["masks"] is None


def test_mask_folder_problems(tmp_path: Path) -> None:
    images = make_images(tmp_path / "img", {"a": (64, 64), "b": (64, 64), "c": (64, 64), "d": (64, 64)})
    masks = tmp_path / "masks"
    masks.mkdir()
    half_mask((64, 64), 255).save(masks / "a.png")
    half_mask((32, 32), 255).save(masks / "b.png")
    (masks / "c.png").write_bytes(b"junk")
    spec = dataset(subset(images, conditioning_data_dir=masks))
    with pytest.raises(UserError) as info:
        build_dataset_group([spec], seed=0)
    assert info.value.problems == [
        f"1 image(s) have no mask in {masks} (conditioning_data_dir; a mask has its image's name, any image "
        "extension): d.png",
        f"mask {masks / 'b.png'} is 32x32 but its image b.png is 64x64; a mask must have its image's size",
    ]
    (images / "d.png").unlink()
    half_mask((64, 64), 255).save(masks / "b.png")
    ds = build_dataset_group([spec], seed=0).datasets[0]
    assert [i.path.name for i in ds.items] == ["a.png", "b.png"]
    assert ds.skipped == [
        (images / "c.png", f"its mask {masks / 'c.png'} is unreadable (unknown or corrupt image format)")
    ]


def test_subsets_with_and_without_masks_share_batches(tmp_path: Path) -> None:
    alpha = make_images(tmp_path / "alpha", {"a": (64, 64)}, alpha=True)
    plain = make_images(tmp_path / "plain", {"p": (64, 64)})
    group = build_dataset_group(
        [dataset(subset(alpha, alpha_mask=True), subset(plain), batch_size=2)], seed=0
    )
    batch = group.load_batch(0, 0)
    masks = dict(zip([Path(p).stem for p in batch["image_paths"]], batch["masks"], strict=True))
    assert masks["p"].eq(1).all()  # no mask: full loss weight
    assert masks["a"][0, :, :32].eq(100 / 255).all() and masks["a"][0, :, 32:].eq(0).all()


@pytest.mark.parametrize("to_disk", [False, True], ids=["ram", "disk"])
def test_masks_are_cached_with_the_latents(tmp_path: Path, to_disk: bool) -> None:
    images = make_images(tmp_path / "img", {"a": (64, 64), "b": (96, 64), "c": (64, 64)}, alpha=True)
    spec = dataset(subset(images, alpha_mask=True, flip_aug=True), batch_size=2)
    uncached = build_dataset_group([spec], seed=5)
    group = build_dataset_group([spec], seed=5)
    assert cache(group, to_disk=to_disk) == (0, 3)
    for epoch in range(3):
        for step in range(group.num_batches_per_epoch):
            want, got = uncached.load_batch(epoch, step), group.load_batch(epoch, step)
            assert got["images"] is None and want["image_paths"] == got["image_paths"]
            assert torch.equal(want["masks"], got["masks"])
    if to_disk:
        with np.load(images / "b_0096x0064_sd.npz") as npz:
            assert npz["alpha_mask"].dtype == np.float32 and npz["alpha_mask"].shape == (64, 64)
            assert str(npz["mask_source"]) == "alpha"
    else:
        assert not list(images.glob("*.npz"))


# ------------------------------------------------------------------------------------- cache staleness


def test_disk_cache_is_rebuilt_when_what_it_depends_on_changes(tmp_path: Path) -> None:
    images = make_images(tmp_path / "img", SQUARES)

    def group(**kw):
        return build_dataset_group([dataset(subset(images, **kw))], seed=0)

    assert check_latent_cache(group(), "v") == (0, 3)
    assert cache(group()) == (0, 3)
    assert check_latent_cache(group(), "v") == (3, 0)
    assert cache(group()) == (3, 0)
    stamp = (images / "a.png").stat()
    os.utime(images / "a.png", ns=(stamp.st_atime_ns, stamp.st_mtime_ns + 1_000_000_000))  # touched
    assert cache(group()) == (2, 1)
    Image.new("RGB", (64, 64), (1, 2, 3)).save(images / "b.png")  # replaced
    assert cache(group()) == (2, 1)
    assert cache(group(), cache_id="other vae") == (0, 3)
    assert cache(group(resize_interpolation="bicubic")) == (0, 3)
    assert cache(group()) == (0, 3)
    assert cache(group(alpha_mask=True)) == (0, 3)  # a mask is needed now
    assert cache(group()) == (3, 0)  # a file holding more than needed is fine
    assert cache(group(alpha_mask=True, flip_aug=True)) == (0, 3)  # flipped latents are needed now
    assert cache(group(flip_aug=True)) == (3, 0)
    npz = images / "a_0064x0064_sd.npz"
    before = npz.stat().st_mtime_ns
    assert check_latent_cache(group(alpha_mask=True, flip_aug=True), "v") == (3, 0)
    assert npz.stat().st_mtime_ns == before  # checking changes nothing


def test_mask_file_changes_rebuild_the_cache(tmp_path: Path) -> None:
    images = make_images(tmp_path / "img", SQUARES)
    masks = tmp_path / "masks"
    masks.mkdir()
    for name in SQUARES:
        half_mask((64, 64), 255).save(masks / f"{name}.png")

    def group():
        return build_dataset_group([dataset(subset(images, conditioning_data_dir=masks))], seed=0)

    assert cache(group()) == (0, 3)
    assert cache(group()) == (3, 0)
    half_mask((64, 64), 128).save(masks / "c.png")
    assert cache(group()) == (2, 1)
    with np.load(images / "c_0064x0064_sd.npz") as npz:
        assert npz["alpha_mask"][0, 0] == np.float32(128 / 255)
        assert str(npz["mask_source"]).startswith("file:c.png:")


def test_kohya_files_are_reused_when_they_fit(tmp_path: Path) -> None:
    images = make_images(tmp_path / "img", {"a": (64, 64)})
    kohya = {
        "latents": np.zeros((4, 8, 8), np.float32),
        "original_size": np.array([64, 64]),
        "crop_ltrb": np.array([0, 0, 64, 64]),
        "alpha_mask": np.ones((64, 64), np.float32),
    }
    np.savez(images / "a_0064x0064_sd.npz", **kohya)
    masks = tmp_path / "masks"
    masks.mkdir()
    half_mask((64, 64), 255).save(masks / "a.png")
    assert check_latent_cache(
        build_dataset_group([dataset(subset(images, alpha_mask=True))], seed=0), "v"
    ) == (1, 0)
    # kohya's masks are alpha masks: for a mask file the file's provenance is unknown, so it is rebuilt.
    with_file = build_dataset_group([dataset(subset(images, conditioning_data_dir=masks))], seed=0)
    assert check_latent_cache(with_file, "v") == (0, 1)


def test_skip_cache_check_trusts_existence(tmp_path: Path) -> None:
    images = make_images(tmp_path / "img", SQUARES)
    for name in SQUARES:
        (images / f"{name}_0064x0064_sd.npz").write_bytes(b"not a cache")
    group = build_dataset_group([dataset(subset(images))], seed=0)
    assert check_latent_cache(group, "v") == (0, 3)
    assert check_latent_cache(group, "v", skip_check=True) == (3, 0)


def test_random_augmentations_cannot_be_cached(tmp_path: Path) -> None:
    images = make_images(tmp_path / "img", SQUARES)
    subsets = [
        subset(images, random_crop=True),
        subset(images, color_aug=True, face_crop_aug_range=(2.0, 4.0)),
        subset(images, flip_aug=True),
    ]
    assert cache_problems(subsets, "--cache_latents_to_disk") == [
        f"--cache_latents_to_disk is not compatible with random_crop: subset {images} has random_crop = true "
        "(a cached latent would freeze one augmented sample); remove random_crop or --cache_latents_to_disk",
        f"--cache_latents_to_disk is not compatible with color_aug: subset {images} has color_aug = true "
        "(a cached latent would freeze one augmented sample); remove color_aug or --cache_latents_to_disk",
        f"--cache_latents_to_disk is not compatible with face_crop_aug_range: subset {images} has "
        "face_crop_aug_range = [2.0, 4.0] (a cached latent would freeze one augmented sample); remove "
        "face_crop_aug_range or --cache_latents_to_disk",
    ]


# ---------------------------------------------------------------------------- images broken after the scan


def damage(path: Path) -> None:
    """Flip bytes inside the pixel data; the header and the end stay intact, so only decoding fails."""
    data = bytearray(path.read_bytes())
    for k in range(len(data) // 2, len(data) // 2 + 8):
        data[k] ^= 0xFF
    path.write_bytes(bytes(data))


def test_image_broken_after_the_scan_is_replaced_in_its_bucket(tmp_path: Path, caplog) -> None:
    images = make_images(tmp_path / "img", {"a": (64, 64), "b": (64, 64), "c": (64, 64), "w": (128, 64)})
    spec = dataset(subset(images), batch_size=3)
    group = build_dataset_group([spec], seed=0)
    damage(images / "b.png")
    paths = [Path(p).name for p in group.load_batch(0, group.batch_order(0).index(0))["image_paths"]]
    assert sorted(paths) == ["a.png", "c.png", "c.png"]  # b's place goes to the image after it
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and warnings[0].startswith(f"cannot read image {images / 'b.png'}: ")
    again = build_dataset_group([spec], seed=0)
    assert [Path(p).name for p in again.load_batch(0, again.batch_order(0).index(0))["image_paths"]] == paths
    again.strict = True
    with pytest.raises(UserError, match=f"cannot read image {images / 'b.png'}: "):
        again.load_batch(0, again.batch_order(0).index(0))


def test_image_broken_after_the_scan_is_skipped_by_caching(tmp_path: Path) -> None:
    images = make_images(tmp_path / "img", SQUARES)
    group = build_dataset_group([dataset(subset(images), batch_size=3)], seed=0)
    damage(images / "a.png")
    report = cache_latents(
        group, PoolEncoder(), cache_id="v", to_disk=False, batch_size=4, show_progress=False
    )
    assert (report.encoded, report.unreadable) == (2, 1)
    assert str(report) == "latent cache (RAM): 2 encoded, 0 reused, 1 unreadable (skipped)"
    assert group.latents_in_memory()
    batch = group.load_batch(0, 0)
    assert batch["latents"].shape[0] == 3 and "a.png" not in [Path(p).name for p in batch["image_paths"]]


def test_unreadable_image_of_a_metadata_subset_is_skipped(tmp_path: Path) -> None:
    images = make_images(tmp_path / "img", {"a": (64, 64), "b": (64, 64)})
    (images / "b.png").write_bytes(b"")
    meta = tmp_path / "meta.json"
    meta.write_text('{"a.png": {"caption": "one"}, "b.png": {"caption": "two"}}')
    spec = dataset(subset(images, metadata_file=meta))
    ds = build_dataset_group([spec], seed=0).datasets[0]
    assert [i.path.name for i in ds.items] == ["a.png"]
    assert ds.skipped == [(images / "b.png", "unreadable (empty file (0 bytes))")]
    with pytest.raises(UserError) as info:
        build_dataset_group([spec], seed=0, strict_dataset=True)
    assert info.value.problems == [
        f"cannot read image {images / 'b.png'}: empty file (0 bytes); fix or remove the file"
    ]
