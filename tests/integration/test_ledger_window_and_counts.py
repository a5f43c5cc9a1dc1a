"""Two queries that read a whole table as it grew, on the embedded SQLite and on PostgreSQL: an audit export over a
time window walked the ledger from id 0 to its first row, and the /metrics document counts read every document. Each
now reads an index (bench/sqlite_plans.py prints the plans and times at scale); their answers are unchanged, whatever
the order of the events' times (writers' clocks that disagree), and the retention purge keeps every event as new as
its cutoff."""

from __future__ import annotations

import json
import random
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import delete, insert, select, update
from sqlalchemy.orm import Session

from audit import repository
from audit import service as audit_service
from audit.schemas import Decision, ExportFilters, ExportFormat, RetrievalRecord
from authz.identity import Identity
from bench.common import libpq_dsn
from bench.sqlite_plans import START, captured_statements, event_row, pg_query_plan, query_plan
from core import migrate
from core.db import get_engine, get_session_factory
from core.models import Department, Document, RetrievalEvent, utcnow
from core.settings import Settings

T = START + timedelta(days=1)
ADMIN = Identity(subject="root-admin", groups=(), is_platform_admin=True)


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
# events stamped out of the chain's order (writers' clocks that disagree): older than one before them by less than a
# minute, then by five minutes (T+1000 s after T+1300 s) and by a day (T+1500 s after a day later). Windows to
# T+1100 s, from T+1200 s and from T+1400 s each left an event out of a walk whose bounds were sought by time with a
# minute to spare (those from T+590 s and to T+400 s did with none).
TIMES = ([T + timedelta(seconds=10 * (n - 20)) for n in range(40)] + [T + timedelta(seconds=300)] * 7
         + [T + timedelta(seconds=400)] * 5 + [T + timedelta(seconds=s) for s in (370, 600, 560, 590, 700, 655)]
         + [T + timedelta(seconds=s) for s in (1300, 1000, 1400)] + [T + timedelta(days=1, seconds=1500)]
         + [T + timedelta(seconds=1500)])
WINDOWS = [(T, None), (T + timedelta(seconds=300), T + timedelta(seconds=400)), (None, T + timedelta(seconds=400)),
           (T + timedelta(seconds=380), T + timedelta(seconds=600)), (T + timedelta(seconds=590), None),
           (T - timedelta(hours=1), T + timedelta(seconds=300)), (T + timedelta(hours=1), None),
           (T - timedelta(hours=2), T - timedelta(hours=1)), (T + timedelta(seconds=300), T + timedelta(seconds=300)),
           (T + timedelta(seconds=900), T + timedelta(seconds=1100)), (T + timedelta(seconds=1200), None),
           (T + timedelta(seconds=1400), T + timedelta(seconds=1600))]


