"""Bad input gets a clear error before it reaches storage: NUL characters (PostgreSQL stores none) in bodies, URLs
and upload forms; names from inside files are cleaned; an unexpected crash still answers with its request id."""

from __future__ import annotations

import gzip
import json
import logging
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from core import metrics
from core.db import get_engine
from core.models import DEPARTMENT_PATTERN
from core.text import REPLACEMENT
from tests.conftest import PLATFORM_ADMIN, auth, wait_for_document, wait_for_job

SECRET_WORD = "Zanzibar-7Q"  # stands for a question's or a title's text: never echoed in an error


@pytest.fixture(scope="module")
def desk(client: TestClient, issue_token: Callable[..., str]) -> dict[str, str]:
    """A department with an editor and one ingested document, so a query has something to find."""
    department = f"desk{uuid.uuid4().hex[:6]}"
    admin = issue_token(PLATFORM_ADMIN)
    assert client.post("/v1/admin/departments", json={"name": department}, headers=auth(admin)).status_code == 201
    response = client.post("/v1/admin/role-assignments", headers=auth(admin),
                           json={"subject": "nadia", "role": "editor", "department": department})
    assert response.status_code == 201, response.text
    editor = issue_token("nadia", [])
    uploaded = client.post("/v1/documents", headers=auth(editor), data={"department": department, "title": "rota"},
                           files={"file": ("rota.txt", b"The Leeds desk opens at nine on weekdays.")})
    assert uploaded.status_code == 202, uploaded.text
    assert wait_for_job(client, editor, uploaded.json()["job_id"])["status"] == "ready"
    return {"department": department, "admin": admin, "editor": editor}


def _audit_failures() -> float:
    return metrics.AUDIT_WRITE_FAILURES._value.get()  # type: ignore[attr-defined, no-any-return]


@pytest.mark.parametrize("body", [
    {"question": f"When does the desk open?\x00{SECRET_WORD}"},
    {"question": "When does the desk open?", "purpose": f"rota\x00{SECRET_WORD}"},
    {"question": "When does the desk open?", "departments": [f"desk\x00{SECRET_WORD}"]},
])
def test_a_nul_in_a_query_is_a_422_not_an_audit_failure(client: TestClient, desk: dict[str, str],
                                                          body: dict[str, object]) -> None:
    failures = _audit_failures()
    refused = client.post("/v1/query", json=body, headers=auth(desk["editor"]))
    assert refused.status_code == 422, refused.text
    error = refused.json()["error"]
    assert error["code"] == "invalid_request" and "NUL" in error["message"] and SECRET_WORD not in refused.text
    assert _audit_failures() == failures  # before: the ledger refused the row, a 503 and an operator alert
    answered = client.post("/v1/query", json={"question": "When does the desk open?"}, headers=auth(desk["editor"]))
    assert answered.status_code == 200 and not answered.json()["refused"], answered.text


@pytest.mark.parametrize("question", ["   ", "\n\t", "\u3000"])
def test_a_blank_question_is_a_422(client: TestClient, desk: dict[str, str], question: str) -> None:
    """It was answered as a refusal ("no relevant content") and audited as a question."""
    refused = client.post("/v1/query", json={"question": question}, headers=auth(desk["editor"]))
    assert refused.status_code == 422, refused.text
    assert "the question holds no words" in refused.json()["error"]["message"]


@pytest.mark.parametrize(("method", "path", "body"), [
    ("POST", "/v1/admin/kill-switch", {"scope": "global", "mode": "normal", "reason": f"drill\x00{SECRET_WORD}"}),
    ("POST", "/v1/admin/role-assignments", {"subject": f"eve\x00{SECRET_WORD}", "role": "reader", "department": "x"}),
    ("POST", "/v1/authz/explain", {"subject": "eve", "groups": [f"g\x00{SECRET_WORD}"], "document_id": "d"}),
])
def test_a_nul_anywhere_in_a_request_body_is_a_422(client: TestClient, desk: dict[str, str], method: str,
                                                    path: str, body: dict[str, object]) -> None:
    response = client.request(method, path, json=body, headers=auth(desk["admin"]))
    assert response.status_code == 422, response.text
    assert "NUL" in response.json()["error"]["message"] and SECRET_WORD not in response.text


