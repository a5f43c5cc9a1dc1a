"""GET /v1/documents: a department's documents, newest first, one bounded page at a time; metadata only, and for a
reader only what they may open. Real PostgreSQL, the real worker."""

from __future__ import annotations

import base64
import uuid
from collections.abc import Callable
from email.message import EmailMessage

import pytest
from fastapi.testclient import TestClient

from tests.conftest import PLATFORM_ADMIN, auth, wait_for_attachments, wait_for_document

FINANCE = "finance-team"


@pytest.fixture(scope="module")
def shelf(client: TestClient, issue_token: Callable[..., str]) -> dict[str, object]:
    """A department with an editor and a reader, four documents (one for the finance team only, one above the
    reader's clearance) and a fifth that was deleted; ids in upload order."""
    department = f"shelf{uuid.uuid4().hex[:6]}"
    admin = auth(issue_token(PLATFORM_ADMIN))
    assert client.post("/v1/admin/departments", json={"name": department}, headers=admin).status_code == 201
    for subject, role in (("lina", "editor"), ("rita", "reader"), ("fred", "reader")):
        response = client.post("/v1/admin/role-assignments", headers=admin,
                               json={"subject": subject, "role": role, "department": department})
        assert response.status_code == 201, response.text
    editor = issue_token("lina")
    uploads = [("rota.txt", {}), ("budget.txt", {"acl_groups": FINANCE}), ("canteen.txt", {}),
               ("salaries.txt", {"classification": "confidential"}), ("gone.txt", {})]
    ids = []
    for name, form in uploads:
        response = client.post("/v1/documents", headers=auth(editor), data={"department": department, **form},
                               files={"file": (name, f"{name} notes {uuid.uuid4().hex}.".encode())})
        assert response.status_code == 202, response.text
        ids.append(wait_for_document(client, editor, response.json()["document_id"])["document_id"])
    assert client.delete(f"/v1/documents/{ids[-1]}", headers=auth(editor)).status_code == 204
    return {"department": department, "ids": ids[:-1], "deleted": ids[-1], "editor": editor,
            "reader": issue_token("rita"), "finance_reader": issue_token("fred", [FINANCE]),
            "outsider": issue_token("otto")}


def _walk(client: TestClient, token: str, department: str, **params: object) -> tuple[list[str], list[int]]:
    """Every listed id, page after page, and each page's size."""
    listed, sizes, after = [], [], None
    while True:
        query = {"department": department, **params, **({"after": after} if after else {})}
        response = client.get("/v1/documents", headers=auth(token), params=query)
        assert response.status_code == 200, response.text
        page = response.json()
        listed += [document["document_id"] for document in page["documents"]]
        sizes.append(len(page["documents"]))
        after = page["next_after"]
        if after is None:
            return listed, sizes


def test_an_editor_pages_through_every_document_newest_first(client: TestClient, shelf: dict) -> None:  # type: ignore[type-arg]
    listed, sizes = _walk(client, shelf["editor"], shelf["department"], limit=2)
    assert listed == shelf["ids"][::-1]  # every one once, newest first; the deleted one never
    assert sizes[:2] == [2, 2]
    page = client.get("/v1/documents", headers=auth(shelf["editor"]),
                      params={"department": shelf["department"], "limit": 1}).json()
    newest = page["documents"][0]
    assert newest["title"] == "salaries.txt" and newest["status"] == "ready" and newest["chunk_count"] >= 1
    assert "notes" not in str(page)  # metadata only, never content


def test_a_reader_lists_exactly_the_documents_they_may_open(client: TestClient, shelf: dict) -> None:  # type: ignore[type-arg]
    for reader in ("reader", "finance_reader"):
        token = shelf[reader]
        openable = [document_id for document_id in shelf["ids"]
                    if client.get(f"/v1/documents/{document_id}", headers=auth(token)).status_code == 200]
        listed, _ = _walk(client, token, shelf["department"])
        assert listed == openable[::-1]
    rota, budget, canteen, salaries = shelf["ids"]
    assert _walk(client, shelf["reader"], shelf["department"])[0] == [canteen, rota]  # no ACL, no clearance
    assert budget in _walk(client, shelf["finance_reader"], shelf["department"])[0]


