"""Multi-resolution latent cache files (kohya's FLUX `_flux.npz`): every key carries the latent size, so one
image cached at several bucket sizes shares one file; writing one size keeps the others."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_data_masks_cache import PoolEncoder, make_images, subset

from library.data.dataset import build_dataset_group
from library.data.dataset_config import DatasetSpec
from library.data.latent_cache import cache_latents, check_latent_cache
from library.errors import UserError

FLUX = {"file_suffix": "_flux", "multi_resolution": True}
OURS = ["bucket_reso", "cache_id", "crop_ltrb", "image_file", "latents", "original_size", "pixel_crop"]
OURS += ["resize_interpolation"]


def spec(resolution: int, *subsets) -> DatasetSpec:
    return DatasetSpec((resolution, resolution), 2, True, 64, 256, 64, False, subsets)


def group(images: Path, *resolutions: int, **subset_kw):
    return build_dataset_group([spec(r, subset(images, **subset_kw)) for r in resolutions], seed=0)


def cache(grp, *, cache_id: str = "v", to_disk: bool = True) -> tuple[int, int]:
    report = cache_latents(
        grp, PoolEncoder(), cache_id=cache_id, to_disk=to_disk, batch_size=2, show_progress=False, **FLUX
    )
    return report.reused, report.encoded


def keys(path: Path) -> list[str]:
    with np.load(path) as npz:
        return sorted(npz.files)


def test_one_file_holds_both_resolutions_and_both_are_reused(tmp_path: Path) -> None:
    images = make_images(tmp_path / "img", {"a": (64, 64), "b": (64, 64)})
    assert check_latent_cache(group(images, 64, 128), "v", **FLUX) == (0, 4)
    assert cache(group(images, 64, 128)) == (0, 4)
    assert sorted(p.name for p in images.glob("*.npz")) == ["a_0064x0064_flux.npz", "b_0064x0064_flux.npz"]
    assert keys(images / "a_0064x0064_flux.npz") == sorted(
        [f"{k}_8x8" for k in OURS] + [f"{k}_16x16" for k in OURS]
    )
    with np.load(images / "a_0064x0064_flux.npz") as npz:
        assert npz["latents_8x8"].shape == (4, 8, 8) and npz["latents_16x16"].shape == (4, 16, 16)
        assert npz["bucket_reso_16x16"].tolist() == [128, 128] and npz["original_size_16x16"].tolist() == [
            64,
            64,
        ]
        assert str(npz["cache_id_8x8"]) == "v"

    assert check_latent_cache(group(images, 64, 128), "v", **FLUX) == (4, 0)
    disk, ram = group(images, 64, 128), group(images, 64, 128)
    assert cache(disk) == (4, 0)
    assert cache(ram, to_disk=False) == (0, 4)
    assert not disk.latents_in_memory() and disk.latents_cached
    for step in range(disk.num_batches_per_epoch):
        want, got = ram.load_batch(0, step), disk.load_batch(0, step)
        assert want["image_paths"] == got["image_paths"]
        assert torch.equal(want["latents"], got["latents"])
    # one resolution alone reuses its part of the file
    assert cache(group(images, 128)) == (2, 0)


def test_writing_one_resolution_keeps_the_others(tmp_path: Path) -> None:
    images = make_images(tmp_path / "img", {"a": (64, 64)})
    npz_path = images / "a_0064x0064_flux.npz"
    assert cache(group(images, 64, flip_aug=True)) == (0, 1)
    assert keys(npz_path) == sorted([f"{k}_8x8" for k in [*OURS, "latents_flipped"]])
    with np.load(npz_path) as npz:
        small = npz["latents_8x8"].copy()
    assert cache(group(images, 128)) == (0, 1)
    assert cache(group(images, 64, flip_aug=True)) == (1, 0)  # still there
    with np.load(npz_path) as npz:
        assert np.array_equal(npz["latents_8x8"], small) and "latents_flipped_8x8" in npz.files

    # a new encoder rewrites 8x8 only; its stale flipped latents go, 16x16 stays as it was
    assert cache(group(images, 64), cache_id="w") == (0, 1)
    assert keys(npz_path) == sorted([f"{k}_8x8" for k in OURS] + [f"{k}_16x16" for k in OURS])
    with np.load(npz_path) as npz:
        assert (str(npz["cache_id_8x8"]), str(npz["cache_id_16x16"])) == ("w", "v")
    assert check_latent_cache(group(images, 128), "v", **FLUX) == (1, 0)
    assert check_latent_cache(group(images, 64), "v", **FLUX) == (0, 1)


def test_kohya_multi_resolution_file_is_reused(tmp_path: Path) -> None:
    images = make_images(tmp_path / "img", {"a": (64, 64)})
    kohya = {}
    for h, value in ((8, 0.25), (16, -0.5)):
        kohya[f"latents_{h}x{h}"] = np.full((4, h, h), value, np.float32)
        kohya[f"original_size_{h}x{h}"] = np.array([64, 64])
        kohya[f"crop_ltrb_{h}x{h}"] = np.array([0, 0, 8 * h, 8 * h])
    np.savez(images / "a_0064x0064_flux.npz", **kohya)
    assert check_latent_cache(group(images, 64, 128), "v", **FLUX) == (2, 0)
    grp = group(images, 64, 128)
    assert cache(grp) == (2, 0)
    served = sorted(grp.load_batch(0, s)["latents"].unique().item() for s in range(grp.num_batches_per_epoch))
    assert served == [-0.5, 0.25]
    # the same keys without the size suffix are an SD-style file: nothing in it fits a FLUX cache
    sizeless = {"latents": kohya["latents_8x8"], "original_size": [64, 64], "crop_ltrb": [0, 0, 64, 64]}
    np.savez(images / "a_0064x0064_flux.npz", **sizeless)
    assert check_latent_cache(group(images, 64), "v", **FLUX) == (0, 1)
    assert cache(group(images, 64)) == (0, 1)
    assert keys(images / "a_0064x0064_flux.npz") == [f"{k}_8x8" for k in OURS]  # the sizeless keys are gone


def test_two_interpolations_at_one_size_share_no_file(tmp_path: Path) -> None:
    images = make_images(tmp_path / "img", {"a": (64, 64)})
    specs = [spec(64, subset(images)), spec(64, subset(images, resize_interpolation="bicubic"))]
    with pytest.raises(UserError) as err:
        cache(build_dataset_group(specs, seed=0))
    assert err.value.problems == [
        f"{images / 'a.png'} is used with 2 resize_interpolation values at one bucket size (64x64 auto, "
        "64x64 bicubic) but its disk cache file a_0064x0064_flux.npz holds one latent per size; cache latents "
        "in RAM or use one interpolation for this folder"
    ]
