"""The API's housekeeping thread: every sweep runs each round, and one that fails holds back none of the others; a
failure is logged as it starts (and a bug now and then as it goes on), not every round."""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import text

from core.db import unit_of_work
from core.errors import Unavailable
from core.sweeper import NOT_RUN, STILL_FAILING_EVERY_ROUNDS, Sweeper, at_most_every
from tests.conftest import allow_connections


def _logged(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str, bool]]:
    """The sweeper's lines above DEBUG: level, message, whether a traceback came with it (as logged, or as the masking
    filter renders it once configured: frames, never messages)."""
    return [(r.levelno, r.getMessage(), r.exc_info is not None or bool(r.exc_text))
            for r in caplog.records if r.name == "core.sweeper" and r.levelno > logging.DEBUG]


def _rounds(sweeper: Sweeper, count: int) -> None:
    for _ in range(count):
        sweeper.run_round()


def _select_one(url: str) -> Callable[[], None]:
    def sweep() -> None:
        with unit_of_work(url) as session:
            session.execute(text("SELECT 1"))
    return sweep


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
    assert len(failures) == 1  # three rounds or more, the same failure: logged once
    stopped_at = len(rounds)
    threading.Event().wait(0.1)
    assert len(rounds) == stopped_at  # stopped means no further round


def test_a_sweep_waiting_for_a_dependency_is_one_warning_without_a_traceback(
        caplog: pytest.LogCaptureFixture) -> None:
    """A purge while the blob volume is not mounted (or the vector store is down) was logged with its traceback every
    round, then as a warning every round; it is one warning naming what is away, however many rounds it lasts."""
    def unmounted() -> None:
        raise Unavailable("blob volume")

    sweeper = Sweeper({"document purge": unmounted}, interval=60)
    with caplog.at_level(logging.DEBUG, logger="core.sweeper"):
        _rounds(sweeper, 5)
    assert _logged(caplog) == [
        (logging.WARNING, "the document purge sweep waits for the blob volume: the next round tries again", False)]


def test_a_database_outage_is_one_warning_with_its_traceback_then_one_line_when_the_sweep_runs_again(
        caplog: pytest.LogCaptureFixture, make_pg_database: Callable[[], str]) -> None:
    """Every sweep logged the traceback of a database outage every round, a flood for as long as it lasted: its first
    round is one warning (its traceback kept), the rounds after it DEBUG only, and its end one line. A sweep that
    does not need the database runs and logs nothing meanwhile."""
    url = make_pg_database()
    database = url.rsplit("/", 1)[1]
    sweeper = Sweeper({"ingestion job": _select_one(url), "orphan file": lambda: 0}, interval=60)
    with caplog.at_level(logging.DEBUG, logger="core.sweeper"):
        sweeper.run_round()
        allow_connections(database, False)
        try:
            _rounds(sweeper, 5)
            assert _logged(caplog) == [(
                logging.WARNING, "the ingestion job sweep waits for the database: the next round tries again", True)]
            assert len([r for r in caplog.records if r.name == "core.sweeper" and r.levelno == logging.DEBUG]) == 4
        finally:
            allow_connections(database, True)
        _rounds(sweeper, 2)
    _, (level, ran_again, with_traceback) = _logged(caplog)
    assert (level, with_traceback) == (logging.INFO, False)
    assert re.fullmatch(r"the ingestion job sweep runs again, 5 round\(s\) and \d+ s after it failed", ran_again)


