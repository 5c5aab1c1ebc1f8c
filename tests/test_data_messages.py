"""Dataset mistakes seen through the real entry point: one line each naming the file/key and the fix, exit 2,
before any weights load; a bucket smaller than a batch trains (as kohya) and the plan says so."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image
from train_helpers import common_args, run_main

from library.families.sd import StableDiffusionFamily


@pytest.fixture
def no_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    def load(*args: object, **kwargs: object) -> None:
        raise AssertionError("weights loaded")

    monkeypatch.setattr(StableDiffusionFamily, "load", load)


@pytest.fixture
def images(tmp_path: Path) -> Path:
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, size in enumerate([(64, 64), (64, 64), (128, 64)]):
        Image.new("RGB", size, (40 * i, 100, 200)).save(folder / f"img{i}.png")
        (folder / f"img{i}.caption").write_text(f"shape {i}")
    return folder


def toml(tmp_path: Path, general: str, subset: str = "", images: str = "imgs") -> Path:
    path = tmp_path / "ds.toml"
    path.write_text(
        f"[general]\nresolution = 64\n{general}\n[[datasets]]\n  [[datasets.subsets]]\n"
        f'  image_dir = "{images}"\n{subset}\n'
    )
    return path


def errors(model: Path, tmp_path: Path, config: Path, capsys: pytest.CaptureFixture[str]) -> list[str]:
    rc = run_main(common_args(model, tmp_path / "out", "--dataset_config", str(config)))
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    return err.splitlines()


@pytest.mark.parametrize(
    ("general", "subset", "expected"),
    [
        (
            "",
            "  batch_size = 4",
            "datasets[0].subsets[0].batch_size is not allowed in [[datasets.subsets]]; put it in [general] or "
            "[[datasets]]",
        ),
        ("", "  num_repeats = 2.5", "datasets[0].subsets[0].num_repeats must be an integer, got 2.5"),
        ("flip_aug = 1", "", "general.flip_aug must be true or false, got 1"),
        (
            "enable_bucket = true\nmin_bucket_reso = 128",
            "",
            "datasets[0]: min_bucket_reso 128 (from general.min_bucket_reso) is larger than the smaller side of "
            "resolution 64x64; set min_bucket_reso <= 64",
        ),
    ],
    ids=["wrong_level", "wrong_type_number", "wrong_type_bool", "min_bucket_reso_above_resolution"],
)
def test_config_mistakes(
    general: str,
    subset: str,
    expected: str,
    tiny_sd1_dir: Path,
    tmp_path: Path,
    images: Path,
    capsys,
    no_weights,
) -> None:
    config = toml(tmp_path, general, subset)
    assert errors(tiny_sd1_dir, tmp_path, config, capsys) == [f"error: {config}: {expected}"]


def test_missing_and_empty_folders(tiny_sd1_dir: Path, tmp_path: Path, capsys, no_weights) -> None:
    config = toml(tmp_path, "", images="not_there")
    assert errors(tiny_sd1_dir, tmp_path, config, capsys) == [
        f'error: {config}: datasets[0].subsets[0].image_dir folder "not_there" does not exist (looked in '
        f"{tmp_path / 'not_there'} and {Path.cwd() / 'not_there'}); fix the path"
    ]
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    config = toml(tmp_path, "", images="empty")
    assert errors(tiny_sd1_dir, tmp_path, config, capsys) == [
        f"error: no images in {tmp_path / 'empty'} (looked for .png .jpg .jpeg .webp .bmp; sub-folders are not "
        "searched); add images or remove this folder from the dataset"
    ]


def test_caption_that_is_not_utf8(
    tiny_sd1_dir: Path, tmp_path: Path, images: Path, capsys, no_weights
) -> None:
    (images / "img1.caption").write_bytes(b"caf\xe9 au lait")
    assert errors(tiny_sd1_dir, tmp_path, toml(tmp_path, ""), capsys) == [
        f"error: caption file {images / 'img1.caption'} is not UTF-8 (byte 3); re-save it as UTF-8"
    ]


def test_bucket_smaller_than_a_batch_trains_and_is_named_in_the_plan(
    tiny_sd1_dir: Path, tmp_path: Path, images: Path, capsys, no_weights
) -> None:
    Image.new("RGB", (192, 64)).save(images / "img2.png")  # the only image of the 192x64 bucket
    config = tmp_path / "ds.toml"
    config.write_text(
        "[general]\nresolution = 128\nenable_bucket = true\nmin_bucket_reso = 64\nmax_bucket_reso = 256\n"
        'batch_size = 2\n[[datasets]]\n  [[datasets.subsets]]\n  image_dir = "imgs"\n'
    )
    argv = common_args(tiny_sd1_dir, tmp_path / "out", "--dataset_config", str(config), "--dry_run")
    assert run_main(argv) == 0
    plan = capsys.readouterr().out.splitlines()
    assert (
        "  note: bucket 192x64 has 1 item(s) (images x repeats), fewer than batch size 2, so it trains as a "
        "smaller batch of 1: img2.png"
    ) in plan
    assert sum("fewer than batch size" in line for line in plan) == 1  # 128x128 holds 2 items: a full batch
