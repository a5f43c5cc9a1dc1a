"""Upload acceptance and the ingestion run behind the Celery task."""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import json
import logging
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import Enum, auto
from typing import Any

from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from core import blobs, crypto, memory, metrics
from core.db import get_session_factory, keep_idle_transaction_open, unit_of_work
from core.errors import ErrorCode, GovragError, MasterKeyRefused, Unavailable, loading, unavailable_dependency
from core.keystore import DepartmentKeyUnreadable, KeyState, keystore_for
from core.models import MAX_CRASHED_RUNS, RETIRED, UNFINISHED, Document, DocumentStatus, IngestionJob
from core.settings import Settings
from core.text import printable_name
from guard.injection import get_scanner
from guard.pii import REDACTED_ENTITIES, Numbering, get_redactor
from guard.pii_rules import RedactionRules
from guard.placeholders import document_placeholder
from ingestion import formats, purge, quarantine, repository
from ingestion.classify import cut_title
from ingestion.parse import ParseLimits, check_zip_container
from ingestion.pipeline import DocumentFacts, IndexRun, IngestionRules, Protected, protect
from ingestion.schemas import (
    Classification,
    DocumentPage,
    DocumentStatusOut,
    DocumentSummaryOut,
    JobStatusOut,
    ListedStatus,
    RevealOut,
    UploadAccepted,
)
from ingestion.sniff import ZIP_BASED_TYPES, sniff_content_type
from retrieval.embeddings import get_embedder, release_embedders
from retrieval.store import open_vector_store, payload_generation

logger = logging.getLogger(__name__)

MAX_TITLE_CHARS = 300
_TITLE_READ_CHARS = 4 * MAX_TITLE_CHARS  # of a longer name, what is redacted (and then cut: classify.cut_title)
MAX_ATTACHMENT_DEPTH = 3  # levels of attachments followed below an uploaded e-mail (attached e-mails nest)
ATTACHMENT_FAILED = "the attachment could not be taken (an internal error)"
CRASHED_TOO_OFTEN = f"ingestion stopped: the worker died {MAX_CRASHED_RUNS} times while processing this document"
ATTACHMENTS_UNLISTED = ("the e-mail's attachments could not be read (an internal error); none was ingested: a re-index "
                        "naming the e-mail takes them again")
ATTACHMENTS_KEY_UNREADABLE = ("the e-mail's data key does not open under its department key, so none of its "
                              "attachments was ingested: delete the e-mail and upload it again")
ATTACHMENTS_DEPARTMENT_KEY_UNREADABLE = ("the key of the e-mail's department does not open under the master key (its "
                                         "key row was altered in the database), so none of its attachments was "
                                         "ingested: once that row is restored from a backup, a re-index naming the "
                                         "e-mail takes them again")
# The failed child "attachments" that an attachment step which took nothing leaves: the step runs again after the
# e-mail's next run (a re-index), that record retired. With the reasons earlier versions wrote.
_STEP_FAILED = frozenset({
    ATTACHMENTS_UNLISTED, ATTACHMENTS_KEY_UNREADABLE, ATTACHMENTS_DEPARTMENT_KEY_UNREADABLE,
    "the e-mail's attachments could not be read (an internal error); none was ingested",
    "the e-mail's data key does not open under its department key, so none of its attachments was ingested: upload it "
    "again",
    "the key of the e-mail's department does not open under the master key (its key row was altered in the database), "
    "so none of its attachments was ingested: once that row is restored, delete the e-mail and upload it again",
})
# A duplicate's refusal names the department's copy (`DuplicateUpload`); a refused attachment keeps it as its reason,
# shown whole only to a caller who may see that copy (`_shown_copy`), others reading the e-mail get DUPLICATE_HIDDEN.
DUPLICATE_HIDDEN = "duplicate upload: a document already in this department has this content"
KEY_MISSING = "the document's data key is missing: upload it again"
KEY_UNREADABLE = "the document's data key does not open under its department key: upload it again"
_KEY_LOST = {KeyState.missing: KEY_MISSING, KeyState.unreadable: KEY_UNREADABLE}  # a claim's failure, by key state
DEPARTMENT_KEY_UNREADABLE = ("the key of the document's department is missing or does not open under the master "
                             "key (its key row was deleted or altered in the database): once that row is restored from "
                             "a backup, a re-index naming this document runs it again")
ORIGINAL_UNREADABLE = "the document's stored original is missing or does not open under its key: upload it again"
SERVED_MAP_UNREADABLE = ("the document's placeholder map does not open under its key or does not parse (altered): "
                         "upload it again")
MAP_UNREADABLE = ("the document's placeholder map does not open under its key or does not parse (altered), so its "
                  "placeholders cannot be numbered as before: upload it again")


class DuplicateUpload(GovragError):
    """An upload refused as a duplicate of the department's document `duplicate_of`, which its message names too: a
    refused attachment records the id (`Document.duplicate_of`), read rather than its reason's words, and the API's 409
    says it in its error body's `duplicate_of`."""

    def __init__(self, copy_id: str) -> None:
        super().__init__(ErrorCode.duplicate_upload, f"{repository.DUPLICATE_OF}{copy_id}")
        self.duplicate_of = copy_id


def accept_upload(
    *, session: Session, settings: Settings, uploaded_by: str, department: str, filename: str | None, data: bytes,
    title: str | None, acl_groups: list[str], classification: Classification, parent_id: str | None = None,
) -> UploadAccepted:
    """Validate the bytes, store them encrypted and queue a job. The caller commits (which releases the lock on
    this content that the duplicate check takes), then enqueues."""
    if len(data) > settings.max_upload_bytes:
        raise GovragError(ErrorCode.payload_too_large, f"file exceeds the {settings.max_upload_bytes} byte limit")
    content_type = sniff_content_type(data, filename)
    if content_type in ZIP_BASED_TYPES:
        check_zip_container(data, parse_limits(settings))  # a zip bomb is refused before it is stored
    sha256 = hashlib.sha256(data).hexdigest()
    repository.lock_content(session, department=department, sha256=sha256)  # copies at once: one gets in, others 409
    duplicate = repository.find_duplicate(session, department=department, sha256=sha256)
    if duplicate is not None:
        # named: whoever may upload to the department may see each of its documents (authz may_see_document)
        raise DuplicateUpload(duplicate.id)
    blobs.decide_first_use(settings.blob_dir)  # before this transaction's first write (the key's)
    document_id, job_id = str(uuid.uuid4()), str(uuid.uuid4())
    key = keystore_for(settings).create_document_key(session=session, department=department,
                                                     document_id=document_id)
    blobs.write_sealed(settings.blob_dir, document_id, key, data)
    session.add(Document(
        id=document_id, department=department, title=_title(session, department, title, filename),
        content_type=content_type, size_bytes=len(data), sha256=sha256, acl_groups=acl_groups,
        classification=classification.value, declared_classification=classification.value,
        status=DocumentStatus.queued, uploaded_by=uploaded_by, parent_id=parent_id,
    ))
    session.add(IngestionJob(id=job_id, document_id=document_id, status=DocumentStatus.queued))
    session.flush()
    return UploadAccepted(document_id=document_id, job_id=job_id)


def live_copy(*, session: Session, department: str, data: bytes) -> str | None:
    """The id of the department's document holding this content, which an upload of it is refused as a duplicate
    of (`accept_upload`), or None."""
    duplicate = repository.find_duplicate(session, department=department, sha256=hashlib.sha256(data).hexdigest())
    return duplicate.id if duplicate is not None else None


