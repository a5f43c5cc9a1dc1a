"""Two queries that read a whole table as it grew, on the embedded SQLite and on PostgreSQL: an audit export over a
time window walked the ledger from id 0 to its first row, and the /metrics document counts read every document. Each
now seeks through an index (bench/sqlite_plans.py prints the plans and times at scale); their answers are unchanged."""

from __future__ import annotations

import random
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import delete, insert, update
from sqlalchemy.orm import Session

from audit import repository
from audit.schemas import ExportFilters
from bench.common import libpq_dsn
from bench.sqlite_plans import START, captured_statements, event_row, pg_query_plan, query_plan
from core import migrate
from core.db import get_engine
from core.models import Department, Document, RetrievalEvent
from core.settings import Settings

T = START + timedelta(days=1)


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path, make_pg_database: Callable[[], str]) -> str:
    """A fresh database at head: the embedded SQLite, or a throw-away PostgreSQL one (dropped at the session's end)."""
    url = Settings(data_dir=tmp_path).resolved_database_url if request.param == "sqlite" else make_pg_database()
    migrate.upgrade(url)
    return url


@contextmanager
def _raw(url: str) -> Iterator[tuple[Any, Callable[..., list[str]]]]:
    """A driver connection to the database and the function giving a statement's plan on it."""
    if url.startswith("sqlite"):
        with sqlite3.connect(url.removeprefix("sqlite:///")) as connection:
            yield connection, query_plan
        return
    with psycopg.connect(libpq_dsn(url)) as connection:
        yield connection, pg_query_plan


def _plans(url: str, table: str, call: Callable[..., Any], *, setup: str | None = None) -> list[str]:
    """The plan of each statement on `table` that `call` runs, its steps joined by '; '."""
    statements = captured_statements(url, table, call)
    with _raw(url) as (connection, plan_of):
        if setup:
            connection.execute(setup)
        return ["; ".join(plan_of(connection, statement, parameters)) for statement, parameters in statements]


def _add_events(url: str, times: list[datetime]) -> None:
    """Events 1.. created at `times`, in that chain order; PostgreSQL gets its statistics, as autovacuum gives them."""
    rng = random.Random(3)
    with get_engine(url).begin() as connection:
        connection.execute(insert(RetrievalEvent), [{**event_row(n, rng), "created_at": at}
                                                    for n, at in enumerate(times, start=1)])
    if not url.startswith("sqlite"):
        with psycopg.connect(libpq_dsn(url), autocommit=True) as connection:
            connection.execute("ANALYZE retrieval_events")


def _exported_ids(url: str, filters: ExportFilters, through_id: int) -> list[int]:
    with Session(bind=get_engine(url)) as session:
        return [row.id for row in repository.iter_events(session, filters=filters, through_id=through_id)]


# Ten seconds apart around T; seven events at T+300 s and five at T+400 s (ties on both bounds of a window); then
# events stamped out of the chain's order, each older than one before it by less than a minute (writers' clocks that
# disagree a little): with no allowance for that, windows from T+590 s and to T+400 s left out an event each.
TIMES = ([T + timedelta(seconds=10 * (n - 20)) for n in range(40)] + [T + timedelta(seconds=300)] * 7
         + [T + timedelta(seconds=400)] * 5 + [T + timedelta(seconds=s) for s in (370, 600, 560, 590, 700, 655)])
WINDOWS = [(T, None), (T + timedelta(seconds=300), T + timedelta(seconds=400)), (None, T + timedelta(seconds=400)),
           (T + timedelta(seconds=380), T + timedelta(seconds=600)), (T + timedelta(seconds=590), None),
           (T - timedelta(hours=1), T + timedelta(seconds=300)), (T + timedelta(hours=1), None),
           (T - timedelta(hours=2), T - timedelta(hours=1)), (T + timedelta(seconds=300), T + timedelta(seconds=300))]