def test_a_missing_table_under_sqlite_keeps_its_traceback_once(
        caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    """SQLite's "no such table" (a missed migration) is an OperationalError, as an outage is: its traceback, logged
    with its first round only, keeps it diagnosable."""
    sweeper = Sweeper({"document purge": _select_from_a_missing_table(f"sqlite:///{tmp_path / 'govrag.db'}")},
                      interval=60)
    with caplog.at_level(logging.DEBUG, logger="core.sweeper"):
        _rounds(sweeper, 3)
    assert _logged(caplog) == [
        (logging.WARNING, "the document purge sweep waits for the database: the next round tries again", True)]
    failure = next(r for r in caplog.records if r.levelno == logging.WARNING)
    assert "OperationalError" in (failure.exc_text or repr(failure.exc_info))


def _select_from_a_missing_table(url: str) -> Callable[[], None]:
    def sweep() -> None:
        with unit_of_work(url) as session:
            session.execute(text("SELECT document_id FROM pending_purges"))
    return sweep


def test_a_bug_is_logged_with_its_traceback_once_then_now_and_then_per_sweep(
        caplog: pytest.LogCaptureFixture) -> None:
    """The same bug, round after round, logged its traceback every round: it is logged with it once, then said to
    fail still once per STILL_FAILING_EVERY_ROUNDS rounds, for each sweep on its own; the error's message (which
    may quote what it was given) is never in a line."""
    fixed = threading.Event()

    def buggy() -> None:
        if not fixed.is_set():
            raise ValueError("the question of alice@example.com")

    sweeper = Sweeper({"document purge": buggy, "ingestion job": buggy}, interval=60)
    with caplog.at_level(logging.DEBUG, logger="core.sweeper"):
        _rounds(sweeper, 2 * STILL_FAILING_EVERY_ROUNDS + 1)
        fixed.set()
        _rounds(sweeper, 2)
    still = f"still fails (ValueError), {STILL_FAILING_EVERY_ROUNDS} rounds after it failed: the next round tries again"
    still_twice = still.replace(str(STILL_FAILING_EVERY_ROUNDS), str(2 * STILL_FAILING_EVERY_ROUNDS), 1)
    ran_again = f"runs again, {2 * STILL_FAILING_EVERY_ROUNDS + 1} round(s) and"
    for name in ("document purge", "ingestion job"):
        lines = [line for line in _logged(caplog) if line[1].startswith(f"the {name} sweep ")]
        assert lines[:3] == [
            (logging.ERROR, f"the {name} sweep failed", True),
            (logging.ERROR, f"the {name} sweep {still}", False),
            (logging.ERROR, f"the {name} sweep {still_twice}", False)]
        assert len(lines) == 4 and lines[3][0] == logging.INFO and ran_again in lines[3][1]
    assert not [r for r in caplog.records if "alice" in r.getMessage()]


def test_failures_that_take_turns_are_each_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    """A purge whose vector store answers one round in two (its timeout one round, a bug past it the next) logged a
    warning and a traceback every round, as each failure differed from the one before: each is logged once, for as
    long as the sweep fails."""
    rounds = []

    def flapping() -> None:
        rounds.append(1)
        if len(rounds) % 2:
            raise Unavailable("vector store")
        raise KeyError("points")

    sweeper = Sweeper({"document purge": flapping}, interval=60)
    with caplog.at_level(logging.DEBUG, logger="core.sweeper"):
        _rounds(sweeper, 10)
    assert _logged(caplog) == [
        (logging.WARNING, "the document purge sweep waits for the vector store: the next round tries again", False),
        (logging.ERROR, "the document purge sweep failed", True)]


def test_a_throttled_sweep_that_failed_does_not_run_again_until_it_does(caplog: pytest.LogCaptureFixture) -> None:
    """The rounds a throttled sweep skips after failing are no success: no line says it runs again."""
    def broken() -> None:
        raise Unavailable("vector store")

    sweeper = Sweeper({"orphan file": at_most_every(3600, broken)}, interval=60)
    with caplog.at_level(logging.DEBUG, logger="core.sweeper"):
        _rounds(sweeper, 3)
    assert _logged(caplog) == [
        (logging.WARNING, "the orphan file sweep waits for the vector store: the next round tries again", False)]


def _failing_run(runs: list[int]) -> Callable[[], None]:
    def failing() -> None:
        runs.append(1)
        raise ConnectionError("the database is away")
    return failing


def test_a_throttled_sweep_runs_at_most_once_per_period_even_when_it_fails() -> None:
    """Within its period a throttled sweep does not run again, not even after a failure (a period of an hour: no
    pause of a loaded machine between two calls outlasts it)."""
    runs: list[int] = []
    throttled = at_most_every(3600, _failing_run(runs))
    with pytest.raises(ConnectionError):
        throttled()
    assert throttled() is NOT_RUN and len(runs) == 1


def test_a_throttled_sweep_runs_again_once_its_period_is_over() -> None:
    runs: list[int] = []
    throttled = at_most_every(0.05, _failing_run(runs))
    with pytest.raises(ConnectionError):
        throttled()
    threading.Event().wait(0.1)  # twice the period: a slower machine only waits longer
    with pytest.raises(ConnectionError):
        throttled()
    assert len(runs) == 2
