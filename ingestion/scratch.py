"""This process's private temporary directory: `tempfile`'s default from the first parse on (a worker process's
start), so that every temporary file a parse writes — a converter's working directory, unstructured's copy of a
scanned PDF and its page images, pytesseract's `tess_*` files — lands in it, each still removed by whoever made it. A
worker child SIGKILLed at the hard time limit (or by the OOM killer) runs no cleanup: what it was writing stays
behind, the document's plaintext. Its owner holds a shared lock (flock) on the directory for as long as it lives; the
kernel drops it as the owner ends, however it ends. A process making its own directory removes those no process
holds: a Celery prefork child replacing a killed one does so as it starts. Never a live process's, whatever its pid
namespace (a container sharing the temporary directory), nor another user's; systemd-tmpfiles too leaves a locked
directory alone. Releases before these directories made the converters' working directories in the temporary
directory itself, with no owner to tell by: those of this user a day old, past any conversion, are removed too.
With a process's directory, removed by itself or after its end, go the pipes its LibreOffice conversions left in
/tmp. A process removing its own (at its exit, on a SIGTERM, at a stop) first kills every converter and OCR tool it
started that still runs, and waits for them (`sandbox.sessions_ended`): none writes in it, or makes a pipe, once it
is gone."""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

from core import forksafe
from core.errors import Dependency, Unavailable
from ingestion import legacy_office, sandbox

PREFIX = "govrag-tmp-"
# Older releases' pandoc and LibreOffice directories, made in the temporary directory itself (now in a private one)
LEGACY_PREFIXES = ("govrag-pandoc-", "govrag-soffice-")
LEGACY_AGE_SECONDS = 24 * 60 * 60  # far past any conversion: each is killed at the parse time limit (default 120 s)
# What a parse whose directory was removed under it (`parsing`) says is unavailable: the host's fault, not the file's
DEPENDENCY: Dependency = "temporary directory"
SIGTERM_AGAIN_SECONDS = 0.05  # a SIGTERM met as a program starts is sent again this much later (`_sent_again_later`)

# Reentrant: a SIGTERM handled on the main thread (`removed_on_sigterm`) may find it held by that thread, inside
# `private_dir`; the handler never returns there (the process ends), and at worst misses the directory being made
# then, empty still, left unheld as the process ends: the next process to make one removes it (so does a
# `Terminated` raised there, `stopped_on_sigterm`).
_lock = forksafe.rlock()
_base: str | None = None  # the temporary directory of the system (TMPDIR), where the private ones are made
_current: tuple[int, str, int] | None = None  # (owning pid, directory, descriptor holding its lock)
_removals = 0  # how many times this process began removing its directory (`parsing`)


def private_dir() -> str:
    """This process's private temporary directory, made (and made `tempfile`'s default) on the first call in a
    process (a forked child makes its own), or again when it went missing; making it removes those of processes
    that have ended."""
    global _base, _current
    with _lock:
        if _current is not None:
            if _current[0] == os.getpid() and os.path.isdir(_current[1]):
                return _current[1]
            os.close(_current[2])  # a missing one's; or, in a forked child, its parent's, which it would hold too
            _current = None  # closed: a remake failing below (`$TMPDIR` gone) must not leave it to be closed again
        if _base is None:
            _base = tempfile.gettempdir()
        remove_ended(Path(_base))
        directory, descriptor = _make_held(_base)
        tempfile.tempdir = directory
        _current = (os.getpid(), directory, descriptor)
        atexit.register(_remove_at_exit, os.getpid(), directory)
        return directory


@contextmanager
def parsing() -> Iterator[None]:
    """A parse in this process's private directory (`private_dir`, made here if need be): any failure of the block
    once that directory is gone (removed under a parse still running: by `remove_own` at a stop whose shutdown was cut
    short, as by a second Ctrl-C, or by hand) is no fault of the document but the host's, `Unavailable`, an outage
    ingestion waits out (the next parse makes the directory again), never a file refused as malformed. So is a
    failure once this process began removing it: the converter or OCR tool the removal kills first makes the parse
    fail before the directory is gone. So is `$TMPDIR` itself gone, where no directory can be made (a hand cleaning
    /tmp, a tmpfs unmounted)."""
    try:
        directory = private_dir()
    except FileNotFoundError:  # mkdtemp in a missing `$TMPDIR`: waited out as the directory's removal is
        raise Unavailable(DEPENDENCY) from None
    removals = _removals
    try:
        yield
    except Exception:
        if os.path.isdir(directory) and _removals == removals:
            raise
        raise Unavailable(DEPENDENCY) from None


