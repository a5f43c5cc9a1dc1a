"""The database's hot queries: the plan the embedded SQLite (or PostgreSQL) picks for each, and its time, at a
realistic size.

    .venv/bin/python -m bench.sqlite_plans [--documents 50000] [--events 200000] [--revision 0014] [--analyze]
                                           [--postgres | --both]

Builds a throw-away SQLite database at `--revision` (default: head) holding documents in eight departments, one job
each (a few unfinished, as in a steady state) and a ledger, then calls the code that issues each hot query
(find_duplicate, failed_copies, listing pages, the ledger's walk and the first page of an export over a time window,
the /metrics document counts, each step of the job sweep), captures its SQL (every statement on the table, when it
runs several), and prints each statement's EXPLAIN QUERY PLAN and their summed median time. govrag never ANALYZEs
SQLite, so the plans shown are those without statistics; `--analyze` runs a full ANALYZE first, to compare.
`--postgres` measures the same on a throw-away PostgreSQL database (GOVRAG_TEST_PG_DSN's server), VACUUM ANALYZEd as
autovacuum leaves it, with EXPLAIN; `--both` measures SQLite, then PostgreSQL (bench/run_all.py runs it so: a re-run
of `make bench` keeps both). Printed, never asserted.
"""

from __future__ import annotations

import argparse
import random
import re
import sqlite3
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
from sqlalchemy import event, insert
from sqlalchemy.orm import Session

from bench.common import libpq_dsn, machine, throwaway_postgres

DEPARTMENTS = ["hr", "finance", "legal", "engineering", "sales", "ops", "it", "research"]
START = datetime(2026, 1, 1, tzinfo=UTC)
RUNS = 7
_NO_TABLE_WORD = re.compile(r"^(SCAN|SEARCH) TABLE ")


def _populate(url: str, documents: int, events: int) -> list[dict[str, Any]]:
    """Documents (mostly ready; a few deleted, failed, quarantined or still in the pipeline), a job for each, and a
    ledger with a checkpoint every 100 events. The unfinished jobs were sent a moment ago (stamped an hour ahead, so
    they stay so for the whole run): each sweep step finds nothing to do, as in a steady state, and changes nothing."""
    from core.db import get_engine
    from core.models import AuditCheckpoint, Department, Document, IngestionJob, RetrievalEvent

    rng, now = random.Random(7), datetime.now(UTC) + timedelta(hours=1)
    statuses = ["ready"] * 90 + ["deleted"] * 4 + ["failed"] * 3 + ["quarantined"] * 2 + ["queued", "processing"]
    rows, jobs = [], []
    for n in range(documents):
        status, created = rng.choice(statuses), START + timedelta(seconds=n * 30)
        row = {"id": str(uuid.UUID(int=rng.getrandbits(128))), "department": rng.choice(DEPARTMENTS), "title": "t",
               "content_type": "text/plain", "size_bytes": 100, "sha256": f"{rng.getrandbits(256):064x}",
               "acl_groups": [], "classification": "internal", "status": status, "chunk_count": 5,
               "uploaded_by": "u", "created_at": created, "updated_at": created, "flagged_chunks": 0,
               "index_generation": 1, "served_generation": 1 if status == "ready" else None, "withheld": False}
        rows.append(row)
        unfinished = status in ("queued", "processing")
        jobs.append({"id": str(uuid.UUID(int=rng.getrandbits(128))), "document_id": row["id"],
                     "status": status if status != "deleted" else "ready", "attempts": 1, "crashed_runs": 0,
                     "created_at": now if unfinished else created, "updated_at": now if unfinished else created,
                     "sent_at": now if unfinished else created})
    with get_engine(url).begin() as connection:
        connection.execute(insert(Department), [{"name": name, "created_at": START} for name in DEPARTMENTS])
        connection.execute(insert(Document), rows)
        connection.execute(insert(IngestionJob), jobs)
        for first in range(1, events + 1, 20_000):
            connection.execute(insert(RetrievalEvent), [event_row(n, rng) for n in range(first, min(first + 20_000,
                                                                                                 events + 1))])
        connection.execute(insert(AuditCheckpoint), [
            {"created_at": START + timedelta(seconds=n * 5), "kind": "periodic", "last_event_id": n,
             "last_hash": f"{n:064x}", "event_count": 0, "signature": "s"} for n in range(100, events + 1, 100)])
    return rows


