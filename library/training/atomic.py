"""Crash-safe writes of whole folders (training states): a kill at any moment leaves the previous folder intact.

The files go into `<folder>.tmp`, each fsync'ed, then the temp folder itself; it then takes the place of
`<folder>` in one step and the parent directory is fsync'ed, so the rename is on disk too. On Linux the swap
with an existing folder is one `renameat2(RENAME_EXCHANGE)`; elsewhere (or where the filesystem refuses it)
the old folder is first renamed to `<folder>.old`, and the next save puts it back if a crash came between
the two renames. A `.tmp` left by a crash is removed by the next save and never read by --resume.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from library.errors import UserError

_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def fsync_path(path: Path) -> None:
    """Flush a file's or a directory's entry list to disk (directories: where the OS allows opening them)."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) if path.is_dir() else os.O_RDONLY
    try:
        fd = os.open(path, flags)
    except OSError:  # e.g. directories on Windows cannot be opened; their renames are durable there anyway
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EBADF):  # filesystems that cannot fsync a directory
            raise
    finally:
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2); False where that is not available."""
    name = ctypes.util.find_library("c")
    if not name or not hasattr(os, "uname") or os.uname().sysname != "Linux":
        return False
    libc = ctypes.CDLL(name, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    result = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return result == 0


def recover(folder: Path) -> None:
    """Undo what a crash between the two renames of a non-atomic swap left: `<folder>.old` but no `<folder>`."""
    old = folder.with_name(folder.name + ".old")
    if old.is_dir() and not folder.exists():
        old.rename(folder)
        fsync_path(folder.parent)
    elif old.exists():
        shutil.rmtree(old)


def _replace(tmp: Path, folder: Path) -> None:
    if not folder.exists():
        tmp.rename(folder)
    elif _exchange(tmp, folder):
        shutil.rmtree(tmp)  # now holds the previous folder
    else:
        old = folder.with_name(folder.name + ".old")
        folder.rename(old)
        tmp.rename(folder)
        shutil.rmtree(old)
    fsync_path(folder.parent)


def temp_folder(folder: Path) -> Path:
    return folder.with_name(folder.name + ".tmp")


@contextlib.contextmanager
def atomic_folder(folder: Path) -> Iterator[Path]:
    """Yield an empty temp folder to write into; on success it replaces `folder`, fsync'ed. On an exception
    the temp folder is removed and `folder` is untouched."""
    recover(folder)
    tmp = temp_folder(folder)
    if tmp.exists():  # a crashed save's leftovers
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        for file in tmp.iterdir():
            fsync_path(file)
        fsync_path(tmp)
        _replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def free_bytes(path: Path) -> int | None:
    """Free space on the filesystem holding `path` (or its nearest existing parent)."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            with contextlib.suppress(OSError):
                return shutil.disk_usage(candidate).free
            return None
    return None


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MB"


def _disk_full(error: Exception, free: int | None, needed: int) -> bool:
    """ENOSPC, also where a writer hides it: safetensors says "No space left on device (os error 28)";
    torch.save's C++ writer raises a RuntimeError ("file write failed", "unexpected pos ..."), so for it the
    free space left decides."""
    if isinstance(error, OSError):
        return error.errno == errno.ENOSPC
    text = str(error)
    if "No space left on device" in text or "os error 28" in text:
        return True
    return isinstance(error, RuntimeError) and free is not None and free < needed


@contextlib.contextmanager
def disk_full_is_user_error(path: Path, needed: int) -> Iterator[None]:
    """Turn ENOSPC while writing `path` (about `needed` bytes) into one line naming the file and the space."""
    try:
        yield
    except Exception as e:
        free = free_bytes(path.parent)
        if not _disk_full(e, free, needed):
            raise
        have = f", {_mb(free)} free" if free is not None else ""
        raise UserError(
            f"saving {path}: the disk is full (needs about {_mb(needed)}{have}); the previous save is kept: "
            "free some space (or pick another --output_dir) and resume from the last *-state folder"
        ) from None
