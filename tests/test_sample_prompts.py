"""kohya sample-prompt files: .txt options, .toml and .json, and the errors for bad lines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from library.errors import UserError
from library.training.sample_prompts import SamplePrompt, check_sampler, load_sample_prompts


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_txt_options_comments_and_defaults(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "p.txt",
        "# a comment\n\n"
        "a cat, best quality --n low quality, blurry --w 70 --h 130 --s 12 --l 5.5 --d 42 --ss Euler_A\n"
        "a dog\n",
    )
    first, second = load_sample_prompts(path)
    assert first == SamplePrompt(
        index=0,
        prompt="a cat, best quality",
        negative_prompt="low quality, blurry",
        width=64,  # rounded down to /8, then kohya's minimum of 64
        height=128,
        steps=12,
        scale=5.5,
        seed=42,
        sampler="euler_a",
    )
    assert second == SamplePrompt(index=1, prompt="a dog", width=512, height=512, steps=30, scale=7.5)


def test_steps_clamped_as_kohya(tmp_path: Path) -> None:
    (p,) = load_sample_prompts(write(tmp_path, "p.txt", "x --s 5000\n"))
    assert p.steps == 1000


def test_malformed_lines_name_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "p.txt", "ok\n# c\nbad --w wide\nworse --q 3 --d\n")
    with pytest.raises(UserError) as info:
        load_sample_prompts(path)
    assert info.value.problems == [
        f"{path}:3: --w must be an integer, got 'wide'",
        f"{path}:4: unknown option --q; options: --n --w --h --s --l --d --ss --g",
        f"{path}:4: --d needs a value",
    ]


def test_unknown_sampler_lists_valid_ones(tmp_path: Path) -> None:
    path = write(tmp_path, "p.txt", "x --ss eulr\n")
    with pytest.raises(UserError) as info:
        load_sample_prompts(path)
    (line,) = info.value.problems
    assert line.startswith(f"{path}:1: unknown sampler 'eulr'")
    assert "euler_a" in line and "dpmsolver++" in line and "k_dpm_2_a" in line
    assert check_sampler("DDIM", "--sample_sampler") is None


def test_toml_defaults_and_subsets(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "p.toml",
        '[prompt]\nwidth = 64\nheight = 96\nscale = 3.0\nnegative_prompt = "ugly"\n\n'
        '[[prompt.subset]]\nprompt = "one"\nseed = 1\n\n'
        '[[prompt.subset]]\nprompt = "two"\nwidth = 128\nsample_steps = 4\nsample_sampler = "euler"\n',
    )
    assert load_sample_prompts(path) == [
        SamplePrompt(0, "one", "ugly", 64, 96, 30, 3.0, 1, None),
        SamplePrompt(1, "two", "ugly", 128, 96, 4, 3.0, None, "euler"),
    ]


def test_json_list_and_its_errors(tmp_path: Path) -> None:
    good = write(tmp_path, "p.json", json.dumps([{"prompt": "a", "width": 64, "height": 64, "seed": 3}]))
    assert load_sample_prompts(good) == [SamplePrompt(0, "a", width=64, height=64, seed=3)]
    bad = write(tmp_path, "bad.json", json.dumps([{"prompt": "a", "widht": 64}, {"height": "x"}]))
    with pytest.raises(UserError) as info:
        load_sample_prompts(bad)
    assert info.value.problems == [
        f"{bad}: entry 1: unknown key 'widht' (did you mean \"width\"?)",
        f"{bad}: entry 2: height must be a number, got 'x'",
        f"{bad}: entry 2: no prompt",
    ]


def test_missing_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        load_sample_prompts(tmp_path / "nope.txt")
    with pytest.raises(UserError, match="holds no prompts"):
        load_sample_prompts(write(tmp_path, "p.txt", "# only a comment\n"))


def test_other_families_options_are_ignored_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write(tmp_path, "p.txt", "a fox --g 3.5 --W 64 --H 64 --fs 3\n")
    with caplog.at_level("WARNING", logger="loratrain"):
        (p,) = load_sample_prompts(path)
    assert (p.prompt, p.width, p.height, p.guidance) == ("a fox", 64, 64, 3.5)  # --g: FLUX dev's guidance
    assert [r.getMessage() for r in caplog.records] == [
        f"{path}:1: --fs (flow shift) has no effect for this model; ignored",
    ]


def test_sampler_needing_a_missing_package(tmp_path: Path) -> None:
    import importlib.util

    if importlib.util.find_spec("scipy") is not None:
        pytest.skip("scipy is installed")
    assert check_sampler("k_lms", "--sample_sampler") == (
        "--sample_sampler: sampler 'k_lms' needs the scipy package; pip install scipy, or pick another"
    )
