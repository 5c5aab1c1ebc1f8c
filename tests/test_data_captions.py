"""Caption files and the caption pipeline, with exact outputs for seeded generators."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from library.data.captions import caption_candidates, count_tags, process_caption, read_caption
from library.errors import UserError


def test_prefix_suffix_joined_with_space() -> None:
    out = process_caption("a, b", prefix="pre,", suffix=", post", rng=random.Random(0))
    assert out == "pre, a, b , post"


def test_no_shuffle_leaves_caption_untouched() -> None:
    assert process_caption(" a ,b,  c ", keep_tokens=2, rng=random.Random(0)) == " a ,b,  c "


def test_first_line_only() -> None:
    assert process_caption("one, two\nthree", rng=random.Random(0)) == "one, two"


def test_shuffle_exact_with_seed() -> None:
    caption = "sks dog, red collar, grass, sunny, park"
    out = process_caption(caption, shuffle=True, rng=random.Random(42))
    assert out == "sunny, red collar, grass, park, sks dog"
    # the same seed gives the same caption; the output is random.shuffle on the stripped tags
    tags = [t.strip() for t in caption.split(",")]
    random.Random(42).shuffle(tags)
    assert out == ", ".join(tags)


def test_keep_tokens_fixed_and_prefix_counts() -> None:
    caption = "red collar, grass, sunny, park"
    out = process_caption(caption, prefix="sks dog,", shuffle=True, keep_tokens=1, rng=random.Random(3))
    assert out.startswith("sks dog, ")
    assert out == "sks dog, park, red collar, sunny, grass"
    flexible = ["red collar", "grass", "sunny", "park"]
    random.Random(3).shuffle(flexible)
    assert out == ", ".join(["sks dog", *flexible])


def test_custom_separator_rejoined_with_comma_space() -> None:
    out = process_caption("a;b;c", shuffle=True, separator=";", keep_tokens=3, rng=random.Random(0))
    assert out == "a, b, c"


def test_read_caption_first_line_and_fallbacks(tmp_path: Path) -> None:
    image = tmp_path / "img.png"
    assert read_caption(image, ".caption") is None
    (tmp_path / "img.caption").write_text("\ufefffirst line \nsecond\n", encoding="utf-8")
    assert read_caption(image, ".caption") == "first line"
    face = tmp_path / "photo_1_2_3_4.png"
    (tmp_path / "photo.txt").write_text("face crop caption", encoding="utf-8")
    assert caption_candidates(face, ".txt") == [tmp_path / "photo_1_2_3_4.txt", tmp_path / "photo.txt"]
    assert read_caption(face, ".txt") == "face crop caption"


def test_read_caption_errors_name_the_file(tmp_path: Path) -> None:
    (tmp_path / "bad.caption").write_bytes(b"caf\xe9\n")
    with pytest.raises(UserError, match=r"bad\.caption is not UTF-8"):
        read_caption(tmp_path / "bad.png", ".caption")
    (tmp_path / "empty.caption").write_text("", encoding="utf-8")
    with pytest.raises(UserError, match=r"empty\.caption is empty"):
        read_caption(tmp_path / "empty.png", ".caption")


def test_count_tags_like_kohya() -> None:
    assert count_tags(["A, b", "a,  ,c", ""]) == {"a": 2, "b": 1, "c": 1}
