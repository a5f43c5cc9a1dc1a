"""Retiring a document (deleted, or rejected from quarantine) and purging what it leaves behind.

Retirement is one transaction: the document's key is shredded (its ciphertexts can never be read again), its status
changes, and a `pending_purges` row says that its vectors and stored bytes may still exist. Once that commits,
`purge_now` removes them and the row. If the vector store, the blob volume (not mounted) or the database is away,
the row stays and the API's sweep finishes the purge later (`purge_pending`).

In this order a failure can only leave unreadable ciphertext behind for a while. Purging first, as deletion used
to, could leave a document that still looked `ready` with its vectors and original already gone (the vector store
failing partway through an e-mail's attachments, the database failing at the commit).
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import delete, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from core import blobs
from core.db import is_postgres, unit_of_work
from core.errors import unavailable_dependency
from core.keystore import keystore_for, lock_department_keys
from core.models import Document, DocumentStatus, PendingPurge, utcnow
from core.settings import Settings
from ingestion import repository
from retrieval.store import open_vector_store

logger = logging.getLogger(__name__)

_SWEEP_BATCH = 100
_ORPHAN_BATCH = 500  # stored files looked up in the documents table at once
# The request that retires a document purges it right after its commit; the sweep takes what is owed after this.
PURGE_GRACE_SECONDS = 30.0
# A stored file no document row owns is an upload whose commit failed after its file was written (its key was never
# committed: nobody can read it), or a write a crash cut short. No upload or write takes a day, so after a day such
# a file is removed. (Removing the file when the commit raises would be wrong: a commit can succeed at the server
# while the client sees an error, and the accepted document would lose its original.)
ORPHAN_GRACE_SECONDS = 24 * 3600.0
ORPHAN_SWEEP_SECONDS = 3600.0  # how often each API process looks: the scan reads every stored file's metadata


def retire(session: Session, settings: Settings, document: Document, status: DocumentStatus) -> bool:
    """In the caller's transaction: shred the document's key, set its final status, forget what identifies the
    original, and record the purge owed. Whether it was retired: not if it is deleted, or rejected for a rejection,
    as a retirement committed since it was read may have left it (`repository.retire`); nothing is recorded then.
    Its key rows are deleted first, as before (every retirement takes the two rows' locks in this order), under its
    department's key lock, held since before the transaction's first write (`retire_family`): one retired meanwhile
    has none left."""
    keystore_for(settings).shred_document_key(session=session, document_id=document.id)
    if not repository.retire(session, document_id=document.id, status=status, forgotten=forgotten(status)):
        return False
    owe_purge(session, document)
    return True


def forgotten(status: DocumentStatus) -> dict[str, object]:
    """The row's metadata that names or confirms the original (its title, a file or attachment name, its content
    hash, size and type), cleared; its id, department, status and times stay, for the ledger's references. A new
    upload of the same bytes is then no duplicate of anything (retired rows never were)."""
    return {"title": f"({status})", "sha256": "", "size_bytes": 0, "content_type": ""}


@dataclass(frozen=True)
class Retirement:
    """What `retire_family` did: the ids to purge once the caller commits (`purge_now`), and the jobs to send then
    (document id, job id): attachment steps queued to take again content whose last live copy it retired."""

    ids: list[str]
    retakes: list[tuple[str, str]]


def retire_family(session: Session, settings: Settings, document: Document, status: DocumentStatus, *,
                  from_statuses: Collection[str] | None = None) -> Retirement:
    """In the caller's transaction (which holds the document's lock): retire the document and everything attached
    below it, an e-mail taking its attachments (one already deleted stays deleted), and the department's failed
    copies of their content with what is attached below those (`_failed_copies`): a failed document is no
    duplicate, so the same bytes may have been uploaded again after it failed; erased, they must not come back when a
    re-index names the failed one. The locks are taken before the first write: each attachment's, e-mails before
    their attachments (the order `quarantine.quarantined_document` takes them in), so a review of an attachment ends
    before its e-mail's retirement reads it; then each content's, sorted (as a re-index takes them), so an upload or
    a re-index of the same bytes runs before or after; then the department's key lock, shared (after the content
    locks, as an upload takes it), so a key rotation rewrapping or retiring the department's key rows runs before or
    after: it never wraps a key shredded here again, nor meets these key rows in another order. The rows are then
    written oldest first, as a re-index writes them (`repository.in_row_order`), each before the next; one that
    another retirement took after it was read here (an attachment below a failed copy, whose lock neither takes) is
    skipped (`retire`). Returns the ids to purge once the caller commits (`purge_now`), those retired here; none if
    the document, as it is under those locks, is deleted or (given) not in `from_statuses`, and not the document's
    if it was skipped: another retirement took it as a failed copy's attachment meanwhile (the caller's 404). With
    them, the attachment steps it queued (`_queue_retakes`)."""
    below = repository.descendants(session, document.id)  # level by level: each e-mail before its attachments
    for child in below:
        repository.lock_document(session, child.id)
    family = [document, *below]
    contents = sorted({(member.department, member.sha256) for member in family if member.sha256})
    for department, sha256 in contents:
        repository.lock_content(session, department=department, sha256=sha256)
    for department in sorted({member.department for member in family}):  # its failed copies' too: same departments
        lock_department_keys(session, department)
    family = _as_now(session, family)
    if document not in family or (from_statuses is not None and document.status not in from_statuses):
        return Retirement(ids=[], retakes=[])
    copies = _as_now(session, [member for copy in _failed_copies(session, family)
                               for member in (copy, *repository.descendants(session, copy.id))])
    retired: list[str] = []
    for target in repository.in_row_order({target.id: target for target in (*family, *copies)}.values()):
        if retire(session, settings, target, status):
            session.flush()  # its rows written (locked) now, before the next's: not in the flush's own order (by id)
            retired.append(target.id)
    return Retirement(ids=retired, retakes=_queue_retakes(session, contents))


def _queue_retakes(session: Session, contents: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """For each content whose department has no live copy left once the family is retired (read under the content's
    lock, which an attachment step taking it again takes too), the attachment step of an e-mail carrying it, queued
    (`ask_carrier`): it takes the attachment again under that e-mail, with its ACL and level
    (service.spawn_attachments). Of several e-mails whose steps then run, one takes it (each reads, under the
    content's lock, whether the other did); the others' refusals stand."""
    queued: list[tuple[str, str]] = []
    for department, sha256 in contents:
        if repository.find_duplicate(session, department=department, sha256=sha256) is not None:
            continue  # a live copy stands
        if (step := ask_carrier(session, department=department, sha256=sha256)) is not None:
            queued.append(step)
    return queued


def ask_carrier(session: Session, *, department: str, sha256: str,
                after: tuple[datetime, str] | None = None) -> tuple[str, str] | None:
    """Queue the attachment step of the e-mail above the oldest attachment refused as a duplicate of this content (or
    the oldest refused after `after`, the refusal of an e-mail whose step could not take it:
    service.spawn_attachments, or whose run or step gave up: service.mark_failed), whose run ended
    (`repository.email_with_refused_copy`). An e-mail being ingested is passed over, not chosen: its run's step comes
    after it and takes the content too, or passes it on here if that run gives up. (document id, job id) to send
    once the caller commits; None when no e-mail is left to ask, or the one found has a step waiting already (it
    takes the content as it runs: asked once)."""
    email = repository.email_with_refused_copy(session, department=department, sha256=sha256, after=after)
    if email is None or repository.attachment_step_waiting(session, email.id):
        return None
    logger.info("the attachment step of document %s is queued: it carries content no longer live", email.id)
    return email.id, repository.queue_attachment_step(session, email.id)


def _as_now(session: Session, documents: list[Document]) -> list[Document]:
    """The documents as they are now, those deleted meanwhile left out: a review or a deletion that held a lock taken
    here, or another retirement that took a failed copy under its content's lock (`_failed_copies`), may have
    changed them since they were read."""
    for document in documents:
        session.refresh(document)
    return [document for document in documents if document.status != DocumentStatus.deleted]


def _failed_copies(session: Session, family: list[Document]) -> list[Document]:
    """The department's failed documents (none of `family`) with the content of a member, read under that content's
    lock, that kept their data key (`repository.failed_copies`: a refused attachment has none, its bytes are its
    e-mail's, which this leaves alone): every one a re-index naming it could run again, whether or not its key opens
    or its stored original can be read now (a volume not mounted, a key store restored). No lock of a copy, nor of
    an attachment below one, is taken: a deletion of either holds that lock while it waits for a content lock held
    here, and the two would deadlock (on SQLite, hang). A copy moves only under its content's lock (a re-index, its
    own deletion, another retirement), held here; an attachment below one is retired as it is read then
    (`_as_now`), unless a retirement that took it since has left it retired (`retire`)."""
    members = {member.id for member in family}
    found = {copy.id: copy for member in family if member.sha256
             for copy in repository.failed_copies(session, department=member.department, sha256=member.sha256)
             if copy.id not in members}
    return list(found.values())


def owe_purge(session: Session, document: Document) -> None:
    """Record that the document's vectors and stored bytes must go (again: a late ingestion run may have written
    some after its retirement), as of now: one statement that updates the row it meets, so two transactions owing
    the purge at once (a deletion of a rejected document and a late run withdrawing its job) both commit, in either
    order, the later time kept. (Reading the row, then inserting it if missing, failed the second on the first's.)"""
    owed = (postgresql.insert if is_postgres(session) else sqlite.insert)(PendingPurge).values(
        document_id=document.id, department=document.department, retired_at=utcnow())
    session.execute(owed.on_conflict_do_update(
        index_elements=[PendingPurge.document_id],
        set_={"department": owed.excluded.department, "retired_at": owed.excluded.retired_at}))


def purge_now(settings: Settings, document_ids: Collection[str]) -> None:
    """Right after a retirement commits: purge these documents; an outage leaves them to the sweep."""
    try:
        purge_pending(settings, document_ids=document_ids)
    except Exception as exc:
        dependency = unavailable_dependency(exc)
        if dependency is None:
            raise
        logger.warning("the %s is unavailable: %d retired document(s) will be purged by the sweep",
                       dependency, len(document_ids))


def purge_pending(settings: Settings, *, document_ids: Collection[str] | None = None,
                  older_than_seconds: float = 0.0) -> int:
    """Remove the vectors and stored bytes of retired documents still owed a purge (those named, else those retired
    more than `older_than_seconds` ago); returns how many were purged. Each purge commits on its own, so an outage
    partway keeps what was done. The vectors go first, then the files (`Unavailable` while the blob volume is not
    mounted), then the record."""
    with unit_of_work(settings.resolved_database_url) as session:
        owed = _owed(session, document_ids, older_than_seconds)
    for document_id, department, retired_at in owed:
        open_vector_store(settings).delete_document(department, document_id)
        blobs.remove(settings.blob_dir, document_id)
        with unit_of_work(settings.resolved_database_url) as session:  # unless a late run owed it again meanwhile
            session.execute(delete(PendingPurge).where(PendingPurge.document_id == document_id,
                                                       PendingPurge.retired_at == retired_at))
    return len(owed)


def _owed(session: Session, document_ids: Collection[str] | None,
          older_than_seconds: float) -> list[tuple[str, str, datetime]]:
    query = select(PendingPurge.document_id, PendingPurge.department, PendingPurge.retired_at)
    if document_ids is not None:
        query = query.where(PendingPurge.document_id.in_(list(document_ids)))
    else:
        cutoff = utcnow() - timedelta(seconds=older_than_seconds)
        query = query.where(PendingPurge.retired_at <= cutoff).order_by(PendingPurge.retired_at).limit(_SWEEP_BATCH)
    return [(document_id, department, retired_at) for document_id, department, retired_at in session.execute(query)]


def sweep_orphan_files(settings: Settings, *, older_than_seconds: float = ORPHAN_GRACE_SECONDS) -> int:
    """Remove stored files untouched for `older_than_seconds` that no document row owns, and unfinished writes;
    returns how many were removed. A retired document's files are the purge's, not this sweep's."""
    removed, batch = 0, []
    for stale in blobs.stale_files(settings.blob_dir, older_than_seconds):
        batch.append(stale)
        if len(batch) >= _ORPHAN_BATCH:
            removed += _remove_orphans(settings, batch)
            batch = []
    removed += _remove_orphans(settings, batch) if batch else 0
    if removed:
        logger.info("removed %d stored file(s) that no document owns", removed)
    return removed



def _remove_orphans(settings: Settings, stale: list[tuple[str, Path, bool]]) -> int:
    with unit_of_work(settings.resolved_database_url) as session:
        owned = set(session.scalars(select(Document.id).where(Document.id.in_({i for i, _, _ in stale}))))
    orphans = [path for document_id, path, unfinished in stale if unfinished or document_id not in owned]
    for path in orphans:
        path.unlink(missing_ok=True)
    return len(orphans)
