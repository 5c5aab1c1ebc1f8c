"""kohya's weighted-caption syntax, parsed by hand-checked examples."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from library.families import sd_text
from library.families.base import ModelBundle
from library.families.prompt_weights import parse_weighted_caption
from library.families.sd import StableDiffusionFamily


def approx(pieces: list[tuple[str, float]]) -> list:
    return [(text, pytest.approx(weight)) for text, weight in pieces]


@pytest.mark.parametrize(
    ("caption", "expected"),
    [
        ("a dog", [("a dog", 1.0)]),
        ("", [("", 1.0)]),
        ("a (dog) cat", [("a ", 1.0), ("dog", 1.1), (" cat", 1.0)]),
        ("a ((dog))", [("a ", 1.0), ("dog", 1.21)]),
        ("a [dog]", [("a ", 1.0), ("dog", 1 / 1.1)]),
        ("(dog:1.5), cat", [("dog", 1.5), (", cat", 1.0)]),
        ("((dog:2) cat)", [("dog", 2.2), (" cat", 1.1)]),
        ("(dog:0.5) [cat:1.5]", [("dog", 0.5), (" ", 1.0), ("cat:1.5", 1 / 1.1)]),
        (r"\(dog\) a\\b", [(r"(dog) a\b", 1.0)]),
        ("a (dog", [("a ", 1.0), ("dog", 1.1)]),  # unclosed: to the end
        ("a) dog]", [("a) dog]", 1.0)]),  # unmatched closers are text
        ("dog:1.2) x", [("dog:1.2) x", 1.0)]),  # a weight without "(" is text
        ("(a:1.2.3)", [("a:1.2.3)", 1.1)]),  # not a number: text, bracket left open
        ("time: 5 (sky:1.25)", [("time: 5 ", 1.0), ("sky", 1.25)]),
    ],
)
def test_parse_weighted_caption(caption: str, expected: list[tuple[str, float]]) -> None:
    assert parse_weighted_caption(caption) == approx(expected)


# ---------------------------------------------------------------- tokens and hidden states (SD family)

FAMILY = StableDiffusionFamily()


def load(path: Path) -> ModelBundle:
    info = FAMILY.inspect(path, v2=False, v_parameterization=False)
    return FAMILY.load(info, vae_path=None, tokenizer_path=None, dtype=torch.float32)


@pytest.fixture(scope="module")
def sd1(tiny_sd1_dir: Path) -> ModelBundle:
    return load(tiny_sd1_dir)


@pytest.fixture(scope="module")
def sd2(tiny_sd2_dir: Path) -> ModelBundle:
    return load(tiny_sd2_dir)


@pytest.mark.parametrize("version", ["sd1", "sd2"])
@pytest.mark.parametrize("n_chunks", [1, 3])
def test_weighted_ids_match_plain_ids(request: pytest.FixtureRequest, version: str, n_chunks: int) -> None:
    tokenizer = request.getfixturevalue(version).tokenizers[0]
    captions = ["a (red:1.5) circle", "a red circle", " ".join(["a"] * 100) + " (circle)"]
    plain = ["a red circle", "a red circle", " ".join(["a"] * 100) + " circle"]
    ids, weights = sd_text.cached_weighted_ids(tokenizer, captions, n_chunks, 77, {})
    assert torch.equal(ids, sd_text._chunked_ids(tokenizer, plain, n_chunks, 77))
    assert weights.shape == (3, 75 * n_chunks + 2)
    red = len(tokenizer("a", add_special_tokens=False).input_ids) + 1
    n_red = len(tokenizer("red", add_special_tokens=False).input_ids)
    expected = torch.ones(75 * n_chunks + 2)
    expected[red : red + n_red] = 1.5
    assert torch.equal(weights[0], expected) and torch.equal(weights[1], torch.ones(75 * n_chunks + 2))
    n_circle = len(tokenizer("circle", add_special_tokens=False).input_ids)
    long = torch.ones(75 * n_chunks + 2)
    if n_chunks == 3:  # 100 "a" tokens, then circle x1.1; with one window it is cut off
        long[101 : 101 + n_circle] = 1.1
    assert torch.allclose(weights[2], long)


def test_weighted_hidden_states_scale_only_weighted_tokens(sd1: ModelBundle) -> None:
    tokenizer = sd1.tokenizers[0]
    red = len(tokenizer("a", add_special_tokens=False).input_ids) + 1
    n_red = len(tokenizer("red", add_special_tokens=False).input_ids)
    for max_len, prefix in ((None, "a"), (150, " ".join(["a"] * 80))):
        first = len(tokenizer(prefix, add_special_tokens=False).input_ids) + 1 if max_len else red
        kwargs = {"clip_skip": 2, "max_token_length": max_len}
        caption = f"{prefix} (red:2) circle"
        weighted = FAMILY.encode_prompts(sd1, [caption], weighted=True, **kwargs)["encoder_hidden_states"]
        plain = FAMILY.encode_prompts(sd1, [f"{prefix} red circle"], **kwargs)["encoder_hidden_states"]
        scale = torch.ones(weighted.shape[1])
        scale[first : first + n_red] = 2.0
        torch.testing.assert_close(weighted, plain * scale[None, :, None], rtol=1e-6, atol=1e-6)