@pytest.mark.parametrize("through_id", [len(TIMES), 50])
def test_an_export_window_returns_exactly_its_events_in_chain_order_across_pages(
        database: str, through_id: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each window gives the events created in it (since inclusive, until exclusive) up to the export's last id, in
    id order: pages of 3 split the ties on either bound, and events stamped out of order, by seconds or a day, are
    in."""
    _add_events(database, TIMES)
    monkeypatch.setattr(repository, "_BATCH", 3)
    for since, until in WINDOWS:
        expected = [n for n, at in enumerate(TIMES, start=1) if n <= through_id and (since is None or at >= since)
                    and (until is None or at < until)]
        got = _exported_ids(database, ExportFilters(since=since, until=until), through_id)
        assert got == expected, (since, until)


def test_an_export_window_reads_its_bounds_from_the_created_at_index(database: str) -> None:
    """The walk in id order began at id 0 and read every older event before its first row, and every newer one
    after its last (50 ms at 200,000 events on SQLite). It now goes from the window's first event to its last, their
    ids read from ix_retrieval_events_created_at over the window alone."""
    _add_events(database, [START + timedelta(seconds=5 * n) for n in range(2000)])
    window = ExportFilters(since=START + timedelta(seconds=5000), until=START + timedelta(seconds=6000))
    plans = _plans(database, "retrieval_events",
                   lambda session: list(repository.iter_events(session, filters=window, through_id=2000)))
    bounds = plans[0]  # then the pages, in id order
    if database.startswith("sqlite"):
        assert bounds == ("SEARCH retrieval_events USING COVERING INDEX ix_retrieval_events_created_at "
                          "(created_at>? AND created_at<?)"), plans
    else:  # the page after it reads the window's rows by id
        assert bounds.startswith("Aggregate") and "using ix_retrieval_events_created_at" in bounds, plans


def _record(n: int) -> RetrievalRecord:
    return RetrievalRecord(request_id=f"req-{n}", subject="alice", groups=[], departments_requested=[],
                           departments_searched=["hr"], decision=Decision.answered, reason=None,
                           question_masked="q", purpose=None, latency_ms=1.0, chunks=[])


def _write(settings: Settings, stamps: list[datetime], monkeypatch: pytest.MonkeyPatch) -> None:
    """Events appended through the ledger's own write path, each stamped by its writer's clock (hosts whose clocks
    disagree); what is appended after them, by the real one."""
    clock = iter(stamps)
    monkeypatch.setattr(audit_service, "utcnow", lambda: next(clock, None) or utcnow())
    with get_session_factory(settings.resolved_database_url)() as session:
        for n in range(len(stamps)):
            audit_service.record_retrieval(session=session, record=_record(n), settings=settings)


def _export(settings: Settings, since: datetime | None, until: datetime | None) -> list[int]:
    """The ids of the retrieval events a compliance export of the window gives (not the exports' own events)."""
    with get_session_factory(settings.resolved_database_url)() as session:
        lines = list(audit_service.export_events(
            session=session, settings=settings, identity=ADMIN, scope=None,
            filters=ExportFilters(since, until, event_type="retrieval"), fmt=ExportFormat.jsonl))
    return [json.loads(line)["id"] for line in "".join(lines).splitlines()[:-1]]


def test_an_event_stamped_by_a_clock_minutes_behind_is_exported_by_every_window_holding_its_time(
        database: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Event 3's writer has a clock five minutes behind event 2's: stamped T+5 min, it follows 2's T+10 min in the
    chain. A walk whose bounds were sought by time, with a minute to spare, ended before 2 (the first event as new as
    T+7 min) on a window to T+6 min, leaving 3 out, and started after 3 (the last event older than T+8 min) on one
    from T+9 min, leaving 2 out."""
    settings = Settings(data_dir=tmp_path, database_url=database, audit_checkpoint_every=0)
    minutes = [0, 10, 5, 11]
    _write(settings, [T + timedelta(minutes=m) for m in minutes], monkeypatch)
    for since, until in [(4, 6), (None, 6), (9, None), (5, 11), (0, 10)]:
        expected = [n for n, m in enumerate(minutes, start=1)
                    if (since is None or m >= since) and (until is None or m < until)]
        got = _export(settings, None if since is None else T + timedelta(minutes=since),
                      None if until is None else T + timedelta(minutes=until))
        assert got == expected, (since, until)


def test_a_retention_purge_never_deletes_an_event_as_new_as_its_cutoff(
        database: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Event 3, stamped by a clock six minutes behind, is older than the cutoff though after event 2, which is not.
    The purge deleted through the newest event older than the cutoff (3), and 2 with it, a retained event; it now
    deletes through the last event before the first as new as the cutoff (1), and 3 waits for a later purge."""
    settings = Settings(data_dir=tmp_path, database_url=database, audit_retention_days=1)
    _write(settings, [T - timedelta(hours=1), T + timedelta(minutes=5), T - timedelta(minutes=1),
                      T + timedelta(minutes=10)], monkeypatch)
    with get_session_factory(database)() as session:
        assert audit_service.purge_expired(session=session, settings=settings, identity=ADMIN,
                                           now=T + timedelta(days=1)) == 1
        kept = session.scalars(select(RetrievalEvent.id).order_by(RetrievalEvent.id)).all()
        assert kept == [2, 3, 4, 5]  # 5: the purge's own event
        assert audit_service.verify(session=session, settings=settings).ok


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
