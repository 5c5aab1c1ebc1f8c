"""Caption settings through every kohya level (CLI, [general], [[datasets]], subsets), caption sources, and
the per-step captions a DatasetGroup produces (epoch, global step, seeded and reproducible)."""

from __future__ import annotations

import pickle
import random
from pathlib import Path

import pytest
from PIL import Image

from library.config import load_config_file, parse_config
from library.data.captions import CaptionOptions, process_caption
from library.data.dataset import build_dataset_group
from library.data.dataset_config import DatasetDefaults, blueprint_from_dirs, load_dataset_blueprint
from library.errors import UserError
from library.training.run import dataset_defaults

ARGS = dict(prog="train_network.py", description="test")
CAPTION_FLAGS = [
    "--caption_prefix",
    "sks",
    "--caption_suffix",
    "end",
    "--keep_tokens_separator",
    "|||",
    "--secondary_separator",
    ";;;",
    "--enable_wildcard",
    "--caption_dropout_rate",
    "0.25",
    "--caption_dropout_every_n_epochs",
    "3",
    "--caption_tag_dropout_rate",
    "0.1",
    "--token_warmup_min",
    "2",
    "--token_warmup_step",
    "0.5",
]


def image(path: Path, caption: str | None = None, ext: str = ".caption", size: int = 64) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), (200, 40, 40)).save(path)
    if caption is not None:
        path.with_suffix(ext).write_text(caption, encoding="utf-8")
    return path


NEW_KEYS = (
    "caption_prefix",
    "caption_suffix",
    "keep_tokens_separator",
    "secondary_separator",
    "enable_wildcard",
    "caption_dropout_rate",
    "caption_dropout_every_n_epochs",
    "caption_tag_dropout_rate",
    "token_warmup_min",
    "token_warmup_step",
)


def options_of(subset) -> dict:
    """A subset's caption options as a dict (kohya key names)."""
    return vars(subset.caption_options)


def options_of_defaults(defaults: DatasetDefaults) -> dict:
    return {name: getattr(defaults, name) for name in NEW_KEYS}


def test_cli_flags_are_kohya_options_with_kohya_defaults() -> None:
    default = dataset_defaults(parse_config([], **ARGS))
    assert options_of_defaults(default) == {
        "caption_prefix": None,
        "caption_suffix": None,
        "keep_tokens_separator": "",
        "secondary_separator": None,
        "enable_wildcard": False,
        "caption_dropout_rate": 0.0,
        "caption_dropout_every_n_epochs": 0,
        "caption_tag_dropout_rate": 0.0,
        "token_warmup_min": 1,
        "token_warmup_step": 0.0,
    }
    given = dataset_defaults(parse_config(CAPTION_FLAGS, **ARGS))
    assert options_of_defaults(given) == {
        "caption_prefix": "sks",
        "caption_suffix": "end",
        "keep_tokens_separator": "|||",
        "secondary_separator": ";;;",
        "enable_wildcard": True,
        "caption_dropout_rate": 0.25,
        "caption_dropout_every_n_epochs": 3,
        "caption_tag_dropout_rate": 0.1,
        "token_warmup_min": 2,
        "token_warmup_step": 0.5,
    }


def test_config_file_accepts_caption_options(tmp_path: Path) -> None:
    cfg = tmp_path / "train.toml"
    cfg.write_text(
        "[dataset]\ncaption_tag_dropout_rate = 0.2\ntoken_warmup_step = 10\nenable_wildcard = true\n"
    )
    assert load_config_file(cfg) == {
        "caption_tag_dropout_rate": 0.2,
        "token_warmup_step": 10.0,
        "enable_wildcard": True,
    }


