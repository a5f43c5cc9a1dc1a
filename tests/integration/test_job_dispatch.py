"""An accepted document is never stranded in `queued`: the database records which jobs reached the broker, and the
rest are sent again (workers/dispatch.py). Real SQLite/PostgreSQL, real Redis, the real in-process worker."""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import logging
import re
import socket
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from kombu.transport import memory
from sqlalchemy import select, text, update

from bench.common import libpq_dsn
from tests.conftest import PLATFORM_ADMIN, REDIS_URL, auth, desk_member, wait_for_job
from tests.support.lock_waits import wait_for_a_lock_wait

UNREACHABLE_BROKER = "redis://127.0.0.1:9/0"  # nothing listens there: every publish is refused


# The settings the running test made (`_settings`): the vector store each names is closed after it
# (`_close_the_vector_stores_it_made`). A test running `run_ingestion` itself opens its data dir's store, and the
# process keeps it open (the embedded store's lock file and WALs) until closed: for the suite's life otherwise.
_MADE_BY_THIS_TEST: list[object] = []


@pytest.fixture(autouse=True)
def _close_the_vector_stores_it_made() -> Iterator[None]:
    from retrieval.store import close_vector_store

    yield
    while _MADE_BY_THIS_TEST:
        close_vector_store(_MADE_BY_THIS_TEST.pop())  # type: ignore[arg-type]


def _settings(data_dir: Path, url: str, **overrides: object):  # type: ignore[no-untyped-def]
    from core.settings import Settings

    settings = Settings(data_dir=data_dir, database_url=url, admins=[PLATFORM_ADMIN],
                        task_queue=f"govrag-dispatch-{uuid.uuid4().hex[:8]}", **overrides)
    _MADE_BY_THIS_TEST.append(settings)
    return settings


def _embedded(tmp_path: Path, **overrides: object):  # type: ignore[no-untyped-def]
    """A migrated SQLite database and its settings: the memory broker, no worker and no sweep unless overridden (each
    test runs or sends its jobs itself)."""
    from core import migrate

    url = f"sqlite:///{tmp_path / 'govrag.db'}"
    migrate.upgrade(url)
    defaults: dict[str, object] = {"broker_url": "memory://", "inprocess_worker": False, "job_sweep_seconds": 0}
    return url, _settings(tmp_path / "data", url, **{**defaults, **overrides})


def _upload(client: TestClient, token: str, n: int) -> dict[str, str]:
    response = client.post("/v1/documents", headers=auth(token), data={"department": "desk"},
                           files={"file": (f"note-{n}.txt", f"Note {n}: the desk opens at nine.".encode())})
    assert response.status_code == 202, response.text
    return response.json()  # type: ignore[no-any-return]


def _admin_and_an_upload(client: TestClient) -> tuple[dict[str, str], str, dict[str, str]]:
    """The platform admin's headers, a desk editor's token and that editor's upload of document 0."""
    admin = auth(client.app.state.dev_issuer.issue(PLATFORM_ADMIN, []))  # type: ignore[attr-defined]
    editor = desk_member(client, "editor")
    return admin, editor, _upload(client, editor, 0)


def _sent_at(url: str, job_id: str) -> object:
    from core.db import unit_of_work
    from core.models import IngestionJob

    with unit_of_work(url) as session:
        return session.scalar(select(IngestionJob.sent_at).where(IngestionJob.id == job_id))


def test_jobs_queued_on_the_embedded_default_survive_a_restart(tmp_path: Path) -> None:
    """The embedded default's broker lives in the API's memory: jobs queued when the API stopped were lost with it
    and their documents stayed `queued` for ever. At start-up every unfinished job is sent again."""
    from api.app import create_app
    from retrieval.store import close_vector_store

    url, first = _embedded(tmp_path)
    with TestClient(create_app(first)) as client:
        editor = desk_member(client, "editor")
        jobs = [_upload(client, editor, n)["job_id"] for n in range(3)]
    close_vector_store(first)
    memory.Channel.queues.pop(first.task_queue, None)  # what a new process starts with: an empty broker
    restarted = first.model_copy(update={"inprocess_worker": True})
    with TestClient(create_app(restarted)) as client:
        assert [wait_for_job(client, editor, job)["status"] for job in jobs] == ["ready"] * 3
    close_vector_store(restarted)


