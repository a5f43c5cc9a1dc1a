"""Waiting in a test until another thread's transaction waits for a lock, on PostgreSQL or the embedded SQLite."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from bench.common import libpq_dsn


def wait_for_a_lock_wait(database_url: str, waiter: threading.Thread, timeout: float = 60) -> str | None:
    """Once a transaction on `database_url` waits for a lock, what it waits for; None if `waiter` ended first.

    On PostgreSQL the session's wait event (`advisory`: a `transaction_lock`; `transactionid`, `tuple`: a row), of
    that database's sessions only; on SQLite the name of the `transaction_lock` this process waits for. Fails when
    nothing waited within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    with _lock_waits(database_url) as waited_for:
        while waiter.is_alive():
            if (waiting := waited_for()) is not None:
                return waiting
            assert time.monotonic() < deadline, "nothing waited for a lock"
            time.sleep(0.02)
    return None


@contextlib.contextmanager
def _lock_waits(database_url: str) -> Iterator[Callable[[], str | None]]:
    """What one transaction on the database waits for now, if any, asked as often as needed."""
    if not database_url.startswith("postgresql"):
        yield _a_process_lock_waited_for
        return
    import psycopg

    dsn = libpq_dsn(database_url)
    with psycopg.connect(dsn, autocommit=True) as observer:  # each query its own snapshot of pg_stat_activity
        yield lambda: _a_wait_event(observer)


def _a_wait_event(observer) -> str | None:  # type: ignore[no-untyped-def]
    waiting = observer.execute(
        "SELECT wait_event FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
    ).fetchone()
    return None if waiting is None else str(waiting[0])


def _a_process_lock_waited_for() -> str | None:
    """The name of a process lock with more users (holders and waiters) than holders."""
    from core.db import _PROCESS_LOCKS

    with _PROCESS_LOCKS._changed:
        return next(
            (name for name, lock in _PROCESS_LOCKS._locks.items() if lock.users > lock.readers + lock.writer), None
        )


def waits_for_a_file_lock(pid: int) -> bool:
    """Whether process `pid` waits for a `flock` now: Linux lists each waiter in /proc/locks with `->` before it."""
    return any(fields[1:2] == ["->"] and fields[5:6] == [str(pid)]
               for fields in (line.split() for line in Path("/proc/locks").read_text().splitlines()))
