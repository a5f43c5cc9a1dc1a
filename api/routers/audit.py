"""Compliance export and verification of the retrieval ledger."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import StreamingResponse

from api.deps import CurrentUser, EnforcerDep, SessionDep, SettingsDep
from audit import service as audit_service
from audit.export import MEDIA_TYPES
from audit.schemas import (
    Decision,
    EventType,
    ExportFilters,
    ExportFormat,
    PublishedKeys,
    VerifyResult,
    WindowBound,
    deployment_pin,
)
from authz.identity import MAX_SUBJECT_CHARS
from core.models import DOCUMENT_ID_CHARS
from core.text import DepartmentName

router = APIRouter(prefix="/v1/audit", tags=["audit"])


@router.get("/retrievals")
def export_retrievals(session: SessionDep, settings: SettingsDep, enforcer: EnforcerDep, user: CurrentUser,
                      fmt: Annotated[ExportFormat, Query(alias="format")] = ExportFormat.jsonl,
                      since: WindowBound | None = None, until: WindowBound | None = None,
                      subject: Annotated[str | None, Query(alias="user", max_length=MAX_SUBJECT_CHARS)] = None,
                      department: DepartmentName | None = None, decision: Decision | None = None,
                      document_id: Annotated[str | None, Query(max_length=DOCUMENT_ID_CHARS)] = None,
                      event_type: EventType | None = None) -> StreamingResponse:
    """Stream ledger events of the departments where the caller holds `compliance`, closed by a manifest line."""
    filters = ExportFilters(since=since, until=until, subject=subject, department=department,
                            decision=decision.value if decision else None, document_id=document_id,
                            event_type=event_type.value if event_type else None)
    scope = audit_service.compliance_scope(session=session, settings=settings, enforcer=enforcer, identity=user)
    rows = audit_service.export_events(session=session, settings=settings, identity=user, scope=scope,
                                       filters=filters, fmt=fmt)
    return StreamingResponse(rows, media_type=MEDIA_TYPES[fmt])


DEPLOYMENT_PIN = ("the deployment id the database must record (the one `deployment_id` said when it was noted): "
                  "another fails verification, reason `other_deployment`, as `govrag audit verify --deployment-id`")


@router.get("/verify", response_model=VerifyResult)
def verify_ledger(session: SessionDep, settings: SettingsDep, enforcer: EnforcerDep, user: CurrentUser,
                  deployment_id: Annotated[uuid.UUID | None, Query(description=DEPLOYMENT_PIN)] = None,
                  ) -> VerifyResult:
    """Walk the hash chain and the signed checkpoints, of the deployment `deployment_id` if given (compliance officers
    and platform admins)."""
    _require_compliance(session, settings, enforcer, user)
    pinned = None if deployment_id is None else deployment_pin(deployment_id)
    return audit_service.verify(session=session, settings=settings, deployment_id=pinned)


@router.get("/public-key", response_model=PublishedKeys)
def public_key(session: SessionDep, settings: SettingsDep, enforcer: EnforcerDep, user: CurrentUser) -> PublishedKeys:
    """The Ed25519 public key an auditor checks export manifests and checkpoint mirror files with, holding no secret,
    and those of the keys used before a rotation (`previous`), which check what they signed (compliance officers and
    platform admins)."""
    _require_compliance(session, settings, enforcer, user)
    return audit_service.published_keys(session=session, settings=settings)


def _require_compliance(session: SessionDep, settings: SettingsDep, enforcer: EnforcerDep, user: CurrentUser) -> None:
    """Platform admins, or the compliance role somewhere (else 403)."""
    if not user.is_platform_admin:
        audit_service.compliance_scope(session=session, settings=settings, enforcer=enforcer, identity=user)