def run_ingestion(*, settings: Settings, document_id: str, job_id: str) -> list[UploadAccepted]:
    """Process one queued document to ready, quarantined or failed. Unexpected errors propagate for a retry. A run
    whose job was handed back while it went on (a re-index: its rules may predate a policy change) writes nothing
    and starts again from the claim, under the rules of that time. Each run writes its points under an index
    generation of its own, beside those the document serves (a re-index with `serve_previous` leaves them
    answering) until it ends. Returns the jobs its end queued, for the caller to send: the runs of an e-mail's
    attachments raised to its level (`_raise_attachments`)."""
    raised: list[UploadAccepted] = []
    while True:
        with run_hold(settings) as hold:
            if _run_once(settings, document_id, job_id, raised, hold):
                return raised


@contextlib.contextmanager
def run_hold(settings: Settings) -> Iterator[Session]:
    """A session of the run's own whose transaction stays open while the run lives: its claim holds itself live in
    it (repository.hold_run), so another delivery's claim meanwhile (the broker's, once the task outlived the
    visibility timeout) counts no crash of it. It connects (`_start`) only once the delivery finds its job to claim,
    before the claim locks anything: a late duplicate of a job that ended, or a delivery whose document was deleted,
    takes no connection for it. Ended with the run, whatever ends it; a process that dies ends it with itself, and
    the next claim counts that crash."""
    hold = get_session_factory(settings.resolved_database_url)()
    try:
        yield hold
    finally:
        _let_go(hold)


def _let_go(hold: Session) -> None:
    """End the run's hold. Its connection lost during the run (the database restarted, a proxy dropped the idle
    session) took the lock with it and leaves nothing to release: its rollback's error is not the run's, which has
    ended (its outcome written) or raises its own."""
    try:
        hold.close()
    except DBAPIError:
        logger.warning("a run's hold of its job was lost with its database connection before the run ended")


def load_models(settings: Settings) -> None:
    """Load the models a run uses, once per process. A worker does as it starts (workers/tasks.py): a run loading the
    PII model itself does so in `_claim` (the stored title's re-redaction), inside the transaction holding the
    document's row locks, for seconds, and a crash there rolls back the count of crashed runs with the claim. One that
    does not load is BrokenInstall, naming it."""
    with loading("the embedding model"):
        get_embedder(settings.embedding_backend)
    with loading("the PII model"):
        get_redactor()
    with loading("the injection scanner's weights"):
        get_scanner()


def check_models(settings: Settings) -> None:
    """`load_models`, then the models let go: `govrag worker` says a broken install in one line before Celery starts,
    not as a traceback per child with every document then failing. Each child it forks loads its own
    (workers/tasks.py): a model library's threads do not survive a fork. The heap they leave freed goes back to the
    system, not kept by the parent for as long as it runs."""
    load_models(settings)
    release_embedders()
    get_redactor.cache_clear()
    get_scanner.cache_clear()
    memory.release_freed_heap()


def _run_once(settings: Settings, document_id: str, job_id: str, raised: list[UploadAccepted],
              hold: Session) -> bool:
    """One run of the job, live while `hold` is open (`run_hold`); False when it goes again (its job was handed
    back: `_start` claims the document anew). The jobs its end queued on attachments it raised are added to
    `raised`."""
    claimed = _start(settings, document_id, job_id, hold)
    if claimed is None:
        return True
    facts, key, rules = claimed
    try:
        data = _original(settings, document_id, key)
        result = protect(data, facts, key=key, embedder=get_embedder(settings.embedding_backend),
                         redactor=get_redactor(), max_chars=settings.chunk_max_chars, rules=rules,
                         scanner=get_scanner(), limits=parse_limits(settings),
                         previous_numbering=_previous_numbering(settings, facts, key) if rules.reversible else None)
    except GovragError as exc:  # permanent: a bad or over-limit file, an original lost; retrying cannot help
        if unavailable_dependency(exc) is not None:
            raise  # raised from an outage: no fault of the document, waited out as one (the task retries)
        logger.info("ingestion failed permanently for document %s", document_id)
        return _finish(settings, document_id, job_id, DocumentStatus.failed, error=exc.message,
                       generation=facts.generation, keep_numbering=rules.reversible) is not RunEnd.again
    if rules.reversible and (result.numbering.placeholders or result.numbering.highest):
        blobs.write_sealed_map(settings.blob_dir, document_id, key, result.numbering.to_json(), facts.generation,
                               department=facts.department)
    if result.review_reason is None:
        open_vector_store(settings).upsert(facts.department, result.points)  # beside the served generation's
    status = DocumentStatus.ready if result.review_reason is None else DocumentStatus.quarantined
    outcome = functools.partial(_record_outcome, settings, facts, result, raised)
    end = _finish(settings, document_id, job_id, status, chunk_count=len(result.points), outcome=outcome,
                  generation=facts.generation, keep_numbering=rules.reversible,
                  email=facts.content_type in formats.MAIL_TYPES)
    if end is RunEnd.written:
        logger.info("ingested document %s: %s, %d chunks, %d flagged", document_id, status, len(result.points),
                    len(result.flagged))
    else:
        raised.clear()  # its outcome was not written
    return end is not RunEnd.again


def _record_outcome(settings: Settings, facts: DocumentFacts, result: Protected, raised: list[UploadAccepted],
                    session: Session) -> None:
    """Store what the pipeline decided about the document (levels, reasons, flags; never content), in the
    transaction writing its run's end; an e-mail's attachments are raised to its level with it
    (`_raise_attachments`), the jobs queued on them added to `raised`."""
    repository.record_outcome(session, document_id=facts.document_id, classification=result.verdict.level.value,
                              declared=facts.classification.value, reasons=list(result.verdict.reasons),
                              flagged=len(result.flagged), review_reason=result.review_reason)
    if facts.content_type in formats.MAIL_TYPES:
        raised.extend(_raise_attachments(session, settings, facts.document_id, result.verdict.level))


def _raise_attachments(session: Session, settings: Settings, email_id: str,
                       level: Classification) -> list[UploadAccepted]:
    """Bring every attachment below the e-mail (theirs too) declared below its new `level` up to it, and run each
    again under that floor, withheld until its run ends (quarantine.run_withheld): a run raising the e-mail (a rule
    added since, then a re-index) left them at the level they were taken at, their content served to readers the
    e-mail is now hidden from. Points are never relabelled in place (their sealed text is bound to its level:
    pipeline.chunk_context): the run writes them anew. The department and ACL are the e-mail's for good (a re-index
    changes neither). Never lowered: a run finding the e-mail lower (a rule removed) leaves them as they are, so no
    re-index widens who sees an attachment. Content several e-mails carry is taken once (a duplicate is refused),
    under the e-mail that took it, whose level it follows; another carrier's raise reaches its refused copy, a
    record, at whose level the content is taken again should that e-mail ever take it (purge.ask_carrier). Returns
    the new jobs, for the run's caller to send once committed (one never sent is the sweep's, as any job is)."""
    lower = [each.value for each in Classification if each.rank < level.rank]
    raised = [attachment for attachment in repository.descendants(session, email_id)
              if attachment.status not in RETIRED and (attachment.declared_classification or attachment.classification)
              in lower]
    queued = []
    for attachment in repository.in_row_order(raised):
        repository.raise_level(session, attachment.id, level.value, lower)  # takes its row lock, unless retired
        # its status as that lock leaves it, not as read before: a re-index naming a failed one and a claim of its
        # job (at the floor below) may have committed meanwhile, and its run must go again
        session.refresh(attachment)
        if attachment.status in (DocumentStatus.failed, *RETIRED):  # serves nothing; a re-index naming a failed one
            continue  # runs it at this floor
        if (job_id := quarantine.run_withheld(session, settings, attachment)) is not None:  # else its run goes again
            queued.append(UploadAccepted(document_id=attachment.id, job_id=job_id))
    if raised:
        logger.info("document %s raised %d attachment(s) to its level", email_id, len(raised))
    return queued


