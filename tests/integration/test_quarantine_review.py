"""The quarantine review on real components: an approval covers the level reviewed, the queue shows the level the
current rules give, titles are classified and redacted by the department's current policy, and the decisions on an
e-mail's family are recorded as they happened."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from email.message import EmailMessage

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from core.db import unit_of_work
from core.models import RetrievalEvent
from tests.conftest import PLATFORM_ADMIN, auth, wait_for_attachments, wait_for_document
from tests.support.lock_waits import wait_for_a_lock_wait

PAYROLL = b"Payroll export. Social security number 536-22-8741 for the March run. The canteen menu changes."
STRICTER = {"ai_max_level": "internal", "keywords": {"canteen menu": "restricted"}}


def _department(client: TestClient, issue_token: Callable[..., str], policy: dict) -> dict[str, str]:  # type: ignore[type-arg]
    """A department with an editor and a department admin, under `policy`."""
    department = f"rv{uuid.uuid4().hex[:6]}"
    admin = issue_token(PLATFORM_ADMIN)
    assert client.post("/v1/admin/departments", json={"name": department}, headers=auth(admin)).status_code == 201
    for subject, role in (("rita", "editor"), ("rolf", "admin")):
        assert client.post("/v1/admin/role-assignments", headers=auth(admin),
                           json={"subject": subject, "role": role, "department": department}).status_code == 201
    lab = {"department": department, "admin": admin, "editor": issue_token("rita", []),
           "dept_admin": issue_token("rolf", [])}
    _set_policy(client, lab, policy)
    return lab


def _set_policy(client: TestClient, lab: dict[str, str], policy: dict) -> None:  # type: ignore[type-arg]
    response = client.put(f"/v1/admin/departments/{lab['department']}/ingestion-policy", json=policy,
                          headers=auth(lab["dept_admin"]))
    assert response.status_code == 200, response.text


def _ingest(client: TestClient, lab: dict[str, str], name: str, data: bytes, **form: str) -> dict:  # type: ignore[type-arg]
    response = client.post("/v1/documents", headers=auth(lab["editor"]), data={"department": lab["department"], **form},
                           files={"file": (name, data)})
    assert response.status_code == 202, response.text
    return wait_for_document(client, lab["editor"], response.json()["document_id"])


def _settled(client: TestClient, lab: dict[str, str], document_id: str) -> dict:  # type: ignore[type-arg]
    time.sleep(0.5)
    return wait_for_document(client, lab["editor"], document_id)


def _reindex(client: TestClient, lab: dict[str, str], document_id: str) -> dict:  # type: ignore[type-arg]
    response = client.post("/v1/admin/reindex", headers=auth(lab["dept_admin"]),
                           json={"department": lab["department"], "document_ids": [document_id]})
    assert response.status_code == 202, response.text
    return _settled(client, lab, document_id)


def _approve(client: TestClient, lab: dict[str, str], document_id: str) -> dict:  # type: ignore[type-arg]
    response = client.post(f"/v1/admin/quarantine/{document_id}/approve", headers=auth(lab["dept_admin"]))
    assert response.status_code == 200, response.text
    return _settled(client, lab, document_id)


def test_an_approval_covers_only_the_level_reviewed(client: TestClient, issue_token: Callable[..., str]) -> None:
    """An approval was permanent: a document approved at confidential, re-indexed under a policy that makes it
    restricted, was released at restricted with no new review. It is now held for review again."""
    lab = _department(client, issue_token, {"ai_max_level": "internal"})
    doc = _ingest(client, lab, "payroll.txt", PAYROLL, classification="public")
    assert doc["status"] == "quarantined" and doc["classification"] == "confidential"
    released = _approve(client, lab, doc["document_id"])
    assert released["status"] == "ready" and released["classification"] == "confidential"
    again = _reindex(client, lab, doc["document_id"])  # at the same level the approval still holds
    assert again["status"] == "ready", again
    _set_policy(client, lab, STRICTER)
    again = _reindex(client, lab, doc["document_id"])
    assert again["classification"] == "restricted"
    assert again["status"] == "quarantined", again
    assert "rose since its approval at confidential" in again["review_reason"]
    released = _approve(client, lab, doc["document_id"])  # a new review, of the level shown, releases it
    assert (released["status"], released["classification"]) == ("ready", "restricted")


def test_the_review_queue_shows_the_level_an_approval_releases(client: TestClient,
                                                               issue_token: Callable[..., str]) -> None:
    """A re-index skipped quarantined documents: after a stricter policy the queue still showed confidential, and
    approving what it showed released the document at restricted. The re-index now classifies them again."""
    lab = _department(client, issue_token, {"ai_max_level": "internal"})
    doc = _ingest(client, lab, "payroll2.txt", PAYROLL, classification="public")
    assert doc["status"] == "quarantined" and doc["classification"] == "confidential"
    _set_policy(client, lab, STRICTER)
    response = client.post("/v1/admin/reindex", headers=auth(lab["dept_admin"]), json={"department": lab["department"]})
    assert response.status_code == 202 and response.json()["skipped"] == [], response.text
    assert _settled(client, lab, doc["document_id"])["status"] == "quarantined"
    queue = client.get("/v1/admin/quarantine", params={"department": lab["department"]},
                       headers=auth(lab["dept_admin"]))
    shown = {item["document_id"]: item["classification"] for item in queue.json()}[doc["document_id"]]
    assert shown == "restricted"
    released = _approve(client, lab, doc["document_id"])
    assert (released["status"], released["classification"]) == ("ready", shown)


def test_a_restricted_keyword_in_the_title_raises_the_level(client: TestClient,
                                                            issue_token: Callable[..., str]) -> None:
    """Only chunk texts were matched against the department's keywords: a document titled with a restricted topic
    stayed public and its title was listed to readers of the default (internal) clearance."""
    lab = _department(client, issue_token, {"ai_max_level": "restricted", "keywords": {"project falcon": "restricted"}})
    doc = _ingest(client, lab, "plan.txt", b"The canteen opens at eight and closes at three on weekdays.",
                  title="Project Falcon acquisition plan", classification="public")
    assert (doc["status"], doc["classification"]) == ("ready", "restricted"), doc
    assert doc["classification_reasons"] == ["keyword 'project falcon'"]
    assert client.post("/v1/admin/role-assignments", headers=auth(lab["admin"]),
                       json={"subject": "ivo", "role": "reader", "department": lab["department"]}).status_code == 201
    listing = client.get("/v1/documents", params={"department": lab["department"]}, headers=auth(issue_token("ivo")))
    assert listing.status_code == 200 and "Falcon" not in listing.text, listing.text[:300]


def test_a_redaction_rule_added_later_reaches_the_title_at_the_next_run(
        client: TestClient, issue_token: Callable[..., str]) -> None:
    """Titles were redacted only at upload: after a department added a recognizer, a re-index redacted the text
    but left the value in the title, listed to every reader. Each run now applies the current rules to it."""
    lab = _department(client, issue_token, {})
    code = "PRJ-482913"
    doc = _ingest(client, lab, "notes.txt", f"The budget of {code} was agreed on Monday.".encode(),
                  title=f"Budget review {code}")
    assert doc["status"] == "ready" and code in doc["title"]
    _set_policy(client, lab, {"recognizers": [{"entity": "PROJECT_CODE", "pattern": r"\bPRJ-\d{6}\b",
                                               "checksum": "none"}]})
    again = _reindex(client, lab, doc["document_id"])
    assert again["status"] == "ready" and again["title"] == "Budget review <PROJECT_CODE>", again
    listing = client.get("/v1/documents", params={"department": lab["department"]}, headers=auth(lab["editor"]))
    assert listing.status_code == 200 and code not in listing.text


def _falcon_mail() -> bytes:
    """An e-mail with a restricted keyword, and an attachment."""
    message = EmailMessage()
    message["From"], message["To"], message["Subject"] = "ana@example.com", "ben@example.com", "falcon"
    message.set_content("Notes on project falcon for the board. " + uuid.uuid4().hex)
    message.add_attachment(b"The weekend rota: Leeds desk on Saturday. " + uuid.uuid4().hex.encode(),
                           maintype="text", subtype="plain", filename="rota.txt")
    return message.as_bytes()


def _quarantined_mail(client: TestClient, lab: dict[str, str], data: bytes | None = None) -> tuple[str, str]:
    """An e-mail (`_falcon_mail`, unless given) quarantined for a restricted keyword, and its attachment (declared at
    the e-mail's level)."""
    mail = _ingest(client, lab, "falcon.eml", data or _falcon_mail())
    assert mail["status"] == "quarantined"
    (child_id,) = wait_for_attachments(client, lab["editor"], mail["document_id"])["attachment_ids"]
    assert wait_for_document(client, lab["editor"], child_id)["status"] == "quarantined"
    return mail["document_id"], child_id


def _decisions(settings, document_id: str) -> list[dict]:  # type: ignore[no-untyped-def, type-arg]
    with unit_of_work(settings.resolved_database_url) as session:
        return [event.details for event in session.scalars(select(RetrievalEvent).where(
            RetrievalEvent.event_type == "quarantine_decision")) if event.details.get("document_id") == document_id]


FALCON = {"ai_max_level": "internal", "keywords": {"project falcon": "restricted"}}


def test_an_approval_of_a_document_that_left_quarantine_meanwhile_is_refused(
        client: TestClient, issue_token: Callable[..., str], settings,  # type: ignore[no-untyped-def]
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The approval ignored that its conditional update moved nothing: a document a re-index queued between the
    check and the update got a 200 "queued" with a job that does not exist, and a ledger row saying it was
    released. It is now refused like any other review that finds the document gone from the queue."""
    from ingestion import quarantine

    lab = _department(client, issue_token, FALCON)
    doc = _ingest(client, lab, "f.txt", b"Notes on project falcon. " + uuid.uuid4().hex.encode())
    assert doc["status"] == "quarantined"
    real_approve = quarantine.approve

    def reindexed_meanwhile(**kwargs):  # type: ignore[no-untyped-def]
        response = client.post("/v1/admin/reindex", headers=auth(lab["dept_admin"]),
                               json={"department": lab["department"], "document_ids": [doc["document_id"]]})
        assert response.status_code == 202 and response.json()["skipped"] == [], response.text
        return real_approve(**kwargs)

    monkeypatch.setattr(quarantine, "approve", reindexed_meanwhile)
    approved = client.post(f"/v1/admin/quarantine/{doc['document_id']}/approve", headers=auth(lab["dept_admin"]))
    monkeypatch.undo()
    assert approved.status_code == 404, approved.text
    assert _decisions(settings, doc["document_id"]) == []
    assert _settled(client, lab, doc["document_id"])["status"] == "quarantined"  # the re-index's run held it again


def test_a_rejection_of_an_email_waits_for_a_review_of_its_attachment(
        client: TestClient, issue_token: Callable[..., str], settings,  # type: ignore[no-untyped-def]
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A review locked only the attachment's id, a rejection the e-mail's: the e-mail's rejection shredded the
    attachment in the middle of its approval, which answered 200 "queued" and recorded a release that never
    happened. The rejection now waits for the approval, then takes the approved attachment with the e-mail."""
    from ingestion import quarantine

    lab = _department(client, issue_token, FALCON)
    mail_id, child_id = _quarantined_mail(client, lab)
    real_approve = quarantine.approve
    rejected: list = []  # type: ignore[type-arg]
    waited: list[bool] = []
    threads: list[threading.Thread] = []

    def email_rejected_meanwhile(**kwargs):  # type: ignore[no-untyped-def]
        rejection = threading.Thread(target=lambda: rejected.append(client.post(
            f"/v1/admin/quarantine/{mail_id}/reject", headers=auth(issue_token(PLATFORM_ADMIN)))))
        rejection.start()
        rejection.join(timeout=1.5)
        waited.append(rejection.is_alive())
        threads.append(rejection)
        return real_approve(**kwargs)

    monkeypatch.setattr(quarantine, "approve", email_rejected_meanwhile)
    approved = client.post(f"/v1/admin/quarantine/{child_id}/approve", headers=auth(lab["dept_admin"]))
    monkeypatch.undo()
    threads[0].join(timeout=60)
    assert waited == [True], "the e-mail's rejection went ahead during the attachment's review"
    assert approved.status_code == 200 and rejected[0].status_code == 200, (approved.text, rejected[0].text)
    assert [d["decision"] for d in _decisions(settings, child_id)] == ["approved"]
    assert _settled(client, lab, child_id)["status"] == "rejected"  # taken with its e-mail after the approval
    (rejection,) = _decisions(settings, mail_id)
    assert rejection["decision"] == "rejected" and set(rejection["retired"]) == {mail_id, child_id}


def test_rejecting_an_email_names_the_attachments_it_shredded_in_the_ledger(
        client: TestClient, issue_token: Callable[..., str], settings) -> None:  # type: ignore[no-untyped-def]
    """A DELETE's ledger row names every id it retired; the rejection of an e-mail, which shreds its attachments
    too, named only the e-mail (and an approval read "queued")."""
    lab = _department(client, issue_token, FALCON)
    mail_id, child_id = _quarantined_mail(client, lab)
    response = client.post(f"/v1/admin/quarantine/{mail_id}/reject", headers=auth(lab["dept_admin"]))
    assert response.status_code == 200, response.text
    assert client.get(f"/v1/documents/{child_id}", headers=auth(lab["editor"])).json()["status"] == "rejected"
    (row,) = _decisions(settings, mail_id)
    assert row == {"document_id": mail_id, "decision": "rejected", "retired": sorted([mail_id, child_id])}, row


def test_a_rejection_of_an_attachment_that_another_rejection_took_meanwhile_is_refused(
        client: TestClient, issue_token: Callable[..., str], settings) -> None:  # type: ignore[no-untyped-def]
    """A rejection takes the failed copies of its content and what is attached below them without their locks
    (ingestion/purge.py): a review of such an attachment that had found it quarantined then found it rejected by the
    other rejection, and rejected it again: a 200 and a second ledger row. It is now refused, as after another
    review."""
    from sqlalchemy import update

    from core.errors import ErrorCode, GovragError
    from core.models import Document
    from ingestion import quarantine

    lab = _department(client, issue_token, FALCON)
    data = _falcon_mail()
    failed_id, child_id = _quarantined_mail(client, lab, data)
    with unit_of_work(settings.resolved_database_url) as session:  # as a re-index whose runs all failed leaves it
        session.execute(update(Document).where(Document.id == failed_id).values(status="failed"))
    copy = _ingest(client, lab, "falcon-again.eml", data)  # the same bytes: a failed document is no duplicate
    assert copy["status"] == "quarantined"
    wait_for_attachments(client, lab["editor"], copy["document_id"])
    with unit_of_work(settings.resolved_database_url) as session:
        review = quarantine.quarantined_document(session=session, document_id=child_id, can_see=lambda _: True)
        rejected = client.post(f"/v1/admin/quarantine/{copy['document_id']}/reject", headers=auth(lab["dept_admin"]))
        with pytest.raises(GovragError) as refused:
            quarantine.reject(session=session, settings=settings, document=review)
    assert rejected.status_code == 200, rejected.text
    assert refused.value.code == ErrorCode.not_found
    assert {failed_id, child_id} <= set(_decisions(settings, copy["document_id"])[0]["retired"])
    assert _settled(client, lab, child_id)["status"] == "rejected"


def test_a_rejection_of_an_attachment_that_a_deletion_is_taking_is_refused_once_the_deletion_commits(
        client: TestClient, issue_token: Callable[..., str], settings) -> None:  # type: ignore[no-untyped-def]
    """A deletion takes the failed copies of its content and what is attached below them without their locks
    (ingestion/purge.py). A review of such an attachment that read it quarantined while the deletion had retired it
    but not committed then waited for its row, and rejected the deleted attachment once the deletion committed:
    a 200, a "rejected" decision, the attachment moved from deleted to rejected and its purge owed again. The
    rejection's conditional write now finds it deleted and it is refused, as after another review."""
    from sqlalchemy import update

    from core.models import Document, PendingPurge
    from ingestion import purge
    from ingestion import service as ingestion_service

    lab = _department(client, issue_token, FALCON)
    data = _falcon_mail()
    failed_id, child_id = _quarantined_mail(client, lab, data)
    with unit_of_work(settings.resolved_database_url) as session:  # as a re-index whose runs all failed leaves it
        session.execute(update(Document).where(Document.id == failed_id).values(status="failed"))
    copy_id = _ingest(client, lab, "falcon-again.eml", data)["document_id"]  # a failed document is no duplicate
    (copy_child_id,) = wait_for_attachments(client, lab["editor"], copy_id)["attachment_ids"]
    wait_for_document(client, lab["editor"], copy_child_id)
    # deleted, its hash forgotten: the copy's deletion locks no content of the attachment (as when an e-mail is
    # deleted before its attachments are taken)
    deleted = client.delete(f"/v1/documents/{copy_child_id}", headers=auth(lab["editor"]))
    assert deleted.status_code == 204, deleted.text
    rejected: list = []  # type: ignore[type-arg]
    rejection = threading.Thread(target=lambda: rejected.append(client.post(
        f"/v1/admin/quarantine/{child_id}/reject", headers=auth(lab["dept_admin"]))))
    with unit_of_work(settings.resolved_database_url) as deletion:
        _, retired, _ = ingestion_service.delete_document(session=deletion, settings=settings, document_id=copy_id,
                                                          can_delete=lambda _: True)
        owed = deletion.get(PendingPurge, child_id).retired_at  # type: ignore[union-attr]
        rejection.start()  # reads the attachment quarantined: the deletion has not committed
        assert wait_for_a_lock_wait(settings.resolved_database_url, rejection) is not None
    rejection.join(timeout=60)
    with unit_of_work(settings.resolved_database_url) as session:
        status = session.get(Document, child_id).status  # type: ignore[union-attr]
        purges = list(session.scalars(select(PendingPurge.retired_at).where(PendingPurge.document_id == child_id)))
    purge.purge_now(settings, retired)  # what the deletion's request does once committed
    assert {failed_id, child_id} <= set(retired)
    assert not rejection.is_alive() and rejected[0].status_code == 404, rejected[0].text
    assert rejected[0].json()["error"]["message"] == "no such quarantined document"
    assert (status, purges, _decisions(settings, child_id)) == ("deleted", [owed], [])


def test_the_ledger_still_verifies(client: TestClient, issue_token: Callable[..., str]) -> None:
    response = client.get("/v1/audit/verify", headers=auth(issue_token(PLATFORM_ADMIN)))
    assert response.status_code == 200 and response.json()["ok"], response.text
