"""Dataset config schema, value resolution, messages, DreamBooth folders and every shipped config."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from PIL import Image

from library.data.dataset import build_dataset_group
from library.data.dataset_config import (
    DatasetDefaults,
    blueprint_from_dirs,
    load_dataset_blueprint,
    parse_dreambooth_folder_name,
)
from library.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def make_dirs(root: Path, *names: str) -> list[Path]:
    out = []
    for name in names:
        (root / name).mkdir(parents=True, exist_ok=True)
        out.append(root / name)
    return out


def errors_of(path: Path, defaults: DatasetDefaults | None = None) -> list[str]:
    with pytest.raises(UserError) as info:
        load_dataset_blueprint(path, defaults or DatasetDefaults(resolution=(512, 512)))
    return info.value.problems


def test_resolution_order_subset_dataset_general_cli_default(tmp_path: Path) -> None:
    make_dirs(tmp_path, "a", "b", "c")
    cfg = write(
        tmp_path / "ds.toml",
        """
[general]
num_repeats = 2
flip_aug = true
caption_extension = ".txt"
shuffle_caption = true
enable_bucket = true

[[datasets]]
resolution = [768, 512]
num_repeats = 3
caption_extension = ".tags"
  [[datasets.subsets]]
  image_dir = "a"
  num_repeats = 5
  caption_prefix = "pre"
  [[datasets.subsets]]
  image_dir = "b"
  is_reg = true
  flip_aug = false

[[datasets]]
batch_size = 3
  [[datasets.subsets]]
  image_dir = "c"
""",
    )
    defaults = DatasetDefaults(
        resolution=(512, 512), train_batch_size=4, keep_tokens=2, shuffle_caption=False
    )
    first, second = load_dataset_blueprint(cfg, defaults)
    a, b = first.subsets
    assert (a.num_repeats, b.num_repeats, second.subsets[0].num_repeats) == (
        5,
        3,
        2,
    )  # subset > dataset > general
    assert (a.caption_extension, second.subsets[0].caption_extension) == (".tags", ".txt")
    assert (a.flip_aug, b.flip_aug) == (True, False)
    assert a.shuffle_caption is True  # general beats the CLI value
    assert a.keep_tokens == 2 and a.caption_separator == ","  # CLI value, then default
    assert (a.caption_prefix, b.caption_prefix, a.class_tokens) == ("pre", None, None)
    assert (a.image_dir, b.is_reg, a.is_reg) == ((tmp_path / "a").resolve(), True, False)
    assert (first.resolution, second.resolution) == ((768, 512), (512, 512))
    assert (first.batch_size, second.batch_size) == (4, 3)
    assert first.enable_bucket and (
        first.min_bucket_reso,
        first.max_bucket_reso,
        first.bucket_reso_steps,
    ) == (256, 1024, 64)


def test_json_config_and_legacy_extension_key(tmp_path: Path) -> None:
    make_dirs(tmp_path, "imgs")
    data = {
        "general": {"resolution": 512, "caption_extention": "txt"},
        "datasets": [{"subsets": [{"image_dir": "imgs"}]}],
    }
    cfg = write(tmp_path / "ds.json", json.dumps(data))
    (spec,) = load_dataset_blueprint(cfg, DatasetDefaults())
    assert spec.resolution == (512, 512)
    assert spec.subsets[0].caption_extension == ".txt"


def test_type_error_names_file_and_key_path(tmp_path: Path) -> None:
    make_dirs(tmp_path, "a", "b")
    cfg = write(
        tmp_path / "ds.toml",
        """
[[datasets]]
  [[datasets.subsets]]
  image_dir = "a"
  [[datasets.subsets]]
  image_dir = "b"
  num_repeats = "ten"
""",
    )
    assert errors_of(cfg) == [f'{cfg}: datasets[0].subsets[1].num_repeats must be an integer, got "ten"']


def test_all_problems_reported_at_once(tmp_path: Path) -> None:
    make_dirs(tmp_path, "a")
    cfg = write(
        tmp_path / "ds.toml",
        """
[general]
num_repeat = 3
shuffle_caption = "yes"
resize_interpolation = "cubicc"
image_dir = "a"
batch_size = 0

