"""Masked loss (math and end to end), augmentation flags through the real entry point, and the offline
tools/cache_latents.py whose files training then reuses."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from train_helpers import NAME, common_args, db_args, error_lines, make_images, metadata, run_main

from library.families.sd import StableDiffusionFamily
from library.training.step import apply_loss_mask
from tools.cache_latents import main as cache_main


@pytest.fixture
def no_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    def load(*args: object, **kwargs: object) -> None:
        raise AssertionError("weights loaded")

    monkeypatch.setattr(StableDiffusionFamily, "load", load)


def mask_toml(toml: Path, data: Path, masks: Path) -> Path:
    toml.write_text(
        f'[general]\nresolution = 64\n\n[[datasets]]\n  [[datasets.subsets]]\n  image_dir = "{data / "2_sks shape"}"\n'
        f'  num_repeats = 2\n  conditioning_data_dir = "{masks}"\n'
    )
    return toml


def write_masks(folder: Path, stems: list[str], value: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for stem in stems:
        Image.new("RGB", (64, 64), (value, 0, 0)).save(folder / f"{stem}.png")
    return folder


# ------------------------------------------------------------------------------------------ loss math


def test_masked_loss_by_hand() -> None:
    loss = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]], [[[4.0, 4.0], [4.0, 4.0]]]])  # [2, 1, 2, 2] latent loss
    mask = torch.zeros(2, 1, 16, 16)  # pixel masks, 8 pixels per latent cell
    mask[0, 0, :8, :8] = 1.0  # sample 0: the top-left cell fully
    mask[0, 0, 8:, 8:12] = 1.0  # and half of the bottom-right cell
    mask[1, 0, :, :] = 0.25
    masked = apply_loss_mask(loss, mask)
    assert masked.tolist() == [[[[1.0, 0.0], [0.0, 2.0]]], [[[1.0, 1.0], [1.0, 1.0]]]]
    # kohya's reduction: the spatial mean over every cell, masked ones included.
    assert masked.mean(dim=(1, 2, 3)).tolist() == [0.75, 1.0]


# ---------------------------------------------------------------------------------------- end to end


def test_masks_change_training_exactly_as_multiplied(tiny_sd1_dir: Path, tmp_path: Path) -> None:
    data = make_images(tmp_path / "data", n=2)
    stems = ["img0", "img1"]
    plain, white, black = tmp_path / "plain", tmp_path / "white", tmp_path / "black"
    assert run_main(db_args(tiny_sd1_dir, data, plain, "--max_train_steps", "2")) == 0
    for out, value in ((white, 255), (black, 0)):
        toml = mask_toml(
            tmp_path / f"{out.name}.toml", data, write_masks(tmp_path / f"masks_{out.name}", stems, value)
        )
        args = common_args(
            tiny_sd1_dir, out, "--dataset_config", str(toml), "--masked_loss", "--max_train_steps", "2"
        )
        assert run_main(args) == 0
    reference = load_file(str(plain / f"{NAME}.safetensors"))
    same = load_file(str(white / f"{NAME}.safetensors"))
    assert all(torch.equal(reference[k], same[k]) for k in reference)  # a full mask changes nothing
    untrained = load_file(str(black / f"{NAME}.safetensors"))
    ups = [v for k, v in untrained.items() if k.endswith("lora_up.weight")]
    assert ups and all(v.eq(0).all() for v in ups)  # an empty mask: zero loss, zero gradient, no update
    assert metadata(white / f"{NAME}.safetensors")["ss_masked_loss"] == "True"


def test_alpha_mask_is_cached_to_disk(tiny_sd1_dir: Path, tmp_path: Path) -> None:
    data = make_images(tmp_path / "data", n=2)
    folder = data / "2_sks shape"
    for path in folder.glob("*.png"):
        image = Image.open(path).convert("RGBA")
        image.putalpha(Image.new("L", image.size, 128))
        image.save(path)
    args = [
        "--alpha_mask",
        "--masked_loss",
        "--cache_latents_to_disk",
        "--flip_aug",
        "--max_train_steps",
        "2",
    ]
    assert run_main(db_args(tiny_sd1_dir, data, tmp_path / "out", *args)) == 0
    with np.load(folder / "img0_0064x0064_sd.npz") as npz:
        assert sorted(npz.files) == [
            "alpha_mask",
            "bucket_reso",
            "cache_id",
            "crop_ltrb",
            "image_file",
            "latents",
            "latents_flipped",
            "mask_source",
            "original_size",
            "pixel_crop",
            "resize_interpolation",
        ]
        assert np.all(npz["alpha_mask"] == np.float32(128 / 255))


def test_augmentation_flags_reach_the_run_and_metadata(tiny_sd1_dir: Path, tmp_path: Path) -> None:
    data = make_images(tmp_path / "data", n=2)
    args = [
        "--color_aug",
        "--face_crop_aug_range",
        "2,4",
        "--resize_interpolation",
        "bicubic",
        "--max_train_steps",
        "2",
    ]
    assert run_main(db_args(tiny_sd1_dir, data, tmp_path / "out", *args)) == 0
    md = metadata(tmp_path / "out" / f"{NAME}.safetensors")
    assert (md["ss_color_aug"], md["ss_face_crop_aug_range"], md["ss_resize_interpolation"]) == (
        "True",
        "2,4",
        "bicubic",
    )


def test_bad_combinations_are_reported_before_weights_load(
    tiny_sd1_dir: Path, tmp_path: Path, capsys, no_weights
) -> None:
    data = make_images(tmp_path / "data", n=2)
    folder = (data / "2_sks shape").resolve()
    args = db_args(
        tiny_sd1_dir,
        data,
        tmp_path / "out",
        "--color_aug",
        "--cache_latents",
        "--masked_loss",
        "--face_crop_aug_range",
        "4",
    )
    assert run_main(args) == 2
    assert error_lines(capsys) == [
        'error: --face_crop_aug_range must be two numbers "lo,hi" with 0 < lo <= hi (crop side / face size, '
        "e.g. 2.0,4.0), got '4'"
    ]
    args = db_args(tiny_sd1_dir, data, tmp_path / "out", "--color_aug", "--cache_latents", "--masked_loss")
    assert run_main(args) == 2
    assert error_lines(capsys) == [
        "error: --masked_loss needs masks: with --train_data_dir pass --alpha_mask (the images' alpha channel), "
        "or use a --dataset_config with conditioning_data_dir (mask images) per subset",
    ]
    args = db_args(tiny_sd1_dir, data, tmp_path / "out", "--color_aug", "--cache_latents", "--alpha_mask")
    assert run_main(args) == 2
    assert error_lines(capsys) == [
        f"error: --cache_latents is not compatible with color_aug: subset {folder} has color_aug = true (a cached "
        "latent would freeze one augmented sample); remove color_aug or --cache_latents",
    ]
    toml = mask_toml(tmp_path / "ds.toml", data, write_masks(tmp_path / "masks", ["img0", "img1"], 255))
    args = common_args(
        tiny_sd1_dir, tmp_path / "out", "--dataset_config", str(toml), "--max_train_steps", "1"
    )
    assert run_main(args) == 2
    assert error_lines(capsys) == [
        f"error: {toml}: datasets[0].subsets[0].conditioning_data_dir holds mask images, which only --masked_loss "
        "uses; pass --masked_loss or remove it"
    ]


# ------------------------------------------------------------------------------------ tools/cache_latents


def test_cache_latents_tool_then_training_reuses(tiny_sd1_dir: Path, tmp_path: Path, capsys, caplog) -> None:
    data = make_images(tmp_path / "data", n=3)
    folder = data / "2_sks shape"
    argv = ["--pretrained_model_name_or_path", str(tiny_sd1_dir), "--train_data_dir", str(data)]
    argv += [
        "--resolution",
        "64",
        "--vae_batch_size",
        "2",
        "--seed",
        "1",
        "--network_dim",
        "8",
    ]  # training flags pass
    assert cache_main(argv) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "latents cached to disk: 3 encoded, 0 reused"
    assert sorted(p.name for p in folder.glob("*.npz")) == [f"img{i}_0064x0064_sd.npz" for i in range(3)]
    assert cache_main(argv) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "latents cached to disk: 0 encoded, 3 reused"

    caplog.set_level(logging.INFO)
    args = db_args(tiny_sd1_dir, data, tmp_path / "out", "--cache_latents_to_disk", "--max_train_steps", "1")
    assert run_main(args) == 0
    assert "latents: latent cache (disk): 0 encoded, 3 reused" in caplog.messages

    assert cache_main(["--train_data_dir", str(data), "--resolution", "64"]) == 2
    assert error_lines(capsys) == [
        "error: --pretrained_model_name_or_path is required (its VAE encodes the images)"
    ]
