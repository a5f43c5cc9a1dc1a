"""Liveness, readiness and the dev issuer's JWKS."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text

from api.deps import SessionDep, SettingsDep
from core.cache import Rechecked
from core.errors import ErrorCode, GovragError, MasterKeyRefused
from retrieval.store import open_vector_store

logger = logging.getLogger(__name__)
router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is up (answered on the event loop: never queued behind busy query threads)."""
    return {"status": "ok"}


@router.get("/readyz")
def readyz(request: Request, session: SessionDep, settings: SettingsDep) -> JSONResponse:
    """Database, broker and vector store all answer, the database's schema is the one this code needs (a migration
    run or undone under a running process is noticed within SCHEMA_CHECK_SECONDS, with its reason), and the master
    key opens what is stored under it (a key file replaced or deleted, a master rotation this replica's key lacks:
    noticed within MASTER_CHECK_SECONDS), with its reason (never a path: it asks no login)."""
    checks = {
        "database": _check(lambda: session.execute(text("SELECT 1"))),
        "broker": _check(lambda: _ping_broker(request)),
        "vector_store": _check(lambda: open_vector_store(settings).ping()),
    }
    checks["schema"], schema_reason = _watched(request.app.state.schema_watch)
    checks["master_key"], key_reason = _watched(request.app.state.master_key_watch)
    ready = all(value == "ok" for value in checks.values())
    reason = "; ".join(filter(None, (schema_reason, key_reason)))
    content = {"ready": ready, "checks": checks} | ({"reason": reason} if reason else {})
    return JSONResponse(status_code=200 if ready else 503, content=content)


@router.get("/dev-issuer/jwks.json")
def dev_issuer_jwks(request: Request) -> dict[str, object]:
    """The built-in development issuer's public keys (only when it is enabled)."""
    issuer = request.app.state.dev_issuer
    if issuer is None:
        raise GovragError(ErrorCode.not_found, "the dev issuer is disabled")
    return issuer.jwks()  # type: ignore[no-any-return]


def _ping_broker(request: Request) -> None:
    with request.app.state.celery.connection_for_write() as connection:
        connection.ensure_connection(max_retries=1, timeout=2)


def _watched(watch: Rechecked[str] | Rechecked[MasterKeyRefused]) -> tuple[str, str | None]:
    """"ok"; "mismatch" (a refused master key: its `readiness`, "missing" for a key file gone, "unreadable" for one
    that cannot be read) and what to do; or "down" when `watch` could not ask."""
    try:
        problem = watch.problem()
    except Exception as exc:  # noqa: BLE001 - readiness reports any failure as "down"
        logger.warning("readiness check failed: %s", type(exc).__name__)
        return "down", None
    if isinstance(problem, MasterKeyRefused):
        return problem.readiness, problem.client_message
    return ("ok", None) if problem is None else ("mismatch", problem)


def _check(probe) -> str:  # type: ignore[no-untyped-def]
    try:
        probe()
    except Exception as exc:  # noqa: BLE001 - readiness reports any failure as "down"
        logger.warning("readiness check failed: %s", type(exc).__name__)
        return "down"
    return "ok"
