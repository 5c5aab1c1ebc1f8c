"""The plan, --dry_run and --debug_dataset: everything checked and printed, nothing trained, no weights."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from train_helpers import db_args, make_images, run_main

from library.data.dataset import build_dataset_group
from library.data.dataset_config import DatasetSpec, SubsetSpec
from library.data.plan import TrainingNumbers
from library.families.sd import StableDiffusionFamily


@pytest.fixture
def no_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    def load(*args: object, **kwargs: object) -> None:
        raise AssertionError("weights loaded")

    monkeypatch.setattr(StableDiffusionFamily, "load", load)


def png(path: Path, w: int, h: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (w, h), (10, 200, 30)).save(path)
    path.with_suffix(".caption").write_text("a, b")
    return path


def spec(folder: Path, repeats: int = 1, batch_size: int = 4) -> DatasetSpec:
    sub = SubsetSpec(
        image_dir=folder, num_repeats=repeats, is_reg=False, class_tokens=None, caption_extension=".caption",
        shuffle_caption=False, caption_separator=",", keep_tokens=0, caption_prefix=None, caption_suffix=None,
        flip_aug=False, random_crop=False,
    )  # fmt: skip
    return DatasetSpec((128, 128), batch_size, True, 64, 256, 64, False, (sub,))


def test_plan_small_buckets_most_cropped_and_steps(tmp_path: Path) -> None:
    for name in ("a", "b", "c", "d", "e"):
        png(tmp_path / "img" / f"{name}.png", 128, 128)
    png(tmp_path / "img" / "wide.png", 192, 64)  # exact bucket: not cropped
    png(tmp_path / "img" / "tall.png", 70, 200)  # -> 64x192
    png(tmp_path / "img" / "odd.png", 150, 120)  # -> 128x128, cropped
    group = build_dataset_group([spec(tmp_path / "img", repeats=1, batch_size=4)], seed=0)
    numbers = TrainingNumbers(
        max_train_steps=7, num_epochs=3, batches_per_epoch=5, gradient_accumulation_steps=2, from_epochs=False
    )
    text = group.plan_text(numbers, "Latent cache (disk): 1 valid cache files reused, 7 images to encode")
    lines = text.splitlines()
    assert (
        "  note: bucket 64x192 has 1 item(s) (images x repeats), fewer than batch size 4, so it trains as a "
        "smaller batch of 1: tall.png"
    ) in lines
    assert (
        "  note: bucket 192x64 has 1 item(s) (images x repeats), fewer than batch size 4, so it trains as a "
        "smaller batch of 1: wide.png"
    ) in lines
    assert not any("bucket 128x128 has" in line for line in lines)  # 6 items: two batches, the last of 2
    i = lines.index("  most cropped (2 of 8 images are cropped to fit their bucket):")
    assert lines[i + 1 : i + 3] == [  # largest aspect-ratio error first
        "    odd.png: 150x120 -> 128x128, aspect-ratio error 0.250, 20.0% cut off",
        "    tall.png: 70x200 -> 64x192, aspect-ratio error 0.017, 4.5% cut off",
    ]
    assert (
        "Steps: 5 batches per epoch, gradient accumulation 2 = 3 optimizer steps per epoch; 7 steps in 3 epochs "
        "(the last one partly), from --max_train_steps 7"
    ) in lines
    assert "Latent cache (disk): 1 valid cache files reused, 7 images to encode" in lines


def test_dry_run_prints_the_plan_and_loads_no_weights(
    tiny_sd1_dir: Path, data2: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], no_weights: None
) -> None:
    out = tmp_path / "out"
    args = db_args(
        tiny_sd1_dir, data2, out, "--dry_run", "--max_train_epochs", "3", "--gradient_accumulation_steps", "2",
        "--cache_latents_to_disk",
    )  # fmt: skip
    started = time.perf_counter()
    assert run_main(args) == 0
    assert time.perf_counter() - started < 20
    stdout = capsys.readouterr().out
    assert "Dataset 1/1: resolution 64x64, batch size 2, fixed size (bucketing off)" in stdout
    assert (
        "Steps: 2 batches per epoch, gradient accumulation 2 = 1 optimizer steps per epoch; 3 steps in 3 epochs, "
        "from --max_train_epochs 3"
    ) in stdout
    assert "Latent cache (disk): 0 valid cache files reused, 2 images to encode" in stdout
    assert stdout.rstrip().endswith("dry run: nothing was trained and no weights were loaded")
    assert not out.exists() or not any(out.iterdir())


def test_dry_run_sees_disk_caches_a_real_run_wrote(
    tiny_sd1_dir: Path, data2: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = db_args(tiny_sd1_dir, data2, tmp_path / "out", "--cache_latents_to_disk", "--max_train_steps", "1")
    assert run_main(args) == 0
    run_out = capsys.readouterr().out
    # The plan at the start of a real run is the same, steps included.
    assert "Steps: 2 batches per epoch = 2 optimizer steps per epoch; 1 steps in 1 epochs" in run_out
    assert "Latent cache (disk): 0 valid cache files reused, 2 images to encode" in run_out
    assert run_main(args + ["--dry_run", "--overwrite"]) == 0
    assert "Latent cache (disk): 2 valid cache files reused, 0 images to encode" in capsys.readouterr().out


def test_debug_dataset_writes_the_training_crops(
    tiny_sd1_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], no_weights: None
) -> None:
    data = make_images(tmp_path / "data", n=2, repeats=2)  # 4 items, batch 2: 2 batches per epoch
    out = tmp_path / "out"
    assert run_main(db_args(tiny_sd1_dir, data, out, "--debug_dataset")) == 0
    stdout = capsys.readouterr().out
    previews = sorted((out / "debug_dataset").iterdir())
    assert len(previews) == 4 and all(p.name.startswith(("e01-b00001-", "e01-b00002-")) for p in previews)
    assert f"debug_dataset: 4 preview images in {out / 'debug_dataset'}; nothing was trained" in stdout
    folder = data / "2_sks shape"
    for preview in previews:
        source = folder / (preview.stem.split("-", 3)[3] + ".png")
        # 64x64 images at resolution 64: the crop is the whole image, so the preview equals the file
        assert np.array_equal(np.array(Image.open(preview)), np.array(Image.open(source).convert("RGB")))
        caption = (folder / (source.stem + ".caption")).read_text()
        assert (
            f'{source}  64x64 -> 64x64, crop top-left (0, 0), flipped False, loss weight 1, caption: "{caption}"'
            in stdout
        )
    assert "epoch 1: 2 batches" in stdout and "epoch 2" not in stdout
    custom = tmp_path / "previews"
    args = db_args(tiny_sd1_dir, data, out, "--debug_dataset", "--debug_dataset_dir", str(custom),
                   "--debug_dataset_epochs", "2")  # fmt: skip
    assert run_main(args) == 0
    assert len(list(custom.iterdir())) == 8 and "epoch 2: 2 batches" in capsys.readouterr().out
