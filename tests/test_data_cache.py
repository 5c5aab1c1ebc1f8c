"""Latent cache: kohya file names and keys, reuse, invalidation, flipped latents, RAM and disk serving."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from library.data.dataset import build_dataset_group
from library.data.dataset_config import DatasetSpec, SubsetSpec
from library.data.latent_cache import cache_latents
from library.errors import UserError


class PoolEncoder:
    """A deterministic stand-in for a VAE: 8x8 average pooling to 4 channels; counts encoded images."""

    def __init__(self) -> None:
        self.images = 0

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        assert pixels.dtype == torch.float32 and pixels.min() >= -1 and pixels.max() <= 1
        self.images += pixels.shape[0]
        return F.avg_pool2d(pixels, 8)[:, [0, 1, 2, 0]]


def make_group(root: Path, *, flip_aug: bool = False, random_crop: bool = False, seed: int = 0):
    image_dir = root / "img"
    image_dir.mkdir(parents=True, exist_ok=True)
    sizes = {"wide": (192, 64), "square": (128, 128), "tall": (64, 200)}
    for name, size in sizes.items():
        if (image_dir / f"{name}.png").exists():
            continue  # rewriting would change the mtime, which (rightly) invalidates disk caches
        image = Image.new("RGB", size, (200, 30, 30))
        image.paste((20, 20, 220), (0, 0, size[0] // 3, size[1]))  # asymmetric, so flips differ
        image.save(image_dir / f"{name}.png")
    subset = SubsetSpec(
        image_dir, 2, False, "thing", ".caption", False, ",", 0, None, None, flip_aug, random_crop
    )
    spec = DatasetSpec((128, 128), 2, True, 64, 256, 64, False, (subset,))
    return build_dataset_group([spec], seed=seed)


def test_disk_cache_kohya_names_keys_and_reuse(tmp_path: Path) -> None:
    group = make_group(tmp_path)
    encoder = PoolEncoder()
    report = cache_latents(group, encoder, cache_id="vae-a", to_disk=True, batch_size=2, show_progress=False)
    assert (report.reused, report.encoded, encoder.images) == (0, 3, 3)
    names = sorted(p.name for p in (tmp_path / "img").glob("*.npz"))
    assert names == ["square_0128x0128_sd.npz", "tall_0064x0200_sd.npz", "wide_0192x0064_sd.npz"]
    with np.load(tmp_path / "img" / "wide_0192x0064_sd.npz") as npz:
        assert sorted(npz.files) == [
            "bucket_reso",
            "cache_id",
            "crop_ltrb",
            "image_file",
            "latents",
            "original_size",
            "pixel_crop",
            "resize_interpolation",
        ]
        assert npz["latents"].shape == (4, 8, 24) and npz["latents"].dtype == np.float32
        assert npz["original_size"].tolist() == [192, 64]
        assert npz["crop_ltrb"].tolist() == [0.0, 0.0, 192.0, 64.0]
        assert str(npz["cache_id"]) == "vae-a"
    assert not list((tmp_path / "img").glob("*.tmp"))

    fresh = make_group(tmp_path)
    encoder = PoolEncoder()
    report = cache_latents(fresh, encoder, cache_id="vae-a", to_disk=True, batch_size=2, show_progress=False)
    assert (report.reused, report.encoded, encoder.images) == (3, 0, 0)

    report = cache_latents(fresh, encoder, cache_id="vae-b", to_disk=True, batch_size=2, show_progress=False)
    assert (report.reused, report.encoded) == (0, 3)


def test_disk_cache_serves_latents_in_load_batch(tmp_path: Path) -> None:
    group = make_group(tmp_path)
    cache_latents(group, PoolEncoder(), cache_id="v", to_disk=True, batch_size=4, show_progress=False)
    assert group.latents_cached and not group.latents_in_memory()
    assert all(i.latents is None for _, i in group.iter_items())
    batch = group.load_batch(0, 0)
    assert batch["images"] is None
    latents = batch["latents"]
    assert latents.dtype == torch.float32 and latents.shape[1] == 4
    h, w = batch["target_sizes_hw"][0].tolist()
    assert latents.shape[2:] == (h // 8, w // 8)
    for path, lat in zip(batch["image_paths"], latents, strict=True):
        stem = Path(path).stem
        (npz_path,) = Path(path).parent.glob(f"{stem}_*_sd.npz")
        with np.load(npz_path) as npz:
            assert torch.equal(lat, torch.from_numpy(npz["latents"]))


def test_flip_aug_stores_and_serves_flipped_latents(tmp_path: Path) -> None:
    group = make_group(tmp_path, flip_aug=True)
    encoder = PoolEncoder()
    report = cache_latents(group, encoder, cache_id="v", to_disk=True, batch_size=2, show_progress=False)
    assert report.encoded == 3 and encoder.images == 6  # each image and its mirror
    with np.load(tmp_path / "img" / "square_0128x0128_sd.npz") as npz:
        latents, flipped = npz["latents"], npz["latents_flipped"]
    assert np.allclose(flipped, latents[:, :, ::-1], atol=1e-6)  # pooling commutes with the mirror
    assert not np.allclose(flipped, latents)

    # An existing cache without flipped latents is invalid once flip_aug is on.
    plain = make_group(tmp_path / "plain")
    cache_latents(plain, PoolEncoder(), cache_id="v", to_disk=True, batch_size=2, show_progress=False)
    flipping = make_group(tmp_path / "plain", flip_aug=True)
    report = cache_latents(
        flipping, PoolEncoder(), cache_id="v", to_disk=True, batch_size=2, show_progress=False
    )
    assert report.encoded == 3

    ram = make_group(tmp_path / "ram", flip_aug=True)
    cache_latents(ram, PoolEncoder(), cache_id="v", to_disk=False, batch_size=2, show_progress=False)
    seen = set()
    for step in range(ram.num_batches_per_epoch):
        batch = ram.load_batch(0, step)
        for path, lat, flip in zip(batch["image_paths"], batch["latents"], batch["flipped"], strict=True):
            item = next(i for _, i in ram.iter_items() if str(i.path) == path)
            assert torch.equal(lat, item.latents_flipped if flip else item.latents)
            seen.add(flip)
    assert seen == {True, False}


def test_kohya_made_file_is_reused_and_stale_files_are_replaced(tmp_path: Path) -> None:
    group = make_group(tmp_path)
    img = tmp_path / "img"
    # kohya's writer: no cache_id key.
    np.savez(
        img / "square_0128x0128_sd.npz",
        latents=np.zeros((4, 16, 16), np.float32),
        original_size=np.array([128, 128]),
        crop_ltrb=np.array([0, 0, 128, 128]),
    )
    np.savez(  # wrong latent size for its bucket
        img / "wide_0192x0064_sd.npz",
        latents=np.zeros((4, 8, 8), np.float32),
        original_size=np.array([192, 64]),
        crop_ltrb=np.array([0, 0, 192, 64]),
    )
    (img / "tall_0064x0200_sd.npz").write_bytes(b"truncated garbage")
    encoder = PoolEncoder()
    report = cache_latents(group, encoder, cache_id="v", to_disk=True, batch_size=8, show_progress=False)
    assert (report.reused, report.encoded, encoder.images) == (1, 2, 2)
    with np.load(img / "wide_0192x0064_sd.npz") as npz:
        assert npz["latents"].shape == (4, 8, 24)
    with np.load(img / "tall_0064x0200_sd.npz") as npz:
        assert npz["latents"].shape == (4, 24, 8)


def test_ram_cache_and_reuse(tmp_path: Path) -> None:
    group = make_group(tmp_path)
    encoder = PoolEncoder()
    report = cache_latents(group, encoder, cache_id="v", to_disk=False, batch_size=1, show_progress=False)
    assert (report.reused, report.encoded, report.to_disk) == (0, 3, False)
    assert not list((tmp_path / "img").glob("*.npz"))
    assert group.latents_in_memory()
    batch = group.load_batch(1, 0)
    assert batch["images"] is None and batch["latents"].shape[1] == 4
    report = cache_latents(group, encoder, cache_id="v", to_disk=False, batch_size=1, show_progress=False)
    assert (report.reused, report.encoded) == (3, 0)


def test_random_crop_cannot_be_cached(tmp_path: Path) -> None:
    group = make_group(tmp_path, random_crop=True)
    with pytest.raises(UserError, match=r"cache_latents is not compatible with random_crop: subset .*img"):
        cache_latents(group, PoolEncoder(), cache_id="v", to_disk=False, batch_size=1, show_progress=False)


def test_real_tiny_vae(tmp_path: Path) -> None:
    from library.families.tiny import build_tiny_sd

    vae = build_tiny_sd("sd1").vae

    def encode(pixels: torch.Tensor) -> torch.Tensor:
        return vae.encode(pixels).latent_dist.mode()

    group = make_group(tmp_path)
    report = cache_latents(group, encode, cache_id="tiny", to_disk=True, batch_size=2, show_progress=False)
    assert report.encoded == 3
    with np.load(tmp_path / "img" / "tall_0064x0200_sd.npz") as npz:
        assert npz["latents"].shape == (4, 24, 8)
    batch = group.load_batch(0, 0)
    assert batch["latents"].shape[1] == 4 and torch.isfinite(batch["latents"]).all()