def spawn_attachments(*, settings: Settings, document_id: str) -> list[UploadAccepted]:
    """Queue each attachment of an ingested e-mail as a child document, once (the caller enqueues).

    Children inherit the department, the ACL, and the e-mail's level (content-raised, so no attachment is visible to
    someone the e-mail is hidden from) as their declared floor, raised with it by its later runs
    (`_raise_attachments`); attached e-mails are followed MAX_ATTACHMENT_DEPTH levels below the upload. An
    attachment that cannot be taken (its type, a limit, a duplicate, unreadable, too deep, one too many) is kept as
    a failed child with the reason: nothing disappears without a trace. Attachments
    that cannot be listed, or an e-mail whose key row (or its department's) no longer opens, leave one failed child
    for all of them; the task does not retry what no retry can open, but the e-mail's next run (a re-index naming
    it) takes them again, that record retired. Once attachments were taken, a later step takes again only those
    whose refusal may have passed (`_retaken`), whatever the e-mail's run is doing (not retired): a step asked for
    content no longer live (purge.ask_carrier) never waits on a run of the e-mail (a re-index queued meanwhile) that
    may fail; it ends the jobs queued for the e-mail's step alone, and what they were asked to take that it cannot
    falls to the next e-mail carrying it. Returns the jobs to send: the attachments', and that e-mail's step.
    """
    with unit_of_work(settings.resolved_database_url) as session:
        line = repository.lock_lineage(session, document_id)  # a deletion above in flight commits first, or waits
        parent = _current(session, document_id)  # its level as an end of its run or of one above it last wrote it
        earlier = repository.children(session, document_id)
        if parent is None or parent.content_type not in formats.MAIL_TYPES or parent.status in RETIRED:
            return []
        too_deep = len(line) - 1 >= MAX_ATTACHMENT_DEPTH  # e-mails above this one
        if not all(_step_failure(child) for child in earlier):
            return _retake_attachments(session, settings, parent, earlier, too_deep)
        if parent.status not in repository.REINDEXED:  # the first step follows the run: its level is theirs
            return []
        _retire_records(session, earlier)
        return _take_attachments(session, settings, parent, too_deep)


def _step_failure(child: Document) -> bool:
    """Whether the child is the failed child "attachments" an attachment step that took nothing left
    (`_STEP_FAILED`), or one such retired by a later step (deleted, its reason kept): a step may fail again."""
    return child.status in (DocumentStatus.failed, DocumentStatus.deleted) and child.error in _STEP_FAILED


def _retire_records(session: Session, records: list[Document]) -> None:
    """Retire failed children a step takes again: no key, stored bytes nor points, so nothing to purge (one retired
    before stays so); the reason is kept."""
    for record in records:
        repository.retire(session, document_id=record.id, status=DocumentStatus.deleted,
                          forgotten=purge.forgotten(DocumentStatus.deleted))


def _retake_attachments(session: Session, settings: Settings, parent: Document, earlier: list[Document],
                        too_deep: bool) -> list[UploadAccepted]:
    """Take again the e-mail's attachments whose failed child says the refusal may have passed (`_retaken`), under
    their contents' locks (taken first, sorted, as a deletion takes them: it retires the department's copy a
    duplicate names and queues this step, purge.retire_family), so of two e-mails carrying one file, one takes it.
    The e-mail's steps queued alone end with it (their work done), their job rows written after the content locks
    are taken, as a re-index writes them; content they asked for (purge.ask_carrier) that it could not take (the
    e-mail's key or its department's does not open, its attachments cannot be listed, it is too deep...) falls to the
    next e-mail carrying it (`_passed_on`), once: the e-mail's later steps were not asked."""
    candidates = [child for child in earlier if _refused_as_duplicate(child)
                  or (child.status == DocumentStatus.failed and child.error == ATTACHMENT_FAILED)]
    _lock_contents(session, parent.department, [child.sha256 for child in candidates])
    retaken = [child for child in candidates if _retaken(session, child)]
    refusals = [_refusal(child) for child in retaken]  # read before they are retired
    accepted = _take_attachments(session, settings, parent, too_deep, retaken) if retaken else []
    if repository.end_attachment_steps(session, parent.id):
        accepted += _passed_on(session, refusals)
    return accepted


_Refusal = tuple[str, str, tuple[datetime, str]]  # a refused attachment's department, sha256, created_at and id


def _refused_as_duplicate(child: Document) -> bool:
    """Whether the child is an attachment refused as a duplicate of the department's copy (`duplicate_of`): the
    content an e-mail may be asked to take again (purge.ask_carrier)."""
    return child.status == DocumentStatus.failed and child.duplicate_of is not None


def _refusal(child: Document) -> _Refusal:
    return child.department, child.sha256, (child.created_at, child.id)


def _passed_on(session: Session, refusals: list[_Refusal]) -> list[UploadAccepted]:
    """For each content of these refusals of an e-mail whose step did not take it (could not take it again, or gave
    up) that its department still has no live copy of, the step of the e-mail whose refusal of it comes next, queued
    (purge.ask_carrier): each e-mail is asked once, in the order of their refusals, until one takes it."""
    asked = []
    for department, sha256, refusal in refusals:
        if repository.find_duplicate(session, department=department, sha256=sha256) is None:
            step = purge.ask_carrier(session, department=department, sha256=sha256, after=refusal)
            if step is not None:
                logger.info("content a step did not take again falls to the next e-mail carrying it, %s", step[0])
                asked.append(UploadAccepted(document_id=step[0], job_id=step[1]))
    return asked


def _retaken(session: Session, child: Document) -> bool:
    """Whether a failed attachment is taken again: one an internal error stopped (ATTACHMENT_FAILED), or a duplicate
    whose department no longer has its content live (the copy it named was deleted or rejected). Refusals of the
    file itself (its type, a limit, malformed, encrypted, too deep) stand."""
    return child.error == ATTACHMENT_FAILED or repository.find_duplicate(
        session, department=child.department, sha256=child.sha256) is None


def _take_attachments(session: Session, settings: Settings, parent: Document, too_deep: bool,
                      retaken: list[Document] | None = None) -> list[UploadAccepted]:
    """The attachments accepted as children, the others recorded as failed ones (with `retaken`, only those these
    failed children were of, each retired as its attachment is taken again). A department key that does not open
    under the master key (its row altered), met as the e-mail's key is read or as an attachment's key is made, ends
    the step at once: what it began is undone, and one failed child says so (no retry opens it; once the row is
    restored, the e-mail's next run takes them); a retake records no such child: its failed children stay, for
    the next one."""
    try:
        with session.begin_nested():
            return _accept_attachments(session, settings, parent, too_deep, retaken)
    except DepartmentKeyUnreadable as exc:
        _department_key_unreadable(exc, parent.department, f"the attachments of document {parent.id} were not taken")
        if retaken is None:
            _record_refused_attachment(session, parent, "attachments", b"", ATTACHMENTS_DEPARTMENT_KEY_UNREADABLE)
        return []


def _accept_attachments(session: Session, settings: Settings, parent: Document, too_deep: bool,
                        retaken: list[Document] | None) -> list[UploadAccepted]:
    """List the e-mail's attachments and accept each, or those `retaken` were of (`_take_attachments`)."""
    found = _attachments_or_reason(session, settings, parent)
    if isinstance(found, str):
        if retaken is None:
            _record_refused_attachment(session, parent, "attachments", b"", found)
        return []
    taken = found[:formats.MAX_ATTACHMENTS] if retaken is None else _matched(session, found, retaken)
    if not too_deep:
        _lock_contents(session, parent.department,
                       [hashlib.sha256(payload).hexdigest() for _, payload in taken if payload])
    accepted = [child for name, payload in taken
                if (child := _accept_attachment(session, settings, parent, name, payload, too_deep)) is not None]
    if retaken is None and len(found) > formats.MAX_ATTACHMENTS:
        excess = found[formats.MAX_ATTACHMENTS:]
        _record_refused_attachment(session, parent, f"{len(excess)} more attachments",
                                   b"".join(payload for _, payload in excess),
                                   f"the e-mail has {len(found)} attachments; only the first "
                                   f"{formats.MAX_ATTACHMENTS} are ingested")
    return accepted


