"""Document and ingestion-job queries (the only place they are written)."""

from __future__ import annotations

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from core.models import Document, IngestionJob, utcnow


def get_document(session: Session, document_id: str) -> Document | None:
    """A document row by id."""
    return session.get(Document, document_id)


def get_job(session: Session, job_id: str) -> IngestionJob | None:
    """A job row by id."""
    return session.get(IngestionJob, job_id)


def set_status(session: Session, *, document_id: str, job_id: str, status: str, error: str | None = None,
               chunk_count: int | None = None) -> None:
    """Move a document and its job to `status` together."""
    values: dict[str, object] = {"status": status, "error": error, "updated_at": utcnow()}
    if chunk_count is not None:
        values["chunk_count"] = chunk_count
    session.execute(update(Document).where(Document.id == document_id).values(**values))
    session.execute(update(IngestionJob).where(IngestionJob.id == job_id)
                    .values(status=status, error=error, updated_at=utcnow()))


def count_attempt(session: Session, job_id: str) -> None:
    """Record one more processing attempt."""
    session.execute(update(IngestionJob).where(IngestionJob.id == job_id)
                    .values(attempts=IngestionJob.attempts + 1, updated_at=utcnow()))


def ready_documents(session: Session, document_ids: set[str]) -> dict[str, Document]:
    """Those of these documents that are currently ready (not deleted, not failed), by id."""
    if not document_ids:
        return {}
    query = select(Document).where(Document.id.in_(document_ids), Document.status == "ready")
    return {document.id: document for document in session.scalars(query)}
