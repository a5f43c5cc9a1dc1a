"""ORM classes. The schema changes only through Alembic (migrations/); the classes describe the schema the migrations
build, indexes and server defaults included (test_the_migrated_schema_is_the_models compares them)."""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    false,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from core.logs import stored_request_id

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    """Timezone-aware now, the only clock the models use."""
    return datetime.now(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class DocumentStatus(StrEnum):
    queued = "queued"
    processing = "processing"
    ready = "ready"
    failed = "failed"
    deleted = "deleted"
    quarantined = "quarantined"  # issue 3: above the department's AI approval, or instruction-like text
    rejected = "rejected"  # issue 3: an admin refused a quarantined document; its key is shredded


UNFINISHED = (DocumentStatus.queued, DocumentStatus.processing)  # a document or job still in the pipeline
RETIRED = (DocumentStatus.deleted, DocumentStatus.rejected)  # final: the key is shredded, nothing moves it back
MAX_CRASHED_RUNS = 3  # runs a worker died in (a kill, the OOM killer, a parser crash) before the document fails


DEPARTMENT_PATTERN = r"^[a-z][a-z0-9_-]{0,62}$"  # a department's name: lower-case letters, digits, '-' or '_'


class Department(Base):
    __tablename__ = "departments"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


DOCUMENT_ID_CHARS = 36  # a UUID in text


class Document(Base):
    __tablename__ = "documents"
    __table_args__ = (
        Index("ix_documents_department_created", "department", "created_at", "id"),  # listing pages
        # an upload's duplicates (find_duplicate, oldest first; failed_copies): created_at and id in it, or SQLite,
        # without statistics, reads all of the department's documents through the listing index for its order (0015)
        Index("ix_documents_department_sha256_created", "department", "sha256", "created_at", "id"),
        # the /metrics counts by department and status (audit.repository.document_counts), read from it alone (0017)
        Index("ix_documents_department_status_chunks", "department", "status", "chunk_count"),
    )

    id: Mapped[str] = mapped_column(String(DOCUMENT_ID_CHARS), primary_key=True)
    # Indexed alone too, not only first in the two indexes above: about 15 times smaller than either, so a
    # department-wide lookup (review queue, re-index, key rotation, training export) reads 4 index pages, not 33,
    # for 2,500 documents on PostgreSQL.
    department: Mapped[str] = mapped_column(ForeignKey("departments.name"), index=True)
    title: Mapped[str] = mapped_column(String(300))
    content_type: Mapped[str] = mapped_column(String(120))
    size_bytes: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    acl_groups: Mapped[list[str]] = mapped_column(JSON, default=list)
    classification: Mapped[str] = mapped_column(String(32), default="internal")
    status: Mapped[str] = mapped_column(String(16), default=DocumentStatus.queued)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    chunk_count: Mapped[int] = mapped_column(Integer, default=0)
    uploaded_by: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)
    # issue 3: the uploader's level (classification is the level after the content raised it)
    declared_classification: Mapped[str | None] = mapped_column(String(32), nullable=True)
    classification_reasons: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)
    flagged_chunks: Mapped[int] = mapped_column(Integer, default=0, server_default="0")  # instruction-like chunks found
    review_reason: Mapped[str | None] = mapped_column(String(500), nullable=True)  # why quarantined
    approved_by: Mapped[str | None] = mapped_column(String(255), nullable=True)  # admin who released it
    approved_level: Mapped[str | None] = mapped_column(String(32), nullable=True)  # the level that admin was shown
    parent_id: Mapped[str | None] = mapped_column(String(36), nullable=True, index=True)  # e-mail of an attachment
    # The department's copy an attachment was refused as a duplicate of (its reason names it too, in words a release
    # may change: ingestion/service.py `DuplicateUpload`); None for any other document (0022)
    duplicate_of: Mapped[str | None] = mapped_column(String(DOCUMENT_ID_CHARS), nullable=True)
    # Each run of the pipeline writes its points (and placeholder map) under a generation of its own: the newest one
    # claimed, and the one queries cite (None: none, as before its first run ends ready, or once quarantined). A
    # re-index leaves the served one in place until its run ends ready (ingestion/service.py), unless it withholds it.
    index_generation: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    served_generation: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # The generations up to this one were sealed before chunk contexts bound their run (0020): their chunks open under
    # the context that names neither generation nor department; every later one's only under the one that names both
    # (ingestion/pipeline.py `chunk_context`). Read here, never from the vector store: a payload cannot downgrade.
    unbound_through: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # Likewise for placeholder maps (0021): the generations up to this one kept maps sealed under the context naming
    # the document only; every later one's opens only under the one naming its run too (core/blobs.py `_map_context`).
    maps_unbound_through: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # Index withheld by a fail-closed re-index (not `serve_previous`; nothing to do with the output guard's
    # `withheld` answers): it stopped serving the document's index until its run ends ready; a run that fails leaves
    # it failed, the index it served never served again (ingestion/repository.py `withhold`, `_serving`).
    withheld: Mapped[bool] = mapped_column(default=False, server_default=false())


