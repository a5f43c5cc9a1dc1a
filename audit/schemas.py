"""The retrieval event as recorded and exported."""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, Field, TypeAdapter

from authz.identity import MAX_SUBJECT_CHARS, token_can_carry
from core.logs import REQUEST_ID_PATTERN
from core.models import DOCUMENT_ID_CHARS


class Decision(StrEnum):
    answered = "answered"
    refused = "refused"
    blocked = "blocked"  # a guard (firewall, output guard, kill switch) stopped it
    withheld = "withheld"  # an answer was produced but not released (e.g. PII resurfaced)
    error = "error"  # the query failed (an unexpected exception, any stage); `reason` names its class, nothing returned
    admin = "admin"  # admin events (role changes, kill switch, exports, ...)


class ExportFormat(StrEnum):
    jsonl = "jsonl"
    csv = "csv"
    ocsf = "ocsf"  # OCSF API Activity (6003) events as JSON lines, for SIEMs


class AdminEventType(StrEnum):
    """Admin actions recorded in the same ledger as retrievals."""

    department_created = "department_created"
    role_granted = "role_granted"
    role_revoked = "role_revoked"
    kill_switch = "kill_switch"
    firewall_mode = "firewall_mode"
    quarantine_decision = "quarantine_decision"
    key_rotation = "key_rotation"
    reveal = "reveal"
    export = "export"
    training_export = "training_export"
    export_failed = "export_failed"  # an export (or training_export) recorded, then not written whole: details say why
    retention_purge = "retention_purge"
    document_deleted = "document_deleted"
    # issue 4: policy changes besides grants/revocations (details say which rows changed)
    role_defined = "role_defined"
    role_deleted = "role_deleted"
    role_inheritance_added = "role_inheritance_added"
    role_inheritance_removed = "role_inheritance_removed"
    clearance_set = "clearance_set"
    clearance_removed = "clearance_removed"
    # issue 3: ingestion administration
    ingestion_policy = "ingestion_policy"
    reindex = "reindex"


RETRIEVAL_EVENT = "retrieval"
# Every event type the ledger records: what an export may filter on (anything else is a 422, not an empty export).
EventType = StrEnum("EventType", {RETRIEVAL_EVENT: RETRIEVAL_EVENT} | {e.value: e.value for e in AdminEventType})


@dataclass(frozen=True)
class RetrievalRecord:
    """Everything the ledger keeps about one query; the question arrives already masked.

    `chunks` entries: document_id, chunk_id, score, cited, and `content_sha256` (of the sealed-then-opened,
    already-redacted chunk text) so a recipient can tell which version of a chunk was seen.
    """

    request_id: str
    subject: str
    groups: list[str]
    departments_requested: list[str] | None  # None: none named (all the caller may read); []: named, none valid
    departments_searched: list[str]
    decision: Decision
    reason: str | None
    question_masked: str
    purpose: str | None
    latency_ms: float
    chunks: list[dict[str, Any]] = field(default_factory=list)
    roles: list[str] = field(default_factory=list)  # "role@department" the decision relied on
    policy_version: str | None = None
    guard_verdicts: dict[str, Any] = field(default_factory=dict)  # e.g. {"firewall": {...}, "output": {...}}
    model_backend: str | None = None
    model_id: str | None = None
    kill_switch_mode: str | None = None
    details: dict[str, Any] = field(default_factory=dict)


EXPORT_FIELDS = (
    "id", "request_id", "created_at", "event_type", "subject", "groups", "departments_requested",
    "departments_searched", "decision", "reason", "chunks", "question_masked", "purpose", "latency_ms",
    "roles", "policy_version", "guard_verdicts", "model_backend", "model_id", "kill_switch_mode", "details",
    "prev_hash", "hash",
)
# Fields added after the first release: left out of the canonical hash content while empty, so rows written
# before they existed keep verifying (an empty value and an absent one are the same statement).
LATER_FIELDS = frozenset(
    {"roles", "policy_version", "guard_verdicts", "model_backend", "model_id", "kill_switch_mode", "details"})


def utc_bound(value: datetime) -> datetime:
    """An export window's bound in UTC, a naive one read as UTC (the manifest says so; left naive, PostgreSQL would
    read it in the session's time zone); a bound outside UTC's calendar is refused (a 422) rather than overflowing
    later."""
    try:
        return value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)
    except OverflowError as exc:
        raise ValueError("the time falls outside the calendar once converted to UTC") from exc


_SECONDS = re.compile(r"[-+]?[0-9]+(?:\.[0-9]*)?")


def _iso_time(value: object) -> object:
    """An export window's bound written as an ISO 8601 time, as `govrag audit export` takes it: pydantic alone
    also reads a number (`1700000000`, `-5`) as seconds since 1970, which the CLI refuses."""
    if isinstance(value, str) and _SECONDS.fullmatch(value):
        raise ValueError("a time is written in ISO 8601 (2026-11-16T00:00:00Z), not as seconds since 1970")
    return value


WindowBound = Annotated[datetime, BeforeValidator(_iso_time), AfterValidator(utc_bound)]


@dataclass(frozen=True)
class ExportFilters:
    """What a compliance export selects."""

    since: datetime | None = None
    until: datetime | None = None
    subject: str | None = None
    department: str | None = None
    decision: str | None = None
    document_id: str | None = None
    event_type: str | None = None
    request_id: str | None = None


