"""Sending a re-index's jobs to the broker: `workers.dispatch.send_jobs` (what POST /v1/admin/reindex and `govrag
reindex` call once the jobs are queued), on a throw-away PostgreSQL database (GOVRAG_TEST_PG_DSN's server) and the
Redis broker (GOVRAG_TEST_REDIS_URL, a queue of its own, emptied after each run).

    .venv/bin/python -m bench.dispatch [--jobs 2000 10000] [--runs 3]

For each count, `--jobs` documents with one queued job each are sent, every job unsent again before each run, by two
paths in the same process: "per job", each job's task published then its `sent_at` stamped in a transaction of its
own (send_jobs before it stamped per batch), and "per batch", send_jobs as it is (a batch's tasks published, then
those stamped in one transaction). Prints the median wall time of `--runs` runs and the time per job. Printed, never
asserted.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine, throwaway_postgres  # noqa: E402

REDIS_URL = os.environ.get("GOVRAG_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
START = datetime(2026, 1, 1, tzinfo=UTC)

Jobs = Sequence[tuple[str, str]]


def _populate(url: str, count: int) -> list[tuple[str, str]]:
    """`count` queued documents of one department, one queued job each: the (document id, job id) a re-index sends."""
    from sqlalchemy import insert

    from core.db import unit_of_work
    from core.models import Department, Document, IngestionJob

    documents = [{"id": str(uuid.uuid4()), "department": "bench", "title": "t", "content_type": "text/plain",
                  "size_bytes": 100, "sha256": uuid.uuid4().hex * 2, "acl_groups": [], "classification": "internal",
                  "status": "queued", "chunk_count": 0, "uploaded_by": "bench", "flagged_chunks": 0,
                  "created_at": START + timedelta(seconds=n), "updated_at": START} for n in range(count)]
    jobs = [{"id": str(uuid.uuid4()), "document_id": document["id"], "status": "queued", "attempts": 0,
             "crashed_runs": 0, "created_at": START, "updated_at": START} for document in documents]
    with unit_of_work(url) as session:
        session.execute(insert(Department), [{"name": "bench", "created_at": START}])
        session.execute(insert(Document), documents)
        session.execute(insert(IngestionJob), jobs)
    return [(job["document_id"], job["id"]) for job in jobs]


def per_job(app: object, jobs: Jobs) -> int:
    """The path before per-batch stamps: each job published, then stamped in a transaction of its own."""
    from workers import dispatch

    settings = app.govrag_settings  # type: ignore[attr-defined]
    sent = 0
    for batch in dispatch._batches_with_stored_request_ids(settings, jobs):
        for document_id, job_id, request_id in batch:
            if not dispatch._published(app, document_id, job_id, request_id):  # type: ignore[arg-type]
                return sent
            _stamped_alone(settings.resolved_database_url, job_id)
            sent += 1
    return sent


def _stamped_alone(url: str, job_id: str) -> None:
    """The stamp before per-batch stamps, as it was (one row by its key, no rows locked first): `_mark_sent`'s
    ordered lock of a batch's rows would charge the old path a subquery it never ran."""
    from sqlalchemy import update

    from core.db import unit_of_work
    from core.models import IngestionJob, utcnow

    with unit_of_work(url) as session:
        session.execute(update(IngestionJob).where(IngestionJob.id == job_id)
                        .values(sent_at=utcnow(), updated_at=IngestionJob.updated_at))


def _unsent_again(url: str) -> None:
    from sqlalchemy import update

    from core.db import unit_of_work
    from core.models import IngestionJob

    with unit_of_work(url) as session:
        session.execute(update(IngestionJob).values(sent_at=None))


def _timed(app: object, url: str, send: Callable[[object, Jobs], int], jobs: Jobs, runs: int) -> float:
    """Median seconds of `runs` sends of every job, each run from all unsent and an empty queue."""
    import redis

    queue = app.govrag_settings.task_queue  # type: ignore[attr-defined]
    client, times = redis.Redis.from_url(REDIS_URL), []
    try:
        for _ in range(runs):
            _unsent_again(url)
            client.delete(queue)
            started = time.perf_counter()
            sent = send(app, jobs)
            times.append(time.perf_counter() - started)
            assert sent == len(jobs) == client.llen(queue), (sent, client.llen(queue))  # a broken run, not a figure
    finally:
        client.delete(queue)
        client.close()
    return statistics.median(times)


def run(counts: list[int], runs: int) -> None:
    from core import migrate
    from core.settings import Settings
    from workers.celery_app import celery_for_command
    from workers.dispatch import send_jobs

    print(f"# Sending a re-index's jobs: per-job vs per-batch sent stamps ({machine()})\n")
    print(f"PostgreSQL (throw-away database), Redis broker {REDIS_URL.rsplit('@', 1)[-1]}; median of {runs} runs\n")
    print("| jobs | per job (s) | per batch (s) | per job: ms/job | per batch: ms/job | speed-up |")
    print("|---:|---:|---:|---:|---:|---:|")
    for count in counts:
        with throwaway_postgres("govrag_bench") as url, tempfile.TemporaryDirectory() as data_dir:
            migrate.upgrade(url)
            jobs = _populate(url, count)
            settings = Settings(data_dir=Path(data_dir), database_url=url, broker_url=REDIS_URL,
                                task_queue=f"bench-dispatch-{uuid.uuid4().hex[:8]}")
            with celery_for_command(settings) as app:  # its broker connections closed before the next count
                old = _timed(app, url, per_job, jobs, runs)
                new = _timed(app, url, send_jobs, jobs, runs)
        print(f"| {count} | {old:.2f} | {new:.2f} | {old / count * 1000:.2f} | {new / count * 1000:.2f} "
              f"| {old / new:.1f}× |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, nargs="+", default=[2000, 10000])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    run(args.jobs, args.runs)


if __name__ == "__main__":
    main()
