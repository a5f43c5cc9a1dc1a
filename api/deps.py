"""Injected things: settings, a DB session, the caller's identity, the enforcer."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Header, Request
from sqlalchemy.orm import Session

from authz.enforcer import PolicyEnforcer
from authz.identity import Identity
from authz.tokens import TokenVerifier, bearer_token
from core.db import get_session_factory
from core.settings import Settings
from workers.celery_app import GovragCelery


def get_app_settings(request: Request) -> Settings:
    """The settings the app was built with."""
    return request.app.state.settings  # type: ignore[no-any-return]


SettingsDep = Annotated[Settings, Depends(get_app_settings)]


def get_session(settings: SettingsDep) -> Iterator[Session]:
    """A session per request; routes commit, this closes (rolling back anything uncommitted)."""
    session = get_session_factory(settings.resolved_database_url)()
    try:
        yield session
    finally:
        session.close()


SessionDep = Annotated[Session, Depends(get_session)]


def get_enforcer_dep(request: Request) -> PolicyEnforcer:
    """The app's Casbin enforcer."""
    return request.app.state.enforcer  # type: ignore[no-any-return]


EnforcerDep = Annotated[PolicyEnforcer, Depends(get_enforcer_dep)]


def get_celery(request: Request) -> GovragCelery:
    """The app's Celery application, for enqueueing."""
    return request.app.state.celery  # type: ignore[no-any-return]


CeleryDep = Annotated[GovragCelery, Depends(get_celery)]


def current_user(request: Request, settings: SettingsDep,
                 authorization: Annotated[str | None, Header()] = None) -> Identity:
    """The verified caller; any token problem is a 401."""
    verifier: TokenVerifier = request.app.state.verifier
    return verifier.verify(bearer_token(authorization), admins=settings.admins)


CurrentUser = Annotated[Identity, Depends(current_user)]
