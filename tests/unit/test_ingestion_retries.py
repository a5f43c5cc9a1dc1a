"""How long an ingestion job keeps retrying: a fault of the document's own gives up after a few seconds; an outage
of the database, the vector store or the blob volume is waited out for about half an hour before the job is failed
(it used to fail after ~15 s)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from sqlalchemy.exc import OperationalError


class _Scheduled(Exception):
    pass


def _run(monkeypatch: pytest.MonkeyPatch, fault: Exception, retries: int) -> dict[str, object]:
    """Run the task body once with `fault` raised by the ingestion, at its `retries`-th retry."""
    from ingestion import service
    from workers import tasks

    seen: dict[str, object] = {}

    def fails(**_: object) -> None:
        raise fault

    def retry(**kwargs: object) -> Exception:
        seen["retry"] = kwargs
        return _Scheduled()

    monkeypatch.setattr(service, "run_ingestion", fails)

    def failed(**kwargs: str) -> list[object]:
        seen["failed"] = kwargs["reason"]
        return []  # no attachment step queued

    monkeypatch.setattr(service, "mark_failed", failed)
    task = SimpleNamespace(app=SimpleNamespace(govrag_settings=None), request=SimpleNamespace(retries=retries),
                           retry=retry)
    try:
        tasks.ingest_document(task, "doc", "job")  # type: ignore[arg-type]
    except _Scheduled:
        pass
    return seen


def _outage() -> Exception:
    return OperationalError("SELECT 1", {}, ConnectionRefusedError("connection refused"))


def test_a_vector_store_outage_is_waited_out_too(monkeypatch: pytest.MonkeyPatch) -> None:
    from core.errors import Unavailable
    from workers.tasks import OUTAGE_RETRIES

    seen = _run(monkeypatch, Unavailable("vector store"), 5)
    assert "failed" not in seen and seen["retry"]["max_retries"] == OUTAGE_RETRIES  # type: ignore[index]


def test_a_document_fault_gives_up_after_three_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _run(monkeypatch, ValueError("bad"), 2)["retry"]["max_retries"] == 3  # type: ignore[index]
    assert "retries exhausted" in str(_run(monkeypatch, ValueError("bad"), 3)["failed"])


def test_a_database_outage_is_waited_out_with_a_capped_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    from workers.tasks import MAX_BACKOFF_SECONDS, OUTAGE_RETRIES

    early = _run(monkeypatch, _outage(), 3)
    assert "failed" not in early and early["retry"]["countdown"] == 8  # type: ignore[index]
    late = _run(monkeypatch, _outage(), 20)
    assert "failed" not in late and late["retry"]["countdown"] == MAX_BACKOFF_SECONDS  # type: ignore[index]
    assert late["retry"]["max_retries"] == OUTAGE_RETRIES  # type: ignore[index]
    waited = sum(min(2 ** n, MAX_BACKOFF_SECONDS) for n in range(OUTAGE_RETRIES))
    assert 25 * 60 <= waited <= 40 * 60  # about half an hour of outage before the job fails
    assert "retries exhausted" in str(_run(monkeypatch, _outage(), OUTAGE_RETRIES)["failed"])


def test_a_lost_original_fails_at_once_but_a_missing_blob_directory_is_an_outage(tmp_path: Path) -> None:
    """A document's sealed original that is gone fails its run at once (no retry brings it back); the whole blob
    directory gone (a volume not mounted on this worker) is no fault of the document: an outage, waited out as one
    of the database is, rather than failing every document with "upload it again" (or, retried as a fault of the
    document, with "retries exhausted")."""
    from core import blobs
    from core.errors import GovragError, Unavailable, unavailable_dependency
    from ingestion import service

    blobs.open_store(tmp_path, documents_exist=False)
    mounted = SimpleNamespace(blob_dir=tmp_path)
    with pytest.raises(GovragError) as lost:
        service._original(mounted, "doc", bytes(32))  # type: ignore[arg-type]
    assert lost.value.message == service.ORIGINAL_UNREADABLE
    with pytest.raises(Unavailable) as away:
        service._original(SimpleNamespace(blob_dir=tmp_path / "unmounted"), "doc", bytes(32))  # type: ignore[arg-type]
    assert unavailable_dependency(away.value) == "blob volume"


def test_a_run_ending_while_the_blob_volume_is_away_leaves_its_superseded_maps_and_does_not_raise(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A run's end is committed before its superseded points and placeholder maps go: the blob volume away just
    then raised out of the finished run (a retry that found nothing to do); the maps now stay for the document's
    next run, with a warning naming the document only, as the points do when the vector store is away."""
    import logging

    from core import blobs
    from core.settings import Settings
    from ingestion import service
    from retrieval.store import close_vector_store

    settings = Settings(data_dir=tmp_path)
    blobs.open_store(settings.blob_dir, documents_exist=False)
    key = bytes(32)
    for generation in (1, 2):
        blobs.write_sealed_map(settings.blob_dir, "doc", key, b"{}", generation, department="desk")
    state = service._IndexState("desk", 2, 2)
    away = settings.blob_dir.rename(tmp_path / "unmounted")
    try:
        with caplog.at_level(logging.WARNING, logger="ingestion.service"):
            service._drop_superseded(settings, "doc", state, 2)
    finally:
        close_vector_store(settings)
        away.rename(settings.blob_dir)
    assert [r.getMessage() for r in caplog.records if r.name == "ingestion.service"] == [
        "superseded placeholder maps of document doc stay until its next run: the blob volume is unavailable"]
    assert [r.getMessage().split(":")[0] for r in caplog.records if r.name == "core.blobs"] == [
        f"the blob volume is no longer mounted at {settings.blob_dir}"]  # the store's own line, once
    left = blobs.read_sealed_map(settings.blob_dir, "doc", key, 1, department="desk", unbound_through=0)
    assert left is not None  # left for the next run


def test_an_attachment_is_refused_for_its_own_fault_only_never_for_an_outage_or_a_503() -> None:
    """Taking an e-mail's attachment caught GovragError before it asked whether the failure was an outage: the audit
    log's `unavailable` raised from the database going (any GovragError raised from an outage), or any 503, filed
    the attachment as refused for good (a failed child keeps no bytes to take again) instead of retrying the step.
    No path through `accept_upload` raises one today; the classification is checked here."""
    from core.errors import ErrorCode, GovragError, Unavailable
    from ingestion import service

    def raised(failure: BaseException, cause: BaseException | None) -> BaseException:
        try:
            raise failure from cause
        except BaseException as caught:  # noqa: BLE001 - handed back to the test
            return caught

    audit_unavailable = GovragError(ErrorCode.unavailable, "the audit log is unavailable")
    assert service._not_now(raised(audit_unavailable, _outage()))
    assert service._not_now(GovragError(ErrorCode.unavailable, "not now"))
    assert service._not_now(raised(GovragError(ErrorCode.duplicate_upload, "duplicate"), Unavailable("blob volume")))
    assert service._not_now(_outage()) and service._not_now(Unavailable("blob volume"))
    assert not service._not_now(GovragError(ErrorCode.unsupported_type, "not a supported file type"))
    assert not service._not_now(raised(GovragError(ErrorCode.duplicate_upload, "duplicate"), ValueError("bad")))
    assert not service._not_now(ValueError("bad"))