def test_with_the_sweep_off_an_embedded_api_starting_sends_a_job_never_sent_too(tmp_path: Path) -> None:
    """A job never sent (its API died between the commit and the send) is left by the start to the sweep's grace;
    with the sweep off (GOVRAG_JOB_SWEEP_SECONDS=0) nothing else would ever send it, so the start does."""
    from api.app import create_app
    from retrieval.store import close_vector_store

    url, first = _embedded(tmp_path)
    with TestClient(create_app(first)) as client:
        editor = desk_member(client, "editor")
        job = _upload(client, editor, 0)["job_id"]
    close_vector_store(first)
    memory.Channel.queues.pop(first.task_queue, None)  # what a new process starts with: an empty broker
    _set_job(url, job, sent_at=None)  # its API died before the send
    restarted = first.model_copy(update={"inprocess_worker": True})
    with TestClient(create_app(restarted)) as client:
        assert wait_for_job(client, editor, job)["status"] == "ready"
    close_vector_store(restarted)


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_an_embedded_api_starting_sends_at_once_only_the_jobs_sent_before_it_and_leaves_unsent_ones_to_the_sweep(
        database: str, make_pg_database: Callable[[], str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """At start-up the embedded API sent every unfinished job at once, one never sent too: one `govrag ingest` had
    just accepted (committed unsent, as accept_upload leaves it) and not yet held went to a worker, and the document
    ran twice. Now only the jobs marked sent (their tasks lost with the broker's memory) go out at once, however
    many batches they fill; one never sent waits for the sweep's grace."""
    from api.app import create_app
    from retrieval.store import close_vector_store
    from workers import dispatch
    from workers.celery_app import create_celery

    url, settings = _on(database, make_pg_database, tmp_path)
    with TestClient(create_app(settings)) as client:
        editor = desk_member(client, "editor")
        just_accepted, queued, processing = (_upload(client, editor, n)["job_id"] for n in range(3))
    close_vector_store(settings)
    memory.Channel.queues.pop(settings.task_queue, None)  # the restart: an empty broker
    _set_job(url, processing, status="processing", attempts=1)
    _set_job(url, just_accepted, sent_at=None)
    monkeypatch.setattr(dispatch, "_SWEEP_BATCH", 1)
    app = create_celery(settings)
    try:
        sent = dispatch.resend_unfinished(app)
        assert _sent_at(url, just_accepted) is None  # the oldest, first in a batch: still not sent
        assert (sent, sorted(_jobs_waiting_in_memory(settings.task_queue))) == (2, sorted([queued, processing]))
        assert dispatch.send_unsent(app, older_than_seconds=0) == 1  # the sweep, once its grace is past
    finally:
        memory.Channel.queues.pop(settings.task_queue, None)


def test_a_job_whose_document_was_deleted_before_it_ran_ends_when_it_runs(tmp_path: Path) -> None:
    """Its run found the document deleted and did nothing: the job stayed `queued` for ever, sent again at every
    start-up (and, on Redis, by every sweep that found the broker idle). Now the run ends it."""
    from api.app import create_app
    from retrieval.store import close_vector_store

    url, first = _embedded(tmp_path)
    with TestClient(create_app(first)) as client:
        editor = desk_member(client, "editor")
        uploaded = _upload(client, editor, 0)
        assert client.delete(f"/v1/documents/{uploaded['document_id']}", headers=auth(editor)).status_code == 204
    close_vector_store(first)
    restarted = first.model_copy(update={"inprocess_worker": True})
    with TestClient(create_app(restarted)) as client:
        job = wait_for_job(client, editor, uploaded["job_id"], timeout=60)
    close_vector_store(restarted)
    memory.Channel.queues.pop(first.task_queue, None)
    assert job["status"] == "deleted" and job["error"] == "the document was deleted before its ingestion finished"


def test_a_late_duplicate_of_a_finished_job_leaves_the_document_to_its_new_job(tmp_path: Path) -> None:
    """Delivery is at least once. A late duplicate of a document's first job (its worker died between commit and
    ack) arriving after a re-index queued a second job took the document over under the old job; the re-index's job
    then found its document ready and stayed `queued` for ever, sent again at every start-up. Now a delivery of a
    job that already ended does nothing."""
    from api.app import create_app
    from core.db import unit_of_work
    from ingestion import quarantine
    from ingestion import service as ingestion_service
    from retrieval.store import close_vector_store

    url, settings = _embedded(tmp_path)
    with TestClient(create_app(settings)) as client:
        editor = desk_member(client, "editor")
        uploaded = _upload(client, editor, 0)
        first, document_id = uploaded["job_id"], uploaded["document_id"]
        ingestion_service.run_ingestion(settings=settings, document_id=document_id, job_id=first)
        with unit_of_work(url) as session:
            [(_, reindex)] = quarantine.queue_reindex(session=session, settings=settings, department="desk",
                                                     document_ids=[document_id], serve_previous=False).queued
        ingestion_service.run_ingestion(settings=settings, document_id=document_id, job_id=first)  # the duplicate
        assert client.get(f"/v1/jobs/{reindex}", headers=auth(editor)).json()["status"] == "queued"
        ingestion_service.run_ingestion(settings=settings, document_id=document_id, job_id=reindex)
        jobs = [client.get(f"/v1/jobs/{job}", headers=auth(editor)).json() for job in (first, reindex)]
        assert client.get(f"/v1/documents/{document_id}", headers=auth(editor)).json()["status"] == "ready"
    close_vector_store(settings)
    memory.Channel.queues.pop(settings.task_queue, None)
    assert [job["status"] for job in jobs] == ["ready", "ready"] and jobs[1]["attempts"] == 1


@pytest.mark.parametrize("serve_previous", [True, False])
def test_a_reindex_waiting_in_the_queue_answers_from_the_previous_index_only_if_told_to(
        tmp_path: Path, serve_previous: bool) -> None:
    """A re-index queued the document (`ready` to `queued`) and queries found nothing of it until a worker had run
    the job: with no worker free, or the broker down, for as long as that took. With `serve_previous` it answers
    from the index it serves until the job has run; by default (the re-index may follow a rule that tightens what
    is shown) nothing of it is answered, the 202 out; then from the new index alone (SQLite numbers the generations
    as PostgreSQL does)."""
    from api.app import create_app
    from ingestion import service as ingestion_service
    from retrieval.store import close_vector_store, open_vector_store

    _, settings = _embedded(tmp_path)
    with TestClient(create_app(settings)) as client:
        editor, document_id, reindex = _ingested_then_reindexed(client, settings, serve_previous=serve_previous)
        waiting = _ask_when_the_desk_opens(client, editor)
        status = client.get(f"/v1/documents/{document_id}", headers=auth(editor)).json()["status"]
        [job] = reindex.json()["queued"]
        ingestion_service.run_ingestion(settings=settings, document_id=document_id, job_id=job)
        after = _ask_when_the_desk_opens(client, editor)
        generations = [p.get("generation") for p in open_vector_store(settings).scroll_payloads("desk")]
    close_vector_store(settings)
    memory.Channel.queues.pop(settings.task_queue, None)
    assert status == "queued" and (document_id in waiting["cited"]) is serve_previous
    assert ("nine" in str(waiting["answer"])) is serve_previous
    assert document_id in after["cited"] and generations == [2] * len(generations) and generations


@pytest.mark.parametrize("serve_previous", [True, False])
def test_the_training_export_holds_a_document_being_reindexed_exactly_when_queries_cite_it(
        tmp_path: Path, serve_previous: bool) -> None:
    """The export took `ready` documents only: one a `serve_previous` re-index kept serving (`queued` until a worker
    ran its job) was cited by every query yet missing from the export. The export now reads what queries cite: that
    document's previous index, and nothing of one whose re-index withheld it."""
    from api.app import create_app
    from audit.training import department_payloads, export_sources, training_rows
    from core.db import unit_of_work
    from retrieval.store import close_vector_store

    _, settings = _embedded(tmp_path)
    with TestClient(create_app(settings)) as client:
        editor, document_id, reindex = _ingested_then_reindexed(client, settings, serve_previous=serve_previous)
        status = client.get(f"/v1/documents/{document_id}", headers=auth(editor)).json()["status"]
        cited = _ask_when_the_desk_opens(client, editor)["cited"]
        payloads = department_payloads(settings, "desk")
        with unit_of_work(settings.resolved_database_url) as session:
            rows = list(training_rows(export_sources(session=session, settings=settings, department="desk",
                                                     payloads=payloads)))
    close_vector_store(settings)
    memory.Channel.queues.pop(settings.task_queue, None)
    previous = {str(p["chunk_id"]) for p in payloads if p.get("generation") == 1}
    assert reindex.status_code == 202 and status == "queued"  # no worker: the re-index's job has not run
    assert previous and {p.get("generation") for p in payloads} == {1}
    assert (document_id in cited) is serve_previous
    assert {row["chunk_id"] for row in rows} == (previous if serve_previous else set())
    assert all(row["document_id"] == document_id and "nine" in row["text"] for row in rows)


def test_a_reindex_whose_runs_kill_their_worker_leaves_the_document_unserved_and_no_points(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A re-index that withheld the document's index, whose runs each died after writing their points until the
    crashes failed it: the document is `failed`, saying the re-index failed, and neither the withheld index nor a
    dead run's points stay (the crashes fail it at a claim, which removed nothing)."""
    from api.app import create_app
    from ingestion import service as ingestion_service
    from retrieval.store import close_vector_store, open_vector_store

    def dies(*_: object, **__: object) -> object:
        raise WorkerDied

    _, settings = _embedded(tmp_path)
    with TestClient(create_app(settings)) as client:
        admin, editor, uploaded = _admin_and_an_upload(client)
        document_id = uploaded["document_id"]
        ingestion_service.run_ingestion(settings=settings, document_id=document_id, job_id=uploaded["job_id"])
        [job] = client.post("/v1/admin/reindex", headers=admin, json={"department": "desk"}).json()["queued"]
        monkeypatch.setattr(ingestion_service, "_finish", dies)  # after the run's points are written
        for _ in range(ingestion_service.MAX_CRASHED_RUNS):
            with pytest.raises(WorkerDied):
                ingestion_service.run_ingestion(settings=settings, document_id=document_id, job_id=job)
        written = len(open_vector_store(settings).scroll_payloads("desk"))
        ingestion_service.run_ingestion(settings=settings, document_id=document_id, job_id=job)  # fails it
        document = client.get(f"/v1/documents/{document_id}", headers=auth(editor)).json()
        answer = _ask_when_the_desk_opens(client, editor)
        left = open_vector_store(settings).scroll_payloads("desk")
    close_vector_store(settings)
    memory.Channel.queues.pop(settings.task_queue, None)
    assert document["status"] == "failed" and "the re-index failed" in str(document["error"])
    assert ingestion_service.CRASHED_TOO_OFTEN in str(document["error"])
    assert document_id not in answer["cited"] and written > 1 and left == []


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_a_document_that_killed_its_worker_is_reindexed_only_when_named(
        database: str, make_pg_database: Callable[[], str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A re-index runs a failed document again only when it names it, one whose worker died on it too often too: a
    department-wide re-index would let a file that kills the parser take a worker down that many times again, at
    every re-index. Named (after a parser fix), it runs again: here it no longer kills, and it ends ready."""
    from api.app import create_app
    from ingestion import service as ingestion_service
    from retrieval.store import close_vector_store

    def dies(*_: object, **__: object) -> object:
        raise WorkerDied

    _, settings = _on(database, make_pg_database, tmp_path)
    with TestClient(create_app(settings)) as client:
        admin, editor, uploaded = _admin_and_an_upload(client)
        document_id = uploaded["document_id"]
        with monkeypatch.context() as patched:
            patched.setattr(ingestion_service, "protect", dies)
            for _ in range(ingestion_service.MAX_CRASHED_RUNS):
                with pytest.raises(WorkerDied):
                    ingestion_service.run_ingestion(settings=settings, document_id=document_id,
                                                    job_id=uploaded["job_id"])
            ingestion_service.run_ingestion(settings=settings, document_id=document_id, job_id=uploaded["job_id"])
        failed = client.get(f"/v1/documents/{document_id}", headers=auth(editor)).json()
        department_wide = client.post("/v1/admin/reindex", headers=admin, json={"department": "desk"}).json()
        named = client.post("/v1/admin/reindex", headers=admin,
                            json={"department": "desk", "document_ids": [document_id]}).json()
        for job in named["queued"]:
            ingestion_service.run_ingestion(settings=settings, document_id=document_id, job_id=job)
        document = client.get(f"/v1/documents/{document_id}", headers=auth(editor)).json()
        answer = _ask_when_the_desk_opens(client, editor)
    close_vector_store(settings)
    memory.Channel.queues.pop(settings.task_queue, None)
    assert (failed["status"], failed["error"]) == ("failed", ingestion_service.CRASHED_TOO_OFTEN)
    assert department_wide == {"queued": [], "skipped": []}
    assert len(named["queued"]) == 1 and named["skipped"] == []
    assert (document["status"], document["error"]) == ("ready", None) and document_id in answer["cited"]


def _on(database: str, make_pg_database: Callable[[], str], tmp_path: Path):  # type: ignore[no-untyped-def]
    """`_embedded`'s shape (memory broker, no worker, no sweep) on SQLite or on a fresh PostgreSQL database."""
    if database == "sqlite":
        return _embedded(tmp_path)
    from core import migrate

    url = make_pg_database()
    migrate.upgrade(url)
    return url, _settings(tmp_path / "data", url, broker_url="memory://", inprocess_worker=False, job_sweep_seconds=0)


def _document_row(url: str, document_id: str) -> tuple[object, ...]:
    from core.db import unit_of_work
    from core.models import Document

    with unit_of_work(url) as session:
        document = session.get(Document, document_id)
        return document.status, document.served_generation, document.withheld  # type: ignore[union-attr]


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_a_document_whose_approval_run_ends_after_the_reindex_listed_it_is_queued_withheld(
        database: str, make_pg_database: Callable[[], str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A re-index withheld each document by the status it listed: a quarantined one whose approval run ended ready
    between the listing and the queueing lost its served index, then was not queued (it had left quarantine) and was
    reported skipped: `ready`, serving nothing, with no job and no error. The index is now withheld only in the
    statement that queues the job, from the status the document has then: it is queued (its approval run may have
    read the rules before the change) and withheld, and its run serves it again."""
    from api.app import create_app
    from ingestion import repository
    from ingestion import service as ingestion_service
    from retrieval.store import close_vector_store

    url, settings = _on(database, make_pg_database, tmp_path)
    with TestClient(create_app(settings)) as client:
        admin = auth(client.app.state.dev_issuer.issue(PLATFORM_ADMIN, []))  # type: ignore[attr-defined]
        editor = desk_member(client, "editor")
        assert client.put("/v1/admin/departments/desk/ingestion-policy", headers=admin,
                          json={"keywords": {"opens at nine": "restricted"}}).status_code == 200
        uploaded = _upload(client, editor, 0)
        document_id = uploaded["document_id"]
        ingestion_service.run_ingestion(settings=settings, document_id=document_id, job_id=uploaded["job_id"])
        quarantined = _document_row(url, document_id)
        real_listing = repository.documents_to_reindex

        def approved_meanwhile(session, **kwargs):  # type: ignore[no-untyped-def]
            listed = real_listing(session, **kwargs)
            approval = client.post(f"/v1/admin/quarantine/{document_id}/approve", headers=admin)
            assert approval.status_code == 200, approval.text
            ingestion_service.run_ingestion(settings=settings, document_id=document_id,
                                            job_id=approval.json()["job_id"])
            return listed

        monkeypatch.setattr(repository, "documents_to_reindex", approved_meanwhile)
        reindex = client.post("/v1/admin/reindex", headers=admin, json={"department": "desk"})
        monkeypatch.undo()
        between = _document_row(url, document_id)
        for job in reindex.json()["queued"]:
            ingestion_service.run_ingestion(settings=settings, document_id=document_id, job_id=job)
        after = _document_row(url, document_id)
    close_vector_store(settings)
    memory.Channel.queues.pop(settings.task_queue, None)
    assert quarantined == ("quarantined", None, False) and reindex.status_code == 202, reindex.text
    assert between == ("queued", None, True), between  # not ("ready", None, True): ready and serving nothing
    assert reindex.json()["skipped"] == [] and len(reindex.json()["queued"]) == 1
    assert after[0] == "ready" and after[1] is not None and after[2] is False


def _unreadable(*_: object, **__: object) -> object:
    """A run's pipeline refusing the file for good (a parse or time limit, a file no parser reads)."""
    from core.errors import ErrorCode, GovragError

    raise GovragError(ErrorCode.unsupported_type, "the file could not be read")


@pytest.mark.parametrize("named", [True, False], ids=["named", "department-wide"])
@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_a_document_whose_run_ends_failed_after_the_reindex_listed_it_runs_again_when_named(
        database: str, named: bool, make_pg_database: Callable[[], str], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A named document being ingested when the re-index listed it, whose run ended failed before the re-index
    queued it, was reported skipped: neither statement queueing a ready or quarantined document found it, and no
    job of it was running. It now goes the way of a failed document named: it runs again from the original it kept.
    Department-wide, a failed document is left alone (skipped), as one failed before the listing is (not listed)."""
    from api.app import create_app
    from ingestion import repository
    from ingestion import service as ingestion_service
    from retrieval.store import close_vector_store

    url, settings = _on(database, make_pg_database, tmp_path)
    with TestClient(create_app(settings)) as client:
        admin, editor, uploaded = _admin_and_an_upload(client)
        document_id = uploaded["document_id"]
        real_listing = repository.documents_to_reindex

        def failed_meanwhile(session, **kwargs):  # type: ignore[no-untyped-def]
            listed = real_listing(session, **kwargs)
            with monkeypatch.context() as patched:
                patched.setattr(ingestion_service, "protect", _unreadable)
                ingestion_service.run_ingestion(settings=settings, document_id=document_id, job_id=uploaded["job_id"])
            return listed

        monkeypatch.setattr(repository, "documents_to_reindex", failed_meanwhile)
        selection = {"document_ids": [document_id]} if named else {}
        reindex = client.post("/v1/admin/reindex", headers=admin, json={"department": "desk", **selection})
        monkeypatch.undo()
        between = _document_row(url, document_id)
        for job in reindex.json()["queued"]:
            ingestion_service.run_ingestion(settings=settings, document_id=document_id, job_id=job)
        document = client.get(f"/v1/documents/{document_id}", headers=auth(editor)).json()
    close_vector_store(settings)
    memory.Channel.queues.pop(settings.task_queue, None)
    assert reindex.status_code == 202, reindex.text
    if named:
        assert reindex.json()["skipped"] == [] and len(reindex.json()["queued"]) == 1
        assert between[0] == "queued" and (document["status"], document["error"]) == ("ready", None)
    else:
        assert reindex.json() == {"queued": [], "skipped": [document_id]}
        assert between[0] == document["status"] == "failed"


def test_a_reindex_naming_a_failed_document_and_an_upload_of_its_bytes_do_not_stall_each_other(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On SQLite (the embedded default) a re-index wrote the rows of the documents listed before a failed one, which
    takes the database's one write lock, and only then took the failed one's content lock; an upload of the same
    bytes, holding that lock, waited for the write lock until the busy timeout (30 s), then failed. The re-index now
    takes the content locks of the failed documents named before its first write: it waits for the upload, which is
    accepted, and then skips the failed one, its content live again."""
    from api.app import create_app
    from core.db import unit_of_work
    from ingestion import quarantine, repository
    from ingestion import service as ingestion_service
    from ingestion.schemas import Classification
    from retrieval.store import close_vector_store

    url, settings = _embedded(tmp_path)
    with TestClient(create_app(settings)) as client:
        editor = desk_member(client, "editor")
        ready, failed = _upload(client, editor, 0), _upload(client, editor, 1)  # listed in this order
        ingestion_service.run_ingestion(settings=settings, document_id=ready["document_id"], job_id=ready["job_id"])
        with monkeypatch.context() as patched:
            patched.setattr(ingestion_service, "protect", _unreadable)
            ingestion_service.run_ingestion(settings=settings, document_id=failed["document_id"],
                                            job_id=failed["job_id"])
    close_vector_store(settings)
    memory.Channel.queues.pop(settings.task_queue, None)
    real_find, real_lock = repository.find_duplicate, repository.lock_content
    uploading, reindex_locking, go_on = threading.Event(), threading.Event(), threading.Event()

    def upload_waits(session, **kwargs):  # type: ignore[no-untyped-def]
        if threading.current_thread().name == "upload":  # holding the content lock, before its first write
            uploading.set()
            go_on.wait(60)
        return real_find(session, **kwargs)

    def reindex_locks(session, **kwargs) -> None:  # type: ignore[no-untyped-def]
        if threading.current_thread().name == "reindex":
            reindex_locking.set()
        real_lock(session, **kwargs)

    monkeypatch.setattr(repository, "find_duplicate", upload_waits)
    monkeypatch.setattr(repository, "lock_content", reindex_locks)
    outcomes: dict[str, object] = {}

    def upload() -> None:
        try:
            with unit_of_work(url) as session:
                outcomes["upload"] = ingestion_service.accept_upload(
                    session=session, settings=settings, uploaded_by="stella", department="desk",
                    filename="note-1.txt", data=b"Note 1: the desk opens at nine.", title=None, acl_groups=[],
                    classification=Classification.internal).document_id
        except Exception as exc:  # noqa: BLE001 - the outcome is what the test reads
            outcomes["upload"] = type(exc).__name__

    def reindex() -> None:
        with unit_of_work(url) as session:
            outcomes["reindex"] = quarantine.queue_reindex(
                session=session, settings=settings, department="desk", serve_previous=False,
                document_ids=[ready["document_id"], failed["document_id"]])

    threads = [threading.Thread(target=upload, name="upload"), threading.Thread(target=reindex, name="reindex")]
    threads[0].start()
    assert uploading.wait(30)
    threads[1].start()
    assert reindex_locking.wait(30)
    time.sleep(0.5)  # the re-index waits for the content lock
    go_on.set()
    for thread in threads:
        thread.join(90)
    reindexed = outcomes["reindex"]
    assert isinstance(outcomes["upload"], str) and len(outcomes["upload"]) == 36, outcomes  # a document id
    assert reindexed.skipped == [failed["document_id"]]  # type: ignore[attr-defined]
    assert [document for document, _ in reindexed.queued] == [ready["document_id"]]  # type: ignore[attr-defined]


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_deleting_a_document_and_its_failed_copy_at_once_deletes_both_once(
        database: str, make_pg_database: Callable[[], str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A deletion retires the failed copies of its content under the content's lock alone, never a copy's own: the
    deletion of a copy holds that while it waits for the content's lock, and the two would deadlock (on SQLite, a
    hang). Here the copy's deletion has read it, failed, and waits; the other deletion retires it; the copy's then
    finds it deleted: a 404, as for any document deleted before."""
    from api.app import create_app
    from core.db import unit_of_work
    from core.errors import GovragError
    from ingestion import repository
    from ingestion import service as ingestion_service
    from retrieval.store import close_vector_store

    url, settings = _on(database, make_pg_database, tmp_path)
    with TestClient(create_app(settings)) as client:
        editor = desk_member(client, "editor")
        failed = _upload(client, editor, 1)
        with monkeypatch.context() as patched:
            patched.setattr(ingestion_service, "protect", _unreadable)
            ingestion_service.run_ingestion(settings=settings, document_id=failed["document_id"],
                                            job_id=failed["job_id"])
        copy = _upload(client, editor, 1)  # the same bytes: a failed document is no duplicate
        ingestion_service.run_ingestion(settings=settings, document_id=copy["document_id"], job_id=copy["job_id"])
    close_vector_store(settings)
    memory.Channel.queues.pop(settings.task_queue, None)
    real_lock, waiting, deleted = repository.lock_content, threading.Event(), threading.Event()

    def copy_deletion_waits(session, **kwargs) -> None:  # type: ignore[no-untyped-def]
        if threading.current_thread().name == failed["document_id"]:  # its own lock held, the document read
            waiting.set()
            deleted.wait(60)
        real_lock(session, **kwargs)

    monkeypatch.setattr(repository, "lock_content", copy_deletion_waits)
    outcomes: dict[str, object] = {}

    def delete(document_id: str) -> None:
        try:
            with unit_of_work(url) as session:
                outcomes[document_id] = sorted(ingestion_service.delete_document(
                    session=session, settings=settings, document_id=document_id, can_delete=lambda _: True)[1])
        except GovragError as exc:
            outcomes[document_id] = exc.code.name

    deletions = {document_id: threading.Thread(target=delete, args=(document_id,), name=document_id, daemon=True)
                 for document_id in (failed["document_id"], copy["document_id"])}
    deletions[failed["document_id"]].start()
    assert waiting.wait(30)
    deletions[copy["document_id"]].start()
    deletions[copy["document_id"]].join(30)
    deleted.set()
    deletions[failed["document_id"]].join(30)
    assert outcomes == {copy["document_id"]: sorted([copy["document_id"], failed["document_id"]]),
                        failed["document_id"]: "not_found"}
    assert {_document_row(url, document_id)[0] for document_id in deletions} == {"deleted"}


def test_a_deletion_writes_the_rows_it_retires_oldest_first_as_a_reindex_queues_them(
        make_pg_database: Callable[[], str], tmp_path: Path) -> None:
    """A deletion retires the failed copies of its content with what is attached below them, and wrote their rows
    after its own document's, while a department-wide re-index writes (queues) documents oldest first. A failed
    e-mail older than the document, its attachment ready: the re-index held the attachment's row and waited for the
    document's, the deletion held the document's and waited for the attachment's, and PostgreSQL aborted one (a
    500). The deletion now writes its rows oldest first too: waiting for the attachment's, it holds no newer row."""
    from email.message import EmailMessage

    import psycopg

    from api.app import create_app
    from core.db import unit_of_work
    from core.models import Document
    from ingestion import service as ingestion_service
    from retrieval.store import close_vector_store

    message = EmailMessage()
    message["Subject"], message["From"], message["To"] = "Rota", "a@example.org", "b@example.org"
    message.set_content("The rota is attached.")
    message.add_attachment(b"The desk opens at nine on Saturdays.", maintype="text", subtype="plain",
                           filename="rota.txt")
    url, settings = _on("postgresql", make_pg_database, tmp_path)
    dsn = libpq_dsn(url)
    with TestClient(create_app(settings)) as client:
        editor = desk_member(client, "editor")

        def ingest(name: str) -> str:
            uploaded = client.post("/v1/documents", headers=auth(editor), data={"department": "desk"},
                                   files={"file": (name, message.as_bytes())}).json()
            ingestion_service.run_ingestion(settings=settings, document_id=uploaded["document_id"],
                                            job_id=uploaded["job_id"])
            return str(uploaded["document_id"])

        failed = ingest("rota.eml")
        [attachment] = ingestion_service.spawn_attachments(settings=settings, document_id=failed)
        ingestion_service.run_ingestion(settings=settings, document_id=attachment.document_id,
                                        job_id=attachment.job_id)
        with unit_of_work(url) as session:  # as a re-index whose runs all failed leaves it
            session.execute(update(Document).where(Document.id == failed).values(status="failed"))
        copy = ingest("rota-again.eml")  # the same bytes: a failed document is no duplicate
    close_vector_store(settings)
    memory.Channel.queues.pop(settings.task_queue, None)
    retired: list[str] = []

    def delete() -> None:
        with unit_of_work(url) as session:
            retired.extend(ingestion_service.delete_document(session=session, settings=settings, document_id=copy,
                                                             can_delete=lambda _: True)[1])

    deletion = threading.Thread(target=delete, daemon=True)
    with psycopg.connect(dsn) as reindex:
        reindex.execute("UPDATE documents SET updated_at = now() WHERE id = %s", (attachment.document_id,))
        deletion.start()  # while the re-index holds the attachment's row, older than the document's
        assert wait_for_a_lock_wait(url, deletion, timeout=120) is not None
        try:  # what the re-index does next (`new_job` of the document), without waiting
            reindex.execute("SELECT id FROM documents WHERE id = %s FOR UPDATE NOWAIT", (copy,))
            document_row_free = True
        except psycopg.errors.LockNotAvailable:
            document_row_free = False
        reindex.rollback()
    deletion.join(60)
    assert document_row_free, "the deletion held the document's row while it waited for an older one"
    assert not deletion.is_alive() and sorted(retired) == sorted([copy, failed, attachment.document_id])


def test_a_deletion_and_the_attachments_of_another_e_mail_with_the_same_files_take_their_locks_in_one_order(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A deletion takes the content locks of the document and its attachments, sorted, before its first write (it
    retires their failed copies under them); taking an e-mail's attachments took each one's as it accepted it, in the
    e-mail's order. A forwarded e-mail carries the same files: with them in the other order, each held one lock the
    other wanted, for ever on SQLite (process locks; PostgreSQL aborts one). Taking attachments now locks them sorted
    before the first is accepted: the deletion of one e-mail and the attachments of the other run one after the
    other."""
    from email.message import EmailMessage

    from api.app import create_app
    from core.db import unit_of_work
    from ingestion import repository
    from ingestion import service as ingestion_service
    from retrieval.store import close_vector_store

    files = sorted((f"Attachment {n}: the desk opens at nine.".encode() for n in range(2)),
                   key=lambda data: hashlib.sha256(data).hexdigest())  # first, the one locked first when sorted

    def mail(subject: str, attachments: list[bytes]) -> bytes:
        message = EmailMessage()
        message["Subject"], message["From"], message["To"] = subject, "a@example.org", "b@example.org"
        message.set_content(f"{subject}: see the attached notes.")
        for n, data in enumerate(attachments):
            message.add_attachment(data, maintype="text", subtype="plain", filename=f"notes-{n}.txt")
        return message.as_bytes()

    url, settings = _embedded(tmp_path)
    with TestClient(create_app(settings)) as client:
        editor = desk_member(client, "editor")
        sent = [client.post("/v1/documents", headers=auth(editor), data={"department": "desk"},
                            files={"file": (f"{subject}.eml", mail(subject, attachments))}).json()
                for subject, attachments in (("Notes", files), ("Fwd: Notes", files[::-1]))]
        for uploaded in sent:
            ingestion_service.run_ingestion(settings=settings, document_id=uploaded["document_id"],
                                            job_id=uploaded["job_id"])
        ingestion_service.spawn_attachments(settings=settings, document_id=sent[0]["document_id"])
    close_vector_store(settings)
    memory.Channel.queues.pop(settings.task_queue, None)
    first, second = (hashlib.sha256(data).hexdigest() for data in files)
    real_lock, holding = repository.lock_content, {"delete": threading.Event(), "attach": threading.Event()}

    def lock_then_meet(session, **kwargs) -> None:  # type: ignore[no-untyped-def]
        real_lock(session, **kwargs)
        name = threading.current_thread().name
        if (name, kwargs["sha256"]) in (("delete", first), ("attach", second)):  # each its first of the two
            holding[name].set()
            holding["attach" if name == "delete" else "delete"].wait(5)

    monkeypatch.setattr(repository, "lock_content", lock_then_meet)
    outcomes: dict[str, object] = {}

    def delete() -> None:
        with unit_of_work(url) as session:
            outcomes["delete"] = len(ingestion_service.delete_document(
                session=session, settings=settings, document_id=sent[0]["document_id"], can_delete=lambda _: True)[1])

    def attach() -> None:
        outcomes["attach"] = len(ingestion_service.spawn_attachments(settings=settings,
                                                                     document_id=sent[1]["document_id"]))

    threads = [threading.Thread(target=work, name=work.__name__, daemon=True) for work in (delete, attach)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads), "deadlocked"
    assert outcomes["delete"] == 3 and outcomes["attach"] in (0, 2), outcomes  # duplicates, or taken once deleted


def _ingested_then_reindexed(client: TestClient, settings, *, serve_previous: bool):  # type: ignore[no-untyped-def]
    """A desk editor's token, a document ingested (run in this thread) and the desk's re-index response (its job
    left queued)."""
    from ingestion import service as ingestion_service

    admin, editor, uploaded = _admin_and_an_upload(client)
    document_id = uploaded["document_id"]
    ingestion_service.run_ingestion(settings=settings, document_id=document_id, job_id=uploaded["job_id"])
    reindex = client.post("/v1/admin/reindex", headers=admin,
                          json={"department": "desk", "serve_previous": serve_previous})
    return editor, document_id, reindex


def _ask_when_the_desk_opens(client: TestClient, token: str) -> dict[str, object]:
    response = client.post("/v1/query", headers=auth(token),
                           json={"question": "When does the desk open?", "departments": ["desk"]})
    assert response.status_code == 200, response.text
    return {"answer": response.json()["answer"], "cited": {c["document_id"] for c in response.json()["citations"]}}


class WorkerDied(BaseException):  # noqa: N818 - what a kill looks like from inside: no handler of the run sees it
    """Stands for the worker process dying mid-document (the OOM killer, a segfault in a parser)."""


def _job_row(url: str, job_id: str):  # type: ignore[no-untyped-def]
    from core.db import unit_of_work
    from core.models import IngestionJob

    with unit_of_work(url) as session:
        job = session.get(IngestionJob, job_id)
        return job.status, job.error, job.attempts, job.crashed_runs  # type: ignore[union-attr]


def test_a_document_that_kills_its_worker_is_failed_after_a_few_runs_not_retried_for_ever(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The retry limit only counted runs that raised: a document whose run killed the worker was delivered again
    (by the broker, by the stall sweep, or on the embedded default at every start-up of the API it took down) with
    no end. Now the third run that died fails it."""
    from api.app import create_app
    from ingestion import service as ingestion_service
    from retrieval.store import close_vector_store
    from workers.celery_app import create_celery
    from workers.dispatch import resend_unfinished

    def dies(*_: object, **__: object) -> object:
        raise WorkerDied

    url, settings = _embedded(tmp_path)
    with TestClient(create_app(settings)) as client:
        editor = desk_member(client, "editor")
        uploaded = _upload(client, editor, 0)
        monkeypatch.setattr(ingestion_service, "protect", dies)
        for _ in range(ingestion_service.MAX_CRASHED_RUNS):  # each delivery after the first finds the run before dead
            with pytest.raises(WorkerDied):
                ingestion_service.run_ingestion(settings=settings, document_id=uploaded["document_id"],
                                                job_id=uploaded["job_id"])
        ingestion_service.run_ingestion(settings=settings, document_id=uploaded["document_id"],
                                        job_id=uploaded["job_id"])  # fails it without running
        document = client.get(f"/v1/documents/{uploaded['document_id']}", headers=auth(editor)).json()
    close_vector_store(settings)
    memory.Channel.queues.pop(settings.task_queue, None)
    failed = ("failed", ingestion_service.CRASHED_TOO_OFTEN, ingestion_service.MAX_CRASHED_RUNS + 1,
              ingestion_service.MAX_CRASHED_RUNS)
    assert _job_row(url, uploaded["job_id"]) == failed
    assert (document["status"], document["error"]) == ("failed", ingestion_service.CRASHED_TOO_OFTEN)
    assert resend_unfinished(create_celery(settings)) == 0  # nothing left to send at the next start-up
    memory.Channel.queues.pop(settings.task_queue, None)


def _hold_document_row(url: str, job_id: str, document_id: str) -> contextlib.AbstractContextManager[object]:
    """Once the job's run has claimed its document (processing, committed), a transaction locking the document row,
    so the run is still going (it cannot write its outcome) while the test acts, as a long document's run is."""
    import psycopg

    dsn = libpq_dsn(url)
    deadline = time.monotonic() + 120
    while _job_row(url, job_id)[0] != "processing":
        assert time.monotonic() < deadline, "the run did not start"
        time.sleep(0.02)

    @contextlib.contextmanager
    def held() -> Iterator[object]:
        with psycopg.connect(dsn) as holder:
            holder.execute("SELECT id FROM documents WHERE id = %s FOR UPDATE", (document_id,))
            yield holder
            holder.rollback()

    return held()


def test_a_clean_stop_during_a_run_hands_its_job_back_instead_of_counting_a_crash(
        make_pg_database: Callable[[], str], tmp_path: Path) -> None:
    """`govrag serve` stopped (Ctrl-C, a deploy) while its in-process worker ran a long document left the job
    `processing`: the next start counted a crash, and three ordinary restarts failed the document as 'the worker
    died 3 times'. The stop now hands the abandoned run's job back, so the next run is a retry, not a crash."""
    from api.app import create_app
    from core import migrate
    from retrieval.store import close_vector_store
    from workers.inprocess import InProcessWorker

    url = make_pg_database()
    migrate.upgrade(url)
    settings = _settings(tmp_path / "data", url, broker_url="memory://", inprocess_worker=False, job_sweep_seconds=0)
    text = "\n\n".join(f"Section {n}. The facilities team reviewed the lifts of building {n}." for n in range(60))
    with TestClient(create_app(settings)) as client:
        editor = desk_member(client, "editor")
        uploaded = client.post("/v1/documents", headers=auth(editor), data={"department": "desk"},
                               files={"file": ("maintenance.txt", text.encode())}).json()
        worker = InProcessWorker(client.app.state.celery)  # type: ignore[attr-defined]
        worker.start()
        with _hold_document_row(url, uploaded["job_id"], uploaded["document_id"]):
            worker.stop(timeout=1.0)  # the run cannot end meanwhile: it is abandoned, as at a process exit
            at_stop = _job_row(url, uploaded["job_id"])
        worker.stop(timeout=120)  # released: the abandoned run lets go (in a real stop the process is gone)
        final = _job_row(url, uploaded["job_id"])
    close_vector_store(settings)
    memory.Channel.queues.pop(settings.task_queue, None)
    assert at_stop == ("queued", None, 1, 0)  # handed back: its next run is a retry, no crash counted
    assert (final[0], final[3]) == ("ready", 0)


def test_a_prefork_child_has_time_to_load_its_models_before_celery_counts_it_dead(tmp_path: Path) -> None:
    """Children load the models in worker_process_init, before they report themselves up: 4-6 s for two at once on 2
    busy cores, and Celery's default 4 s (`worker_proc_alive_timeout`) killed a child that took longer."""
    from core.settings import Settings
    from workers.celery_app import create_celery

    app = create_celery(Settings(data_dir=tmp_path, broker_url="memory://"))
    assert app.conf.worker_proc_alive_timeout >= 30


def test_a_worker_loads_the_pii_model_as_it_starts_and_its_first_claim_does_not(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fresh worker loaded the PII model (spaCy via Presidio) on its first job, in the claim's re-redaction of the
    stored title: for seconds inside the transaction holding the document's row locks, and a crash there rolled back
    the crashed-runs count with the claim. A worker loads it as it starts; its first claim finds it loaded."""
    from api.app import create_app
    from guard import pii
    from retrieval.store import close_vector_store
    from workers.inprocess import InProcessWorker

    real, loads = pii.get_redactor(), []

    def load() -> pii.PiiRedactor:
        loads.append("in a claim" if any(frame.function == "_claim" for frame in inspect.stack()) else "elsewhere")
        return real

    _, settings = _embedded(tmp_path)
    with TestClient(create_app(settings)) as client:
        editor = desk_member(client, "editor")
        uploaded = _upload(client, editor, 0)  # no worker yet: the job waits in the broker
        monkeypatch.setattr(pii, "PiiRedactor", load)
        pii.get_redactor.cache_clear()  # as in a fresh worker process: nothing loaded
        worker = InProcessWorker(client.app.state.celery)  # type: ignore[attr-defined]
        assert loads == ["elsewhere"]  # loaded as the worker started, before any job
        worker.start()
        job = wait_for_job(client, editor, uploaded["job_id"])
        worker.stop()
    close_vector_store(settings)
    memory.Channel.queues.pop(settings.task_queue, None)
    assert job["status"] == "ready"
    assert loads == ["elsewhere"]  # the claim (and the rest of the run) used the loaded model


def test_a_reindex_while_a_run_waits_to_write_its_outcome_runs_it_again_under_the_new_policy(
        make_pg_database: Callable[[], str], tmp_path: Path) -> None:
    """The re-index skipped a document being ingested (`queued: []`) and its run, which read the rules before the
    policy change, ended it `ready`. Now, even while the run is about to write its outcome (held here by a lock on
    the document row, as a long document's run is held by its work), the re-index hands its job back: the run writes
    nothing and goes again under the new policy."""
    from api.app import create_app
    from core import migrate
    from ingestion import service as ingestion_service
    from retrieval.store import close_vector_store

    url = make_pg_database()
    migrate.upgrade(url)
    settings = _settings(tmp_path / "data", url, broker_url="memory://", inprocess_worker=False, job_sweep_seconds=0)
    text = "\n\n".join(f"Section {n}. The facilities team reviewed the lifts of building {n}." for n in range(60))
    with TestClient(create_app(settings)) as client:
        admin = auth(client.app.state.dev_issuer.issue(PLATFORM_ADMIN, []))  # type: ignore[attr-defined]
        editor = desk_member(client, "editor")
        uploaded = client.post("/v1/documents", headers=auth(editor), data={"department": "desk"},
                               files={"file": ("falcon.txt", f"{text}\n\nProject Falcon starts in May.".encode())})
        run = threading.Thread(target=ingestion_service.run_ingestion, kwargs={
            "settings": settings, "document_id": uploaded.json()["document_id"], "job_id": uploaded.json()["job_id"]})
        run.start()  # what the worker does with the upload's job
        with _hold_document_row(url, uploaded.json()["job_id"], uploaded.json()["document_id"]):
            policy = client.put("/v1/admin/departments/desk/ingestion-policy", headers=admin,
                                json={"keywords": {"project falcon": "restricted"}})
            reindex = client.post("/v1/admin/reindex", headers=admin, json={"department": "desk"})
        run.join(120)
        document = client.get(f"/v1/documents/{uploaded.json()['document_id']}", headers=auth(editor)).json()
    close_vector_store(settings)
    memory.Channel.queues.pop(settings.task_queue, None)
    assert policy.status_code == 200 and reindex.status_code == 202, reindex.text
    assert reindex.json() == {"queued": [uploaded.json()["job_id"]], "skipped": []}
    assert document["status"] == "quarantined", document
    assert _job_row(url, uploaded.json()["job_id"]) == ("quarantined", None, 2, 0)  # run again, no crash counted


def test_a_redelivered_jobs_claim_locks_its_document_row_before_its_job_row_as_a_reindex_does(
        make_pg_database: Callable[[], str], tmp_path: Path) -> None:
    """A claim counted the attempt (locking the job's row) before it marked the document processing, while a
    re-index locks the document's row (`withhold`) before its jobs' (`hand_back`), as a run's end does: a job
    redelivered while a re-index covered its document could deadlock them, PostgreSQL aborting one (the admin's
    request or the claim). A claim now waits for the document's row holding no job row, so the re-index that holds
    it goes on to the job's row; and the claim still counts the attempt and the crash before it."""
    import psycopg

    from api.app import create_app
    from core import migrate
    from core.db import unit_of_work
    from core.models import IngestionJob
    from ingestion import service as ingestion_service
    from retrieval.store import close_vector_store

    url = make_pg_database()
    migrate.upgrade(url)
    dsn = libpq_dsn(url)
    settings = _settings(tmp_path / "data", url, broker_url="memory://", inprocess_worker=False, job_sweep_seconds=0)
    with TestClient(create_app(settings)) as client:
        uploaded = _upload(client, desk_member(client, "editor"), 0)
        with unit_of_work(url) as session:  # the run before died mid-document: the broker delivers the job again
            session.execute(update(IngestionJob).where(IngestionJob.id == uploaded["job_id"])
                            .values(status="processing"))
        run = threading.Thread(target=ingestion_service.run_ingestion, kwargs={
            "settings": settings, "document_id": uploaded["document_id"], "job_id": uploaded["job_id"]})
        with psycopg.connect(dsn) as reindex:
            reindex.execute("UPDATE documents SET updated_at = now() WHERE id = %s", (uploaded["document_id"],))
            run.start()  # the redelivery's claim, while the re-index holds the document's row
            assert wait_for_a_lock_wait(url, run, timeout=120) is not None
            try:  # what the re-index does next (`hand_back`), without waiting
                reindex.execute("SELECT id FROM ingestion_jobs WHERE id = %s FOR UPDATE NOWAIT", (uploaded["job_id"],))
                job_row_free = True
            except psycopg.errors.LockNotAvailable:
                job_row_free = False
            reindex.rollback()
        run.join(120)
    close_vector_store(settings)
    memory.Channel.queues.pop(settings.task_queue, None)
    assert job_row_free, "the claim held the job's row while it waited for the document's"
    assert not run.is_alive() and _job_row(url, uploaded["job_id"]) == ("ready", None, 1, 1)


def test_two_deliveries_of_one_job_running_at_once_leave_the_document_to_the_later_claim(
        make_pg_database: Callable[[], str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Delivery is at least once: the broker delivers a job again when its run outlives the visibility timeout, while
    that run goes on. The run that ended first found the other delivery's later claim of the document and went
    again, claiming a newer generation; the other then did the same. Each claim over a job still processing counted
    a crash, and the third failed a document no worker had died on ('the worker died 3 times'). A run that a later
    claim of its document outdid now ends there: the later one writes the outcome; and that later claim, made while
    the first run still went on (holding itself live), counts no crash."""
    from api.app import create_app
    from core import migrate
    from ingestion import service as ingestion_service
    from retrieval.store import close_vector_store, open_vector_store

    url = make_pg_database()
    migrate.upgrade(url)
    settings = _settings(tmp_path / "data", url, broker_url="memory://", inprocess_worker=False, job_sweep_seconds=0)
    real_finish, reached = ingestion_service._finish, {g: threading.Event() for g in (1, 2, 3)}
    runs: list[threading.Thread] = []

    def wait(until: Callable[[], bool]) -> None:
        deadline = time.monotonic() + 60
        while not until() and time.monotonic() < deadline:
            time.sleep(0.01)

    def interleaved(*args: object, generation: int | None = None, **kwargs: object) -> object:
        """Each run's end waits for the next claim's: the first for the redelivery's, that one for a third."""
        if generation in reached:
            reached[generation].set()
        if generation == 1:
            wait(reached[2].is_set)
        elif generation == 2:
            wait(lambda: reached[3].is_set() or not runs[0].is_alive())
        elif generation == 3:
            wait(lambda: not runs[1].is_alive())
        return real_finish(*args, generation=generation, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(ingestion_service, "_finish", interleaved)
    with TestClient(create_app(settings)) as client:
        editor = desk_member(client, "editor")
        uploaded = _upload(client, editor, 0)
        delivery = {"settings": settings, "document_id": uploaded["document_id"], "job_id": uploaded["job_id"]}
        runs.append(threading.Thread(target=ingestion_service.run_ingestion, kwargs=delivery))
        runs[0].start()
        assert reached[1].wait(120)  # the first delivery wrote its points and is about to end
        runs.append(threading.Thread(target=ingestion_service.run_ingestion, kwargs=delivery))
        runs[1].start()  # the broker's second delivery of the same job
        for run in runs:
            run.join(120)
        document = client.get(f"/v1/documents/{uploaded['document_id']}", headers=auth(editor)).json()
        generations = {p.get("generation") for p in open_vector_store(settings).scroll_payloads("desk")}
    close_vector_store(settings)
    memory.Channel.queues.pop(settings.task_queue, None)
    assert (document["status"], document["error"]) == ("ready", None), document
    assert _job_row(url, uploaded["job_id"]) == ("ready", None, 2, 0)  # the first run still went on: no crash
    assert generations == {2}  # the first delivery's points went with it


def _first_delivery_claimed(url: str, settings) -> tuple[str, str, int]:  # type: ignore[no-untyped-def]
    """An upload whose job the first delivery claimed and whose run then died (its hold let go, as with its
    process): the document's and job's ids, and the generation the run wrote under."""
    from api.app import create_app
    from retrieval.store import close_vector_store

    with TestClient(create_app(settings)) as client:
        uploaded = _upload(client, desk_member(client, "editor"), 0)
    close_vector_store(settings)
    memory.Channel.queues.pop(settings.task_queue, None)
    claimed = _claimed_by_a_run_that_dies(settings, uploaded["document_id"], uploaded["job_id"])
    assert claimed is not None
    return uploaded["document_id"], uploaded["job_id"], claimed[0].generation


def _claimed_by_a_run_that_dies(settings, document_id: str, job_id: str):  # type: ignore[no-untyped-def]
    """A delivery's claim, whose run dies once it has claimed: the job left `processing`, held live by no one."""
    from ingestion import service as ingestion_service

    with ingestion_service.run_hold(settings) as hold:
        return ingestion_service._start(settings, document_id, job_id, hold)


def _end_quarantined(session, document_id: str, job_id: str, generation: int) -> None:  # type: ignore[no-untyped-def]
    """The first run's end, its document quarantined for review, written in `session` (as `_finish` writes it)."""
    from ingestion import repository

    assert repository.set_status(session, document_id=document_id, job_id=job_id, status="quarantined",
                                 chunk_count=0, generation=generation)


def _left_to_review(url: str, document_id: str, job_id: str) -> None:
    """The quarantined document and its job as the first run's end left them: not claimed again (no newer
    generation), its attempt and no crash counted."""
    from core.db import unit_of_work
    from core.models import Document

    with unit_of_work(url) as session:
        document = session.get(Document, document_id)
        assert (document.status, document.index_generation) == ("quarantined", 1)  # type: ignore[union-attr]
    assert _job_row(url, job_id) == ("quarantined", None, 1, 0)


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_a_duplicate_delivery_that_read_its_job_before_the_first_run_ended_leaves_the_document_to_review(
        database: str, make_pg_database: Callable[[], str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Delivery is at least once: a second delivery of a job read the job and its document unfinished, unlocked, and
    its claim refused only a retired document, so a first run ending between that read and the claim (here
    quarantined for review) had its document marked processing and run again, its end written over (the re-run
    found it fit to serve: ready), and a crash counted from the job's status as read. A claim now needs the document
    still queued or processing and its job unfinished as it writes them: the delivery ends as a duplicate."""
    from core.db import unit_of_work
    from ingestion import repository
    from ingestion import service as ingestion_service

    url, settings = _on(database, make_pg_database, tmp_path)
    document_id, job_id, generation = _first_delivery_claimed(url, settings)
    real_lock_for_claim = repository.lock_for_claim

    def first_run_ends_meanwhile(session, *args: object):  # type: ignore[no-untyped-def]
        with unit_of_work(url) as other:  # after the second delivery read the job and document, before its claim
            _end_quarantined(other, document_id, job_id, generation)
        return real_lock_for_claim(session, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(repository, "lock_for_claim", first_run_ends_meanwhile)
    assert ingestion_service.run_ingestion(settings=settings, document_id=document_id, job_id=job_id) == []
    _left_to_review(url, document_id, job_id)


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_a_duplicate_delivery_of_a_job_that_ended_as_a_reindex_queued_its_document_leaves_it_to_the_new_job(
        database: str, make_pg_database: Callable[[], str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first run ends (ready) and a re-index queues its document again under a new job, between a second
    delivery's read of the old job and its claim: the document is queued, so the claim's document update goes
    through, but the old job has ended. The claim needs both: it writes nothing (the document's move rolled back),
    the document is left to the re-index's job, and the old job keeps its end, no attempt or crash counted."""
    from core.db import unit_of_work
    from ingestion import repository
    from ingestion import service as ingestion_service

    url, settings = _on(database, make_pg_database, tmp_path)
    document_id, job_id, generation = _first_delivery_claimed(url, settings)
    real_lock_for_claim, reindexed = repository.lock_for_claim, []

    def ended_and_queued_again_meanwhile(session, *args: object):  # type: ignore[no-untyped-def]
        with unit_of_work(url) as other:
            assert repository.set_status(other, document_id=document_id, job_id=job_id, status="ready",
                                         chunk_count=0, generation=generation)
            reindexed.append(repository.new_job(other, document_id=document_id, from_statuses=repository.REINDEXED))
        return real_lock_for_claim(session, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(repository, "lock_for_claim", ended_and_queued_again_meanwhile)
    assert ingestion_service.run_ingestion(settings=settings, document_id=document_id, job_id=job_id) == []
    assert reindexed[0] is not None and _job_row(url, reindexed[0]) == ("queued", None, 0, 0)
    assert _job_row(url, job_id) == ("ready", None, 1, 0)
    with unit_of_work(url) as session:
        document = repository.get_document(session, document_id)
        assert (document.status, document.index_generation) == ("queued", 1)  # type: ignore[union-attr]



@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_a_delivery_giving_up_as_another_run_ends_the_document_leaves_it_to_review(
        database: str, make_pg_database: Callable[[], str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """A delivery giving up (its retries or its time limit spent) read the document unfinished (so no attachment step
    gave up), and failed it with its job whatever committed since: another run of the job (the broker's second
    delivery) ending it quarantined for review between that read and the failure had its end written over, the
    document failed and out of review. The failure is now written only while the document and its job are
    unfinished: the end is kept, and the log says so (it said a later run had taken the document over)."""
    from core.db import unit_of_work
    from ingestion import service as ingestion_service

    url, settings = _on(database, make_pg_database, tmp_path)
    document_id, job_id, generation = _first_delivery_claimed(url, settings)
    real_step_gave_up = ingestion_service._step_gave_up

    def other_run_ends_meanwhile(*args: object) -> bool:
        gave_up = real_step_gave_up(*args)  # type: ignore[arg-type]
        with unit_of_work(url) as other:  # after the give-up read the document, before it writes the failure
            _end_quarantined(other, document_id, job_id, generation)
        return gave_up

    monkeypatch.setattr(ingestion_service, "_step_gave_up", other_run_ends_meanwhile)
    with caplog.at_level(logging.INFO, logger="ingestion.service"):
        assert ingestion_service.mark_failed(settings=settings, document_id=document_id, job_id=job_id,
                                             reason="internal error during ingestion; retries exhausted") == []
    _left_to_review(url, document_id, job_id)
    assert [r.getMessage() for r in caplog.records if r.name == "ingestion.service"] == [
        f"the failure of document {document_id} is not written: another run ended it or its job since"]

def test_a_duplicate_delivery_waiting_for_the_row_the_first_runs_end_holds_leaves_the_document_to_review(
        make_pg_database: Callable[[], str], tmp_path: Path) -> None:
    """A second delivery of a job read it and its document processing while the first run's end (quarantined for
    review) held the document's row; its claim waited for that row and, once the end committed, marked the document
    processing again and ran it. PostgreSQL reads the claim's conditions again as the row lock leaves the row: the
    delivery ends as a duplicate, the end kept. (PostgreSQL only: on SQLite the claim waits for the end's write lock
    in SQLite's busy handler, which no test sees; the test above covers SQLite's end committed before the claim.)"""
    from core.db import unit_of_work
    from ingestion import service as ingestion_service

    url, settings = _on("postgresql", make_pg_database, tmp_path)
    document_id, job_id, generation = _first_delivery_claimed(url, settings)
    queued: list[object] = []

    def deliver_again() -> None:
        queued.append(ingestion_service.run_ingestion(settings=settings, document_id=document_id, job_id=job_id))

    second = threading.Thread(target=deliver_again, daemon=True)
    with unit_of_work(url) as session:
        _end_quarantined(session, document_id, job_id, generation)
        second.start()  # the broker's second delivery, as the first run ends
        assert wait_for_a_lock_wait(url, second, timeout=120) in ("transactionid", "tuple")  # the document's row
    second.join(120)
    assert queued == [[]]  # it returned: acknowledged, nothing raised
    _left_to_review(url, document_id, job_id)


def _claimed_after(meanwhile: Callable[[], object], monkeypatch: pytest.MonkeyPatch) -> None:
    """`meanwhile` done, and committed, once the next claim has read the job and its document, before it locks
    them."""
    from ingestion import repository

    real_lock_for_claim, pending = repository.lock_for_claim, [meanwhile]

    def after_the_read(*args: object) -> None:
        if pending:
            pending.pop()()
        real_lock_for_claim(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(repository, "lock_for_claim", after_the_read)


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_a_redelivery_that_read_its_job_processing_before_its_run_handed_it_back_counts_no_crash(
        database: str, make_pg_database: Callable[[], str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A delivery of a job (the sweep's, the broker's) read it processing, its run going on, and that run handed it
    back (it failed cleanly, or a re-index made its rules stale) before the delivery claimed it: the claim counted a
    crash from the status read, though no run had died, a step towards failing the document as 'the worker died 3
    times'. The claim now decides from the job as its row lock leaves it: handed back, a retry."""
    from core.db import unit_of_work
    from ingestion import repository
    from ingestion import service as ingestion_service

    url, settings = _on(database, make_pg_database, tmp_path)
    document_id, job_id, _ = _first_delivery_claimed(url, settings)

    def hand_back() -> None:
        with unit_of_work(url) as other:
            assert repository.hand_back(other, job_id)

    _claimed_after(hand_back, monkeypatch)
    assert ingestion_service.run_ingestion(settings=settings, document_id=document_id, job_id=job_id) == []
    assert _job_row(url, job_id) == ("ready", None, 2, 0)


def test_a_redelivery_waiting_for_the_job_row_a_hand_back_holds_counts_no_crash(
        make_pg_database: Callable[[], str], tmp_path: Path) -> None:
    """As above, the hand-back holding the job's row as the delivery claims: PostgreSQL's claim waits for the row
    and decides from it as the hand-back's commit leaves it. (PostgreSQL only: on SQLite the claim waits for the
    hand-back's write lock in SQLite's busy handler, which no test sees; the test above covers SQLite.)"""
    from core.db import unit_of_work
    from ingestion import repository
    from ingestion import service as ingestion_service

    url, settings = _on("postgresql", make_pg_database, tmp_path)
    document_id, job_id, _ = _first_delivery_claimed(url, settings)
    delivery = threading.Thread(target=ingestion_service.run_ingestion, daemon=True,
                                kwargs={"settings": settings, "document_id": document_id, "job_id": job_id})
    with unit_of_work(url) as session:
        assert repository.hand_back(session, job_id)
        delivery.start()
        assert wait_for_a_lock_wait(url, delivery, timeout=120) in ("transactionid", "tuple")  # the job's row
    delivery.join(120)
    assert not delivery.is_alive() and _job_row(url, job_id) == ("ready", None, 2, 0)


def test_a_redelivery_on_sqlite_holds_the_database_from_its_read_of_the_job_to_its_claim(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SQLite's half of the test above: the claim takes the database's write lock before it reads the job again, so a
    hand-back cannot commit between that read and the claim's write, where the claim would count a crash from the
    status read though the run handed its job back. A hand-back trying then (without waiting: SQLite's busy handler
    would wait for the claim to commit) finds the database locked."""
    import sqlite3

    from sqlalchemy.engine import make_url

    from ingestion import repository
    from ingestion import service as ingestion_service

    url, settings = _embedded(tmp_path)
    document_id, job_id, _ = _first_delivery_claimed(url, settings)
    real_set_status, tried = repository.set_status, []

    def hand_back_tried_first(session, **kwargs):  # type: ignore[no-untyped-def]
        if not tried:
            with contextlib.closing(sqlite3.connect(make_url(url).database, timeout=0)) as other:
                try:
                    with other:
                        other.execute("UPDATE ingestion_jobs SET status = 'queued' WHERE id = ?", (job_id,))
                    tried.append("handed back")
                except sqlite3.OperationalError as exc:
                    tried.append(str(exc))
        return real_set_status(session, **kwargs)

    monkeypatch.setattr(repository, "set_status", hand_back_tried_first)
    assert ingestion_service.run_ingestion(settings=settings, document_id=document_id, job_id=job_id) == []
    assert tried == ["database is locked"]
    assert _job_row(url, job_id) == ("ready", None, 2, 1)  # the first delivery's run never ended: a crash


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_two_redeliveries_after_crashes_claiming_at_once_never_run_a_job_past_the_crash_limit(
        database: str, make_pg_database: Callable[[], str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two deliveries of a job whose runs died (the broker's and the sweep's) both read it with one crash short of
    the limit left; the first claimed it, counting the crash, before the second claimed. The second decided from the
    count it read, so it ran the document with its job's crashes at the limit, where a claim reading after the
    first's fails it. The claim now decides from the job as its row lock leaves it: the document fails."""
    from core.db import unit_of_work
    from core.models import IngestionJob
    from ingestion import service as ingestion_service

    url, settings = _on(database, make_pg_database, tmp_path)
    document_id, job_id, _ = _first_delivery_claimed(url, settings)  # its run dies: the job stays processing
    with unit_of_work(url) as session:  # as did the runs before it
        session.execute(update(IngestionJob).where(IngestionJob.id == job_id)
                        .values(crashed_runs=ingestion_service.MAX_CRASHED_RUNS - 2))
    _claimed_after(lambda: _claimed_by_a_run_that_dies(settings, document_id, job_id), monkeypatch)
    assert ingestion_service.run_ingestion(settings=settings, document_id=document_id, job_id=job_id) == []
    assert _job_row(url, job_id) == ("failed", ingestion_service.CRASHED_TOO_OFTEN, 3,
                                     ingestion_service.MAX_CRASHED_RUNS)


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_a_redelivery_while_the_run_before_still_goes_on_counts_no_crash_and_the_next_counts_only_real_ones(
        database: str, make_pg_database: Callable[[], str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A claim counted a crash whenever it found its job `processing`, though the run that claimed it last may still
    be going (the broker delivers a task again once it outlives the visibility timeout). In this order: the first
    run dies; the second delivery claims (a crash, rightly) and runs on; the broker delivers it again, and that
    claim counted a crash of the live second run; that third run dies; the fourth claim counted its crash, the
    third, and failed the document ('the worker died 3 times') after two deaths. A run now holds its claim for as
    long as it lives (a lock its process's death lets go): a claim counts a crash only when the run that claimed
    last no longer holds it. The fourth run ingests the document; the second, outdone, ends without writing."""
    from ingestion import service as ingestion_service

    url, settings = _on(database, make_pg_database, tmp_path)
    document_id, job_id, _ = _first_delivery_claimed(url, settings)  # its run dies: a real crash
    real_protect, started, release = ingestion_service.protect, threading.Event(), threading.Event()

    def goes_on_until_released(*args: object, **kwargs: object) -> object:
        started.set()
        assert release.wait(120)
        return real_protect(*args, **kwargs)  # type: ignore[arg-type]

    def dies(*_: object, **__: object) -> object:
        raise WorkerDied

    runs = [goes_on_until_released, dies]  # the second delivery's run, the third's; the fourth's is the real one
    monkeypatch.setattr(ingestion_service, "protect",
                        lambda *args, **kwargs: (runs.pop(0) if runs else real_protect)(*args, **kwargs))
    delivery = {"settings": settings, "document_id": document_id, "job_id": job_id}
    second = threading.Thread(target=ingestion_service.run_ingestion, kwargs=delivery, daemon=True)
    second.start()
    try:
        assert started.wait(120)  # claimed, a crash counted for the first run; its run goes on
        with pytest.raises(WorkerDied):
            ingestion_service.run_ingestion(**delivery)  # the broker's redelivery of the second's task: it dies
        assert _job_row(url, job_id) == ("processing", None, 3, 1)  # the live second run was no crash
        assert ingestion_service.run_ingestion(**delivery) == []  # the third's run died: its crash counted
    finally:
        release.set()
        second.join(120)
    assert not second.is_alive()
    assert _job_row(url, job_id) == ("ready", None, 4, 2)
    assert _document_row(url, document_id) == ("ready", 4, False)  # the fourth run's generation served


def test_a_run_whose_hold_went_with_its_lost_connection_still_ends_as_it_ran(
        make_pg_database: Callable[[], str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run's hold is a transaction left idle on a connection of its own for the whole run; the database restarting
    or a proxy dropping that idle session mid-run takes the lock with it, and ending the hold then raised the lost
    connection's error from a run that had ended ready: the worker logged an outage and retried a finished job, and
    `govrag ingest` stopped the file as not ingested. The hold's loss is not the run's: the run ends as it ran."""
    from sqlalchemy import text

    from core.db import unit_of_work
    from ingestion import service as ingestion_service

    url, settings = _on("postgresql", make_pg_database, tmp_path)
    document_id, job_id, _ = _first_delivery_claimed(url, settings)  # its run dies: a real crash
    real_protect = ingestion_service.protect

    def hold_lost_meanwhile(*args: object, **kwargs: object) -> object:
        with unit_of_work(url) as session:  # the one transaction left idle on this database: the run's hold
            ended = session.scalars(text(
                "SELECT pg_terminate_backend(pid, 60000) FROM pg_stat_activity WHERE datname = current_database() "
                "AND state = 'idle in transaction' AND pid <> pg_backend_pid()")).all()
        assert ended == [True]
        return real_protect(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(ingestion_service, "protect", hold_lost_meanwhile)
    assert ingestion_service.run_ingestion(settings=settings, document_id=document_id, job_id=job_id) == []
    assert _job_row(url, job_id) == ("ready", None, 2, 1)


def test_a_delivery_of_a_job_that_ended_opens_no_connection_to_hold_a_run(
        make_pg_database: Callable[[], str], tmp_path: Path) -> None:
    """A run's hold (a connection of its own, its transaction idle for the run) was opened at every delivery, before
    its claim: a late duplicate of a job that had ended, which runs nothing, still took a second connection from the
    pool, and a server backend, for it. The hold now connects only once a delivery finds its job to claim: the run
    that claims has two connections out at once (its claim's or its end's, and its hold's), its duplicate one alone
    (its claim's). None is taken while the document's row is locked (a wait for one would hold the claim's locks)."""
    import psycopg
    from sqlalchemy import event

    from api.app import create_app
    from core.db import get_engine
    from ingestion import service as ingestion_service
    from retrieval.store import close_vector_store

    url, settings = _on("postgresql", make_pg_database, tmp_path)
    with TestClient(create_app(settings)) as client:
        uploaded = _upload(client, desk_member(client, "editor"), 0)
    close_vector_store(settings)
    memory.Channel.queues.pop(settings.task_queue, None)
    delivery = {"settings": settings, "document_id": uploaded["document_id"], "job_id": uploaded["job_id"]}
    engine, out = get_engine(url), []  # at each checkout, the connections the pool has out (that one counted)
    locked_at_a_checkout = []

    def checked_out(*_: object) -> None:
        out.append(engine.pool.checkedout())  # type: ignore[attr-defined]
        with psycopg.connect(libpq_dsn(url)) as probe:
            try:
                probe.execute("SELECT 1 FROM documents WHERE id = %s FOR UPDATE NOWAIT", (uploaded["document_id"],))
            except psycopg.errors.LockNotAvailable:
                locked_at_a_checkout.append(out[-1])

    event.listen(engine, "checkout", checked_out)
    try:
        assert ingestion_service.run_ingestion(**delivery) == []
        assert max(out) == 2 and _job_row(url, uploaded["job_id"]) == ("ready", None, 1, 0)
        out.clear()
        assert ingestion_service.run_ingestion(**delivery) == []  # a late duplicate: nothing to run
    finally:
        event.remove(engine, "checkout", checked_out)
    assert out == [1] and _job_row(url, uploaded["job_id"]) == ("ready", None, 1, 0)
    assert locked_at_a_checkout == []


def test_runs_that_fail_cleanly_are_retried_and_never_counted_as_crashes(
        client: TestClient, issue_token: Callable[..., str], settings, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """A run that raises hands its job back before the retry: retries (transient faults, outages) are bounded by
    their own limits and never count towards the crashed-runs limit."""
    from ingestion import service as ingestion_service

    canary, real_protect, failures = uuid.uuid4().hex, ingestion_service.protect, []

    def flaky(data: bytes, *args: object, **kwargs: object) -> object:
        if canary.encode() in data and len(failures) < ingestion_service.MAX_CRASHED_RUNS:
            failures.append(1)
            raise RuntimeError("a transient fault")
        return real_protect(data, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(ingestion_service, "MAX_CRASHED_RUNS", 2)
    monkeypatch.setattr(ingestion_service, "protect", flaky)
    department = f"retry{uuid.uuid4().hex[:6]}"
    admin = auth(issue_token(PLATFORM_ADMIN))
    assert client.post("/v1/admin/departments", json={"name": department}, headers=admin).status_code == 201
    assert client.post("/v1/admin/role-assignments", headers=admin,
                       json={"subject": "rhea", "role": "editor", "department": department}).status_code == 201
    editor = issue_token("rhea", [])
    response = client.post("/v1/documents", headers=auth(editor), data={"department": department},
                           files={"file": ("note.txt", f"The desk opens at nine {canary}.".encode())})
    assert response.status_code == 202, response.text
    assert wait_for_job(client, editor, response.json()["job_id"])["status"] == "ready"
    assert _job_row(settings.resolved_database_url, response.json()["job_id"])[2:] == (3, 0)


def test_an_upload_while_the_broker_is_down_is_accepted_and_sent_when_it_is_back(
        make_pg_database: Callable[[], str], tmp_path: Path) -> None:
    """The upload used to fail with a 500 after committing its document, which then stayed `queued` for ever (and a
    second try was refused as a duplicate). Now it is accepted, recorded unsent, and the sweep sends it once the
    broker answers."""
    from api.app import create_app
    from core import migrate
    from retrieval.store import close_vector_store

    url = make_pg_database()
    migrate.upgrade(url)
    down = _settings(tmp_path / "data", url, broker_url=UNREACHABLE_BROKER, inprocess_worker=False,
                     job_sweep_seconds=0)
    with TestClient(create_app(down)) as client:
        editor = desk_member(client, "editor")
        accepted = _upload(client, editor, 1)
        assert client.get(f"/v1/jobs/{accepted['job_id']}", headers=auth(editor)).json()["status"] == "queued"
        assert _sent_at(url, accepted["job_id"]) is None
    close_vector_store(down)
    back = down.model_copy(update={"broker_url": REDIS_URL, "inprocess_worker": True, "job_sweep_seconds": 0.2,
                                   "job_resend_after_seconds": 0.0})
    with TestClient(create_app(back)) as client:
        assert wait_for_job(client, editor, accepted["job_id"])["status"] == "ready"
    assert _sent_at(url, accepted["job_id"]) is not None
    close_vector_store(back)


def _hold_connections(server: socket.socket, held: list[socket.socket]) -> None:
    """Accept every connection and never answer, until the server closes."""
    with contextlib.suppress(OSError):
        while True:
            held.append(server.accept()[0])


def test_an_upload_while_the_broker_hangs_is_accepted_unsent(tmp_path: Path) -> None:
    """A Redis that accepts connections and never answers (hung, or half a partition) held the upload for ever (still
    waiting after 5 minutes when measured): the publish had no socket timeout. Now it gives up after
    `broker_socket_timeout_seconds` and the job waits unsent for the sweep."""
    from api.app import create_app
    from retrieval.store import close_vector_store

    silent = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    threading.Thread(target=_hold_connections, args=(silent, held), daemon=True).start()
    url, settings = _embedded(tmp_path, broker_url=f"redis://127.0.0.1:{silent.getsockname()[1]}/0")
    with TestClient(create_app(settings)) as client:
        editor, accepted = desk_member(client, "editor"), {}
        upload = threading.Thread(target=lambda: accepted.update(_upload(client, editor, 1)), daemon=True)
        upload.start()
        upload.join(timeout=120)  # a bound on hanging for ever, not a speed target
        assert not upload.is_alive(), "the upload still waits on a broker that does not answer"
        assert client.get(f"/v1/jobs/{accepted['job_id']}", headers=auth(editor)).json()["status"] == "queued"
        assert _sent_at(url, accepted["job_id"]) is None
    close_vector_store(settings)
    silent.close()
    for connection in held:  # the broker's side of the upload's tries: open for the suite's life otherwise
        connection.close()


def test_the_sweep_sends_each_unsent_job_once_and_only_after_its_grace(tmp_path: Path) -> None:
    """A job just created is left to its uploader; an older unsent one goes out once; a sent one never again."""
    from api.app import create_app
    from retrieval.store import close_vector_store
    from workers.dispatch import send_unsent

    url, settings = _embedded(tmp_path, broker_url=UNREACHABLE_BROKER)
    with TestClient(create_app(settings)) as client:
        editor = desk_member(client, "editor")
        jobs = [_upload(client, editor, n)["job_id"] for n in range(2)]
    close_vector_store(settings)
    reachable = settings.model_copy(update={"broker_url": "memory://"})
    from workers.celery_app import create_celery

    app = create_celery(reachable)
    assert send_unsent(app, older_than_seconds=3600) == 0
    assert send_unsent(app, older_than_seconds=0) == 2
    assert send_unsent(app, older_than_seconds=0) == 0
    assert memory.Channel.queues[reachable.task_queue].qsize() == 2
    assert all(_sent_at(url, job) is not None for job in jobs)
    memory.Channel.queues.pop(reachable.task_queue, None)


def _set_job(url: str, job_id: str, **values: object) -> None:
    from core.db import unit_of_work
    from core.models import IngestionJob

    with unit_of_work(url) as session:
        session.execute(update(IngestionJob).where(IngestionJob.id == job_id).values(**values))


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_govrag_ingest_run_again_takes_a_job_given_back_once_and_one_just_uploaded_never(
        database: str, make_pg_database: Callable[[], str], tmp_path: Path) -> None:
    """`govrag ingest` run again after an outage takes the document's waiting job (dispatch.take_waiting_job): one
    handed back after its run began (dispatch.give_back) at once and once, one that never ran once it is past the
    sweep's grace. A younger unsent job may be its uploader's (an API's upload, another `govrag ingest` between
    accepting a file and stamping its job), sent or run right now: taking it would run it twice."""
    from api.app import create_app
    from core.models import utcnow
    from retrieval.store import close_vector_store
    from workers.dispatch import JobsHeld, give_back, take_waiting_job

    url, settings = _on(database, make_pg_database, tmp_path)
    with TestClient(create_app(settings)) as client:
        editor = desk_member(client, "editor")
        just_uploaded, given_back, long_unsent = (_upload(client, editor, n) for n in range(3))
    close_vector_store(settings)
    memory.Channel.queues.pop(settings.task_queue, None)
    _set_job(url, just_uploaded["job_id"], sent_at=None)  # its send refused, or not made yet
    _set_job(url, given_back["job_id"], status="processing", attempts=1)  # a run of it began here, and met an outage
    _set_job(url, long_unsent["job_id"], sent_at=None, created_at=utcnow() - timedelta(hours=1))
    assert give_back(settings, [given_back["job_id"]])
    assert _job_row(url, given_back["job_id"])[0] == "queued" and _sent_at(url, given_back["job_id"]) is None

    held = JobsHeld(settings)
    try:
        assert take_waiting_job(settings, just_uploaded["document_id"], held) is None
        assert take_waiting_job(settings, given_back["document_id"], held) == given_back["job_id"]
        assert take_waiting_job(settings, given_back["document_id"], held) is None
        assert take_waiting_job(settings, long_unsent["document_id"], held) == long_unsent["job_id"]
    finally:
        held.release()
    assert _sent_at(url, just_uploaded["job_id"]) is None and _sent_at(url, given_back["job_id"]) is not None


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_a_sweep_sending_a_waiting_job_as_govrag_ingest_takes_it_leaves_it_to_one_of_them(
        database: str, make_pg_database: Callable[[], str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An API's sweep and `govrag ingest` run again may both find a job waiting unsent: the sweep reads it, publishes
    its task, then stamps it. `take_waiting_job` takes the sweep's lock, so it waits for that stamp and leaves the
    job to the worker; reading it meanwhile, it would run the job beside the worker."""
    from api.app import create_app
    from retrieval.store import close_vector_store
    from workers import dispatch
    from workers.celery_app import create_celery

    url, settings = _on(database, make_pg_database, tmp_path)
    with TestClient(create_app(settings)) as client:
        uploaded = _upload(client, desk_member(client, "editor"), 0)
    close_vector_store(settings)
    memory.Channel.queues.pop(settings.task_queue, None)
    _set_job(url, uploaded["job_id"], sent_at=None, attempts=1)  # handed back by a run of `govrag ingest`
    publishing, go_on, real_publish = threading.Event(), threading.Event(), dispatch._published

    def published_once_the_cli_waits(*args: object) -> bool:
        publishing.set()
        assert go_on.wait(60)
        return real_publish(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(dispatch, "_published", published_once_the_cli_waits)
    sent: list[int] = []
    taken: list[str | None] = []
    sweep = threading.Thread(target=lambda: sent.append(dispatch.send_unsent(create_celery(settings),
                                                                             older_than_seconds=0)), daemon=True)
    held = dispatch.JobsHeld(settings)
    cli = threading.Thread(target=lambda: taken.append(dispatch.take_waiting_job(settings, uploaded["document_id"],
                                                                                 held)), daemon=True)
    sweep.start()
    assert publishing.wait(60)
    cli.start()
    try:
        assert wait_for_a_lock_wait(url, cli) is not None  # the sweep's lock
    finally:
        go_on.set()
        sweep.join(60)
        cli.join(60)
        held.release()
    assert sent == [1] and taken == [None]
    assert memory.Channel.queues[settings.task_queue].qsize() == 1
    memory.Channel.queues.pop(settings.task_queue, None)


def test_a_job_stalled_in_processing_is_sent_again_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A run whose retries ran out while the database was down could not mark its job failed: the job stayed
    `processing` for ever. Once it is older than any run can last, the sweep sends it again, saying which ("1
    ingestion job(s) stalled" named none); a job updated recently (a run may still be going) is left alone, and a
    resent one is not sent again at the next sweep."""
    from api.app import create_app
    from core.db import unit_of_work
    from core.models import IngestionJob, utcnow
    from retrieval.store import close_vector_store
    from workers.celery_app import create_celery
    from workers.dispatch import resend_stalled, send_unsent

    url, settings = _embedded(tmp_path)
    with TestClient(create_app(settings)) as client:
        editor = desk_member(client, "editor")
        stalled, running = (_upload(client, editor, n)["job_id"] for n in range(2))
    close_vector_store(settings)
    memory.Channel.queues.pop(settings.task_queue, None)
    with unit_of_work(url) as session:
        for job_id, age in ((stalled, timedelta(hours=2)), (running, timedelta(minutes=5))):
            session.execute(update(IngestionJob).where(IngestionJob.id == job_id)
                            .values(status="processing", updated_at=utcnow() - age))
    app = create_celery(settings)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="workers.dispatch"):
        assert resend_stalled(app, stalled_after_seconds=3600) == 1
    assert _said_by_the_sweep(caplog) == [
        (logging.WARNING, f"ingestion job {stalled} stalled in processing; sending it again")]
    assert _sent_at(url, stalled) is None and _sent_at(url, running) is not None
    assert send_unsent(app, older_than_seconds=0) == 1
    assert memory.Channel.queues[settings.task_queue].qsize() == 1
    assert resend_stalled(app, stalled_after_seconds=3600) == 0  # its clock restarted with the send
    memory.Channel.queues.pop(settings.task_queue, None)


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_a_job_the_in_memory_broker_lost_is_named_and_sent_again(
        database: str, make_pg_database: Callable[[], str], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The sweep's look for lost jobs on the embedded broker, on either database (SQLite, the embedded default, runs
    its UPDATE ... RETURNING too): a job `queued` and sent whose task the broker no longer holds is marked unsent
    and named ("1 queued ingestion job(s) were no longer on the broker" named none)."""
    from api.app import create_app
    from retrieval.store import close_vector_store
    from workers.celery_app import create_celery
    from workers.dispatch import resend_lost

    url, settings = _on(database, make_pg_database, tmp_path)
    with TestClient(create_app(settings)) as client:
        lost = _upload(client, desk_member(client, "editor"), 0)["job_id"]
    close_vector_store(settings)
    memory.Channel.queues.pop(settings.task_queue, None)  # the broker lost its task
    _set_job(url, lost, sent_at=_ago(hours=1))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="workers.dispatch"):
        assert resend_lost(create_celery(settings), older_than_seconds=0) == 1
    assert _said_by_the_sweep(caplog) == [
        (logging.WARNING, f"ingestion job {lost} queued but no longer on the broker; sending it again")]
    assert _sent_at(url, lost) is None


def test_jobs_not_handed_back_in_a_database_outage_are_named_in_one_line(
        make_pg_database: Callable[[], str], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """`give_back` in a database outage logged "2 ingestion job(s) not handed back", naming none; it now says which,
    as `send_jobs` does, in one line."""
    from sqlalchemy.engine import make_url

    from tests.conftest import allow_connections
    from workers.dispatch import give_back

    url = make_pg_database()
    database = make_url(url).database
    allow_connections(database, False)
    try:
        with caplog.at_level(logging.WARNING, logger="workers.dispatch"):
            assert not give_back(_settings(tmp_path, url), ["job-1", "job-2"])
    finally:
        allow_connections(database, True)
    assert [r.getMessage() for r in caplog.records if r.name == "workers.dispatch"] == [
        "2 ingestion jobs (the first: job-1) not handed back: the database is unavailable"]


def _stored_order(url: str) -> list[str]:
    """The job ids in the order PostgreSQL stores their rows (a sequential scan's order)."""
    import psycopg

    with psycopg.connect(libpq_dsn(url)) as connection:
        return [job_id for (job_id,) in connection.execute("SELECT id FROM ingestion_jobs ORDER BY ctid")]


def _error_name(error: BaseException) -> str:
    """The database's error (psycopg's, that SQLAlchemy wraps) or the error itself, by its type's name."""
    return type(getattr(error, "orig", None) or error).__name__


def _beside_a_reindex_holding(url, settings, monkeypatch, held, name, action):  # type: ignore[no-untyped-def]
    """The real re-index of department `desk` (`queue_reindex`, every document, `serve_previous` off), paused once
    it has handed back job `held` (its row held until the re-index commits), and `action` run beside it meanwhile;
    the re-index goes on once `action` waits for a lock or is done. The outcome of each (what it returned, or its
    error by name: `_error_name`), keyed "reindex" and `name`, and what `action` waited for (None: nothing)."""
    from core.db import unit_of_work
    from ingestion import quarantine, repository

    outcomes: dict[str, object] = {}
    handed_back, go_on = threading.Event(), threading.Event()
    real_hand_back = repository.hand_back

    def hand_back_then_wait(session, job_id: str) -> bool:  # type: ignore[no-untyped-def]
        handed = real_hand_back(session, job_id)
        if job_id == held:
            handed_back.set()
            go_on.wait(60)
        return handed

    def run(key: str, call: Callable[[], object]) -> None:
        try:
            outcomes[key] = call()
        except Exception as error:  # noqa: BLE001 - told apart by the caller's assertion
            outcomes[key] = _error_name(error)

    def reindex() -> object:
        with unit_of_work(url) as session:
            return quarantine.queue_reindex(session=session, settings=settings, department="desk", document_ids=None,
                                            serve_previous=False).rerun

    monkeypatch.setattr(repository, "hand_back", hand_back_then_wait)
    reindexing = threading.Thread(target=run, args=("reindex", reindex), daemon=True)
    acting = threading.Thread(target=run, args=(name, action), daemon=True)
    waited_for = None
    try:
        reindexing.start()
        assert handed_back.wait(60)
        acting.start()
        waited_for = wait_for_a_lock_wait(url, acting, timeout=60)
    finally:
        go_on.set()
        reindexing.join(60)
        acting.join(60)
    return outcomes, waited_for


@pytest.mark.parametrize(("step", "next_round"), [("resend_stalled", 0), ("send_unsent", 1)])
def test_a_sweep_and_a_reindex_handing_back_the_same_jobs_never_deadlock(
        step: str, next_round: int, make_pg_database: Callable[[], str], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A re-index hands back the jobs of documents being ingested in the documents' row order (oldest first), each
    job's row locked until it commits; the sweep marked every stalled job unsent in one UPDATE (rows locked in the
    order they are stored) and marked the unsent jobs it sent one by one (oldest job first). Two jobs in the other
    order: each held a row the other waited for, and PostgreSQL aborted the sweep's round or the admin's re-index (a
    500). The sweep now takes only job rows nobody holds: one the re-index holds is looked at next round (stalled no
    longer, once handed back; still unsent, and sent then)."""
    from api.app import create_app
    from core.db import unit_of_work
    from core.models import Document, IngestionJob, utcnow
    from retrieval.store import close_vector_store
    from workers import dispatch
    from workers.celery_app import create_celery

    url, settings = _on("postgresql", make_pg_database, tmp_path)
    with TestClient(create_app(settings)) as client:
        editor = desk_member(client, "editor")
        uploads = [_upload(client, editor, n) for n in (0, 1)]
    documents, jobs = [upload["document_id"] for upload in uploads], [upload["job_id"] for upload in uploads]
    close_vector_store(settings)
    memory.Channel.queues.pop(settings.task_queue, None)
    long_ago = utcnow() - timedelta(hours=2)
    with unit_of_work(url) as session:  # both being ingested, their runs gone: stalled, or marked unsent since
        session.execute(update(Document).where(Document.id.in_(documents)).values(status="processing"))
        for job_id, created in ((jobs[1], long_ago), (jobs[0], long_ago + timedelta(minutes=30))):
            session.execute(update(IngestionJob).where(IngestionJob.id == job_id).values(  # job 0 stored last
                status="processing", created_at=created, updated_at=long_ago,
                sent_at=long_ago if step == "resend_stalled" else None))
    # the stall sweep's scan (storage order) and the send (oldest job first) meet document 1's job first; the
    # re-index hands back document 0's first (oldest document first)
    assert _stored_order(url) == [jobs[1], jobs[0]]
    app = create_celery(settings)
    sweep_step = {"resend_stalled": lambda: dispatch.resend_stalled(app, stalled_after_seconds=3600),
                  "send_unsent": lambda: dispatch.send_unsent(app, older_than_seconds=0)}[step]
    # the sweep waits for document 0's job row, or is done
    outcomes, _ = _beside_a_reindex_holding(url, settings, monkeypatch, jobs[0], "sweep", sweep_step)
    try:
        assert outcomes == {"reindex": jobs, "sweep": 1}, outcomes
        assert sweep_step() == next_round
    finally:
        memory.Channel.queues.pop(settings.task_queue, None)


def _a_job_stalled_a_day(tmp_path: Path):  # type: ignore[no-untyped-def]
    """An embedded deployment (its API stopped, its in-memory queue emptied) with one uploaded document whose job has
    been `processing` for a day, as a run that gave up during a database outage leaves it: (url, settings, job id)."""
    from api.app import create_app
    from core.db import unit_of_work
    from core.models import IngestionJob, utcnow
    from retrieval.store import close_vector_store

    url, settings = _embedded(tmp_path)
    with TestClient(create_app(settings)) as client:
        stalled = _upload(client, desk_member(client, "editor"), 0)["job_id"]
    close_vector_store(settings)
    memory.Channel.queues.pop(settings.task_queue, None)
    with unit_of_work(url) as session:
        session.execute(update(IngestionJob).where(IngestionJob.id == stalled)
                        .values(status="processing", updated_at=utcnow() - timedelta(days=1)))
    return url, settings, stalled


def test_a_sweep_while_redis_is_down_still_sends_a_stalled_job_again(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Looking for jobs a restarted Redis lost reads Redis: while it could not be reached the read raised and the
    sweep's round ended there, so a job stalled in `processing` (a step that needs the database only) was not sent
    again for as long as the outage lasted. Now the round goes on, and ends in `Unavailable("broker")` (for the
    Sweeper to say once) naming no address nor password, in its message, its traceback or a line logged."""
    from core.errors import Unavailable
    from workers.celery_app import create_celery
    from workers.dispatch import sweep_jobs

    url, settings, stalled = _a_job_stalled_a_day(tmp_path)
    assert _sent_at(url, stalled) is not None
    secret = uuid.uuid4().hex
    down = settings.model_copy(update={"broker_url": UNREACHABLE_BROKER.replace("://", f"://:{secret}@")})
    with caplog.at_level(logging.DEBUG, logger="workers.dispatch"), pytest.raises(Unavailable) as raised:
        sweep_jobs(create_celery(down), older_than_seconds=0)
    assert _sent_at(url, stalled) is None  # marked unsent: the sweep sends it once the broker answers
    assert raised.value.dependency == "broker"
    said = "".join(traceback.format_exception(raised.value)) + caplog.text
    assert secret not in said and "127.0.0.1" not in said


def _said_by_the_sweep(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str]]:
    """The lines above DEBUG the ingestion job sweep and its Sweeper logged: level and message."""
    return [(r.levelno, r.getMessage()) for r in caplog.records
            if r.name in ("workers.dispatch", "core.sweeper") and r.levelno > logging.DEBUG]


def test_a_broker_outage_is_one_warning_for_the_sweep_then_one_line_when_its_jobs_go_out(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """While the broker could not be reached, every sweep round (every 10 s) warned that lost jobs were not looked
    for and that a job was not sent, naming it, for as long as the outage lasted. Now the round that finds it away
    is one warning, the rounds after it DEBUG only, and the round that sends them two lines: how many went out, and
    that the sweep runs again. Nothing is lost: each job is sent, once. The warning counts nothing: a round sends at
    most 500 jobs, and only those past their grace (30 s), so the round that finds a Redis outage (its read fails
    first) has next to none to count, and the jobs it meant to count are said as they go out."""
    import redis

    from api.app import create_app
    from core.sweeper import Sweeper
    from retrieval.store import close_vector_store
    from workers.celery_app import close_celery, create_celery
    from workers.dispatch import sweep_jobs

    url, settings = _embedded(tmp_path, broker_url=UNREACHABLE_BROKER)
    with TestClient(create_app(settings)) as client:
        editor = desk_member(client, "editor")
        jobs = [_upload(client, editor, n)["job_id"] for n in range(3)]
    close_vector_store(settings)
    broker = {"app": create_celery(settings)}
    sweeper = Sweeper({"ingestion job": lambda: sweep_jobs(broker["app"], older_than_seconds=0)}, interval=60)
    queue = settings.task_queue
    try:
        with caplog.at_level(logging.DEBUG):
            caplog.clear()
            for _ in range(4):
                sweeper.run_round()
            assert _said_by_the_sweep(caplog) == [
                (logging.WARNING, "the ingestion job sweep waits for the broker: the next round tries again")]
            assert not [r for r in caplog.records if any(job in r.getMessage() for job in jobs)]
            assert all(_sent_at(url, job) is None for job in jobs)
            caplog.clear()
            broker["app"] = create_celery(settings.model_copy(update={"broker_url": REDIS_URL}))
            for _ in range(2):
                sweeper.run_round()
        sent, ran_again = _said_by_the_sweep(caplog)
        assert sent == (logging.INFO, f"sent 3 ingestion jobs (the first: {jobs[0]}) that had not reached the broker")
        assert ran_again[0] == logging.INFO
        assert re.fullmatch(r"the ingestion job sweep runs again, 4 round\(s\) and \d+ s after it failed", ran_again[1])
        assert all(_sent_at(url, job) is not None for job in jobs)
        assert sorted(_jobs_waiting_on_redis(queue)) == sorted(jobs)
    finally:
        close_celery(broker["app"])
        redis.Redis.from_url(REDIS_URL).delete(queue, f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}")


def test_a_reindex_while_the_broker_is_down_says_so_in_one_line(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A re-index sent its jobs one by one while the broker was down, each waiting out its own refusal and logging
    its own line: a department of a thousand documents, a thousand lines from one request. Now the first refusal
    ends the sending: one line counting the jobs left unsent for the sweep."""
    from api.app import create_app
    from ingestion import service as ingestion_service
    from retrieval.store import close_vector_store

    url, settings = _embedded(tmp_path, broker_url=UNREACHABLE_BROKER)
    with TestClient(create_app(settings)) as client:
        admin, editor, first = _admin_and_an_upload(client)
        for uploaded in (first, _upload(client, editor, 1), _upload(client, editor, 2)):
            ingestion_service.run_ingestion(settings=settings, document_id=uploaded["document_id"],
                                            job_id=uploaded["job_id"])
        caplog.clear()
        with caplog.at_level(logging.DEBUG, logger="workers.dispatch"):
            reindex = client.post("/v1/admin/reindex", headers=admin, json={"department": "desk"})
    close_vector_store(settings)
    assert reindex.status_code == 202, reindex.text
    queued = reindex.json()["queued"]
    assert len(queued) == 3
    assert [r.getMessage() for r in caplog.records if r.name == "workers.dispatch"] == [
        f"3 ingestion jobs (the first: {queued[0]}) not sent: the broker is unreachable; the sweep sends them once "
        "it answers"]
    assert all(_sent_at(url, job) is None for job in queued)


def test_an_upload_while_the_broker_is_down_names_its_one_job_in_words_for_one(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """One job not sent read "1 ingestion job(s) not sent (the first: ...)": now it is named as the one job it is."""
    from api.app import create_app
    from retrieval.store import close_vector_store

    url, settings = _embedded(tmp_path, broker_url=UNREACHABLE_BROKER)
    with TestClient(create_app(settings)) as client, caplog.at_level(logging.DEBUG, logger="workers.dispatch"):
        job_id = _admin_and_an_upload(client)[2]["job_id"]
    close_vector_store(settings)
    assert [r.getMessage() for r in caplog.records if r.name == "workers.dispatch"] == [
        f"ingestion job {job_id} not sent: the broker is unreachable; the sweep sends it once it answers"]
    assert _sent_at(url, job_id) is None


def _jobs_waiting_in_memory(queue: str) -> list[str]:
    from workers.dispatch import _job_id_of

    waiting = memory.Channel.queues.get(queue)
    return [] if waiting is None else [job for job in map(_job_id_of, waiting.queue) if job is not None]


@pytest.mark.parametrize("sender", ["sweep", "request"])
def test_jobs_sent_before_the_broker_refuses_are_recorded_sent_and_the_rest_go_out_once_it_answers(
        sender: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The broker taking two jobs of a sweep's round (or of one request's, a re-index's) and refusing the third: the
    two are recorded sent before the round says it waits (`Unavailable`), so the next round sends only the third:
    each job reaches the broker once, none is left behind."""
    from kombu.exceptions import OperationalError

    from api.app import create_app
    from core.errors import Unavailable
    from retrieval.store import close_vector_store
    from workers.celery_app import INGEST_TASK, create_celery
    from workers.dispatch import send_jobs, sweep_jobs

    url, settings = _embedded(tmp_path, broker_url=UNREACHABLE_BROKER)
    with TestClient(create_app(settings)) as client:
        editor = desk_member(client, "editor")
        uploads = [_upload(client, editor, n) for n in range(3)]
    close_vector_store(settings)
    jobs = [upload["job_id"] for upload in uploads]
    app = create_celery(settings.model_copy(update={"broker_url": "memory://"}))
    task, queue = app.tasks[INGEST_TASK], settings.task_queue
    publish = task.apply_async

    def the_broker_takes_two(*args: object, **kwargs: object) -> object:
        if len(_jobs_waiting_in_memory(queue)) == 2:
            raise OperationalError("the broker went away")
        return publish(*args, **kwargs)

    monkeypatch.setattr(task, "apply_async", the_broker_takes_two)
    try:
        if sender == "sweep":
            with pytest.raises(Unavailable):
                sweep_jobs(app, older_than_seconds=0)
        else:
            assert send_jobs(app, [(upload["document_id"], upload["job_id"]) for upload in uploads]) == 2
        taken = _jobs_waiting_in_memory(queue)
        assert len(taken) == 2
        assert {job for job in jobs if _sent_at(url, job) is not None} == set(taken)
        monkeypatch.undo()
        sweep_jobs(app, older_than_seconds=0)
        assert sorted(_jobs_waiting_in_memory(queue)) == sorted(jobs)
        assert all(_sent_at(url, job) is not None for job in jobs)
    finally:
        memory.Channel.queues.pop(queue, None)


def _jobs_keeping(url: str, request_ids: dict[str, str | None]) -> None:
    """Document `d` of department `desk` and one queued job of it per entry, keeping that request id."""
    from core.db import unit_of_work

    with unit_of_work(url) as session:
        session.execute(text("INSERT INTO departments (name, created_at) VALUES ('desk', CURRENT_TIMESTAMP)"))
        session.execute(text(
            "INSERT INTO documents (id, department, title, content_type, size_bytes, sha256, acl_groups, "
            "classification, status, chunk_count, uploaded_by, created_at, updated_at, flagged_chunks) VALUES "
            "('d', 'desk', 't', 'text/plain', 1, 'ab', '[]', 'internal', 'queued', 0, 'ed', CURRENT_TIMESTAMP, "
            "CURRENT_TIMESTAMP, 0)"))
        session.execute(text(
            "INSERT INTO ingestion_jobs (id, document_id, status, attempts, crashed_runs, created_at, updated_at, "
            "request_id) VALUES (:id, 'd', 'queued', 0, 0, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP, :request_id)"),
            [{"id": job_id, "request_id": request_id} for job_id, request_id in request_ids.items()])


def test_send_jobs_reads_the_kept_request_ids_a_batch_at_a_time_and_each_send_carries_its_own(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`send_jobs` sends each job with the request id its job keeps, read as it sends them a batch of jobs at a time
    (`_SWEEP_BATCH`, 2 here): one IN list of every job a large re-index queues passes the bind parameters a
    statement may have. Five jobs and one gone are read in three SELECTs; each task carries its job's id, `-` for the
    job that keeps none and for the one gone."""
    from sqlalchemy import event

    from core.db import get_engine
    from workers import dispatch
    from workers.celery_app import REQUEST_ID_HEADER, create_celery

    monkeypatch.setattr(dispatch, "_SWEEP_BATCH", 2)
    url, settings = _embedded(tmp_path)
    kept: dict[str, str | None] = {f"job-{n}": uuid.uuid4().hex for n in range(1, 6)}
    kept["job-3"] = None
    _jobs_keeping(url, kept)
    reads: list[str] = []

    def note_a_read(*args: object) -> None:
        statement = str(args[2])
        if statement.startswith("SELECT") and "ingestion_jobs.request_id" in statement:
            reads.append(statement)

    jobs = [("d", job_id) for job_id in [*kept, "gone"]]
    engine = get_engine(url)
    event.listen(engine, "before_cursor_execute", note_a_read)
    try:
        assert dispatch.send_jobs(create_celery(settings), jobs) == len(jobs)
    finally:
        event.remove(engine, "before_cursor_execute", note_a_read)
    try:
        waiting = memory.Channel.queues[settings.task_queue].queue
        carried = {dispatch._job_id_of(message): message["headers"][REQUEST_ID_HEADER] for message in waiting}
    finally:
        memory.Channel.queues.pop(settings.task_queue, None)
    assert carried == {**{job_id: request_id or "-" for job_id, request_id in kept.items()}, "gone": "-"}
    assert len(reads) == 3


def test_the_kept_request_ids_of_more_jobs_than_postgresql_takes_bind_parameters_are_read(
        make_pg_database: Callable[[], str], tmp_path: Path) -> None:
    """A re-index of a large department sends more jobs than PostgreSQL takes bind parameters in one statement
    (65,535; psycopg refuses to send more): `send_jobs` reads their ids a batch at a time. The ids of 65,536 jobs
    are read as it reads them; three of them are in the database (the first, one in the middle and the last, which
    one IN list would put past the limit), the rest are gone (a job gone is read as keeping none)."""
    from workers.dispatch import _batches_with_stored_request_ids

    url, settings = _on("postgresql", make_pg_database, tmp_path)
    count = 65_536
    kept = {f"job-{n}": uuid.uuid4().hex for n in (1, count // 2, count)}
    _jobs_keeping(url, kept)
    read = {job_id: request_id
            for batch in _batches_with_stored_request_ids(settings, [("d", f"job-{n}") for n in range(1, count + 1)])
            for _, job_id, request_id in batch}
    assert len(read) == count
    assert {job_id: request_id for job_id, request_id in read.items() if request_id is not None} == kept


@contextlib.contextmanager
def _stamps(url: str) -> Iterator[list[str]]:
    """The statements that stamp jobs sent (`sent_at`) run on `url`'s engine within the block."""
    from sqlalchemy import event

    from core.db import get_engine

    stamps: list[str] = []

    def note_a_stamp(*args: object) -> None:
        statement = str(args[2])
        if statement.startswith("UPDATE ingestion_jobs SET") and "sent_at=" in statement:
            stamps.append(statement)

    engine = get_engine(url)
    event.listen(engine, "before_cursor_execute", note_a_stamp)
    try:
        yield stamps
    finally:
        event.remove(engine, "before_cursor_execute", note_a_stamp)


def _stamped(url: str, jobs: list[str]) -> list[str]:
    return [job for job in jobs if _sent_at(url, job) is not None]


def test_send_jobs_stamps_the_jobs_it_sends_a_batch_at_a_time(
        make_pg_database: Callable[[], str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`send_jobs` stamped each job sent in a transaction of its own (~15 ms a job: a re-index of tens of thousands
    of documents held its request open for minutes); it now publishes a batch (`_SWEEP_BATCH`, 2 here), then stamps
    the batch in one statement. Five jobs on PostgreSQL: all five on the broker and stamped, in three statements."""
    from workers import dispatch
    from workers.celery_app import create_celery

    monkeypatch.setattr(dispatch, "_SWEEP_BATCH", 2)
    url, settings = _on("postgresql", make_pg_database, tmp_path)
    jobs = [f"job-{n}" for n in range(1, 6)]
    _jobs_keeping(url, dict.fromkeys(jobs))
    try:
        with _stamps(url) as stamps:
            assert dispatch.send_jobs(create_celery(settings), [("d", job) for job in jobs]) == 5
        assert sorted(_jobs_waiting_in_memory(settings.task_queue)) == jobs
    finally:
        memory.Channel.queues.pop(settings.task_queue, None)
    assert _stamped(url, jobs) == jobs
    assert len(stamps) == 3  # main: 5


def test_a_redis_refusing_midway_leaves_the_jobs_sent_before_it_stamped_and_the_rest_unsent(
        make_pg_database: Callable[[], str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """Real Redis, through an endpoint that hangs as the fourth of five jobs is published (batches of 2): the
    breaker opens and the send stops there. The three jobs that reached Redis are stamped (the third by its batch's
    statement, though its batch was cut short), the fourth and fifth are left unsent for the sweep, and one line says
    so."""
    import json

    from core import broker
    from core.settings import Settings
    from tests.support.hung_redis import redis_that_hangs
    from workers import dispatch
    from workers.celery_app import INGEST_TASK, close_celery, create_celery

    monkeypatch.setattr(dispatch, "_SWEEP_BATCH", 2)
    monkeypatch.setattr(broker, "REDIS_COOL_DOWN_SECONDS", 3600.0)
    url, _ = _on("postgresql", make_pg_database, tmp_path)
    jobs = [f"job-{n}" for n in range(1, 6)]
    _jobs_keeping(url, dict.fromkeys(jobs))
    with redis_that_hangs() as (endpoint, real, broker_url):
        endpoint.hung = False
        app = create_celery(Settings(data_dir=tmp_path / "data", database_url=url, broker_url=broker_url,
                                     broker_socket_timeout_seconds=1.5, task_queue=f"midway-{uuid.uuid4().hex[:8]}"))
        task, queue = app.tasks[INGEST_TASK], app.govrag_settings.task_queue
        publish = task.apply_async

        def redis_hangs_at_the_fourth(*args: object, **kwargs: object) -> object:
            endpoint.hung = real.llen(queue) == 3
            return publish(*args, **kwargs)

        monkeypatch.setattr(task, "apply_async", redis_hangs_at_the_fourth)
        try:
            with _stamps(url) as stamps, caplog.at_level(logging.INFO, logger="workers.dispatch"):
                assert dispatch.send_jobs(app, [("d", job) for job in jobs]) == 3
            on_redis = sorted(dispatch._job_id_of(json.loads(raw)) for raw in real.lrange(queue, 0, -1))
        finally:
            close_celery(app)
            real.delete(*real.keys(f"*{queue}*"))
    assert on_redis == jobs[:3]
    assert _stamped(url, jobs) == jobs[:3]
    assert len(stamps) == 2  # main: 3
    assert [r.getMessage() for r in caplog.records if r.name == "workers.dispatch"] == [
        "2 ingestion jobs (the first: job-4) not sent: the broker is unreachable; the sweep sends them once it answers"]


def _the_database_goes_at_the_third(app, database: str,  # type: ignore[no-untyped-def]
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The test database stops taking connections as `app` publishes its third task (to the memory broker), which is
    then published as ever."""
    from tests.conftest import allow_connections
    from workers.celery_app import INGEST_TASK

    task, queue = app.tasks[INGEST_TASK], app.govrag_settings.task_queue
    publish = task.apply_async

    def the_database_goes_at_the_third(*args: object, **kwargs: object) -> object:
        if len(_jobs_waiting_in_memory(queue)) == 2:
            allow_connections(database, False)
        return publish(*args, **kwargs)

    monkeypatch.setattr(task, "apply_async", the_database_goes_at_the_third)


def test_a_database_gone_as_a_batch_is_stamped_loses_no_job(
        make_pg_database: Callable[[], str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """PostgreSQL stops taking connections as the second batch (of 2) is published: its stamp fails, and `send_jobs`
    raises the database's outage. Nothing is lost: the first batch is stamped; the second's two jobs, on the broker
    and unstamped, and the fifth, never published, are left unsent, and the sweep, once the database is back, sends
    all three: the second batch's jobs reach the broker twice (a second delivery of a job its first run ended, or
    is running, is a duplicate its worker's claim makes harmless: ingestion/service.py `_start`), none is left."""
    from core.errors import unavailable_dependency
    from tests.conftest import allow_connections
    from workers import dispatch
    from workers.celery_app import create_celery

    monkeypatch.setattr(dispatch, "_SWEEP_BATCH", 2)
    url, settings = _on("postgresql", make_pg_database, tmp_path)
    database = url.rsplit("/", 1)[1]
    jobs = [f"job-{n}" for n in range(1, 6)]
    _jobs_keeping(url, dict.fromkeys(jobs))
    app = create_celery(settings)
    queue = settings.task_queue
    _the_database_goes_at_the_third(app, database, monkeypatch)
    try:
        with pytest.raises(Exception) as gone:
            dispatch.send_jobs(app, [("d", job) for job in jobs])
        allow_connections(database, True)
        assert unavailable_dependency(gone.value) == "database"
        assert sorted(_jobs_waiting_in_memory(queue)) == jobs[:4]  # main: the 3rd's stamp failed before the 4th went
        assert _stamped(url, jobs) == jobs[:2]
        monkeypatch.undo()
        dispatch.sweep_jobs(app, older_than_seconds=0)
        assert sorted(_jobs_waiting_in_memory(queue)) == sorted([*jobs, "job-3", "job-4"])
        assert _stamped(url, jobs) == jobs
    finally:
        allow_connections(database, True)
        memory.Channel.queues.pop(queue, None)


@pytest.mark.parametrize("database_goes", [False, True])
def test_a_publish_raising_midway_stamps_the_jobs_of_its_batch_published_before_it(
        database_goes: bool, make_pg_database: Callable[[], str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """A publish that raises rather than refuses (`_published` takes only the broker's failures for a refusal): here
    kombu's real `EncodeError` for the third of five jobs, whose task JSON cannot carry. The batch's stamp came after
    its publishing, so the two jobs already on the broker were never stamped and the sweep sent them again; now they
    are stamped and the error propagates. With the database gone too (as the third is published) their stamp fails:
    the publishing error still propagates, not the database's, and a warning says the two were left unstamped."""
    from kombu.exceptions import EncodeError

    from tests.conftest import allow_connections
    from workers import dispatch
    from workers.celery_app import create_celery

    url, settings = _on("postgresql", make_pg_database, tmp_path)
    database = url.rsplit("/", 1)[1]
    jobs = [f"job-{n}" for n in range(1, 6)]
    _jobs_keeping(url, dict.fromkeys(jobs))
    app = create_celery(settings)
    queue = settings.task_queue
    if database_goes:
        _the_database_goes_at_the_third(app, database, monkeypatch)
    unserialisable = object()  # no JSON for it: kombu's serializer raises EncodeError, no refusal of the broker
    try:
        with pytest.raises(EncodeError), caplog.at_level(logging.WARNING, logger="workers.dispatch"):
            dispatch.send_jobs(app, [(unserialisable if job == "job-3" else "d", job) for job in jobs])
        allow_connections(database, True)
        assert sorted(_jobs_waiting_in_memory(queue)) == jobs[:2]
        assert _stamped(url, jobs) == ([] if database_goes else jobs[:2])  # main: [] either way
        assert [r.getMessage() for r in caplog.records if r.name == "workers.dispatch"] == (
            ["2 ingestion jobs (the first: job-1) published but not stamped (database): the sweep sends them again"]
            if database_goes else [])
    finally:
        allow_connections(database, True)
        memory.Channel.queues.pop(queue, None)


@pytest.mark.parametrize("raised", [RuntimeError, KeyboardInterrupt])
def test_a_sweep_whose_publish_raises_midway_stamps_the_jobs_it_published_and_never_sends_them_again(
        raised: type[BaseException], make_pg_database: Callable[[], str], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The sweep's round publishing five unsent jobs, the broker's channel raising an error of its own (not one kombu
    makes a refusal of) at the third: the round's transaction rolled back, the two jobs already on the broker stayed
    unsent, and each later round sent them again, for as long as the third failed. Now the two are stamped, the
    error propagates (the round fails), and the next round sends only the three left: each job reaches the broker
    once. The failure is injected where the broker takes the message (kombu's in-memory channel): nothing that
    reaches a broker raises anything but a refusal (`_published`). Raised as a bug would be (RuntimeError), and as
    an interrupt (KeyboardInterrupt, which is no Exception: Ctrl-C midway)."""
    from workers import dispatch
    from workers.celery_app import create_celery

    url, settings = _on("postgresql", make_pg_database, tmp_path)
    jobs = [f"job-{n}" for n in range(1, 6)]
    _jobs_keeping(url, dict.fromkeys(jobs))
    app, queue = create_celery(settings), settings.task_queue
    put = memory.Channel._put

    def raising_at_the_third(channel: memory.Channel, *args: object, **kwargs: object) -> None:
        if len(_jobs_waiting_in_memory(queue)) == 2:
            raise raised("the broker's channel failed")
        put(channel, *args, **kwargs)

    monkeypatch.setattr(memory.Channel, "_put", raising_at_the_third)
    try:
        with pytest.raises(raised):
            dispatch.sweep_jobs(app, older_than_seconds=0)
        taken = _jobs_waiting_in_memory(queue)
        assert len(taken) == 2
        assert _stamped(url, jobs) == sorted(taken)  # main: []
        monkeypatch.undo()
        dispatch.sweep_jobs(app, older_than_seconds=0)
        assert sorted(_jobs_waiting_in_memory(queue)) == jobs  # main: the two taken first, twice
        assert _stamped(url, jobs) == jobs
    finally:
        memory.Channel.queues.pop(queue, None)


@pytest.mark.parametrize("documents", [2, 1])
def test_a_batch_stamp_and_a_reindex_handing_back_the_same_jobs_never_deadlock(
        documents: int, make_pg_database: Callable[[], str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`send_jobs` stamps a batch of jobs in one statement, holding each row it stamps until it commits; a re-index
    hands back the runs of the documents being ingested in their documents' row order (oldest first), a document's
    jobs oldest first, each row held until it commits. Two jobs (of two documents, or two runs of one) that the
    stamp's plain UPDATE met in the other order (the older one's id greater and its row stored last): the stamp held
    the younger one's row waiting for the older one's, the re-index held the older one's waiting for the younger
    one's, and PostgreSQL aborted one of them (the admin's 500, or the stamps lost). The stamp locks them in the
    re-index's order (`_mark_sent`): it waits for the older one's row holding none, and both commit."""
    from api.app import create_app
    from core.db import unit_of_work
    from core.models import Document, IngestionJob, utcnow
    from retrieval.store import close_vector_store
    from workers import dispatch
    from workers.celery_app import create_celery

    url, settings = _on("postgresql", make_pg_database, tmp_path)
    with TestClient(create_app(settings)) as client:
        editor = desk_member(client, "editor")
        uploads = [_upload(client, editor, n) for n in range(documents)]
    close_vector_store(settings)
    memory.Channel.queues.pop(settings.task_queue, None)
    long_ago = utcnow() - timedelta(hours=2)
    with unit_of_work(url) as session:  # each document being ingested; one of them with a second run
        session.execute(update(Document).values(status="processing"))
        if documents == 1:
            session.add(IngestionJob(id=str(uuid.uuid4()), document_id=uploads[0]["document_id"],
                                     status="processing"))
    with unit_of_work(url) as session:
        rows = session.execute(select(IngestionJob.id, IngestionJob.document_id)).all()
        (younger, younger_document), (older, older_document) = sorted(rows)  # the older one: the greater id
        for document_id, created in ((younger_document, long_ago + timedelta(minutes=1)),
                                     (older_document, long_ago)):
            session.execute(update(Document).where(Document.id == document_id).values(created_at=created))
        for job_id, created in ((younger, long_ago + timedelta(minutes=1)), (older, long_ago)):  # older stored last
            session.execute(update(IngestionJob).where(IngestionJob.id == job_id).values(
                status="processing", created_at=created, updated_at=long_ago, sent_at=None))
    assert _stored_order(url) == [younger, older]
    app = create_celery(settings)
    both = [(younger_document, younger), (older_document, older)]
    outcomes, waited_for = _beside_a_reindex_holding(url, settings, monkeypatch, older, "send",
                                                     lambda: dispatch.send_jobs(app, both))
    try:
        assert waited_for in ("transactionid", "tuple")  # the older job's row
        assert outcomes == {"reindex": [older, younger], "send": 2}, outcomes
        assert sorted(_jobs_waiting_in_memory(settings.task_queue)) == sorted([younger, older])
        assert all(_sent_at(url, job_id) is not None for job_id in (younger, older))
    finally:
        memory.Channel.queues.pop(settings.task_queue, None)


def test_a_sweep_whose_redis_refuses_its_read_still_sends_a_stalled_job_again(tmp_path: Path) -> None:
    """Redis reached but refusing the read that looks for lost jobs (an ACL granting the commands Celery uses and not
    LRANGE: NOPERM) ended the sweep's round there: a job stalled in `processing` was never sent again. The refusal
    still fails the round (a misconfiguration, logged with its traceback), once its other steps have run."""
    import redis
    from redis.exceptions import NoPermissionError

    from workers.celery_app import close_celery, create_celery
    from workers.dispatch import sweep_jobs

    url, settings, stalled = _a_job_stalled_a_day(tmp_path)
    admin, queue = redis.Redis.from_url(REDIS_URL), settings.task_queue
    user, password = f"govrag-test-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    admin.acl_setuser(user, enabled=True, passwords=[f"+{password}"], keys=["*"], channels=["*"],
                      commands=["+@all", "-lrange"])
    try:
        refusing = settings.model_copy(update={"broker_url": REDIS_URL.replace("://", f"://{user}:{password}@")})
        app = create_celery(refusing)
        with pytest.raises(NoPermissionError):
            sweep_jobs(app, older_than_seconds=0)
        close_celery(app)
        assert admin.llen(queue) == 1  # the stalled job, sent again
    finally:
        admin.acl_deluser(user)
        admin.delete(queue, f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}")


def test_jobs_a_restarted_redis_lost_are_sent_again(make_pg_database: Callable[[], str], tmp_path: Path) -> None:
    """A Redis without persistence that restarts loses the tasks it held; their documents stayed `queued` for ever.
    While tasks still wait on the broker nothing is touched; once it holds none, the queued jobs are sent again."""
    import redis

    from api.app import create_app
    from core import migrate
    from retrieval.store import close_vector_store
    from workers.celery_app import create_celery
    from workers.dispatch import resend_lost

    url = make_pg_database()
    migrate.upgrade(url)
    broker = REDIS_URL.rsplit("/", 1)[0] + "/7"  # a database of its own: the restart below empties it
    redis.Redis.from_url(broker).flushdb()
    settings = _settings(tmp_path / "data", url, broker_url=broker, inprocess_worker=False, job_sweep_seconds=0)
    with TestClient(create_app(settings)) as client:
        editor = desk_member(client, "editor")
        jobs = [_upload(client, editor, n)["job_id"] for n in range(2)]
    close_vector_store(settings)
    assert resend_lost(create_celery(settings), older_than_seconds=0) == 0  # both still wait on the broker
    redis.Redis.from_url(broker).flushdb()  # what a restart without persistence leaves
    restarted = settings.model_copy(update={"inprocess_worker": True, "job_sweep_seconds": 0.2,
                                            "job_resend_after_seconds": 0.0})
    with TestClient(create_app(restarted)) as client:
        assert [wait_for_job(client, editor, job)["status"] for job in jobs] == ["ready"] * 2
    close_vector_store(restarted)


def test_a_job_redis_lost_is_sent_again_while_other_tasks_wait_and_one_on_the_broker_is_not(
        make_pg_database: Callable[[], str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """Lost jobs were looked for only when Redis held no task at all: on a busy deployment new uploads kept the queue
    non-empty, and a job a restart lost stayed `queued` for ever. Now each job is looked for: one whose task is gone
    is sent again (once), one whose task waits in the queue or is held unacknowledged by a worker is not. When the
    broker holds more tasks than a sweep reads, nothing is marked and the warning gives counts only."""
    import redis

    from api.app import create_app
    from core import migrate
    from retrieval.store import close_vector_store
    from workers import dispatch
    from workers.celery_app import create_celery

    url = make_pg_database()
    migrate.upgrade(url)
    broker = REDIS_URL.rsplit("/", 1)[0] + "/8"  # a database of its own; only this test's keys are removed
    settings = _settings(tmp_path / "data", url, broker_url=broker, inprocess_worker=False, job_sweep_seconds=0)
    monkeypatch.setattr(dispatch, "_BROKER_PAGE", 1)  # several pages even for a few tasks
    app, queue = create_celery(settings), settings.task_queue
    with TestClient(create_app(settings)) as client, app.connection_for_write() as connection:
        editor = desk_member(client, "editor")
        taken = _upload(client, editor, 0)["job_id"]
        held = connection.default_channel.basic_get(queue, no_ack=False)  # a worker took it and has not acked
        try:
            assert held.decode()[0][1] == taken
            lost = _upload(client, editor, 1)["job_id"]
            redis.Redis.from_url(broker).delete(queue)  # what a restart without persistence left of its task
            waiting = [_upload(client, editor, n)["job_id"] for n in (2, 3)]
            read_limit = dispatch._BROKER_READ_LIMIT
            monkeypatch.setattr(dispatch, "_BROKER_READ_LIMIT", 1)
            with caplog.at_level(logging.WARNING, logger="workers.dispatch"):
                assert dispatch.resend_lost(app, older_than_seconds=0) == 0
            assert "more than 1 tasks wait on the broker" in caplog.text
            assert not any(job in caplog.text for job in (taken, lost, *waiting))
            monkeypatch.setattr(dispatch, "_BROKER_READ_LIMIT", read_limit)
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="workers.dispatch"):
                assert dispatch.resend_lost(app, older_than_seconds=0) == 1
            assert _said_by_the_sweep(caplog) == [
                (logging.WARNING, f"ingestion job {lost} queued but no longer on the broker; sending it again")]
            assert _sent_at(url, lost) is None
            assert all(_sent_at(url, job) is not None for job in (taken, *waiting))
            assert dispatch.send_unsent(app, older_than_seconds=0) == 1
            assert dispatch.resend_lost(app, older_than_seconds=0) == 0  # its task waits again: not sent twice
        finally:
            held.ack()
            redis.Redis.from_url(broker).delete(queue, f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}")
    close_vector_store(settings)


def test_looking_for_lost_jobs_waits_for_no_job_row_another_transaction_holds(
        make_pg_database: Callable[[], str], tmp_path: Path) -> None:
    """Marking lost jobs unsent was one UPDATE of every queued job Redis no longer held: it waited for each row
    another transaction held (a claim, a hand-back) while holding the rows it had already marked, as the stall sweep
    did when it deadlocked with a re-index. It now marks only the jobs nobody holds; a held one is looked at next
    round."""
    import psycopg
    import redis

    from api.app import create_app
    from core import migrate
    from retrieval.store import close_vector_store
    from workers import dispatch
    from workers.celery_app import create_celery

    url = make_pg_database()
    migrate.upgrade(url)
    broker = REDIS_URL.rsplit("/", 1)[0] + "/8"  # a database of its own; only this test's keys are removed
    settings = _settings(tmp_path / "data", url, broker_url=broker, inprocess_worker=False, job_sweep_seconds=0)
    app, queue, marked = create_celery(settings), settings.task_queue, []
    try:
        with TestClient(create_app(settings)) as client:
            editor = desk_member(client, "editor")
            held, free = (_upload(client, editor, n)["job_id"] for n in (0, 1))
        redis.Redis.from_url(broker).delete(queue)  # what a restart without persistence left of their tasks
        sweep = threading.Thread(target=lambda: marked.append(dispatch.resend_lost(app, older_than_seconds=0)))
        with psycopg.connect(libpq_dsn(url)) as holder:
            holder.execute("SELECT id FROM ingestion_jobs WHERE id = %s FOR UPDATE", (held,))
            sweep.start()
            waited_for = wait_for_a_lock_wait(url, sweep, timeout=60)
            holder.rollback()
        sweep.join(60)
        assert waited_for is None and marked == [1], (waited_for, marked)
        assert _sent_at(url, free) is None and _sent_at(url, held) is not None
        assert dispatch.resend_lost(app, older_than_seconds=0) == 1  # the next round
    finally:
        redis.Redis.from_url(broker).delete(queue, f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}")
        close_vector_store(settings)


def test_a_job_govrag_ingest_holds_stays_held_past_the_servers_idle_in_transaction_timeout(
        make_pg_database: Callable[[], str], tmp_path: Path) -> None:
    """`govrag ingest`'s hold (dispatch.JobsHeld) is a transaction left idle for a file's whole run: a server (or a
    database, or a role) with an `idle_in_transaction_session_timeout` ended it once idle that long, the hold gone
    unseen (the sweep sent the job the CLI was running to a worker as stalled) and its connection with it (the next
    hold, an e-mail's attachment's, raised: the file failed). Those timeouts are now off for the holding transaction
    alone."""
    import psycopg

    from api.app import create_app
    from core.db import get_engine, unit_of_work
    from core.models import IngestionJob, utcnow
    from retrieval.store import close_vector_store
    from tests.support.polling import wait_until
    from workers.celery_app import create_celery
    from workers.dispatch import JobsHeld, resend_stalled

    url, settings = _on("postgresql", make_pg_database, tmp_path)
    with TestClient(create_app(settings)) as client:
        editor = desk_member(client, "editor")
        running, next_one = (_upload(client, editor, n)["job_id"] for n in range(2))
    close_vector_store(settings)
    memory.Channel.queues.pop(settings.task_queue, None)
    with unit_of_work(url) as session:  # both taken by the CLI, their runs as long as a worker's could last
        session.execute(update(IngestionJob).values(status="processing", updated_at=utcnow() - timedelta(days=1)))
    with psycopg.connect(libpq_dsn(url), autocommit=True) as admin:
        admin.execute(f"ALTER DATABASE {admin.info.dbname} SET idle_in_transaction_session_timeout = '100ms'")

        def holding_idle_past_the_timeout() -> bool:  # or ended by the server
            return not admin.execute("SELECT 1 FROM pg_stat_activity WHERE datname = current_database() AND state = "
                                     "'idle in transaction' AND clock_timestamp() - state_change < interval '1 s'"
                                     ).fetchall()

        get_engine(url).dispose()  # its pooled connections predate the setting
        held = JobsHeld(settings)
        try:
            held.hold(running)
            wait_until(holding_idle_past_the_timeout, 30, "the hold idle past the server's timeout")
            held.hold(next_one)
            assert resend_stalled(create_celery(settings), stalled_after_seconds=0) == 0
        finally:
            held.release()
    assert resend_stalled(create_celery(settings), stalled_after_seconds=0) == 2  # released: the sweep's again


def _falcon_upload(client: TestClient, editor: str, n: int) -> dict[str, str]:
    """An upload the policy `_restrict_falcon_and_reindex` sets quarantines, and the default policy does not."""
    text = "\n\n".join(f"Section {k}. The facilities team reviewed the lifts of building {k + n}." for k in range(60))
    response = client.post("/v1/documents", headers=auth(editor), data={"department": "desk"},
                           files={"file": (f"falcon-{n}.txt", f"{text}\n\nProject Falcon starts in May.".encode())})
    assert response.status_code == 202, response.text
    return response.json()  # type: ignore[no-any-return]


def _restrict_falcon_and_reindex(client: TestClient) -> dict[str, object]:
    """The admin's policy change (Project Falcon is restricted) and the re-index that follows it; its answer."""
    admin = auth(client.app.state.dev_issuer.issue(PLATFORM_ADMIN, []))  # type: ignore[attr-defined]
    policy = client.put("/v1/admin/departments/desk/ingestion-policy", headers=admin,
                        json={"keywords": {"project falcon": "restricted"}})
    assert policy.status_code == 200, policy.text
    reindex = client.post("/v1/admin/reindex", headers=admin, json={"department": "desk"})
    assert reindex.status_code == 202, reindex.text
    return reindex.json()  # type: ignore[no-any-return]


def _ago(**delta: float) -> object:
    from core.models import utcnow

    return utcnow() - timedelta(**delta)


def _jobs_waiting_on_the_memory_broker(queue: str) -> list[str]:
    from workers.dispatch import _job_id_of

    waiting = memory.Channel.queues.get(queue)
    return [] if waiting is None else [job for job in map(_job_id_of, list(waiting.queue)) if job is not None]


def _jobs_waiting_on_redis(queue: str) -> list[str]:
    import json

    import redis

    from workers.dispatch import _job_id_of

    raw = redis.Redis.from_url(REDIS_URL).lrange(queue, 0, -1)
    return [job for job in (_job_id_of(json.loads(entry)) for entry in raw) if job is not None]


@pytest.mark.parametrize("broker", ["memory://", REDIS_URL])
def test_a_job_a_reindex_hands_back_after_its_run_died_runs_again_under_the_new_rules(
        broker: str, make_pg_database: Callable[[], str], tmp_path: Path) -> None:
    """A job left `processing` with no run behind it (its run gave up while the database was down and could not
    record it, its task acknowledged) that a re-index handed back was `queued` and marked sent: the stall sweep looks
    at `processing` jobs only, the send at unsent ones, and lost tasks were looked for on Redis only, so on the
    embedded broker nothing ran it until the API's next start, its document `processing` until then. The sweep now
    finds its task neither waiting on the in-memory broker nor held by the in-process worker, as it finds one gone
    from Redis, and sends it again; it runs under the rules the re-index followed."""
    import redis

    from api.app import create_app
    from core.db import unit_of_work
    from core.models import Document, IngestionJob
    from retrieval.store import close_vector_store
    from workers.dispatch import sweep_jobs
    from workers.inprocess import InProcessWorker

    url, settings = _on("postgresql", make_pg_database, tmp_path)
    settings = settings.model_copy(update={"broker_url": broker})
    queue = settings.task_queue
    waiting_jobs = _jobs_waiting_on_the_memory_broker if broker == "memory://" else _jobs_waiting_on_redis
    try:
        with TestClient(create_app(settings)) as client:
            editor = desk_member(client, "editor")
            uploaded = _falcon_upload(client, editor, 0)
            memory.Channel.queues.pop(queue, None)  # the worker took its task, and the run gave up since
            redis.Redis.from_url(REDIS_URL).delete(queue)
            an_hour_ago = _ago(hours=1)
            with unit_of_work(url) as session:
                session.execute(update(Document).where(Document.id == uploaded["document_id"])
                                .values(status="processing"))
                session.execute(update(IngestionJob).where(IngestionJob.id == uploaded["job_id"]).values(
                    status="processing", attempts=1, created_at=an_hour_ago, sent_at=an_hour_ago,
                    updated_at=_ago(minutes=10)))
            assert _restrict_falcon_and_reindex(client) == {"queued": [uploaded["job_id"]], "skipped": []}
            celery = client.app.state.celery  # type: ignore[attr-defined]
            sweep_jobs(celery, older_than_seconds=settings.job_resend_after_seconds)
            assert waiting_jobs(queue) == [uploaded["job_id"]]
            worker = InProcessWorker(celery)
            worker.start()
            job = wait_for_job(client, editor, uploaded["job_id"])
            worker.stop()
    finally:
        close_vector_store(settings)
        memory.Channel.queues.pop(queue, None)
        redis.Redis.from_url(REDIS_URL).delete(queue, f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}")
    assert job["status"] == "quarantined", job  # the new policy's level
    assert _job_row(url, uploaded["job_id"]) == ("quarantined", None, 2, 0)


def test_looking_for_lost_jobs_on_the_in_memory_broker_leaves_a_job_running_or_waiting_there(
        make_pg_database: Callable[[], str], tmp_path: Path) -> None:
    """Two jobs handed back by a re-index, sent long ago, are not lost and are not sent twice: one whose run the
    in-process worker still runs (it goes round again itself, under the new rules), and one whose task still waits
    on the in-memory broker behind it (a long queue)."""
    from api.app import create_app
    from retrieval.store import close_vector_store
    from workers import dispatch
    from workers.inprocess import InProcessWorker

    url, settings = _on("postgresql", make_pg_database, tmp_path)
    try:
        with TestClient(create_app(settings)) as client:
            editor = desk_member(client, "editor")
            running, waiting = (_falcon_upload(client, editor, n) for n in (0, 1))
            celery = client.app.state.celery  # type: ignore[attr-defined]
            worker = InProcessWorker(celery)
            worker.start()  # takes the first task; the second waits behind it
            with _hold_document_row(url, running["job_id"], running["document_id"]):
                rerun = _restrict_falcon_and_reindex(client)["queued"]
                for job in (running, waiting):
                    _set_job(url, job["job_id"], sent_at=_ago(hours=1))
                assert _jobs_waiting_on_the_memory_broker(settings.task_queue) == [waiting["job_id"]]
                lost = dispatch.resend_lost(celery, older_than_seconds=0)
            jobs = [wait_for_job(client, editor, job["job_id"]) for job in (running, waiting)]
            worker.stop()
    finally:
        close_vector_store(settings)
        memory.Channel.queues.pop(settings.task_queue, None)
    assert sorted(rerun) == sorted([running["job_id"], waiting["job_id"]])  # type: ignore[type-var]
    assert lost == 0
    assert [job["status"] for job in jobs] == ["quarantined"] * 2
    assert _job_row(url, running["job_id"]) == ("quarantined", None, 2, 0)  # its run went round once, no crash




def test_looking_for_lost_jobs_on_the_in_memory_broker_leaves_a_retry_waiting_out_its_countdown(
        make_pg_database: Callable[[], str], tmp_path: Path) -> None:
    """A run that failed cleanly hands its job back (`queued`, still marked sent) and publishes its retry with a
    countdown: the in-process worker takes that task off the queue and holds it until then. The job is not lost:
    sent again, it would run twice."""
    from celery.worker import state as worker_state

    from api.app import create_app
    from retrieval.store import close_vector_store
    from workers import dispatch
    from workers.celery_app import INGEST_TASK
    from workers.inprocess import InProcessWorker

    url, settings = _on("postgresql", make_pg_database, tmp_path)
    try:
        with TestClient(create_app(settings)) as client:
            uploaded = _upload(client, desk_member(client, "editor"), 0)
            memory.Channel.queues.pop(settings.task_queue, None)  # its first run took the task, and failed
            _set_job(url, uploaded["job_id"], attempts=1, sent_at=_ago(hours=1))  # handed back, `queued`
            celery = client.app.state.celery  # type: ignore[attr-defined]
            celery.tasks[INGEST_TASK].apply_async(args=[uploaded["document_id"], uploaded["job_id"]], countdown=3600)
            worker = InProcessWorker(celery)
            worker.start()
            deadline = time.monotonic() + 60  # its request recorded: off the queue is not yet held
            while uploaded["job_id"] not in {str(request.args[1]) for request in worker_state.requests.values()}:
                assert time.monotonic() < deadline, "the worker did not take the retry"
                time.sleep(0.02)
            lost = dispatch.resend_lost(celery, older_than_seconds=0)
            worker.stop()
    finally:
        close_vector_store(settings)
        memory.Channel.queues.pop(settings.task_queue, None)
    assert lost == 0
    assert _sent_at(url, uploaded["job_id"]) is not None and _job_row(url, uploaded["job_id"])[0] == "queued"
