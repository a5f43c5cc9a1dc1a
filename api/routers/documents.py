"""Upload, status and deletion of documents; ingestion job status."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Annotated

from fastapi import APIRouter, File, Form, Query, UploadFile, status

from api.deps import CeleryDep, CurrentUser, EnforcerDep, SessionDep, SettingsDep
from api.query_params import JSON_INTEGER
from audit import service as audit_service
from audit.schemas import AdminEventType
from authz import service as authz_service
from authz.identity import Identity
from core.errors import ErrorCode, GovragError
from core.models import Document
from core.text import DepartmentName, require_no_nul
from guard.placeholders import document_placeholder
from ingestion import purge
from ingestion import service as ingestion_service
from ingestion.schemas import (
    Classification,
    DocumentPage,
    DocumentStatusOut,
    JobStatusOut,
    ListedStatus,
    RevealIn,
    RevealOut,
    UploadAccepted,
    parse_acl_groups,
)
from workers.dispatch import send_job, send_jobs

router = APIRouter(prefix="/v1", tags=["documents"])

MAX_PAGE = 200  # documents per listing page


# One document per upload: with two files, the last was taken and the others silently lost. A second one is a 400
# ("Too many files") as the form is read.
@router.post("/documents", status_code=status.HTTP_202_ACCEPTED, response_model=UploadAccepted,
             form_limits={"max_files": 1})
def upload_document(
    session: SessionDep, settings: SettingsDep, enforcer: EnforcerDep, celery: CeleryDep, user: CurrentUser,
    file: Annotated[UploadFile, File()],
    department: Annotated[DepartmentName, Form()],
    title: Annotated[str | None, Form(max_length=300)] = None,
    acl_groups: Annotated[list[str] | None, Form()] = None,
    classification: Annotated[Classification, Form()] = Classification.internal,
) -> UploadAccepted:
    """Accept a file for ingestion into a department (role: editor)."""
    require_no_nul(title=title, acl_groups=acl_groups)
    authz_service.require(enforcer, user, "upload", department)
    data = file.file.read(settings.max_upload_bytes + 1)
    accepted = ingestion_service.accept_upload(
        session=session, settings=settings, uploaded_by=user.subject, department=department,
        filename=file.filename, data=data, title=title, acl_groups=parse_acl_groups(acl_groups),
        classification=classification,
    )
    session.commit()
    send_job(celery, document_id=accepted.document_id, job_id=accepted.job_id)
    return accepted


@router.get("/documents", response_model=DocumentPage)
def list_documents(
    session: SessionDep, enforcer: EnforcerDep, user: CurrentUser,
    department: DepartmentName,
    status: ListedStatus | None = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE), JSON_INTEGER] = 50,
    after: Annotated[str | None, Query(max_length=200)] = None,
) -> DocumentPage:
    """A department's documents, newest first (metadata only): all of them for its editors, for its readers those
    they may read (ACL and clearance); anyone else is refused."""
    if not (authz_service.is_allowed(enforcer, user, "upload", department)
            or authz_service.is_allowed(enforcer, user, "read", department)):
        raise GovragError(ErrorCode.forbidden, "not allowed to list documents in this department")
    return ingestion_service.list_documents(session=session, can_see=_visibility(session, enforcer, user),
                                            department=department, status=status, limit=limit, after=after)


@router.get("/documents/{document_id}", response_model=DocumentStatusOut)
def get_document(document_id: str, session: SessionDep, enforcer: EnforcerDep,
                 user: CurrentUser) -> DocumentStatusOut:
    """Status and metadata of a document (never its content)."""
    return ingestion_service.document_status(session=session, can_see=_visibility(session, enforcer, user),
                                             document_id=document_id)


@router.delete("/documents/{document_id}", status_code=status.HTTP_204_NO_CONTENT)
def delete_document(document_id: str, session: SessionDep, settings: SettingsDep, enforcer: EnforcerDep,
                    celery: CeleryDep, user: CurrentUser) -> None:
    """Crypto-shred a document the caller may see, then remove its vectors and stored bytes (permission: delete; one
    hidden from the caller by its ACL or level looks like a missing id, as for a reveal); a vector store outage
    leaves that removal to the sweep, the document is deleted all the same. The deletion and its ledger row commit
    together: no audit, no deletion. Content another e-mail carries is taken again under it (the jobs sent)."""
    department, retired, retakes = ingestion_service.delete_document(
        session=session, settings=settings, document_id=document_id,
        can_delete=lambda document: (authz_service.is_allowed(enforcer, user, "delete", document.department)
                                     and _visibility(session, enforcer, user)(document)),
    )
    audit_service.record_admin_event(
        session=session, identity=user, event_type=AdminEventType.document_deleted, department=department,
        settings=settings, details={"document_id": document_id, "retired": sorted(retired)})
    purge.purge_now(settings, retired)
    send_jobs(celery, retakes)


@router.post("/documents/{document_id}/reveal", response_model=RevealOut)
def reveal(document_id: str, body: RevealIn, session: SessionDep, settings: SettingsDep, enforcer: EnforcerDep,
           user: CurrentUser) -> RevealOut:
    """The originals behind placeholders of a reversibly pseudonymised document (permission: reveal, on a document
    the caller may see); audited under the document's own placeholder names."""
    department, result = ingestion_service.reveal(
        session=session, settings=settings, document_id=document_id, placeholders=body.placeholders,
        can_reveal=lambda dept: authz_service.is_allowed(enforcer, user, "reveal", dept),
        can_see=_visibility(session, enforcer, user))
    audit_service.record_admin_event(
        session=session, identity=user, event_type=AdminEventType.reveal, department=department, settings=settings,
        details={"document_id": document_id, "placeholders": sorted({document_placeholder(p) for p in result.values})})
    return result


@router.get("/jobs/{job_id}", response_model=JobStatusOut)
def get_job(job_id: str, session: SessionDep, enforcer: EnforcerDep, user: CurrentUser) -> JobStatusOut:
    """Ingestion job status and failure reason."""
    return ingestion_service.job_status(session=session, can_see=_visibility(session, enforcer, user), job_id=job_id)


def _visibility(session: SessionDep, enforcer: EnforcerDep, user: Identity) -> Callable[[Document], bool]:
    """Who may see a document's status: `authz_service.may_see_document`."""
    return functools.partial(authz_service.may_see_document, enforcer, user, session=session)