[[datasets]]
resolution = [512]
  [[datasets.subsets]]
  image_dir = "missing_folder"
  batch_size = 2
""",
    )
    problems = errors_of(cfg)
    assert problems == [
        f'{cfg}: general.num_repeat is not a known key (did you mean "num_repeats"?)',
        f'{cfg}: general.shuffle_caption must be true or false, got "yes"',
        f"{cfg}: general.resize_interpolation must be one of lanczos, nearest, bilinear, linear, bicubic, cubic, "
        'area, got "cubicc"',
        f"{cfg}: general.image_dir is not allowed in [general]; put it in [[datasets.subsets]]",
        f"{cfg}: general.batch_size must be >= 1, got 0",
        f"{cfg}: datasets[0].resolution must be a positive integer or [width, height], got [512]",
        f"{cfg}: datasets[0].subsets[0].batch_size is not allowed in [[datasets.subsets]]; put it in [general] or [[datasets]]",
        f'{cfg}: datasets[0].subsets[0].image_dir folder "missing_folder" does not exist '
        f"(looked in {tmp_path / 'missing_folder'} and {Path.cwd() / 'missing_folder'}); fix the path",
    ]


def test_known_but_noop_keys_are_accepted(tmp_path: Path) -> None:
    make_dirs(tmp_path, "a")
    cfg = write(
        tmp_path / "ds.toml",
        """
[general]
color_aug = false
caption_dropout_rate = 0.0
enable_wildcard = false
[[datasets]]
  [[datasets.subsets]]
  image_dir = "a"
  keep_tokens_separator = ""
