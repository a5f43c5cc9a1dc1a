"""Permission bits that bind even when the tests run as root (as CI does).

Root reads and searches any directory because of two capabilities, CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH.
`permission_bits_bind` takes them out of the calling thread's effective set (capset(2); kept in the permitted set, so
they are put back afterwards): the kernel's real permission checks then apply to root as to any other user. For a
process that does not hold them it does nothing. A subprocess's command prefixed with `PERMISSION_BITS_BIND` runs so
from its start.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

_CAPABILITY_VERSION_3 = 0x20080522
_DAC_CAPABILITY_NUMBERS = (1, 2)  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
_DAC_CAPABILITIES = sum(1 << number for number in _DAC_CAPABILITY_NUMBERS)
_PR_CAPBSET_DROP = 24


class _Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _Data(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _call(name: str, *arguments: object) -> None:
    """libc's `name`, OSError if it fails."""
    if getattr(ctypes.CDLL(None, use_errno=True), name)(*arguments) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"{name}: {os.strerror(error)}")


def _capabilities(name: str, data: ctypes.Array[_Data]) -> None:
    """capget or capset on this thread."""
    _call(name, ctypes.byref(_Header(_CAPABILITY_VERSION_3, 0)), data)  # pid 0: this thread


@contextmanager
def permission_bits_bind() -> Iterator[None]:
    """Within the block, this thread is refused what the permission bits refuse, root or not."""
    held = (_Data * 2)()
    _capabilities("capget", held)
    saved = (_Data * 2)(*(_Data(word.effective, word.permitted, word.inheritable) for word in held))
    held[0].effective &= ~_DAC_CAPABILITIES
    _capabilities("capset", held)
    try:
        yield
    finally:
        _capabilities("capset", saved)


def run_with_permission_bits_binding(argv: list[str]) -> NoReturn:
    """Replace this process with the program `argv`, refused what the permission bits refuse, root or not.
    `permission_bits_bind` would not last: running a program gives root its capabilities back, except those left out
    of its bounding set, as they are here. For a process that does not hold them it only runs the program."""
    held = (_Data * 2)()
    _capabilities("capget", held)
    if held[0].permitted & _DAC_CAPABILITIES:
        for capability in _DAC_CAPABILITY_NUMBERS:
            _call("prctl", *map(ctypes.c_ulong, (_PR_CAPBSET_DROP, capability, 0, 0, 0)))  # unsigned longs: prctl(2)
    os.execv(argv[0], argv)  # noqa: S606 (a test's own command)


# The prefix of a test's command that runs it with the permission bits binding (`run_with_permission_bits_binding`).
PERMISSION_BITS_BIND = [sys.executable, "-m", "tests.support.file_permissions"]

if __name__ == "__main__":
    run_with_permission_bits_binding(sys.argv[1:])
