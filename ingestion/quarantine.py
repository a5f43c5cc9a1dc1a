"""Department ingestion policy, the review queue of quarantined documents, and re-indexing."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy.orm import Session

from authz import service as authz_service
from core import blobs
from core.db import transaction_lock
from core.errors import ErrorCode, GovragError
from core.keystore import KeyState, keystore_for
from core.models import UNFINISHED, Document, DocumentStatus, IngestionPolicy
from core.settings import Settings
from guard.pii_rules import CustomRecognizer, RedactionRules, validate_custom
from ingestion import purge, repository
from ingestion.pipeline import IngestionRules
from ingestion.schemas import (
    Classification,
    CustomRecognizerIn,
    IngestionPolicyIn,
    IngestionPolicyOut,
    InjectionAction,
    QuarantinedOut,
    ReviewDecision,
)


def get_policy(*, session: Session, department: str) -> IngestionPolicyOut:
    """A department's ingestion policy (the defaults when none was set)."""
    row = repository.get_policy(session, department)
    if row is None:
        return IngestionPolicyOut(department=department)
    return IngestionPolicyOut(
        department=department, ai_max_level=Classification(row.ai_max_level),
        injection_action=InjectionAction(row.injection_action),
        keywords={k: Classification(v) for k, v in row.keywords.items()}, allow_list=list(row.allow_list),
        recognizers=[CustomRecognizerIn(**spec) for spec in row.recognizers], reversible=row.reversible,
    )


def set_policy(*, session: Session, department: str, policy: IngestionPolicyIn, actor: str) -> IngestionPolicyOut:
    """Replace a department's ingestion policy after checking every custom recognizer compiles safely."""
    authz_service.require_department(session, department)
    for spec in policy.recognizers:
        problem = validate_custom(_custom(spec))
        if problem is not None:
            raise GovragError(ErrorCode.invalid_request, f"recognizer {spec.entity}: {problem}")
    transaction_lock(session, f"ingestion-policy:{department}")  # two saves at once: the second replaces the first
    repository.save_policy(session, IngestionPolicy(
        department=department, ai_max_level=policy.ai_max_level.value,
        injection_action=policy.injection_action.value,
        keywords={k.strip(): v.value for k, v in policy.keywords.items() if k.strip()},
        allow_list=[v for v in policy.allow_list if v.strip()],
        recognizers=[spec.model_dump() for spec in policy.recognizers], reversible=policy.reversible,
        updated_by=actor,
    ))
    return get_policy(session=session, department=department)


def rules_for(*, session: Session, department: str) -> IngestionRules:
    """The pipeline's view of a department's policy."""
    policy = get_policy(session=session, department=department)
    return IngestionRules(
        ai_max_level=policy.ai_max_level, injection_action=policy.injection_action.value,
        keywords={k: v.value for k, v in policy.keywords.items()},
        redaction=redaction_rules(recognizers=policy.recognizers, allow_list=policy.allow_list),
        reversible=policy.reversible,
    )


def redaction_rules(*, recognizers: list[CustomRecognizerIn], allow_list: list[str]) -> RedactionRules:
    """The redactor's additions from a department's policy: its recognizers and allow-list."""
    return RedactionRules(recognizers=tuple(_custom(spec) for spec in recognizers), allow_list=tuple(allow_list))


def list_quarantined(*, session: Session, departments: list[str] | None) -> list[QuarantinedOut]:
    """Documents waiting for an admin decision."""
    return [_quarantined_out(document) for document in repository.quarantined(session, departments)]


def quarantined_document(*, session: Session, document_id: str, can_see: Callable[[Document], bool]) -> Document:
    """A quarantined document the caller may see, or not found (also for documents in any other state, so an id the
    caller may not see looks exactly like an unknown one). Reviews of one document run one after the other: of two
    admins approving and rejecting at once, the second finds it no longer quarantined. The locks of the e-mails an
    attachment was taken from are taken first, from the uploaded one down (purge.retire_family's order): a review
    of an attachment and a rejection or deletion of its e-mail also run one after the other."""
    repository.lock_lineage(session, document_id)
    document = repository.get_document(session, document_id)
    if document is None or document.status != DocumentStatus.quarantined or not can_see(document):
        raise GovragError(ErrorCode.not_found, "no such quarantined document")
    return document


def approve(*, session: Session, document: Document, actor: str) -> ReviewDecision:
    """Release a quarantined document for AI use at the level the review queue shows: it is ingested again with
    the gate passed up to that level (a run that finds it higher, as the policy changed, holds it again). One that
    left quarantine meanwhile (a re-index queued it) is not found, as after another review."""
    job_id = repository.new_job(session, document_id=document.id, from_statuses=(DocumentStatus.quarantined,))
    if job_id is None:
        raise GovragError(ErrorCode.not_found, "no such quarantined document")
    document.approved_by = actor
    document.approved_level = document.classification
    return ReviewDecision(document_id=document.id, status=DocumentStatus.queued, job_id=job_id)