def test_a_page_reads_at_most_its_limit_so_hidden_documents_give_short_pages(client: TestClient,
                                                                                shelf: dict) -> None:  # type: ignore[type-arg]
    listed, sizes = _walk(client, shelf["reader"], shelf["department"], limit=1)
    rota, _, canteen, _ = shelf["ids"]
    assert listed == [canteen, rota]
    assert 0 in sizes  # the newest (salaries) is above the reader's clearance: its page comes back empty


def test_a_listing_filters_by_status(client: TestClient, shelf: dict) -> None:  # type: ignore[type-arg]
    assert _walk(client, shelf["editor"], shelf["department"], status="ready")[0] == shelf["ids"][::-1]
    assert _walk(client, shelf["editor"], shelf["department"], status="quarantined")[0] == []


@pytest.mark.parametrize(("params", "status", "message"), [
    ({}, 422, "department"),
    ({"limit": 0}, 422, "limit"),
    ({"limit": 201}, 422, "limit"),
    ({"status": "deleted"}, 422, "status"),
    ({"after": "not-a-cursor"}, 400, "after: not a cursor from a previous page"),
    ({"after": base64.urlsafe_b64encode(b'{"at": 1}').decode()}, 400, "after: not a cursor from a previous page"),
    ({"after": base64.urlsafe_b64encode(b'["yesterday", "x"]').decode()}, 400, "not a cursor"),
    # JSON escapes no database binds (a 500 before): NUL (PostgreSQL), a lone surrogate (any database)
    ({"after": base64.urlsafe_b64encode(b'["2026-01-01T00:00:00", "a\\u0000b"]').decode()}, 400, "not a cursor"),
    ({"after": base64.urlsafe_b64encode(b'["2026-01-01T00:00:00", "\\ud800"]').decode()}, 400, "not a cursor"),
    ({"after": base64.urlsafe_b64encode(b'["2026-01-01T00:00:00", 7]').decode()}, 400, "not a cursor"),
    ({"after": "a\x00b"}, 422, "NUL"),
])
def test_a_bad_listing_request_gets_a_clear_error(client: TestClient, shelf: dict, params: dict, status: int,  # type: ignore[type-arg]
                                                  message: str) -> None:
    query = {"department": shelf["department"], **params} if params else {}
    response = client.get("/v1/documents", headers=auth(shelf["editor"]), params=query)
    assert response.status_code == status and message in response.text


def test_someone_without_a_role_in_the_department_is_refused(client: TestClient, shelf: dict) -> None:  # type: ignore[type-arg]
    for department in (shelf["department"], "no-such-department"):  # the same answer: existence is not revealed
        response = client.get("/v1/documents", headers=auth(shelf["outsider"]), params={"department": department})
        assert response.status_code == 403
        assert response.json()["error"]["message"] == "not allowed to list documents in this department"


def test_an_attachment_is_hidden_from_a_reader_its_email_is_hidden_from(client: TestClient, shelf: dict) -> None:  # type: ignore[type-arg]
    """The e-mail's body raises it to confidential, above the reader's clearance. Its plain attachment used to take
    the e-mail's declared level (internal): listed to the reader with the e-mail's title and id, and cited. Now it
    takes the e-mail's level, and its chunks are floored there."""
    canary, title = uuid.uuid4().hex, f"Dismissal {uuid.uuid4().hex[:6]}"
    parent, attachment = _ingest_email(client, shelf, title, "Payroll correction. Social security number "
                                       "536-22-8741 for the March run.", f"The Leeds desk opens at nine {canary}.")
    assert parent["classification"] == "confidential" and attachment["status"] == "ready"
    assert attachment["declared_classification"] == "confidential"
    listed = client.get("/v1/documents", headers=auth(shelf["reader"]), params={"department": shelf["department"]})
    assert listed.status_code == 200 and title not in listed.text
    answer = client.post("/v1/query", headers=auth(shelf["reader"]), json={
        "question": f"When does the Leeds desk open {canary}?", "departments": [shelf["department"]]}).json()
    assert attachment["document_id"] not in {citation["document_id"] for citation in answer["citations"]}
    assert client.delete(f"/v1/documents/{parent['document_id']}", headers=auth(shelf["editor"])).status_code == 204


