"""PII and document text in metadata and logs: titles (from the upload form, a file name, an attachment's name) are
redacted before they are stored, a deleted document's row keeps nothing that names or confirms it, and parser
libraries log no document text at DEBUG."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from pathlib import Path

import psycopg
import pytest
from fastapi.testclient import TestClient

from bench.common import libpq_dsn
from core.logs import JsonFormatter, MaskingFilter
from guard.redteam import _raw_pii
from ingestion.service import MAX_TITLE_CHARS
from tests.conftest import (
    PLATFORM_ADMIN,
    auth,
    damaged_doc,
    wait_for_attachments,
    wait_for_document,
    wait_for_job,
)
from tests.support.polling import wait_until

DEPARTMENT = "pii"
EMAIL = "maria.gonzalez@example.com"
CARD = "4111 1111 1111 1111"
SSN = "078-05-1120"
BODY = ("Bonus memo\n\nThe quarterly bonus pool for the Lisbon platform squad is eleven thousand euros. "
        f"Maria Gonzalez approved it. Questions go to {EMAIL}.\n")
PII_FILENAME = f"Payslip Maria Gonzalez {EMAIL}.txt"
SAMPLES = Path("/work/shared/eval/enterprise_docs_ingestion/unstructured_example_docs")


def _upload(client: TestClient, token: str, filename: str, data: bytes, **form: str) -> dict:
    response = client.post("/v1/documents", headers=auth(token), data={"department": DEPARTMENT, **form},
                           files={"file": (filename, data)})
    assert response.status_code == 202, response.text
    return response.json()  # type: ignore[no-any-return]


def _ingest(client: TestClient, token: str, filename: str, data: bytes, **form: str) -> dict:
    accepted = _upload(client, token, filename, data, **form)
    assert wait_for_job(client, token, accepted["job_id"])["status"] in ("ready", "quarantined")
    return client.get(f"/v1/documents/{accepted['document_id']}", headers=auth(token)).json()  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def world(client: TestClient, issue_token: Callable[..., str]) -> dict:
    admin = issue_token(PLATFORM_ADMIN)
    assert client.post("/v1/admin/departments", json={"name": DEPARTMENT}, headers=auth(admin)).status_code == 201
    for subject, role in [("group:pii-editors", "editor"), ("group:pii-readers", "reader")]:
        response = client.post("/v1/admin/role-assignments", headers=auth(admin),
                               json={"subject": subject, "role": role, "department": DEPARTMENT})
        assert response.status_code == 201, response.text
    editor, reader = issue_token("ed", ["pii-editors"]), issue_token("rita", ["pii-readers"])
    memo = _ingest(client, editor, PII_FILENAME, BODY.encode())
    assert memo["status"] == "ready"
    return {"editor": editor, "reader": reader, "memo": memo["document_id"]}


def _rows_with(settings, markers: list[str]) -> list[tuple[str, str]]:  # type: ignore[no-untyped-def]
    """(table, marker) for every marker found in any row of any table, read as JSON; not in the ingestion policies,
    which hold what admins typed (another test's allow list names "Maria Gonzalez" in this session's database)."""
    dsn = libpq_dsn(settings.resolved_database_url)
    found = []
    with psycopg.connect(dsn) as conn:
        tables = [r[0] for r in conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema='public'").fetchall()]
        for table in (t for t in tables if t != "ingestion_policies"):
            for (row,) in conn.execute(f'SELECT row_to_json(t)::text FROM "{table}" t').fetchall():  # noqa: S608
                found += [(table, marker) for marker in markers if marker in row]
    return sorted(set(found))


def test_a_citation_title_from_a_file_name_holds_no_raw_pii(client: TestClient, world: dict) -> None:
    response = client.post("/v1/query", headers=auth(world["reader"]),
                           json={"question": "How large is the quarterly bonus pool for the Lisbon squad?"})
    assert response.status_code == 200, response.text
    cited = [c for c in response.json()["citations"] if c["document_id"] == world["memo"]]
    assert cited, response.json()
    assert EMAIL not in cited[0]["snippet"]
    assert _raw_pii(cited[0]["title"]) == [], cited[0]["title"]  # the red-team check, on the title
    assert "<EMAIL_ADDRESS>.txt" in cited[0]["title"] and "Gonzalez" not in cited[0]["title"], cited[0]["title"]


def test_the_listing_and_status_show_a_reader_the_redacted_title(client: TestClient, world: dict) -> None:
    response = client.get("/v1/documents", params={"department": DEPARTMENT}, headers=auth(world["reader"]))
    assert response.status_code == 200
    titles = [d["title"] for d in response.json()["documents"] if d["document_id"] == world["memo"]]
    status = client.get(f"/v1/documents/{world['memo']}", headers=auth(world["reader"])).json()
    assert titles == [status["title"]], (titles, status["title"])
    assert "<EMAIL_ADDRESS>.txt" in status["title"] and "Gonzalez" not in status["title"], status["title"]


def test_the_training_export_marked_redacted_holds_no_raw_title(client: TestClient, world: dict, settings) -> None:  # type: ignore[no-untyped-def]
    from audit.training import department_payloads, export_sources, training_rows
    from core.db import unit_of_work

    payloads = department_payloads(settings, DEPARTMENT)
    with unit_of_work(settings.resolved_database_url) as session:
        sources = export_sources(session=session, settings=settings, department=DEPARTMENT, payloads=payloads)
        rows = [r for r in training_rows(sources) if r["document_id"] == world["memo"]]
    assert rows and all(EMAIL not in r["text"] for r in rows)
    assert all(EMAIL not in r["title"] and "Gonzalez" not in r["title"] for r in rows), rows[0]["title"]


def test_a_title_given_by_the_uploader_is_redacted_too(client: TestClient, world: dict, settings) -> None:  # type: ignore[no-untyped-def]
    document = _ingest(client, world["editor"], "parking.txt", b"Parking rules\n\nThe garage closes at nine.\n",
                       title=f"Parking for Ignatius Worthington ({EMAIL})")
    assert document["title"] == "Parking for <PERSON> (<EMAIL_ADDRESS>)", document["title"]
    assert _rows_with(settings, ["Worthington"]) == []


def test_a_title_ending_in_an_address_reaches_readers_redacted(client: TestClient, world: dict, settings) -> None:  # type: ignore[no-untyped-def]
    """The address's `.com` was read as a file extension and the address dropped: the title was stored as given."""
    document = _ingest(client, world["editor"], "claim.txt", b"Claim\n\nThe taxi fare was paid back in May.\n",
                       title=f"Claim of {EMAIL}")
    listed = client.get("/v1/documents", params={"department": DEPARTMENT}, headers=auth(world["reader"])).json()
    assert [d["title"] for d in listed["documents"] if d["document_id"] == document["document_id"]] == \
        ["Claim of <EMAIL_ADDRESS>"], document["title"]
    assert _rows_with(settings, [EMAIL]) == []