def reject(*, session: Session, settings: Settings,
           document: Document) -> tuple[ReviewDecision, list[str], list[tuple[str, str]]]:
    """Refuse a quarantined document, and with an e-mail the attachments taken from it meanwhile, and the failed
    copies of their content (purge.retire_family): their keys are shredded and purges owed. Returns the decision,
    the ids to purge (purge.purge_now) and the jobs to send (attachment steps taking again, under e-mails that carry
    it, content it leaves without a live copy) once the caller commits. One no longer quarantined once its content is
    locked (deleted or rejected as the attachment of a failed copy of content retired elsewhere) is not found, as
    after another review: never rejected twice."""
    retired = purge.retire_family(session, settings, document, DocumentStatus.rejected,
                                  from_statuses=(DocumentStatus.quarantined,))
    if document.id not in retired.ids:
        raise GovragError(ErrorCode.not_found, "no such quarantined document")
    return ReviewDecision(document_id=document.id, status=DocumentStatus.rejected), retired.ids, retired.retakes


@dataclass(frozen=True)
class Reindex:
    """What a re-index did: new jobs to send once committed (document id, job id), the jobs of documents being
    ingested that run again under the current rules (already sent), and the documents it left alone."""

    queued: list[tuple[str, str]]
    rerun: list[str]
    skipped: list[str]


def queue_reindex(*, session: Session, settings: Settings, department: str, document_ids: list[str] | None,
                  serve_previous: bool) -> Reindex:
    """Queue a fresh ingestion of ready and quarantined documents from their encrypted originals (a quarantined one
    is classified again, so the review queue never shows a level older than the rules: an approval releases at most
    the level shown; one the current rules no longer hold is released), and of the failed ones named. A document
    being ingested is covered too: its run read the department's rules when it started, perhaps before the policy
    change this re-index follows, so its job is handed back: the run writes nothing and goes again under the current
    rules (ingestion/service.py). Unless `serve_previous` (a change that tightens nothing: chunk size, model), the
    documents stop being served at once: the rule change may have ruled their index out. Each document is taken as
    it is when queued, not as listed (an approval run or a deletion may end meanwhile): its index is withheld only
    in the statement that queues its job, or while it is being ingested.

    A failed document (a re-index whose runs failed, an outage that outlasted the retries) runs again only when
    named in `document_ids` (so is one listed being ingested whose run ends failed before it is queued): the admin
    chooses it, as a department-wide re-index never did (a user may have given up on it, a file that kills the
    parser would take a worker down again). It serves nothing until its run ends ready; a run that fails again
    leaves it failed with the new reason. It is covered if its data key and sealed original are kept
    (`_original_kept`: a refused attachment never had either, its bytes are its e-mail's) and its department has
    no live copy of its content (one uploaded again after the failure, under a new id: two copies would answer
    twice). A deletion or rejection of its content retires it (purge.retire_family).

    Skipped: ids named that none of this covers (unknown, another department's, deleted, a refused attachment,
    failed with a live copy), and documents listed that left these states before being queued (a deletion stays
    deleted; department-wide, one whose run ended failed); not_found for a department that does not exist."""
    authz_service.require_department(session, department)
    listed = repository.documents_to_reindex(session, department=department, document_ids=document_ids)
    may_run_failed = _lock_failed_contents(session, listed) if document_ids is not None else set()
    if may_run_failed:
        blobs.decide_first_use(settings.blob_dir)  # before the first write: `_original_kept` uses the store
    withhold = not serve_previous
    return _covering(session, document_ids, listed, lambda document: _run_again(
        session, settings, document, withhold, document.id in may_run_failed))


def plan_reindex(*, session: Session, settings: Settings, department: str,
                 document_ids: list[str] | None) -> Reindex:
    """What `queue_reindex` would do with the documents as they stand now, read only (`govrag reindex --dry-run`):
    no row written nor locked (nor a content's lock taken), so an API request, a run or an upload touching these
    documents meanwhile never waits for it. The documents it would queue (with an empty job id: no job is made), the
    runs it would send round again, and the documents it would skip."""
    authz_service.require_department(session, department)
    listed = repository.documents_to_reindex(session, department=department, document_ids=document_ids)

    def would_queue(document: Document) -> str | None:
        named_failed = document_ids is not None and document.status == DocumentStatus.failed
        if document.status in repository.REINDEXED or (named_failed and _failed_may_run(session, settings, document)):
            return ""
        return None

    return _covering(session, document_ids, listed, would_queue)


def _covering(session: Session, document_ids: list[str] | None, listed: list[Document],
              job_for: Callable[[Document], str | None]) -> Reindex:
    """The re-index of the documents listed: each one `job_for` gives a job (its id) queued, else the runs of one
    being ingested sent round again; skipped, those named (or listed, department-wide) that neither covers."""
    queued: list[tuple[str, str]] = []
    rerun: list[str] = []
    covered: set[str] = set()
    for document in listed:
        if (job_id := job_for(document)) is not None:
            queued.append((document.id, job_id))
            covered.add(document.id)
        elif running := repository.unfinished_jobs(session, document.id):
            rerun.extend(running)
            covered.add(document.id)
    wanted = document_ids if document_ids is not None else [document.id for document in listed]
    return Reindex(queued=queued, rerun=rerun, skipped=[i for i in dict.fromkeys(wanted) if i not in covered])


