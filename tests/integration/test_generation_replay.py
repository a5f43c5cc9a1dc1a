"""A document's data key is the same for every index generation: a chunk sealed by an earlier run, copied by someone
able to write the vector store into the point of the generation its document serves, must not open. Here the earlier
run kept a project code the department has since redacted (a new recognizer, then a re-index), at a level (internal)
below the one the redaction raised the chunk to (confidential), above the reader's clearance. Embedded SQLite or
PostgreSQL, Qdrant Edge or Qdrant local mode, the memory broker and no worker: each job is run by the test."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from kombu.transport import memory

from tests.conftest import PLATFORM_ADMIN, auth, desk_member

CODE = "PRJ-204816"
NOTE = f"Opening hours: the desk opens at nine on weekdays. Its case reference is {CODE}.".encode()
QUESTION = "When does the desk open?"
REDACT_CODES = {"recognizers": [{"entity": "PROJECT_CODE", "pattern": r"\bPRJ-\d{6}\b"}]}


@dataclass(frozen=True)
class Desk:
    client: TestClient
    settings: Any
    admin: dict[str, str]
    editor: str
    document_id: str


@pytest.fixture(params=[("sqlite", "edge"), ("pg", "qdrant_local")], ids=["sqlite-edge", "pg-qdrant_local"])
def desk(request: pytest.FixtureRequest, tmp_path: Path, make_pg_database: Callable[[], str]) -> Iterator[Desk]:
    """The note in `desk`, ingested (its first generation) and served."""
    from api.app import create_app
    from core import migrate
    from core.settings import Settings
    from retrieval.store import close_vector_store

    database, backend = request.param
    url = f"sqlite:///{tmp_path / 'govrag.db'}" if database == "sqlite" else make_pg_database()
    migrate.upgrade(url)
    settings = Settings(data_dir=tmp_path / "data", database_url=url, admins=[PLATFORM_ADMIN], broker_url="memory://",
                        inprocess_worker=False, job_sweep_seconds=0, vector_backend=backend,
                        task_queue=f"govrag-replay-{uuid.uuid4().hex[:8]}")
    with TestClient(create_app(settings)) as client:
        admin = auth(client.app.state.dev_issuer.issue(PLATFORM_ADMIN, []))  # type: ignore[attr-defined]
        editor = desk_member(client, "editor")
        response = client.post("/v1/documents", headers=auth(editor), data={"department": "desk"},
                               files={"file": ("note.txt", NOTE)})
        assert response.status_code == 202, response.text
        document_id = response.json()["document_id"]
        _run(settings, document_id, response.json()["job_id"])
        yield Desk(client, settings, admin, editor, document_id)
    close_vector_store(settings)
    memory.Channel.queues.pop(settings.task_queue, None)


def _run(settings: Any, document_id: str, job_id: str) -> None:
    from ingestion import service as ingestion_service

    ingestion_service.run_ingestion(settings=settings, document_id=document_id, job_id=job_id)


def _answer(desk: Desk) -> str:
    """The answer to QUESTION with its citations' snippets, as the editor gets it."""
    response = desk.client.post("/v1/query", headers=auth(desk.editor),
                                json={"question": QUESTION, "departments": ["desk"]})
    assert response.status_code == 200, response.text
    return response.text


def _payloads(desk: Desk) -> list[dict[str, Any]]:
    from retrieval.store import open_vector_store

    return [p for p in open_vector_store(desk.settings).scroll_payloads("desk") if p["document_id"] == desk.document_id]


def _redact_codes_and_reindex(desk: Desk) -> None:
    """The department redacts project codes from now on; the note is re-indexed (a generation of its own): its chunk
    is now redacted, and raised to confidential for it, above the editor's clearance (internal)."""
    policy = desk.client.put("/v1/admin/departments/desk/ingestion-policy", headers=desk.admin, json=REDACT_CODES)
    assert policy.status_code == 200, policy.text
    response = desk.client.post("/v1/admin/reindex", headers=desk.admin,
                                json={"department": "desk", "document_ids": [desk.document_id]})
    assert response.status_code == 202 and len(response.json()["queued"]) == 1, response.text
    _run(desk.settings, desk.document_id, response.json()["queued"][0])
    assert {p["classification"] for p in _payloads(desk)} == {"confidential"}
    assert CODE not in _answer(desk)


def _assert_replay_dropped(desk: Desk, earlier: list[dict[str, Any]]) -> None:
    """`earlier` replayed into the served generation's points: each is a re-check drop, nothing of them answers, and
    the training export leaves the document out as unreadable."""
    _replay(desk, earlier)
    before = _drops()
    answer = _answer(desk)
    assert CODE not in answer and desk.document_id not in answer
    assert _drops() - before == len(earlier)
    assert _exported(desk) == ([], {desk.document_id})


def _replay(desk: Desk, earlier: list[dict[str, Any]]) -> None:
    """Someone able to write the vector store copies the earlier generation's chunks over the served generation's
    points (same ids), naming the served generation."""
    from retrieval.store import VectorPoint, open_vector_store, payload_generation

    [served] = {payload_generation(p) for p in _payloads(desk)}
    assert {payload_generation(p) for p in earlier} == {served - 1}
    vector = _question_vector(desk)
    open_vector_store(desk.settings).upsert("desk", [
        VectorPoint(desk.document_id, int(p["chunk_index"]), vector, {**p, "generation": served}) for p in earlier])
    assert {str(p["sealed_text"]) for p in _payloads(desk)} == {str(p["sealed_text"]) for p in earlier}


def _question_vector(desk: Desk) -> list[float]:
    from retrieval.embeddings import get_embedder

    return get_embedder(desk.settings.embedding_backend).embed_one(QUESTION)  # type: ignore[no-any-return]


