"""Liveness, readiness and the dev issuer's JWKS."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text

from api.deps import SessionDep, SettingsDep
from core import broker
from core.cache import Rechecked
from core.errors import ErrorCode, GovragError, MasterKeyRefused
from core.logs import SaidOnChange
from retrieval.store import open_vector_store
from workers.celery_app import GovragCelery

logger = logging.getLogger(__name__)
router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is up (answered on the event loop: never queued behind busy query threads)."""
    return {"status": "ok"}


@dataclass(frozen=True)
class _Probe:
    """One readiness check's answer: its state, what a client is told of it, and what the server's log says (a key
    file's path may be in it, never in the answer)."""

    state: str
    reason: str | None = None
    logged: str | None = None


def not_ready_said() -> SaidOnChange:
    """What `readyz` tells why the API is not ready, each check's reason logged once as it changes, and once as that
    check is ok again (one per app: `api.app.start` makes it)."""
    return SaidOnChange(logger, "not ready: %s %s", "%s ok again")


@router.get("/readyz")
def readyz(request: Request, session: SessionDep, settings: SettingsDep) -> JSONResponse:
    """Database, broker and vector store all answer (the broker through its breaker: `_ping_broker`), the database's
    schema is the one this code needs (a migration run or undone under a running process is noticed within
    SCHEMA_CHECK_SECONDS, with its reason), and the master key opens what is stored under it (a key file replaced or
    deleted, a master rotation this replica's key lacks: noticed within MASTER_CHECK_SECONDS), with its reason (never
    a path: it asks no login). Why each check fails is logged when that changes, and once as it is ok again, not at
    each probe (`not_ready_said`; each 503 counted in govrag_http_requests_total)."""
    probes = {
        "database": _probed(lambda: session.execute(text("SELECT 1"))),
        "broker": _probed(lambda: _ping_broker(request.app.state.celery), unreachable=_BROKER_UNREACHABLE),
        "vector_store": _probed(lambda: open_vector_store(settings).ping()),
        "schema": _watched(request.app.state.schema_watch),
        "master_key": _watched(request.app.state.master_key_watch),
    }
    checks = {name: probe.state for name, probe in probes.items()}
    ready = all(state == "ok" for state in checks.values())
    reason = "; ".join(filter(None, (probe.reason for probe in probes.values())))
    request.app.state.not_ready.tell({name: f"{probe.state} ({probe.logged})" for name, probe in probes.items()
                                      if probe.state != "ok"})
    content = {"ready": ready, "checks": checks} | ({"reason": reason} if reason else {})
    return JSONResponse(status_code=200 if ready else 503, content=content)


@router.get("/dev-issuer/jwks.json")
def dev_issuer_jwks(request: Request) -> dict[str, object]:
    """The built-in development issuer's public keys (only when it is enabled)."""
    issuer = request.app.state.dev_issuer
    if issuer is None:
        raise GovragError(ErrorCode.not_found, "the dev issuer is disabled")
    return issuer.jwks()  # type: ignore[no-any-return]


# The broker not reached, or not tried while its breaker is open: both said as "unreachable", so that a hung Redis is
# logged once, not again each time the breaker's cool-down ends and one probe tries it and fails again
_BROKER_UNREACHABLE = (*broker.UNREACHABLE, broker.RedisSkipped)


def _ping_broker(celery: GovragCelery) -> None:
    """Connect to the broker, through its breaker on Redis (`broker.guarded`): a hung Redis holds one probe for the
    socket timeout, then the probes of the cool-down are answered at once (`broker.RedisSkipped`: not ready), the one
    after it tries Redis again; any read or send that failed to reach it opens the breaker for the probes too."""

    def ping() -> None:
        with celery.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=2)

    broker.guarded(celery.govrag_settings.broker_url, ping)


def _watched(watch: Rechecked[str] | Rechecked[MasterKeyRefused]) -> _Probe:
    """"ok"; "mismatch" (a refused master key: its `readiness`, "missing" for a key file gone, "unreadable" for one
    that cannot be read) and what to do; or "down" when `watch` could not ask."""
    try:
        problem = watch.problem()
    except Exception as exc:  # noqa: BLE001 - readiness reports any failure as "down"
        return _Probe("down", logged=type(exc).__name__)
    if isinstance(problem, MasterKeyRefused):
        return _Probe(problem.readiness, problem.client_message, str(problem))
    return _Probe("ok") if problem is None else _Probe("mismatch", problem, problem)


def _probed(probe, unreachable: tuple[type[Exception], ...] = ()) -> _Probe:  # type: ignore[no-untyped-def]
    """The probe's state: ok, or down logged as "unreachable" for an `unreachable` error, else by the error's type."""
    try:
        probe()
    except unreachable:
        return _Probe("down", logged="unreachable")
    except Exception as exc:  # noqa: BLE001 - readiness reports any failure as "down"
        return _Probe("down", logged=type(exc).__name__)
    return _Probe("ok")
