"""An e-mail's attachments are governed as the e-mail is: a re-index that raises the e-mail raises every attachment
below it, in the database and in the vector store, so no attachment's content is served to a reader the e-mail is
now hidden from. Both databases, the memory broker and no worker: each job sent is taken from the broker and run
by the worker's task (workers/tasks.py: its run, the jobs its end queued sent, then the e-mail's attachment step),
when the test says."""

from __future__ import annotations

import base64
import json
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
from tests.support.task_retries import task_at_retry


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


def _work(desk: Desk) -> None:
    """Run each job the broker holds as a worker does (`ingest_document`), and those they send, until none is left."""
    from workers.celery_app import create_celery
    from workers.tasks import ingest_document

    app, waiting = create_celery(desk.settings), memory.Channel.queues.get(desk.settings.task_queue)
    while waiting is not None and not waiting.empty():
        message = waiting.get_nowait()
        body = message["body"]
        if message["properties"].get("body_encoding") == "base64":
            body = base64.b64decode(body)
        document_id, job_id = json.loads(body)[0]
        ingest_document(task_at_retry(desk.settings, 0, [], app=app), document_id, job_id)  # type: ignore[arg-type]


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
    _work(desk)
    return str(uploaded.json()["document_id"])


def _reindex(desk: Desk, keywords: dict[str, str], email_id: str, *, run: bool = True) -> str:
    """Mark the keywords, then re-index the e-mail and, with `run`, run its jobs; the e-mail's new job."""
    policy = desk.client.put("/v1/admin/departments/desk/ingestion-policy", headers=desk.admin,
                             json={"keywords": keywords})
    assert policy.status_code == 200, policy.text
    reindexed = desk.client.post("/v1/admin/reindex", headers=desk.admin,
                                 json={"department": "desk", "document_ids": [email_id]})
    assert reindexed.status_code == 202, reindexed.text
    if run:
        _work(desk)
    return str(reindexed.json()["queued"][0])


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


def test_a_raised_attachment_is_withheld_until_its_run_even_if_its_job_was_never_sent(desk: Desk) -> None:
    """The e-mail's run ends, raising its attachment, and the worker dies before it sends the attachment's new job:
    from that transaction on, the attachment's old content (taken at internal) is cited to no one, exported to no
    training set, and listed at the e-mail's level; the sweep sends the job it finds unsent, and once that run ends
    the content is served again, at the e-mail's level."""
    from audit.training import department_payloads, export_sources
    from core.db import unit_of_work
    from ingestion import service
    from workers.celery_app import create_celery
    from workers.dispatch import send_unsent

    marker = f"stork{uuid.uuid4().hex[:6]}"
    email_id = _upload(desk, "Merger", _mail("Merger", f"Notes on project {marker}.",
                                             [("desk.txt", b"The Turin desk opens on Mondays at seven.")]))
    attachment = next(document["document_id"] for document in _documents(desk).values()
                      if document["parent_id"] == email_id)
    question = "When does the Turin desk open on Mondays?"
    assert attachment in _cited(desk, desk.reader, question)[0]

    job_id = _reindex(desk, {f"project {marker}": "confidential"}, email_id, run=False)
    memory.Channel.queues[desk.settings.task_queue].queue.clear()  # the e-mail's job, run here by hand
    lost = service.run_ingestion(settings=desk.settings, document_id=email_id, job_id=job_id)  # never sent
    assert [accepted.document_id for accepted in lost] == [attachment]

    for token in (desk.reader, desk.cleared):
        cited, response = _cited(desk, token, question)
        assert attachment not in cited and "Mondays at seven" not in response
    listed = {document["document_id"]: document for document in _documents(desk).values()}[attachment]
    assert (listed["status"], listed["classification"]) == ("queued", "confidential")
    with unit_of_work(desk.settings.resolved_database_url) as session:
        exported = export_sources(session=session, settings=desk.settings, department="desk",
                                  payloads=department_payloads(desk.settings, "desk"))
    assert attachment not in {source.document.id for source in exported}

    assert send_unsent(create_celery(desk.settings), older_than_seconds=0) == 1
    _work(desk)
    assert attachment not in _cited(desk, desk.reader, question)[0]
    assert attachment in _cited(desk, desk.cleared, question)[0]


