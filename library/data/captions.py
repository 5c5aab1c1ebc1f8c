"""Caption files and kohya's per-step caption pipeline, as pure functions.

Randomness is always an explicit `random.Random`, so a (seed, epoch, step) reproduces the same captions on
resume and in every DataLoader worker. The pipeline follows kohya's `process_caption` order:

1. `caption_prefix` / `caption_suffix`, joined with a space (so a prefix counts toward `keep_tokens`);
2. caption dropout (`caption_dropout_rate`, `caption_dropout_every_n_epochs`): the caption becomes "";
3. `enable_wildcard`: one random line of a multi-line caption, `{a|b|c}` expanded, `{{`/`}}` escaped;
   without it only the first line is used;
4. only when shuffle, token warmup or tag dropout is active: split on `caption_separator` into a fixed
   part (before `keep_tokens_separator`, else the first `keep_tokens` tags), flexible tags and a fixed
   suffix (after a second `keep_tokens_separator`); token warmup, shuffle and tag dropout act on the
   flexible tags; the parts are re-joined with ", " whatever the separator;
5. `secondary_separator` is replaced by `caption_separator`, so such groups move and drop as one tag.

Deliberate differences from kohya, all where kohya's result is clearly unintended:

* a multi-line caption gets the prefix/suffix on every line (kohya adds them to the first/last line only,
  so a randomly chosen middle line would lose them);
* empty tags (from "a, b," or "a,, b") are dropped when tags are split (kohya keeps them with `keep_tokens`
  and could shuffle them into "a, , b");
* `keep_tokens_separator` never reaches the text encoder: when nothing is shuffled, warmed up or dropped,
  the parts are still joined with ", " (kohya would leave " ||| " in the caption).
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from library.errors import UserError

# Caption extensions people commonly use; a subset with none of its own but one of these is a likely typo.
COMMON_CAPTION_EXTENSIONS = (".txt", ".caption", ".tags")


@dataclass(frozen=True)
class CaptionOptions:
    """A subset's caption settings, with kohya's key names and defaults."""

    caption_prefix: str | None = None
    caption_suffix: str | None = None
    shuffle_caption: bool = False
    caption_separator: str = ","
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    secondary_separator: str | None = None
    enable_wildcard: bool = False
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0
    token_warmup_min: int = 1
    token_warmup_step: float = 0.0


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


def read_caption_file(path: Path, *, all_lines: bool = False) -> str:
    """The caption in a file, stripped. Raises UserError for empty or non-UTF-8 files.

    Only the first line unless `all_lines` (kohya's `enable_wildcard`): then every non-empty line, joined
    with "\\n", so the pipeline can pick one per step.
    """
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
    if all_lines:
        return "\n".join(line.strip() for line in lines if line.strip())
    return lines[0].strip()


def read_caption(image_path: Path, caption_extension: str, *, all_lines: bool = False) -> str | None:
    """The caption for an image, or None when it has no caption file."""
    for candidate in caption_candidates(image_path, caption_extension):
        if candidate.is_file():
            return read_caption_file(candidate, all_lines=all_lines)
    return None


def other_caption_extensions(images: Iterable[Path], caption_extension: str) -> list[str]:
    """The common caption extensions, other than `caption_extension`, that some of these images have."""
    images = list(images)
    return [
        ext
        for ext in COMMON_CAPTION_EXTENSIONS
        if ext != caption_extension
        and any(c.is_file() for image in images for c in caption_candidates(image, ext))
    ]


def caption_extension_warning(
    images: list[Path], caption_extension: str, class_tokens: str | None
) -> str | None:
    """For a folder where no image has a `caption_extension` file: a warning when other caption files exist.

    Training would silently use only the class tokens for every image, the classic `.caption` vs `.txt` mix-up.
    """
    others = other_caption_extensions(images, caption_extension)
    if not others:
        return None
    return (
        f"no {caption_extension} caption files, but {'/'.join(others)} files are there, so every image is "
        f'trained on the class tokens "{class_tokens}" alone; if those are the captions, set '
        f'caption_extension = "{others[0]}" (or --caption_extension {others[0]})'
    )


def warmup_steps(token_warmup_step: float, max_train_steps: int) -> float:
    """kohya: a `token_warmup_step` below 1 is a fraction of the training steps (floored)."""
    if token_warmup_step < 1:
        return math.floor(token_warmup_step * max_train_steps)
    return token_warmup_step


def _with_prefix_suffix(caption: str, prefix: str | None, suffix: str | None) -> str:
    if prefix:
        caption = prefix + " " + caption
    if suffix:
        caption = caption + " " + suffix
    return caption


def is_dropped(options: CaptionOptions, epoch: int, rng: random.Random) -> bool:
    """Whole-caption dropout; `epoch` is 1-based as in kohya (every_n_epochs=2 drops epochs 2, 4, ...)."""
    # The draw happens only with a rate, as in kohya, so enabling every_n_epochs alone shifts no other draw.
    by_rate = options.caption_dropout_rate > 0 and rng.random() < options.caption_dropout_rate
    every = options.caption_dropout_every_n_epochs
    return by_rate or (every > 0 and epoch % every == 0)


_WILDCARD = re.compile(r"\{([^}]+)\}")


def expand_wildcards(caption: str, rng: random.Random) -> str:
    """One random line, then each `{a|b|c}` replaced by one choice; `{{` and `}}` stand for literal braces."""
    if "\n" in caption:
        caption = rng.choice(caption.split("\n"))
    # Escaped braces are parked in characters the caption does not contain, so the pattern cannot see them.
    open_mark, close_mark = "\ue000", "\ue001"
    while open_mark in caption or close_mark in caption:
        open_mark, close_mark = open_mark + "\ue000", close_mark + "\ue001"
    caption = caption.replace("{{", open_mark).replace("}}", close_mark)
    caption = _WILDCARD.sub(lambda m: rng.choice(m.group(1).split("|")), caption)
    return caption.replace(open_mark, "{").replace(close_mark, "}")


def _split(text: str, separator: str) -> list[str]:
    return [tag for tag in (t.strip() for t in text.split(separator)) if tag]


def split_tags(caption: str, options: CaptionOptions) -> tuple[list[str], list[str], list[str]]:
    """(fixed prefix tags, flexible tags, fixed suffix tags).

    With `keep_tokens_separator` present in the caption, the text before it is fixed and the text after a
    second occurrence is a fixed suffix (`keep_tokens` is then ignored); otherwise the first `keep_tokens`
    tags are fixed.
    """
    separator, marker = options.caption_separator, options.keep_tokens_separator
    if marker and marker in caption:
        head, rest = caption.split(marker, 1)
        middle, _, tail = rest.partition(marker)
        return _split(head, separator), _split(middle, separator), _split(tail, separator)
    tags = _split(caption, separator)
    return tags[: options.keep_tokens], tags[options.keep_tokens :], []


def warmup_tag_count(num_tags: int, token_warmup_min: int, step: int, warmup: float) -> int:
    """kohya: tags kept at `step` of a `warmup`-step token warmup: min + floor(step * (n - min) / warmup)."""
    return math.floor(step * (num_tags - token_warmup_min) / warmup) + token_warmup_min


def _process_tags(caption: str, options: CaptionOptions, rng: random.Random, step: int, warmup: float) -> str:
    fixed, flexible, fixed_suffix = split_tags(caption, options)
    if warmup and step < warmup:
        flexible = flexible[: warmup_tag_count(len(flexible), options.token_warmup_min, step, warmup)]
    if options.shuffle_caption:
        rng.shuffle(flexible)
    rate = options.caption_tag_dropout_rate
    if rate > 0:
        flexible = [tag for tag in flexible if rng.random() >= rate]
    return ", ".join(fixed + flexible + fixed_suffix)


def process_caption(
    caption: str,
    options: CaptionOptions,
    rng: random.Random,
    *,
    epoch: int = 1,
    step: int = 0,
    max_train_steps: int = 0,
) -> str:
    """The caption the text encoder sees at this point of training (see the module docstring).

    `epoch` is 1-based (kohya); `step` counts the optimizer steps done before this batch; `max_train_steps`
    resolves a fractional `token_warmup_step`.
    """
    if "\n" in caption:
        lines = caption.split("\n")
        caption = "\n".join(
            _with_prefix_suffix(line, options.caption_prefix, options.caption_suffix) for line in lines
        )
    else:
        caption = _with_prefix_suffix(caption, options.caption_prefix, options.caption_suffix)
    if is_dropped(options, epoch, rng):
        return ""
    if options.enable_wildcard:
        caption = expand_wildcards(caption, rng)
    else:
        caption = caption.split("\n")[0]
    warmup = warmup_steps(options.token_warmup_step, max_train_steps)
    marker = options.keep_tokens_separator
    if options.shuffle_caption or warmup > 0 or options.caption_tag_dropout_rate > 0:
        caption = _process_tags(caption, options, rng, step, warmup)
    elif marker and marker in caption:
        caption = ", ".join(tag for part in split_tags(caption, options) for tag in part)
    if options.secondary_separator:
        caption = caption.replace(options.secondary_separator, options.caption_separator)
    return caption


def count_tags(captions: Iterable[str]) -> dict[str, int]:
    """Tag frequencies as kohya stores them in ss_tag_frequency: split on ",", stripped, lower-cased.

    The lines of a multi-line (wildcard) caption are counted as separate tags rather than glued together.
    """
    counts: dict[str, int] = {}
    for caption in captions:
        for tag in caption.replace("\n", ",").split(","):
            tag = tag.strip().lower()
            if tag:
                counts[tag] = counts.get(tag, 0) + 1
    return counts


@dataclass(frozen=True)
class StepSchedule:
    """How batch positions map to optimizer steps, for token warmup (which counts optimizer steps).

    Mirrors the training loop: each process takes every `num_processes`-th batch of an epoch and steps the
    optimizer after `gradient_accumulation_steps` of them and at the end of the epoch.
    """

    max_train_steps: int = 0
    batches_per_epoch: int = 0
    gradient_accumulation_steps: int = 1
    num_processes: int = 1

    def global_step(self, epoch: int, batch_index: int) -> int:
        """Optimizer steps done before the batch at (0-based epoch, index among the epoch's batches).

        A rank's last batches wrap around to the start of the epoch when the batches do not divide evenly
        between processes; those few get the step of the position they wrap to.
        """
        per_process = -(-self.batches_per_epoch // self.num_processes)
        steps_per_epoch = -(-per_process // self.gradient_accumulation_steps)
        position = batch_index // self.num_processes
        return epoch * steps_per_epoch + position // self.gradient_accumulation_steps
