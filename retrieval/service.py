"""The governed query: authorised departments → filtered search → re-check → decrypt → extractive answer."""

from __future__ import annotations

import functools
import hashlib
import logging
import time
from concurrent.futures import Future
from dataclasses import dataclass

from sqlalchemy.orm import Session

from audit import service as audit_service
from audit.schemas import Decision, RetrievalRecord
from authz import service as authz_service
from authz.enforcer import PolicyEnforcer
from authz.identity import Identity
from core import crypto, metrics, timing
from core.batching import MicroBatcher
from core.errors import ErrorCode, GovragError, unavailable_dependency
from core.keystore import DepartmentKeyUnreadable, KeyState, KeyStore, keystore_for
from core.logs import exception_frames
from core.models import Document
from core.settings import Settings
from guard import service as guard_service
from guard.schemas import KillMode
from ingestion import service as ingestion_service
from ingestion.pipeline import chunk_context, chunk_id, sentences_context
from retrieval import generation, sentence_vectors
from retrieval.answer import Passage, extractive_answer, quote_window
from retrieval.embeddings import get_embedder
from retrieval.schemas import Citation, QueryRequest, QueryResponse
from retrieval.sentence_vectors import SentenceVectors
from retrieval.store import AccessFilter, Hit, open_vector_store

REFUSAL_TEXT = "I can't answer that from documents you are allowed to see."
# The title a chunk is cited (and shown to the model) under when the caller may read the chunk but not its document
# as a whole (its level, its highest chunk's, above their clearance): GET /v1/documents hides such a document's title.
WITHHELD_TITLE = "(title withheld)"
SNIPPET_CHARS = 240
PURPOSE_COLUMN_CHARS = 255  # placeholders may make a masked purpose longer than the 200 characters asked
# The re-check drops hits the access filter cannot tell from served ones: the points a re-index is writing beside the
# served ones, those of a document a fail-closed re-index withheld (kept until its run ends), a deleted document's
# before its purge, and those the policy, a shredded key or an altered payload now refuse. A query searches for
# `top_k` hits (once, when none is dropped); while drops leave it short and the page was full, it searches again
# SEARCH_WIDENING times as wide, SEARCH_ROUNDS searches in all: top_k × 16 hits at most (320 at the default
# GOVRAG_MAX_TOP_K). A `serve_previous` re-index doubles each chunk it covers (the run's point scores as the served
# one), which one widening absorbs even for a whole department; a fail-closed one hides whole documents, whose chunks
# may fill pages: up to 15 × top_k of them are looked past. Beyond that the query answers from what passed, as it
# always did; one whose every match is hidden costs three searches and three reads of document rows, no decryption.
SEARCH_WIDENING = 4
SEARCH_ROUNDS = 3

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class OpenedChunk:
    """A hit that passed every check, decrypted (its text is already redacted)."""

    document_id: str
    chunk_id: str
    department: str
    title: str
    text: str
    score: float
    sentence_vectors: SentenceVectors | None = None  # stored at ingestion; None for chunks indexed before
    scanned_by: str = ""  # the injection scanner version that passed it at ingestion (proven by decryption)


def answer_query(*, session: Session, settings: Settings, enforcer: PolicyEnforcer, identity: Identity,
                 query: QueryRequest, request_id: str) -> QueryResponse:
    """Answer from what the caller may see, audit the decision, then return it."""
    asked = _Asked(request_id=request_id, identity=identity, requested=query.department_names(),
                   started=time.perf_counter())
    opened: list[OpenedChunk] = []  # filled as chunks are decrypted: a failure after that still records them
    try:
        response, record = _decide(session, settings, enforcer, query, asked, opened)
    except Exception as exc:  # any stage up to the record's: the ledger's own failure below is no query's error
        _record_failure(session, settings, asked, opened, exc)
        raise  # the client's 500 (`api.errors.crash_response`), or 503 for a dependency that is down
    audit_service.record_retrieval(session=session, record=record, settings=settings)
    metrics.QUERIES.labels(decision=record.decision.value).inc()  # the ledger's decision
    metrics.QUERY_LATENCY.observe(time.perf_counter() - asked.started)
    if record.kill_switch_mode == KillMode.disabled.value:  # recorded as `blocked`, then the kill switch's 503
        raise GovragError(ErrorCode.kill_switch_disabled, guard_service.DISABLED_MESSAGE)
    return response


@dataclass
class _Asked:
    """What the ledger keeps of a query whatever becomes of it: who asked what, and, as each stage gives them, the
    masked question and purpose, the scope and the admission."""

    request_id: str
    identity: Identity
    requested: list[str] | None
    started: float
    question_masked: Future[str] | None = None
    purpose_masked: Future[str] | None = None
    scope: authz_service.ReadScope | None = None
    admission: guard_service.Admission | None = None