@pytest.mark.parametrize("through_id", [len(TIMES), 50])
def test_an_export_window_returns_exactly_its_events_in_chain_order_across_pages(
        database: str, through_id: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each window gives the events created in it (since inclusive, until exclusive) up to the export's last id, in
    id order: pages of 3 split the ties on either bound, and events stamped out of order by under a minute are in."""
    _add_events(database, TIMES)
    monkeypatch.setattr(repository, "_BATCH", 3)
    for since, until in WINDOWS:
        expected = [n for n, at in enumerate(TIMES, start=1) if n <= through_id and (since is None or at >= since)
                    and (until is None or at < until)]
        got = _exported_ids(database, ExportFilters(since=since, until=until), through_id)
        assert got == expected, (since, until)


def test_an_export_window_seeks_its_bounds_through_the_created_at_index(database: str) -> None:
    """The walk in id order began at id 0 and read every older event before its first row, and every newer one
    after its last (50 ms at 200,000 events on SQLite). It now starts after the last event older than the window
    and ends before the first newer one, each sought through ix_retrieval_events_created_at."""
    _add_events(database, [START + timedelta(seconds=5 * n) for n in range(2000)])
    window = ExportFilters(since=START + timedelta(seconds=5000), until=START + timedelta(seconds=6000))
    plans = _plans(database, "retrieval_events",
                   lambda session: list(repository.iter_events(session, filters=window, through_id=2000)))
    seeks = plans[:2]  # then the pages, in id order
    if database.startswith("sqlite"):
        assert all(plan.startswith("SEARCH retrieval_events USING COVERING INDEX ix_retrieval_events_created_at")
                   for plan in seeks), plans
    else:  # rows in created_at order from the index: only those with the first time read and sorted on by id
        assert all("using ix_retrieval_events_created_at" in plan and "Presorted Key: created_at" in plan
                   for plan in seeks), plans


def _add_documents(url: str, statuses: dict[str, list[str]]) -> None:
    rows = [{"id": f"{department}-{n}", "department": department, "title": "t", "content_type": "text/plain",
             "size_bytes": 1, "sha256": f"{n:064x}", "acl_groups": [], "status": status, "chunk_count": n + 1,
             "uploaded_by": "u", "created_at": START, "updated_at": START}
            for department, each in statuses.items() for n, status in enumerate(each)]
    with get_engine(url).begin() as connection:
        connection.execute(insert(Department), [{"name": name, "created_at": START} for name in statuses])
        connection.execute(insert(Document), rows)


def _counts(url: str) -> set[tuple[str, str, int, int]]:
    with Session(bind=get_engine(url)) as session:
        return set(repository.document_counts(session))


def test_document_counts_are_read_from_an_index_alone(database: str) -> None:
    """Every /metrics scrape counted documents and chunks by department and status from every row of documents
    (95 ms at 50,000 documents on SQLite, which also sorted them): ix_documents_department_status_chunks holds all
    it reads, in its GROUP BY order. PostgreSQL, whose statistics weigh the table's size, is shown the plan without
    a sequential scan: the one it takes once the table outgrows the index (bench/sqlite_plans.py --postgres)."""
    _add_documents(database, {"hr": ["ready"] * 3, "legal": ["ready", "failed"]})
    plans = _plans(database, "documents", repository.document_counts, setup=None if database.startswith("sqlite")
                   else "SET enable_seqscan = off")
    if database.startswith("sqlite"):
        assert plans == ["SCAN documents USING COVERING INDEX ix_documents_department_status_chunks"], plans
    else:
        assert "Index Only Scan using ix_documents_department_status_chunks on documents" in plans[0], plans


def test_document_counts_are_right_after_deletes(database: str) -> None:
    """A department whose documents are all gone is in no count (the gauges set it to 0: audit/observability.py), a
    document marked deleted moves to that status's count, with its chunks."""
    _add_documents(database, {"hr": ["ready", "ready", "queued"], "legal": ["ready", "failed"]})
    assert _counts(database) == {("hr", "ready", 2, 3), ("hr", "queued", 1, 3), ("legal", "ready", 1, 1),
                                 ("legal", "failed", 1, 2)}
    with get_engine(database).begin() as connection:
        connection.execute(delete(Document).where(Document.department == "legal"))
        connection.execute(update(Document).where(Document.id == "hr-0").values(status="deleted"))
    assert _counts(database) == {("hr", "ready", 1, 2), ("hr", "deleted", 1, 1), ("hr", "queued", 1, 3)}