def test_a_card_number_in_a_title_raises_the_document(client: TestClient, world: dict, settings) -> None:  # type: ignore[no-untyped-def]
    """The title's card number is redacted, and counted: the document's level decides who sees its title."""
    document = _ingest(client, world["editor"], f"Card {CARD} refund.txt",
                       b"Refund note\n\nThe refund for the conference ticket was paid back in March.\n")
    assert document["title"] == "Card <CREDIT_CARD> refund.txt"
    assert document["classification"] == "confidential" and document["declared_classification"] == "internal"
    assert document["classification_reasons"] == ["credit_card x1"]
    assert _rows_with(settings, [CARD]) == []


@pytest.mark.parametrize("length", [292, 500])
def test_a_card_number_at_the_end_of_a_long_file_name_still_raises_the_document(
        client: TestClient, world: dict, settings, length: int) -> None:  # type: ignore[no-untyped-def]
    """A title is cut to 300 characters after redaction: the cut split `<CREDIT_CARD>` (at 292) or dropped it (at
    500), and the level no longer counted the card."""
    prefix = ("Quarterly expense report for the travel desk " * 12)[:length].rstrip() + " "
    document = _ingest(client, world["editor"], f"{prefix}{CARD} receipt.txt",
                       f"Receipt {length}\n\nThe airport taxi was paid by the traveller.\n".encode())
    assert len(document["title"]) <= MAX_TITLE_CHARS and "<CREDIT_CARD>" in document["title"], document["title"]
    assert document["classification"] == "confidential", document["title"][-40:]
    assert document["classification_reasons"] == ["credit_card x1"]


def _mail_with_attachments(attachments: list[tuple[str, bytes, str, str]]) -> bytes:
    message = EmailMessage()
    message["From"], message["To"], message["Subject"] = "hr@example.com", "payroll@example.com", "Quarterly payslips"
    message.set_content("Please find the payslips attached. Regards, HR.")
    for name, payload, maintype, subtype in attachments:
        message.add_attachment(payload, maintype=maintype, subtype=subtype, filename=name)
    return message.as_bytes()


