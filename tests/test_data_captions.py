"""The caption pipeline (kohya's process_caption order) and caption files, with exact outputs.

Random steps use seeded generators; each expectation is also derived by replaying the same draws on a copy
of the generator, so the tests pin the order of draws as well as the result.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from library.data.captions import (
    CaptionOptions,
    StepSchedule,
    caption_candidates,
    caption_extension_warning,
    count_tags,
    process_caption,
    read_caption,
    warmup_steps,
)
from library.errors import UserError

MIKU = "1girl, hatsune miku, vocaloid ||| stage, microphone, white shirt, smile ||| best quality, rating: general"


def run(caption: str, rng: int = 0, **options) -> str:
    return process_caption(caption, CaptionOptions(**options), random.Random(rng))


# --- prefix / suffix, first line, no-op -------------------------------------------------------------------


def test_prefix_suffix_joined_with_space() -> None:
    assert run("a, b", caption_prefix="pre,", caption_suffix=", post") == "pre, a, b , post"


def test_nothing_active_leaves_caption_untouched() -> None:
    # keep_tokens alone does not split (kohya): spacing and separators stay as written
    assert run(" a ,b,  c ", keep_tokens=2) == " a ,b,  c "


def test_without_wildcard_only_the_first_line_is_used() -> None:
    assert run("one, two\nthree", caption_prefix="p") == "p one, two"
    assert run("1girl, {simple|white} background") == "1girl, {simple|white} background"


# --- shuffle and keep_tokens ------------------------------------------------------------------------------


def test_shuffle_exact_with_seed() -> None:
    caption = "sks dog, red collar, grass, sunny, park"
    out = run(caption, 42, shuffle_caption=True)
    assert out == "sunny, red collar, grass, park, sks dog"
    tags = [t.strip() for t in caption.split(",")]
    random.Random(42).shuffle(tags)
    assert out == ", ".join(tags)


def test_keep_tokens_fixed_and_prefix_counts() -> None:
    out = run(
        "red collar, grass, sunny, park", 3, caption_prefix="sks dog,", shuffle_caption=True, keep_tokens=1
    )
    assert out == "sks dog, park, red collar, sunny, grass"
    flexible = ["red collar", "grass", "sunny", "park"]
    random.Random(3).shuffle(flexible)
    assert out == ", ".join(["sks dog", *flexible])


def test_custom_separator_rejoined_with_comma_space() -> None:
    assert run("a;b;c", shuffle_caption=True, caption_separator=";", keep_tokens=3) == "a, b, c"


def test_empty_tags_are_dropped_when_splitting() -> None:
    assert run("a, b,, c,", shuffle_caption=True, keep_tokens=3) == "a, b, c"


# --- keep_tokens_separator (kohya docs: "1girl, hatsune miku, vocaloid ||| ... ||| ...") ----------------


def test_keep_tokens_separator_fixed_prefix_and_suffix() -> None:
    out = run(MIKU, 1, keep_tokens_separator="|||", shuffle_caption=True, keep_tokens=5)
    assert (
        out
        == "1girl, hatsune miku, vocaloid, smile, stage, white shirt, microphone, best quality, rating: general"
    )
    flexible = ["stage", "microphone", "white shirt", "smile"]
    random.Random(1).shuffle(flexible)
    assert out == ", ".join(
        ["1girl", "hatsune miku", "vocaloid", *flexible, "best quality", "rating: general"]
    )


def test_tag_dropout_touches_only_flexible_tags() -> None:
    out = run(MIKU, 1, keep_tokens_separator="|||", caption_tag_dropout_rate=0.3)
    assert out == "1girl, hatsune miku, vocaloid, microphone, white shirt, best quality, rating: general"
    rng = random.Random(1)
    kept = [t for t in ["stage", "microphone", "white shirt", "smile"] if rng.random() >= 0.3]
    assert out == ", ".join(["1girl", "hatsune miku", "vocaloid", *kept, "best quality", "rating: general"])
    assert run(MIKU, keep_tokens_separator="|||", caption_tag_dropout_rate=1.0) == (
        "1girl, hatsune miku, vocaloid, best quality, rating: general"
    )


def test_kohya_doc_prefix_and_suffix_with_separators() -> None:
    """The kohya docs' TOML: the prefix ends and the suffix holds a `|||`, so the caption file needs none."""
    options = dict(
        caption_prefix="1girl, hatsune miku, vocaloid |||",
        caption_suffix=", anime screencap ||| masterpiece, rating: general",
        keep_tokens_separator="|||",
        shuffle_caption=True,
    )
    out = run("stage, smile", 2, **options)
    flexible = ["stage", "smile", "anime screencap"]
    random.Random(2).shuffle(flexible)
    assert out == ", ".join(
        ["1girl", "hatsune miku", "vocaloid", *flexible, "masterpiece", "rating: general"]
    )
    assert out == "1girl, hatsune miku, vocaloid, smile, anime screencap, stage, masterpiece, rating: general"