@pytest.mark.parametrize("content_type", ["application/x-www-form-urlencoded", "text/plain", None])
@pytest.mark.parametrize(("method", "path"), [("POST", "/v1/admin/group-mappings"), ("PUT", "/v1/admin/clearances"),
                                              ("POST", "/v1/query")])
def test_a_json_body_sent_as_another_type_is_told_to_send_json(client: TestClient, desk: dict[str, str], method: str,
                                                               path: str, content_type: str | None) -> None:
    """`curl -d '{...}'` without a JSON Content-Type was told "body: Input should be a valid dictionary or object to
    extract fields from": now the 422 says the body must be JSON, and echoes nothing of it."""
    headers = auth(desk["admin"]) | ({"content-type": content_type} if content_type else {})
    response = client.request(method, path, content=f'{{"question": "{SECRET_WORD}"}}', headers=headers)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_request" and "Content-Type: application/json" in error["message"], error
    assert SECRET_WORD not in response.text


@pytest.mark.parametrize("depth", [900, 200_000])
@pytest.mark.parametrize("path", ["/v1/query", "/v1/admin/kill-switch", "/v1/admin/departments"])
def test_a_body_nested_deeper_than_the_stack_is_a_4xx_and_a_short_log(
        client: TestClient, desk: dict[str, str], path: str, depth: int, caplog: pytest.LogCaptureFixture) -> None:
    """Valid JSON a thousand levels deep used to crash the NUL check with a RecursionError: a 500 and a log line of a
    thousand stack frames per request. Deeper still, the JSON parser itself gives up: a 400."""
    nested = "[" * depth + "]" * depth
    body = f'{{"question": {nested}, "name": {nested}, "scope": {nested}, "mode": "normal"}}'
    with caplog.at_level(logging.WARNING):
        response = client.post(path, content=body, headers={**auth(desk["admin"]), "content-type": "application/json"})
    assert response.status_code in (400, 422), response.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    if depth == 200_000:  # the parser's 400 said "There was an error parsing the body", nothing of what to change
        assert response.status_code == 400, response.text
        assert response.json()["error"]["message"] == "invalid request: the body's JSON is nested too deeply"


@pytest.mark.parametrize(("body", "encoding"), [(gzip.compress(f'{{"question": "{SECRET_WORD}"}}'.encode()), "gzip"),
                                              (f'{{"question": "\xe9t\xe9 {SECRET_WORD}"}}'.encode("latin-1"), None)],
                         ids=["gzip", "latin-1"])
def test_a_json_body_not_in_utf8_is_told_to_send_utf8(client: TestClient, desk: dict[str, str], body: bytes,
                                                      encoding: str | None) -> None:
    """A gzip-compressed body (bodies are read as sent, whatever their Content-Encoding) or one in Latin-1 was told
    "There was an error parsing the body": now the 400 names the encoding, and echoes nothing of the body."""
    headers = {**auth(desk["editor"]), "content-type": "application/json"}
    response = client.post("/v1/query", content=body, headers=headers | ({"content-encoding": encoding} if encoding
                                                                            else {}))
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_request" and "not UTF-8" in error["message"] and SECRET_WORD not in response.text


@pytest.mark.parametrize("path", ["/v1/documents/abc%00def", "/v1/jobs/x%00y", "/v1/audit/retrievals?user=eve%00x"])
def test_a_nul_in_the_url_is_a_422(client: TestClient, desk: dict[str, str], path: str) -> None:
    response = client.get(path, headers=auth(desk["admin"]))
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "invalid_request" and "NUL" in response.json()["error"]["message"]


@pytest.mark.parametrize("field", ["title", "acl_groups"])  # a department's name: a 422 (below)
def test_upload_form_fields_with_a_nul_are_refused_by_name(client: TestClient, desk: dict[str, str],
                                                          field: str) -> None:
    form = {"department": desk["department"], "title": "memo", field: f"{desk['department']}\x00{SECRET_WORD}"}
    response = client.post("/v1/documents", headers=auth(desk["editor"]), data=form,
                           files={"file": ("memo.txt", f"A memo {uuid.uuid4().hex}.".encode())})
    assert response.status_code == 400, response.text
    message = response.json()["error"]["message"]
    assert message.startswith(f"{field}:") and "NUL" in message and SECRET_WORD not in message