""",
    )
    assert len(load_dataset_blueprint(cfg, DatasetDefaults(resolution=(512, 512)))) == 1
    write(cfg, cfg.read_text() + "  network_multiplier = 0.5\n")
    assert errors_of(cfg) == [
        f"{cfg}: datasets[0].subsets[0].network_multiplier is not supported yet "
        "(only network_multiplier = 1 is accepted for now); remove it"
    ]


def test_toml_syntax_error_is_one_line(tmp_path: Path) -> None:
    cfg = write(tmp_path / "ds.toml", "[general]\nresolution = 512\nimage_dir = img\n")
    problems = errors_of(cfg)
    assert len(problems) == 1
    assert problems[0].startswith(f"{cfg}:3: TOML syntax error: Invalid value (column 13); values must be")


def test_missing_resolution_and_structure(tmp_path: Path) -> None:
    make_dirs(tmp_path, "a")
    cfg = write(tmp_path / "ds.toml", '[[datasets]]\n  [[datasets.subsets]]\n  image_dir = "a"\n')
    assert errors_of(cfg, DatasetDefaults()) == [
        f"{cfg}: datasets[0]: resolution is not set; add e.g. resolution = 512 to [general] or pass --resolution 512"
    ]
    empty = write(tmp_path / "empty.toml", "[general]\nresolution = 512\n")
    assert "no [[datasets]] found" in errors_of(empty)[0]
    no_subsets = write(tmp_path / "nosub.toml", "[[datasets]]\nresolution = 512\n")
    assert "has no [[datasets.subsets]]" in errors_of(no_subsets)[0]


def test_bucket_range_must_bracket_resolution(tmp_path: Path) -> None:
    make_dirs(tmp_path, "a")
    body = '[[datasets]]\nenable_bucket = true\n{}\n  [[datasets.subsets]]\n  image_dir = "a"\n'
    cfg = write(tmp_path / "ds.toml", body.format("min_bucket_reso = 768"))
    assert errors_of(cfg) == [
        f"{cfg}: datasets[0]: min_bucket_reso 768 (from datasets[0].min_bucket_reso) is larger than the "
        "smaller side of resolution 512x512; set min_bucket_reso <= 512"
    ]
    cfg = write(tmp_path / "ds.toml", body.format("min_bucket_reso = 250\nmax_bucket_reso = 1000"))
    (spec,) = load_dataset_blueprint(cfg, DatasetDefaults(resolution=(512, 512)))
    assert (spec.min_bucket_reso, spec.max_bucket_reso) == (192, 1024)  # snapped like kohya
    problems = errors_of(cfg, DatasetDefaults(resolution=(512, 2048)))
    assert "max_bucket_reso 1024 (from datasets[0].max_bucket_reso) is smaller than" in problems[0]


def test_relative_image_dir_config_folder_then_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = write(
        tmp_path / "configs" / "ds.toml", '[[datasets]]\n  [[datasets.subsets]]\n  image_dir = "imgs"\n'
    )
    make_dirs(tmp_path, "imgs")
    monkeypatch.chdir(tmp_path)
    (spec,) = load_dataset_blueprint(cfg, DatasetDefaults(resolution=(512, 512)))
    assert spec.subsets[0].image_dir == (tmp_path / "imgs").resolve()  # not next to the config: the CWD
    make_dirs(tmp_path / "configs", "imgs")
    (spec,) = load_dataset_blueprint(cfg, DatasetDefaults(resolution=(512, 512)))
    assert spec.subsets[0].image_dir == (tmp_path / "configs" / "imgs").resolve()


def test_dreambooth_folder_names() -> None:
    assert parse_dreambooth_folder_name("10_sks dog") == (10, "sks dog")
    assert parse_dreambooth_folder_name("3_a_b") == (3, "a_b")
    assert parse_dreambooth_folder_name("5") == (5, None)
    assert parse_dreambooth_folder_name("dog") is None
    assert parse_dreambooth_folder_name("0_dog") is None


def test_blueprint_from_dirs(tmp_path: Path) -> None:
    make_dirs(tmp_path / "train", "10_sks dog", "2_sks dog sitting", ".ipynb_checkpoints")
    make_dirs(tmp_path / "reg", "1_dog")
    defaults = DatasetDefaults(resolution=(512, 512), train_batch_size=2, flip_aug=True)
    (spec,) = blueprint_from_dirs(tmp_path / "train", tmp_path / "reg", defaults)
    got = [(s.image_dir.name, s.num_repeats, s.class_tokens, s.is_reg, s.flip_aug) for s in spec.subsets]
    assert got == [
        ("10_sks dog", 10, "sks dog", False, True),
        ("2_sks dog sitting", 2, "sks dog sitting", False, True),
        ("1_dog", 1, "dog", True, True),
    ]
    assert (spec.batch_size, spec.resolution, spec.subsets[0].caption_extension) == (
        2,
        (512, 512),
        ".caption",
    )


def test_blueprint_from_dirs_errors(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    make_dirs(tmp_path / "bad", "dog")
    with pytest.raises(UserError) as info:
        blueprint_from_dirs(tmp_path / "bad", None, DatasetDefaults(resolution=(512, 512)))
    assert info.value.problems == [
        f"--train_data_dir: {tmp_path / 'bad' / 'dog'} is not named <repeats>_<class tokens>; rename it to e.g. 10_dog"
    ]
    with pytest.raises(UserError, match="--resolution is required"):
        blueprint_from_dirs(tmp_path / "bad", None, DatasetDefaults())
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("RGB", (8, 8)).save(flat / "x.png")
    with pytest.raises(UserError, match="holds images directly"):
        blueprint_from_dirs(flat, None, DatasetDefaults(resolution=(512, 512)))
    # a usable folder next to a badly named one: the bad one is skipped with a warning
    make_dirs(tmp_path / "bad", "4_dog")
    with caplog.at_level(logging.WARNING):
        (spec,) = blueprint_from_dirs(tmp_path / "bad", None, DatasetDefaults(resolution=(512, 512)))
    assert [s.image_dir.name for s in spec.subsets] == ["4_dog"]
    assert "skipping" in caplog.text and "10_dog" in caplog.text


@pytest.mark.parametrize(
    "config", sorted(p.name for p in (REPO / "dataset_configs").iterdir() if p.suffix in (".toml", ".json"))
)
def test_every_shipped_config_loads_and_builds(config: str) -> None:
    specs = load_dataset_blueprint(REPO / "dataset_configs" / config, DatasetDefaults())
    assert specs and all(s.subsets for s in specs)
    group = build_dataset_group(specs, seed=0)
    assert group.num_batches_per_epoch > 0
