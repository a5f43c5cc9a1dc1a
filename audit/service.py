"""The retrieval ledger: hash-chained retrieval and admin events."""

from __future__ import annotations

import errno
import logging
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, BinaryIO

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy.orm import Session

from audit import export, integrity, repository, training
from audit.integrity import event_hash
from audit.schemas import (
    RETRIEVAL_EVENT,
    AdminEventType,
    Decision,
    ExportCheck,
    ExportFilters,
    ExportFormat,
    MirrorCheck,
    PublicKey,
    PublishedKeys,
    RetrievalRecord,
    VerifyResult,
)
from authz import service as authz_service
from authz.identity import Identity, is_platform_admin
from core import forksafe, metrics
from core.batching import MicroBatcher
from core.db import unit_of_work
from core.errors import ErrorCode, GovragError
from core.logs import mask, mask_secrets, request_id_var
from core.models import AuditCheckpoint, RetrievalEvent, utcnow
from core.settings import Settings
from guard.pii import get_redactor

AUDIT_UNAVAILABLE = "the audit log is unavailable; no answer without an audit record"
CLIENT_DISCONNECTED = "client_disconnected"  # an export streamed by the API whose caller went away before its end

logger = logging.getLogger(__name__)


def mask_questions(questions: list[str]) -> list[str]:
    """Each question with PII (Presidio) and secret-shaped values (patterns) replaced, in one spaCy batch.

    The secret patterns run first too: Presidio may tag the word that introduces a secret (`Bearer` as a person),
    after which the pattern that knows the secret by that word no longer matches."""
    unsecret = [mask_secrets(question) for question in questions]
    return [mask(redacted) for redacted in get_redactor().redact_each(unsecret)]


# Concurrent queries share one masking call (the NER's per-call cost is most of a short question's).
question_masker: MicroBatcher[str, str] = MicroBatcher(mask_questions, name="govrag-mask")


def record_retrieval(*, session: Session, record: RetrievalRecord, settings: Settings | None = None) -> None:
    """Append the event to the chain and return once it is committed; any failure is `unavailable`: no audit,
    no answer. Retrievals arriving together share one transaction (see `_GroupCommit`)."""
    _retrievals.append(session, settings, RetrievalEvent(event_type=RETRIEVAL_EVENT, **vars(record)))


def record_admin_event(*, session: Session, identity: Identity, event_type: AdminEventType | str,
                       department: str | None = None, details: dict[str, Any] | None = None,
                       settings: Settings | None = None, departments: list[str] | None = None) -> None:
    """Append an admin action (role change, kill switch, export, ...) to the same chain; commits the session.

    `details` must be metadata only (names, ids, counts) — never document text, questions, tokens or keys.
    `departments` (several) may replace `department` (one) for actions spanning departments, e.g. exports.
    """
    departments = departments or ([department] if department else [])
    _append(session, settings, [_admin_event(identity, event_type, departments, details or {})])


def _admin_event(identity: Identity, event_type: AdminEventType | str, departments: list[str],
                 details: dict[str, Any]) -> RetrievalEvent:
    """An admin action as a ledger row, not yet linked to the chain."""
    departments = sorted(departments)
    return RetrievalEvent(
        event_type=str(event_type.value if isinstance(event_type, AdminEventType) else event_type),
        request_id=request_id_var.get(),
        subject=identity.subject, groups=list(identity.groups), departments_requested=departments,
        departments_searched=departments, decision=Decision.admin.value, reason=None, question_masked="",
        purpose=None, latency_ms=0.0, chunks=[], details=details)