def test_an_attachment_is_hidden_when_its_email_is_raised_later(client: TestClient, shelf: dict,  # type: ignore[type-arg]
                                                                 issue_token: Callable[..., str]) -> None:
    """An e-mail raised afterwards (a new department keyword, then a re-index) raises its attachment, which then runs
    again; meanwhile, and for an attachment taken before attachments were declared at their e-mail's level (or left
    below it by a re-index before they were raised with it), the attachment would show the e-mail's title to a
    reader the e-mail is now hidden from. Seeing an attachment needs seeing its e-mail."""
    marker, title = f"heron{uuid.uuid4().hex[:6]}", f"Restructuring {uuid.uuid4().hex[:6]}"
    parent, attachment = _ingest_email(client, shelf, title, f"Notes on project {marker}.",
                                       f"The Porto desk opens at ten {marker}.")
    assert parent["classification"] == attachment["classification"] == "internal"
    admin = auth(issue_token(PLATFORM_ADMIN))
    assert client.put(f"/v1/admin/departments/{shelf['department']}/ingestion-policy", headers=admin,
                      json={"keywords": {f"project {marker}": "confidential"}}).status_code == 200
    reindexed = client.post("/v1/admin/reindex", headers=admin,
                            json={"department": shelf["department"], "document_ids": [parent["document_id"]]})
    assert reindexed.status_code == 202 and len(reindexed.json()["queued"]) == 1
    assert wait_for_document(client, shelf["editor"], parent["document_id"])["classification"] == "confidential"
    listed = client.get("/v1/documents", headers=auth(shelf["reader"]), params={"department": shelf["department"]})
    status = client.get(f"/v1/documents/{attachment['document_id']}", headers=auth(shelf["reader"]))
    assert title not in listed.text and status.status_code == 404
    assert client.delete(f"/v1/documents/{parent['document_id']}", headers=auth(shelf["editor"])).status_code == 204


def _ingest_email(client: TestClient, shelf: dict, title: str, body: str, attached: str) -> tuple[dict, dict]:  # type: ignore[type-arg]
    """An e-mail with one plain attachment, uploaded by the shelf's editor: both documents once ingested."""
    mail = EmailMessage()
    mail["From"], mail["To"], mail["Subject"] = "ana@example.com", "ben@example.com", "Files"
    mail.set_content(body)
    mail.add_attachment(attached.encode(), maintype="text", subtype="plain", filename="desk.txt")
    uploaded = client.post("/v1/documents", headers=auth(shelf["editor"]),
                           data={"department": shelf["department"], "title": title},
                           files={"file": ("mail.eml", mail.as_bytes())})
    assert uploaded.status_code == 202, uploaded.text
    wait_for_document(client, shelf["editor"], uploaded.json()["document_id"])
    parent = wait_for_attachments(client, shelf["editor"], uploaded.json()["document_id"])
    return parent, wait_for_document(client, shelf["editor"], parent["attachment_ids"][0])  # type: ignore[arg-type]


