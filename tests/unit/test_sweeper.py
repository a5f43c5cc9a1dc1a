"""The API's housekeeping thread: every sweep runs each round, and one that fails holds back none of the others."""

from __future__ import annotations

import logging
import threading

import pytest

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
