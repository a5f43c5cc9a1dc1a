"""govrag never ANALYZEs the embedded SQLite database, so its planner picks an index by the index's shape alone. The hot
queries whose plans hung on that seek their rows (bench/sqlite_plans.py prints each plan and its time at scale)."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bench.sqlite_plans import captured_statement, query_plan
from core import migrate
from core.settings import Settings
from ingestion import repository

CONTENT = "a" * 64


def _plan(settings: Settings, table: str, call: Callable[..., Any]) -> list[str]:
    """The plan SQLite picks for the first statement on `table` that `call` runs."""
    url = settings.resolved_database_url
    migrate.upgrade(url)
    statement, parameters = captured_statement(url, table, call)
    with sqlite3.connect(settings.data_dir / "govrag.db") as connection:
        return query_plan(connection, statement, parameters)


@pytest.mark.parametrize("lookup", [
    lambda session: repository.find_duplicate(session, department="hr", sha256=CONTENT),
    lambda session: repository.failed_copies(session, department="hr", sha256=CONTENT),
], ids=["find_duplicate", "failed_copies"])
def test_a_duplicate_lookup_seeks_the_departments_copies_of_the_content(lookup: Callable[..., Any],
                                                                         tmp_path: Path) -> None:
    """Every upload looks for a live copy of its content in its department (`find_duplicate`, oldest first), a
    retirement for its failed copies: SQLite read every document of the department through the listing index, which
    gives the order, not through the one on (department, sha256), which gives the rows (3.5 ms an upload at 50,000
    documents, growing with them). The index on (department, sha256, created_at, id) gives both."""
    plan = _plan(Settings(data_dir=tmp_path), "documents", lookup)
    assert plan[0] == ("SEARCH documents USING INDEX ix_documents_department_sha256_created "
                       "(department=? AND sha256=?)"), plan


@pytest.mark.parametrize("step", ["resend_lost", "resend_stalled", "send_unsent"])
def test_each_step_of_the_job_sweep_seeks_the_unfinished_jobs(step: str, tmp_path: Path) -> None:
    """The job sweep (every 10 s in each API process) looks for the few jobs queued or processing: each of its steps
    read every job ever run, two of them holding SQLite's write lock meanwhile (3.5 ms a step at 50,000 jobs). They
    seek them by status."""
    from workers import dispatch
    from workers.celery_app import create_celery

    settings = Settings(data_dir=tmp_path)
    app, grace = create_celery(settings), settings.job_resend_after_seconds
    run = {"resend_lost": lambda _: dispatch.resend_lost(app, older_than_seconds=grace),
           "resend_stalled": lambda _: dispatch.resend_stalled(app, stalled_after_seconds=grace),
           "send_unsent": lambda _: dispatch.send_unsent(app, older_than_seconds=grace)}[step]
    plan = _plan(settings, "ingestion_jobs", run)
    assert [line for line in plan if line.startswith("SCAN ingestion_jobs")] == [], plan
    assert any(line.startswith("SEARCH ingestion_jobs USING INDEX ix_ingestion_jobs_status") for line in plan), plan
