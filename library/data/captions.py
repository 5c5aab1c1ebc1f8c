"""Caption files and the per-step caption pipeline (kohya order), as pure functions.

Randomness is always an explicit `random.Random`, so a (seed, epoch, step) reproduces the same captions on
resume and in every DataLoader worker. kohya features not implemented yet (wildcards, dropout, token warmup,
keep_tokens_separator, secondary_separator) are rejected by the dataset config, so the steps below can grow
in kohya's order without changing callers.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from pathlib import Path

from library.errors import UserError


def caption_candidates(image_path: Path, caption_extension: str) -> list[Path]:
    """Caption files tried for an image, in order.

    `<stem><ext>` first; kohya also tries the name without a face-crop suffix (`name_cx_cy_w_h`), used
    when at least five `_`-separated parts are present.
    """
    stem = image_path.with_suffix("")
    candidates = [stem.with_name(stem.name + caption_extension)]
    parts = stem.name.split("_")
    if len(parts) >= 5:
        candidates.append(stem.with_name("_".join(parts[:-4]) + caption_extension))
    return candidates


def read_caption_file(path: Path) -> str:
    """First line of a caption file, stripped. Raises UserError for empty or non-UTF-8 files."""
    try:
        # utf-8-sig: Windows editors often prepend a BOM, which would otherwise end up in the first tag.
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"caption file {path} is not UTF-8 (byte {e.start}); re-save it as UTF-8") from None
    except OSError as e:
        raise UserError(f"cannot read caption file {path}: {e.strerror or e}") from None
    lines = text.splitlines()
    if not lines:
        raise UserError(
            f"caption file {path} is empty; write a caption in it or delete it to use class_tokens"
        )
    return lines[0].strip()


def read_caption(image_path: Path, caption_extension: str) -> str | None:
    """The caption for an image, or None when it has no caption file."""
    for candidate in caption_candidates(image_path, caption_extension):
        if candidate.is_file():
            return read_caption_file(candidate)
    return None


def process_caption(
    caption: str,
    *,
    prefix: str | None = None,
    suffix: str | None = None,
    shuffle: bool = False,
    separator: str = ",",
    keep_tokens: int = 0,
    rng: random.Random,
) -> str:
    """Apply the per-step caption transforms in kohya's order.

    1. prefix / suffix joined with a space (so a prefix counts toward keep_tokens);
    2. only the first line is kept;
    3. with shuffle: split on `separator`, strip, keep the first `keep_tokens` tags in place, shuffle the rest
       with `rng`, and re-join with ", " whatever the separator (as kohya does).
    """
    if prefix:
        caption = prefix + " " + caption
    if suffix:
        caption = caption + " " + suffix
    caption = caption.split("\n")[0]
    if shuffle:
        tokens = [t.strip() for t in caption.strip().split(separator)]
        fixed, flexible = tokens[:keep_tokens], tokens[keep_tokens:]
        rng.shuffle(flexible)
        caption = ", ".join(fixed + flexible)
    return caption


def count_tags(captions: Iterable[str]) -> dict[str, int]:
    """Tag frequencies as kohya stores them in ss_tag_frequency: split on ",", stripped, lower-cased."""
    counts: dict[str, int] = {}
    for caption in captions:
        for tag in caption.split(","):
            tag = tag.strip().lower()
            if tag:
                counts[tag] = counts.get(tag, 0) + 1
    return counts