def _append(session: Session, settings: Settings | None, events: list[RetrievalEvent], *,
            purging_through: int | None = None) -> None:
    """Link `events`, in order, to the end of the chain and commit them, with a signed checkpoint every N rows and at
    each admin action (rows past the newest checkpoint can be cut unseen: an insider's role grant, export or purge
    must not be among them).

    `purging_through`: the retention purge deletes the events through that id in the same transaction, once its
    `retention_purge` event is linked: a purge is never left unrecorded, and never deletes the newest row (SQLite,
    without AUTOINCREMENT, hands the highest id out again once its row is gone)."""
    checkpoint: AuditCheckpoint | None = None
    try:
        with repository.local_chain_lock():
            repository.lock_chain(session)
            previous, checkpointed = repository.chain_end(session)
            for event in events:
                event.created_at, event.prev_hash = utcnow(), previous
                event.latency_ms = float(event.latency_ms) + 0.0  # hashed as read back: 3 as 3.0, -0.0 as 0.0 (SQLite)
                event.hash = previous = event_hash(event)
            repository.add_events(session, events)
            last = events[-1]
            if settings is not None and settings.audit_checkpoint_every > 0 and (
                    last.id - checkpointed >= settings.audit_checkpoint_every or last.decision == Decision.admin):
                checkpoint = integrity.make_checkpoint(session=session, settings=settings, event=last)
            if purging_through is not None:
                repository.delete_through(session, purging_through)
            session.commit()
        for event in events:
            metrics.AUDIT_EVENTS.labels(event_type=event.event_type).inc()
    except Exception as exc:  # any failure (the database, or content it cannot store or hash) is `unavailable`
        session.rollback()
        metrics.AUDIT_WRITE_FAILURES.inc()
        raise GovragError(ErrorCode.unavailable, AUDIT_UNAVAILABLE) from exc
    if checkpoint is not None and settings is not None:
        integrity.mirror_checkpoint(settings, checkpoint)


@dataclass
class _Waiting:
    """One caller's event, until a writer has settled it."""

    event: RetrievalEvent
    settled: bool = False
    failed: bool = False
    failure: GovragError | None = None  # why its write failed, raised from by every caller whose event it carried


class _GroupCommit:
    """Group commit for retrieval events.

    The chain is written one transaction at a time. Whoever gets the chain lock writes every event waiting at
    that moment in one transaction (one advisory lock, one last-hash read, one commit); the callers whose
    events it carried find theirs settled when they get the lock, and return, or raise `unavailable` if that
    write failed, raised from its failure as the writer's own is (a database outage behind it is told as one).
    Every caller still returns only after its own event is committed."""

    def __init__(self) -> None:
        self._waiting: list[_Waiting] = []
        self._guard = threading.Lock()
        forksafe.renewed(self, _GroupCommit._forked)

    def _forked(self) -> None:
        """In a forked child: nothing waiting (the parent's callers write their own events) and a lock of its own."""
        self._waiting, self._guard = [], threading.Lock()

    def append(self, session: Session, settings: Settings | None, event: RetrievalEvent) -> None:
        mine = _Waiting(event)
        with self._guard:
            self._waiting.append(mine)
        with repository.local_chain_lock():
            if not mine.settled:
                with self._guard:
                    batch, self._waiting = self._waiting, []
                self._write(session, settings, batch)
        if mine.failed:  # from the write's failure, whoever wrote it: `unavailable_dependency` tells an outage
            raise GovragError(ErrorCode.unavailable, AUDIT_UNAVAILABLE) from mine.failure

    @classmethod
    def _write(cls, session: Session, settings: Settings | None, batch: list[_Waiting]) -> None:
        """Write the batch in one transaction; if that fails, each event alone (one bad row fails only itself)."""
        failed, failure = True, None
        try:
            _append(session, settings, [waiting.event for waiting in batch])
            failed = False
        except GovragError as error:
            failure = error
            if len(batch) == 1:
                return
            for waiting in batch:
                cls._write(session, settings, [waiting])
        finally:
            for waiting in batch:
                if not waiting.settled:
                    waiting.settled, waiting.failed, waiting.failure = True, failed, failure


_retrievals = _GroupCommit()


def compliance_scope(*, session: Session, settings: Settings, enforcer: Any,
                     identity: Identity) -> set[str] | None:
    """Departments whose events the caller may export; None means every event (global compliance).

    Global compliance is granted by configuration (GOVRAG_COMPLIANCE_OFFICERS, like GOVRAG_ADMINS), never by
    default; per-department compliance is the `compliance` role (permission `export_audit`) in that department.
    """
    if is_platform_admin(identity.subject, identity.groups, settings.compliance_officers):
        return None
    departments = set(authz_service.allowed_departments(session=session, enforcer=enforcer, identity=identity,
                                                        action="export_audit"))
    if not departments:
        raise GovragError(ErrorCode.forbidden, "the compliance role is required to export the audit log")
    return departments


