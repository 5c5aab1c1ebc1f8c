"""kohya's per-family latent cache files in training and in the caching tools: `_sdxl.npz` (SDXL) and
`_flux.npz` with the latent size on every key (FLUX); kohya's own files are reused."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from train_helpers import common_args, db_args, error_lines, flux_files_args, make_images, run_flux, run_sdxl

from tools.cache_latents import main as latents_tool
from tools.cache_text_encoder_outputs import main as te_tool

OURS = ["bucket_reso", "cache_id", "crop_ltrb", "image_file", "latents", "original_size", "pixel_crop"]
OURS += ["resize_interpolation"]
KOHYA = ["crop_ltrb", "latents", "original_size"]


def npz_keys(path: Path) -> list[str]:
    with np.load(path) as npz:
        return sorted(npz.files)


def kohya_file(path: Path, channels: int, suffix: str = "") -> None:
    """What kohya writes for a 64x64 image in a 64x64 bucket: its keys only."""
    arrays = {"latents": np.zeros((channels, 8, 8), np.float32), "original_size": np.array([64, 64])}
    arrays["crop_ltrb"] = np.array([0, 0, 64, 64])
    np.savez(path, **{key + suffix: value for key, value in arrays.items()})


def cache_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [m for m in caplog.messages if m.startswith("latents: latent cache")]


def test_sdxl_writes_and_reuses_sdxl_files(
    tiny_sdxl_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = make_images(tmp_path / "data", n=2)
    folder = data / "2_sks shape"
    kohya_file(folder / "img0_0064x0064_sdxl.npz", 4)
    caplog.set_level(logging.INFO)
    args = ["--max_train_steps", "1", "--cache_latents_to_disk", "--network_train_unet_only"]
    assert run_sdxl(db_args(tiny_sdxl_dir, data, tmp_path / "a", *args)) == 0
    assert cache_lines(caplog) == ["latents: latent cache (disk): 1 encoded, 1 reused"]
    names = sorted(p.name for p in folder.glob("*.npz"))
    assert names == ["img0_0064x0064_sdxl.npz", "img1_0064x0064_sdxl.npz"]
    assert npz_keys(folder / "img0_0064x0064_sdxl.npz") == KOHYA  # reused, not rewritten
    assert npz_keys(folder / "img1_0064x0064_sdxl.npz") == OURS
    caplog.clear()
    assert run_sdxl(db_args(tiny_sdxl_dir, data, tmp_path / "b", *args)) == 0
    assert cache_lines(caplog) == ["latents: latent cache (disk): 0 encoded, 2 reused"]


def test_flux_files_hold_every_resolution_of_an_image(
    tiny_flux, tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture
) -> None:
    data = make_images(tmp_path / "data", n=2)
    folder = data / "2_sks shape"
    toml = tmp_path / "two_sizes.toml"
    toml.write_text(
        "".join(
            f"[[datasets]]\nresolution = {r}\nbatch_size = 2\n\n  [[datasets.subsets]]\n  image_dir = '{folder}'\n\n"
            for r in (64, 128)
        )
    )
    kohya_file(folder / "img0_0064x0064_flux.npz", 16, "_8x8")
    caplog.set_level(logging.INFO)
    args = ["--dataset_config", str(toml), "--max_train_steps", "4", "--cache_latents_to_disk"]
    args += [*flux_files_args(tiny_flux), "--t5xxl_max_token_length", "16"]
    assert run_flux(common_args(tiny_flux.transformer, tmp_path / "a", *args)) == 0
    assert cache_lines(caplog) == ["latents: latent cache (disk): 3 encoded, 1 reused"]
    names = sorted(p.name for p in folder.glob("*.npz"))
    assert names == ["img0_0064x0064_flux.npz", "img1_0064x0064_flux.npz"]
    sixteen = [f"{key}_16x16" for key in OURS]
    assert npz_keys(folder / "img1_0064x0064_flux.npz") == sorted([f"{key}_8x8" for key in OURS] + sixteen)
    # kohya's 8x8 entry stays as kohya wrote it; the 16x16 one joins it in the same file
    assert npz_keys(folder / "img0_0064x0064_flux.npz") == sorted([f"{key}_8x8" for key in KOHYA] + sixteen)
    with np.load(folder / "img1_0064x0064_flux.npz") as npz:
        assert npz["latents_8x8"].shape == (16, 8, 8) and npz["latents_16x16"].shape == (16, 16, 16)
    capsys.readouterr()
    assert run_flux([*common_args(tiny_flux.transformer, tmp_path / "b", *args), "--dry_run"]) == 0
    assert "Latent cache (disk): 4 valid cache files reused, 0 images to encode" in capsys.readouterr().out
    caplog.clear()
    assert run_flux(common_args(tiny_flux.transformer, tmp_path / "b", *args)) == 0
    assert cache_lines(caplog) == ["latents: latent cache (disk): 0 encoded, 4 reused"]


def test_caching_tools_take_kohyas_family_switches(
    tiny_sdxl_dir: Path, tiny_flux, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    data = make_images(tmp_path / "data", n=2)
    folder = data / "2_sks shape"
    common = ["--train_data_dir", str(data), "--resolution", "64", "--seed", "1"]
    flux = ["--pretrained_model_name_or_path", str(tiny_flux.transformer), *flux_files_args(tiny_flux)]
    assert latents_tool(["--flux", *flux, *common]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "latents cached to disk: 2 encoded, 0 reused"
    assert npz_keys(folder / "img0_0064x0064_flux.npz") == [f"{key}_8x8" for key in OURS]
    assert latents_tool(["--pretrained_model_name_or_path", str(tiny_sdxl_dir), *common, "--sdxl"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "latents cached to disk: 2 encoded, 0 reused"
    assert sorted(p.name for p in folder.glob("*.npz")) == [
        "img0_0064x0064_flux.npz",
        "img0_0064x0064_sdxl.npz",
        "img1_0064x0064_flux.npz",
        "img1_0064x0064_sdxl.npz",
    ]
    assert latents_tool(["--flux", *flux, *common]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "latents cached to disk: 0 encoded, 2 reused"

    assert te_tool(["--flux", *flux, *common, "--t5xxl_max_token_length", "16"]) == 0
    assert (
        capsys.readouterr().out.splitlines()[-1] == "text-encoder outputs cached to disk: 2 encoded, 0 reused"
    )
    for tool in (latents_tool, te_tool):
        assert tool(["--sdxl", "--flux", *flux, *common]) == 2
        assert error_lines(capsys) == [
            "error: --flux and --sdxl pick different model families; pass one of them"
        ]
