"""The retrieval ledger: hash-chained events and their export."""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Iterator
from contextlib import nullcontext
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from audit import repository
from audit.schemas import EXPORT_FIELDS, ExportFormat, RetrievalRecord
from core import metrics
from core.errors import ErrorCode, GovragError
from core.logs import mask
from core.models import RetrievalEvent, utcnow
from guard.pii import get_redactor


def mask_question(question: str) -> str:
    """The question with PII (Presidio) and secret-shaped values (patterns) replaced."""
    return mask(get_redactor().redact(question))


def record_retrieval(*, session: Session, record: RetrievalRecord) -> None:
    """Append the event to the chain; any failure is `unavailable`: no audit, no answer."""
    try:
        is_postgres = session.get_bind().dialect.name == "postgresql"
        with nullcontext() if is_postgres else repository.local_chain_lock():
            repository.lock_chain(session)
            event = RetrievalEvent(created_at=utcnow(), event_type="retrieval", **vars(record))
            event.prev_hash = repository.last_hash(session)
            event.hash = event_hash(event)
            repository.add_event(session, event)
            session.commit()
    except SQLAlchemyError as exc:
        session.rollback()
        metrics.AUDIT_WRITE_FAILURES.inc()
        raise GovragError(ErrorCode.unavailable, "the audit log is unavailable; no answer without an audit record"
                          ) from exc


def event_hash(event: RetrievalEvent) -> str:
    """SHA-256 over the previous hash and the event's canonical content."""
    content = {name: _plain(getattr(event, name)) for name in EXPORT_FIELDS if name not in ("id", "hash")}
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def export_events(*, session: Session, departments: set[str], fmt: ExportFormat, since: datetime | None = None,
                  until: datetime | None = None, subject: str | None = None) -> Iterator[str]:
    """Stream events that touched any of `departments` (requested or searched) as JSONL or CSV."""
    rows = (
        _as_row(event)
        for event in repository.iter_events(session, since=since, until=until, subject=subject)
        if departments.intersection(event.departments_searched) or departments.intersection(
            event.departments_requested)
    )
    return _jsonl(rows) if fmt is ExportFormat.jsonl else _csv(rows)


def _as_row(event: RetrievalEvent) -> dict[str, Any]:
    return {name: _plain(getattr(event, name)) for name in EXPORT_FIELDS}


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):  # one canonical UTC form, whatever the database hands back
        utc = value.astimezone(UTC) if value.tzinfo else value
        return utc.replace(tzinfo=None).isoformat() + "Z"
    if hasattr(value, "value"):
        return value.value
    return value


def _jsonl(rows: Iterator[dict[str, Any]]) -> Iterator[str]:
    for row in rows:
        yield json.dumps(row, ensure_ascii=False) + "\n"


def _csv(rows: Iterator[dict[str, Any]]) -> Iterator[str]:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=EXPORT_FIELDS)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: json.dumps(v) if isinstance(v, list | dict) else v for k, v in row.items()})
        yield buffer.getvalue()
        buffer.seek(0)
        buffer.truncate()
    if buffer.getvalue():
        yield buffer.getvalue()
