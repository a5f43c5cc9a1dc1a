"""Upload, status and deletion of documents; ingestion job status."""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import APIRouter, File, Form, UploadFile, status

from api.deps import CeleryDep, CurrentUser, EnforcerDep, SessionDep, SettingsDep
from authz import service as authz_service
from authz.identity import Identity
from core.errors import ErrorCode, GovragError
from ingestion import service as ingestion_service
from ingestion.schemas import Classification, DocumentStatusOut, JobStatusOut, UploadAccepted
from workers.tasks import enqueue_ingestion

router = APIRouter(prefix="/v1", tags=["documents"])

GROUP_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@/-]{0,127}$")


@router.post("/documents", status_code=status.HTTP_202_ACCEPTED, response_model=UploadAccepted)
def upload_document(
    session: SessionDep, settings: SettingsDep, enforcer: EnforcerDep, celery: CeleryDep, user: CurrentUser,
    file: Annotated[UploadFile, File()],
    department: Annotated[str, Form()],
    title: Annotated[str | None, Form(max_length=300)] = None,
    acl_groups: Annotated[list[str] | None, Form()] = None,
    classification: Annotated[Classification, Form()] = Classification.internal,
) -> UploadAccepted:
    """Accept a file for ingestion into a department (role: editor)."""
    authz_service.require(enforcer, user, "upload", department)
    data = file.file.read(settings.max_upload_bytes + 1)
    accepted = ingestion_service.accept_upload(
        session=session, settings=settings, uploaded_by=user.subject, department=department,
        filename=file.filename, data=data, title=title, acl_groups=parse_acl_groups(acl_groups),
        classification=classification,
    )
    session.commit()
    enqueue_ingestion(celery, document_id=accepted.document_id, job_id=accepted.job_id)
    return accepted


@router.get("/documents/{document_id}", response_model=DocumentStatusOut)
def get_document(document_id: str, session: SessionDep, enforcer: EnforcerDep,
                 user: CurrentUser) -> DocumentStatusOut:
    """Status and metadata of a document (never its content)."""
    return ingestion_service.document_status(session=session, can_see=_visibility(enforcer, user),
                                             document_id=document_id)


@router.delete("/documents/{document_id}", status_code=status.HTTP_204_NO_CONTENT)
def delete_document(document_id: str, session: SessionDep, settings: SettingsDep, enforcer: EnforcerDep,
                    user: CurrentUser) -> None:
    """Crypto-shred a document and remove its vectors and stored bytes (role: editor)."""
    ingestion_service.delete_document(
        session=session, settings=settings, document_id=document_id,
        can_delete=lambda department: authz_service.is_allowed(enforcer, user, "delete", department),
    )
    session.commit()


@router.get("/jobs/{job_id}", response_model=JobStatusOut)
def get_job(job_id: str, session: SessionDep, enforcer: EnforcerDep, user: CurrentUser) -> JobStatusOut:
    """Ingestion job status and failure reason."""
    return ingestion_service.job_status(session=session, can_see=_visibility(enforcer, user), job_id=job_id)


def parse_acl_groups(values: list[str] | None) -> list[str]:
    """ACL groups from a repeated field and/or comma-separated values; each must be a plain group name."""
    groups = sorted({part.strip() for value in values or [] for part in value.split(",") if part.strip()})
    if any(not GROUP_PATTERN.match(group) for group in groups):
        raise GovragError(ErrorCode.invalid_request, "acl_groups: group names are letters, digits and ._:@/-")
    return groups


def _visibility(enforcer: EnforcerDep, user: Identity):  # type: ignore[no-untyped-def]
    """Who may see a document's status: its department's readers (within the ACL) and uploaders."""

    def can_see(department: str, acl_groups: list[str]) -> bool:
        if authz_service.is_allowed(enforcer, user, "upload", department):
            return True
        readable = authz_service.is_allowed(enforcer, user, "read", department)
        return readable and (not acl_groups or bool(set(acl_groups) & set(user.groups)))

    return can_see
