"""A master key refused while a worker runs a job (its key file deleted, unreadable or replaced by another key after
the worker started) is an outage of the deployment, not a fault of the document: the job waits, then completes once
the key file is back."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from core import blobs, crypto
from tests.support.task_retries import Scheduled, task_at_retry

TEXT = b"The desk rota: Leeds on Saturday, Porto on Sunday."


def _deleted(key_file: Path) -> None:
    key_file.unlink()


def _made_a_folder(key_file: Path) -> None:  # unreadable, whoever runs the test (root reads any file)
    key_file.unlink()
    key_file.mkdir()


def _replaced(key_file: Path) -> None:
    key_file.write_text(crypto.format_master_keyring({1: crypto.new_key()}))  # one from elsewhere


def _without_its_version(key_file: Path) -> None:
    key_file.write_text(crypto.format_master_keyring({2: crypto.new_key()}))  # no version 1, which wraps the keys


@pytest.fixture
def queued(make_pg_database: Callable[[], str], tmp_path: Path):  # type: ignore[no-untyped-def]
    """Settings (no key kept in memory: each read goes to the key file) and a queued job of one uploaded document."""
    from authz import service as authz_service
    from core import migrate
    from core.db import unit_of_work
    from core.keystore import keystore_for
    from core.settings import Settings
    from ingestion import service
    from ingestion.schemas import Classification

    url = make_pg_database()
    migrate.upgrade(url)
    settings = Settings(data_dir=tmp_path / "data", database_url=url, broker_url="memory://", inprocess_worker=False,
                        key_cache_seconds=0)
    blobs.open_at_start(settings.blob_dir, url)
    with unit_of_work(url) as session:
        authz_service.create_department(session=session, keystore=keystore_for(settings), name="desk")
        accepted = service.accept_upload(session=session, settings=settings, uploaded_by="stella", department="desk",
                                         filename="rota.txt", data=TEXT, title=None, acl_groups=[],
                                         classification=Classification.internal)
    return settings, accepted.document_id, accepted.job_id


def _states(settings, document_id: str, job_id: str) -> tuple[tuple[str, str | None], tuple[str, str | None]]:  # type: ignore[no-untyped-def]
    from core.db import unit_of_work
    from ingestion import repository

    with unit_of_work(settings.resolved_database_url) as session:
        document, job = repository.get_document(session, document_id), repository.get_job(session, job_id)
        return (str(document.status), document.error), (str(job.status), job.error)


@pytest.mark.parametrize("spoil", [_deleted, _made_a_folder, _replaced, _without_its_version])
def test_a_master_key_refused_mid_job_is_waited_out_and_the_job_completes_once_the_key_file_is_back(
        queued, caplog: pytest.LogCaptureFixture, spoil: Callable[[Path], None]) -> None:  # type: ignore[no-untyped-def]
    """The refusal took the generic retry path (3 retries), then failed the job as "internal error during ingestion;
    retries exhausted" with a traceback (a wrong key: "the key of the document's department does not open ... its key
    row was altered", at once; a keyring without the version the keys are wrapped under: a LookupError, the generic
    retries), losing the upload to a deployment fault the operator can fix. It is now an outage:
    retried as long as a database outage, the job left queued, one line without a traceback or the key file's path."""
    from workers.tasks import MAX_RETRIES, OUTAGE_RETRIES, ingest_document

    settings, document_id, job_id = queued
    key_file = settings.resolved_master_key_file
    kept = key_file.read_bytes()
    spoil(key_file)
    scheduled: list[dict[str, object]] = []
    with caplog.at_level(logging.DEBUG), pytest.raises(Scheduled):
        ingest_document(task_at_retry(settings, MAX_RETRIES, scheduled), document_id, job_id)  # type: ignore[arg-type]
    assert [retry["max_retries"] for retry in scheduled] == [OUTAGE_RETRIES]
    assert _states(settings, document_id, job_id) == (("queued", None), ("queued", None))
    assert not [record for record in caplog.records if record.exc_info]
    assert str(key_file) not in caplog.text and str(settings.data_dir) not in caplog.text
    said = [record.getMessage() for record in caplog.records if record.name == "workers.tasks"]
    assert said == [f"ingestion of document {document_id} waits: the master key is unavailable; retrying"], said

    if key_file.is_dir():
        shutil.rmtree(key_file)
    key_file.write_bytes(kept)
    key_file.chmod(0o600)
    ingest_document(task_at_retry(settings, MAX_RETRIES + 1, scheduled), document_id, job_id)  # type: ignore[arg-type]
    assert len(scheduled) == 1
    assert _states(settings, document_id, job_id) == (("ready", None), ("ready", None))


def test_a_master_key_refused_past_the_outage_retries_fails_the_job_in_one_line_saying_so(
        queued, caplog: pytest.LogCaptureFixture) -> None:  # type: ignore[no-untyped-def]
    """Given up after the outage's retries, the job says the master key was unavailable (the sealed original is kept:
    a re-index runs it again), in one line without a traceback, not "internal error during ingestion"."""
    from workers.tasks import OUTAGE_RETRIES, ingest_document

    settings, document_id, job_id = queued
    _deleted(settings.resolved_master_key_file)
    scheduled: list[dict[str, object]] = []
    with caplog.at_level(logging.DEBUG):
        ingest_document(task_at_retry(settings, OUTAGE_RETRIES, scheduled), document_id, job_id)  # type: ignore[arg-type]
    assert scheduled == []
    reason = "the master key was unavailable; retries exhausted"
    assert _states(settings, document_id, job_id) == (("failed", reason), ("failed", reason))
    assert not [record for record in caplog.records if record.exc_info]
    assert str(settings.resolved_master_key_file) not in caplog.text
    assert blobs.has_original(settings.blob_dir, document_id)


def test_a_job_whose_department_has_no_key_row_fails_at_once_saying_so_in_one_line(
        queued, caplog: pytest.LogCaptureFixture) -> None:  # type: ignore[no-untyped-def]
    """The department's key row deleted in the database after the upload: the claim's LookupError took the generic
    retry path (3 retries, then "internal error during ingestion; retries exhausted" with a traceback), though no retry
    brings the row back. It now fails at once as for an altered row, saying what to restore, in one line; the sealed
    original is kept for a re-index once the row is back."""
    from ingestion import service
    from tests.support.key_rotation import department_key_deleted
    from workers.tasks import ingest_document

    settings, document_id, job_id = queued
    scheduled: list[dict[str, object]] = []
    with department_key_deleted(settings, "desk"), caplog.at_level(logging.DEBUG):
        ingest_document(task_at_retry(settings, 0, scheduled), document_id, job_id)  # type: ignore[arg-type]
    assert scheduled == []
    reason = service.DEPARTMENT_KEY_UNREADABLE
    assert _states(settings, document_id, job_id) == (("failed", reason), ("failed", reason))
    assert not [record for record in caplog.records if record.exc_info]
    assert "the key of department desk is missing from the database" in caplog.text
    assert blobs.has_original(settings.blob_dir, document_id)