def _decide(session: Session, settings: Settings, enforcer: PolicyEnforcer, query: QueryRequest, asked: _Asked,
            opened: list[OpenedChunk]) -> tuple[QueryResponse, RetrievalRecord]:
    """Scope, admission, then the answer: what the caller gets and what the ledger is to record of it."""
    # The question is masked (for the audit record), the purpose too, and the question embedded (for the firewall and
    # the search), in background threads, batched with concurrent queries, while the policy is read: the ONNX run and
    # the database round trip release the GIL.
    asked.question_masked = audit_service.question_masker.submit(query.question)
    asked.purpose_masked = audit_service.question_masker.submit(query.purpose) if query.purpose else None
    embedding = _question_embedder(settings.embedding_backend).submit(query.question)
    scope = asked.scope = authz_service.read_scope(session=session, enforcer=enforcer, identity=asked.identity,
                                                   requested=asked.requested)
    with timing.stage("embed"):
        vector = embedding.result()
    admission = asked.admission = guard_service.admit(
        session=session, settings=settings, question=query.question, vector=vector,
        departments=scope.departments)  # kill switch and prompt firewall
    outcome = (_answer(session, settings, enforcer, asked.identity, query, vector, asked.request_id, scope, admission,
                       opened)
               if admission.blocked_reason is None else None)
    response = outcome.response if outcome else _refusal(asked.request_id, str(admission.blocked_reason),
                                                         guard_service.refusal_text(admission))
    record = _audit_record(asked, opened, outcome, decision=_decision(response, admission, outcome),
                           reason=response.reason)
    return response, record


def _record_failure(session: Session, settings: Settings, asked: _Asked, opened: list[OpenedChunk],
                    failure: Exception) -> None:
    """A query that failed at any stage (the policy read, the embedding, the firewall, the search, decryption, the
    answer, the masking) is still a retrieval event: recorded as `error` with what it had got to (scope, chunks
    opened) and the failure's class name (never its message, which may quote a question or a chunk); the caller then
    re-raises `failure`. If this write fails too, an outage's own 503 stands (the database down is said as such,
    with its Retry-After); any other failure gives way to the ledger's `unavailable` (503: no row, no answer) and
    is logged here, its class and frames, so it is not lost."""
    session.rollback()  # a statement that failed leaves the transaction unusable for the append
    record = _audit_record(asked, opened, None, decision=Decision.error, reason=type(failure).__name__)
    try:
        audit_service.record_retrieval(session=session, record=record, settings=settings)
    except GovragError:
        if unavailable_dependency(failure) is not None:
            return  # re-raised by the caller
        logger.error("query failed with %s and its ledger row could not be written\n%s", type(failure).__name__,
                     exception_frames(failure))
        raise
    metrics.QUERIES.labels(decision=Decision.error.value).inc()


@functools.lru_cache(maxsize=2)
def _question_embedder(backend: str) -> MicroBatcher[str, list[float]]:
    """One batcher per embedding backend: concurrent questions share one forward pass."""
    return MicroBatcher(lambda questions: get_embedder(backend).embed(questions).tolist(), name="govrag-embed")


def _answer(session: Session, settings: Settings, enforcer: PolicyEnforcer, identity: Identity, query: QueryRequest,
            vector: list[float], request_id: str, scope: authz_service.ReadScope,
            admission: guard_service.Admission, opened: list[OpenedChunk]) -> generation.Generation:
    """Search what the caller may read (into `opened`), then the model (or the extractive answer) behind the output
    guard."""
    searched = scope.departments
    if searched:
        _retrieve(session, settings, enforcer, identity, query, vector, scope, opened)
    return generation.respond(
        session=session, settings=settings, question=query.question, chunks=list(opened),
        kill_mode=admission.kill_mode, departments=searched, cite=_citation,
        extractive=lambda chunks: _respond(query, vector, chunks, request_id, searched, settings),
    )


