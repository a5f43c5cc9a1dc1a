"""Compliance export of the retrieval ledger."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import StreamingResponse

from api.deps import CurrentUser, EnforcerDep, SessionDep
from audit import service as audit_service
from audit.schemas import ExportFormat
from authz import service as authz_service
from core.errors import ErrorCode, GovragError

router = APIRouter(prefix="/v1/audit", tags=["audit"])

_MEDIA_TYPES = {ExportFormat.jsonl: "application/x-ndjson", ExportFormat.csv: "text/csv"}


@router.get("/retrievals")
def export_retrievals(session: SessionDep, enforcer: EnforcerDep, user: CurrentUser,
                      fmt: Annotated[ExportFormat, Query(alias="format")] = ExportFormat.jsonl,
                      since: datetime | None = None, until: datetime | None = None,
                      subject: Annotated[str | None, Query(alias="user")] = None) -> StreamingResponse:
    """Stream retrieval events of the departments where the caller holds `compliance`."""
    departments = set(authz_service.allowed_departments(session=session, enforcer=enforcer, identity=user,
                                                        action="export_audit"))
    if not departments:
        raise GovragError(ErrorCode.forbidden, "the compliance role is required to export the audit log")
    rows = audit_service.export_events(session=session, departments=departments, fmt=fmt, since=since,
                                       until=until, subject=subject)
    return StreamingResponse(rows, media_type=_MEDIA_TYPES[fmt])
