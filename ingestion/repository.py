"""Document and ingestion-job queries (the only place they are written)."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from datetime import datetime

from sqlalchemy import and_, bindparam, case, func, or_, select, true, update
from sqlalchemy.orm import Session, aliased

from core.db import hold_sqlite_write_lock, lock_is_held, transaction_lock
from core.keystore import HAS_DOCUMENT_KEY
from core.models import RETIRED, UNFINISHED, Document, DocumentStatus, IngestionJob, IngestionPolicy, utcnow

IDS_PER_STATEMENT = 5_000  # ids bound in one IN list: PostgreSQL takes at most 65,535 parameters per statement
SERVING = (DocumentStatus.ready, *UNFINISHED)  # a document being re-indexed may keep serving its previous index
# The one rule for which documents' index may be read (cited by queries, explained, exported for training): ready
# ones, and those being re-indexed over an index they still serve (`serve_previous`); never deleted, rejected,
# quarantined, failed or withheld ones. Of their points, only the served generation's are read (`service.is_served`).
SERVED = and_(Document.status.in_(SERVING), Document.served_generation.is_not(None))
# The words of an upload's refusal as a duplicate before the department's copy's id (service.DuplicateUpload); a
# refused attachment keeps them as its reason, the id in `duplicate_of` too, which is what code reads
DUPLICATE_OF = "duplicate upload: the department already has this content as document "
# The note a job queued for an e-mail's attachment step alone carries (`queue_attachment_step`), kept as its end: what
# tells such a job from a run's (`is_attachment_step`), which no path claims (service._start)
ATTACHMENT_STEP = "queued to take the e-mail's attachments again; the e-mail keeps its status"
# The jobs that run their document (`new_job`, an upload's), not an e-mail's attachment step alone
RUNS_ITS_DOCUMENT = or_(IngestionJob.error.is_(None), IngestionJob.error != ATTACHMENT_STEP)
REINDEX_FAILED = "the re-index failed; the previous index is still served: {error}"
WITHHELD_REINDEX_FAILED = "the re-index failed; the previous index, withheld when it began, is not served: {error}"


def get_document(session: Session, document_id: str) -> Document | None:
    """A document row by id."""
    return session.get(Document, document_id)


def get_job(session: Session, job_id: str) -> IngestionJob | None:
    """A job row by id."""
    return session.get(IngestionJob, job_id)


def set_status(session: Session, *, document_id: str, job_id: str, status: str, error: str | None = None,
               chunk_count: int | None = None, generation: int | None = None, index_lost: bool = False,
               while_unfinished: bool = False) -> bool:
    """Move a job to `status` and its document with it, unless the document is retired: a conditional update, so
    a deletion committed meanwhile (of the document or of an e-mail above it) is never written over. The document
    moves as `_serving` says (status, error, served generation), not always to `status`: a failure of one still
    serving an earlier index leaves it `ready` on that index, unless that index was lost (`index_lost`). A run's
    outcome (written under its `generation`) also needs its job still `processing` and no later run of the document
    started: a re-index that handed the job back meanwhile made the run stale. A claim and a give-up
    (`while_unfinished`: service._claim, service.mark_failed) need the document still queued or processing and its
    job unfinished: a run's end committed since they were read (on PostgreSQL, one not yet committed is waited for and
    the rows read again) is kept. When the document moved and its job did not, the caller rolls back the document's
    move. Whether both moved."""
    values = {**_serving(status, error, generation, index_lost), "updated_at": utcnow()}
    if chunk_count is not None:
        values["chunk_count"] = chunk_count
    movable = Document.status.in_(UNFINISHED) if while_unfinished else Document.status.not_in(RETIRED)
    document = update(Document).where(Document.id == document_id, movable)
    if generation is not None:
        document = document.where(Document.index_generation == generation)
    if not session.execute(document.values(**values)).rowcount:  # type: ignore[attr-defined]
        return False
    job = update(IngestionJob).where(IngestionJob.id == job_id)
    if generation is not None:
        job = job.where(IngestionJob.status == DocumentStatus.processing)
    elif while_unfinished:
        job = job.where(IngestionJob.status.in_(UNFINISHED))
    ended = session.execute(job.values(status=status, error=error, updated_at=utcnow()))
    return (generation is None and not while_unfinished) or bool(ended.rowcount)  # type: ignore[attr-defined]


def _serving(status: str, error: str | None, generation: int | None, index_lost: bool) -> dict[str, object]:
    """A document's status, error and served generation as it moves to `status`: a run ending ready serves its own
    generation, a quarantined document none, and a failure of one that still serves an earlier index (a re-index
    with `serve_previous`) leaves it ready on that index, its error saying the re-index failed (its job fails); one
    whose re-index withheld its index (`withhold`) stays failed, its error saying so. A failure that lost the
    document's index (`index_lost`: its data key is missing, so no generation of it opens) serves none, whatever a
    re-index kept serving or withheld, its error its own. Each ends the withholding."""
    if status == DocumentStatus.ready and generation is not None:
        return {"status": status, "error": error, "served_generation": generation, "withheld": False}
    if status == DocumentStatus.quarantined or (status == DocumentStatus.failed and index_lost):
        return {"status": status, "error": error, "served_generation": None, "withheld": False}
    if status == DocumentStatus.failed:
        serving = Document.served_generation.is_not(None)
        return {"status": case((serving, str(DocumentStatus.ready)), else_=str(status)),
                "error": case((serving, REINDEX_FAILED.format(error=error)),
                              (Document.withheld, WITHHELD_REINDEX_FAILED.format(error=error)), else_=error),
                "withheld": False}
    return {"status": status, "error": error}


def retire(session: Session, *, document_id: str, status: str, forgotten: dict[str, object]) -> bool:
    """Move the document to its final `status` (deleted or rejected), serving nothing, with what named its original
    cleared (`forgotten`), unless it is deleted or has `status` already: a conditional update, so a retirement
    committed since the row was read is not done again (on PostgreSQL one not yet committed is waited for and the
    row read again); a rejected document may still be deleted. Whether it moved (the session's copy with it)."""
    retired = session.execute(update(Document)
                              .where(Document.id == document_id,
                                     Document.status.not_in((DocumentStatus.deleted, status)))
                              .values(status=status, chunk_count=0, served_generation=None, updated_at=utcnow(),
                                      **forgotten)
                              .execution_options(synchronize_session="fetch"))
    return bool(retired.rowcount)  # type: ignore[attr-defined]


def withhold(session: Session, document_id: str) -> None:
    """Stop serving the index of a document being ingested (a re-index with `serve_previous` left it serving) at
    once, for a re-index after a rule that may tighten what is shown: its run's new generation is served once it
    ends ready, and a failure leaves the document unserved (`_serving`). One that left the pipeline meanwhile is
    left alone: a run that ended ready is withheld by the statement that queues its new job (`new_job`)."""
    session.execute(update(Document).where(Document.id == document_id, Document.status.in_(UNFINISHED),
                                           Document.served_generation.is_not(None))
                    .values(served_generation=None, withheld=True, updated_at=utcnow()))


def claim_generation(session: Session, document_id: str) -> int:
    """Number a new run of the document: the index generation its points and placeholder map are written under
    (one statement, so two runs of one document never share one)."""
    claimed = session.execute(update(Document).where(Document.id == document_id)
                              .values(index_generation=Document.index_generation + 1)
                              .returning(Document.index_generation))
    return int(claimed.scalar_one())


def end_job(session: Session, *, job_id: str, status: str, error: str) -> None:
    """Close a job without touching its document (which left the pipeline under it), unless it ended already: a
    conditional update, so an end committed since the job was read (its e-mail's step doing a step's work) is kept."""
    session.execute(update(IngestionJob).where(IngestionJob.id == job_id, IngestionJob.status.in_(UNFINISHED))
                    .values(status=status, error=error, updated_at=utcnow()))


def lock_for_claim(session: Session, document: Document, job: IngestionJob) -> None:
    """Lock the document's row, then its job's (the order of set_status, a run's end and a re-index), and read both
    again as those locks leave them, for a claim to decide from: not as read before, when a claim by another
    delivery of the job, a run's end or a hand-back (a re-index) may have committed since, or be about to (on
    PostgreSQL it is waited for). PostgreSQL: the rows' locks an update takes (FOR NO KEY UPDATE, which neither a
    foreign key's check nor the sweep's hold on a running job waits for, nor holds up); SQLite: the database's."""
    hold_sqlite_write_lock(session)
    for row in (document, job):
        session.refresh(row, with_for_update={"key_share": True})


def hold_run(session: Session, job_id: str, generation: int) -> None:
    """Hold the run of the job that claimed `generation` as live until `session`'s transaction ends: the run keeps it
    open while it lives (service.run_hold), and its process's death ends it (PostgreSQL: its connection drops;
    SQLite: its file lock goes with the process)."""
    transaction_lock(session, _run_lock(job_id, generation))


def run_is_live(session: Session, job_id: str, generation: int) -> bool:
    """Whether the run of the job that claimed `generation` still holds it (`hold_run`): one still going, not dead."""
    return lock_is_held(session, _run_lock(job_id, generation))


def _run_lock(job_id: str, generation: int) -> str:
    return f"ingestion-run:{job_id}:{generation}"


def count_attempt(session: Session, job_id: str, *, after_a_crash: bool) -> None:
    """Record one more processing attempt, and whether the one before it died (it neither ended nor handed back)."""
    session.execute(update(IngestionJob).where(IngestionJob.id == job_id)
                    .values(attempts=IngestionJob.attempts + 1,
                            crashed_runs=IngestionJob.crashed_runs + (1 if after_a_crash else 0), updated_at=utcnow()))


def hand_back(session: Session, job_id: str) -> bool:
    """A job whose run will not write its outcome (it failed cleanly and will be retried, it was abandoned at a clean
    stop, or a re-index made its rules stale) is waiting again, not being processed: its next run is no crash.
    Whether it was processing."""
    handed = session.execute(update(IngestionJob).where(IngestionJob.id == job_id,
                                                        IngestionJob.status == DocumentStatus.processing)
                             .values(status=DocumentStatus.queued, updated_at=utcnow()))
    return bool(handed.rowcount)  # type: ignore[attr-defined]


def unfinished_jobs(session: Session, document_id: str) -> list[str]:
    """Ids of the document's runs' jobs still queued or processing (`RUNS_ITS_DOCUMENT`): not those of an e-mail's
    attachment step queued alone, which run no document (a re-index lists these ids as the runs it covers)."""
    query = select(IngestionJob.id).where(IngestionJob.document_id == document_id,
                                          IngestionJob.status.in_(UNFINISHED), RUNS_ITS_DOCUMENT)
    return list(session.scalars(query.order_by(IngestionJob.created_at)))


# Built once: every query runs it (a statement built per call costs its construction and cache key).
_SERVED_AMONG_IDS = select(Document).where(Document.id.in_(bindparam("document_ids", expanding=True)), SERVED)


def served_documents(session: Session, document_ids: set[str]) -> dict[str, Document]:
    """Those of these documents whose index queries may cite (`SERVED`), by id."""
    if not document_ids:
        return {}
    rows = session.scalars(_SERVED_AMONG_IDS, {"document_ids": list(document_ids)})
    return {document.id: document for document in rows}


def served_in_department(session: Session, department: str) -> dict[str, Document]:
    """The department's documents whose index may be read (`SERVED`), by id."""
    query = select(Document).where(Document.department == department, SERVED)
    return {document.id: document for document in session.scalars(query)}


def find_duplicate(session: Session, *, department: str, sha256: str) -> Document | None:
    """A live document of the department with the same content hash (deleted/rejected/failed ones don't count)."""
    query = (select(Document)
             .where(Document.department == department, Document.sha256 == sha256,
                    Document.status.not_in(("deleted", "rejected", "failed")))
             .order_by(Document.created_at).limit(1))
    return session.scalars(query).first()


def get_policy(session: Session, department: str) -> IngestionPolicy | None:
    """A department's ingestion policy row, if one was set."""
    return session.get(IngestionPolicy, department)


def save_policy(session: Session, policy: IngestionPolicy) -> IngestionPolicy:
    """Insert or replace a department's ingestion policy."""
    merged = session.merge(policy)
    session.flush()
    return merged


def quarantined(session: Session, departments: list[str] | None) -> list[Document]:
    """Documents waiting for review, oldest first; `None` means every department."""
    query = select(Document).where(Document.status == "quarantined").order_by(Document.created_at)
    if departments is not None:
        query = query.where(Document.department.in_(departments))
    return list(session.scalars(query))


REINDEXED = (DocumentStatus.ready, DocumentStatus.quarantined)  # the ended states a re-index runs again


def documents_to_reindex(session: Session, *, department: str | None, document_ids: list[str] | None) -> list[Document]:
    """Documents of a department (or the given ids; `None` is every one, an empty list none) that a re-index covers:
    ready and quarantined ones, whose originals can be parsed again (a quarantined one shows the review queue its
    level under the current rules), those being ingested, and failed ones only when named: running one again is an
    admin's choice (quarantine.queue_reindex)."""
    named = (DocumentStatus.failed,) if document_ids is not None else ()
    query = select(Document).where(Document.status.in_((*REINDEXED, *UNFINISHED, *named)))
    if department is not None:
        query = query.where(Document.department == department)
    if document_ids is None:
        return list(session.scalars(query.order_by(Document.created_at, Document.id)))  # `in_row_order`
    ids = sorted(set(document_ids))
    batches = (ids[start:start + IDS_PER_STATEMENT] for start in range(0, len(ids), IDS_PER_STATEMENT))
    return in_row_order(document for batch in batches
                        for document in session.scalars(query.where(Document.id.in_(batch))))


def in_row_order(documents: Iterable[Document]) -> list[Document]:
    """The documents in the order a transaction writing several of their rows writes (so locks) them: oldest first,
    then by id, as a re-index queues them (`documents_to_reindex`) and a retirement retires them
    (purge.retire_family). Two such transactions never each hold a row the other waits for: PostgreSQL would abort
    one (its request a 500)."""
    return sorted(documents, key=lambda document: (document.created_at, document.id))


def lock_content(session: Session, *, department: str, sha256: str) -> None:
    """Hold the lock on this content in the department until the transaction ends: of an upload of it and another
    upload or a re-index of a failed copy at once, the later one finds the first (`find_duplicate`); a retirement of
    it and a re-index of a failed copy run one after the other (`failed_copies`)."""
    transaction_lock(session, f"upload:{department}:{sha256}")


def failed_copies(session: Session, *, department: str, sha256: str) -> list[Document]:
    """The department's failed documents with this content that kept their data key, oldest first: a re-index naming
    one may run it again (quarantine.queue_reindex), so retiring the content retires them too (purge.retire_family).
    A refused attachment has no key (its bytes are its e-mail's): every duplicate attachment is one, so a file many
    e-mails carry (a logo) has many, and so has empty content (every unreadable attachment's). The key is looked for
    in this query, whatever the key or the stored original is like: one the volume or the key store cannot give now
    is retired all the same, never left to a later re-index."""
    query = (select(Document).where(Document.department == department, Document.sha256 == sha256,
                                    Document.status == DocumentStatus.failed, HAS_DOCUMENT_KEY)
             .order_by(Document.created_at, Document.id))
    return list(session.scalars(query))


def email_with_refused_copy(session: Session, *, department: str, sha256: str,
                            after: tuple[datetime, str] | None = None) -> Document | None:
    """The e-mail above the oldest attachment refused as a duplicate of this content (a failed child naming the copy
    in `duplicate_of`), of those whose e-mail's run ended ready or quarantined (REINDEXED), or None. With
    `after` (a refused attachment's created_at and id), the oldest refused after that one."""
    email = aliased(Document)
    query = (select(email).join(Document, Document.parent_id == email.id)
             .where(Document.department == department, Document.sha256 == sha256,
                    Document.status == DocumentStatus.failed, Document.duplicate_of.is_not(None),
                    email.status.in_(REINDEXED))
             .order_by(Document.created_at, Document.id).limit(1))
    if after is not None:
        created_at, document_id = after
        query = query.where(or_(Document.created_at > created_at,
                                and_(Document.created_at == created_at, Document.id > document_id)))
    return session.scalars(query).first()


def is_attachment_step(job: IngestionJob) -> bool:
    """Whether the job was queued for its e-mail's attachment step alone (`queue_attachment_step`)."""
    return job.error == ATTACHMENT_STEP


_WAITING_STEPS = and_(IngestionJob.status.in_(UNFINISHED), IngestionJob.error == ATTACHMENT_STEP)


def attachment_step_waiting(session: Session, document_id: str) -> bool:
    """Whether the e-mail has an attachment step queued that has not run yet (it takes whatever may be taken again
    as it runs)."""
    query = select(IngestionJob.id).where(IngestionJob.document_id == document_id, _WAITING_STEPS)
    return session.scalars(query.limit(1)).first() is not None


def end_attachment_steps(session: Session, document_id: str) -> bool:
    """End the e-mail's attachment steps waiting (`ready`, their note kept), as a step of it runs: it does their
    work. Whether there were any."""
    ended = session.execute(update(IngestionJob).where(IngestionJob.document_id == document_id, _WAITING_STEPS)
                            .values(status=DocumentStatus.ready, updated_at=utcnow()))
    return bool(ended.rowcount)  # type: ignore[attr-defined]


def queue_attachment_step(session: Session, document_id: str) -> str:
    """Queue a job for an e-mail's attachment step alone. No path claims its e-mail for a run with it: its run leaves
    the e-mail, and a run of it going on, alone (service._start), and the e-mail's next attachment step, its own
    or that of a run of the e-mail, ends it (`end_attachment_steps`). Only a job row is written, not the e-mail's: a
    retirement queues it after writing its own rows, in whatever order."""
    job_id = str(uuid.uuid4())
    session.add(IngestionJob(id=job_id, document_id=document_id, status=DocumentStatus.queued, error=ATTACHMENT_STEP))
    session.flush()
    return job_id


def new_job(session: Session, *, document_id: str, from_statuses: tuple[str, ...],
            withhold: bool = False) -> str | None:
    """Queue another ingestion job for an existing document if it is still in one of `from_statuses`: a conditional
    update, so a change committed meanwhile (a deletion, a run's end) is read, not written over. With `withhold` (a
    re-index after a rule that may tighten what is shown) the same statement stops serving the document's index
    (`withhold`'s effect): only a document that is queued stops being served, never one whose status changed since
    it was listed. The new job's id, or None when the document was not in those states."""
    values: dict[str, object] = {"status": DocumentStatus.queued, "error": None, "updated_at": utcnow()}
    if withhold:  # SET reads the row as it was: `withheld` says whether it served something
        values |= {"served_generation": None,
                   "withheld": case((Document.served_generation.is_not(None), true()), else_=Document.withheld)}
    moved = session.execute(update(Document).where(Document.id == document_id, Document.status.in_(from_statuses))
                            .values(**values))
    if not moved.rowcount:  # type: ignore[attr-defined]
        return None
    job_id = str(uuid.uuid4())
    session.add(IngestionJob(id=job_id, document_id=document_id, status=DocumentStatus.queued))
    session.flush()
    return job_id


def record_outcome(session: Session, *, document_id: str, classification: str, declared: str, reasons: list[str],
                   flagged: int, review_reason: str | None) -> None:
    """Store what the pipeline decided about a document (levels, reasons, flags; never content)."""
    session.execute(update(Document).where(Document.id == document_id).values(
        classification=classification, declared_classification=declared, classification_reasons=reasons,
        flagged_chunks=flagged, review_reason=review_reason, updated_at=utcnow()))


def raise_level(session: Session, document_id: str, level: str, below: list[str]) -> None:
    """Raise the document's declared level (the floor its runs classify from) and its level to `level` where they
    are one of the levels `below` it, never lowering either: read and written in one statement, so a run's outcome
    committed meanwhile (a level its content raised higher) is kept. A retired document is left alone."""
    declared = func.coalesce(Document.declared_classification, Document.classification)
    session.execute(update(Document).where(Document.id == document_id, Document.status.not_in(RETIRED)).values(
        declared_classification=case((declared.in_(below), level), else_=declared),
        classification=case((Document.classification.in_(below), level), else_=Document.classification),
        updated_at=utcnow()))


def document_ids_with_keys(session: Session, department: str) -> list[str]:
    """Ids of a department's documents that may still hold a data key (not deleted or rejected)."""
    query = select(Document.id).where(Document.department == department,
                                      Document.status.not_in(RETIRED))
    return list(session.scalars(query.order_by(Document.id)))


def documents_page(session: Session, *, department: str, status: str | None, before: tuple[datetime, str] | None,
                   limit: int) -> list[Document]:
    """Up to `limit` of a department's documents (never deleted ones), newest first, after the position `before`
    (created_at, id) of the last one a previous page held."""
    query = select(Document).where(Document.department == department, Document.status != DocumentStatus.deleted)
    if status is not None:
        query = query.where(Document.status == status)
    if before is not None:
        created_at, document_id = before
        query = query.where(or_(Document.created_at < created_at,
                                and_(Document.created_at == created_at, Document.id < document_id)))
    return list(session.scalars(query.order_by(Document.created_at.desc(), Document.id.desc()).limit(limit)))


def children(session: Session, parent_id: str) -> list[Document]:
    """The attachment documents of an e-mail document."""
    return list(session.scalars(select(Document).where(Document.parent_id == parent_id).order_by(Document.title)))


def descendants(session: Session, document_id: str) -> list[Document]:
    """Attachments, their attachments, and so on (attached e-mails nest)."""
    found: list[Document] = []
    level = children(session, document_id)
    while level:
        found.extend(level)
        level = [grandchild for child in level for grandchild in children(session, child.id)]
    return found


def lineage(session: Session, document_id: str) -> list[str]:
    """The ids from the uploaded e-mail down to this document (itself last), each attachment below its e-mail."""
    line, current = [document_id], get_document(session, document_id)
    while current is not None and current.parent_id is not None:
        line.append(current.parent_id)
        current = get_document(session, current.parent_id)
    return line[::-1]


def lock_document(session: Session, document_id: str) -> None:
    """Hold the document's lock (transaction_lock) until the transaction ends: its reviews, its deletion and an
    e-mail taking its attachments run one after the other."""
    transaction_lock(session, f"document:{document_id}")


def lock_lineage(session: Session, document_id: str) -> list[str]:
    """Lock every document from the uploaded e-mail down to this one (that order, everywhere); returns their ids."""
    line = lineage(session, document_id)
    for line_id in line:
        lock_document(session, line_id)
    return line
