"""Writing cache files so that an interrupted run never leaves a half-written one behind."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from library.errors import UserError


def save_npz_atomically(path: Path, arrays: Mapping[str, np.ndarray], what: str) -> None:
    """`np.savez` to a temp file next to `path`, then rename; `what` names the cache in the error."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(
            f"cannot write {what} {path}: {e.strerror or e}; check the folder is writable"
        ) from None