def export_events(*, session: Session, settings: Settings, identity: Identity, scope: set[str] | None,
                  filters: ExportFilters, fmt: ExportFormat) -> Iterator[str]:
    """Record the export in the ledger, then stream the events in `scope` (None: all) and a closing manifest. A window
    whose `since` (inclusive) is after its `until` (exclusive) is refused: its empty export would read as no events."""
    if filters.since is not None and filters.until is not None and filters.since > filters.until:
        raise GovragError(ErrorCode.invalid_request, "since is after until: the export window is inverted (since is "
                                                     "inclusive, until exclusive)")
    if scope is not None and filters.department is not None and filters.department not in scope:
        raise GovragError(ErrorCode.forbidden, "the compliance role is required in this department")
    if scope is not None and not export.scope_fits_a_manifest(scope):
        raise GovragError(ErrorCode.conflict, "the compliance role is held in too many departments to list in an "
                                              "export's manifest: a global compliance officer exports them")
    signer = integrity.signer_for(settings, session)  # before the export is recorded: no key, no export
    through_id = repository.max_event_id(session)
    record_admin_event(session=session, identity=identity, event_type=AdminEventType.export,
                       departments=export_departments(filters, scope), settings=settings,
                       details={"format": fmt.value, "filters": export.filters_as_dict(filters),
                                "through_event_id": through_id, "scope": sorted(scope) if scope else "*"})
    rows = export.select_rows(session=session, departments=scope, filters=filters, through_id=through_id)
    return export.render(rows, fmt, filters=filters, through_id=through_id, departments=scope, signer=signer)


def export_departments(filters: ExportFilters, scope: set[str] | None) -> list[str]:
    """The departments an export's events (`export`, and its `export_failed`) are recorded in: the one it is filtered
    to, else those of its scope (none: global)."""
    return [filters.department] if filters.department else sorted(scope or [])


def record_export_failed(*, settings: Settings, identity: Identity, export_type: AdminEventType,
                         departments: list[str], failure: BaseException | str) -> None:
    """An `export_failed` event after the export event of `export_type`, by the same identity in the same
    departments, naming the failure: a fixed reason as given (`CLIENT_DISCONNECTED`), else an error's errno name or
    class, never a path nor any data. Written in a session of its own: the export's may be what failed (its
    connection lost). When it cannot be recorded (the database lost), a warning says so and the caller says the
    export's own failure."""
    details = {"export": export_type.value, "error": _failure_name(failure)}
    try:
        with unit_of_work(settings.resolved_database_url) as session:
            record_admin_event(session=session, identity=identity, event_type=AdminEventType.export_failed,
                               departments=departments, settings=settings, details=details)
    except Exception as unrecorded:
        logger.warning("the failed export could not be recorded as failed (%s)", type(unrecorded).__name__)


def _failure_name(failure: BaseException | str) -> str:
    if isinstance(failure, str):
        return failure
    named = errno.errorcode.get(failure.errno, "") if isinstance(failure, OSError) and failure.errno else ""
    return named or type(failure).__name__


def verify_export(*, export_file: BinaryIO, settings: Settings, session: Session | None,
                  deployment_id: str | None = None, public_key: Ed25519PublicKey | None = None,
                  manifest_copy: BinaryIO | None = None) -> ExportCheck:
    """Check an export file (seekable, opened for bytes; its body read once, a line at a time, each hashed and
    parsed) against its signed manifest, reading no ledger row; and `manifest_copy` (FILE.manifest.json,
    opened for bytes), when given, against that manifest. `deployment_id`: the deployment it must come from (default:
    this database's).
    With `public_key`, its Ed25519 signature is checked with that alone (an auditor's machine, holding no secret), and
    `deployment_id` is required: deployments sharing a checkpoint key (a clone) share the public key too; without a
    session, the configured checkpoint key and `deployment_id` are all it takes."""
    if public_key is not None:
        if deployment_id is None:
            raise GovragError(ErrorCode.invalid_request, "checking with the public key takes the deployment id the "
                                                         "export must come from (--deployment-id): deployments sharing "
                                                         "a checkpoint key share the public key")
        return export.check_export(export_file, by=public_key, deployment_id=deployment_id, manifest_copy=manifest_copy)
    if session is not None:
        signer = integrity.signer_for(settings, session)
    elif deployment_id is not None and settings.audit_checkpoint_key is not None:
        signer = integrity.Signer(integrity.checkpoint_key(settings), deployment_id)
    else:
        raise GovragError(ErrorCode.invalid_request, "without the database, checking an export takes the deployment "
                                                     "id and GOVRAG_AUDIT_CHECKPOINT_KEY, or the public key")
    return export.check_export(export_file, by=signer, deployment_id=deployment_id or signer.deployment_id,
                               manifest_copy=manifest_copy)