def _printable_filter(value: str) -> str:
    """A free-text filter (`user`, `document_id`) in characters a token's subject may carry (`token_can_carry`), as
    every subject and document id the ledger holds is: a line break, NUL, an escape, DEL, a C1 control, a direction
    override or another invisible character would be written into the export's ledger row and its manifest (a forged
    log line, text shown reversed), and selects nothing."""
    if not token_can_carry(value):
        raise ValueError("holds a line break, a control, format or other unprintable character (an escape, a "
                         "direction override, a zero-width space, ...), which no subject or document id holds")
    return value


# The filters an export takes whose values the ledger keeps (each export's `details.filters`), bounded once for the
# API's query parameters and `govrag audit export`'s options (`api.cli_audit.filter_argument`): anything else is a 422
# naming the filter (a usage error, exit 2), never the value, and never reaches the ledger. `department` is a
# `core.text.DepartmentName`, `event_type` an `EventType`, `decision` a `Decision`.
ExportSubject = Annotated[str, Field(min_length=1, max_length=MAX_SUBJECT_CHARS), AfterValidator(_printable_filter)]
ExportDocumentId = Annotated[str, Field(min_length=1, max_length=DOCUMENT_ID_CHARS), AfterValidator(_printable_filter)]
# A request id as govrag makes one (core.logs.REQUEST_ID_PATTERN); `-` (an event recorded with no request id) is no
# request's. pydantic's regex engine reads `$` as the end of the text alone (a trailing line break is refused).
RequestId = Annotated[str, Field(pattern=REQUEST_ID_PATTERN,
                                 description="an API request's X-Request-ID (32 lower-case hex digits) or a command "
                                 "run's (`cli-` and 32): the events it recorded")]


_UUID = TypeAdapter(uuid.UUID)


def deployment_pin(value: str | uuid.UUID) -> str:
    """The deployment id a verification is pinned to (`GET /v1/audit/verify?deployment_id=`, `--deployment-id` of
    `govrag audit verify` and `verify-export`), as migration 0016 writes one (lower case, hyphenated), from any way of
    writing a UUID the API's parameter takes: one parse for both, so a pin the API accepts the CLI accepts too, and it
    matches the id recorded however it was written; ValueError for anything else."""
    return str(_UUID.validate_python(value))


class VerifyResult(BaseModel):
    """The outcome of walking the chain and checking the signed checkpoints."""

    ok: bool
    checked: int
    first_broken: int | None = None  # the lowest event found broken, by the checkpoints or the rows
    reason: str | None = None
    checkpoints_checked: int = 0
    purged_through: int | None = None
    unanchored: int = 0  # rows checked past the newest signed checkpoint: they could be cut or changed unseen
    deployment_id: str | None = None  # the id every checkpoint and export manifest of this deployment signs
    mirror_line: int | None = None  # the mirror file's line that reads as no checkpoint (`mirror_line_unreadable`)


class ExportCheck(BaseModel):
    """The outcome of checking an export file against its signed manifest (`govrag audit verify-export`)."""

    ok: bool
    rows: int = 0  # the manifest's count, once its signature holds
    reason: str | None = None
    message: str | None = None  # what was found, in a sentence (ids and counts only)
    first_broken: int | None = None  # the lowest row id found broken, when one row is
    line: int | None = None  # the file's line found too long (`row_too_long`) or unreadable (`rows_unreadable`)
    deployment_id: str | None = None
    through_event_id: int | None = None
    signatures: list[str] = []  # those verified: "hmac-sha256" (the checkpoint key), "ed25519" (the public key)
    key_id: str | None = None  # the Ed25519 key the manifest names (none before Ed25519 signatures)


class MirrorCheck(BaseModel):
    """The outcome of checking a checkpoint mirror file with the Ed25519 public key alone (`govrag audit
    verify-mirror`)."""

    ok: bool
    lines: int = 0  # the checkpoints the file holds
    checked: int = 0  # those whose Ed25519 signature holds
    hmac_only: int = 0  # signed before the deployment signed checkpoints with Ed25519: only the checkpoint key checks
    through_event_id: int | None = None  # the newest event a checked checkpoint covers
    reason: str | None = None
    message: str | None = None  # what was found, in a sentence (line numbers and event ids only)
    first_broken: int | None = None  # the earliest line found broken, when one line is
    deployment_id: str | None = None
    key_id: str | None = None  # the public key's


class PublicKey(BaseModel):
    """The Ed25519 public key checking this deployment's export manifests and checkpoints (`GET
    /v1/audit/public-key`)."""

    algorithm: str = "Ed25519"
    key_id: str
    public_key_pem: str
    deployment_id: str


class PublishedKeys(PublicKey):
    """`GET /v1/audit/public-key`: the current key, and `previous`, the public key of each checkpoint key used before
    a rotation (GOVRAG_AUDIT_CHECKPOINT_PREVIOUS_KEYS, in the order set there; [] when none), each checking what its
    key signed before it, as `govrag audit public-key --all` prints them."""

    previous: list[PublicKey]  # always sent ([] when none): required in the OpenAPI schema