def test_attachment_names_reach_readers_redacted_taken_or_refused(client: TestClient, world: dict,
                                                                 settings) -> None:  # type: ignore[no-untyped-def]
    """An attachment's name comes from inside the uploaded file: taken or refused, its title is redacted."""
    taken, refused = f"Payslip John Smith SSN {SSN}.txt", f"Appraisal {EMAIL}.doc"
    mail = _upload(client, world["editor"], "payslips.eml", _mail_with_attachments([
        (taken, b"Payslip for the quarter: base salary and bonus as agreed.\n", "text", "plain"),
        (refused, damaged_doc(), "application", "msword")]))
    assert wait_for_document(client, world["editor"], mail["document_id"])["status"] == "ready"
    child_ids = wait_for_attachments(client, world["editor"], mail["document_id"])["attachment_ids"]
    children = [wait_for_document(client, world["editor"], child_id) for child_id in child_ids]
    assert sorted(child["status"] for child in children) == ["failed", "ready"], children
    titles = sorted(child["title"] for child in children)
    assert titles[0] == "payslips.eml / Appraisal <EMAIL_ADDRESS>.doc", titles
    assert titles[1].startswith("payslips.eml / Payslip <PERSON> SSN <") and SSN not in titles[1], titles
    assert _rows_with(settings, [SSN, "John Smith", EMAIL]) == []


def test_no_raw_pii_from_a_title_in_any_database_column(client: TestClient, world: dict, settings) -> None:  # type: ignore[no-untyped-def]
    assert _rows_with(settings, [EMAIL, "Gonzalez", "eleven thousand euros"]) == []


def test_deleting_a_document_leaves_nothing_that_names_or_confirms_it(client: TestClient, world: dict,
                                                                      settings) -> None:  # type: ignore[no-untyped-def]
    """Crypto-shred took the bytes but the row kept the title and the original's sha256: the row now keeps its id,
    department, status and times only, and the same bytes uploaded again are a new document, not a duplicate."""
    data = b"Dismissal letter\n\nThe contract of the night porter ends on the last day of June.\n"
    document = _ingest(client, world["editor"], "Dismissal letter night porter.txt", data)
    assert client.delete(f"/v1/documents/{document['document_id']}", headers=auth(world["editor"])).status_code == 204
    digest = hashlib.sha256(data).hexdigest()
    assert _rows_with(settings, ["night porter", digest]) == []
    dsn = libpq_dsn(settings.resolved_database_url)
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT title, sha256, size_bytes, content_type, department, status FROM documents "
                           "WHERE id = %s", (document["document_id"],)).fetchone()
    assert row == ("(deleted)", "", 0, "", DEPARTMENT, "deleted")
    again = _ingest(client, world["editor"], "Dismissal letter night porter.txt", data)
    assert again["status"] == "ready" and again["document_id"] != document["document_id"]


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.setFormatter(JsonFormatter())
        self.addFilter(MaskingFilter())

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture
def debug_logs() -> Iterator[_Capture]:
    """GOVRAG_LOG_LEVEL=DEBUG: the root logger at DEBUG, output through the masking filter and JSON formatter."""
    root, capture = logging.getLogger(), _Capture()
    level = root.level
    root.setLevel(logging.DEBUG)
    root.addHandler(capture)
    yield capture
    root.removeHandler(capture)
    root.setLevel(level)


def test_debug_logs_hold_no_pdf_text(client: TestClient, world: dict, debug_logs: _Capture) -> None:
    """pdfminer logged each token of the text it parsed, Presidio the words around each PII match."""
    document = _ingest(client, world["editor"], "memo.pdf", (SAMPLES / "pdf" / "fake-memo.pdf").read_bytes())
    # The capture sees the worker's lines; its last is written once the document's status is, which the test read.
    ingested = f"ingested document {document['document_id']}"
    wait_until(lambda: any(ingested in line for line in debug_logs.lines), 60, f"the worker's line {ingested!r}")
    leaked = [line for line in debug_logs.lines if "bottles of water" in line or "laptops" in line]
    assert not leaked, leaked[0][:300]


def test_debug_logs_hold_no_text_document_sentences(client: TestClient, world: dict, debug_logs: _Capture) -> None:
    """unstructured's trace logger logged the text of the elements it sorted."""
    text = ("Leave memo\n\nThe parental leave of Theodora Blackwood-Finch starts on the ninth of May. "
            "Her replacement is the Oslo treasury desk.\n\nRegards,\nTheodora Blackwood\n")
    _ingest(client, world["editor"], "leave.txt", text.encode())
    leaked = [line for line in debug_logs.lines if "Blackwood" in line or "Oslo treasury" in line]
    assert not leaked, leaked[0][:300]


def test_debug_logs_hold_no_raw_question(client: TestClient, world: dict, debug_logs: _Capture) -> None:
    question = "Does Zebediah Quorndon-Pike get the quarterly bonus pool for the Lisbon squad?"
    response = client.post("/v1/query", headers=auth(world["reader"]), json={"question": question})
    assert response.status_code == 200
    leaked = [line for line in debug_logs.lines if "Quorndon" in line]
    assert not leaked, leaked[0][:300]