def _make_held(base: str) -> tuple[str, int]:
    """A new directory in `base` (mode 0700, `mkdtemp`) and the descriptor holding its shared lock. Between the two
    another process may take it for an ended one's and remove it: then another is made."""
    while True:
        directory = tempfile.mkdtemp(prefix=PREFIX, dir=base)
        try:
            descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            continue
        fcntl.flock(descriptor, fcntl.LOCK_SH)  # waits for a process removing it to be done
        if os.fstat(descriptor).st_nlink:  # still there
            return directory, descriptor
        os.close(descriptor)


def _remove_at_exit(pid: int, directory: str) -> None:
    """At a normal exit, remove this process's directory (not a forked child's exit: it has a directory of its own),
    and the pipes its LibreOffice conversions made in /tmp. The converters and OCR tools still running (on a thread
    the exit abandons, or cut by a stop) are killed and waited for first (`sandbox.sessions_ended`), none starting
    until the removal is done: else they wrote on in it (LibreOffice's `lu*.tmp` copies of the document), which then
    stayed, not empty, for the next process to remove, and a `soffice.bin` made its pipe again once removed. `_lock`
    is taken first, as everywhere `sandbox._live_lock` is taken with it: a SIGTERM handled during the atexit one
    (`_remove_and_end`) then never waits for `_lock` held by a thread that waits for `_live_lock`."""
    global _removals
    if os.getpid() == pid:
        with _lock:
            _removals += 1  # before the kill: the parse whose program it kills fails as the directory's removal does
            with sandbox.sessions_ended():
                _remove_converters_sockets(Path(directory))
                shutil.rmtree(directory, ignore_errors=True)


def remove_own() -> None:
    """Remove this process's directory now, for a process about to end with no atexit run: `govrag serve` once
    uvicorn's shutdown is done, before uvicorn raises again the SIGTERM it stopped on, a Celery prefork child,
    which billiard ends with `os._exit`, `govrag demo` on a SIGTERM (`removed_on_sigterm`) and `govrag ingest` once a
    SIGTERM stopped it (`end_by_sigterm`). tempfile's default stays the removed directory, where nothing more can be
    written (a parse abandoned at the stop fails there, `Unavailable` (`parsing`), its copies not left in the
    temporary directory itself, with no owner to tell by)."""
    with _lock:
        if _current is not None:
            _remove_at_exit(*_current[:2])


@contextmanager
def removed_on_sigterm() -> Iterator[None]:
    """In this block, a SIGTERM (systemd, docker, Kubernetes) removes this process's directory (`remove_own`), then
    ends the process as the signal does, exit status and all, as `govrag serve` does once uvicorn's shutdown is done:
    `govrag demo` left it, the plaintext copies of the parse cut short in it, for the next process to remove. Off the
    main thread, where no signal handler can be set, as uvicorn does: nothing."""
    with _sigterm_handled_by(_remove_and_end):
        yield


class Terminated(KeyboardInterrupt):
    """A SIGTERM in a `stopped_on_sigterm` block: the work it cuts short stops as on a Ctrl-C (a KeyboardInterrupt,
    which no `except Exception` on its way swallows; `govrag ingest` hands the file's jobs back), and the command
    then ends by the signal (`end_by_sigterm`)."""


@contextmanager
def stopped_on_sigterm() -> Iterator[None]:
    """In this block, a SIGTERM raises `Terminated` on the main thread, for the command to stop as on a Ctrl-C, say
    so and end by the signal (`end_by_sigterm`), its directory removed; a second SIGTERM as it stops, and any after
    the block was left by the first, ends the process at once as `removed_on_sigterm` does. Off the main thread:
    nothing."""
    with _sigterm_handled_by(_raise_terminated):
        yield


