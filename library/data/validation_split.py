"""Hold out part of each subset for validation, choosing the same images kohya chooses.

kohya (`split_train_val`): per subset, shuffle the image list with `random.seed(validation_seed)`, then train
on the first `ceil(n * (1 - split))` and validate on the last `round(n * split)`. Those two counts overlap by
one image for some n (3 images at 0.2: kohya trains on all 3 and validates on the last one too); here the
validation images are exactly kohya's and training keeps everything before them, so no validation image is
ever trained on. Regularization subsets are never split. Unlike kohya, fine-tune (metadata) subsets are split
the same way (kohya validates them on the whole dataset).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


def validation_count(n: int, split: float) -> int:
    """kohya's size of the validation part of n images (Python's round: halves go to the even number)."""
    return round(n * split) if split > 0 else 0


def split_train_validation(items: Sequence[T], split: float, seed: int) -> tuple[list[T], list[T]]:
    """(train, validation), both in the original order; the choice depends only on (len(items), split, seed).

    `random.Random(seed).shuffle` is the same permutation as kohya's `random.seed(seed); random.shuffle(...)`.
    """
    held = validation_count(len(items), split)
    if held == 0:
        return list(items), []
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    validation = set(order[len(items) - held :])
    train = [item for i, item in enumerate(items) if i not in validation]
    return train, [item for i, item in enumerate(items) if i in validation]
