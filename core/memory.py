"""Heap memory a process has freed, handed back to the system."""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's `malloc_trim`, or None under a C library without it (musl, macOS)."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except AttributeError:
        return None
    trim.argtypes = [ctypes.c_size_t]
    return trim


def release_freed_heap() -> bool:
    """Return to the system the free pages glibc's allocator keeps after a process frees memory (models loaded and
    let go: ~90 MB of `govrag worker`'s parent after `check_models`); whether any was. A no-op without glibc."""
    trim = _malloc_trim()
    return trim is not None and bool(trim(0))
