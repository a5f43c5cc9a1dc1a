"""Gauges refreshed when Prometheus scrapes: documents by state, kill-switch state, queue depth."""

from __future__ import annotations

import logging

import redis
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from audit import repository
from core import broker, forksafe, metrics
from core.settings import Settings

logger = logging.getLogger(__name__)

DOCUMENTS = metrics.Gauge("govrag_documents", "Documents by department and state (refreshed at scrape); "
                          "ingestion throughput is deriv() of status=ready, failures the increase of status=failed",
                          ["department", "status"], registry=metrics.REGISTRY)
CHUNKS = metrics.Gauge("govrag_document_chunks", "Indexed chunks by department and document state (at scrape)",
                       ["department", "status"], registry=metrics.REGISTRY)


# The (department, status) series set so far: one whose documents all left that status (a document deleted, a queued
# one now ready) is in no count any more, and would otherwise keep the number it last had.
_COUNTED: set[tuple[str, str]] = set()
_COUNTED_LOCK = forksafe.lock()


def refresh(*, session: Session, settings: Settings) -> None:
    """Bring the scrape-time gauges up to date; a failing source leaves its gauge as it was."""
    try:
        counts = repository.document_counts(session)
    except SQLAlchemyError:
        logger.warning("metrics: document counts unavailable")
    else:
        _set_document_counts(counts)
    _refresh_kill_switch(session, settings)
    _refresh_queue_depth(settings)


def _set_document_counts(counts: list[tuple[str, str, int, int]]) -> None:
    """Each counted series to its count, and every series counted before but not now to 0."""
    with _COUNTED_LOCK:
        now = {(department, status) for department, status, _, _ in counts}
        for department, status in _COUNTED - now:
            DOCUMENTS.labels(department=department, status=status).set(0)
            CHUNKS.labels(department=department, status=status).set(0)
        for department, status, documents, chunks in counts:
            DOCUMENTS.labels(department=department, status=status).set(documents)
            CHUNKS.labels(department=department, status=status).set(chunks)
        _COUNTED.update(now)


def _refresh_kill_switch(session: Session, settings: Settings) -> None:
    try:
        from guard import controls

        for scope, state in controls.list_states(session=session, settings=settings).items():
            metrics.KILL_SWITCH_STATE.labels(scope=scope).set(state.kill_mode.severity)
    except (ImportError, AttributeError, SQLAlchemyError):
        logger.warning("metrics: kill-switch state unavailable")


def _refresh_queue_depth(settings: Settings) -> None:
    """The job queue's length in the broker's Redis. The gauge is left as it was when Redis is down or does not answer
    within `broker_socket_timeout_seconds` (with a warning), and without trying it or a word while the broker's
    breaker is open after such a failure (`broker.through_breaker`, which says so as it opens and closes)."""
    if not broker.is_redis(settings.broker_url):
        return
    try:
        depth = broker.through_breaker(settings.broker_url, lambda: _queue_length(settings))
    except broker.RedisSkipped:
        return
    except redis.RedisError:
        logger.warning("metrics: queue depth unavailable")
        return
    metrics.QUEUE_DEPTH.labels(queue=settings.task_queue).set(depth)


def _queue_length(settings: Settings) -> int:
    with broker.redis_client(settings) as client:
        return int(client.llen(settings.task_queue))