def _attachments_or_reason(session: Session, settings: Settings,
                           parent: Document) -> list[tuple[str, bytes]] | str:
    """The e-mail's attachments (none once its key was shredded), or why none can be taken, which a step records as
    one failed child for all: its key row no longer opens (no retry opens it, so the loss is on record at once), or
    they cannot be listed. Its department's key not opening is DepartmentKeyUnreadable (`_take_attachments`)."""
    found = keystore_for(settings).document_key(session=session, department=parent.department, document_id=parent.id)
    if found.state is KeyState.unreadable:
        logger.warning("the data key of document %s does not open under its department key: its attachments "
                       "were not taken", parent.id)
        return ATTACHMENTS_KEY_UNREADABLE
    if found.key is None:
        return []
    listed = _listed_attachments(settings, parent, found.key)
    return ATTACHMENTS_UNLISTED if listed is None else listed


def _matched(session: Session, found: list[tuple[str, bytes]],
             retaken: list[Document]) -> list[tuple[str, bytes]]:
    """The listed attachments (within the first MAX_ATTACHMENTS, as a step takes them) that the failed children
    `retaken` were of, one per child, matched by content; each child matched is retired."""
    left, taken = list(retaken), []
    for name, payload in found[:formats.MAX_ATTACHMENTS]:
        digest = hashlib.sha256(payload).hexdigest()
        record = next((child for child in left if child.sha256 == digest), None)
        if record is not None:
            left.remove(record)
            taken.append((name, payload))
    _retire_records(session, [child for child in retaken if child not in left])
    return taken


def _department_key_unreadable(exc: DepartmentKeyUnreadable, department: str, outcome: str) -> None:
    """A department key that does not open under the master key (its row altered), met by an ingestion step: no
    retry opens it, so the step ends at once; counted (alert GovragDepartmentKeysUnreadable) and logged naming the
    department and the document only."""
    metrics.DEPARTMENT_KEYS_UNREADABLE.labels(department=department).inc()
    logger.warning("%s; %s", exc, outcome)


def _lock_contents(session: Session, department: str, digests: list[str]) -> None:
    """Take the content lock of each attachment (by its sha256), sorted, before the first is accepted (each acceptance
    takes its own again, as any upload does): a deletion and a re-index take several in that order
    (ingestion/purge.py, quarantine.py), so taken one by one in the e-mail's order, a forwarded e-mail's attachments
    and the deletion of the first e-mail could each hold a lock the other waits for (for ever on SQLite, where a
    write lock is held too)."""
    for sha256 in sorted(set(digests)):
        repository.lock_content(session, department=department, sha256=sha256)


def _listed_attachments(settings: Settings, parent: Document, key: bytes) -> list[tuple[str, bytes]] | None:
    """The e-mail's attachments, or None when they cannot be listed (the caller records that as one failed child:
    the loss is on record, not only in a log line). An outage propagates, for the step to be retried."""
    try:
        return formats.attachments(blobs.read_sealed(settings.blob_dir, parent.id, key), parent.content_type)
    except Exception as exc:
        if unavailable_dependency(exc) is not None:
            raise
        logger.warning("the attachments of document %s could not be listed: %s", parent.id, type(exc).__name__)
        return None


@dataclass(frozen=True)
class _Refused:
    """Why an attachment was not taken, and the department's copy it duplicates, if that is why."""

    reason: str
    duplicate_of: str | None = None


def _accept_attachment(session: Session, settings: Settings, parent: Document, name: str, payload: bytes,
                       too_deep: bool) -> UploadAccepted | None:
    """Accept one attachment as a child document, or record why it was refused."""
    if too_deep:
        refused = _Refused(f"attached e-mails are followed {MAX_ATTACHMENT_DEPTH} levels deep; this attachment is "
                           "deeper")
    elif not payload:
        refused = _Refused("the attachment is empty or could not be read")
    else:
        taken = _take_attachment(session, settings, parent, name, payload)
        if isinstance(taken, UploadAccepted):
            return taken
        refused = taken
    _record_refused_attachment(session, parent, name, payload, refused.reason, duplicate_of=refused.duplicate_of)
    return None


def _take_attachment(session: Session, settings: Settings, parent: Document, name: str,
                     payload: bytes) -> UploadAccepted | _Refused:
    """Accept an attachment under its e-mail, or say why not (a savepoint undoes what a refusal began). A failure
    other than a refusal gets a generic reason, as its message may quote the attachment; one that says "not now"
    (`_not_now`) propagates, for the attachment step to be retried."""
    try:
        with session.begin_nested():  # a department key that does not open propagates: the step ends
            return accept_upload(
                session=session, settings=settings, uploaded_by=parent.uploaded_by, department=parent.department,
                filename=name, data=payload, title=f"{parent.title} / {name}", acl_groups=list(parent.acl_groups),
                classification=Classification(parent.classification),
                parent_id=parent.id)
    except Exception as exc:
        if _not_now(exc) or isinstance(exc, DepartmentKeyUnreadable):
            raise
        if isinstance(exc, GovragError):
            return _Refused(exc.message, exc.duplicate_of)
        logger.warning("taking an attachment of document %s failed: %s", parent.id, type(exc).__name__)
        return _Refused(ATTACHMENT_FAILED)


def _not_now(exc: BaseException) -> bool:
    """Whether a failure to take an attachment is no refusal of it but a reason to retry: an outage (`outage`), or any
    GovragError `unavailable` (a 503 says "not now", never "not this file"). A refusal is recorded for good: the
    failed child keeps no bytes to take again."""
    return outage(exc) is not None or (isinstance(exc, GovragError) and exc.code is ErrorCode.unavailable)


def outage(exc: BaseException) -> str | None:
    """What `exc` says is unavailable to ingestion, no fault of the document, waited out: a dependency that did not
    answer, itself or what it was raised from (`unavailable_dependency`: the audit log's `unavailable` when the
    database goes), or "master key": the master key refused (its key file deleted, unreadable or replaced under a
    running worker: the operator's fix, after which the job completes). None for any other failure."""
    if isinstance(exc, MasterKeyRefused):
        return "master key"
    return unavailable_dependency(exc)


def _record_refused_attachment(session: Session, parent: Document, name: str, payload: bytes, reason: str, *,
                               duplicate_of: str | None = None) -> None:
    """A failed child row: metadata, the reason and the copy it duplicates, if that is why, only (the bytes stay
    inside the parent's sealed original)."""
    try:
        content_type = sniff_content_type(payload, name)
    except Exception:  # refused for its bytes or not, it is recorded
        content_type = "application/octet-stream"
    session.add(Document(
        id=str(uuid.uuid4()), department=parent.department,
        title=_title(session, parent.department, f"{parent.title} / {name}", None),
        content_type=content_type[:120], size_bytes=len(payload), sha256=hashlib.sha256(payload).hexdigest(),
        acl_groups=list(parent.acl_groups), classification=parent.classification,
        declared_classification=parent.declared_classification, status=DocumentStatus.failed, error=reason,
        duplicate_of=duplicate_of, uploaded_by=parent.uploaded_by, parent_id=parent.id,
    ))
    logger.info("an attachment of document %s was not ingested", parent.id)