def test_an_upload_with_two_files_is_refused(client: TestClient, desk: dict[str, str]) -> None:
    """Two `file` parts answered 202 for one document: the first file was silently lost."""
    first, second = f"The first of two {uuid.uuid4().hex}.".encode(), f"The second of two {uuid.uuid4().hex}.".encode()
    response = client.post("/v1/documents", headers=auth(desk["editor"]), data={"department": desk["department"]},
                           files=[("file", ("first.txt", first, "text/plain")),
                                  ("file", ("second.txt", second, "text/plain"))])
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_request" and "Too many files" in error["message"], error
    listed = client.get(f"/v1/documents?department={desk['department']}", headers=auth(desk["editor"])).json()
    assert not {"first.txt", "second.txt"} & {d["title"] for d in listed["documents"]}


@pytest.mark.parametrize(("path", "content_type", "opening"), [
    ("/v1/query", "application/json", b'{"question": "'),
    ("/v1/documents", "multipart/form-data; boundary=cut",
     b'--cut\r\nContent-Disposition: form-data; name="file"; filename="big.txt"\r\n\r\n'),
])
def test_an_oversized_body_without_content_length_is_refused_as_it_is_read(
        client: TestClient, settings, path: str, content_type: str, opening: bytes) -> None:  # type: ignore[no-untyped-def]
    """A body sent chunked (no Content-Length) was read whole before anything checked its size, before
    authentication: an anonymous client could make the API buffer any amount (JSON in memory, multipart in
    temporary files). The same body declared with a Content-Length was refused at once. Driven over ASGI to count
    the bytes the API takes in."""
    limit = settings.max_upload_bytes + 64 * 1024
    chunk = b"a" * 65536
    pieces = [opening] + [chunk] * (2 * limit // len(chunk))
    consumed, sent = 0, []

    async def receive() -> dict[str, object]:
        nonlocal consumed
        if not pieces:
            return {"type": "http.disconnect"}
        piece = pieces.pop(0)
        consumed += len(piece)
        return {"type": "http.request", "body": piece, "more_body": bool(pieces)}

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"",
             "headers": [(b"host", b"testserver"), (b"content-type", content_type.encode()),
                         (b"transfer-encoding", b"chunked")],
             "client": ("testclient", 50000), "server": ("testserver", 80), "state": {}}
    client.portal.call(client.app, scope, receive, send)  # type: ignore[union-attr]
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    assert status == 413, f"answered {status} after reading {consumed} bytes (limit {limit})"
    assert consumed <= limit + len(chunk)
    body = json.loads(b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"))
    assert body["error"]["code"] == "payload_too_large" and body["error"]["request_id"], body


def test_a_405_names_the_allowed_methods(client: TestClient, desk: dict[str, str]) -> None:
    """`PUT /v1/query` answered 405 without the `Allow` header HTTP requires (RFC 9110 15.5.6): the error handler
    rebuilt the response and dropped the headers Starlette set."""
    response = client.put("/v1/query", json={}, headers=auth(desk["editor"]))
    assert response.status_code == 405
    assert response.headers.get("allow") == "POST", dict(response.headers)
    assert response.json()["error"]["request_id"] == response.headers["x-request-id"]


def test_a_file_name_too_long_for_the_form_parser_is_named_as_the_problem(client: TestClient,
                                                                         desk: dict[str, str]) -> None:
    """A 5,000-character file name was refused as "Invalid multipart data.": nothing said what to change. Names the
    parser takes are kept (as the title, cut to 300 characters)."""
    refused = client.post("/v1/documents", headers=auth(desk["editor"]), data={"department": desk["department"]},
                          files={"file": ("n" * 5000 + ".txt", f"Long name {uuid.uuid4().hex}.".encode())})
    assert refused.status_code == 400, refused.text
    assert "file name is at most about 4,000 bytes" in refused.json()["error"]["message"]
    taken = client.post("/v1/documents", headers=auth(desk["editor"]), data={"department": desk["department"]},
                        files={"file": ("n" * 4000 + ".txt", f"Long name {uuid.uuid4().hex}.".encode())})
    assert taken.status_code == 202, taken.text
    malformed = client.post("/v1/documents", headers={**auth(desk["editor"]),
                                                      "content-type": "multipart/form-data; boundary=cut"},
                            content=b"--cut\r\nContent-Disposition form-data\r\n\r\nx\r\n--cut--\r\n")
    assert malformed.status_code == 400 and malformed.json()["error"]["message"] == "Invalid multipart data."


def test_an_upload_names_at_most_256_acl_groups(client: TestClient, desk: dict[str, str]) -> None:
    """Every chunk's payload carries the groups and every read re-checks them: 80,000 took 15 s to ingest."""
    def upload(count: int) -> int:
        form = {"department": desk["department"], "acl_groups": ",".join(f"team-{i}" for i in range(count))}
        return client.post("/v1/documents", headers=auth(desk["editor"]), data=form,
                           files={"file": ("acl.txt", f"An ACL memo {uuid.uuid4().hex}.".encode())}).status_code

    assert upload(257) == 400
    assert upload(256) == 202


def test_a_text_file_that_opens_with_pk_is_ingested_as_text(client: TestClient, desk: dict[str, str]) -> None:
    """"PK" opens a ZIP, and a text about a PKI: only a sniffed ZIP-based type is checked as a ZIP container."""
    body = f"PKI rollout plan for the Leeds office {uuid.uuid4().hex}.\nCertificates renew every year.\n".encode()
    uploaded = client.post("/v1/documents", headers=auth(desk["editor"]), data={"department": desk["department"]},
                           files={"file": ("pki-plan.txt", body)})
    assert uploaded.status_code == 202, uploaded.text
    assert wait_for_job(client, desk["editor"], uploaded.json()["job_id"])["status"] == "ready"


def test_names_from_inside_files_lose_their_control_characters(client: TestClient, desk: dict[str, str]) -> None:
    """The upload's own file name (no title given; httpx escapes a NUL there, not an ESC) and an e-mail attachment's
    (RFC 2231 can encode a NUL)."""
    named = client.post("/v1/documents", headers=auth(desk["editor"]), data={"department": desk["department"]},
                        files={"file": ("notes\x1b.txt", f"Notes {uuid.uuid4().hex}.".encode())})
    assert named.status_code == 202, named.text
    assert wait_for_job(client, desk["editor"], named.json()["job_id"])["status"] == "ready"
    document = client.get(f"/v1/documents/{named.json()['document_id']}", headers=auth(desk["editor"])).json()
    assert document["title"] == f"notes{REPLACEMENT}.txt"

    mail = (b"From: ana@example.com\r\nTo: ben@example.com\r\nSubject: Rota\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: multipart/mixed; boundary=B\r\n\r\n--B\r\nContent-Type: text/plain\r\n\r\n"
            b"The rota is attached.\r\n--B\r\nContent-Type: text/plain\r\n"
            b"Content-Disposition: attachment; filename*=utf-8''rota%00%1B.txt\r\n\r\n"
            b"Saturday: the Leeds desk " + uuid.uuid4().hex.encode() + b".\r\n--B--\r\n")
    parent = client.post("/v1/documents", headers=auth(desk["editor"]), data={"department": desk["department"],
                         "title": "rota mail"}, files={"file": ("rota.eml", mail)})
    assert parent.status_code == 202, parent.text
    assert wait_for_job(client, desk["editor"], parent.json()["job_id"])["status"] == "ready"
    child = _first_attachment(client, desk["editor"], parent.json()["document_id"])
    assert child["title"] == f"rota mail / rota{REPLACEMENT}{REPLACEMENT}.txt" and child["status"] == "ready"


def test_titles_lose_their_bidirectional_controls(client: TestClient, desk: dict[str, str]) -> None:
    """A right-to-left override (U+202E) was stored in the title as sent: "invoice<RLO>fdp.exe" shows as
    "invoiceexe.pdf" in every listing and citation. Each embedding, override and isolate is replaced, as control
    characters are, in a given title and in a file's name."""
    titled = client.post("/v1/documents", headers=auth(desk["editor"]),
                         data={"department": desk["department"], "title": "invoice\u202efdp.exe"},
                         files={"file": ("invoice.txt", f"Invoice {uuid.uuid4().hex}.".encode())})
    named = client.post("/v1/documents", headers=auth(desk["editor"]), data={"department": desk["department"]},
                        files={"file": ("\u2067notes\u2069\u202a.txt", f"Notes {uuid.uuid4().hex}.".encode())})
    titles = []
    for response in (titled, named):
        assert response.status_code == 202, response.text
        titles.append(wait_for_document(client, desk["editor"], response.json()["document_id"])["title"])
    assert titles == [f"invoice{REPLACEMENT}fdp.exe", f"{REPLACEMENT}notes{REPLACEMENT}{REPLACEMENT}.txt"]


def test_titles_lose_their_line_separators(client: TestClient, desk: dict[str, str]) -> None:
    """U+2028 and the other characters a reader breaks a line at were stored in the title: a title on several lines
    in a listing, and one the query-time title scan read in pieces. Each is a space now."""
    uploaded = client.post("/v1/documents", headers=auth(desk["editor"]),
                           data={"department": desk["department"], "title": "rota\u2028march\u2029leeds\x85desk"},
                           files={"file": ("rota.txt", f"Rota {uuid.uuid4().hex}.".encode())})
    assert uploaded.status_code == 202, uploaded.text
    assert wait_for_document(client, desk["editor"], uploaded.json()["document_id"])["title"] == "rota march leeds desk"


def _first_attachment(client: TestClient, token: str, document_id: str) -> dict[str, object]:
    deadline = time.monotonic() + 120
    while not (children := client.get(f"/v1/documents/{document_id}", headers=auth(token)).json()["attachment_ids"]):
        assert time.monotonic() < deadline, "the attachment was not spawned in time"
        time.sleep(0.25)
    return wait_for_document(client, token, children[0])


def test_a_crash_answers_500_with_its_request_id(client: TestClient, desk: dict[str, str],
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    """Inside the request's context: the body and the log line carry the id (they said "-" before), the exception
    does not escape to the server (which dropped the client's connection), and the log keeps the stack frames but not
    the exception's message (a library's message may quote a stored value)."""
    from ingestion import service

    def crash(**_: object) -> None:
        raise RuntimeError(f"a library's message quoting a stored value: {SECRET_WORD}")

    monkeypatch.setattr(service, "document_status", crash)
    with caplog.at_level(logging.ERROR):
        response = client.get(f"/v1/documents/{uuid.uuid4()}", headers=auth(desk["editor"]))
    assert response.status_code == 500
    error = response.json()["error"]
    assert error == {"code": "internal", "message": "internal error", "request_id": response.headers["x-request-id"]}
    assert len(error["request_id"]) == 32
    logged = [r for r in caplog.records if r.name == "api.errors"]
    assert logged and "RuntimeError" in logged[0].getMessage() and "crash" in logged[0].getMessage()
    assert all(SECRET_WORD not in r.getMessage() and not r.exc_info for r in logged)  # frames, never the message


def test_database_errors_never_list_the_bound_values(settings) -> None:  # type: ignore[no-untyped-def]
    """A failed statement's text (which an error log may carry) names the statement, not the values bound to it."""
    with get_engine(settings.resolved_database_url).connect() as connection, \
            pytest.raises(SQLAlchemyError) as failure:
        connection.execute(text("SELECT CAST(:value AS text)"), {"value": f"{SECRET_WORD}\x00"})
    assert "SELECT CAST" in str(failure.value) and SECRET_WORD not in str(failure.value)


@pytest.mark.parametrize(("window", "expected"), [
    ("since=0001-01-01T00:00:00%2B23:59", 422), ("until=9999-12-31T23:59:59-23:59", 422),  # overflowed: a 500
    ("since=2026-01-01&until=2026-01-01", 200),  # since inclusive, until exclusive: an empty window, an empty export
])
def test_export_windows_outside_the_calendar_are_a_422(client: TestClient, desk: dict[str, str],
                                                       issue_token: Callable[..., str], window: str,
                                                       expected: int) -> None:
    response = client.post("/v1/admin/role-assignments", headers=auth(desk["admin"]),
                           json={"subject": "cora", "role": "compliance", "department": desk["department"]})
    assert response.status_code in (200, 201), response.text  # granted, or already in place
    exported = client.get(f"/v1/audit/retrievals?department={desk['department']}&{window}",
                          headers=auth(issue_token("cora", [])))
    assert exported.status_code == expected, exported.text
    if expected == 422:
        assert "calendar" in exported.json()["error"]["message"]


@pytest.mark.parametrize(("path", "query", "problem"), [
    ("/v1/documents", "limit=5.0", "query.limit: Value error, an integer"),  # pydantic alone read these as 5
    ("/v1/documents", "limit=%2B5", "query.limit: Value error, an integer"),
    ("/v1/documents", "limit=05", "query.limit: Value error, an integer"),
    ("/v1/documents", "limit=%205", "query.limit: Value error, an integer"),
    ("/v1/documents", "limit=1_0", "query.limit: Value error, an integer"),
    ("/v1/documents", "limit=1.5", "query.limit: Value error, an integer"),
    ("/v1/documents", "limit=true", "query.limit: Value error, an integer"),
    ("/v1/documents", "limit=1&limit=2", "query.limit: given more than once"),  # the last one was read
    ("/v1/documents", "status=ready&status=failed", "query.status: given more than once"),
    ("/v1/documents", "department=other", "query.department: given more than once"),
    ("/v1/documents", "limti=5", "query.<key>: unknown field"),  # dropped, and the default limit used
    ("/v1/audit/retrievals", "departmnet=x", "query.<key>: unknown field"),  # exported every department in scope
    ("/v1/audit/retrievals", "since=1700000000", "query.since: Value error, a time is written in ISO 8601"),
])
def test_a_query_string_is_read_as_strictly_as_a_body(client: TestClient, desk: dict[str, str], path: str,
                                                       query: str, problem: str) -> None:
    """Query parameters took whatever pydantic could read (`5.0`, `+5`, a number of seconds for a time), the last of
    a repeated one, and dropped a name the endpoint does not take."""
    response = client.get(f"{path}?department={desk['department']}&{query}", headers=auth(desk["editor"]))
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_request" and problem in error["message"], error
    assert "1700000000" not in error["message"] and "departmnet" not in error["message"]  # values never echoed


DEPARTMENT_LISTS = ["/v1/documents", "/v1/audit/retrievals", "/v1/admin/quarantine", "/v1/admin/role-assignments",
                    "/v1/admin/group-mappings", "/v1/admin/role-inheritance", "/v1/admin/clearances"]


@pytest.mark.parametrize("path", DEPARTMENT_LISTS)
@pytest.mark.parametrize("name", ["a" * 64, "a" * 10_000, "Desk", "-desk", f"desk {SECRET_WORD}"])
def test_a_department_in_a_query_string_is_a_department_name_or_a_422(client: TestClient, path: str, name: str,
                                                                       issue_token: Callable[..., str]) -> None:
    """Only `/v1/documents` limited it (to 64 characters of any text); the admin lists and the audit export took
    any text of any length. Each reads it as a body reads a department's name now."""
    response = client.get(path, params={"department": name}, headers=auth(issue_token(PLATFORM_ADMIN)))
    assert response.status_code == 422, response.text
    message = response.json()["error"]["message"]
    assert "query.department: String should match pattern" in message and name not in message, message


@pytest.mark.parametrize("path", DEPARTMENT_LISTS)
def test_the_longest_department_name_is_taken_in_a_query_string(client: TestClient, path: str,
                                                                 issue_token: Callable[..., str]) -> None:
    response = client.get(path, params={"department": "a" * 63}, headers=auth(issue_token(PLATFORM_ADMIN)))
    assert response.status_code != 422, response.text


BAD_NAMES = ["a" * 64, "a" * 10_000, "Desk", "-desk", "desk.x", f"desk {SECRET_WORD}"]
POLICY = "/v1/admin/departments/{}/ingestion-policy"


@pytest.mark.parametrize("method", ["GET", "PUT"])
@pytest.mark.parametrize("name", BAD_NAMES)
def test_a_department_in_a_path_is_a_department_name_or_a_422(client: TestClient, method: str, name: str,
                                                               issue_token: Callable[..., str]) -> None:
    """The ingestion policy's path took any text of any length and looked it up: a 404 "no such department" (a
    403 for a department's admin)."""
    response = client.request(method, POLICY.format(name), json={}, headers=auth(issue_token(PLATFORM_ADMIN)))
    assert response.status_code == 422, response.text
    message = response.json()["error"]["message"]
    assert "path.department: String should match pattern" in message and name not in message, message


@pytest.mark.parametrize("name", [*BAD_NAMES, "../x", f"desk\x00{SECRET_WORD}"])
def test_a_department_in_an_upload_form_is_a_department_name_or_a_422(
        client: TestClient, desk: dict[str, str], settings, name: str,  # type: ignore[no-untyped-def]
        caplog: pytest.LogCaptureFixture) -> None:
    """The form's department took any text of any length: a 403 "not allowed to upload in this department" (a NUL
    a 400). Now a 422 as a body's department, before the file is looked at; neither a log line nor the ledger
    holds the value."""
    with get_engine(settings.resolved_database_url).connect() as connection:
        ledger_rows = connection.execute(text("SELECT count(*) FROM retrieval_events")).scalar_one()
    with caplog.at_level(logging.DEBUG):
        response = client.post("/v1/documents", headers=auth(desk["editor"]), data={"department": name},
                               files={"file": ("memo.txt", f"A memo {uuid.uuid4().hex}.".encode())})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_request", error
    assert "body.department: String should match pattern" in error["message"] and name not in error["message"]
    server_lines = [r.getMessage() for r in caplog.records if not r.name.startswith("httpx")]  # the client's own
    assert not [line for line in server_lines if "aaaaaaaaaaaaaaaaaaaa" in line or SECRET_WORD in line]
    with get_engine(settings.resolved_database_url).connect() as connection:
        assert connection.execute(text("SELECT count(*) FROM retrieval_events")).scalar_one() == ledger_rows


@pytest.mark.parametrize("name", [*BAD_NAMES, "../x"])
def test_a_department_a_query_names_is_a_department_name_or_a_422(client: TestClient, desk: dict[str, str],
                                                                  settings, name: str) -> None:  # type: ignore[no-untyped-def]
    """A malformed name in `departments` was dropped: the query answered from the others (or from none, recorded
    as `departments: []`), and the caller never told their name could not be a department's."""
    with get_engine(settings.resolved_database_url).connect() as connection:
        ledger_rows = connection.execute(text("SELECT count(*) FROM retrieval_events")).scalar_one()
    response = client.post("/v1/query", headers=auth(desk["editor"]), json={
        "question": "When does the desk open?", "departments": [desk["department"], name]})
    assert response.status_code == 422, response.text
    message = response.json()["error"]["message"]
    assert "body.departments.1: String should match pattern" in message and name not in message, message
    with get_engine(settings.resolved_database_url).connect() as connection:
        assert connection.execute(text("SELECT count(*) FROM retrieval_events")).scalar_one() == ledger_rows


def test_the_longest_department_name_is_taken_in_a_path_and_a_form(client: TestClient, desk: dict[str, str]) -> None:
    name = f"desk{uuid.uuid4().hex}".ljust(63, "x")
    admin = auth(desk["admin"])
    assert client.post("/v1/admin/departments", json={"name": name}, headers=admin).status_code == 201
    assert client.post("/v1/admin/role-assignments", headers=admin,
                       json={"subject": "nadia", "role": "editor", "department": name}).status_code == 201
    assert client.put(POLICY.format(name), json={"keywords": {"rota": "internal"}}, headers=admin).status_code == 200
    assert client.get(POLICY.format(name), headers=admin).json()["keywords"] == {"rota": "internal"}
    uploaded = client.post("/v1/documents", headers=auth(desk["editor"]), data={"department": name},
                           files={"file": ("memo.txt", f"A memo {uuid.uuid4().hex}.".encode())})
    assert uploaded.status_code == 202, uploaded.text


def _patterns(schema: dict[str, Any]) -> list[str | None]:
    """The pattern a parameter's or a field's schema sets on each value it may take (a list's on its items)."""
    options = [option for option in schema.get("anyOf", [schema]) if option.get("type") != "null"]
    return [option.get("items", option).get("pattern") for option in options]


def _department_inputs(openapi: dict[str, Any]) -> dict[str, list[str | None]]:
    """Each place a request gives a department's name (a parameter, a body's or a form's field, a department's own
    `name`), with the patterns its schema sets."""
    schemas, found = openapi["components"]["schemas"], {}
    for path, methods in openapi["paths"].items():
        for method, operation in methods.items():
            for parameter in operation.get("parameters", []):
                if "department" in parameter["name"]:
                    found[f"{method.upper()} {path} {parameter['in']}"] = _patterns(parameter["schema"])
            for content in operation.get("requestBody", {}).get("content", {}).values():
                body = schemas[content["schema"]["$ref"].rsplit("/", 1)[-1]]
                for name, field in body["properties"].items():
                    if "department" in name or path == "/v1/admin/departments":
                        found[f"{method.upper()} {path} body.{name}"] = _patterns(field)
    return found


def test_every_department_name_a_request_gives_is_read_as_one(client: TestClient) -> None:
    """The OpenAPI document names each: an endpoint added later must take the same definition."""
    found = _department_inputs(client.app.openapi())  # type: ignore[attr-defined]
    expected = [f"GET {path} query" for path in DEPARTMENT_LISTS] + [
        f"{method} {POLICY.format('{department}')} path" for method in ("GET", "PUT")] + [
        "POST /v1/documents body.department", "POST /v1/admin/departments body.name",
        "POST /v1/admin/role-assignments body.department", "PUT /v1/admin/firewall-mode body.department",
        "POST /v1/admin/reindex body.department", "POST /v1/query body.departments"]
    assert set(expected) <= found.keys(), sorted(found)
    assert {key: patterns for key, patterns in found.items() if patterns != [DEPARTMENT_PATTERN]} == {}


def test_a_query_parameter_on_an_endpoint_that_takes_none_is_a_422(client: TestClient, desk: dict[str, str]) -> None:
    """`POST /v1/query?departments=x` was answered from every department the caller may read."""
    response = client.post("/v1/query?departments=x", json={"question": "When does the desk open?"},
                           headers=auth(desk["editor"]))
    assert response.status_code == 422, response.text
    assert "query.departments: unknown field" in response.json()["error"]["message"]


def test_a_query_string_as_documented_is_taken(client: TestClient, desk: dict[str, str],
                                               issue_token: Callable[..., str]) -> None:
    listed = client.get("/v1/documents", params={"department": desk["department"], "limit": 5, "status": "ready"},
                        headers=auth(desk["editor"]))
    assert listed.status_code == 200, listed.text
    documents = listed.json()["documents"]
    assert 1 <= len(documents) <= 5 and {document["status"] for document in documents} == {"ready"}, documents
    response = client.post("/v1/admin/role-assignments", headers=auth(desk["admin"]),
                           json={"subject": "cora", "role": "compliance", "department": desk["department"]})
    assert response.status_code in (200, 201), response.text  # granted, or already in place
    exported = client.get("/v1/audit/retrievals", headers=auth(issue_token("cora", [])), params={
        "department": desk["department"], "format": "csv", "since": "2026-01-01", "user": "nadia"})
    assert exported.status_code == 200, exported.text
    assert client.get("/healthz?probe=1&probe=2").status_code == 200  # probes and scrapers: left alone


def test_the_cli_export_takes_the_same_window_bounds() -> None:
    from api.cli_audit import window_bound

    assert window_bound("2026-01-01T01:00:00+01:00") == datetime(2026, 1, 1, tzinfo=UTC)
    with pytest.raises(ValueError, match="calendar"):
        window_bound("0001-01-01T00:00:00+23:59")


def test_a_backtracking_department_pattern_fails_the_document_rather_than_index_it(
        client: TestClient, desk: dict[str, str], issue_token: Callable[..., str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A department admin's `(a|aa)+c` would have stalled the worker 60 s per text, then been skipped by Presidio:
    the document indexed with what the pattern should have redacted. Now the document fails, saying why."""
    from guard import pii_rules
    from retrieval.store import open_vector_store

    monkeypatch.setattr(pii_rules, "CUSTOM_PATTERN_SECONDS", 0.2)
    department, admin = f"cases{uuid.uuid4().hex[:6]}", auth(desk["admin"])
    assert client.post("/v1/admin/departments", json={"name": department}, headers=admin).status_code == 201
    assert client.post("/v1/admin/role-assignments", headers=admin,
                       json={"subject": "nadia", "role": "editor", "department": department}).status_code == 201
    policy = {"recognizers": [{"entity": "CASE_ID", "pattern": "(a|aa)+c"}]}
    response = client.put(f"/v1/admin/departments/{department}/ingestion-policy", json=policy, headers=admin)
    assert response.status_code == 200, response.text
    uploaded = client.post("/v1/documents", headers=auth(desk["editor"]), data={"department": department},
                           files={"file": ("run.txt", f"A run of {'a' * 40} letters, case aac.".encode())})
    assert uploaded.status_code == 202, uploaded.text
    job = wait_for_job(client, desk["editor"], uploaded.json()["job_id"])
    assert job["status"] == "failed" and "CASE_ID recognizer ran past" in str(job["error"])
    assert open_vector_store(client.app.state.settings).count(department) == 0  # type: ignore[attr-defined]
