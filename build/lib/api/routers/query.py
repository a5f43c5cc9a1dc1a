"""The governed query endpoint."""

from __future__ import annotations

from fastapi import APIRouter

from api.deps import CurrentUser, EnforcerDep, SessionDep, SettingsDep
from core.logs import request_id_var
from retrieval import service as retrieval_service
from retrieval.schemas import QueryRequest, QueryResponse

router = APIRouter(prefix="/v1", tags=["query"])


@router.post("/query", response_model=QueryResponse)
def query(body: QueryRequest, session: SessionDep, settings: SettingsDep, enforcer: EnforcerDep,
          user: CurrentUser) -> QueryResponse:
    """Answer with citations from what the caller may read; audited before it is returned."""
    return retrieval_service.answer_query(session=session, settings=settings, enforcer=enforcer, identity=user,
                                          query=body, request_id=request_id_var.get())