def parse_limits(settings: Settings) -> ParseLimits:
    """The parse limits configured for this deployment."""
    return ParseLimits(max_pages=settings.max_pages, max_elements=settings.max_elements,
                       max_decompressed_bytes=settings.max_decompressed_bytes,
                       max_compression_ratio=settings.max_compression_ratio,
                       timeout_seconds=settings.parse_timeout_seconds)


def reveal(*, session: Session, settings: Settings, document_id: str, placeholders: list[str],
           can_reveal: Callable[[str], bool], can_see: Callable[[Document], bool]) -> tuple[str, RevealOut]:
    """The originals behind placeholders of a document kept reversibly, for a caller holding `reveal` in its
    department who may also see it (ACL, clearance); others look exactly like a missing id. Returns (department,
    result). A placeholder qualified as an answer shows it (`<PERSON_1·2>`) is read as the document's own
    (`<PERSON_1>`) and answered under the name sent: the caller chose this document as that answer's citation [2]."""
    document = repository.get_document(session, document_id)
    if (document is None or document.status in RETIRED or not can_reveal(document.department)
            or not can_see(document)):
        raise GovragError(ErrorCode.not_found, "no such document")
    key = _revealing_key(session, settings, document)
    served = document.served_generation  # the map of the chunks queries cite, never a run's still going
    mapping = _served_map(settings, document, key, served) if key is not None and served is not None else {}
    if not mapping:
        raise GovragError(ErrorCode.not_found, "the document keeps no reversible placeholders")
    own = {shown: document_placeholder(shown) for shown in placeholders}
    return document.department, RevealOut(document_id=document_id,
                                          values={shown: mapping[p] for shown, p in own.items() if p in mapping})


def _revealing_key(session: Session, settings: Settings, document: Document) -> bytes | None:
    """The data key a reveal opens the map with (None once shredded); one whose key row no longer opens (altered in
    the database) is a 410 saying so (`document_key_unreadable`), logged with the document's id only, not an
    unexplained 500."""
    found = keystore_for(settings).document_key(session=session, department=document.department,
                                                document_id=document.id)
    if found.state is KeyState.unreadable:
        logger.warning("the data key of document %s does not open under its department key: reveal refused",
                       document.id)
        raise GovragError(ErrorCode.document_key_unreadable, KEY_UNREADABLE)
    return found.key


def _served_map(settings: Settings, document: Document, key: bytes, served: int) -> dict[str, str]:
    """The served generation's placeholders and their originals ({}: the run minted none); a map that does not open
    under the document's key and run (its file altered, or another generation's copied over it) or does not parse is a
    410 saying so (`placeholder_map_unreadable`), counted and logged with the document's id only, not an unexplained
    500."""
    try:
        raw = blobs.read_sealed_map(settings.blob_dir, document.id, key, served, department=document.department,
                                    unbound_through=document.maps_unbound_through)
        return Numbering.from_json(raw).placeholders if raw is not None else {}
    except (crypto.DecryptionError, ValueError) as exc:
        metrics.PLACEHOLDER_MAPS_UNREADABLE.labels(department=document.department).inc()
        logger.warning("the placeholder map of document %s does not open under its key or does not parse: reveal "
                       "refused", document.id)
        raise GovragError(ErrorCode.placeholder_map_unreadable, SERVED_MAP_UNREADABLE) from exc


def hand_back(*, settings: Settings, job_id: str) -> None:
    """A run that failed cleanly and will be retried hands its job back: the next run is then a retry, not a
    redelivery after a crash. If even this fails (an outage), the next run counts a crash: the limit has room."""
    try:
        with unit_of_work(settings.resolved_database_url) as session:
            repository.hand_back(session, job_id)
    except Exception as exc:  # noqa: BLE001 - the retry goes ahead regardless
        logger.warning("could not hand back ingestion job %s for a retry: %s", job_id, type(exc).__name__)


def mark_failed(*, settings: Settings, document_id: str, job_id: str, reason: str,
                pass_on: bool = True) -> list[UploadAccepted]:
    """Give up on a job after its retries (or its time limit); `reason` must not hold document content. A document
    whose run ended (ready, quarantined, failed) keeps its status and reason: what gave up then was the step after
    the run, taking an e-mail's attachments. Content an e-mail's step was to take again then falls to the next
    e-mail carrying it (`_passed_on_by_giving_up`, unless not `pass_on`: the job's run and step both ended, and it is
    failed only in case it did not): the steps queued for it, to send. That is a transaction of its own, after the
    failure's: a process that dies between the two passes nothing on, and the content waits as when no e-mail is
    left to ask (the next run of an e-mail carrying it, or an upload of it, takes it). The failure is written only
    while the document and its job are unfinished: an end another run of it (the broker's second delivery) committed
    since `_step_gave_up` read them is kept, as is a re-index's job queued since."""
    if _step_gave_up(settings, document_id, job_id):
        logger.warning("the attachment step of document %s gave up; the document keeps its status", document_id)
    else:
        _finish(settings, document_id, job_id, DocumentStatus.failed, error=reason, while_unfinished=True)
    return _passed_on_by_giving_up(settings, document_id) if pass_on else []


def _passed_on_by_giving_up(settings: Settings, document_id: str) -> list[UploadAccepted]:
    """After a run of an e-mail, or its attachment step, gave up: no step of it takes the content its attachments
    were refused as duplicates of, which an e-mail being ingested is passed over for (purge.ask_carrier), so what of
    it the department no longer has live falls to the next e-mail carrying it (`_passed_on`), read under the contents'
    locks (taken after the e-mail's, as a step takes them). Not while a run of the e-mail is queued or going on (its
    step takes it, or passes it on as it gives up), nor once the e-mail is retired (its retirement asked the next)."""
    with unit_of_work(settings.resolved_database_url) as session:
        email = repository.get_document(session, document_id)
        if email is None or email.content_type not in formats.MAIL_TYPES:
            return []
        repository.lock_lineage(session, document_id)
        session.refresh(email)  # as a deletion, rejection or approval that held the lock left it
        if email.status in (*UNFINISHED, *RETIRED):
            return []
        refused = [child for child in repository.children(session, document_id) if _refused_as_duplicate(child)]
        _lock_contents(session, email.department, [child.sha256 for child in refused])
        return _passed_on(session, [_refusal(child) for child in refused])


def _step_gave_up(settings: Settings, document_id: str, job_id: str) -> bool:
    """Whether what gave up was an attachment step: the document's run ended ready, quarantined or failed (a retired
    one is left to `_finish`, which withdraws its job), or the job was queued for the step alone, which leaves its
    e-mail, and a run of it going on, alone (`repository.is_attachment_step`): it fails, if still unfinished."""
    with unit_of_work(settings.resolved_database_url) as session:
        document, job = repository.get_document(session, document_id), repository.get_job(session, job_id)
        if job is not None and repository.is_attachment_step(job):
            if job.status in UNFINISHED:  # its note kept: what it was queued for
                repository.end_job(session, job_id=job_id, status=DocumentStatus.failed,
                                   error=repository.ATTACHMENT_STEP)
            return True
        return document is not None and document.status not in (*UNFINISHED, *RETIRED)


_Claimed = tuple[DocumentFacts, bytes, IngestionRules]  # what a claimed run needs: the facts, the data key, the rules


