"""This process's private temporary directory: `tempfile`'s default from the first parse on, so that every temporary
file a parse writes — a converter's working directory, unstructured's copy of a scanned PDF and its page images,
pytesseract's `tess_*` files — lands in it, each still removed by whoever made it. A worker child SIGKILLed at the
hard time limit (or by the OOM killer) runs no cleanup: what it was writing stays behind, the document's plaintext.
The directory's name records its owner (pid namespace, pid, start time), and a process making its own removes those
whose owner has ended: a Celery prefork child replacing a killed one does so as it starts. Never a live process's: a
pid alone may be reused, but not with the same start time; directories of another pid namespace (a container sharing
the temporary directory) are left alone, as are those of another user."""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import shutil
import stat
import tempfile
import threading
from pathlib import Path

PREFIX = "govrag-tmp-"
_OWNED = re.compile(rf"{PREFIX}(?P<namespace>\d+)-(?P<pid>\d+)-(?P<started>\d+)-[^/]+")

_lock = threading.Lock()
_base: str | None = None  # the temporary directory of the system (TMPDIR), where the private ones are made
_current: tuple[int, str] | None = None  # (owning pid, directory): a forked child makes its own


def private_dir() -> str:
    """This process's private temporary directory, made (and made `tempfile`'s default) on the first call in a
    process, or again when it went missing; making it removes those of processes that have ended."""
    global _base, _current
    with _lock:
        if _current is not None and _current[0] == os.getpid() and os.path.isdir(_current[1]):
            return _current[1]
        if _base is None:
            _base = tempfile.gettempdir()
        owner = _owner(os.getpid())
        if owner is not None:
            remove_ended(Path(_base))
        directory = tempfile.mkdtemp(prefix=f"{PREFIX}{owner}-" if owner else PREFIX, dir=_base)  # mode 0700
        tempfile.tempdir = directory
        _current = (os.getpid(), directory)
        atexit.register(_remove_at_exit, os.getpid(), directory)
        return directory


def _remove_at_exit(pid: int, directory: str) -> None:
    """At a normal exit, remove this process's directory (not a forked child's exit: it has a directory of its own)."""
    if os.getpid() == pid:
        shutil.rmtree(directory, ignore_errors=True)


def remove_ended(base: Path) -> list[Path]:
    """Remove the private directories in `base` whose owner, a process of this pid namespace, has ended (or is a
    zombie, which writes nothing more); return them. Nothing where this system cannot tell (no /proc)."""
    namespace = _namespace()
    if namespace is None:
        return []
    removed = []
    for entry in base.iterdir():
        owned = _OWNED.fullmatch(entry.name)
        if owned is None or owned["namespace"] != namespace or _started(int(owned["pid"])) == owned["started"]:
            continue
        with contextlib.suppress(FileNotFoundError):  # another process removed it first
            status = entry.lstat()
            if stat.S_ISDIR(status.st_mode) and status.st_uid == os.getuid():
                shutil.rmtree(entry, ignore_errors=True)  # symlink-safe on Linux (rmtree.avoids_symlink_attacks)
                removed.append(entry)
    return removed


def _owner(pid: int) -> str | None:
    """'namespace-pid-start' naming process `pid` for good, None where this system cannot tell."""
    namespace, started = _namespace(), _started(pid)
    return None if namespace is None or started is None else f"{namespace}-{pid}-{started}"


def _namespace() -> str | None:
    """The inode of this process's pid namespace ('pid:[4026531836]'): pids are compared within one only."""
    try:
        return "".join(filter(str.isdigit, os.readlink("/proc/self/ns/pid"))) or None
    except OSError:
        return None


def _started(pid: int) -> str | None:
    """When process `pid` started (clock ticks after boot, /proc/PID/stat field 22), None when none runs with that
    pid: ended, or a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()  # the name may hold ") "
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else fields[19]
