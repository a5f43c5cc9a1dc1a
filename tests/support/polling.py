"""Waiting in a test for a state another process or thread reaches, by asking again until it holds, or for a line a
process prints."""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

PRINTED_WITHIN = 300.0  # seconds a process started by a test has to print the line it is waited on (a slow CI's start)


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, *, every: float = 0.1) -> None:
    """Returns once `predicate()` holds, asked every `every` seconds; fails naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def lines_until(process: subprocess.Popen[Any], last: str, *, timeout: float = PRINTED_WITHIN,
                errors: Path | None = None) -> list[str]:
    """The lines `process` printed on its standard output up to `last` (included, newlines stripped); nothing after
    it is read, for the caller to `communicate` with it. If it has not printed `last` after `timeout` seconds, or
    closed its standard output without it and has not ended `timeout` seconds later, it is killed (a hung test fails,
    never hangs the suite); either way, and if it ended without `last`, fails with the tail of what it printed: its
    standard output and error (its pipe, or the file `errors` it writes to)."""
    assert process.stdout is not None
    lines: list[str] = []
    pipe = process.stdout.fileno()

    def read() -> None:  # a byte at a time from the pipe: a buffered read would take what follows `last` too
        line = bytearray()
        while byte := os.read(pipe, 1):  # b"" at the end of file: the process closed it (or ended)
            if byte != b"\n":
                line += byte
                continue
            lines.append(line.decode(errors="replace"))
            line.clear()
            if lines[-1] == last:
                return
        if line:
            lines.append(line.decode(errors="replace"))

    reader = threading.Thread(target=read, name="lines-until", daemon=True)
    reader.start()
    reader.join(timeout)
    if lines[-1:] == [last]:
        return lines
    if reader.is_alive():
        how = f"printed no {last!r} line in {timeout:.0f} s (killed)"
        process.kill()
        reader.join(60)  # at its end of file, unless a child of its own still holds the pipe
    else:
        how = f"closed its output without a {last!r} line and did not end in {timeout:.0f} s (killed)"
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout)
            how = f"ended (exit {process.returncode}) without a {last!r} line"
        process.kill()  # nothing if it ended
    raise AssertionError(f"the process {how}; the end of what it printed:\n{_tail(process, lines, errors)}")


def _tail(process: subprocess.Popen[Any], lines: list[str], errors: Path | None) -> str:
    """The end of what a process that ended (or was killed) printed: its standard output, then its error."""
    try:
        _, said = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:  # a child of its own still holds a pipe
        said = ""
    if errors is not None:
        said = errors.read_text(errors="replace")
    if isinstance(said, bytes):  # a process started without text=True
        said = said.decode(errors="replace")
    return "\n".join([*lines, said or ""])[-2000:]
