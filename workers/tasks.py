"""Celery tasks: thin wrappers that pass ids and call ingestion/."""

from __future__ import annotations

import logging

from celery import Celery, Task, shared_task

from ingestion import service as ingestion_service

logger = logging.getLogger(__name__)

MAX_RETRIES = 3


@shared_task(bind=True, acks_late=True, max_retries=MAX_RETRIES)
def ingest_document(self: Task, document_id: str, job_id: str) -> None:
    """Ingest one document; transient faults retry with backoff, then the job fails with a reason."""
    settings = self.app.govrag_settings
    try:
        ingestion_service.run_ingestion(settings=settings, document_id=document_id, job_id=job_id)
    except Exception as exc:
        if self.request.retries >= MAX_RETRIES:
            logger.exception("ingestion of document %s gave up after %d retries", document_id, MAX_RETRIES)
            ingestion_service.mark_failed(settings=settings, document_id=document_id, job_id=job_id,
                                          reason="internal error during ingestion; retries exhausted")
            return
        logger.warning("ingestion of document %s hit %s; retrying", document_id, type(exc).__name__)
        raise self.retry(exc=exc, countdown=2 ** self.request.retries) from exc


def enqueue_ingestion(app: Celery, *, document_id: str, job_id: str) -> None:
    """Queue the ingestion task on `app`'s broker."""
    app.tasks[ingest_document.name].apply_async(args=[document_id, job_id])
