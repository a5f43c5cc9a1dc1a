"""Permission bits that bind even when the tests run as root (as CI does).

Root reads and searches any directory because of two capabilities, CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH.
`permission_bits_bind` takes them out of the calling thread's effective set (capset(2); kept in the permitted set, so
they are put back afterwards): the kernel's real permission checks then apply to root as to any other user. For a
process that does not hold them it does nothing.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator
from contextlib import contextmanager

_CAPABILITY_VERSION_3 = 0x20080522
_DAC_CAPABILITIES = (1 << 1) | (1 << 2)  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH


class _Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _Data(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _call(name: str, data: ctypes.Array[_Data]) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    header = _Header(_CAPABILITY_VERSION_3, 0)  # pid 0: this thread
    if getattr(libc, name)(ctypes.byref(header), data) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"{name}: {os.strerror(error)}")


@contextmanager
def permission_bits_bind() -> Iterator[None]:
    """Within the block, this thread is refused what the permission bits refuse, root or not."""
    held = (_Data * 2)()
    _call("capget", held)
    saved = (_Data * 2)(*(_Data(word.effective, word.permitted, word.inheritable) for word in held))
    held[0].effective &= ~_DAC_CAPABILITIES
    _call("capset", held)
    try:
        yield
    finally:
        _call("capset", saved)