def _audit_record(asked: _Asked, opened: list[OpenedChunk], outcome: generation.Generation | None, *,
                  decision: Decision, reason: str | None) -> RetrievalRecord:
    """What the ledger keeps of this decision: ids, hashes and verdicts; the question and purpose only masked. An
    `error` keeps what the query had got to: no scope or admission if it failed before them."""
    cited = outcome.cited if outcome else set()
    scope, admission = asked.scope, asked.admission
    failed = decision is Decision.error
    purpose = _masked(asked.purpose_masked, failed=failed)
    return RetrievalRecord(
        request_id=asked.request_id, subject=asked.identity.subject, groups=list(asked.identity.groups),
        departments_requested=asked.requested, departments_searched=scope.departments if scope else [],
        policy_version=str(scope.policy_version) if scope else None, roles=scope.roles if scope else [],
        decision=decision, reason=reason,
        guard_verdicts={**(admission.verdicts if admission else {}), **(outcome.verdicts if outcome else {})},
        model_backend=outcome.backend if outcome else None, model_id=outcome.model_id if outcome else None,
        kill_switch_mode=admission.kill_mode.value if admission else None,
        question_masked=_masked(asked.question_masked, failed=failed) or "",
        purpose=purpose and purpose[:PURPOSE_COLUMN_CHARS],
        latency_ms=round((time.perf_counter() - asked.started) * 1000, 2),
        chunks=[{"document_id": c.document_id, "chunk_id": c.chunk_id, "score": round(c.score, 4),
                 "cited": i + 1 in cited, "content_sha256": hashlib.sha256(c.text.encode()).hexdigest()}
                for i, c in enumerate(opened)],
    )


def _masked(masking: Future[str] | None, *, failed: bool) -> str | None:
    """A masking's result. A failed query's record keeps nothing (None) where the masking was never started or
    itself failed, never the raw text; any other record fails with it (and is then recorded as an `error`)."""
    if masking is None or (failed and masking.exception() is not None):
        return None
    return masking.result()


def _decision(response: QueryResponse, admission: guard_service.Admission,
              outcome: generation.Generation | None) -> Decision:
    """answered, refused, blocked (firewall or kill switch) or withheld (output guard); a failure is `error`
    (`_record_failure`)."""
    if admission.blocked_reason is not None:
        return Decision.blocked
    if outcome is not None and outcome.withheld:
        return Decision.withheld
    return Decision.refused if response.refused else Decision.answered


def _retrieve(session: Session, settings: Settings, enforcer: PolicyEnforcer, identity: Identity,
              query: QueryRequest, vector: list[float], scope: authz_service.ReadScope,
              opened: list[OpenedChunk]) -> None:
    """Filtered search in each authorised collection, merged by score, then re-checked and decrypted into `opened`:
    the best `top_k` hits that pass, in score order, searching wider while dropped hits leave places
    (SEARCH_WIDENING)."""
    top_k = min(query.top_k or settings.default_top_k, settings.max_top_k)
    access = {department: AccessFilter(identity.groups, clearance)
              for department, clearance in scope.clearance_by_department.items()}
    store = open_vector_store(settings)
    checked: set[str] = set()  # a wider search finds the narrower one's hits again: each is re-checked (counted) once
    lost: set[str] = set()  # departments whose key does not open: left out, each said once a query
    limit = top_k
    for _ in range(SEARCH_ROUNDS):
        hits = store.search_many(access, vector, limit=limit)
        fresh = [hit for hit in hits if hit.point_id not in checked]
        checked.update(hit.point_id for hit in fresh)
        _recheck_and_open(session, settings, enforcer, identity, fresh, opened, wanted=top_k, lost=lost)
        if len(opened) >= top_k or len(hits) < limit:
            break  # enough passed, or there is nothing more to find
        limit *= SEARCH_WIDENING
    opened.sort(key=lambda chunk: chunk.score, reverse=True)  # an approximate index may rank a wider search's higher


def _recheck_and_open(session: Session, settings: Settings, enforcer: PolicyEnforcer, identity: Identity,
                      hits: list[Hit], opened: list[OpenedChunk], *, wanted: int, lost: set[str]) -> list[OpenedChunk]:
    """Defence in depth: every hit is checked again against the policy and the document's state; those that pass
    are decrypted into `opened` (each as soon as it is, so a failure with the next one still has it recorded) until
    it holds `wanted`; it is returned. A department whose key does not open is added to `lost` and left out
    (`_leave_out_department`)."""
    documents = ingestion_service.served_documents(session=session,
                                                   document_ids={str(h.payload.get("document_id")) for h in hits})
    keystore = keystore_for(settings)
    titles: dict[str, str] = {}  # the title each document is cited under: one visibility check per document
    for hit in hits:
        if len(opened) >= wanted:
            break
        document = documents.get(str(hit.payload.get("document_id")))
        if document is None or not ingestion_service.is_served(document, hit.payload):
            continue  # deleted or failed since it was indexed, or not its served generation: no policy disagreement
        if document.department in lost:
            continue  # its department's key did not open for an earlier hit
        level = authz_service.readable_chunk_level(enforcer, identity, document, hit.payload)
        if level is None:
            metrics.AUTHZ_RECHECK_DROPS.labels(department=document.department).inc()
            continue
        try:
            key = _document_key(session, keystore, document)
        except DepartmentKeyUnreadable as exc:
            _leave_out_department(exc, document.department, lost)
            continue
        # served, yet its key is gone or no longer opens (`_document_key`; not retired: that takes it out of the
        # served ones first)
        if key is None:
            metrics.SERVED_KEYS_MISSING.labels(department=document.department).inc()
            continue
        if document.id not in titles:
            titles[document.id] = _shown_title(session, enforcer, identity, document)
        chunk = _open(key, hit, document, level, title=titles[document.id])
        if chunk is None:  # the payload was altered (its level, its place): the ciphertext no longer opens
            metrics.AUTHZ_RECHECK_DROPS.labels(department=document.department).inc()
            continue
        opened.append(chunk)
    return opened


