"""A real fork in a test, its child waited for with a time limit: a child that hangs (on a lock no thread of it will
release) fails the test, killed, instead of hanging it."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable

from tests.support.polling import wait_until


def exit_code_of_child_forked_holding(lock: threading.Lock, check: Callable[[], bool]) -> int:
    """The exit code of a child forked while another thread holds `lock`: 0 when `check` holds in it. The child must
    end within 30 s: one waiting for ever on a lock fails the test (killed) instead of hanging it."""
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with lock:
            held.set()
            release.wait()

    holder = threading.Thread(target=hold, daemon=True)  # never keeps the run alive, whatever happens to it
    holder.start()
    try:
        assert held.wait(30), "the other thread never took the lock"
        return exit_code_of_child(check)
    finally:
        release.set()
        holder.join(30)


def exit_code_of_child(check: Callable[[], bool]) -> int:
    """Fork, run `check` in the child (exit 0 when it holds, else 1) and wait at most 30 s for it to end (killed then:
    the test fails rather than hangs)."""
    pid = os.fork()
    if pid == 0:
        ok = False
        try:
            ok = check()
        finally:
            os._exit(0 if ok else 1)
    statuses: list[int] = []

    def ended() -> bool:
        waited, status = os.waitpid(pid, os.WNOHANG)
        statuses.extend([status] if waited else [])
        return bool(statuses)

    try:
        wait_until(ended, timeout=30, what="the forked child to end")
    finally:
        if not statuses:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(statuses[0])