def end_by_sigterm() -> None:
    """Remove this process's directory and end the process by SIGTERM, as it ends unhandled (a supervisor reads the
    signal in its status): a command `Terminated` stopped, once it said where. What it printed is flushed first."""
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    _remove_and_end(signal.SIGTERM, None)


@contextmanager
def _sigterm_handled_by(handler: Callable[[int, FrameType | None], None]) -> Iterator[None]:
    """SIGTERM handled by `handler` in this block, on the main thread only (no signal handler can be set elsewhere);
    the handler found restored after it, unless a `Terminated` left `_remove_and_end` in its place."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:  # None: a handler set outside Python, which cannot be set again; then the default
        if signal.getsignal(signal.SIGTERM) is handler:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _raise_terminated(signum: int, _frame: FrameType | None) -> None:
    """Raise `Terminated`, a second SIGTERM then ending the process at once (`_remove_and_end`). Not while this thread
    starts a program (`sandbox.starting_a_program`): raised then, the program would run on, held by no one; the
    signal is sent again shortly, as the parse time limit's alarm comes again."""
    if sandbox.starting_a_program():
        _sent_again_later(signum)
        return
    signal.signal(signum, _remove_and_end)
    raise Terminated


def _sent_again_later(signum: int) -> None:
    """Send `signum` to this process again shortly, for a handler met as this thread starts a program: the program
    is then held, and killed with the others (`sandbox.sessions_ended`)."""
    again = threading.Timer(SIGTERM_AGAIN_SECONDS, os.kill, (os.getpid(), signum))
    again.daemon = True
    again.start()


def _remove_and_end(signum: int, _frame: FrameType | None) -> None:
    """Remove this process's directory, then end by `signum` as it does unhandled; met as this thread starts a
    program, once it has started (`_sent_again_later`). The lock is held to the end: no other thread's parse makes
    the directory again between its removal and the process's end."""
    if sandbox.starting_a_program():
        _sent_again_later(signum)
        return
    with _lock:
        remove_own()
        signal.signal(signum, signal.SIG_DFL)
        signal.raise_signal(signum)


def remove_ended(base: Path) -> list[Path]:
    """Remove the private directories in `base` that no process holds (their owner has ended), and older releases'
    converter directories there last modified a day ago or more, this user's only; return them."""
    ended = [directory for directory in base.glob(f"{PREFIX}*") if _remove_unheld(directory)]
    day_old = time.time() - LEGACY_AGE_SECONDS
    return ended + [directory for prefix in LEGACY_PREFIXES for directory in base.glob(f"{prefix}*")
                    if _remove_unheld(directory, modified_before=day_old)]


def _remove_unheld(directory: Path, modified_before: float = math.inf) -> bool:
    """Remove `directory` if it is one of this user's that no process holds, last modified before `modified_before`
    (a time); whether it was removed."""
    try:
        descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:  # gone, a symbolic link, not a directory or not this user's to read
        return False
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held while removing: its maker waits, then retries
        status = os.fstat(descriptor)
        if status.st_uid != os.getuid() or status.st_mtime >= modified_before:
            return False
        _remove_converters_sockets(directory)
        shutil.rmtree(directory, ignore_errors=True)  # symlink-safe on Linux (rmtree.avoids_symlink_attacks)
        return True
    except OSError:  # held by its owner (BlockingIOError), or a file system without such locks: left alone
        return False
    finally:
        os.close(descriptor)


def _remove_converters_sockets(directory: Path) -> None:
    """Remove what the LibreOffice conversions in a process's `directory` left outside it, their pipes in /tmp: the
    process was killed, or is ending, mid-conversion. Before `directory` goes, while no other process can have a
    conversion of that path (nor, then, its pipe). Raises nothing: it runs in a SIGTERM's handler (`_remove_and_end`),
    which must go on to end the process; a directory gone or unreadable meanwhile leaves the pipes there."""
    with contextlib.suppress(OSError):
        for work in directory.glob(f"{legacy_office.PREFIX}*"):
            sandbox.remove_sockets(legacy_office.ipc_pipes(work))