def _start(settings: Settings, document_id: str, job_id: str, hold: Session) -> _Claimed | None:
    """Mark processing and load what the pipeline needs (None: nothing to run); the session is released before slow
    work, the original's read (`_original`) included. Delivery is at least once: a delivery of a job that already
    ended, or that a run ends as it claims it (`_claim`), does nothing (a late duplicate must not take over a
    document that a newer job, a re-index, has queued, nor run again one its first run left quarantined). A
    delivery that finds its document retired (before or while it claims it) ends the job and purges again: an
    earlier run may have written after the retirement's purge and died before it could withdraw."""
    withdrawn, claimed = False, None
    with unit_of_work(settings.resolved_database_url) as session:
        job, document = repository.get_job(session, job_id), repository.get_document(session, document_id)
        if (job is not None and job.status in UNFINISHED and not repository.is_attachment_step(job)
                and document is not None and document.status in UNFINISHED):
            # the hold's connection before the claim locks anything: no wait for one (a full pool, a new server
            # session) holds the document's rows, nor SQLite's write lock
            keep_idle_transaction_open(hold.connection())
            claimed = _claim(session, settings, document, job, hold)
        if claimed is None:
            withdrawn = _end_unfinished(session, document_id, job_id)
    if withdrawn:
        purge.purge_now(settings, [document_id])
    if isinstance(claimed, _IndexState):  # failed: the points its dead runs wrote go, as at any failed run's end
        _drop_superseded(settings, document_id, claimed, claimed.newest)
        return None
    return claimed


def _claim(session: Session, settings: Settings, document: Document, job: IngestionJob,
           hold: Session) -> _Claimed | _IndexState | None:
    """Mark the document processing and count the attempt; what the run needs, or None if it was retired (its key
    shredded with it) or a run ended it or its job since `_start` read them (a duplicate delivery: nothing is written,
    the run's end kept), or the document as its failure leaves it if it cannot run: its data key is missing though it
    was not retired (a key store restored from an older backup: no retry brings the key back, and its job would stay
    `queued` for ever; nothing of it is served then, not even the index a re-index with `serve_previous` kept, which
    no longer opens), or it has crashed its worker too often (a file that kills the parser must not take the
    worker, or the embedded default's API, down again at every redelivery). A key row that no longer opens (altered
    in the database) is as lost as a missing one: failed at once, not retried; so is a department key that does not
    open under the master key (its row altered), though that loses no index: restored, it opens again. The document's
    row is locked before its job's, as a run's end and a re-index do: the other order let a claim and a re-index of
    one document deadlock on PostgreSQL. A job still `processing` was claimed by a run that neither ended nor handed
    it back: a crash if that run (the document's latest generation) no longer holds itself live, else a run still
    going beside this one (the broker's redelivery of a long run), no crash."""
    # everything decided from its document and job as their row locks leave them, not as `_start` read them: another
    # delivery's claim, a run's end or a hand-back committed meanwhile decides whether the run before crashed, and an
    # end of its e-mail's run raising it (`_raise_attachments`), finding no run of it to hand back, its floor; the
    # key too, read after them (on SQLite under the write lock), as the claim's decision sees the document
    repository.lock_for_claim(session, document, job)
    key, lost = _claimed_key(session, settings, document)
    after_a_crash = (job.status == DocumentStatus.processing
                     and not repository.run_is_live(session, job.id, document.index_generation))
    crashed_too_often = job.crashed_runs + after_a_crash >= MAX_CRASHED_RUNS
    failure = lost or (CRASHED_TOO_OFTEN if crashed_too_often else None)
    moved = repository.set_status(session, document_id=document.id, job_id=job.id,
                                  status=DocumentStatus.processing if failure is None else DocumentStatus.failed,
                                  error=failure, index_lost=lost in _KEY_LOST.values(), while_unfinished=True)
    if not moved:  # retired, or ended by a run (this is a duplicate delivery) since it was read: nothing is written
        session.rollback()
        return None
    repository.count_attempt(session, job.id, after_a_crash=after_a_crash)
    if key is None or failure is not None:
        logger.warning("ingestion of document %s failed as it was claimed: %s", document.id,
                       "its data key (or its department's) is missing or does not open" if key is None
                       else f"its runs crashed {MAX_CRASHED_RUNS} times")
        return _index_state(session, document.id, job.id)
    generation = repository.claim_generation(session, document.id)
    repository.hold_run(hold, job.id, generation)  # live before the claim commits: no claim after it sees it dead
    rules = quarantine.rules_for(session=session, department=document.department)
    document.title = _redacted_title(document.title, rules.redaction, rules_only=True)  # a rule added since
    facts = DocumentFacts(
        document_id=document.id, department=document.department, title=document.title,
        content_type=document.content_type, acl_groups=tuple(document.acl_groups),
        classification=Classification(document.declared_classification or document.classification),
        approved_level=_approved_level(document), generation=generation,
        maps_unbound_through=document.maps_unbound_through,
    )
    return facts, key, rules


def _claimed_key(session: Session, settings: Settings, document: Document) -> tuple[bytes | None, str | None]:
    """The document's data key, or why its claim fails it at once: its key row is missing or does not open (its index
    is lost with it), or its department's key row is missing or does not open under the master key
    (DEPARTMENT_KEY_UNREADABLE: that row restored, the document and any index it serves open again)."""
    try:
        found = keystore_for(settings).document_key(session=session, department=document.department,
                                                    document_id=document.id)
    except DepartmentKeyUnreadable as exc:
        _department_key_unreadable(exc, document.department, f"ingestion of document {document.id} failed")
        return None, DEPARTMENT_KEY_UNREADABLE
    return found.key, _KEY_LOST.get(found.state)


def _original(settings: Settings, document_id: str, key: bytes) -> bytes:
    """The document's upload, opened from its sealed original. One that is missing, or does not open under the
    document's key (another key, altered bytes), fails the run at once: no retry brings it back. Any other fault
    propagates for a retry: the blob volume not mounted (`Unavailable`, no fault of the document) is waited out as
    an outage."""
    try:
        return blobs.read_sealed(settings.blob_dir, document_id, key)
    except (FileNotFoundError, crypto.DecryptionError) as exc:
        logger.warning("the stored original of document %s is missing or does not open under its key", document_id)
        raise GovragError(ErrorCode.internal, ORIGINAL_UNREADABLE) from exc


def _previous_numbering(settings: Settings, facts: DocumentFacts, key: bytes) -> Numbering | None:
    """The placeholders the document's newest earlier run kept (its sealed map, of a generation below this run's,
    still stored: the served one, the one a fail-closed re-index withheld, one a run that died wrote, or the newest
    one a failed or quarantined document kept), for this run to number as it did; None when no earlier run kept one.
    A map that does not open under the document's key or does not parse (its file altered) fails the run at once, no
    retry mends it: numbered afresh, an answer's `<PERSON_1>` from an earlier run would be revealed as whoever this
    run numbered first."""
    try:
        raw = blobs.read_newest_sealed_map(settings.blob_dir, facts.document_id, key, below=facts.generation,
                                           department=facts.department, unbound_through=facts.maps_unbound_through)
        return Numbering.from_json(raw) if raw is not None else None
    except (crypto.DecryptionError, ValueError) as exc:
        logger.warning("a placeholder map of document %s does not open under its key or does not parse",
                       facts.document_id)
        raise GovragError(ErrorCode.internal, MAP_UNREADABLE) from exc


def _approved_level(document: Document) -> Classification | None:
    """The level an admin released the document at, if one did."""
    if document.approved_by is None or document.approved_level is None:
        return None
    return Classification(document.approved_level)


class RunEnd(Enum):
    """How a run's end came out."""

    written = auto()  # the document and its job moved to the run's outcome
    again = auto()  # nothing written: a re-index handed the job back, and the run goes again under its rules
    over = auto()  # nothing written, nor to write: the document was retired, or a later run of it claimed it


@dataclass(frozen=True)
class _IndexState:
    """Where a document's index stands as a run's end (or a claim that failed it) left it: its department, the index
    generation it serves (None: none) and the newest generation a run of it has started."""

    department: str
    served: int | None
    newest: int