def _drops() -> float:
    from core import metrics

    return metrics.AUTHZ_RECHECK_DROPS.labels(department="desk")._value.get()  # type: ignore[no-any-return]


def test_an_earlier_generations_chunk_replayed_into_the_served_one_does_not_open(desk: Desk) -> None:
    """The earlier run's chunk, sealed under the same data key with its place, its level then and the same scanner
    version, opened in the served generation's point: the code the department now redacts was served again, to a
    reader whose clearance the served chunk's level is above. Its context now names its generation: it is dropped (a
    re-check drop), and nothing of it is served."""
    assert CODE in _answer(desk)
    earlier = _payloads(desk)
    _redact_codes_and_reindex(desk)
    _assert_replay_dropped(desk, earlier)


def _exported(desk: Desk) -> tuple[list[dict[str, Any]], set[str]]:
    """The department's training export rows, and the documents it leaves out as unreadable."""
    from audit import training
    from core.db import unit_of_work

    payloads, unreadable = training.department_payloads(desk.settings, "desk"), set[str]()
    with unit_of_work(desk.settings.resolved_database_url) as session:
        sources = training.export_sources(session=session, settings=desk.settings, department="desk",
                                          payloads=payloads)
    return list(training.training_rows(sources, unreadable)), unreadable


def test_chunks_sealed_before_0020_still_open_and_cannot_be_replayed_into_a_later_generation(desk: Desk) -> None:
    """The served generation's chunks sealed under the context naming no run (as before 0020; the migration recorded
    the generations numbered until then in `unbound_through`) open and are served. A later run seals under the
    context naming its run, and the database, not the payload, says which context a chunk must have: the earlier
    chunks copied into the later generation's points do not open there."""
    from sqlalchemy import update

    from core.db import unit_of_work
    from core.models import Document

    earlier = _sealed_without_run(desk)
    with unit_of_work(desk.settings.resolved_database_url) as session:
        session.execute(update(Document).where(Document.id == desk.document_id).values(unbound_through=1))
    assert CODE in _answer(desk)  # an index sealed before 0020 is still served, and exported
    assert [CODE in row["text"] for row in _exported(desk)[0]] == [True]
    _redact_codes_and_reindex(desk)
    _assert_replay_dropped(desk, earlier)


def _sealed_without_run(desk: Desk) -> list[dict[str, Any]]:
    """The served (first) generation's chunks sealed again under the context naming no run, as a release before 0020
    sealed them, written over their points; their payloads."""
    from core import crypto
    from core.db import unit_of_work
    from core.keystore import keystore_for
    from ingestion.pipeline import IndexRun, chunk_context, sentences_context
    from retrieval.store import VectorPoint, open_vector_store

    with unit_of_work(desk.settings.resolved_database_url) as session:
        key = keystore_for(desk.settings).document_key(session=session, department="desk",
                                                       document_id=desk.document_id).key
    assert key is not None
    store, resealed = open_vector_store(desk.settings), []
    for payload in _payloads(desk):
        place = (desk.document_id, int(payload["chunk_index"]), str(payload["classification"]),
                 str(payload["scanned_by"]))
        first = IndexRun("desk", 1)
        text = crypto.open_text(key, str(payload["sealed_text"]), chunk_context(*place, first))
        sentences = crypto.open_blob(key, str(payload["sealed_sentences"]), sentences_context(*place, first))
        resealed.append({**payload, "sealed_text": crypto.seal_text(key, text, chunk_context(*place, None)),
                         "sealed_sentences": crypto.seal_blob(key, sentences, sentences_context(*place, None))})
    vector = _question_vector(desk)
    store.upsert("desk", [VectorPoint(desk.document_id, int(p["chunk_index"]), vector, p) for p in resealed])
    return resealed


def test_citations_the_ledger_and_the_training_export_name_a_chunk_by_its_sealed_place_not_its_payloads_chunk_id(
        desk: Desk) -> None:
    """A payload's `chunk_id` is no part of its chunk's context: someone able to write the vector store could have
    the answer cite, the ledger record and the training export name another document's chunk. They name the place
    the chunk opened under: its document and index."""
    from retrieval.store import VectorPoint, open_vector_store

    served = _payloads(desk)
    forged = [{**p, "chunk_id": f"{uuid.uuid4()}:{p['chunk_index']}"} for p in served]
    open_vector_store(desk.settings).upsert("desk", [
        VectorPoint(desk.document_id, int(p["chunk_index"]), _question_vector(desk), p) for p in forged])
    expected = {f"{desk.document_id}:{p['chunk_index']}" for p in served}
    response = desk.client.post("/v1/query", headers=auth(desk.editor),
                                json={"question": QUESTION, "departments": ["desk"]})
    assert response.status_code == 200, response.text
    assert {c["chunk_id"] for c in response.json()["citations"]} == expected
    grant = {"subject": "cora", "role": "compliance", "department": "desk"}
    assert desk.client.post("/v1/admin/role-assignments", headers=desk.admin, json=grant).status_code == 201
    auditor = auth(desk.client.app.state.dev_issuer.issue("cora", []))  # type: ignore[attr-defined]
    ledger = desk.client.get("/v1/audit/retrievals", headers=auditor, params={"department": "desk"})
    assert ledger.status_code == 200, ledger.text
    *events, _manifest = [json.loads(line) for line in ledger.text.splitlines() if line]
    event = next(e for e in events if e["request_id"] == response.headers["X-Request-ID"])
    assert {c["chunk_id"] for c in event["chunks"]} == expected
    rows, unreadable = _exported(desk)
    assert {row["chunk_id"] for row in rows} == expected and not unreadable