class IngestionPolicy(Base):
    """Issue 3: a department's ingestion rules: AI approval level, injection action, keywords, redaction rules."""

    __tablename__ = "ingestion_policies"

    department: Mapped[str] = mapped_column(ForeignKey("departments.name"), primary_key=True)
    ai_max_level: Mapped[str] = mapped_column(String(32), default="confidential")
    injection_action: Mapped[str] = mapped_column(String(16), default="exclude")  # exclude | quarantine
    keywords: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)  # keyword → level it raises to
    allow_list: Mapped[list[str]] = mapped_column(JSON, default=list)  # values never redacted
    recognizers: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)  # custom regex + checksum
    # keep a sealed placeholder → original map
    reversible: Mapped[bool] = mapped_column(default=False, server_default=false())
    updated_by: Mapped[str] = mapped_column(String(255), default="")
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)


class IngestionJob(Base):
    __tablename__ = "ingestion_jobs"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    document_id: Mapped[str] = mapped_column(ForeignKey("documents.id", ondelete="CASCADE"), index=True)
    # Indexed for the job sweep (workers/dispatch.py), which looks for the few unfinished jobs every few seconds
    status: Mapped[str] = mapped_column(String(16), default=DocumentStatus.queued, index=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # Runs that neither ended nor handed the job back for a retry: the worker died in them (ingestion/service.py)
    crashed_runs: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)
    # When its task reached the broker; empty until then (see workers/dispatch.py: an unsent job is sent again)
    sent_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # The request id of the request or command run that queued it (an upload's, a re-index's, a run's for the jobs it
    # queues); empty when queued outside one, or before revision 0024. Every send of its task carries it, the sweep's
    # and a start's too (workers/dispatch.py), so each of its runs logs under it
    request_id: Mapped[str | None] = mapped_column(String(64), nullable=True, default=stored_request_id)


class PendingPurge(Base):
    """A retired document (deleted, or rejected from quarantine) whose vectors and stored bytes may still exist: its
    key was shredded in the transaction that wrote this row; the row goes once they are gone (ingestion/purge.py)."""

    __tablename__ = "pending_purges"

    document_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    department: Mapped[str] = mapped_column(String(64))
    retired_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)


