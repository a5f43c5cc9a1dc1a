"""Waiting in a test for a state another process or thread reaches, by asking again until it holds, or for a line a
process prints."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

PRINTED_WITHIN = 300.0  # seconds a process started by a test has to print the line it is waited on (a slow CI's start)


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, *, every: float = 0.1) -> None:
    """Returns once `predicate()` holds, asked every `every` seconds; fails naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def lines_until(process: subprocess.Popen[str], last: str, *, timeout: float = PRINTED_WITHIN,
                errors: Path | None = None) -> list[str]:
    """The lines `process` printed on its standard output up to `last` (included, newlines stripped); nothing after
    it is read, for the caller to `communicate` with it. If it ends without printing `last`, or has not printed it
    after `timeout` seconds (it is then killed: a hung test fails, never hangs the suite), fails with the tail of
    what it printed: its standard output and error (its pipe, or the file `errors` it writes to)."""
    assert process.stdout is not None
    lines: list[str] = []
    pipe = process.stdout.fileno()

    def read() -> None:  # a byte at a time from the pipe: a buffered read would take what follows `last` too
        line = bytearray()
        while byte := os.read(pipe, 1):
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
    timed_out = reader.is_alive()
    if timed_out:
        process.kill()
        reader.join(60)  # at its end of file, unless a child of its own still holds the pipe
    tail = _tail(process, lines, errors)
    how = f"printed no {last!r} line in {timeout:.0f} s (killed)" if timed_out else (
        f"ended (exit {process.returncode}) without a {last!r} line")
    raise AssertionError(f"the process {how}; the end of what it printed:\n{tail}")


def _tail(process: subprocess.Popen[str], lines: list[str], errors: Path | None) -> str:
    """The end of what a process that ended (or was killed) printed: its standard output, then its error."""
    try:
        _, said = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:  # a child of its own still holds a pipe
        said = ""
    if errors is not None:
        said = errors.read_text(errors="replace")
    return "\n".join([*lines, said or ""])[-2000:]
