"""The retrieval event as recorded and exported."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class Decision(StrEnum):
    answered = "answered"
    refused = "refused"


class ExportFormat(StrEnum):
    jsonl = "jsonl"
    csv = "csv"


@dataclass(frozen=True)
class RetrievalRecord:
    """Everything the ledger keeps about one query; the question arrives already masked."""

    request_id: str
    subject: str
    groups: list[str]
    departments_requested: list[str]
    departments_searched: list[str]
    decision: Decision
    reason: str | None
    question_masked: str
    purpose: str | None
    latency_ms: float
    chunks: list[dict[str, Any]] = field(default_factory=list)


EXPORT_FIELDS = (
    "id", "request_id", "created_at", "event_type", "subject", "groups", "departments_requested",
    "departments_searched", "decision", "reason", "chunks", "question_masked", "purpose", "latency_ms",
    "prev_hash", "hash",
)