class WrappedKey(Base):
    """A data key encrypted under its parent key (document → department → master)."""

    __tablename__ = "wrapped_keys"
    __table_args__ = (UniqueConstraint("kind", "owner", "version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))  # "department" | "document"
    owner: Mapped[str] = mapped_column(String(64))  # department name or document id
    version: Mapped[int] = mapped_column(Integer, default=1)
    parent_version: Mapped[int] = mapped_column(Integer)  # version of the wrapping key
    wrapped: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class MasterKeyVerifier(Base):
    """A fixed text sealed under one master key version, stored while that version is in use (core/keystore.py): a
    keyring whose key of that version does not open it is the wrong one, with no department key stored yet too."""

    __tablename__ = "master_key_verifiers"

    version: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)  # the master key version
    sealed: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class CasbinRule(Base):
    """Casbin policy rows, read and written only through the casbin adapter."""

    __tablename__ = "casbin_rule"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    ptype: Mapped[str | None] = mapped_column(String(255))
    v0: Mapped[str | None] = mapped_column(String(255))
    v1: Mapped[str | None] = mapped_column(String(255))
    v2: Mapped[str | None] = mapped_column(String(255))
    v3: Mapped[str | None] = mapped_column(String(255))
    v4: Mapped[str | None] = mapped_column(String(255))
    v5: Mapped[str | None] = mapped_column(String(255))

    def __str__(self) -> str:
        values = [v for v in (self.v0, self.v1, self.v2, self.v3, self.v4, self.v5) if v is not None]
        return ", ".join([self.ptype or "", *values])


class RetrievalEvent(Base):
    """One row per retrieval decision; hash-chained so edits are detectable."""

    __tablename__ = "retrieval_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    request_id: Mapped[str] = mapped_column(String(64), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    event_type: Mapped[str] = mapped_column(String(32), default="retrieval", index=True)
    subject: Mapped[str] = mapped_column(String(255), index=True)
    groups: Mapped[list[str]] = mapped_column(JSON, default=list)
    # None is stored as JSON null (none named), never SQL NULL: the column is NOT NULL
    departments_requested: Mapped[list[str] | None] = mapped_column(JSON, nullable=False, default=list)
    departments_searched: Mapped[list[str]] = mapped_column(JSON, default=list)
    decision: Mapped[str] = mapped_column(String(32))  # audit.schemas.Decision
    reason: Mapped[str | None] = mapped_column(String(255), nullable=True)
    chunks: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    question_masked: Mapped[str] = mapped_column(Text)
    purpose: Mapped[str | None] = mapped_column(String(255), nullable=True)
    latency_ms: Mapped[float] = mapped_column(default=0.0)
    # issue 6: who decided with what policy, what the guards said, which model, which kill-switch mode.
    roles: Mapped[list[str]] = mapped_column(JSON, default=list, server_default=text("'[]'"))
    policy_version: Mapped[str | None] = mapped_column(String(64), nullable=True)
    guard_verdicts: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict, server_default=text("'{}'"))
    model_backend: Mapped[str | None] = mapped_column(String(64), nullable=True)
    model_id: Mapped[str | None] = mapped_column(String(255), nullable=True)
    kill_switch_mode: Mapped[str | None] = mapped_column(String(32), nullable=True)
    # admin events: what changed
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict, server_default=text("'{}'"))
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))


class AuditCheckpoint(Base):
    """A signed statement "the ledger ran up to event N with hash H" (HMAC key outside the database)."""

    __tablename__ = "audit_checkpoints"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    kind: Mapped[str] = mapped_column(String(16), default="periodic")  # periodic | purge | manual
    last_event_id: Mapped[int] = mapped_column(Integer)
    last_hash: Mapped[str] = mapped_column(String(64))
    event_count: Mapped[int] = mapped_column(Integer, default=0)  # purge: rows removed up to last_event_id
    signature: Mapped[str] = mapped_column(String(128))
    # Ed25519 over the v3 statement (base64; migration 0019): None on checkpoints signed before it (their HMAC is v2/v1)
    signature_ed25519: Mapped[str | None] = mapped_column(String(88), nullable=True)


class Clearance(Base):
    """Issue 4: the highest classification a subject (user or group:<name>) may read in a department."""

    __tablename__ = "authz_clearances"
    __table_args__ = (UniqueConstraint("subject", "department"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    subject: Mapped[str] = mapped_column(String(255))
    department: Mapped[str] = mapped_column(String(64), index=True)
    level: Mapped[str] = mapped_column(String(32))  # public | internal | confidential | restricted
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)


class PolicyState(Base):
    """Issue 4: one row; its version rises with every policy change so every process reloads."""

    __tablename__ = "authz_policy_state"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version: Mapped[int] = mapped_column(Integer, default=1)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)


class BlobStore(Base):
    """One row: the id of this database's blob store, which its marker file holds (core/blobs.py); recorded at the
    first start that opens a store, so a start finding another store's marker refuses it."""

    __tablename__ = "blob_store"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)  # always 1
    store_id: Mapped[str] = mapped_column(String(36))
    recorded_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Deployment(Base):
    """One row, minted by migration 0016: the random id of this deployment, signed into every audit checkpoint and
    export manifest so that another deployment's (sharing the checkpoint key) is not taken for this one's."""

    __tablename__ = "deployment"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)  # always 1
    deployment_id: Mapped[str] = mapped_column(String(36))
    minted_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class GuardControl(Base):
    """Guard settings of one scope ("global" or a department): firewall mode, kill-switch mode, canary (issue 5)."""

    __tablename__ = "guard_controls"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    scope: Mapped[str] = mapped_column(String(64), unique=True)
    firewall_mode: Mapped[str | None] = mapped_column(String(8), nullable=True)  # None: the settings default
    kill_mode: Mapped[str] = mapped_column(String(16), default="normal", server_default="normal")
    reason: Mapped[str | None] = mapped_column(String(500), nullable=True)
    canary: Mapped[str | None] = mapped_column(String(64), nullable=True)
    updated_by: Mapped[str] = mapped_column(String(255), default="", server_default="")
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)
