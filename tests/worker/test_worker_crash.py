"""Kill a real worker process in the middle of a document: after a restart the document ends ready with no
duplicate points (acks_late + redelivery + idempotent upserts). A parser that the parse timeout cannot stop meets
the hard time limit: the document fails with that reason and the worker goes on. Marked `worker`: `make test` runs
them separately."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from core import blobs
from core.db import unit_of_work
from core.logs import logged_as
from core.models import Document, IngestionJob
from core.settings import Settings
from tests.conftest import REDIS_URL
from tests.support.polling import wait_until

pytestmark = pytest.mark.worker
ROOT = Path(__file__).resolve().parents[2]
PARAGRAPH = ("Section {n}. The facilities team reviewed the maintenance schedule for building {n}; the lifts, "
             "the heating and the fire doors were inspected and the findings were filed with the site office. "
             "Contractors must sign in at reception and wear a visitor badge at all times while on site.")


def _env(settings: Settings, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GOVRAG_")}
    env.update({"GOVRAG_DATA_DIR": str(settings.data_dir), "GOVRAG_DATABASE_URL": str(settings.database_url),
                "GOVRAG_BROKER_URL": settings.broker_url, "GOVRAG_TASK_QUEUE": settings.task_queue,
                "GOVRAG_INPROCESS_WORKER": "false", "GOVRAG_BROKER_VISIBILITY_TIMEOUT": "3",
                "PYTHONPATH": str(ROOT), **extra})
    return env


def _start_worker(settings: Settings, log: Path, **extra: str) -> subprocess.Popen[bytes]:
    handle = log.open("ab")
    return subprocess.Popen([sys.executable, "-m", "tests.worker.worker_process"], cwd=ROOT,  # noqa: S603
                            env=_env(settings, **extra), stdout=handle, stderr=subprocess.STDOUT)


def _worker_settings(make_pg_database: Callable[[], str], tmp_path: Path, queue: str) -> Settings:
    """A migrated database, a data dir, a fresh queue and a `facilities` department for a worker test."""
    from authz import service as authz_service
    from core import migrate
    from core.keystore import keystore_for

    url = make_pg_database()
    migrate.upgrade(url)
    settings = Settings(data_dir=tmp_path / "data", database_url=url, broker_url=REDIS_URL,
                        task_queue=f"govrag-{queue}-{uuid.uuid4().hex[:8]}", inprocess_worker=False,
                        broker_visibility_timeout=3)
    blobs.open_at_start(settings.blob_dir, url)  # as a process starting with these settings does (the API's, here)
    with unit_of_work(url) as session:
        authz_service.create_department(session=session, keystore=keystore_for(settings), name="facilities")
    return settings


def _stop(worker: subprocess.Popen[bytes]) -> None:
    worker.send_signal(signal.SIGTERM)
    try:
        worker.wait(30)
    except subprocess.TimeoutExpired:
        worker.kill()
        worker.wait(10)


def _state(settings: Settings, document_id: str, job_id: str) -> tuple[str, int, int]:
    with unit_of_work(settings.resolved_database_url) as session:
        document = session.get(Document, document_id)
        job = session.get(IngestionJob, job_id)
        assert document is not None and job is not None
        return document.status, document.chunk_count, job.attempts


def test_killed_worker_resumes_to_ready_without_duplicates(make_pg_database: Callable[[], str],
                                                           tmp_path: Path) -> None:
    from ingestion import service as ingestion_service
    from ingestion.schemas import Classification
    from retrieval.store import close_vector_store, open_vector_store
    from workers.celery_app import close_celery, create_celery
    from workers.dispatch import send_job

    settings = _worker_settings(make_pg_database, tmp_path, "crash")
    text = "\n\n".join(PARAGRAPH.format(n=n) for n in range(400)).encode()
    with unit_of_work(settings.resolved_database_url) as session:
        accepted = ingestion_service.accept_upload(
            session=session, settings=settings, uploaded_by="crash-test", department="facilities",
            filename="maintenance.txt", data=text, title=None, acl_groups=[],
            classification=Classification.internal)
    app = create_celery(settings)
    send_job(app, document_id=accepted.document_id, job_id=accepted.job_id)
    close_celery(app)  # the connection it sent on, pooled: open for the suite's life otherwise

    log = tmp_path / "worker.log"
    first = _start_worker(settings, log)
    try:
        wait_until(lambda: _state(settings, accepted.document_id, accepted.job_id)[0] == "processing", 120,
                   "the worker to start the document")
        time.sleep(1.0)  # well inside parsing/redaction/embedding of 400 paragraphs
        assert _state(settings, accepted.document_id, accepted.job_id)[0] == "processing"
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(30)

    second = _start_worker(settings, log)
    try:
        wait_until(lambda: _state(settings, accepted.document_id, accepted.job_id)[0] in ("ready", "failed"), 300,
                   "the restarted worker to finish the document")
    finally:
        _stop(second)

    status, chunk_count, attempts = _state(settings, accepted.document_id, accepted.job_id)
    assert status == "ready", log.read_text()[-2000:]
    assert attempts >= 2  # the killed attempt was counted, then the task was delivered again
    with unit_of_work(settings.resolved_database_url) as session:  # the killed run's hold went with its process
        assert session.get(IngestionJob, accepted.job_id).crashed_runs == 1  # type: ignore[union-attr]
    store = open_vector_store(settings)  # the worker has exited: this process may open its store now
    try:
        indexes = Counter(p["chunk_index"] for p in store.scroll_payloads("facilities")
                          if p["document_id"] == accepted.document_id)
    finally:
        close_vector_store(settings)
    assert chunk_count > 1 and len(indexes) == chunk_count
    assert set(indexes.values()) == {1}  # every chunk exactly once


def test_a_parser_beyond_the_alarm_meets_the_hard_time_limit_and_the_worker_goes_on(
        make_pg_database: Callable[[], str], tmp_path: Path) -> None:
    from ingestion import service as ingestion_service
    from ingestion.schemas import Classification
    from tests.worker.worker_process import HANG_MARKER
    from workers.celery_app import close_celery, create_celery
    from workers.dispatch import send_job

    settings = _worker_settings(make_pg_database, tmp_path, "limit")
    uploads = {"stuck.txt": b"Quarterly figures. " + HANG_MARKER, "next.txt": PARAGRAPH.format(n=1).encode()}
    with unit_of_work(settings.resolved_database_url) as session:
        accepted = {name: ingestion_service.accept_upload(
            session=session, settings=settings, uploaded_by="limit-test", department="facilities", filename=name,
            data=data, title=None, acl_groups=[], classification=Classification.internal)
            for name, data in uploads.items()}
    app = create_celery(settings)
    sender = f"cli-{uuid.uuid4().hex}"  # the run of a command sending them (`govrag reindex`, say)
    with logged_as(sender):
        for job in accepted.values():
            send_job(app, document_id=job.document_id, job_id=job.job_id)
    close_celery(app)

    log, temp_dir = tmp_path / "worker.log", tmp_path / "tmp"
    temp_dir.mkdir()
    # The limit applies to next.txt too, run by the child started after the kill: 6 s failed it on a loaded machine.
    worker = _start_worker(settings, log, GOVRAG_TEST_POOL="prefork", GOVRAG_TEST_PARSER_IGNORES_ALARM="1",
                           GOVRAG_PARSE_TIMEOUT_SECONDS="1", GOVRAG_INGEST_TIME_LIMIT_SECONDS="20",
                           TMPDIR=str(temp_dir))
    stuck, following = accepted["stuck.txt"], accepted["next.txt"]
    try:
        wait_until(lambda: _state(settings, following.document_id, following.job_id)[0] in ("ready", "failed"), 300,
                   "the worker to go on with the next document")
        # the killed child's copy of stuck.txt: removed by the child that replaced it, as it started
        assert not [path for path in temp_dir.rglob("*") if path.is_file() and HANG_MARKER in path.read_bytes()]
        time.sleep(5)  # longer than the visibility timeout: a redelivered task would show as a second attempt
    finally:
        _stop(worker)
    assert _state(settings, following.document_id, following.job_id)[0] == "ready", log.read_text()[-2000:]
    status, _, attempts = _state(settings, stuck.document_id, stuck.job_id)
    assert (status, attempts) == ("failed", 1), log.read_text()[-2000:]
    with unit_of_work(settings.resolved_database_url) as session:
        document = session.get(Document, stuck.document_id)
        assert document is not None and document.error == "ingestion took longer than the 20 s limit"
    # the worker's main process said so under the request id the task carried, the sender's
    said = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    assert [line["request_id"] for line in said if "hit the hard time limit" in line["message"]] == [sender]
