"""Ingestion administration: department policy, the quarantine review queue, re-indexing (issue 3)."""

from __future__ import annotations

from fastapi import APIRouter, status

from api.deps import CeleryDep, CurrentUser, EnforcerDep, SessionDep, SettingsDep
from audit import service as audit_service
from audit.schemas import AdminEventType
from authz import service as authz_service
from core.models import Document
from core.text import DepartmentName
from ingestion import purge, quarantine
from ingestion import reindex as reindexing
from ingestion.schemas import (
    IngestionPolicyIn,
    IngestionPolicyOut,
    QuarantinedOut,
    ReindexIn,
    ReindexOut,
    ReviewDecision,
)
from workers.dispatch import send_job, send_jobs

router = APIRouter(prefix="/v1/admin", tags=["ingestion admin"])


@router.get("/departments/{department}/ingestion-policy", response_model=IngestionPolicyOut)
def get_policy(department: DepartmentName, session: SessionDep, enforcer: EnforcerDep,
               user: CurrentUser) -> IngestionPolicyOut:
    """A department's ingestion policy (its admins); a department that does not exist is a 404, as for the PUT."""
    authz_service.require_manage(enforcer, user, department)
    authz_service.require_department(session, department)
    return quarantine.get_policy(session=session, department=department)


@router.put("/departments/{department}/ingestion-policy", response_model=IngestionPolicyOut)
def put_policy(department: DepartmentName, body: IngestionPolicyIn, session: SessionDep, enforcer: EnforcerDep,
               settings: SettingsDep, user: CurrentUser) -> IngestionPolicyOut:
    """Set the levels approved for AI, the injection action, keywords and redaction rules (its admins)."""
    authz_service.require_manage(enforcer, user, department)
    saved = quarantine.set_policy(session=session, department=department, policy=body, actor=user.subject)
    audit_service.record_admin_event(
        session=session, identity=user, event_type=AdminEventType.ingestion_policy, department=department,
        settings=settings,
        details={"ai_max_level": body.ai_max_level.value, "injection_action": body.injection_action.value,
                 "keywords": len(body.keywords), "allow_list": len(body.allow_list),
                 "recognizers": [r.entity for r in body.recognizers]})
    return saved


@router.get("/quarantine", response_model=list[QuarantinedOut])
def list_quarantine(session: SessionDep, enforcer: EnforcerDep, user: CurrentUser,
                    department: DepartmentName | None = None) -> list[QuarantinedOut]:
    """Documents held for review: all for platform admins, a department's for its admins."""
    if department is None:
        authz_service.require_platform_admin(user)
        return quarantine.list_quarantined(session=session, departments=None)
    authz_service.require_manage(enforcer, user, department)
    return quarantine.list_quarantined(session=session, departments=[department])


@router.post("/quarantine/{document_id}/approve", response_model=ReviewDecision)
def approve(document_id: str, session: SessionDep, enforcer: EnforcerDep, settings: SettingsDep,
            celery: CeleryDep, user: CurrentUser) -> ReviewDecision:
    """Release a quarantined document for AI use; it is indexed by a new job."""
    document = _under_review(session, enforcer, user, document_id)
    decision = quarantine.approve(session=session, document=document, actor=user.subject)
    _audit_decision(session, settings, user, document.department,
                    {"document_id": document_id, "decision": "approved", "job_id": decision.job_id})
    send_job(celery, document_id=document_id, job_id=str(decision.job_id))
    return decision


@router.post("/quarantine/{document_id}/reject", response_model=ReviewDecision)
def reject(document_id: str, session: SessionDep, enforcer: EnforcerDep, settings: SettingsDep,
           celery: CeleryDep, user: CurrentUser) -> ReviewDecision:
    """Refuse a quarantined document (an e-mail with its attachments): keys shredded, stored bytes removed; content
    another e-mail carries is taken again under it (the jobs sent)."""
    document = _under_review(session, enforcer, user, document_id)
    decision, retired, retakes = quarantine.reject(session=session, settings=settings, document=document)
    _audit_decision(session, settings, user, document.department,
                    {"document_id": document_id, "decision": "rejected", "retired": sorted(retired)})
    purge.purge_now(settings, retired)
    send_jobs(celery, retakes)
    return decision


@router.post("/reindex", status_code=status.HTTP_202_ACCEPTED, response_model=ReindexOut)
def reindex(body: ReindexIn, session: SessionDep, enforcer: EnforcerDep, settings: SettingsDep,
            celery: CeleryDep, user: CurrentUser) -> ReindexOut:
    """Parse, redact and embed a department's ready and quarantined documents, and the failed ones named, again from
    their encrypted originals (`quarantine.queue_reindex`), audited as one (`reindexing.queue_audited`, which
    `govrag reindex` uses too); documents being ingested run again under the current rules. They stop being served
    meanwhile unless `serve_previous`."""
    authz_service.require_manage(enforcer, user, body.department)
    reindex = reindexing.queue_audited(session=session, settings=settings, identity=user, department=body.department,
                                       document_ids=body.document_ids, serve_previous=body.serve_previous)
    send_jobs(celery, reindex.queued)
    return ReindexOut(queued=[job_id for _, job_id in reindex.queued] + reindex.rerun, skipped=reindex.skipped)


def _under_review(session: SessionDep, enforcer: EnforcerDep, user: CurrentUser, document_id: str) -> Document:
    """The quarantined document, for its department's admins: refused (403) to others who may see it, an editor of
    the department; to anyone else it does not exist, like an unknown id (404)."""
    document = quarantine.quarantined_document(
        session=session, document_id=document_id,
        can_see=lambda doc: (authz_service.may_manage(enforcer, user, doc.department)
                             or authz_service.may_see_document(enforcer, user, doc, session=session)))
    authz_service.require_manage(enforcer, user, document.department)
    return document


def _audit_decision(session: SessionDep, settings: SettingsDep, user: CurrentUser, department: str,
                    details: dict[str, object]) -> None:
    """Record the decision in the ledger (commits the session): the document, "approved" with the job that
    releases it or "rejected" with every id retired (an e-mail's attachments too), as a DELETE records them."""
    audit_service.record_admin_event(
        session=session, identity=user, event_type=AdminEventType.quarantine_decision, department=department,
        settings=settings, details=details)
