"""Opening a file govrag reads or appends to at a path anyone with access may have put something else at."""

from __future__ import annotations

import errno
import os
import stat

NOT_A_REGULAR_FILE = "not a regular file (a named pipe or a device is there)"


class NotARegularFile(OSError):
    """A named pipe, a device or a socket where govrag reads or appends to a file of its own (the checkpoint mirror,
    an export's FILE.manifest.json): refused as it is opened, never waited on (a pipe's open, or read, would wait for a
    writer that may never come). An OSError of EINVAL, NOT_A_REGULAR_FILE and the path (`filename`)."""


def regular_file_opener(path: str, flags: int) -> int:
    """An `opener` for `open()` that opens `path` once, without waiting (O_NONBLOCK: a named pipe's open returns at
    once), then keeps it only when that very file is a regular one (NotARegularFile else; IsADirectoryError for a
    folder, as the system says one opened for writing): no check before the open that the file could be swapped
    after. A pipe nobody reads, or a socket, refuses to open for writing then (ENXIO,
    "No such device or address"): said as NotARegularFile too. The descriptor is made blocking again, as any regular
    file's reads are; `open()`'s other flags (O_CREAT and O_APPEND for "a", O_CLOEXEC) and mode are kept."""
    try:
        descriptor = os.open(path, flags | os.O_NONBLOCK, 0o666)
    except OSError as error:
        if error.errno == errno.ENXIO:
            raise NotARegularFile(errno.EINVAL, NOT_A_REGULAR_FILE, os.fsdecode(path)) from error
        raise
    try:
        mode = os.fstat(descriptor).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), os.fsdecode(path))
        if not stat.S_ISREG(mode):
            raise NotARegularFile(errno.EINVAL, NOT_A_REGULAR_FILE, os.fsdecode(path))
        os.set_blocking(descriptor, True)
    except BaseException:
        os.close(descriptor)
        raise
    return descriptor
