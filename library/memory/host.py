"""Host (CPU) memory housekeeping after the weights change form."""

from __future__ import annotations

import ctypes


def release_freed_host_memory() -> bool:
    """Return the heap memory glibc keeps after frees to the OS (`malloc_trim(0)`).

    Converting loaded weights (fp8, int8) frees the wider copies layer by layer, in pieces below glibc's mmap
    threshold, which it keeps for reuse: the process's RSS stays at the pre-conversion size although nothing
    lives there. False where there is no glibc (macOS, Windows, musl), which is harmless.
    """
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return False
    return bool(trim(0))