def test_keys_resolve_subset_dataset_general_cli(tmp_path: Path) -> None:
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    cfg = tmp_path / "ds.toml"
    cfg.write_text(
        """
[general]
resolution = 64
caption_dropout_rate = 0.1
keep_tokens_separator = "|||"
token_warmup_step = 0.25

[[datasets]]
secondary_separator = ";;;"
caption_tag_dropout_rate = 0.3
enable_wildcard = true

  [[datasets.subsets]]
  image_dir = "a"
  caption_dropout_every_n_epochs = 2
  caption_prefix = "sks,"
  token_warmup_min = 3

  [[datasets.subsets]]
  image_dir = "b"
  caption_dropout_rate = 0
  enable_wildcard = false
  token_warmup_step = 20
""",
        encoding="utf-8",
    )
    cli = DatasetDefaults(caption_suffix="cli suffix", caption_dropout_every_n_epochs=5, token_warmup_min=4)
    (spec,) = load_dataset_blueprint(cfg, cli)
    a, b = spec.subsets
    common = dict(shuffle_caption=False, caption_separator=",", keep_tokens=0, keep_tokens_separator="|||")
    assert options_of(a) == {
        **common,
        "caption_prefix": "sks,",
        "caption_suffix": "cli suffix",
        "secondary_separator": ";;;",
        "enable_wildcard": True,
        "caption_dropout_rate": 0.1,
        "caption_dropout_every_n_epochs": 2,
        "caption_tag_dropout_rate": 0.3,
        "token_warmup_min": 3,
        "token_warmup_step": 0.25,
    }
    assert options_of(b) == {
        **common,
        "caption_prefix": None,
        "caption_suffix": "cli suffix",
        "secondary_separator": ";;;",
        "enable_wildcard": False,
        "caption_dropout_rate": 0.0,
        "caption_dropout_every_n_epochs": 5,
        "caption_tag_dropout_rate": 0.3,
        "token_warmup_min": 4,
        "token_warmup_step": 20.0,
    }


