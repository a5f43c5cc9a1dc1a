"""Ledger queries (the only place they are written)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import datetime

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from core.models import RetrievalEvent

GENESIS_HASH = "0" * 64
_CHAIN_LOCK_ID = 734_112  # arbitrary, constant advisory-lock id for the ledger chain
_local_chain_lock = threading.Lock()


def lock_chain(session: Session) -> None:
    """Serialise appends so the hash chain never forks (PostgreSQL: a transaction-scoped advisory lock)."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _CHAIN_LOCK_ID})


def local_chain_lock() -> threading.Lock:
    """SQLite (embedded, one process) serialises appends with a process lock."""
    return _local_chain_lock


def last_hash(session: Session) -> str:
    """The hash at the end of the chain."""
    query = select(RetrievalEvent.hash).order_by(RetrievalEvent.id.desc()).limit(1)
    return session.scalar(query) or GENESIS_HASH


def add_event(session: Session, event: RetrievalEvent) -> None:
    """Append a row."""
    session.add(event)
    session.flush()


def iter_events(session: Session, *, since: datetime | None, until: datetime | None,
                subject: str | None) -> Iterator[RetrievalEvent]:
    """Events in chain order, streamed in batches."""
    query = select(RetrievalEvent).order_by(RetrievalEvent.id)
    if since is not None:
        query = query.where(RetrievalEvent.created_at >= since)
    if until is not None:
        query = query.where(RetrievalEvent.created_at < until)
    if subject is not None:
        query = query.where(RetrievalEvent.subject == subject)
    yield from session.scalars(query.execution_options(yield_per=500))
