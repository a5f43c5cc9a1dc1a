"""Compliance export and verification of the retrieval ledger."""

from __future__ import annotations

import functools
import uuid
from collections.abc import Callable, Iterator
from typing import Annotated

import anyio
from fastapi import APIRouter, Query
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect
from starlette.types import Message, Receive, Scope, Send

from api.deps import CurrentUser, EnforcerDep, SessionDep, SettingsDep
from audit import service as audit_service
from audit.export import MEDIA_TYPES
from audit.schemas import (
    AdminEventType,
    Decision,
    EventType,
    ExportDocumentId,
    ExportFilters,
    ExportFormat,
    ExportSubject,
    PublishedKeys,
    RequestId,
    VerifyResult,
    WindowBound,
    deployment_pin,
)
from core.text import DepartmentName

router = APIRouter(prefix="/v1/audit", tags=["audit"])


@router.get("/retrievals")
def export_retrievals(session: SessionDep, settings: SettingsDep, enforcer: EnforcerDep, user: CurrentUser,
                      fmt: Annotated[ExportFormat, Query(alias="format")] = ExportFormat.jsonl,
                      since: WindowBound | None = None, until: WindowBound | None = None,
                      subject: Annotated[ExportSubject | None, Query(alias="user")] = None,
                      department: DepartmentName | None = None, decision: Decision | None = None,
                      document_id: ExportDocumentId | None = None,
                      event_type: EventType | None = None, request_id: RequestId | None = None,
                      ) -> StreamingResponse:
    """Stream ledger events of the departments where the caller holds `compliance`, closed by a manifest line; a
    stream cut off before its end (the caller gone, the database lost) is followed in the ledger by an
    `export_failed` event."""
    filters = ExportFilters(since=since, until=until, subject=subject, department=department,
                            decision=decision.value if decision else None, document_id=document_id,
                            event_type=event_type.value if event_type else None, request_id=request_id)
    scope = audit_service.compliance_scope(session=session, settings=settings, enforcer=enforcer, identity=user)
    rows = audit_service.export_events(session=session, settings=settings, identity=user, scope=scope,
                                       filters=filters, fmt=fmt)
    record_failed = functools.partial(audit_service.record_export_failed, settings=settings, identity=user,
                                      export_type=AdminEventType.export,
                                      departments=audit_service.export_departments(filters, scope))
    return _ExportStream(rows, media_type=MEDIA_TYPES[fmt], record_failed=record_failed)


class _ExportStream(StreamingResponse):
    """An export's rows, streamed. The export is recorded before its first row is read; a stream that then does not
    send its end (the caller gone: `CLIENT_DISCONNECTED`; its rows failing midway, the database lost: the error) is
    recorded as failed with `record_failed(failure=...)`, so the ledger never says an export was made that nobody
    received whole. A send to a caller gone raises Starlette's `ClientDisconnect` when the server's raises an OSError
    (ASGI 2.4; the API's request middleware makes it one whatever version the server says): the caller gone is told
    by that send, not by the exception's class, which Starlette also gives an OSError of the rows' own. A server of
    ASGI 2.3 (uvicorn) drops it silently, and Starlette's disconnect listener cancels the stream at its next read, so
    the last body message sent there is one handed to the connection while the caller was still on it."""

    def __init__(self, rows: Iterator[str], *, media_type: str, record_failed: Callable[..., None]) -> None:
        super().__init__(rows, media_type=media_type)
        self._record_failed = record_failed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        ended = gone = False

        async def sending(message: Message) -> None:
            nonlocal ended, gone
            try:
                await send(message)
            except ClientDisconnect:
                gone = True
                raise
            ended = message["type"] == "http.response.body" and not message.get("more_body", False)

        failure: BaseException | str = audit_service.CLIENT_DISCONNECTED
        try:
            await super().__call__(scope, receive, sending)
        except BaseException as error:
            failure = audit_service.CLIENT_DISCONNECTED if gone else _unwrapped(error)
            raise
        finally:
            if not ended:
                with anyio.CancelScope(shield=True):  # recorded even when the server cancels the response
                    await run_in_threadpool(self._record_failed, failure=failure)


def _unwrapped(error: BaseException) -> BaseException:
    """The error that cut a stream off: under ASGI 2.4 Starlette raises an OSError of the rows themselves (a disk's,
    a socket's) as `ClientDisconnect`, though the caller is still there."""
    if isinstance(error, ClientDisconnect) and isinstance(error.__context__, OSError):
        return error.__context__
    return error


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
