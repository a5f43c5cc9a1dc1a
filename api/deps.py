"""Injected things: settings, a DB session, the caller's identity, the enforcer.

Lookups of app state are `async def`: FastAPI runs a sync dependency in the thread pool, a hop per request each.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import HTTPBearer
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from authz.enforcer import PolicyEnforcer
from authz.identity import Identity
from authz.tokens import TokenVerifier, bearer_token
from core.db import get_session_factory
from core.settings import Settings
from workers.celery_app import GovragCelery


async def get_app_settings(request: Request) -> Settings:
    """The settings the app was built with."""
    return request.app.state.settings  # type: ignore[no-any-return]


SettingsDep = Annotated[Settings, Depends(get_app_settings)]


async def get_session(settings: SettingsDep) -> AsyncIterator[Session]:
    """A session per request; routes commit, this closes (rolling back anything uncommitted).

    Opening a session does no I/O; closing one does only when a transaction is still open (a rollback), and
    then it runs in the thread pool, never on the event loop."""
    session = get_session_factory(settings.resolved_database_url)()
    try:
        yield session
    finally:
        if session.in_transaction():
            await run_in_threadpool(session.close)
        else:
            session.close()


SessionDep = Annotated[Session, Depends(get_session)]


async def get_enforcer_dep(request: Request) -> PolicyEnforcer:
    """The app's Casbin enforcer."""
    return request.app.state.enforcer  # type: ignore[no-any-return]


EnforcerDep = Annotated[PolicyEnforcer, Depends(get_enforcer_dep)]


async def get_celery(request: Request) -> GovragCelery:
    """The app's Celery application, for enqueueing."""
    return request.app.state.celery  # type: ignore[no-any-return]


CeleryDep = Annotated[GovragCelery, Depends(get_celery)]


class BearerHeader(HTTPBearer):
    """The `Authorization` header, declared as the OpenAPI document's bearer scheme. FastAPI's own check is left
    out: `bearer_token` answers a missing or malformed header (one 401, one message)."""

    def __init__(self) -> None:
        super().__init__(scheme_name="bearer", bearerFormat="JWT", auto_error=False,
                         description="An OIDC access token: `Authorization: Bearer <token>`")

    async def __call__(self, request: Request) -> str | None:  # type: ignore[override]
        return request.headers.get("Authorization")


def current_user(request: Request, settings: SettingsDep,
                 authorization: Annotated[str | None, Security(BearerHeader())]) -> Identity:
    """The verified caller; any token problem is a 401."""
    verifier: TokenVerifier = request.app.state.verifier
    return verifier.verify(bearer_token(authorization), admins=settings.admins)


CurrentUser = Annotated[Identity, Depends(current_user)]
