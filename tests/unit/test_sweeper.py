"""The API's housekeeping thread: every sweep runs each round, and one that fails holds back none of the others."""

from __future__ import annotations

import logging
import threading

import pytest

from core.errors import Unavailable
from core.sweeper import Sweeper, at_most_every


def test_a_failing_sweep_is_logged_and_the_others_keep_running(caplog: pytest.LogCaptureFixture) -> None:
    rounds, enough = [], threading.Event()

    def broken() -> None:
        raise ConnectionError("the vector store is away")

    def counting() -> None:
        rounds.append(1)
        if len(rounds) >= 3:
            enough.set()

    sweeper = Sweeper({"document purge": broken, "ingestion job": counting}, interval=0.01)
    with caplog.at_level(logging.ERROR, logger="core.sweeper"):
        sweeper.start()
        assert enough.wait(timeout=30)
        sweeper.stop()
    failures = [r for r in caplog.records if r.getMessage() == "the document purge sweep failed"]
    assert len(failures) >= 2
    stopped_at = len(rounds)
    threading.Event().wait(0.1)
    assert len(rounds) == stopped_at  # stopped means no further round


def test_a_sweep_waiting_for_a_dependency_is_a_warning_without_a_traceback(caplog: pytest.LogCaptureFixture) -> None:
    """A purge while the blob volume is not mounted (or the vector store is down) was logged as a failure with its
    traceback every round; it is a warning naming what is away."""
    ran = threading.Event()

    def unmounted() -> None:
        ran.set()
        raise Unavailable("blob volume")

    sweeper = Sweeper({"document purge": unmounted}, interval=0.01)
    with caplog.at_level(logging.WARNING, logger="core.sweeper"):
        sweeper.start()
        assert ran.wait(timeout=30)
        sweeper.stop()
    waiting = "the document purge sweep waits for the blob volume: the next round tries again"
    assert caplog.records
    assert {(r.levelno, r.getMessage(), r.exc_info, r.exc_text) for r in caplog.records} == {
        (logging.WARNING, waiting, None, None)}


def test_a_throttled_sweep_runs_at_most_once_per_period_even_when_it_fails() -> None:
    runs = []

    def failing() -> None:
        runs.append(1)
        raise ConnectionError("the database is away")

    throttled = at_most_every(0.2, failing)
    with pytest.raises(ConnectionError):
        throttled()
    assert throttled() is None and len(runs) == 1  # within the period: not run again, not even after a failure
    threading.Event().wait(0.25)
    with pytest.raises(ConnectionError):
        throttled()
    assert len(runs) == 2


def test_a_sweep_failing_on_a_database_error_keeps_its_traceback(caplog: pytest.LogCaptureFixture) -> None:
    """A database error may be an outage or a bug (SQLite's "no such table" after a missed migration looks like
    one): it is logged as the sweep's failure, with its traceback, not as a wait."""
    from sqlalchemy.exc import OperationalError

    ran = threading.Event()

    def missing_table() -> None:
        ran.set()
        raise OperationalError("SELECT 1", {}, Exception("no such table: pending_purges"))

    sweeper = Sweeper({"document purge": missing_table}, interval=0.01)
    with caplog.at_level(logging.WARNING, logger="core.sweeper"):
        sweeper.start()
        assert ran.wait(timeout=30)
        sweeper.stop()
    assert caplog.records
    assert {(r.levelno, r.getMessage()) for r in caplog.records} == {(logging.ERROR, "the document purge sweep failed")}
    # its traceback: as logged, or as the masking filter renders it once configured (frames, never messages)
    assert all(r.exc_info is not None or "OperationalError" in (r.exc_text or "") for r in caplog.records)
