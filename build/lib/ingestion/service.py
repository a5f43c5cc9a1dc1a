"""Upload acceptance and the ingestion run behind the Celery task."""

from __future__ import annotations

import hashlib
import logging
import uuid
from collections.abc import Callable

from sqlalchemy.orm import Session

from core import blobs
from core.db import unit_of_work
from core.errors import ErrorCode, GovragError
from core.keystore import keystore_for
from core.models import Document, DocumentStatus, IngestionJob
from core.settings import Settings
from guard.pii import get_redactor
from ingestion import repository
from ingestion.pipeline import DocumentFacts, protect
from ingestion.schemas import Classification, DocumentStatusOut, JobStatusOut, UploadAccepted
from ingestion.sniff import sniff_content_type
from retrieval.embeddings import get_embedder
from retrieval.store import open_vector_store

logger = logging.getLogger(__name__)

MAX_TITLE_CHARS = 300


def accept_upload(
    *, session: Session, settings: Settings, uploaded_by: str, department: str, filename: str | None, data: bytes,
    title: str | None, acl_groups: list[str], classification: Classification,
) -> UploadAccepted:
    """Validate the bytes, store them encrypted and queue a job. The caller commits, then enqueues."""
    if len(data) > settings.max_upload_bytes:
        raise GovragError(ErrorCode.payload_too_large, f"file exceeds the {settings.max_upload_bytes} byte limit")
    content_type = sniff_content_type(data, filename)
    document_id, job_id = str(uuid.uuid4()), str(uuid.uuid4())
    key = keystore_for(settings).create_document_key(session=session, department=department,
                                                     document_id=document_id)
    blobs.write_sealed(settings.blob_dir, document_id, key, data)
    session.add(Document(
        id=document_id, department=department, title=_title(title, filename), content_type=content_type,
        size_bytes=len(data), sha256=hashlib.sha256(data).hexdigest(), acl_groups=acl_groups,
        classification=classification.value, status=DocumentStatus.queued, uploaded_by=uploaded_by,
    ))
    session.add(IngestionJob(id=job_id, document_id=document_id, status=DocumentStatus.queued))
    session.flush()
    return UploadAccepted(document_id=document_id, job_id=job_id)


def run_ingestion(*, settings: Settings, document_id: str, job_id: str) -> None:
    """Process one queued document to ready or failed. Unexpected errors propagate for a retry."""
    facts, key, data = _start(settings, document_id, job_id)
    if facts is None or key is None or data is None:
        return
    try:
        points = protect(data, facts, key=key, embedder=get_embedder(), redactor=get_redactor(),
                         max_chars=settings.chunk_max_chars)
    except GovragError as exc:
        _finish(settings, document_id, job_id, DocumentStatus.failed, error=exc.message)
        logger.info("ingestion failed permanently for document %s", document_id)
        return
    store = open_vector_store(settings)
    store.delete_document(facts.department, document_id)  # a retried run leaves no stale points
    store.upsert(facts.department, points)
    _finish(settings, document_id, job_id, DocumentStatus.ready, chunk_count=len(points))
    logger.info("ingested document %s: %d chunks", document_id, len(points))


def mark_failed(*, settings: Settings, document_id: str, job_id: str, reason: str) -> None:
    """Give up on a job after its retries; `reason` must not hold document content."""
    _finish(settings, document_id, job_id, DocumentStatus.failed, error=reason)


def _start(settings: Settings, document_id: str, job_id: str) -> tuple[DocumentFacts | None, bytes | None,
                                                                        bytes | None]:
    """Mark processing and load what the pipeline needs; the session is released before slow work."""
    with unit_of_work(settings.resolved_database_url) as session:
        document = repository.get_document(session, document_id)
        if document is None or document.status in (DocumentStatus.ready, DocumentStatus.deleted):
            return None, None, None
        key = keystore_for(settings).document_key(session=session, department=document.department,
                                                  document_id=document_id)
        if key is None:
            return None, None, None
        repository.count_attempt(session, job_id)
        repository.set_status(session, document_id=document_id, job_id=job_id, status=DocumentStatus.processing)
        facts = DocumentFacts(
            document_id=document_id, department=document.department, title=document.title,
            content_type=document.content_type, acl_groups=tuple(document.acl_groups),
            classification=Classification(document.classification),
        )
    return facts, key, blobs.read_sealed(settings.blob_dir, document_id, key)


def _finish(settings: Settings, document_id: str, job_id: str, status: DocumentStatus, *, error: str | None = None,
            chunk_count: int | None = None) -> None:
    with unit_of_work(settings.resolved_database_url) as session:
        repository.set_status(session, document_id=document_id, job_id=job_id, status=status, error=error,
                              chunk_count=chunk_count)


def _title(title: str | None, filename: str | None) -> str:
    chosen = (title or filename or "untitled").strip() or "untitled"
    return chosen[:MAX_TITLE_CHARS]


def document_status(*, session: Session, can_see: Callable[[str, list[str]], bool],
                    document_id: str) -> DocumentStatusOut:
    """Status and metadata of a document the caller may see; others look exactly like missing ones."""
    document = repository.get_document(session, document_id)
    if document is None or document.status == DocumentStatus.deleted or not can_see(document.department,
                                                                                     document.acl_groups):
        raise GovragError(ErrorCode.not_found, "no such document")
    return DocumentStatusOut(
        document_id=document.id, department=document.department, title=document.title,
        content_type=document.content_type, size_bytes=document.size_bytes,
        classification=document.classification, acl_groups=document.acl_groups, status=document.status,
        error=document.error, chunk_count=document.chunk_count, created_at=document.created_at,
        updated_at=document.updated_at,
    )


def job_status(*, session: Session, can_see: Callable[[str, list[str]], bool], job_id: str) -> JobStatusOut:
    """Status of an ingestion job whose document the caller may see."""
    job = repository.get_job(session, job_id)
    document = repository.get_document(session, job.document_id) if job is not None else None
    if job is None or document is None or not can_see(document.department, document.acl_groups):
        raise GovragError(ErrorCode.not_found, "no such job")
    return JobStatusOut(job_id=job.id, document_id=job.document_id, status=job.status, error=job.error,
                        attempts=job.attempts, created_at=job.created_at, updated_at=job.updated_at)


def ready_documents(*, session: Session, document_ids: set[str]) -> dict[str, Document]:
    """Documents that may still be cited: ready, not deleted or failed."""
    return repository.ready_documents(session, document_ids)


def delete_document(*, session: Session, settings: Settings, document_id: str,
                    can_delete: Callable[[str], bool]) -> None:
    """Crypto-shred the document key, then remove the vectors and the stored bytes."""
    document = repository.get_document(session, document_id)
    if document is None or document.status == DocumentStatus.deleted or not can_delete(document.department):
        raise GovragError(ErrorCode.not_found, "no such document")
    keystore_for(settings).shred_document_key(session=session, document_id=document_id)
    open_vector_store(settings).delete_document(document.department, document_id)
    blobs.remove(settings.blob_dir, document_id)
    document.status = DocumentStatus.deleted
    document.chunk_count = 0
    session.flush()
