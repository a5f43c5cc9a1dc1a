"""POST /v1/query with the inputs real users send: punctuation-only questions, misspelt fields, loose types."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from audit import service as audit_service
from core.db import unit_of_work
from core.models import RetrievalEvent
from retrieval.service import SNIPPET_CHARS
from tests.conftest import PLATFORM_ADMIN, auth, wait_for_job
from tests.support.stub_model import StubModel, answering_through

FIN_DOC = """Travel and Expense Policy

Hotel costs are reimbursed up to 180 euros per night in capital cities and 120 euros elsewhere.
Expense claims must be filed within 30 days, with receipts attached.
"""
HOTEL = "How much are hotel costs reimbursed per night?"


def _ingest(client: TestClient, token: str, department: str, name: str, data: bytes) -> str:
    response = client.post("/v1/documents", headers=auth(token), data={"department": department, "title": name},
                           files={"file": (name, data)})
    assert response.status_code == 202, response.text
    assert wait_for_job(client, token, response.json()["job_id"])["status"] == "ready"
    return str(response.json()["document_id"])


@pytest.fixture(scope="module")
def desk(client: TestClient, issue_token: Callable[..., str]) -> dict[str, str]:
    """Two departments (`fin` with a policy, `ops`) for an editor; a reader alone in a third; a compliance officer."""
    admin = issue_token(PLATFORM_ADMIN)
    suffix = uuid.uuid4().hex[:6]
    names = {key: f"{key}{suffix}" for key in ("ops", "fin", "qm")}
    for name in names.values():
        assert client.post("/v1/admin/departments", json={"name": name}, headers=auth(admin)).status_code == 201
    for subject, role, key in [("qr-ed", "editor", "ops"), ("qr-ed", "editor", "fin"), ("qr-quinn", "reader", "qm"),
                               ("qr-carol", "compliance", "ops"), ("qr-carol", "compliance", "fin"),
                               ("qr-carol", "compliance", "qm")]:
        response = client.post("/v1/admin/role-assignments", headers=auth(admin),
                               json={"subject": subject, "role": role, "department": names[key]})
        assert response.status_code == 201, response.text
    editor = issue_token("qr-ed", [])
    _ingest(client, editor, names["fin"], "travel.md", FIN_DOC.encode())
    return {**names, "admin": admin, "editor": editor, "reader": issue_token("qr-quinn", []),
            "compliance": issue_token("qr-carol", [])}


def _ledger_row(client: TestClient, desk: dict[str, str], request_id: str) -> dict[str, object]:
    response = client.get("/v1/audit/retrievals", params={"format": "jsonl"}, headers=auth(desk["compliance"]))
    assert response.status_code == 200, response.text
    rows = [json.loads(line) for line in response.text.splitlines() if line]
    [row] = [row for row in rows if row.get("request_id") == request_id]
    return row


@pytest.mark.parametrize("question", ["?", "???", "...", ":)", "-", "\u200b", "\u200b?\u200b", "   "])
def test_a_question_without_a_letter_or_digit_is_a_422(client: TestClient, desk: dict[str, str],
                                                       question: str) -> None:
    """It was blocked by the prompt firewall, audited as an attack and counted as a guard hit."""
    response = client.post("/v1/query", headers=auth(desk["editor"]), json={"question": question})
    assert response.status_code == 422, response.text
    assert "the question holds no words" in response.json()["error"]["message"]


@pytest.mark.parametrize("question", ["5?", "首都?", "Où?"])
def test_a_short_question_with_a_letter_or_digit_in_any_script_is_asked(client: TestClient, desk: dict[str, str],
                                                                        question: str) -> None:
    response = client.post("/v1/query", headers=auth(desk["editor"]), json={"question": question})
    assert response.status_code == 200, response.text


def test_ten_question_marks_do_not_trip_the_departments_kill_switch(client: TestClient, desk: dict[str, str]) -> None:
    """Each '?' was a blocked injection; ten in a minute put the department into retrieval_only for everyone."""
    for _ in range(10):
        client.post("/v1/query", headers=auth(desk["reader"]), json={"question": "?"})
    response = client.post("/v1/query", headers=auth(desk["reader"]), json={"question": "Where is the canteen?"})
    row = _ledger_row(client, desk, response.json()["request_id"])
    assert row["kill_switch_mode"] == "normal", (row["kill_switch_mode"], row["guard_verdicts"])


@pytest.mark.parametrize(("body", "location"), [
    ({"question": HOTEL, "department": "ops"}, "body.department"),  # `departments` misspelt: it searched everything
    ({"question": HOTEL, "Zanzibar-7Q": 1}, "body.<key>"),  # a name no schema uses is the client's text: not echoed
])
def test_an_unknown_field_is_a_422_naming_where_it_is(client: TestClient, desk: dict[str, str],
                                                      body: dict[str, object], location: str) -> None:
    response = client.post("/v1/query", headers=auth(desk["editor"]), json=body)
    assert response.status_code == 422, response.text
    message = response.json()["error"]["message"]
    assert f"{location}: unknown field" in message and "Zanzibar" not in message, message


def test_every_request_body_refuses_unknown_fields(client: TestClient, desk: dict[str, str]) -> None:
    response = client.post("/v1/admin/departments", headers=auth(desk["admin"]),
                           json={"name": f"x{uuid.uuid4().hex[:6]}", "description": "typo'd schema"})
    assert response.status_code == 422, response.text
    assert "unknown field" in response.json()["error"]["message"]


@pytest.mark.parametrize("top_k", [True, "5", 2.0])
def test_top_k_of_another_type_is_a_422(client: TestClient, desk: dict[str, str], top_k: object) -> None:
    """`true` was read as 1 and `"5"` as 5: a client bug answered as if it were meant."""
    response = client.post("/v1/query", headers=auth(desk["editor"]), json={"question": HOTEL, "top_k": top_k})
    assert response.status_code == 422, response.text
    assert "body.top_k" in response.json()["error"]["message"]


@pytest.mark.parametrize(("field", "value"), [("reversible", "yes"), ("reversible", 1),
                                              ("recognizers", [{"entity": "STAFF_ID", "pattern": "S-[0-9]{5}",
                                                                "score": "0.6"}])])
def test_an_ingestion_policy_field_of_another_type_is_a_422(client: TestClient, desk: dict[str, str],
                                                            field: str, value: object) -> None:
    """`"reversible": "yes"` turned on sealed originals (a privacy decision) from a string."""
    response = client.put(f"/v1/admin/departments/{desk['ops']}/ingestion-policy", headers=auth(desk["admin"]),
                          json={field: value})
    assert response.status_code == 422, response.text
    assert f"body.{field}" in response.json()["error"]["message"]


def test_whole_numbers_and_true_booleans_are_still_taken(client: TestClient, desk: dict[str, str]) -> None:
    asked = client.post("/v1/query", headers=auth(desk["editor"]), json={"question": HOTEL, "top_k": 3})
    assert asked.status_code == 200, asked.text
    response = client.put(f"/v1/admin/departments/{desk['ops']}/ingestion-policy", headers=auth(desk["admin"]),
                          json={"reversible": False, "recognizers": [{"entity": "STAFF_ID", "pattern": "S-[0-9]{5}",
                                                                      "score": 1}]})
    assert response.status_code == 200, response.text


LONG_DOC = ("Office Handbook\n\n" + " ".join(
    f"Paragraph filler sentence number {i} talks about general office matters and nothing specific." for i in range(8))
    + " The bicycle storage room is on level minus two and opens at seven in the morning.\n")


def test_each_citation_snippet_shows_the_sentence_it_backs(client: TestClient, desk: dict[str, str]) -> None:
    """The snippet was the chunk's first 240 characters: the quoted sentence, near its end, was not in it."""
    _ingest(client, desk["editor"], desk["ops"], "handbook.txt", LONG_DOC.encode())
    body = client.post("/v1/query", headers=auth(desk["editor"]),
                       json={"question": "Where is the bicycle storage room?", "departments": [desk["ops"]]}).json()
    assert body["refused"] is False and "bicycle" in body["answer"], body
    snippets = {c["n"]: c["snippet"] for c in body["citations"]}
    for sentence, n in re.findall(r"(.+?) \[(\d+)\]\s*", body["answer"]):
        assert sentence.strip() in snippets[int(n)], (sentence, snippets[int(n)])
    assert all(len(snippet) <= SNIPPET_CHARS for snippet in snippets.values())


