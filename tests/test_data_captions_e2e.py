"""End to end: a tiny training run whose dataset TOML uses the caption pipeline; the captions the loss
function received are recorded and compared with the pipeline's exact output for each batch position."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from PIL import Image
from train_helpers import common_args, metadata, run_main

import library.training.loop as loop
from library.data.captions import CaptionOptions, process_caption

TOML = """
[general]
resolution = 64
caption_extension = ".txt"
shuffle_caption = true
keep_tokens_separator = "|||"
caption_dropout_rate = 0

[[datasets]]
batch_size = 2
secondary_separator = ";;;"
enable_wildcard = true
caption_dropout_every_n_epochs = 3

  [[datasets.subsets]]
  image_dir = "img"
  num_repeats = 2
  caption_prefix = "sks |||"
  caption_suffix = "||| best quality"
  token_warmup_min = 1
  token_warmup_step = 2
"""
CAPTIONS = {"a.png": "{red|blue} square, grass;;;sky, sunny", "b.png": "circle, x, y\nround thing, z"}
OPTIONS = CaptionOptions(
    caption_prefix="sks |||",
    caption_suffix="||| best quality",
    shuffle_caption=True,
    keep_tokens_separator="|||",
    secondary_separator=";;;",
    enable_wildcard=True,
    caption_dropout_every_n_epochs=3,
    token_warmup_min=1,
    token_warmup_step=2,
)


def test_training_sees_processed_captions(
    tiny_sd1_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "img").mkdir()
    for i, (name, caption) in enumerate(CAPTIONS.items()):
        Image.new("RGB", (64, 64), (60 * i, 120, 200)).save(tmp_path / "img" / name)
        (tmp_path / "img" / name).with_suffix(".txt").write_text(caption, encoding="utf-8")
    (tmp_path / "ds.toml").write_text(TOML, encoding="utf-8")

    seen: list[tuple[list[str], list[str]]] = []
    real_loss = loop.diffusion_loss

    def recording_loss(family, bundle, batch, *args, **kwargs):
        seen.append(([Path(p).name for p in batch["image_paths"]], list(batch["captions"])))
        return real_loss(family, bundle, batch, *args, **kwargs)

    monkeypatch.setattr(loop, "diffusion_loss", recording_loss)
    out = tmp_path / "out"
    argv = common_args(
        tiny_sd1_dir,
        out,
        "--dataset_config",
        str(tmp_path / "ds.toml"),
        "--max_train_epochs",
        "3",
        "--caption_dropout_rate",
        "0.5",  # recorded in ss_caption_dropout_rate (kohya records the flag); [general] sets 0 for the data
        "--caption_tag_dropout_rate",
        "0",
    )
    assert run_main(argv) == 0

    # 2 images x 2 repeats, batch 2: 2 steps per epoch, 3 epochs; warmup over 2 steps
    assert len(seen) == 6
    for index, (names, captions) in enumerate(seen):
        epoch, batch_index = divmod(index, 2)
        rng = random.Random(f"7/{epoch}/{batch_index}/caption")
        expected = [
            process_caption(CAPTIONS[n], OPTIONS, rng, epoch=epoch + 1, step=index, max_train_steps=6)
            for n in names
        ]
        assert captions == expected
    first, last = seen[0][1], [c for _, captions in seen[4:] for c in captions]
    assert last == ["", "", "", ""]  # epoch 3 drops every caption
    # step 0 keeps one flexible tag between the fixed prefix and suffix
    assert all(c.startswith("sks, ") and c.endswith(", best quality") and c.count(", ") == 2 for c in first)
    # epoch 2, after the warmup: every tag is there; the ;;; group moved as one; markers never leak
    for names, captions in seen[2:4]:
        for name, caption in zip(names, captions, strict=True):
            assert "|||" not in caption and ";;;" not in caption and "{" not in caption
            if name == "a.png":
                assert "grass,sky" in caption and ("red square" in caption or "blue square" in caption)
                assert len(caption.split(", ")) == 2 + 3

    md = metadata(out / "feat.safetensors")
    assert md["ss_caption_dropout_rate"] == "0.5"
    assert md["ss_caption_dropout_every_n_epochs"] == "0" and md["ss_caption_tag_dropout_rate"] == "0.0"
    (subset,) = json.loads(md["ss_datasets"])[0]["subsets"]
    assert {k: subset[k] for k in vars(OPTIONS) if k in subset} == {
        "caption_prefix": "sks |||",
        "caption_suffix": "||| best quality",
        "shuffle_caption": True,
        "keep_tokens": 0,
        "keep_tokens_separator": "|||",
        "secondary_separator": ";;;",
        "enable_wildcard": True,
        "caption_dropout_rate": 0.0,
        "caption_dropout_every_n_epochs": 3,
        "caption_tag_dropout_rate": 0.0,
        "token_warmup_min": 1,
        "token_warmup_step": 2.0,
    }