def _finish(settings: Settings, document_id: str, job_id: str, status: DocumentStatus, *, error: str | None = None,
            chunk_count: int | None = None, outcome: Callable[[Session], None] | None = None,
            generation: int | None = None, keep_numbering: bool = True, email: bool = False,
            while_unfinished: bool = False) -> RunEnd:
    """Write the final status, with the pipeline's outcome when there is one, in a single transaction (an
    `email`'s under its lineage's locks: `_write_end`); unless the
    document was deleted (or rejected) while the worker ran: then only its job ends and the points it indexed go. A
    run's outcome (its `generation`) is written only while the run still holds its job and is the document's latest
    claim: one handed back meanwhile (by a re-index) goes again; one a later claim outdid (the broker's second
    delivery of its job, while it ran) leaves the document to that run; a give-up (`while_unfinished`) is written only
    while the document and its job are unfinished (repository.set_status). Once committed, the points and placeholder
    maps of generations no longer served go (`_drop_superseded`; while none is served, the newest map stays, unless
    the run's rules keep no map: `keep_numbering`, the department's `reversible`)."""
    with unit_of_work(settings.resolved_database_url) as session:
        written = _write_end(session, document_id, job_id, status, error=error, chunk_count=chunk_count,
                             outcome=outcome, generation=generation, email=email,
                             while_unfinished=while_unfinished)
        state = _index_state(session, document_id, job_id)
    if state is None:  # withdrawn: purged once the job's end is committed
        purge.purge_now(settings, [document_id])
        return RunEnd.over
    through = state.newest if written else generation  # a stale run drops its own points, never a later run's
    if through is not None:
        _drop_superseded(settings, document_id, state, through, stale=not written, keep_numbering=keep_numbering)
    if not written:
        return _unwritten(document_id, state, generation)
    metrics.INGESTED_DOCUMENTS.labels(department=state.department, status=str(status)).inc()
    return RunEnd.written


def _unwritten(document_id: str, state: _IndexState, generation: int | None) -> RunEnd:
    """Why an end was not written: a give-up's (no `generation`), because another run ended the document or its job
    since it was read; a run's, because a later claim of the document took it over (the job delivered again, by the
    broker, the sweep or a re-index: that run ends it), else because a re-index handed the job back (this run goes
    again). Claiming again over a later claim made each of two overlapping deliveries outdo the other in turn, a
    crash counted at each claim, until the document failed."""
    if generation is None:
        logger.info("the failure of document %s is not written: another run ended it or its job since", document_id)
        return RunEnd.over
    if state.newest != generation:
        logger.info("a later claim of document %s (its job delivered again: by the broker, the sweep or a re-index) "
                    "took it over; this run ends without its outcome", document_id)
        return RunEnd.over
    logger.info("the run of document %s lost its job (a re-index); its outcome is not written", document_id)
    return RunEnd.again


def _write_end(session: Session, document_id: str, job_id: str, status: DocumentStatus, *, error: str | None,
               chunk_count: int | None, outcome: Callable[[Session], None] | None, generation: int | None,
               email: bool = False, while_unfinished: bool = False) -> bool:
    """Move the document and its job to `status`, with the pipeline's outcome; whether they moved. An `email`'s
    end first takes the locks of its lineage, before any row (as its attachment steps and deletions take them): an
    attachment step of it or of an e-mail below it, which takes attachments at their e-mail's level, commits before
    this end reads the attachments it raises (`_raise_attachments`), or starts after it and reads the level written."""
    if email:
        repository.lock_lineage(session, document_id)
    if not repository.set_status(session, document_id=document_id, job_id=job_id, status=status, error=error,
                                 chunk_count=chunk_count, generation=generation, while_unfinished=while_unfinished):
        session.rollback()  # a stale run's document moved before its job was found handed back (or ended): undone
        return False
    if outcome is not None:
        outcome(session)
    return True


def _index_state(session: Session, document_id: str, job_id: str) -> _IndexState | None:
    """Where the document's index stands as its run's end leaves it, or None when it was retired meanwhile (its job
    is withdrawn)."""
    document = _current(session, document_id)
    if document is None or document.status in RETIRED:
        _withdraw(session, document, job_id)
        return None
    return _IndexState(document.department, document.served_generation, document.index_generation)


def _drop_superseded(settings: Settings, document_id: str, state: _IndexState, through: int, *,
                     stale: bool = False, keep_numbering: bool = True) -> None:
    """Remove the points of the document's generations up to `through` other than the one it serves: after a run
    ended ready, the previous index; after one that failed or went stale (`stale`), its own (and the index a
    re-index withheld, or one lost with the document's key). A vector store outage leaves them (never cited: queries
    re-check the generation) to the document's next run, as the blob volume's leaves the maps. The placeholder maps
    go as `blobs.remove_superseded_maps` says, the newest kept while nothing is served (and `keep_numbering`), for
    the document's next run to number from; a stale run removes its own map only: the one it was numbered from
    numbers the run going on (or going again) too."""
    try:
        open_vector_store(settings).delete_superseded(state.department, document_id, served=state.served,
                                                      through=through)
    except Exception as exc:
        if unavailable_dependency(exc) is None:
            raise
        logger.warning("superseded points of document %s stay until its next run: the vector store is unavailable",
                       document_id)
    try:
        if stale:
            blobs.remove_map(settings.blob_dir, document_id, through)
        else:
            blobs.remove_superseded_maps(settings.blob_dir, document_id, served=state.served, through=through,
                                         keep_numbering=keep_numbering)
    except Unavailable:  # the run's end is committed: a retry would find nothing to do, and leave them too
        logger.warning("superseded placeholder maps of document %s stay until its next run: the blob volume is "
                       "unavailable", document_id)


def _current(session: Session, document_id: str) -> Document | None:
    """The document row as last committed (a retirement that a conditional update just found shows now)."""
    document = repository.get_document(session, document_id)
    if document is not None:
        session.refresh(document)
    return document


def _end_unfinished(session: Session, document_id: str, job_id: str) -> bool:
    """End the job if it is still unfinished though its document is not: withdrawn if the document was retired (the
    answer is then True: a purge is owed), else ended with the status another run gave the document (a job a late
    duplicate of an older job overtook, before those were ignored). A job queued for an e-mail's attachment step
    alone (repository.queue_attachment_step) is left to that step, which ends it (`spawn_attachments`), whatever the
    e-mail's run is doing: a re-index queued meanwhile runs under its own job, never under this one."""
    job, document = repository.get_job(session, job_id), _current(session, document_id)
    if job is None or job.status not in UNFINISHED:
        return False
    if document is None or document.status in RETIRED:
        _withdraw(session, document, job_id)
        return True
    if not repository.is_attachment_step(job) and document.status not in UNFINISHED:
        repository.end_job(session, job_id=job_id, status=document.status,
                           error=job.error or "another run of this document finished it first")
    return False


def _withdraw(session: Session, document: Document | None, job_id: str) -> None:
    """End the job of a document that left the pipeline under it; what the run indexed after its retirement (and a
    placeholder map it wrote, sealed under a shredded key) is owed a purge."""
    state = document.status if document is not None else DocumentStatus.deleted
    repository.end_job(session, job_id=job_id, status=state,
                       error=f"the document was {state} before its ingestion finished")
    if document is not None:
        purge.owe_purge(session, document)
    logger.info("ingestion of a %s document was withdrawn", state)


def _title(session: Session, department: str, title: str | None, filename: str | None) -> str:
    """The title given, else the file's name, with control characters (a NUL in an attachment's name) replaced and
    PII replaced by its type (`<EMAIL_ADDRESS>`, guard/pii.py, with the department's redaction rules): a title is
    shown beside redacted text (citations, the listing, the model's prompt, the training export)."""
    chosen = printable_name((title or filename or "").strip())[:_TITLE_READ_CHARS]
    return _redacted_title(chosen, quarantine.rules_for(session=session, department=department).redaction)


