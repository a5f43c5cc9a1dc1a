"""`govrag reindex`: the API's re-index in bulk for operators, through the command's entry point against a PostgreSQL
database of the test's own (`cli_env`: department hr) and the embedded vector store of its data dir."""

from __future__ import annotations

import json
import sys
import uuid
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import func, select, text, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from api.cli import main
from audit.schemas import AdminEventType
from authz import service as authz_service
from core.db import unit_of_work
from core.keystore import keystore_for
from core.models import Document, DocumentStatus, IngestionJob, RetrievalEvent
from core.settings import get_settings
from guard.injection import get_scanner
from retrieval.store import VectorPoint, open_vector_store

OLD_SCANNER = "0123456789abcdef"  # a version no shipped scanner has


def _document(url: str, *, department: str = "hr", status: str = DocumentStatus.ready, served: int | None = 1,
              unbound_through: int = 0, maps_unbound_through: int = 0, job: bool = False) -> str:
    """A document row as a run left it: serving generation `served` (its chunks sealed before 0020 when it is at most
    `unbound_through`, its placeholder map before 0021 when at most `maps_unbound_through`), with a job queued when it
    is being ingested (`job`)."""
    document_id = str(uuid.uuid4())
    with unit_of_work(url) as session:
        session.add(Document(id=document_id, department=department, title="t", content_type="text/plain",
                             size_bytes=1, sha256=uuid.uuid4().hex * 2, uploaded_by="tester", status=status,
                             index_generation=max(served or 0, unbound_through, maps_unbound_through),
                             served_generation=served, unbound_through=unbound_through,
                             maps_unbound_through=maps_unbound_through))
        session.flush()
        if job:
            session.add(IngestionJob(id=str(uuid.uuid4()), document_id=document_id, status=DocumentStatus.queued))
    return document_id


