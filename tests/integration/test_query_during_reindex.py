"""A query while a re-index is under way still gets `top_k` passages: the points the re-check drops (a withheld
document's, a run's new generation, an altered one) no longer take the places of served chunks that match. Embedded
SQLite, the memory broker and no worker: each re-index job waits in the queue for as long as the test needs."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from kombu.transport import memory

from tests.conftest import PLATFORM_ADMIN, auth, desk_member

QUESTION = "When does the desk open?"
NOTES = (b"Opening hours: the desk opens at nine on weekdays.",
         b"On Saturdays the desk opens at ten, and visitors sign in at the entrance.")


@dataclass(frozen=True)
class Desk:
    client: TestClient
    settings: Any
    admin: dict[str, str]
    editor: str
    best: str  # the note that answers QUESTION best (one passage asked: this one is cited)
    other: str  # the runner-up
    limits: list[int]  # the limit of each search the queries made


@pytest.fixture
def desk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Desk]:
    """Two notes in `desk`, both ingested and served; every search's limit recorded."""
    from api.app import create_app
    from core import migrate
    from core.settings import Settings
    from ingestion import service as ingestion_service
    from retrieval.store import close_vector_store, open_vector_store

    url = f"sqlite:///{tmp_path / 'govrag.db'}"
    migrate.upgrade(url)
    settings = Settings(data_dir=tmp_path / "data", database_url=url, admins=[PLATFORM_ADMIN], broker_url="memory://",
                        inprocess_worker=False, job_sweep_seconds=0, task_queue=f"govrag-topk-{uuid.uuid4().hex[:8]}")
    with TestClient(create_app(settings)) as client:
        admin = auth(client.app.state.dev_issuer.issue(PLATFORM_ADMIN, []))  # type: ignore[attr-defined]
        editor = desk_member(client, "editor")
        ids = []
        for n, note in enumerate(NOTES):
            response = client.post("/v1/documents", headers=auth(editor), data={"department": "desk"},
                                   files={"file": (f"note-{n}.txt", note)})
            assert response.status_code == 202, response.text
            ids.append(response.json()["document_id"])
            ingestion_service.run_ingestion(settings=settings, document_id=ids[-1], job_id=response.json()["job_id"])
        store, limits = open_vector_store(settings), []
        real_search = store.search_many

        def recorded(*args: Any, limit: int, **kwargs: Any) -> Any:
            limits.append(limit)
            return real_search(*args, limit=limit, **kwargs)

        monkeypatch.setattr(store, "search_many", recorded)
        [best] = _ask(client, editor)
        [other] = set(ids) - {best}
        limits.clear()
        yield Desk(client, settings, admin, editor, best, other, limits)
    close_vector_store(settings)
    memory.Channel.queues.pop(settings.task_queue, None)


def _ask(client: TestClient, token: str) -> list[str]:
    """The documents the answer to QUESTION cites, asking for one passage."""
    response = client.post("/v1/query", headers=auth(token),
                           json={"question": QUESTION, "departments": ["desk"], "top_k": 1})
    assert response.status_code == 200, response.text
    return [c["document_id"] for c in response.json()["citations"]]


def _reindex(desk: Desk, document_id: str, *, serve_previous: bool) -> None:
    response = desk.client.post("/v1/admin/reindex", headers=desk.admin,
                                json={"department": "desk", "document_ids": [document_id],
                                      "serve_previous": serve_previous})
    assert response.status_code == 202 and len(response.json()["queued"]) == 1, response.text


def test_nothing_dropped_searches_once(desk: Desk) -> None:
    assert _ask(desk.client, desk.editor) == [desk.best] and desk.limits == [1]


def test_a_document_a_reindex_withholds_no_longer_takes_the_place_of_one_served(desk: Desk) -> None:
    """A fail-closed re-index withholds the best note until its run ends, its points still in the store: they took
    the one place asked for, the re-check dropped them, and the query answered nothing though the other note
    matches. The search now looks past them."""
    _reindex(desk, desk.best, serve_previous=False)
    assert _ask(desk.client, desk.editor) == [desk.other]
    assert desk.limits == [1, 4]


@pytest.mark.parametrize("planted", ["next_generation", "altered"])
def test_points_the_recheck_drops_leave_the_served_chunk_its_place(desk: Desk, planted: str) -> None:
    """Points matching the question better than anything served: a `serve_previous` re-index's run has written the
    best note's next generation (not served until the run ends), or a copy of its chunk whose ciphertext was altered
    (dropped and counted as a re-check drop). They took the place, and the answer had no passage; the served chunk
    now fills it, and the altered point, found by both searches, is counted once."""
    from core import metrics
    from retrieval.embeddings import get_embedder
    from retrieval.store import VectorPoint, open_vector_store, payload_generation

    _reindex(desk, desk.best, serve_previous=True)
    store = open_vector_store(desk.settings)
    served = [p for p in store.scroll_payloads("desk") if p["document_id"] == desk.best]
    vector = get_embedder(desk.settings.embedding_backend).embed_one(QUESTION)
    if planted == "next_generation":
        points = [VectorPoint(desk.best, int(p["chunk_index"]), vector, {**p, "generation": payload_generation(p) + 1})
                  for p in served]
    else:
        cut = str(served[0]["sealed_text"])[:-1]  # no longer opens
        points = [VectorPoint(desk.best, 9_999, vector, {**served[0], "sealed_text": cut})]
    store.upsert("desk", points)
    drops = metrics.AUTHZ_RECHECK_DROPS.labels(department="desk")
    before = drops._value.get()
    assert _ask(desk.client, desk.editor) == [desk.best]
    assert drops._value.get() - before == (1 if planted == "altered" else 0)
    assert desk.limits == [1, 4]
