"""Ledger benchmark on PostgreSQL: export rate and peak memory, and verify time, for a large synthetic ledger.

    .venv/bin/python -m bench.audit_bench --rows 100000 [--rows 1000000]

Builds a throw-away database with a valid hash chain (and a signed checkpoint every 100 rows), then times
`govrag audit verify` (integrity.verify) and the streamed export in JSONL, CSV and OCSF. Peak memory is the
tracemalloc peak of Python allocations during a separate export pass (tracemalloc slows the pass, so rates come
from an untraced pass). Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import resource
import tempfile
import time
import tracemalloc
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg

from bench.common import libpq_dsn, machine, throwaway_postgres

COLUMNS = ("id", "request_id", "created_at", "event_type", "subject", "groups", "departments_requested",
           "departments_searched", "decision", "reason", "chunks", "question_masked", "purpose", "latency_ms",
           "roles", "policy_version", "guard_verdicts", "model_backend", "model_id", "kill_switch_mode", "details",
           "prev_hash", "hash")


def _synthetic(n: int, start: datetime, rng: random.Random):  # type: ignore[no-untyped-def]
    from core.models import RetrievalEvent

    departments = ["hr", "finance", "legal", "engineering", "sales"]
    event = RetrievalEvent(
        id=n, request_id=uuid.UUID(int=rng.getrandbits(128)).hex, created_at=start + timedelta(milliseconds=n * 50),
        event_type="retrieval", subject=f"user{rng.randrange(5000)}", groups=[f"team{rng.randrange(40)}"],
        departments_requested=[], departments_searched=rng.sample(departments, 2), decision=rng.choice(
            ["answered", "answered", "answered", "refused", "blocked"]), reason=None,
        question_masked=f"what is the policy for <PERSON> on topic {rng.randrange(10_000)}?", purpose="work",
        latency_ms=round(rng.uniform(20, 900), 2), roles=["reader@hr"], policy_version="12",
        guard_verdicts={"firewall": {"verdict": "allow", "score": round(rng.random(), 4)}},
        model_backend="extractive", model_id="none", kill_switch_mode="normal", details={},
        chunks=[{"document_id": f"doc-{rng.randrange(20_000)}", "chunk_id": f"c{i}", "score": round(rng.random(), 4),
                 "cited": i == 0, "content_sha256": f"{rng.getrandbits(256):064x}"} for i in range(4)])
    return event


def _populate(url: str, rows: int, data_dir: Path) -> None:
    from audit import integrity
    from audit.repository import GENESIS_HASH
    from core.db import unit_of_work
    from core.models import AuditCheckpoint
    from core.settings import Settings

    settings = Settings(data_dir=data_dir, database_url=url)
    with unit_of_work(url) as session:
        signer = integrity.signer_for(settings, session)
    rng, start, previous = random.Random(7), datetime(2026, 1, 1, tzinfo=UTC), GENESIS_HASH
    started = time.perf_counter()
    with psycopg.connect(libpq_dsn(url)) as conn, conn.cursor() as cursor:
        with cursor.copy(f"COPY retrieval_events ({', '.join(COLUMNS)}) FROM STDIN") as copy:  # noqa: S608
            checkpoints = []
            for n in range(1, rows + 1):
                event = _synthetic(n, start, rng)
                event.prev_hash = previous
                event.hash = previous = integrity.event_hash(event)
                copy.write_row([_cell(getattr(event, c)) for c in COLUMNS])
                if n % 100 == 0:
                    cp = AuditCheckpoint(created_at=event.created_at.replace(microsecond=0), kind="periodic",
                                         last_event_id=n, last_hash=event.hash, event_count=0)
                    cp.signature, cp.signature_ed25519 = integrity.sign(signer, cp)
                    checkpoints.append(cp)
        with cursor.copy("COPY audit_checkpoints (created_at, kind, last_event_id, last_hash, event_count, "
                         "signature, signature_ed25519) FROM STDIN") as copy:
            for cp in checkpoints:
                copy.write_row([cp.created_at, cp.kind, cp.last_event_id, cp.last_hash, cp.event_count, cp.signature,
                                cp.signature_ed25519])
        cursor.execute("SELECT setval('retrieval_events_id_seq', %s)", (rows,))
        conn.commit()
    print(f"  populated {rows:,} rows + {len(checkpoints):,} checkpoints in {time.perf_counter() - started:.1f} s")


def _cell(value: object) -> object:
    return json.dumps(value) if isinstance(value, list | dict) else value


def _verify(url: str, data_dir: Path) -> None:
    from audit import integrity
    from core.db import get_session_factory
    from core.settings import Settings

    settings = Settings(data_dir=data_dir, database_url=url)
    with get_session_factory(url)() as session:
        started = time.perf_counter()
        result = integrity.verify(session=session, settings=settings)
        seconds = time.perf_counter() - started
    print(f"  verify: ok={result.ok} checked={result.checked:,} checkpoints={result.checkpoints_checked:,} "
          f"in {seconds:.2f} s ({result.checked / seconds:,.0f} rows/s)")


def _export(url: str, data_dir: Path, fmt: str, *, trace_memory: bool) -> tuple[int, int, float, int]:
    from audit import service as audit_service
    from audit.schemas import ExportFilters, ExportFormat
    from authz.identity import Identity
    from core.db import get_session_factory
    from core.settings import Settings

    settings = Settings(data_dir=data_dir, database_url=url)
    operator = Identity(subject="cli:bench", groups=(), is_platform_admin=True)
    sink, rows, size = io.StringIO(), 0, 0
    if trace_memory:
        tracemalloc.start()
    with get_session_factory(url)() as session:
        started = time.perf_counter()
        for line in audit_service.export_events(session=session, settings=settings, identity=operator, scope=None,
                                                filters=ExportFilters(), fmt=ExportFormat(fmt)):
            size += len(line)
            sink.seek(0)
            sink.write(line)  # written and discarded: what a file or socket would receive
        seconds = time.perf_counter() - started
        rows = json.loads(line.removeprefix("# manifest "))["manifest"]["rows"]
    peak = tracemalloc.get_traced_memory()[1] if trace_memory else 0
    if trace_memory:
        tracemalloc.stop()
    return rows, size, seconds, peak


def run(sizes: list[int], formats: list[str]) -> None:
    """Build, verify and export a ledger of each size."""
    print(f"audit bench on PostgreSQL — {machine()}")
    for rows in sizes:
        with throwaway_postgres("govrag_bench_audit") as url, tempfile.TemporaryDirectory() as tmp:
            from core import migrate

            migrate.upgrade(url)
            print(f"ledger of {rows:,} rows")
            _populate(url, rows, Path(tmp))
            _verify(url, Path(tmp))
            for fmt in formats:
                count, size, seconds, _ = _export(url, Path(tmp), fmt, trace_memory=False)
                print(f"  export {fmt:5}: {count:,} rows, {size / 1e6:,.1f} MB in {seconds:.1f} s = "
                      f"{count / seconds:,.0f} rows/s")
            _, _, _, peak = _export(url, Path(tmp), "jsonl", trace_memory=True)
            print(f"  export jsonl peak Python memory (tracemalloc): {peak / 1e6:.1f} MB; process max RSS so "
                  f"far {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3:.0f} MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, action="append", help="ledger size (repeatable); default 100000")
    parser.add_argument("--format", action="append", choices=["jsonl", "csv", "ocsf"],
                        help="export formats to time (repeatable); default all three")
    args = parser.parse_args()
    run(args.rows or [100_000], args.format or ["jsonl", "csv", "ocsf"])


if __name__ == "__main__":
    main()