def test_the_ledger_tells_no_departments_named_from_an_empty_list(client: TestClient, desk: dict[str, str],
                                                                   settings) -> None:  # type: ignore[no-untyped-def]
    """Both were stored as `departments_requested = []`: "search all I may read" and "search none" read the same."""
    everything = client.post("/v1/query", headers=auth(desk["editor"]), json={"question": HOTEL}).json()
    nothing = client.post("/v1/query", headers=auth(desk["editor"]), json={"question": HOTEL, "departments": []}).json()
    assert everything["refused"] is False and nothing["reason"] == "no_authorised_departments"
    assert _ledger_row(client, desk, everything["request_id"])["departments_requested"] is None
    with unit_of_work(settings.resolved_database_url) as session:  # a row no department's officer sees: read directly
        stored = session.scalars(select(RetrievalEvent.departments_requested)
                                 .where(RetrievalEvent.request_id == nothing["request_id"])).one()
    assert stored == []
    with unit_of_work(settings.resolved_database_url) as session:
        assert audit_service.verify(session=session, settings=settings).ok
    csv_export = client.get("/v1/audit/retrievals", params={"format": "csv"}, headers=auth(desk["compliance"]))
    assert csv_export.status_code == 200, csv_export.text



@pytest.fixture(scope="module")
def board(client: TestClient, desk: dict[str, str]) -> str:
    """A department whose two minutes name different people, each `<PERSON_1>` in its own document."""
    name = f"board{uuid.uuid4().hex[:6]}"
    assert client.post("/v1/admin/departments", json={"name": name}, headers=auth(desk["admin"])).status_code == 201
    assert client.post("/v1/admin/role-assignments", headers=auth(desk["admin"]),
                       json={"subject": "qr-ed", "role": "editor", "department": name}).status_code == 201
    _ingest(client, desk["editor"], name, "march.txt",
            b"Budget committee minutes. Maria Gonzalez chaired the budget committee and approved the travel budget.")
    _ingest(client, desk["editor"], name, "april.txt",
            b"Audit committee minutes. The audit committee was led by John Smith, who signed off the annual accounts.")
    return name