def _lock_failed_contents(session: Session, listed: list[Document]) -> set[str]:
    """Before the re-index's first write, take the content lock (sorted) of each named document that is failed, or
    being ingested (its run may end failed before it is queued): an upload takes it before it writes, and on SQLite
    the first write takes the database's one write lock, so a lock taken after earlier documents' rows held an upload
    of the same bytes past the busy timeout, and failed it. The ids whose failed path may run (`_queue_failed`)."""
    may_fail = [document for document in listed if document.status in (DocumentStatus.failed, *UNFINISHED)]
    for department, sha256 in sorted({(document.department, document.sha256) for document in may_fail}):
        repository.lock_content(session, department=department, sha256=sha256)
    return {document.id for document in may_fail}


def run_withheld(session: Session, settings: Settings, document: Document) -> str | None:
    """Run a ready or quarantined document, or one being ingested, again under what governs it now (a raised level),
    its index withheld until that run ends (`_run_again`, as a re-index without `serve_previous` does): the new job's
    id to send once committed, or None (its running jobs go round again, or it left these states)."""
    return _run_again(session, settings, document, withhold=True, failed_too=False)


def _run_again(session: Session, settings: Settings, document: Document, withhold: bool,
               failed_too: bool) -> str | None:
    """A new job for the document as it is now (`_queue_now`), or, for one being ingested (as listed or since), its
    runs sent round again (`_hand_back`): None, unless a run ended meanwhile first and it is queued after all."""
    job_id = _queue_now(session, settings, document, withhold, failed_too)
    if job_id is None:
        _hand_back(session, document.id, withhold)
        job_id = _queue_now(session, settings, document, withhold, failed_too)
    return job_id


def _queue_now(session: Session, settings: Settings, document: Document, withhold: bool,
               failed_too: bool) -> str | None:
    """A new job for the document as it is now: ready or quarantined, or with `failed_too` (named, its content
    locked) failed, its original kept and no live copy (`_queue_failed`); the job's id, or None."""
    job_id = repository.new_job(session, document_id=document.id, from_statuses=repository.REINDEXED,
                                withhold=withhold)
    if job_id is None and failed_too:
        job_id = _queue_failed(session, settings, document, withhold)
    return job_id


def _queue_failed(session: Session, settings: Settings, document: Document, withhold: bool) -> str | None:
    """A new job for the document if it is failed now, unless its department has its content live (a copy uploaded
    since, or the document itself, still being ingested) or it lost what a run reads (`_original_kept`):
    checked under the content's lock (`_lock_failed_contents`), as an upload checks, so an upload of it meanwhile and
    this job never both go live, and a retirement of its content (purge.retire_family) retires it first or waits."""
    if not _failed_may_run(session, settings, document):
        return None
    return repository.new_job(session, document_id=document.id, from_statuses=(DocumentStatus.failed,),
                              withhold=withhold)


def _failed_may_run(session: Session, settings: Settings, document: Document) -> bool:
    """Whether a failed document may run again: its department has no live copy of its content and it kept what a
    run reads (`_original_kept`)."""
    return (repository.find_duplicate(session, department=document.department, sha256=document.sha256) is None
            and _original_kept(session, settings, document))


def _original_kept(session: Session, settings: Settings, document: Document) -> bool:
    """Whether the document kept what a run reads: its data key (kept until it is deleted or rejected) and its sealed
    upload. A re-index leaves one without either failed with its reason: its run would fail at once on it (the claim
    on a missing key or one whose row no longer opens, the read of the original on a missing file;
    ingestion/service.py). Whether the original opens under the key is the run's to find (it fails at once too), not
    read here for each failed document."""
    found = keystore_for(settings).document_key(session=session, department=document.department,
                                                document_id=document.id)
    # an unreadable key row is as lost as a missing one; the run that failed it said why
    return found.state is KeyState.opened and blobs.has_original(settings.blob_dir, document.id)


def _hand_back(session: Session, document_id: str, withhold: bool) -> None:
    """Send the runs of a document being ingested round again under the current rules: its jobs are handed back,
    after its index is withheld (with `withhold`): a run's end locks the document's row, then its job's."""
    if withhold:
        repository.withhold(session, document_id)
    for job_id in repository.unfinished_jobs(session, document_id):
        repository.hand_back(session, job_id)


def _custom(spec: CustomRecognizerIn) -> CustomRecognizer:
    return CustomRecognizer(entity=spec.entity, pattern=spec.pattern, checksum=spec.checksum,
                            context=tuple(spec.context), score=spec.score)


def _quarantined_out(document: Document) -> QuarantinedOut:
    return QuarantinedOut(
        document_id=document.id, department=document.department, title=document.title,
        classification=document.classification, declared_classification=document.declared_classification,
        reasons=list(document.classification_reasons or []), flagged_chunks=document.flagged_chunks,
        review_reason=document.review_reason, uploaded_by=document.uploaded_by, created_at=document.created_at,
    )