def _reindex(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    """`govrag reindex ARGS`, which must succeed: its JSON summary."""
    assert main(["reindex", *args]) == 0
    return json.loads(capsys.readouterr().out)  # type: ignore[no-any-return]


def _state(url: str, document_id: str) -> tuple[str, int | None, int]:
    """The document's status, served generation and number of jobs."""
    with unit_of_work(url) as session:
        document = session.get(Document, document_id)
        assert document is not None
        jobs = session.scalar(select(func.count()).where(IngestionJob.document_id == document_id))
        return document.status, document.served_generation, int(jobs or 0)


def _reindex_events(url: str) -> list[RetrievalEvent]:
    with unit_of_work(url) as session:
        events = session.scalars(select(RetrievalEvent).where(RetrievalEvent.event_type == AdminEventType.reindex.value)
                                 .order_by(RetrievalEvent.id)).all()
        session.expunge_all()
        return list(events)


def test_unbound_documents_are_listed_by_a_dry_run_then_queued_once_and_audited(
        cli_env: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Documents indexed before 0020 stayed replayable until each was re-indexed by hand, with no bulk command. Now
    `--unbound` finds them: a dry run lists them and queues nothing; the run queues each through the API's re-index,
    audited as an operator's; run again, it queues none twice (one being ingested already is skipped as pending)."""
    unbound = _document(cli_env, unbound_through=1)
    bound = _document(cli_env, served=2, unbound_through=1)
    in_flight = _document(cli_env, status=DocumentStatus.queued, unbound_through=1, job=True)

    planned = _reindex(capsys, "--department", "hr", "--unbound", "--serve-previous", "--dry-run")
    assert (planned["dry_run"], planned["queued"], planned["documents"]) == (True, 1, [unbound])
    assert planned["skipped"] == {"pending": 1, "not_reindexable": 0}
    assert _state(cli_env, unbound) == (DocumentStatus.ready, 1, 0) and _reindex_events(cli_env) == []

    done = _reindex(capsys, "--department", "hr", "--unbound", "--serve-previous", "--actor", "ops")
    assert (done["dry_run"], done["queued"], done["documents"]) == (False, 1, [unbound])
    assert done["skipped"] == {"pending": 1, "not_reindexable": 0} and done["selection"] == ["unbound"]
    assert _state(cli_env, unbound) == (DocumentStatus.queued, 1, 1)  # its previous index still served
    assert _state(cli_env, bound) == (DocumentStatus.ready, 2, 0) and _state(cli_env, in_flight)[2] == 1
    [event] = _reindex_events(cli_env)
    assert (event.subject, event.departments_requested) == ("cli:ops", ["hr"])
    assert event.details == {"documents": 1, "skipped": 0, "serve_previous": True, "selection": ["unbound"]}

    again = _reindex(capsys, "--department", "hr", "--unbound", "--serve-previous", "--actor", "ops")
    assert (again["queued"], again["rerun"], again["skipped"]) == (0, 0, {"pending": 2, "not_reindexable": 0})
    assert _state(cli_env, unbound)[2] == 1 and len(_reindex_events(cli_env)) == 1


def test_a_department_wide_reindex_of_every_department_queues_no_document_twice(
        cli_env: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`--all` without a filter is the API's department-wide re-index of each department (ready and quarantined
    documents; failed ones left alone), the index withheld meanwhile; run again while the jobs wait, the service
    finds each document queued and gives it no second job but sends its run round again under the current rules.
    The summary said those runs were skipped as `pending`, as if left alone: they are `rerun` now, none skipped."""
    with unit_of_work(cli_env) as session:
        authz_service.create_department(session=session, keystore=keystore_for(get_settings()), name="finance")
    ready = _document(cli_env)
    quarantined = _document(cli_env, department="finance", status=DocumentStatus.quarantined, served=None)
    failed = _document(cli_env, status=DocumentStatus.failed, served=None)

    done = _reindex(capsys, "--all")
    assert done["departments"] == ["finance", "hr"] and done["selection"] == ["all"]
    assert sorted(done["documents"]) == sorted([ready, quarantined]) and done["queued"] == 2
    assert _state(cli_env, ready) == (DocumentStatus.queued, None, 1)
    assert _state(cli_env, quarantined)[::2] == (DocumentStatus.queued, 1)
    assert _state(cli_env, failed) == (DocumentStatus.failed, None, 0)
    assert sorted(e.departments_requested[0] for e in _reindex_events(cli_env)) == ["finance", "hr"]

    again = _reindex(capsys, "--all")
    assert (again["queued"], again["rerun"], again["skipped"]) == (0, 2, {"pending": 0, "not_reindexable": 0})
    assert _state(cli_env, ready)[2] == 1 and _state(cli_env, quarantined)[2] == 1


def test_documents_another_scanner_passed_are_found_in_the_vector_store(
        cli_env: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Chunks passed by an older scanner were scanned again at query time after every start, for ever: nothing
    re-stamped them. `--stale-scan` finds the documents whose served chunks another scanner version passed (chunks of
    a generation no longer served do not count) and re-indexes those alone."""
    stale, current = _document(cli_env), _document(cli_env, served=2)
    vector = [1.0] + [0.0] * 383
    open_vector_store(get_settings()).upsert("hr", [
        VectorPoint(stale, 0, vector, {"document_id": stale, "chunk_index": 0, "generation": 1,
                                       "scanned_by": OLD_SCANNER, "text": "sealed chunk text"}),
        VectorPoint(current, 0, vector, {"document_id": current, "chunk_index": 0, "generation": 1,
                                         "scanned_by": OLD_SCANNER}),
        VectorPoint(current, 0, vector, {"document_id": current, "chunk_index": 0, "generation": 2,
                                         "scanned_by": get_scanner().version}),
    ])

    read = open_vector_store(get_settings()).scroll_payloads("hr", fields=("document_id", "generation", "scanned_by"))
    assert len(read) == 3 and all(set(payload) <= {"document_id", "generation", "scanned_by"} for payload in read)

    planned = _reindex(capsys, "--department", "hr", "--stale-scan", "--dry-run")
    assert planned["documents"] == [stale] and planned["serve_previous"] is False
    # the withholding the re-index would do is rolled back with its job: still served, no job, no event
    assert _state(cli_env, stale) == (DocumentStatus.ready, 1, 0) and _reindex_events(cli_env) == []

    done = _reindex(capsys, "--department", "hr", "--stale-scan")
    assert done["documents"] == [stale] and done["selection"] == ["stale_scan"]
    assert _state(cli_env, stale) == (DocumentStatus.queued, None, 1)
    assert _state(cli_env, current) == (DocumentStatus.ready, 2, 0)


def test_the_stale_scan_reads_the_vector_store_a_page_at_a_time(
        cli_env: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """`--stale-scan` read every payload of the department into one list before looking at any: memory grew with the
    collection's points. Now it checks each page's payloads before the next page is read (here 2 points a page, 5
    points: 3 pages) and finds the same documents as reading them whole would."""
    from ingestion import service as ingestion_service
    from retrieval import store as store_module

    stale, mixed, current = _document(cli_env), _document(cli_env), _document(cli_env)
    vector = [1.0] + [0.0] * 383
    scanners = {stale: [OLD_SCANNER, OLD_SCANNER], mixed: [get_scanner().version, OLD_SCANNER],
                current: [get_scanner().version]}
    store = open_vector_store(get_settings())
    store.upsert("hr", [VectorPoint(document_id, chunk, vector, {"document_id": document_id, "chunk_index": chunk,
                                                                 "generation": 1, "scanned_by": scanned_by})
                        for document_id, chunks in scanners.items() for chunk, scanned_by in enumerate(chunks)])
    monkeypatch.setattr(store_module, "SCROLL_PAGE", 2)
    reads: list[str] = []  # in order: a page asked of the store ("page"), a payload checked ("payload")
    backend = sys.modules[type(store).__module__]  # each page's scroll request selects the payload fields to read
    real_selection, real_is_served = backend.payload_selection, ingestion_service.is_served

    def payload_selection(*args: Any) -> Any:
        reads.append("page")
        return real_selection(*args)

    def is_served(*args: Any) -> bool:
        reads.append("payload")
        return real_is_served(*args)

    monkeypatch.setattr(backend, "payload_selection", payload_selection)
    monkeypatch.setattr(ingestion_service, "is_served", is_served)

    planned = _reindex(capsys, "--department", "hr", "--stale-scan", "--dry-run")
    assert sorted(planned["documents"]) == sorted([stale, mixed])
    assert reads == ["page", "payload", "payload"] * 2 + ["page", "payload"]


def test_a_dry_run_locks_no_row_so_a_concurrent_update_of_one_it_lists_does_not_wait(
        cli_env: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """`--dry-run` ran the real queueing and rolled it back: every document it would queue had its row updated, so
    locked, until the department's rollback, and an API request or a run writing one of them waited for the dry run.
    Now it only reads: while it is midway (reading the runs of the document listed after the one it would queue),
    another session updates that document's row at once (a lock wait would end in its lock_timeout), and the dry
    run still says what it would do."""
    from ingestion import repository

    ready = _document(cli_env)
    in_flight = _document(cli_env, status=DocumentStatus.queued, job=True)
    with unit_of_work(cli_env) as session:  # listed after `ready` (oldest first), so read once `ready` is planned
        session.execute(update(Document).where(Document.id == in_flight)
                        .values(created_at=Document.created_at + timedelta(minutes=1)))
    real_unfinished_jobs, updated = repository.unfinished_jobs, []

    def unfinished_jobs(session: Session, document_id: str) -> list[str]:
        if document_id == in_flight:
            try:
                with unit_of_work(cli_env) as concurrent:
                    concurrent.execute(text("SET LOCAL lock_timeout = '5s'"))
                    updated.append(concurrent.execute(update(Document).where(Document.id == ready)
                                                      .values(title="renamed")).rowcount)
            except OperationalError as error:  # the row was locked: the wait ended in lock_timeout
                updated.append(type(error.orig).__name__)
        return real_unfinished_jobs(session, document_id)

    monkeypatch.setattr(repository, "unfinished_jobs", unfinished_jobs)
    planned = _reindex(capsys, "--department", "hr", "--dry-run")
    assert updated == [1] and (planned["documents"], planned["rerun"]) == ([ready], 1)
    assert planned["skipped"] == {"pending": 0, "not_reindexable": 0}
    assert _state(cli_env, ready) == (DocumentStatus.ready, 1, 0) and _state(cli_env, in_flight)[::2] == (
        DocumentStatus.queued, 1)
    assert _reindex_events(cli_env) == []


def test_a_dry_run_reads_one_snapshot_in_a_read_only_transaction(
        cli_env: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The dry run read the documents, then each one's runs, each statement seeing what had committed by then: a
    run that ended between the two reads left its document listed as being ingested with no run, planned as skipped
    (`not_reindexable`), which the real queueing never does with it (it sends the run round again, or queues the
    document it finds ready). Its transaction now reads one snapshot, and is read only: a write the plan made by
    mistake would fail, not hold a row."""
    from ingestion import repository

    in_flight = _document(cli_env, status=DocumentStatus.queued, job=True)
    real_unfinished_jobs, seen = repository.unfinished_jobs, []

    def unfinished_jobs(session: Session, document_id: str) -> list[str]:
        with unit_of_work(cli_env) as concurrent:  # the document's run ends ready, after it was listed
            concurrent.execute(text("SET LOCAL lock_timeout = '5s'"))  # a row the dry run locked: an error, no hang
            concurrent.execute(update(IngestionJob).where(IngestionJob.document_id == document_id)
                               .values(status=DocumentStatus.ready))
            concurrent.execute(update(Document).where(Document.id == document_id)
                               .values(status=DocumentStatus.ready))
        seen.append(session.execute(text("SHOW transaction_read_only")).scalar())
        return real_unfinished_jobs(session, document_id)

    monkeypatch.setattr(repository, "unfinished_jobs", unfinished_jobs)
    planned = _reindex(capsys, "--department", "hr", "--dry-run")
    assert seen == ["on"] and (planned["documents"], planned["rerun"]) == ([], 1)
    assert planned["skipped"] == {"pending": 0, "not_reindexable": 0}
    assert _state(cli_env, in_flight) == (DocumentStatus.ready, 1, 1)


def test_documents_whose_placeholder_map_was_sealed_before_0021_are_unbound_too(
        cli_env: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A document re-indexed between 0020 and 0021 serves chunks bound to their run and a placeholder map that is not
    (an earlier generation's map can stand in for it until a re-index): `--unbound` took only chunks sealed before
    0020, so it was never queued. Now it is, and a document whose served generation was numbered since 0021 is not."""
    map_unbound = _document(cli_env, served=2, unbound_through=1, maps_unbound_through=2)
    bound = _document(cli_env, served=3, unbound_through=1, maps_unbound_through=2)

    done = _reindex(capsys, "--department", "hr", "--unbound")
    assert (done["queued"], done["documents"]) == (1, [map_unbound])
    assert _state(cli_env, map_unbound) == (DocumentStatus.queued, None, 1)
    assert _state(cli_env, bound) == (DocumentStatus.ready, 3, 0)


def test_an_unknown_department_is_refused_and_nothing_is_queued(
        cli_env: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A department that does not exist refuses the whole command in one line, exit 2, before any department is
    re-indexed; naming none (nor --all) is a usage error."""
    ready = _document(cli_env)

    assert main(["reindex", "--department", "hr", "--department", "nope"]) == 2
    said = capsys.readouterr()
    assert said.err.strip() == "refused: no such department: nope; nothing queued" and said.out == ""
    assert _state(cli_env, ready) == (DocumentStatus.ready, 1, 0) and _reindex_events(cli_env) == []

    with pytest.raises(SystemExit) as usage:
        main(["reindex", "--unbound"])
    assert usage.value.code == 2 and "one of the arguments --department --all is required" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["ops\nadmin", "ops\u200b", "ops\x1b[2K", "o" * 252, ""])
def test_an_actor_the_ledger_cannot_hold_as_written_is_a_usage_error(
        cli_env: str, capsys: pytest.CaptureFixture[str], name: str) -> None:
    """--actor went into the ledger's subject column as given: a line break or an escape sequence in it broke the
    audit row (or showed another name than the one recorded), a name too long for the column failed the command as
    it wrote its event. Now any of these is refused before anything runs, the name never echoed back."""
    ready = _document(cli_env)

    with pytest.raises(SystemExit) as usage:
        main(["reindex", "--department", "hr", "--actor", name])
    said = capsys.readouterr()
    assert usage.value.code == 2 and "argument --actor: 1 to 251 printable characters" in said.err
    assert (name == "" or name not in said.err) and said.out == ""
    assert _state(cli_env, ready) == (DocumentStatus.ready, 1, 0) and _reindex_events(cli_env) == []


def test_with_a_redis_broker_the_jobs_are_sent_as_the_api_sends_them(
        cli_env: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """With a shared broker the command sends each new job as the API does (its task on the queue, the job marked
    sent), so workers take it at once rather than after the sweep's grace; a dry run sends nothing."""
    import redis

    from tests.conftest import REDIS_URL

    queue = f"govrag-test-reindex-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("GOVRAG_BROKER_URL", REDIS_URL)
    monkeypatch.setenv("GOVRAG_TASK_QUEUE", queue)
    get_settings.cache_clear()
    ready = _document(cli_env)
    broker = redis.Redis.from_url(REDIS_URL)
    try:
        assert _reindex(capsys, "--department", "hr", "--dry-run")["sent"] == 0 and broker.llen(queue) == 0
        assert _reindex(capsys, "--department", "hr")["sent"] == 1
        assert broker.llen(queue) == 1
    finally:
        broker.delete(queue, f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}")
    with unit_of_work(cli_env) as session:
        [sent_at] = session.scalars(select(IngestionJob.sent_at).where(IngestionJob.document_id == ready)).all()
    assert sent_at is not None


@pytest.mark.parametrize("database_lost", [False, True], ids=["run-ends", "run-fails"])
def test_a_run_that_sent_jobs_leaves_no_connection_to_the_broker_open(
        cli_env: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, database_lost: bool) -> None:
    """The command made a Celery app to send its jobs and never closed it (the API's stop does: `close_celery`): a
    run in-process (a test's, a script's) left its connections to Redis open for the process's life, 2 a run. Now
    they are closed as the run ends, a run failing after its send too (the database lost as the job is recorded sent:
    the command's one-line failure). Real Redis through an endpoint of its own, this process's connections to it
    counted."""
    from sqlalchemy import make_url

    from tests.conftest import allow_connections
    from tests.support.hung_redis import redis_that_hangs
    from tests.support.sockets import connections_to
    from workers import dispatch

    queue, database = f"govrag-test-closed-{uuid.uuid4().hex[:8]}", str(make_url(cli_env).database)
    recorded = dispatch.record_sent

    def database_lost_first(*args: Any) -> None:
        allow_connections(database, False)
        recorded(*args)

    if database_lost:
        monkeypatch.setattr(dispatch, "record_sent", database_lost_first)
    _document(cli_env)
    with redis_that_hangs() as (endpoint, real, broker_url):
        endpoint.hung = False
        monkeypatch.setenv("GOVRAG_BROKER_URL", broker_url)
        monkeypatch.setenv("GOVRAG_TASK_QUEUE", queue)
        get_settings.cache_clear()
        try:
            exit_code = main(["reindex", "--department", "hr"])
        finally:
            allow_connections(database, True)
        said = capsys.readouterr()
        stopped = "stopped: the database is unavailable" in said.err
        assert (exit_code != 0, stopped, real.llen(queue)) == (database_lost, database_lost, 1), said.err[-2000:]
        assert connections_to(endpoint.server.getsockname()[1]) == 0  # main: 2
        real.delete(queue, f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}")