BOARD_QUESTION = "Who led the budget committee and the audit committee?"


def _assert_two_people(body: dict[str, object]) -> None:
    assert body["refused"] is False and len({c["document_id"] for c in body["citations"]}) == 2, body
    answer = str(body["answer"])
    placeholders = re.findall(r"<PERSON_\d+(?:·\d+)?>", answer)
    assert len(placeholders) == 2 and len(set(placeholders)) == 2, answer
    for sentence, n in re.findall(r"(.+?) \[(\d+)\]\.?\s*", answer):
        if "<PERSON" in sentence:  # the qualifier is the citation the sentence carries
            assert f"·{n}>" in sentence, answer


def test_one_answer_does_not_give_two_people_the_same_placeholder(client: TestClient, desk: dict[str, str],
                                                                  board: str) -> None:
    """Placeholders are numbered per document: an answer quoting two documents showed two different people as
    <PERSON_1>, reading as if one person did both. Each is now qualified by its document's citation number."""
    body = client.post("/v1/query", headers=auth(desk["editor"]),
                       json={"question": BOARD_QUESTION, "departments": [board]}).json()
    _assert_two_people(body)


def _quote_each_person(messages: list[dict[str, str]]) -> str:
    """A model that quotes, from each source, the sentence naming its person, with that source's citation."""
    sources = re.findall(r'<source n="(\d+)"[^>]*>\n(.*?)\n</source>', messages[1]["content"], re.DOTALL)
    return " ".join(f"{sentence.strip()} [{n}]." for n, text in sources
                    for sentence in re.findall(r"[^.]*<PERSON_1>[^.]*(?=\.)", text))


def test_a_generated_answer_does_not_give_two_people_the_same_placeholder(client: TestClient, desk: dict[str, str],
                                                                          board: str) -> None:
    stub = StubModel()
    stub.reply = _quote_each_person
    try:
        with answering_through(client, stub):
            body = client.post("/v1/query", headers=auth(desk["editor"]),
                               json={"question": BOARD_QUESTION, "departments": [board]}).json()
    finally:
        stub.server.shutdown()
    assert stub.requests and "minutes" not in body["answer"], body  # the model's answer, not the extractive one
    _assert_two_people(body)
