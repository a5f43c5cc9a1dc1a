"""Ledger queries (the only place they are written)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

from sqlalchemy import ColumnElement, Row, Select, delete, func, select, text
from sqlalchemy.orm import Session

from audit.schemas import AdminEventType, ExportFilters
from core import forksafe
from core.db import hold_sqlite_write_lock, is_postgres
from core.models import AuditCheckpoint, Deployment, Document, RetrievalEvent

GENESIS_HASH = "0" * 64
_CHAIN_LOCK_ID = 734_112  # arbitrary, constant advisory-lock id for the ledger chain
_local_chain_lock = forksafe.rlock()
_BATCH = 1000


# Built once: every query runs it (a statement built per call costs its construction and cache key).
_LOCK_CHAIN = text("SELECT pg_advisory_xact_lock(:id)")


def lock_chain(session: Session) -> None:
    """Serialise appends across processes, before the chain end is read, so the hash chain never forks (`govrag
    audit export|purge|checkpoint` append while `govrag serve` runs). PostgreSQL: a transaction-scoped advisory
    lock. SQLite: the database's write lock (`BEGIN IMMEDIATE`), held until the transaction ends; a transaction
    that has written already holds it (the driver begins one only before its first write)."""
    if is_postgres(session):
        session.execute(_LOCK_CHAIN, {"id": _CHAIN_LOCK_ID})
        return
    hold_sqlite_write_lock(session)


def local_chain_lock() -> threading.RLock:
    """The lock between this process's appending threads (one group commit writes at a time)."""
    return _local_chain_lock


def last_event(session: Session) -> RetrievalEvent | None:
    """The row at the end of the chain."""
    return session.scalar(select(RetrievalEvent).order_by(RetrievalEvent.id.desc()).limit(1))


# Built once: every query runs them (a statement built per call costs its construction and cache key).
_CHECKPOINTED = select(AuditCheckpoint.last_event_id).order_by(AuditCheckpoint.id.desc()).limit(1)
_CHAIN_END = select(
    # the newest event's hash
    select(RetrievalEvent.hash).order_by(RetrievalEvent.id.desc()).limit(1).scalar_subquery(),
    # the signed purge anchor
    select(AuditCheckpoint.last_hash).where(AuditCheckpoint.kind == "purge")
    .order_by(AuditCheckpoint.last_event_id.desc()).limit(1).scalar_subquery(),
    # the event id the newest checkpoint covers
    _CHECKPOINTED.scalar_subquery(),
)


def chain_end(session: Session) -> tuple[str, int]:
    """In one round trip: the hash at the end of the chain (after a purge that removed every row, the signed
    purge anchor) and the event id the newest checkpoint covers (0 when none)."""
    last, purge_anchor, covered = session.execute(_CHAIN_END).one()
    return last or purge_anchor or GENESIS_HASH, int(covered or 0)


def checkpointed_through(session: Session) -> int:
    """The event id the newest checkpoint covers (0 when none)."""
    return int(session.scalar(_CHECKPOINTED) or 0)


def add_events(session: Session, events: list[RetrievalEvent]) -> None:
    """Append rows (their ids are set on return)."""
    session.add_all(events)
    session.flush()


def max_event_id(session: Session) -> int:
    """The highest event id (0 when empty)."""
    return int(session.scalar(select(func.max(RetrievalEvent.id))) or 0)


def min_event_id(session: Session) -> int | None:
    """The lowest event id (None when empty)."""
    return session.scalar(select(func.min(RetrievalEvent.id)))


_EVENT_COLUMNS = tuple(RetrievalEvent.__table__.columns)


def iter_chain(session: Session, *, after_id: int) -> Iterator[Row[Any]]:
    """Every event after `after_id` in chain order, as plain rows in keyset-paged batches (constant memory)."""
    yield from _paged(session, select(*_EVENT_COLUMNS).where(RetrievalEvent.id > after_id))


def iter_events(session: Session, *, filters: ExportFilters, through_id: int) -> Iterator[Row[Any]]:
    """Events matching the column filters, up to `through_id`, in chain order (JSON filters are the caller's)."""
    window = _window(filters)
    after_id, through_id = _window_ids(session, window, through_id)
    query = select(*_EVENT_COLUMNS).where(RetrievalEvent.id <= through_id, *window)
    if filters.subject is not None:
        query = query.where(RetrievalEvent.subject == filters.subject)
    if filters.decision is not None:
        query = query.where(RetrievalEvent.decision == filters.decision)
    if filters.event_type is not None:
        query = query.where(RetrievalEvent.event_type == filters.event_type)
    if filters.request_id is not None:
        query = query.where(RetrievalEvent.request_id == filters.request_id)
    yield from _paged(session, query, after_id=after_id)


