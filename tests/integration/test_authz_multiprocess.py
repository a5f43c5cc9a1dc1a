"""Two processes on one PostgreSQL: a grant or revocation made in one is seen by the other."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.orm import Session

from authz import repository
from core.db import get_engine

ROOT = Path(__file__).resolve().parents[2]


class DecisionProcess:
    """tests/support/decision_process.py running as its own Python process."""

    def __init__(self, database_url: str) -> None:
        self._proc = subprocess.Popen(  # noqa: S603 (fixed argv)
            [sys.executable, "-m", "tests.support.decision_process", database_url], cwd=ROOT, text=True,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)})

    def wait_ready(self) -> None:
        assert self._read()["ready"]

    def _read(self) -> dict[str, Any]:
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()
        assert line, "decision process exited"
        return json.loads(line)  # type: ignore[no-any-return]

    def ask(self, *words: str) -> dict[str, Any]:
        assert self._proc.stdin is not None
        self._proc.stdin.write(" ".join(words) + "\n")
        self._proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self._proc.stdin is not None:
            self._proc.stdin.close()
        self._proc.wait(timeout=30)


@pytest.fixture
def processes(pg_url: str) -> Iterator[tuple[DecisionProcess, DecisionProcess]]:
    a, b = DecisionProcess(pg_url), DecisionProcess(pg_url)  # both start at once
    try:
        a.wait_ready()
        b.wait_ready()
        yield a, b
    finally:
        a.close()
        b.close()


def _wait_until(process: DecisionProcess, expected: bool, *words: str, timeout: float = 10.0) -> float:
    """Poll the ordinary (cached) path until it answers `expected`; the seconds it took."""
    started = time.time()
    while time.time() - started < timeout:
        answer = process.ask(*words)
        if answer["result"] is expected:
            return float(answer["t"]) - started
        time.sleep(0.01)
    raise AssertionError("the other process never saw the policy change")


def test_grant_and_revoke_propagate_to_the_other_process(pg_url: str,
                                                         processes: tuple[DecisionProcess, DecisionProcess]) -> None:
    a, b = processes
    department, user = f"mp-{uuid.uuid4().hex[:8]}", f"mp-user-{uuid.uuid4().hex[:6]}"
    with Session(get_engine(pg_url)) as session:
        repository.add_department(session, department)
        session.commit()
    assert b.ask("check", user, department)["result"] is False  # B has loaded the policy before the change
    assert a.ask("grant", user, "reader", department)["result"] == "ok"
    assert b.ask("query", user, department)["result"] is True  # the query path sees it at once
    assert a.ask("revoke", user, "reader", department)["result"] == "ok"
    assert b.ask("query", user, department)["result"] is False  # a revoked role fails on the next query
    delay = _wait_until(b, False, "check", user, department)
    assert a.ask("grant", user, "reader", department)["result"] == "ok"
    delay = max(delay, _wait_until(b, True, "check", user, department))
    assert b.ask("query", user, department)["version"] == a.ask("check", user, department)["version"]
    print(f"\npolicy propagation to the other process (cached check path): {delay * 1000:.0f} ms")  # noqa: T201
