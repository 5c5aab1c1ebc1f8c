"""kohya's weighted-caption syntax (`--weighted_captions`, the AUTOMATIC1111 attention syntax), parsed into
(text, weight) pieces. Pure text: the families turn the pieces into per-token weights.

`(text)` multiplies by 1.1, `[text]` divides by 1.1, `(text:1.3)` sets the factor, brackets nest and multiply,
`\\(` `\\)` `\\[` `\\]` `\\\\` are literal characters, an unclosed bracket applies to the end of the caption and an
unmatched closing bracket is literal text.
"""

from __future__ import annotations

import re

ROUND_FACTOR = 1.1

_TOKENS = re.compile(
    r"""
      \\(?P<escaped>.?)            # backslash: the next character is literal (a lone one is dropped)
    | (?P<open>[(\[])
    | :(?P<number>[+-]?[.\d]+)\)   # the ":1.3)" that closes "(text:1.3)"
    | (?P<close>[)\]])
    | [^\\()\[\]:]+
    | :
    """,
    re.VERBOSE | re.DOTALL,
)


def parse_weighted_caption(caption: str) -> list[tuple[str, float]]:
    """Caption -> [(text, weight), ...], neighbours with equal weights merged; [("", 1.0)] when empty."""
    pieces: list[list] = []  # [text, weight], mutable while brackets close
    rounds: list[int] = []  # index of the first piece inside each open "(" / "["
    squares: list[int] = []

    def scale(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= factor

    for match in _TOKENS.finditer(caption):
        token = match.group(0)
        number = _number(match.group("number"))
        if match.group("escaped") is not None:
            pieces.append([match.group("escaped"), 1.0])
        elif match.group("open"):
            (rounds if token == "(" else squares).append(len(pieces))
        elif number is not None and rounds:
            scale(rounds.pop(), number)
        elif token == ")" and rounds:
            scale(rounds.pop(), ROUND_FACTOR)
        elif token == "]" and squares:
            scale(squares.pop(), 1 / ROUND_FACTOR)
        else:
            pieces.append([token, 1.0])
    for start in rounds:
        scale(start, ROUND_FACTOR)
    for start in squares:
        scale(start, 1 / ROUND_FACTOR)

    merged: list[list] = []
    for text, weight in pieces:
        if merged and merged[-1][1] == weight:
            merged[-1][0] += text
        else:
            merged.append([text, weight])
    return [(text, weight) for text, weight in merged] or [("", 1.0)]


def _number(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:  # "1.2.3": not a weight; the token stays literal text
        return None