def test_pages_walk_the_same_way_on_the_embedded_default(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """SQLite keeps timestamps without their zone: the cursor's position must compare all the same."""
    from kombu.transport import memory

    from api.app import create_app
    from core import migrate
    from core.settings import Settings
    from retrieval.store import close_vector_store
    from tests.conftest import desk_member

    url = f"sqlite:///{tmp_path / 'govrag.db'}"
    migrate.upgrade(url)
    settings = Settings(data_dir=tmp_path / "data", database_url=url, admins=[PLATFORM_ADMIN], broker_url="memory://",
                        task_queue=f"govrag-listing-{uuid.uuid4().hex[:8]}", inprocess_worker=False,
                        job_sweep_seconds=0)
    with TestClient(create_app(settings)) as client:
        editor = desk_member(client, "editor")
        ids = [client.post("/v1/documents", headers=auth(editor), data={"department": "desk"},
                           files={"file": (f"note-{n}.txt", f"Note {n}.".encode())}).json()["document_id"]
               for n in range(3)]
        listed, sizes = _walk(client, editor, "desk", limit=1)
    close_vector_store(settings)
    memory.Channel.queues.pop(settings.task_queue, None)  # the three jobs nobody ran
    assert listed == ids[::-1] and sizes[:3] == [1, 1, 1]


def test_explain_applies_the_lineage_rule_to_an_attachment(client: TestClient, shelf: dict,  # type: ignore[type-arg]
                                                           issue_token: Callable[..., str], settings) -> None:  # type: ignore[no-untyped-def]
    """An attachment left below its e-mail, raised above the reader's clearance after it was taken (by a re-index
    before an e-mail's run raised its attachments with it): the listing and the status hide it from the reader, a
    citation of its chunk withholds its title. Explain judged the attachment's own row and answered allow for the
    document; it now applies the lineage rule, as they do."""
    from core.db import unit_of_work
    from core.models import Document

    marker, title = f"egret{uuid.uuid4().hex[:6]}", f"Merger {uuid.uuid4().hex[:6]}"
    parent, attachment = _ingest_email(client, shelf, title, f"Notes on project {marker}.",
                                       f"The Lyon desk opens at noon {marker}.")
    admin = auth(issue_token(PLATFORM_ADMIN))
    with unit_of_work(settings.resolved_database_url) as session:  # as such a re-index left it
        session.get_one(Document, parent["document_id"]).classification = "confidential"

    def explain(subject: str, **target: str) -> dict:  # type: ignore[type-arg]
        response = client.post("/v1/authz/explain", headers=admin, json={"subject": subject, **target})
        assert response.status_code == 200, response.text
        return response.json()  # type: ignore[no-any-return]

    document = explain("rita", document_id=attachment["document_id"])
    checks = {check["name"]: check for check in document["checks"]}
    assert document["decision"] == "deny" and not checks["lineage"]["passed"]
    assert checks["department_read"]["passed"] and checks["acl"]["passed"] and checks["clearance"]["passed"]
    assert parent["document_id"] in checks["lineage"]["detail"] and title not in str(document)
    chunk = explain("rita", chunk_id=f"{attachment['document_id']}:0")  # the query returns it, under no title
    assert chunk["decision"] == "allow"
    assert "withheld" in {check["name"]: check for check in chunk["checks"]}["lineage"]["detail"]
    assert explain("lina", document_id=attachment["document_id"])["decision"] == "allow"  # the department's editor
    assert explain("rita", document_id=shelf["ids"][0])["decision"] == "allow"  # an upload: no lineage check
    assert "lineage" not in {c["name"] for c in explain("rita", document_id=shelf["ids"][0])["checks"]}
    assert client.delete(f"/v1/documents/{parent['document_id']}", headers=auth(shelf["editor"])).status_code == 204


def test_an_email_lists_only_the_attachments_the_caller_may_see(client: TestClient, shelf: dict,  # type: ignore[type-arg]
                                                                issue_token: Callable[..., str]) -> None:
    """An attachment its content raised above the reader's clearance is hidden from them (its status is a 404); the
    e-mail's status listed its id all the same, so the reader learned that it exists. It now lists what they see."""
    marker = f"osprey{uuid.uuid4().hex[:6]}"
    admin = auth(issue_token(PLATFORM_ADMIN))
    assert client.put(f"/v1/admin/departments/{shelf['department']}/ingestion-policy", headers=admin,
                      json={"keywords": {f"project {marker}": "confidential"}}).status_code == 200
    parent, attachment = _ingest_email(client, shelf, f"Rota {marker}", "The rota for next week.",
                                       f"Costs of project {marker}.")
    assert (parent["classification"], attachment["classification"]) == ("internal", "confidential")
    seen = client.get(f"/v1/documents/{parent['document_id']}", headers=auth(shelf["reader"]))
    assert seen.status_code == 200 and seen.json()["attachment_ids"] == []
    assert client.get(f"/v1/documents/{attachment['document_id']}", headers=auth(shelf["reader"])).status_code == 404
    assert parent["attachment_ids"] == [attachment["document_id"]]  # as the editor sees it
    assert client.delete(f"/v1/documents/{parent['document_id']}", headers=auth(shelf["editor"])).status_code == 204


def _refusal(response: object) -> tuple[int, str, str]:
    """A refusal as the caller sees it: status, error code and message (the request id aside)."""
    error = response.json()["error"]  # type: ignore[attr-defined]
    return response.status_code, error["code"], error["message"]  # type: ignore[attr-defined]


def test_deleting_needs_seeing_the_document(client: TestClient, shelf: dict,  # type: ignore[type-arg]
                                            issue_token: Callable[..., str]) -> None:
    """`delete` in a department let a role without `upload` delete a document its ACL hides from them (a 204 where a
    missing id is a 404): they acted on, and learned of, a document they may not see. It now looks missing, as for a
    reveal; one they may see is deleted."""
    role, admin = f"records{uuid.uuid4().hex[:6]}", auth(issue_token(PLATFORM_ADMIN))
    assert client.put(f"/v1/admin/roles/{role}", headers=admin,
                      json={"name": role, "permissions": ["read", "delete"]}).status_code == 200
    assert client.post("/v1/admin/role-assignments", headers=admin,
                       json={"subject": "dora", "role": role, "department": shelf["department"]}).status_code == 201
    hidden, shown = (
        client.post("/v1/documents", headers=auth(shelf["editor"]), data={"department": shelf["department"], **form},
                    files={"file": ("minutes.txt", f"Minutes {uuid.uuid4().hex}.".encode())}).json()["document_id"]
        for form in ({"acl_groups": FINANCE}, {}))
    for document_id in (hidden, shown):
        wait_for_document(client, shelf["editor"], document_id)
    records = auth(issue_token("dora"))
    missing = client.delete(f"/v1/documents/{uuid.uuid4()}", headers=records)
    assert _refusal(client.delete(f"/v1/documents/{hidden}", headers=records)) == _refusal(missing)
    assert client.get(f"/v1/documents/{hidden}", headers=auth(shelf["editor"])).json()["status"] == "ready"
    assert client.delete(f"/v1/documents/{shown}", headers=records).status_code == 204
    assert client.delete(f"/v1/documents/{hidden}", headers=auth(shelf["editor"])).status_code == 204


def test_a_department_admin_learns_nothing_of_another_department(client: TestClient, shelf: dict,  # type: ignore[type-arg]
                                                                 issue_token: Callable[..., str]) -> None:
    """The admin (and compliance officer) of another department probes the shelf's objects by id and by name: each
    answer is the one a missing id or department gets, and a re-index of their own department naming the shelf's
    documents leaves them alone. (These held before; kept as a regression guard.)"""
    yard, admin = f"yard{uuid.uuid4().hex[:6]}", auth(issue_token(PLATFORM_ADMIN))
    assert client.post("/v1/admin/departments", json={"name": yard}, headers=admin).status_code == 201
    for role in ("admin", "compliance"):
        assert client.post("/v1/admin/role-assignments", headers=admin,
                           json={"subject": "yves", "role": role, "department": yard}).status_code == 201
    upload = client.post("/v1/documents", headers=auth(shelf["editor"]),
                         data={"department": shelf["department"], "classification": "restricted"},
                         files={"file": ("plans.txt", f"Plans {uuid.uuid4().hex}.".encode())}).json()
    held = wait_for_document(client, shelf["editor"], upload["document_id"])
    assert held["status"] == "quarantined"
    yves, nowhere, unknown = auth(issue_token("yves")), f"nowhere{uuid.uuid4().hex[:6]}", str(uuid.uuid4())
    by_id = [("GET", "/v1/documents/{}", None), ("DELETE", "/v1/documents/{}", None),
             ("POST", "/v1/documents/{}/reveal", {"placeholders": ["<PERSON_1>"]}),
             ("POST", "/v1/admin/quarantine/{}/approve", None), ("POST", "/v1/admin/quarantine/{}/reject", None)]
    for method, path, body in by_id:
        for document_id in (held["document_id"], shelf["ids"][0]):
            answer = client.request(method, path.format(document_id), headers=yves, json=body)
            assert _refusal(answer) == _refusal(client.request(method, path.format(unknown), headers=yves, json=body))
    job = client.get(f"/v1/jobs/{upload['job_id']}", headers=yves)
    assert _refusal(job) == _refusal(client.get(f"/v1/jobs/{unknown}", headers=yves))
    by_name = [("GET", "/v1/admin/departments/{}/ingestion-policy", None, None),
               ("PUT", "/v1/admin/departments/{}/ingestion-policy", {"keywords": {"x": "restricted"}}, None),
               ("GET", "/v1/admin/quarantine", None, "department"),
               ("GET", "/v1/admin/role-assignments", None, "department"),
               ("GET", "/v1/documents", None, "department"), ("GET", "/v1/audit/retrievals", None, "department")]
    for method, path, body, param in by_name:
        def ask(name: str) -> object:
            return client.request(method, path.format(name), headers=yves, json=body,  # noqa: B023
                                  params={param: name} if param else None)  # noqa: B023
        assert _refusal(ask(shelf["department"])) == _refusal(ask(nowhere))
    revoke = {"subject": "rita", "role": "reader"}
    assert _refusal(client.request("DELETE", "/v1/admin/role-assignments", headers=yves,
                                   json={**revoke, "department": shelf["department"]})) == _refusal(
        client.request("DELETE", "/v1/admin/role-assignments", headers=yves, json={**revoke, "department": nowhere}))
    switch = {"mode": "disabled", "reason": "probe"}
    assert _refusal(client.post("/v1/admin/kill-switch", headers=yves,
                                json={**switch, "scope": shelf["department"]})) == _refusal(
        client.post("/v1/admin/kill-switch", headers=yves, json={**switch, "scope": nowhere}))
    explained = client.post("/v1/authz/explain", headers=yves,
                            json={"subject": "rita", "document_id": held["document_id"]})
    assert explained.status_code == 403 and client.get("/v1/admin/guard", headers=yves).status_code == 403
    reindex = client.post("/v1/admin/reindex", headers=yves,
                          json={"department": yard, "document_ids": [held["document_id"], shelf["ids"][0]]})
    assert reindex.status_code == 202 and reindex.json()["queued"] == []
    assert sorted(reindex.json()["skipped"]) == sorted([held["document_id"], shelf["ids"][0]])
    assert client.get(f"/v1/documents/{held['document_id']}", headers=auth(shelf["editor"])).json()["status"] \
        == "quarantined"
    assert client.get(f"/v1/documents/{shelf['ids'][0]}", headers=auth(shelf["reader"])).status_code == 200
    assert {"subject": "rita", "role": "reader", "department": shelf["department"]} in client.get(
        "/v1/admin/role-assignments", headers=admin, params={"department": shelf["department"]}).json()
    assert client.delete(f"/v1/documents/{held['document_id']}", headers=auth(shelf["editor"])).status_code == 204