def _redacted_title(title: str, rules: RedactionRules, *, rules_only: bool = False) -> str:
    """`title` with PII replaced by its type under `rules`, within MAX_TITLE_CHARS. Every run applies the
    department's own recognizers (`rules_only`) again to the stored title, redacted when it was set (the raw one is
    gone): a rule added since then reaches it; with none, the stored title comes back as it is."""
    redacted = get_redactor().redact_title(title, rules, rules_only=rules_only) if title else ""
    kinds = [*REDACTED_ENTITIES, *rules.entities]  # the types with_title_pii counts (ingestion/pipeline.py)
    return cut_title(redacted.strip(), MAX_TITLE_CHARS, kinds) or "untitled"


def document_status(*, session: Session, can_see: Callable[[Document], bool],
                    document_id: str) -> DocumentStatusOut:
    """Status and metadata of a document the caller may see; others look exactly like missing ones. Its attachments
    are listed as the caller may see each (one raised above their clearance by its content stays unknown to them)."""
    document = repository.get_document(session, document_id)
    if document is None or document.status == DocumentStatus.deleted or not can_see(document):
        raise GovragError(ErrorCode.not_found, "no such document")
    return DocumentStatusOut(
        **_summary(session, document, can_see).model_dump(), declared_classification=document.declared_classification,
        classification_reasons=list(document.classification_reasons or []), flagged_chunks=document.flagged_chunks,
        review_reason=document.review_reason,
        attachment_ids=[child.id for child in repository.children(session, document.id)
                        if child.status != DocumentStatus.deleted and can_see(child)],
    )


def list_documents(*, session: Session, can_see: Callable[[Document], bool], department: str,
                   status: ListedStatus | None, limit: int, after: str | None) -> DocumentPage:
    """One page of a department's documents, newest first, showing those the caller may see. A page reads `limit`
    rows at most, so a caller who may see few of many documents gets short pages, never a long scan."""
    rows = repository.documents_page(session, department=department, status=status, before=_page_position(after),
                                     limit=limit)
    shown = [_summary(session, document, can_see) for document in rows if can_see(document)]
    return DocumentPage(documents=shown, next_after=_page_cursor(rows[-1]) if len(rows) == limit else None)


def _summary(session: Session, document: Document, can_see: Callable[[Document], bool]) -> DocumentSummaryOut:
    copy_id = _shown_copy(session, document, can_see)
    return DocumentSummaryOut(
        document_id=document.id, department=document.department, title=document.title,
        content_type=document.content_type, size_bytes=document.size_bytes, classification=document.classification,
        acl_groups=document.acl_groups, status=document.status, error=_shown_error(document, copy_id),
        duplicate_of=copy_id, chunk_count=document.chunk_count, parent_id=document.parent_id,
        created_at=document.created_at, updated_at=document.updated_at)


def _shown_copy(session: Session, document: Document, can_see: Callable[[Document], bool]) -> str | None:
    """The id of the department's copy this refused duplicate names (`duplicate_of`), as the caller may read it. A
    refused attachment is seen by whoever may see its e-mail, and that copy's ACL or level may hide it from them: the
    id is shown only to a caller who may see the copy (as its status would be), None to others and for a document
    that is no duplicate."""
    if document.duplicate_of is None:
        return None
    copy = repository.get_document(session, document.duplicate_of)
    return copy.id if copy is not None and copy.status != DocumentStatus.deleted and can_see(copy) else None


def _shown_error(document: Document, copy_id: str | None) -> str | None:
    """The document's error as the caller may read it: a duplicate's reason names its copy, so one whose copy is not
    shown to the caller (`_shown_copy`) reads DUPLICATE_HIDDEN."""
    return DUPLICATE_HIDDEN if document.duplicate_of is not None and copy_id is None else document.error


def _page_cursor(document: Document) -> str:
    """Where the next page starts: after this document (its creation time and id), as an opaque token."""
    position = json.dumps([document.created_at.isoformat(), document.id]).encode()
    return base64.urlsafe_b64encode(position).decode().rstrip("=")


def _page_position(after: str | None) -> tuple[datetime, str] | None:
    """The position a `_page_cursor` token holds; a token that is not one is refused. The id must be text a
    database can bind: a JSON escape in a tampered token (a NUL, a lone surrogate) failed the query (a 500)."""
    if after is None:
        return None
    try:
        created_at, document_id = json.loads(base64.urlsafe_b64decode(after + "=" * (-len(after) % 4)))
        if not isinstance(document_id, str) or not document_id.isprintable():
            raise ValueError("not a document id")
        return datetime.fromisoformat(created_at), document_id
    except (ValueError, TypeError) as exc:  # bad base64, JSON, shape, id or timestamp
        raise GovragError(ErrorCode.invalid_request, "after: not a cursor from a previous page") from exc


def job_status(*, session: Session, can_see: Callable[[Document], bool], job_id: str) -> JobStatusOut:
    """Status of an ingestion job whose document the caller may see."""
    job = repository.get_job(session, job_id)
    document = repository.get_document(session, job.document_id) if job is not None else None
    if job is None or document is None or not can_see(document):
        raise GovragError(ErrorCode.not_found, "no such job")
    return JobStatusOut(job_id=job.id, document_id=job.document_id, status=job.status, error=job.error,
                        attempts=job.attempts, created_at=job.created_at, updated_at=job.updated_at)


def emails_above(*, session: Session, document: Document) -> list[Document]:
    """The e-mails an attachment was taken from, up to the uploaded one (none for an upload)."""
    if document.parent_id is None:
        return []
    line = repository.lineage(session, document.id)[:-1]
    return [email for email_id in line if (email := repository.get_document(session, email_id)) is not None]


def served_documents(*, session: Session, document_ids: set[str]) -> dict[str, Document]:
    """Documents that may still be cited (`repository.served_documents`)."""
    return repository.served_documents(session, document_ids)


def served_in_department(*, session: Session, department: str) -> dict[str, Document]:
    """The department's documents that may still be cited, as queries cite them (`repository.SERVED`)."""
    return repository.served_in_department(session, department)


def is_served(document: Document, payload: Mapping[str, Any]) -> bool:
    """Whether a point belongs to the index generation its document serves (not one a run is still writing, nor
    one a later run superseded)."""
    return document.served_generation is not None and payload_generation(payload) == document.served_generation


def served_run(document: Document) -> IndexRun | None:
    """The run whose chunks a served document's queries open, as their contexts must bind it (`chunk_context`): from
    the database alone, never the payload, so a chunk sealed since 0020 cannot be passed off as one sealed before it.
    None: its served generation was sealed before 0020 (`Document.unbound_through`), under the context naming no run."""
    generation = document.served_generation
    if generation is None or generation <= document.unbound_through:
        return None
    return IndexRun(document.department, generation)


def delete_document(*, session: Session, settings: Settings, document_id: str,
                    can_delete: Callable[[Document], bool]) -> tuple[str, list[str], list[tuple[str, str]]]:
    """Retire the document (an e-mail takes its attachments) and the failed copies of its content: keys shredded,
    purges owed (purge.retire_family). Returns its department, the ids to purge and the jobs to send once the caller
    commits (attachment steps taking content it leaves without a live copy again, under e-mails that carry it). One
    deleted meanwhile (a failed copy of content deleted elsewhere) is not found, as once it is deleted."""
    repository.lock_document(session, document_id)
    document = repository.get_document(session, document_id)
    if document is None or document.status == DocumentStatus.deleted or not can_delete(document):
        raise GovragError(ErrorCode.not_found, "no such document")
    retired = purge.retire_family(session, settings, document, DocumentStatus.deleted)
    if document_id not in retired.ids:
        raise GovragError(ErrorCode.not_found, "no such document")
    return document.department, retired.ids, retired.retakes