def event_row(n: int, rng: random.Random) -> dict[str, Any]:
    """A retrieval event as a row (its hashes placeholders: no plan reads them)."""
    return {"id": n, "request_id": uuid.UUID(int=rng.getrandbits(128)).hex,
            "created_at": START + timedelta(seconds=n * 5), "event_type": "retrieval",
            "subject": f"user{rng.randrange(500)}", "groups": ["g"], "departments_requested": [],
            "departments_searched": rng.sample(DEPARTMENTS, 2), "decision": "answered",
            "chunks": [{"document_id": "d", "chunk_id": "c"}], "question_masked": "what is <PERSON>?",
            "latency_ms": 1.0, "roles": [], "guard_verdicts": {}, "details": {}, "prev_hash": "0" * 64,
            "hash": f"{n:064x}"}


def _probes(settings: Any, app: Any, documents: list[dict[str, Any]],
            events: int) -> list[tuple[str, str, Callable[..., Any]]]:
    """(name, the table its statement reads, a call issuing it with a session); the job sweeps send on `app`."""
    from audit import repository as ledger
    from audit.schemas import ExportFilters
    from ingestion import repository
    from workers import dispatch

    middle = documents[len(documents) // 2]
    window = ExportFilters(since=START + timedelta(seconds=events * 3), until=START + timedelta(seconds=events * 3.5))
    recent = ExportFilters(since=START + timedelta(seconds=events * 3))  # events are 5 s apart: the newest 40 %
    grace, stalled = settings.job_resend_after_seconds, settings.ingest_time_limit_seconds
    return [
        ("find_duplicate (an upload of new content)", "documents",
         lambda s: repository.find_duplicate(s, department="hr", sha256="f" * 64)),
        ("failed_copies", "documents", lambda s: repository.failed_copies(s, department="hr", sha256="f" * 64)),
        ("document_ids_with_keys (key rotation)", "documents",
         lambda s: repository.document_ids_with_keys(s, "hr")),
        ("documents_page, first page", "documents",
         lambda s: repository.documents_page(s, department="hr", status=None, before=None, limit=50)),
        ("documents_page, after a cursor", "documents", lambda s: repository.documents_page(
            s, department="hr", status=None, before=(middle["created_at"], middle["id"]), limit=50)),
        ("audit verify: a page of the chain", "retrieval_events",
         lambda s: next(ledger.iter_chain(s, after_id=events // 2))),
        ("audit export: first page of a time window", "retrieval_events",
         lambda s: next(ledger.iter_events(s, filters=window, through_id=events))),
        ("audit export: first page since a time", "retrieval_events",
         lambda s: next(ledger.iter_events(s, filters=recent, through_id=events))),
        ("document_counts (each /metrics scrape)", "documents", ledger.document_counts),
        ("job sweep: resend_lost", "ingestion_jobs", lambda _: dispatch.resend_lost(app, older_than_seconds=grace)),
        ("job sweep: resend_stalled", "ingestion_jobs",
         lambda _: dispatch.resend_stalled(app, stalled_after_seconds=stalled)),
        ("job sweep: send_unsent", "ingestion_jobs", lambda _: dispatch.send_unsent(app, older_than_seconds=grace)),
    ]


def captured_statement(url: str, table: str, call: Callable[[Session], Any]) -> tuple[str, Any]:
    """The first statement reading or updating `table` that `call` (given a session, rolled back after) ran on the
    database at `url`, and its parameters."""
    return captured_statements(url, table, call)[0]


def captured_statements(url: str, table: str, call: Callable[[Session], Any]) -> list[tuple[str, Any]]:
    """Every statement reading or updating `table` that `call` (given a session, rolled back after) ran on the
    database at `url`, with its parameters, in order."""
    from core.db import get_engine, get_session_factory

    seen: list[tuple[str, Any]] = []

    def capture(_conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, _many: bool) -> None:
        if table in statement and statement.lstrip().startswith(("SELECT", "UPDATE")):
            seen.append((statement, parameters))

    engine = get_engine(url)
    event.listen(engine, "before_cursor_execute", capture)
    try:
        with get_session_factory(url)() as session:
            call(session)
            session.rollback()
    finally:
        event.remove(engine, "before_cursor_execute", capture)
    return seen


def query_plan(connection: sqlite3.Connection, statement: str, parameters: Any) -> list[str]:
    """The steps of the plan SQLite picks for the statement (EXPLAIN QUERY PLAN's detail column), worded as SQLite
    3.36 and later word them: before it a step read "SCAN TABLE t" / "SEARCH TABLE t USING ..."."""
    return [_NO_TABLE_WORD.sub(r"\1 ", row[3])
            for row in connection.execute(f"EXPLAIN QUERY PLAN {statement}", parameters)]


def pg_query_plan(connection: psycopg.Connection[Any], statement: str, parameters: Any) -> list[str]:
    """The nodes of the plan PostgreSQL picks for the statement (EXPLAIN without costs), one a line, stripped."""
    return [row[0].strip() for row in connection.execute(f"EXPLAIN (COSTS OFF) {statement}", parameters)]


def _plan_and_time(raw: Any, plan_of: Callable[..., list[str]], statements: list[tuple[str, Any]]) -> tuple[
        list[str], float]:
    """The plans the database picks for the statements, one after the other (each after its own median time when
    there are several), and their summed median times (ms) to the last row; writes are rolled back."""
    plans, total = [], 0.0
    for statement, parameters in statements:
        times = []
        for _ in range(RUNS):
            started = time.perf_counter()
            raw.execute(statement, parameters).fetchall()
            times.append((time.perf_counter() - started) * 1000)
            raw.rollback()
        total += statistics.median(times)
        each = f"({statistics.median(times):.2f} ms) " if len(statements) > 1 else ""
        plans.append(each + "; ".join(plan_of(raw, statement, parameters)))
    return plans, total


def run(documents: int, events: int, revision: str, analyze: bool, postgres: bool) -> None:
    from core.migrate import upgrade
    from core.settings import Settings
    from workers.celery_app import celery_for_command

    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        url = stack.enter_context(throwaway_postgres("govrag_bench")) if postgres else None
        settings = Settings(data_dir=Path(tmp), database_url=url)
        url = settings.resolved_database_url
        upgrade(url, revision)
        rows = _populate(url, documents, events)
        if postgres:
            raw, plan_of, engine = psycopg.connect(libpq_dsn(url)), pg_query_plan, "PostgreSQL"
            stack.callback(raw.close)  # closed before the throw-away database is dropped, on a failure too
            raw.autocommit = True
            raw.execute("VACUUM ANALYZE")  # what autovacuum does after a bulk load: statistics, visibility map
            raw.autocommit = False
            version, stats = raw.info.server_version, "VACUUM ANALYZEd"
        else:
            raw, plan_of, engine = sqlite3.connect(settings.data_dir / "govrag.db"), query_plan, "SQLite"
            stack.callback(raw.close)  # closed before the temporary directory is removed, on a failure too
            if analyze:
                raw.execute("ANALYZE")
                raw.commit()
            version = sqlite3.sqlite_version
            stats = "after a full ANALYZE" if analyze else "no statistics (never ANALYZEd)"
        print(f"# {engine} query plans at revision {revision} ({machine()}, {engine} {version})\n")
        print(f"{documents:,} documents in {len(DEPARTMENTS)} departments, one job each; {events:,} ledger events; "
              f"{stats}.\n")
        print("| query | median ms | plan (one per statement, / between) |\n| --- | --- | --- |")
        app = stack.enter_context(celery_for_command(settings))  # its broker connections closed as the run ends
        for name, table, call in _probes(settings, app, rows, events):
            plans, ms = _plan_and_time(raw, plan_of, captured_statements(url, table, call))
            print(f"| {name} | {ms:.2f} | {' / '.join(plans)} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--documents", type=int, default=50_000)
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--revision", default="head", help="the schema to measure, e.g. 0014 for the one before 0015")
    parser.add_argument("--analyze", action="store_true", help="run a full ANALYZE before measuring (SQLite)")
    database = parser.add_mutually_exclusive_group()
    database.add_argument("--postgres", action="store_true",
                          help="measure on a throw-away PostgreSQL database (GOVRAG_TEST_PG_DSN's server), VACUUM "
                               "ANALYZEd, instead of the embedded SQLite")
    database.add_argument("--both", action="store_true",
                          help="SQLite, then PostgreSQL (what `make bench` records in bench/RESULTS.md)")
    args = parser.parse_args(argv)
    for postgres in (False, True) if args.both else (args.postgres,):
        if postgres and args.both:
            print()  # between the SQLite table and the PostgreSQL heading
        run(args.documents, args.events, args.revision, args.analyze, postgres)


if __name__ == "__main__":
    main()