def test_an_attachment_a_step_takes_as_the_emails_run_raises_it_is_raised(desk: Desk,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A file two e-mails carry, the first deleted: the second's attachment step is queued to take the file, and runs
    as a re-index of the second (a keyword now marking it confidential) runs. The step read the e-mail's level as it
    started and took the file at it (internal) as it committed; the run's end, committed meanwhile, had raised the
    attachments it found, not that one, whose content was then served to readers the e-mail is hidden from. Now an
    e-mail's end takes its lineage's locks first, as the step does: it waits for the step and raises what it took."""
    import threading

    from ingestion import service
    from workers.celery_app import create_celery
    from workers.tasks import ingest_document

    second = f"crane{uuid.uuid4().hex[:6]}"
    rota = b"The Malaga desk opens on Fridays at six."
    first_id = _upload(desk, "First", _mail("First", "Notes.", [("rota.txt", rota)]))
    second_id = _upload(desk, "Second", _mail("Second", f"Notes on project {second}.", [("rota.txt", rota)]))
    assert desk.client.delete(f"/v1/documents/{first_id}", headers=auth(desk.editor)).status_code == 204
    message = memory.Channel.queues[desk.settings.task_queue].get_nowait()
    step = json.loads(base64.b64decode(message["body"]) if message["properties"].get("body_encoding") == "base64"
                      else message["body"])[0]
    assert step[0] == second_id  # the second's step, queued to take the file
    run_id = _reindex(desk, {f"project {second}": "confidential"}, second_id, run=False)
    memory.Channel.queues[desk.settings.task_queue].queue.clear()  # the e-mail's run, started below by hand

    listing, released, real_listed = threading.Event(), threading.Event(), service._listed_attachments

    def listed_slowly(*args: Any) -> Any:  # the step's parse of the e-mail, as the run's end commits
        listing.set()
        released.wait(30)
        return real_listed(*args)

    monkeypatch.setattr(service, "_listed_attachments", listed_slowly)
    app = create_celery(desk.settings)
    stepping = threading.Thread(target=ingest_document, args=(task_at_retry(desk.settings, 0, [], app=app), *step))
    stepping.start()
    assert listing.wait(30)
    running = threading.Thread(target=service.run_ingestion,
                               kwargs={"settings": desk.settings, "document_id": second_id, "job_id": run_id})
    running.start()
    running.join(5)  # its end waits for the step now; before, it had committed by then
    released.set()
    stepping.join(60)
    running.join(60)
    monkeypatch.setattr(service, "_listed_attachments", real_listed)
    _work(desk)

    taken = [document for document in _documents(desk).values()
             if document["parent_id"] == second_id and document["status"] == "ready"]
    assert [document["classification"] for document in taken] == ["confidential"]
    question = "When does the Malaga desk open on Fridays?"
    assert taken[0]["document_id"] not in _cited(desk, desk.reader, question)[0]
    assert taken[0]["document_id"] in _cited(desk, desk.cleared, question)[0]


@pytest.mark.parametrize("desk", ["postgresql"], indirect=True)  # on SQLite the e-mail's end holds the only write lock
def test_an_attachment_a_reindex_takes_up_as_the_emails_run_raises_it_runs_again_raised(
        desk: Desk, monkeypatch: pytest.MonkeyPatch) -> None:
    """An attachment failed (its re-index's retries ran out), so the end of a re-index of its e-mail raising it does
    not run it again. A re-index naming the attachment and a worker's claim of its job (at the floor internal), one
    transaction here, hold its row as that end lists the attachments: the end read it failed, waited for its row,
    and once they committed acted on the status read, leaving the claimed run alone: it wrote the file at internal,
    lowering its declared level back, its content served to readers the e-mail is now hidden from. Now the end reads
    the status its row lock leaves: the run is handed back and goes again at the raised level."""
    import threading

    from core.db import unit_of_work
    from ingestion import quarantine, repository, service
    from ingestion.schemas import Classification
    from tests.support.lock_waits import wait_for_a_lock_wait

    marker = f"egret{uuid.uuid4().hex[:6]}"
    email_id = _upload(desk, "Audit", _mail("Audit", f"Notes on project {marker}.",
                                            [("desk.txt", b"The Oslo desk opens on Tuesdays at noon.")]))
    attachment = next(document["document_id"] for document in _documents(desk).values()
                      if document["parent_id"] == email_id)
    failing = _reindex(desk, {}, attachment, run=False)
    memory.Channel.queues[desk.settings.task_queue].queue.clear()  # its run, given up on below
    service.mark_failed(settings=desk.settings, document_id=attachment, job_id=failing, reason="an outage outlasted "
                        "the retries")
    email_job = _reindex(desk, {f"project {marker}": "confidential"}, email_id, run=False)
    memory.Channel.queues[desk.settings.task_queue].queue.clear()  # the e-mail's run, started below by hand

    url, ended = desk.settings.resolved_database_url, []
    running = threading.Thread(target=lambda: ended.append(
        service.run_ingestion(settings=desk.settings, document_id=email_id, job_id=email_job)), daemon=True)
    with unit_of_work(url) as session, service.run_hold(desk.settings) as hold:
        rerun = quarantine.queue_reindex(session=session, settings=desk.settings, department="desk",
                                         document_ids=[attachment], serve_previous=False)
        job_id = rerun.queued[0][1]
        claimed = service._claim(session, desk.settings, repository.get_document(session, attachment),
                                 repository.get_job(session, job_id), hold)
        running.start()
        assert wait_for_a_lock_wait(url, running, timeout=300) in ("transactionid", "tuple")  # the attachment's row
    running.join(300)
    assert ended == [[]] and isinstance(claimed, tuple) and claimed[0].classification is Classification.internal

    real_start, claims = service._start, [claimed]  # the claimed run goes on: its original read, then protected
    monkeypatch.setattr(service, "_start", lambda *args: claims.pop() if claims else real_start(*args))
    service.run_ingestion(settings=desk.settings, document_id=attachment, job_id=job_id)
    listed = {document["document_id"]: document for document in _documents(desk).values()}[attachment]
    assert (listed["status"], listed["classification"]) == ("ready", "confidential")
    question = "When does the Oslo desk open on Tuesdays?"
    assert attachment not in _cited(desk, desk.reader, question)[0]
    assert attachment in _cited(desk, desk.cleared, question)[0]


@pytest.mark.parametrize("desk", ["postgresql"], indirect=True)  # on SQLite the step's end holds the only write lock
def test_an_attachment_step_giving_up_as_another_step_does_its_work_keeps_that_end(desk: Desk) -> None:
    """An e-mail's attachment step queued alone gives up (its retries ran out) as a step of the e-mail ends it
    (`ready`: it did its work). Giving up read the job unfinished, waited for its row, and once that end committed
    wrote the job failed over it. Now a job is ended only if it is still unfinished as its row lock leaves it."""
    import threading

    from core.db import unit_of_work
    from ingestion import repository, service
    from tests.support.lock_waits import wait_for_a_lock_wait

    email_id = _upload(desk, "Rota", _mail("Rota", "The rota is attached.", [("rota.txt", b"Leeds desk: Ana.")]))
    url = desk.settings.resolved_database_url
    with unit_of_work(url) as session:
        step = repository.queue_attachment_step(session, email_id)
    giving_up = threading.Thread(target=service.mark_failed, kwargs={
        "settings": desk.settings, "document_id": email_id, "job_id": step, "reason": "the time limit passed"},
        daemon=True)
    with unit_of_work(url) as session:
        assert repository.end_attachment_steps(session, email_id)  # another step of the e-mail, doing its work
        giving_up.start()
        assert wait_for_a_lock_wait(url, giving_up, timeout=300) in ("transactionid", "tuple")  # the job's row
    giving_up.join(300)
    assert not giving_up.is_alive()
    with unit_of_work(url) as session:
        job = repository.get_job(session, step)
        assert job is not None and (job.status, job.error) == ("ready", repository.ATTACHMENT_STEP)
