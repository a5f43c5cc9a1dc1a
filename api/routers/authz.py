"""Authorization explanations: why a subject would or would not see a document."""

from __future__ import annotations

from fastapi import APIRouter

from api.deps import CurrentUser, EnforcerDep, SessionDep, SettingsDep
from authz import service as authz_service
from authz.schemas import ExplainOut, ExplainRequest
from retrieval.store import open_vector_store

router = APIRouter(prefix="/v1/authz", tags=["authz"])


@router.post("/explain", response_model=ExplainOut)
def explain(body: ExplainRequest, session: SessionDep, enforcer: EnforcerDep, settings: SettingsDep,
            user: CurrentUser) -> ExplainOut:
    """The decision for a subject (with groups) and a document or chunk, with the rules behind it (platform admins)."""
    authz_service.require_platform_admin(user)
    return authz_service.explain(session=session, enforcer=enforcer, store=open_vector_store(settings), request=body)
