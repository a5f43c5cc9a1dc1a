"""The governed query: authorised departments → filtered search → re-check → decrypt → extractive answer."""

from __future__ import annotations

import time
from dataclasses import dataclass

import casbin
from sqlalchemy.orm import Session

from audit import service as audit_service
from audit.schemas import Decision, RetrievalRecord
from authz import service as authz_service
from authz.identity import Identity
from core import crypto, metrics
from core.keystore import keystore_for
from core.settings import Settings
from ingestion import service as ingestion_service
from ingestion.pipeline import chunk_context
from retrieval.answer import Passage, extractive_answer
from retrieval.embeddings import get_embedder
from retrieval.schemas import Citation, QueryRequest, QueryResponse
from retrieval.store import AccessFilter, Hit, open_vector_store

REFUSAL_TEXT = "I can't answer that from documents you are allowed to see."
SNIPPET_CHARS = 240


@dataclass(frozen=True)
class OpenedChunk:
    """A hit that passed every check, decrypted (its text is already redacted)."""

    document_id: str
    chunk_id: str
    department: str
    title: str
    text: str
    score: float


def answer_query(*, session: Session, settings: Settings, enforcer: casbin.SyncedEnforcer, identity: Identity,
                 query: QueryRequest, request_id: str) -> QueryResponse:
    """Answer from what the caller may see, audit the decision, then return it."""
    started = time.perf_counter()
    requested = query.department_names()
    searched = authz_service.allowed_departments(session=session, enforcer=enforcer, identity=identity,
                                                 action="read", requested=requested)
    vector = get_embedder().embed_one(query.question) if searched else []
    opened = _retrieve(session, settings, enforcer, identity, query, vector, searched) if searched else []
    response, cited = _respond(query, vector, opened, request_id, searched, settings)
    audit_service.record_retrieval(session=session, record=RetrievalRecord(
        request_id=request_id, subject=identity.subject, groups=list(identity.groups),
        departments_requested=requested or [], departments_searched=searched,
        decision=Decision.refused if response.refused else Decision.answered, reason=response.reason,
        question_masked=audit_service.mask_question(query.question), purpose=query.purpose,
        latency_ms=round((time.perf_counter() - started) * 1000, 2),
        chunks=[{"document_id": c.document_id, "chunk_id": c.chunk_id, "score": round(c.score, 4),
                 "cited": i + 1 in cited} for i, c in enumerate(opened)],
    ))
    metrics.QUERIES.labels(decision="refused" if response.refused else "answered").inc()
    metrics.QUERY_LATENCY.observe(time.perf_counter() - started)
    return response


def _retrieve(session: Session, settings: Settings, enforcer: casbin.SyncedEnforcer, identity: Identity,
              query: QueryRequest, vector: list[float], searched: list[str]) -> list[OpenedChunk]:
    """Filtered search in each authorised collection, merged by score, then re-checked and decrypted."""
    top_k = min(query.top_k or settings.default_top_k, settings.max_top_k)
    store, access = open_vector_store(settings), AccessFilter(groups=identity.groups)
    hits = [hit for department in searched for hit in store.search(department, vector, access, limit=top_k)]
    hits.sort(key=lambda hit: hit.score, reverse=True)
    return _recheck_and_open(session, settings, enforcer, identity, hits[:top_k])


def _recheck_and_open(session: Session, settings: Settings, enforcer: casbin.SyncedEnforcer, identity: Identity,
                      hits: list[Hit]) -> list[OpenedChunk]:
    """Defence in depth: every hit is checked again against the policy and the document's state."""
    documents = ingestion_service.ready_documents(session=session,
                                                  document_ids={str(h.payload.get("document_id")) for h in hits})
    keystore, opened = keystore_for(settings), []
    for hit in hits:
        document = documents.get(str(hit.payload.get("document_id")))
        if document is None:
            continue  # deleted or failed since it was indexed: not a policy disagreement
        if hit.payload.get("department") != document.department or not _may_read(
                enforcer, identity, document.department, document.acl_groups):
            metrics.AUTHZ_RECHECK_DROPS.labels(department=document.department).inc()
            continue
        key = keystore.document_key(session=session, department=document.department, document_id=document.id)
        if key is None:
            continue
        index = int(hit.payload["chunk_index"])
        text = crypto.open_text(key, str(hit.payload["sealed_text"]), chunk_context(document.id, index))
        opened.append(OpenedChunk(document_id=document.id, chunk_id=str(hit.payload["chunk_id"]),
                                  department=document.department, title=document.title, text=text,
                                  score=hit.score))
    return opened


def _may_read(enforcer: casbin.SyncedEnforcer, identity: Identity, department: str, acl_groups: list[str]) -> bool:
    """The policy, restated: `read` in the department, and an open ACL or a shared group."""
    if not authz_service.is_allowed(enforcer, identity, "read", department):
        return False
    return not acl_groups or bool(set(acl_groups) & set(identity.groups))


def _respond(query: QueryRequest, vector: list[float], opened: list[OpenedChunk], request_id: str, searched: list[str],
             settings: Settings) -> tuple[QueryResponse, set[int]]:
    if not searched:
        return _refusal(request_id, "no_authorised_departments"), set()
    if not opened:
        return _refusal(request_id, "no_authorised_content"), set()
    passages = [Passage(n=i + 1, text=chunk.text, score=chunk.score) for i, chunk in enumerate(opened)]
    answer = extractive_answer(query.question, vector, passages, get_embedder(),
                               min_relevance=settings.min_relevance)
    if answer is None:
        return _refusal(request_id, "no_relevant_content"), set()
    citations = [_citation(n, opened[n - 1]) for n in answer.cited]
    return QueryResponse(answer=answer.text, citations=citations, refused=False, reason=None,
                         request_id=request_id), set(answer.cited)


def _citation(n: int, chunk: OpenedChunk) -> Citation:
    snippet = chunk.text if len(chunk.text) <= SNIPPET_CHARS else chunk.text[:SNIPPET_CHARS].rstrip() + "…"
    return Citation(n=n, document_id=chunk.document_id, chunk_id=chunk.chunk_id, title=chunk.title,
                    department=chunk.department, snippet=snippet, score=round(chunk.score, 4))


def _refusal(request_id: str, reason: str) -> QueryResponse:
    return QueryResponse(answer=REFUSAL_TEXT, citations=[], refused=True, reason=reason, request_id=request_id)