def test_keep_tokens_separator_never_reaches_the_text_encoder() -> None:
    # nothing shuffled or dropped: the parts are joined anyway (kohya would keep " ||| " in the caption)
    assert run("1girl, miku ||| stage ||| best", keep_tokens_separator="|||") == "1girl, miku, stage, best"


def test_without_the_separator_in_the_caption_keep_tokens_applies() -> None:
    out = run("a, b, c, d", 5, keep_tokens_separator="|||", keep_tokens=2, shuffle_caption=True)
    flexible = ["c", "d"]
    random.Random(5).shuffle(flexible)
    assert out == ", ".join(["a", "b", *flexible])


# --- secondary_separator ----------------------------------------------------------------------------------

SKY = "1girl, hatsune miku, vocaloid, upper body, looking at viewer, sky;;;cloud;;;day, outdoors"


def test_secondary_separator_replaced_by_caption_separator() -> None:
    assert run(SKY, secondary_separator=";;;") == (
        "1girl, hatsune miku, vocaloid, upper body, looking at viewer, sky,cloud,day, outdoors"
    )


def test_secondary_separator_group_shuffles_as_one_tag() -> None:
    out = run(SKY, 0, secondary_separator=";;;", shuffle_caption=True)
    tags = [
        "1girl",
        "hatsune miku",
        "vocaloid",
        "upper body",
        "looking at viewer",
        "sky;;;cloud;;;day",
        "outdoors",
    ]
    random.Random(0).shuffle(tags)
    assert out == ", ".join(tags).replace(";;;", ",")
    assert out == "looking at viewer, vocaloid, hatsune miku, 1girl, sky,cloud,day, upper body, outdoors"


# --- wildcards and multi-line captions --------------------------------------------------------------------


def test_wildcard_choices_and_escaped_braces() -> None:
    caption = "1girl, {simple|white} background, {{retro style}}"
    assert run(caption, 0, enable_wildcard=True) == "1girl, white background, {retro style}"
    assert random.Random(0).choice(["simple", "white"]) == "white"
    seen = {run(caption, seed, enable_wildcard=True) for seed in range(20)}
    assert seen == {"1girl, simple background, {retro style}", "1girl, white background, {retro style}"}


def test_multi_line_caption_picks_one_line_with_prefix_and_suffix() -> None:
    caption = "1girl, miku, stage\na girl on a stage\n{detailed|simple} art of a girl"
    options = dict(enable_wildcard=True, caption_prefix="sks,", caption_suffix=", best")
    rng = random.Random(5)
    line = rng.choice(caption.split("\n"))
    assert line == "{detailed|simple} art of a girl"
    assert run(caption, 5, **options) == f"sks, {rng.choice(['detailed', 'simple'])} art of a girl , best"
    assert {run(caption, seed, **options) for seed in range(30)} == {
        "sks, 1girl, miku, stage , best",
        "sks, a girl on a stage , best",
        "sks, detailed art of a girl , best",
        "sks, simple art of a girl , best",
    }


# --- token warmup -----------------------------------------------------------------------------------------

TEN = ", ".join(f"t{i}" for i in range(10))


@pytest.mark.parametrize(
    ("step", "count"), [(0, 2), (1, 3), (4, 6), (7, 9), (8, 10), (100, 10)], ids=lambda v: str(v)
)
def test_token_warmup_counts(step: int, count: int) -> None:
    """min + floor(step * (n - min) / warmup_steps) flexible tags until warmup_steps, then all."""
    options = CaptionOptions(token_warmup_min=2, token_warmup_step=8)
    out = process_caption(TEN, options, random.Random(0), step=step)
    assert out == ", ".join(f"t{i}" for i in range(count))


def test_token_warmup_fraction_and_fixed_tags() -> None:
    assert warmup_steps(0.5, 16) == 8 and warmup_steps(0.3, 10) == 3 and warmup_steps(5, 16) == 5
    options = CaptionOptions(token_warmup_min=1, token_warmup_step=0.5, keep_tokens=2)
    # 8 flexible tags after the 2 kept ones, warmup over 0.5 * 16 = 8 steps: 1 + floor(4 * 7 / 8) = 4 at step 4
    out = process_caption(TEN, options, random.Random(0), step=4, max_train_steps=16)
    assert out == "t0, t1, t2, t3, t4, t5"
    # without the total, a fractional warmup resolves to 0 steps (no warmup), as in kohya
    assert process_caption(TEN, options, random.Random(0), step=0) == TEN


