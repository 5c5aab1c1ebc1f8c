"""kohya's --save_last_n_*: which earlier save to delete after a new one. The final save is never touched
(it has no epoch/step suffix)."""

from __future__ import annotations

import shutil
from pathlib import Path


def epoch_to_remove(epoch: int, every: int | None, last_n: int | None) -> int | None:
    """After saving epoch `epoch` (1-based): the epoch save that falls out of the last `last_n` saves."""
    if not every or not last_n:
        return None
    old = epoch - every * last_n
    return old if old > 0 else None


def step_to_remove(step: int, every: int | None, last_n: int | None) -> int | None:
    """After saving at `step`: the step save older than the last `last_n` steps (kohya counts steps here,
    not saves: every=10, last_n=20 keeps the saves at 20, 30 and 40 after step 40)."""
    if not every or not last_n:
        return None
    old = step - last_n - 1
    old -= old % every
    return old if old > 0 else None


def remove_quietly(path: Path) -> bool:
    """Delete a saved file or state folder if it is there; True when something was removed."""
    if path.is_dir():
        shutil.rmtree(path)
        return True
    if path.is_file():
        path.unlink()
        return True
    return False


def prune_old_saves(
    folder: Path,
    base: str,
    extension: str,
    *,
    number: int,
    kind: str,
    every: int | None,
    last_n: int | None,
    last_n_state: int | None,
) -> list[Path]:
    """After the save `number` (an epoch for kind "epoch", a step for "step"), delete the LoRA file and the
    state that fell out of the window; the state window defaults to the file window, as kohya. Returns what
    was deleted."""
    pick = epoch_to_remove if kind == "epoch" else step_to_remove
    suffix = (lambda n: f"-{n:06d}") if kind == "epoch" else (lambda n: f"-step{n:08d}")
    removed = []
    old = pick(number, every, last_n)
    if old is not None and remove_quietly(folder / f"{base}{suffix(old)}{extension}"):
        removed.append(folder / f"{base}{suffix(old)}{extension}")
    old = pick(number, every, last_n_state or last_n)
    if old is not None and remove_quietly(folder / f"{base}{suffix(old)}-state"):
        removed.append(folder / f"{base}{suffix(old)}-state")
    return removed
