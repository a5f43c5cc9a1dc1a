"""Prometheus exposition: counts and durations only, never content."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import APIRouter, Header, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from api.deps import SessionDep, SettingsDep
from audit import observability
from core.errors import ErrorCode, GovragError
from core.metrics import REGISTRY

router = APIRouter(tags=["observability"])


@router.get("/metrics", include_in_schema=False)
def prometheus_metrics(session: SessionDep, settings: SettingsDep,
                       authorization: Annotated[str | None, Header()] = None) -> Response:
    """The process's metrics; when GOVRAG_METRICS_TOKEN is set, scrapers must present it as a bearer token."""
    if settings.metrics_token is not None:
        expected = f"Bearer {settings.metrics_token.get_secret_value()}"
        if not hmac.compare_digest((authorization or "").encode(), expected.encode()):
            raise GovragError(ErrorCode.unauthenticated, "a metrics token is required")
    observability.refresh(session=session, settings=settings)
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)