def verify_mirror(*, mirror: BinaryIO, public_keys: Sequence[Ed25519PublicKey], deployment_id: str) -> MirrorCheck:
    """Check a checkpoint mirror file (opened for bytes; its lines read with a bound, `integrity.mirror_lines`) with
    Ed25519 public keys alone (an auditor's machine: no secret, no database; the keys used before a rotation after the
    current one), as checkpoints of the deployment `deployment_id`: deployments sharing a checkpoint key share the
    public key too."""
    return integrity.check_mirror(integrity.mirror_lines(mirror), public_keys=public_keys,
                                  deployment_id=deployment_id)


def public_key(*, session: Session, settings: Settings) -> PublicKey:
    """The Ed25519 public key that checks this deployment's export manifests and checkpoints, with its key id."""
    return _published(integrity.signer_for(settings, session))


def previous_public_keys(*, settings: Settings, deployment_id: str) -> list[PublicKey]:
    """The public keys of the checkpoint keys used before the current one (GOVRAG_AUDIT_CHECKPOINT_PREVIOUS_KEYS), as
    configured: each checks what its key signed before a rotation."""
    return [_published(signer) for signer in integrity.previous_signers(settings, deployment_id)]


def published_keys(*, session: Session, settings: Settings) -> PublishedKeys:
    """The current public key with the previous ones (`previous_public_keys`): what an auditor needs to check exports
    and mirror lines signed before a rotation too."""
    current = public_key(session=session, settings=settings)
    return PublishedKeys(**current.model_dump(),
                         previous=previous_public_keys(settings=settings, deployment_id=current.deployment_id))


def _published(signer: integrity.Signer) -> PublicKey:
    """What may be shown of a signer: its Ed25519 public key, the key's id and the deployment id."""
    key = signer.public_key()
    return PublicKey(key_id=integrity.key_id(key), public_key_pem=integrity.public_key_pem(key),
                     deployment_id=signer.deployment_id)


def verify(*, session: Session, settings: Settings, deployment_id: str | None = None) -> VerifyResult:
    """Walk the chain and the signed checkpoints, of the deployment `deployment_id` if given."""
    return integrity.verify(session=session, settings=settings, deployment_id=deployment_id)


def purge_expired(*, session: Session, settings: Settings, identity: Identity,
                  now: datetime | None = None) -> int:
    """Retention: a signed purge checkpoint at the last expired row, the `retention_purge` event and the delete
    through that row, in one transaction; returns rows removed. The delete once committed before its event, the
    database going between the two left rows deleted that no event named (and a run again found nothing to purge)."""
    with repository.local_chain_lock():  # from the chain's lock to the commit of the purge with its event
        checkpoint = integrity.purge_checkpoint(session=session, settings=settings, now=now)
        if checkpoint is None:
            return 0
        details = {"rows": checkpoint.event_count, "through_event_id": checkpoint.last_event_id,
                   "retention_days": settings.audit_retention_days}
        _append(session, settings, [_admin_event(identity, AdminEventType.retention_purge, [], details)],
                purging_through=checkpoint.last_event_id)
    integrity.mirror_checkpoint(settings, checkpoint)
    return checkpoint.event_count


def export_training_data(*, session: Session, settings: Settings, identity: Identity,
                         department: str) -> Iterator[str]:
    """Read the department's chunks and their documents' keys, record the training-data export, then stream the
    redacted chunks queries may cite (`training.training_rows`) and a manifest, which lists the documents left out as
    they no longer open. What fails the whole export (the vector store unavailable, a department key that does not
    open: DepartmentKeyUnreadable) fails it before the ledger says it happened."""
    if department not in authz_service.list_departments(session=session):
        raise GovragError(ErrorCode.not_found, "no such department")
    payloads = training.department_payloads(settings, department)
    sources = training.export_sources(session=session, settings=settings, department=department, payloads=payloads)
    record_admin_event(session=session, identity=identity, event_type=AdminEventType.training_export,
                       department=department, settings=settings, details={"department": department})
    unreadable: set[str] = set()  # documents left out as they no longer open: filled as the rows are read
    rows = training.training_rows(sources, unreadable=unreadable)
    return training.render_jsonl(rows, department=department, unreadable=unreadable)


def checkpoint_now(*, session: Session, settings: Settings) -> tuple[int | None, bool]:
    """Sign a checkpoint at the current end of the chain unless the newest one covers it: (the end's event id, None
    when the ledger is empty; whether one was signed)."""
    return integrity.checkpoint_now(session=session, settings=settings)