def _window(filters: ExportFilters) -> list[ColumnElement[bool]]:
    """The conditions on created_at of the export's time window (since inclusive, until exclusive)."""
    window = []
    if filters.since is not None:
        window.append(RetrievalEvent.created_at >= filters.since)
    if filters.until is not None:
        window.append(RetrievalEvent.created_at < filters.until)
    return window


def _window_ids(session: Session, window: list[ColumnElement[bool]], through_id: int) -> tuple[int, int]:
    """The ids a walk in chain order over a time window goes after and through: just before the window's first
    event and at its last, read from ix_retrieval_events_created_at. Exact whatever the order of the times: an event
    stamped by a writer whose clock was behind (or ahead) sits in the chain among events older (or newer) than it,
    and a bound sought by time alone, even with a margin, left it out. The walk began at id 0, reading every older
    event before its first row, and went on to the ledger's end. `id + 0`: on min(id) and max(id), PostgreSQL walks
    the primary key from either end until it meets an event in the window, reading every event outside it."""
    if not window:
        return 0, through_id
    ids = RetrievalEvent.id + 0
    first, last = session.execute(select(func.min(ids), func.max(ids)).where(*window)).one()
    return (0, 0) if first is None else (first - 1, min(through_id, last))


def _paged(session: Session, query: Select[Any], *, after_id: int = 0) -> Iterator[Row[Any]]:
    """Keyset pagination on id: each batch is a fresh, short query, so memory stays flat at any ledger size."""
    while True:
        batch = session.execute(query.where(RetrievalEvent.id > after_id).order_by(RetrievalEvent.id)
                                .limit(_BATCH)).all()
        if not batch:
            return
        yield from batch
        after_id = batch[-1].id


def add_checkpoint(session: Session, checkpoint: AuditCheckpoint) -> None:
    """Store a signed checkpoint."""
    session.add(checkpoint)
    session.flush()


def checkpoints(session: Session) -> list[AuditCheckpoint]:
    """All stored checkpoints, oldest first."""
    return list(session.scalars(select(AuditCheckpoint).order_by(AuditCheckpoint.id)))


def checkpoints_at(session: Session, event_id: int) -> list[AuditCheckpoint]:
    """The stored checkpoints that anchor event `event_id`."""
    return list(session.scalars(select(AuditCheckpoint).where(AuditCheckpoint.last_event_id == event_id)))


def deployment(session: Session) -> Deployment | None:
    """This deployment's id row (migration 0016 minted it)."""
    return session.get(Deployment, 1)


def last_event_before(session: Session, cutoff: object) -> RetrievalEvent | None:
    """The newest event of the chain's longest start created before `cutoff`: the purge deletes through it, so no
    event as new as `cutoff` is before it. It was the newest event created before `cutoff`, and one stamped by a
    writer whose clock was behind, after newer events, took them with it."""
    first_kept = session.scalar(select(func.min(RetrievalEvent.id)).where(RetrievalEvent.created_at >= cutoff))
    query = select(RetrievalEvent).order_by(RetrievalEvent.id.desc()).limit(1)
    return session.scalar(query if first_kept is None else query.where(RetrievalEvent.id < first_kept))


def purge_recorded(session: Session, through_id: int, *, up_to: int) -> bool:
    """Whether a `retention_purge` event after `through_id`, at or before `up_to`, records a purge through it."""
    recorded = session.scalars(select(RetrievalEvent.details).where(
        RetrievalEvent.event_type == AdminEventType.retention_purge.value, RetrievalEvent.id > through_id,
        RetrievalEvent.id <= up_to))
    return any(isinstance(details, dict) and details.get("through_event_id") == through_id for details in recorded)


def count_through(session: Session, through_id: int) -> int:
    """How many events have id <= `through_id`."""
    return int(session.scalar(select(func.count()).where(RetrievalEvent.id <= through_id)) or 0)


def delete_through(session: Session, through_id: int) -> int:
    """Delete events with id <= `through_id` (only the retention purge calls this)."""
    result = session.execute(delete(RetrievalEvent).where(RetrievalEvent.id <= through_id))
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


def document_counts(session: Session) -> list[tuple[str, str, int, int]]:
    """(department, status, documents, chunks) for the scrape-time gauges."""
    chunks = func.coalesce(func.sum(Document.chunk_count), 0)
    query = select(Document.department, Document.status, func.count(), chunks).group_by(Document.department,
                                                                                       Document.status)
    return [(str(d), str(s), int(n), int(c)) for d, s, n, c in session.execute(query)]