def _document_key(session: Session, keystore: KeyStore, document: Document) -> bytes | None:
    """The document's data key; None when it is gone, or when its key row no longer opens (altered in the database):
    that document's chunks are left out, not every answer that finds one of them failed with a 500."""
    found = keystore.document_key(session=session, department=document.department, document_id=document.id)
    if found.state is KeyState.unreadable:
        logger.warning("the data key of document %s does not open under its department key: its chunks are left out",
                       document.id)
    return found.key


def _leave_out_department(exc: DepartmentKeyUnreadable, department: str, lost: set[str]) -> None:
    """A department whose key does not open under the master key or is missing (its key row altered or deleted in the
    database) is left out of the answer as a document whose key row does not open is, not every query that finds one
    of its chunks failed with a 500: logged in `exc`'s line (naming the department only) and counted (alert
    GovragDepartmentKeysUnreadable), once a query."""
    lost.add(department)
    metrics.DEPARTMENT_KEYS_UNREADABLE.labels(department=department).inc()
    logger.warning("%s; its chunks are left out", exc)


def _shown_title(session: Session, enforcer: PolicyEnforcer, identity: Identity, document: Document) -> str:
    """The document's title if the caller may see the document (`authz_service.may_see_document`), else
    WITHHELD_TITLE."""
    seen = authz_service.may_see_document(enforcer, identity, document, session=session)
    return document.title if seen else WITHHELD_TITLE


def _open(key: bytes, hit: Hit, document: Document, level: str, *, title: str) -> OpenedChunk | None:
    """Decrypt the chunk's text and sentence vectors under the context that binds its place, level, scan and the run
    its document serves."""
    index, scanned_by = int(hit.payload["chunk_index"]), str(hit.payload.get("scanned_by", ""))
    context = (document.id, index, level, scanned_by, ingestion_service.served_run(document))
    try:
        text = crypto.open_text(key, str(hit.payload["sealed_text"]), chunk_context(*context))
        sealed = hit.payload.get("sealed_sentences")
        vectors = (sentence_vectors.unpack(crypto.open_blob(key, str(sealed), sentences_context(*context)))
                   if sealed else None)
    except crypto.DecryptionError:
        return None
    # its id from the place the context bound (the payload's `chunk_id` is no part of it: never cited or audited)
    return OpenedChunk(document_id=document.id, chunk_id=chunk_id(document.id, index), department=document.department,
                       title=title, text=text, score=hit.score, sentence_vectors=vectors,
                       scanned_by=scanned_by)


def _respond(query: QueryRequest, vector: list[float], opened: list[OpenedChunk], request_id: str, searched: list[str],
             settings: Settings) -> tuple[QueryResponse, set[int]]:
    if not searched:
        return _refusal(request_id, "no_authorised_departments"), set()
    if not opened:
        return _refusal(request_id, "no_authorised_content"), set()
    passages = [Passage(n=i + 1, text=chunk.text, score=chunk.score, vectors=chunk.sentence_vectors)
                for i, chunk in enumerate(opened)]
    answer = extractive_answer(query.question, vector, passages, get_embedder(settings.embedding_backend),
                               min_relevance=settings.min_relevance)
    if answer is None:
        return _refusal(request_id, "no_relevant_content"), set()
    citations = [_citation(n, opened[n - 1], answer.quoted.get(n)) for n in answer.cited]
    return QueryResponse(answer=answer.text, citations=citations, refused=False, reason=None,
                         request_id=request_id), set(answer.cited)


def _citation(n: int, chunk: OpenedChunk, quoted: str | None = None) -> Citation:
    """Citation `n` of `chunk`; its snippet shows the sentence the answer `quoted` from it (a model's answer, which
    paraphrases, shows the chunk's start)."""
    snippet = quote_window(chunk.text, quoted, SNIPPET_CHARS)
    return Citation(n=n, document_id=chunk.document_id, chunk_id=chunk.chunk_id, title=chunk.title,
                    department=chunk.department, snippet=snippet, score=round(chunk.score, 4))


def _refusal(request_id: str, reason: str, text: str = REFUSAL_TEXT) -> QueryResponse:
    return QueryResponse(answer=text, citations=[], refused=True, reason=reason, request_id=request_id)