# --- caption dropout --------------------------------------------------------------------------------------


def test_dropout_every_n_epochs_is_one_based() -> None:
    options = CaptionOptions(caption_dropout_every_n_epochs=2, caption_prefix="sks")
    got = [process_caption("a, b", options, random.Random(0), epoch=e) for e in range(1, 6)]
    assert got == ["sks a, b", "", "sks a, b", "", "sks a, b"]


def test_dropout_rate_with_seeded_rng() -> None:
    options = CaptionOptions(caption_dropout_rate=0.5, shuffle_caption=True)
    got = [process_caption("a, b, c", options, random.Random(seed)) for seed in range(6)]
    for seed, out in enumerate(got):
        rng = random.Random(seed)
        if rng.random() < 0.5:
            assert out == ""
        else:
            tags = ["a", "b", "c"]
            rng.shuffle(tags)
            assert out == ", ".join(tags)
    assert got == ["c, a, b", "", "b, c, a", "", "", "a, b, c"]


def test_dropout_skips_everything_else() -> None:
    options = CaptionOptions(caption_dropout_rate=1.0, enable_wildcard=True, secondary_separator=";")
    assert process_caption("{a|b};c", options, random.Random(0)) == ""


# --- the training position --------------------------------------------------------------------------------


def test_step_schedule_counts_optimizer_steps() -> None:
    one = StepSchedule(max_train_steps=100, batches_per_epoch=5)
    assert [one.global_step(0, i) for i in range(5)] == [0, 1, 2, 3, 4]
    assert one.global_step(2, 3) == 13
    accum = StepSchedule(max_train_steps=100, batches_per_epoch=5, gradient_accumulation_steps=2)
    # 3 optimizer steps per epoch (the last one after a single batch)
    assert [accum.global_step(1, i) for i in range(5)] == [3, 3, 4, 4, 5]
    two = StepSchedule(max_train_steps=100, batches_per_epoch=6, num_processes=2)
    # rank r takes batches r, r + 2, r + 4: both ranks are at the same step
    assert [two.global_step(0, i) for i in range(6)] == [0, 0, 1, 1, 2, 2]


# --- caption files ----------------------------------------------------------------------------------------


def test_read_caption_first_line_and_fallbacks(tmp_path: Path) -> None:
    image = tmp_path / "img.png"
    assert read_caption(image, ".caption") is None
    (tmp_path / "img.caption").write_text("\ufefffirst line \n\n  second\n", encoding="utf-8")
    assert read_caption(image, ".caption") == "first line"
    assert read_caption(image, ".caption", all_lines=True) == "first line\nsecond"
    face = tmp_path / "photo_1_2_3_4.png"
    (tmp_path / "photo.txt").write_text("face crop caption", encoding="utf-8")
    assert caption_candidates(face, ".txt") == [tmp_path / "photo_1_2_3_4.txt", tmp_path / "photo.txt"]
    assert read_caption(face, ".txt") == "face crop caption"


def test_read_caption_errors_name_the_file(tmp_path: Path) -> None:
    (tmp_path / "bad.caption").write_bytes(b"caf\xe9\n")
    with pytest.raises(UserError) as info:
        read_caption(tmp_path / "bad.png", ".caption")
    assert info.value.problems == [
        f"caption file {tmp_path / 'bad.caption'} is not UTF-8 (byte 3); re-save it as UTF-8"
    ]
    (tmp_path / "empty.caption").write_text("", encoding="utf-8")
    with pytest.raises(UserError, match=r"empty\.caption is empty"):
        read_caption(tmp_path / "empty.png", ".caption")


def test_caption_extension_warning(tmp_path: Path) -> None:
    images = [tmp_path / "a.png", tmp_path / "b.png"]
    assert caption_extension_warning(images, ".caption", "sks dog") is None
    (tmp_path / "b.txt").write_text("a caption", encoding="utf-8")
    assert caption_extension_warning(images, ".caption", "sks dog") == (
        "no .caption caption files, but .txt files are there, so every image is trained on the class tokens "
        '"sks dog" alone; if those are the captions, set caption_extension = ".txt" (or --caption_extension .txt)'
    )
    assert caption_extension_warning(images, ".txt", "sks dog") is None


def test_count_tags_like_kohya() -> None:
    assert count_tags(["A, b", "a,  ,c", "", "x\nA"]) == {"a": 3, "b": 1, "c": 1, "x": 1}
