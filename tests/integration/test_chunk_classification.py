"""Per-chunk classification on real components (Presidio, embeddings, Qdrant Edge, PostgreSQL): a chunk's level is
what its own content shows (never below the declared level); the document's is the highest of its chunks."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient

from retrieval.embeddings import get_embedder
from retrieval.service import WITHHELD_TITLE
from retrieval.store import AccessFilter, open_vector_store
from tests.conftest import PLATFORM_ADMIN, auth

SSN = "536-22-8741"
DOC = ("# Canteen\n\nThe canteen on floor two opens at eight and closes at three on weekdays. "
       "Soup is served on Fridays.\n\n"
       "# Payroll correction\n\nThe March payroll correction uses social security number " + SSN +
       " for the affected employee.\n\n"
       "# Parking\n\nThe parking garage under the east wing has two hundred spaces and opens at seven "
       "in the morning.\n").encode()
RANK = {"public": 0, "internal": 1, "confidential": 2, "restricted": 3}


@pytest.fixture(scope="module")
def mixed(client: TestClient, issue_token: Callable[..., str]) -> dict[str, str]:
    """A department with one internal document whose middle chunk holds an SSN; readers at two clearances."""
    department = f"mix{uuid.uuid4().hex[:6]}"
    admin = issue_token(PLATFORM_ADMIN)
    assert client.post("/v1/admin/departments", json={"name": department}, headers=auth(admin)).status_code == 201
    for subject, role in (("edna", "editor"), ("ivan", "reader"), ("cora", "reader")):
        client.post("/v1/admin/role-assignments", headers=auth(admin),
                    json={"subject": subject, "role": role, "department": department})
    response = client.put("/v1/admin/clearances", headers=auth(admin),
                          json={"subject": "cora", "department": department, "level": "confidential"})
    assert response.status_code == 200, response.text
    editor = issue_token("edna", [])
    response = client.post("/v1/documents", headers=auth(editor), data={"department": department,
                                                                        "classification": "internal"},
                           files={"file": ("office.md", DOC)})
    assert response.status_code == 202, response.text
    document_id = response.json()["document_id"]
    deadline = time.monotonic() + 180
    while (status := client.get(f"/v1/documents/{document_id}", headers=auth(editor)).json())["status"] not in (
            "ready", "failed", "quarantined"):
        assert time.monotonic() < deadline, "ingestion did not finish"
        time.sleep(0.25)
    assert status["status"] == "ready" and status["chunk_count"] == 3 and status["flagged_chunks"] == 0, status
    return {"department": department, "document_id": document_id, "editor": editor,
            "internal": issue_token("ivan", []), "confidential": issue_token("cora", [])}


def test_document_level_is_the_highest_chunk_level(client: TestClient, mixed: dict[str, str], settings) -> None:  # type: ignore[no-untyped-def]
    status = client.get(f"/v1/documents/{mixed['document_id']}", headers=auth(mixed["editor"])).json()
    assert status["declared_classification"] == "internal"
    assert status["classification"] == "confidential"
    assert any(reason.startswith("us_ssn") for reason in status["classification_reasons"])
    payloads = {p["chunk_index"]: p for p in open_vector_store(settings).scroll_payloads(mixed["department"])
                if p["document_id"] == mixed["document_id"]}
    assert {i: p["classification"] for i, p in payloads.items()} == {0: "internal", 1: "confidential",
                                                                      2: "internal"}
    assert all(p["classification_rank"] == RANK[p["classification"]] for p in payloads.values())


@pytest.mark.parametrize(("clearance", "visible"), [("internal", {0, 2}), ("confidential", {0, 1, 2}),
                                                    ("public", set())])
def test_the_search_filter_applies_each_chunks_level(mixed: dict[str, str], settings, clearance: str,  # type: ignore[no-untyped-def]
                                                     visible: set[int]) -> None:
    vector = get_embedder(settings.embedding_backend).embed(["payroll correction social security number"])[0]
    hits = open_vector_store(settings).search(mixed["department"], vector.tolist(),
                                              AccessFilter((), RANK[clearance]), limit=10)
    assert {hit.payload["chunk_index"] for hit in hits if hit.payload["document_id"] == mixed["document_id"]} \
        == visible


def test_internal_clearance_never_gets_the_ssn_chunk(client: TestClient, mixed: dict[str, str]) -> None:
    question = {"question": "Which social security number does the March payroll correction use?",
                "departments": [mixed["department"]]}
    low = client.post("/v1/query", headers=auth(mixed["internal"]), json=question)
    assert low.status_code == 200
    assert f"{mixed['document_id']}:1" not in {c["chunk_id"] for c in low.json()["citations"]}
    assert "<US_SSN" not in low.text and "payroll correction uses" not in low.text

    high = client.post("/v1/query", headers=auth(mixed["confidential"]), json=question)
    assert high.status_code == 200 and not high.json()["refused"]
    assert f"{mixed['document_id']}:1" in {c["chunk_id"] for c in high.json()["citations"]}
    assert SSN not in high.text  # redacted before embedding: the chunk holds a placeholder


def test_internal_clearance_is_answered_from_the_plain_chunks(client: TestClient, mixed: dict[str, str]) -> None:
    question = {"question": "When does the parking garage under the east wing open?",
                "departments": [mixed["department"]]}
    low = client.post("/v1/query", headers=auth(mixed["internal"]), json=question)
    assert low.status_code == 200 and not low.json()["refused"], low.text
    assert f"{mixed['document_id']}:2" in {c["chunk_id"] for c in low.json()["citations"]}


def test_a_citation_withholds_the_title_of_a_document_hidden_from_the_reader(client: TestClient,
                                                                             mixed: dict[str, str]) -> None:
    """The internal reader may read the plain chunks of a confidential document, not the document: GET
    /v1/documents/{id} and the listing hide it. The citation used to show its title all the same."""
    question = {"question": "When does the parking garage under the east wing open?",
                "departments": [mixed["department"]]}
    titles = {}
    for clearance in ("internal", "confidential"):
        answer = client.post("/v1/query", headers=auth(mixed[clearance]), json=question).json()
        titles[clearance] = {c["title"] for c in answer["citations"] if c["document_id"] == mixed["document_id"]}
    assert client.get(f"/v1/documents/{mixed['document_id']}", headers=auth(mixed["internal"])).status_code == 404
    assert titles == {"internal": {WITHHELD_TITLE}, "confidential": {"office.md"}}


@pytest.mark.parametrize("forgery", [{"classification": "internal", "classification_rank": RANK["internal"]},
                                     {"classification": "internal", "classification_rank": RANK["internal"],
                                      "scanned_by": "0123456789abcdef"}])
def test_a_level_lowered_in_the_vector_store_no_longer_opens(client: TestClient, mixed: dict[str, str],  # type: ignore[no-untyped-def]
                                                             settings, forgery: dict[str, object]) -> None:
    from core import metrics
    from retrieval.store import VectorPoint

    store = open_vector_store(settings)
    [payload] = [p for p in store.scroll_payloads(mixed["department"])
                 if p["document_id"] == mixed["document_id"] and p["chunk_index"] == 1]
    vector = get_embedder(settings.embedding_backend).embed(["payroll correction social security number"])[0]
    forged = {**payload, **forgery}
    store.upsert(mixed["department"], [VectorPoint(document_id=mixed["document_id"], chunk_index=1,
                                                   vector=vector.tolist(), payload=forged)])
    drops = metrics.AUTHZ_RECHECK_DROPS.labels(department=mixed["department"])
    before = drops._value.get()
    try:
        low = client.post("/v1/query", headers=auth(mixed["internal"]), json={
            "question": "Which social security number does the March payroll correction use?",
            "departments": [mixed["department"]]})
        assert low.status_code == 200
        assert f"{mixed['document_id']}:1" not in {c["chunk_id"] for c in low.json()["citations"]}
        assert "payroll correction uses" not in low.text
        assert drops._value.get() > before  # found by the forged filter, refused by the re-check
    finally:
        store.upsert(mixed["department"], [VectorPoint(document_id=mixed["document_id"], chunk_index=1,
                                                       vector=vector.tolist(), payload=payload)])


def _explain(client: TestClient, admin: str, subject: str, **target: str) -> dict[str, object]:
    response = client.post("/v1/authz/explain", headers=auth(admin), json={"subject": subject, **target})
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def test_explain_judges_a_chunk_at_its_own_level_as_the_query_does(client: TestClient, mixed: dict[str, str],
                                                                   issue_token: Callable[..., str]) -> None:
    """The document is confidential (its highest chunk), its plain chunks internal: the internal reader's queries
    return them. Explain for a chunk used to judge the document's level and answered deny for a chunk that reader's
    queries return. It now asks what the re-check asks, of the chunk's own stored level."""
    admin, document_id = issue_token(PLATFORM_ADMIN), mixed["document_id"]
    answer = client.post("/v1/query", headers=auth(mixed["internal"]), json={
        "question": "When does the parking garage under the east wing open?", "departments": [mixed["department"]]})
    cited = {c["chunk_id"] for c in answer.json()["citations"] if c["document_id"] == document_id}
    assert cited
    for chunk_id in cited:
        assert _explain(client, admin, "ivan", chunk_id=chunk_id)["decision"] == "allow", chunk_id
    plain = _explain(client, admin, "ivan", chunk_id=f"{document_id}:0")
    assert plain["decision"] == "allow" and "classification internal" in str(plain["checks"])
    assert _explain(client, admin, "ivan", chunk_id=f"{document_id}:1")["decision"] == "deny"
    assert _explain(client, admin, "cora", chunk_id=f"{document_id}:1")["decision"] == "allow"
    assert _explain(client, admin, "ivan", document_id=document_id)["decision"] == "deny"  # the listing hides it
    missing = client.post("/v1/authz/explain", headers=auth(admin),
                          json={"subject": "ivan", "chunk_id": f"{document_id}:99"})
    assert missing.status_code == 404, missing.text
