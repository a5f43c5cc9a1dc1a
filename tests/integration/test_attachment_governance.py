"""An e-mail's attachments are governed as the e-mail is: a re-index that raises the e-mail raises every attachment
below it, in the database and in the vector store, so no attachment's content is served to a reader the e-mail is
now hidden from. Both databases, the memory broker and no worker: each job runs as a worker runs it (its run, then
the e-mail's attachment step), when the test says."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from kombu.transport import memory

from tests.conftest import PLATFORM_ADMIN, auth, desk_member
from tests.support.mail import mail as _mail


@dataclass(frozen=True)
class Desk:
    client: TestClient
    settings: Any
    admin: dict[str, str]
    editor: str
    reader: str  # the default clearance: internal
    cleared: str  # confidential


@pytest.fixture(params=["postgresql", "sqlite"])
def desk(request: pytest.FixtureRequest, make_pg_database: Callable[[], str], tmp_path: Path) -> Iterator[Desk]:
    """The department `desk`: its editor, a reader and a reader cleared for confidential."""
    from api.app import create_app
    from core import migrate
    from core.settings import Settings
    from retrieval.store import close_vector_store

    url = make_pg_database() if request.param == "postgresql" else f"sqlite:///{tmp_path / 'govrag.db'}"
    migrate.upgrade(url)
    settings = Settings(data_dir=tmp_path / "data", database_url=url, admins=[PLATFORM_ADMIN], broker_url="memory://",
                        inprocess_worker=False, job_sweep_seconds=0,
                        task_queue=f"govrag-attached-{uuid.uuid4().hex[:8]}")
    with TestClient(create_app(settings)) as client:
        issuer = client.app.state.dev_issuer  # type: ignore[attr-defined]
        admin = auth(issuer.issue(PLATFORM_ADMIN, []))
        editor = desk_member(client, "editor")
        for subject, level in (("rita", None), ("cora", "confidential")):
            assert client.post("/v1/admin/role-assignments", headers=admin,
                               json={"subject": subject, "role": "reader", "department": "desk"}).status_code == 201
            if level is not None:
                assert client.put("/v1/admin/clearances", headers=admin, json={
                    "subject": subject, "department": "desk", "level": level}).status_code == 200
        yield Desk(client, settings, admin, editor, issuer.issue("rita", []), issuer.issue("cora", []))
    close_vector_store(settings)
    memory.Channel.queues.pop(settings.task_queue, None)  # the jobs this test ran itself


def _work(settings: Any, jobs: list[tuple[str, str]]) -> None:
    """Run each job as a worker does (workers/tasks.py): the run, then the attachment step, and the jobs they queued."""
    from ingestion import service

    for document_id, job_id in jobs:
        raised = service.run_ingestion(settings=settings, document_id=document_id, job_id=job_id)
        step = service.spawn_attachments(settings=settings, document_id=document_id)
        _work(settings, [(accepted.document_id, accepted.job_id) for accepted in (*raised, *step)])


def _documents(desk: Desk) -> dict[str, dict[str, Any]]:
    """The department's documents as its editor sees them, by title."""
    listed = desk.client.get("/v1/documents", headers=auth(desk.editor), params={"department": "desk"})
    assert listed.status_code == 200, listed.text
    return {document["title"]: document for document in listed.json()["documents"]}


def _cited(desk: Desk, token: str, question: str) -> tuple[set[str], str]:
    """The documents an answer cites, and the whole response as text."""
    response = desk.client.post("/v1/query", headers=auth(token), json={"question": question, "departments": ["desk"]})
    assert response.status_code == 200, response.text
    return {citation["document_id"] for citation in response.json()["citations"]}, response.text


def _upload(desk: Desk, title: str, mail: EmailMessage) -> str:
    """Upload the e-mail as the editor and run its jobs; its id."""
    uploaded = desk.client.post("/v1/documents", headers=auth(desk.editor), data={"department": "desk", "title": title},
                                files={"file": (f"{title}.eml", mail.as_bytes())})
    assert uploaded.status_code == 202, uploaded.text
    _work(desk.settings, [(uploaded.json()["document_id"], uploaded.json()["job_id"])])
    return str(uploaded.json()["document_id"])


def _reindex(desk: Desk, keywords: dict[str, str], email_id: str) -> None:
    """Mark the keywords, then re-index the e-mail and run its jobs."""
    policy = desk.client.put("/v1/admin/departments/desk/ingestion-policy", headers=desk.admin,
                             json={"keywords": keywords})
    assert policy.status_code == 200, policy.text
    reindexed = desk.client.post("/v1/admin/reindex", headers=desk.admin,
                                 json={"department": "desk", "document_ids": [email_id]})
    assert reindexed.status_code == 202, reindexed.text
    _work(desk.settings, [(email_id, job_id) for job_id in reindexed.json()["queued"]])


