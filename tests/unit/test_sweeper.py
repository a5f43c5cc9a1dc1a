"""The API's housekeeping thread: every sweep runs each round, and one that fails holds back none of the others."""

from __future__ import annotations

import logging
import threading

import pytest

from core.sweeper import Sweeper


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