def test_bad_caption_values_reported_together(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    cfg = tmp_path / "ds.toml"
    cfg.write_text(
        """
[general]
resolution = 64
caption_dropout_rate = 1.5
caption_tag_dropout_rate = "0.1"
[[datasets]]
token_warmup_step = -1
  [[datasets.subsets]]
  image_dir = "a"
  caption_dropout_every_n_epochs = 0.5
  enable_wildcard = 1
""",
        encoding="utf-8",
    )
    with pytest.raises(UserError) as info:
        load_dataset_blueprint(cfg, DatasetDefaults())
    assert info.value.problems == [
        f"{cfg}: general.caption_dropout_rate must be <= 1, got 1.5",
        f'{cfg}: general.caption_tag_dropout_rate must be a number, got "0.1"',
        f"{cfg}: datasets[0].token_warmup_step must be >= 0, got -1.0",
        f"{cfg}: datasets[0].subsets[0].caption_dropout_every_n_epochs must be an integer, got 0.5",
        f"{cfg}: datasets[0].subsets[0].enable_wildcard must be true or false, got 1",
    ]


def test_bad_caption_flags_name_the_flag(tmp_path: Path) -> None:
    defaults = DatasetDefaults(
        resolution=(64, 64),
        caption_tag_dropout_rate=2.0,
        caption_dropout_every_n_epochs=-1,
        token_warmup_min=-2,
    )
    with pytest.raises(UserError) as info:
        blueprint_from_dirs(tmp_path, None, defaults)
    assert info.value.problems[:3] == [
        "--caption_dropout_every_n_epochs must be >= 0, got -1",
        "--token_warmup_min must be >= 0, got -2",
        "--caption_tag_dropout_rate must be <= 1, got 2.0",
    ]


# --- caption sources ----------------------------------------------------------------------------------------


def test_other_caption_extension_is_a_loud_warning_in_the_plan(tmp_path: Path) -> None:
    image(tmp_path / "train" / "10_sks dog" / "a.png", "a dog on grass", ext=".txt")
    image(tmp_path / "train" / "10_sks dog" / "b.png")
    specs = blueprint_from_dirs(tmp_path / "train", None, DatasetDefaults(resolution=(64, 64)))
    group = build_dataset_group(specs, seed=0)
    folder = tmp_path / "train" / "10_sks dog"
    warning = (
        f"  WARNING: {folder}: no .caption caption files, but .txt files are there, so every image is trained "
        'on the class tokens "sks dog" alone; if those are the captions, set caption_extension = ".txt" '
        "(or --caption_extension .txt)"
    )
    assert warning in group.plan_text().splitlines()
    assert [item.caption for _, item in group.iter_items()] == ["sks dog", "sks dog"]
    # with the right extension the captions are used and nothing is reported
    fixed = blueprint_from_dirs(
        tmp_path / "train", None, DatasetDefaults(resolution=(64, 64), caption_extension=".txt")
    )
    group = build_dataset_group(fixed, seed=0)
    assert "WARNING" not in group.plan_text()
    assert [item.caption for _, item in group.iter_items()] == ["a dog on grass", "sks dog"]


def test_no_caption_and_no_class_tokens_is_an_error_naming_the_fix(tmp_path: Path) -> None:
    image(tmp_path / "train" / "10" / "a.png", "a caption", ext=".txt")
    specs = blueprint_from_dirs(tmp_path / "train", None, DatasetDefaults(resolution=(64, 64)))
    with pytest.raises(UserError) as info:
        build_dataset_group(specs, seed=0)
    assert info.value.problems == [
        f"1 image(s) in {tmp_path / 'train' / '10'} have no caption file (.caption) and the folder has no "
        'class_tokens: a.png; found a.txt: set caption_extension = ".txt"'
    ]


def test_non_utf8_caption_is_an_error_naming_the_file(tmp_path: Path) -> None:
    folder = tmp_path / "train" / "2_sks"
    image(folder / "a.png", "fine")
    image(folder / "b.png")
    (folder / "b.caption").write_bytes("caf\xe9, latin-1".encode("latin-1"))
    specs = blueprint_from_dirs(tmp_path / "train", None, DatasetDefaults(resolution=(64, 64)))
    with pytest.raises(UserError) as info:
        build_dataset_group(specs, seed=0)
    assert info.value.problems == [
        f"caption file {folder / 'b.caption'} is not UTF-8 (byte 3); re-save it as UTF-8"
    ]


def test_wildcard_subsets_keep_every_caption_line(tmp_path: Path) -> None:
    folder = tmp_path / "train" / "1_x"
    image(folder / "a.png", "first, line\n\nsecond line\n")
    for wildcard, expected in ((False, "first, line"), (True, "first, line\nsecond line")):
        defaults = DatasetDefaults(resolution=(64, 64), enable_wildcard=wildcard)
        group = build_dataset_group(blueprint_from_dirs(tmp_path / "train", None, defaults), seed=0)
        assert [item.caption for _, item in group.iter_items()] == [expected]
    assert group.tag_frequency() == {"1_x": {"first": 1, "line": 1, "second line": 1}}


# --- per-step captions from the dataset group ---------------------------------------------------------------


def group_of(tmp_path: Path, caption: str, repeats: int = 4, **defaults):
    folder = tmp_path / "train" / f"{repeats}_x"
    image(folder / "a.png", caption)
    values = dict(resolution=(64, 64), train_batch_size=1)
    values.update(defaults)
    return build_dataset_group(
        blueprint_from_dirs(tmp_path / "train", None, DatasetDefaults(**values)), seed=3
    )


def test_token_warmup_follows_the_optimizer_step(tmp_path: Path) -> None:
    tags = ", ".join(f"t{i}" for i in range(9))
    group = group_of(tmp_path, tags, token_warmup_min=1, token_warmup_step=0.5)
    # 4 batches per epoch, 2 per optimizer step: 2 steps per epoch; warmup over 0.5 * 8 = 4 steps
    group.set_training_steps(8, gradient_accumulation_steps=2)
    counts = [
        len(group.load_batch(epoch, b)["captions"][0].split(", ")) for epoch in range(3) for b in range(4)
    ]
    # step s keeps 1 + floor(s * 8 / 4) tags: steps 0, 0, 1, 1, 2, 2, 3, 3, then all 9
    assert counts == [1, 1, 3, 3, 5, 5, 7, 7, 9, 9, 9, 9]


def test_caption_dropout_every_n_epochs_counts_epochs_from_one(tmp_path: Path) -> None:
    group = group_of(tmp_path, "a, b", repeats=1, caption_dropout_every_n_epochs=2)
    assert [group.load_batch(epoch, 0)["captions"] for epoch in range(4)] == [["a, b"], [""], ["a, b"], [""]]


def test_captions_are_seeded_by_position_and_survive_pickling(tmp_path: Path) -> None:
    caption = "a, b, c, d, e, f"
    group = group_of(tmp_path, caption, shuffle_caption=True, caption_tag_dropout_rate=0.2)
    seen = [group.load_batch(epoch, b)["captions"][0] for epoch in range(2) for b in range(4)]
    assert len(set(seen)) > 1
    # the caption of a position is process_caption with the generator of (seed, epoch, batch)
    options = CaptionOptions(shuffle_caption=True, caption_tag_dropout_rate=0.2)
    assert seen[5] == process_caption(caption, options, random.Random("3/1/1/caption"), epoch=2, step=5)
    # a copy (DataLoader worker, resumed run) rebuilds the same captions, in any order
    copy = pickle.loads(pickle.dumps(group))
    again = [copy.load_batch(epoch, b)["captions"][0] for epoch in (1, 0) for b in (3, 2, 1, 0)]
    assert again == seen[7:3:-1] + seen[3::-1]