def test_a_reindex_that_raises_an_email_raises_its_attachments(desk: Desk) -> None:
    """The e-mail's body names a project a new department keyword marks confidential; its attachments (a note, and
    a forwarded e-mail with a note of its own) say nothing of it. A re-index naming the e-mail raised the e-mail
    alone: the attachments kept the level they were taken at (internal), and their content went on being served to
    a reader of internal clearance, who may no longer see the e-mail (only the citation's title was withheld).
    Now the e-mail's run raises each attachment below it to its level and runs it again (withheld meanwhile): its
    points are written at that level, served to a reader cleared for it, never to the others."""
    from retrieval.store import open_vector_store

    marker = f"heron{uuid.uuid4().hex[:6]}"
    forwarded = _mail("Rota", "The rota is attached.", [("rota.txt", b"The Leeds desk opens on Saturdays at eight.")])
    mail = _mail("Restructuring", f"Notes on project {marker}.",
                 [("desk.txt", b"The Porto desk opens on weekdays at ten."), ("thread.eml", forwarded)])
    email_id = _upload(desk, "Restructuring", mail)
    taken = {title: document for title, document in _documents(desk).items() if document["parent_id"] is not None}
    assert len(taken) == 3 and {document["classification"] for document in taken.values()} == {"internal"}
    porto, leeds = (next(document["document_id"] for title, document in taken.items() if title.endswith(name))
                    for name in ("/ desk.txt", "/ rota.txt"))
    for question, attachment in (("When does the Porto desk open?", porto),
                                 ("When does the Leeds desk open on Saturdays?", leeds)):
        assert attachment in _cited(desk, desk.reader, question)[0]  # before: the reader may read it

    _reindex(desk, {f"project {marker}": "confidential"}, email_id)

    for question, attachment, text in (("When does the Porto desk open?", porto, "weekdays at ten"),
                                       ("When does the Leeds desk open on Saturdays?", leeds, "Saturdays at eight")):
        cited, response = _cited(desk, desk.reader, question)
        assert attachment not in cited and text not in response  # the e-mail is hidden from them: so is its content
        assert attachment in _cited(desk, desk.cleared, question)[0]  # served to whoever may see the e-mail
    documents = _documents(desk)
    assert documents["Restructuring"]["classification"] == "confidential"
    for title in taken:
        assert (documents[title]["status"], documents[title]["classification"]) == ("ready", "confidential")
    points = [payload for payload in open_vector_store(desk.settings).scroll_payloads("desk")
              if payload["document_id"] in {document["document_id"] for document in taken.values()}]
    assert points and {payload["classification"] for payload in points} == {"confidential"}


def test_content_two_emails_carry_follows_the_email_it_was_taken_under(desk: Desk) -> None:
    """A file two e-mails carry is taken once, under the first (the second's copy is refused as a duplicate). A
    re-index raising the second raises its refused copy (a record) and leaves the content at the first's level: a
    reader who may see the first may read it as its attachment. A re-index raising the first raises the content."""
    first, second = f"ibis{uuid.uuid4().hex[:6]}", f"crane{uuid.uuid4().hex[:6]}"
    rota = b"The Lisbon desk opens on Sundays at nine."
    first_id = _upload(desk, "First", _mail("First", f"Notes on project {first}.", [("rota.txt", rota)]))
    second_id = _upload(desk, "Second", _mail("Second", f"Notes on project {second}.", [("rota.txt", rota)]))
    copies = {document["parent_id"]: document for document in _documents(desk).values()
              if document["title"].endswith("/ rota.txt")}
    taken, refused = copies[first_id], copies[second_id]
    assert (taken["status"], refused["status"]) == ("ready", "failed")
    question = "When does the Lisbon desk open on Sundays?"

    _reindex(desk, {f"project {second}": "confidential"}, second_id)
    documents = {document["document_id"]: document for document in _documents(desk).values()}
    levels = {document_id: documents[document_id]["classification"]
              for document_id in (first_id, taken["document_id"], second_id, refused["document_id"])}
    assert list(levels.values()) == ["internal", "internal", "confidential", "confidential"]
    assert taken["document_id"] in _cited(desk, desk.reader, question)[0]  # as the first e-mail's attachment

    _reindex(desk, {f"project {second}": "confidential", f"project {first}": "confidential"}, first_id)
    assert taken["document_id"] not in _cited(desk, desk.reader, question)[0]
    assert taken["document_id"] in _cited(desk, desk.cleared, question)[0]
