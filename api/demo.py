"""`govrag demo`: the governed path end to end on the embedded default, printed."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from fastapi.testclient import TestClient

from api.app import create_app
from core import migrate
from core.settings import Settings, get_settings
from retrieval.store import close_vector_store

DOCS_DIR = Path(__file__).with_name("demo_docs")
# Warnings and errors still show; the INFO lines (a JSON line per request, job and model load) would bury the story.
LOG_LEVEL = "WARNING"
VECTOR_STORES = {"edge": "Qdrant Edge", "qdrant_local": "Qdrant local mode"}
ADMIN = "demo-admin"
PEOPLE = {  # subject → groups from the (dev) identity provider
    "alice": ["hr-staff"],
    "bob": ["finance-staff"],
    "carol": ["compliance-team"],
}
ROLES = [("group:hr-staff", "editor", "hr"), ("group:finance-staff", "editor", "finance"),
         ("carol", "compliance", "hr"), ("carol", "compliance", "finance")]
QUESTIONS = [
    ("alice", "How many days of annual leave does a full-time employee get?", None),
    ("alice", "Who chaired the salary review meeting?", None),
    ("alice", "Is maria.gonzalez@example.com the contact for questions about the review?", None),
    ("bob", "What is the hotel limit per night in capital cities?", None),
    ("bob", "Who chaired the salary review meeting and what raise was approved?", None),
    ("bob", "What is the internal reference of the salary review?", ["hr"]),
]


def run() -> int:
    """Run the demo in a fresh data dir under GOVRAG_DATA_DIR; returns a process exit code."""
    settings = demo_settings(get_settings())
    shutil.rmtree(settings.data_dir, ignore_errors=True)
    migrate.migrate_to_head(settings)
    _say(banner(settings))
    with TestClient(create_app(settings)) as client:
        issuer = client.app.state.dev_issuer  # type: ignore[attr-defined]
        tokens = {sub: issuer.issue(sub, groups) for sub, groups in PEOPLE.items()}
        tokens[ADMIN] = issuer.issue(ADMIN, [])
        _setup(client, tokens[ADMIN])
        _upload_all(client, tokens)
        for subject, question, departments in QUESTIONS:
            _ask(client, tokens[subject], subject, question, departments)
        _show_audit(client, tokens["carol"])
    close_vector_store(settings)
    return 0


def demo_settings(base: Settings) -> Settings:
    """The embedded default in a `demo` folder of the data dir, logging at LOG_LEVEL unless GOVRAG_LOG_LEVEL says."""
    log_level = base.log_level if "log_level" in base.model_fields_set else LOG_LEVEL
    return Settings(data_dir=base.data_dir / "demo", admins=[ADMIN], broker_url="memory://", inprocess_worker=True,
                    log_level=log_level)


def banner(settings: Settings) -> str:
    """What the demo runs on."""
    return (f"embedded default in {settings.data_dir}: SQLite, {VECTOR_STORES[settings.vector_backend]}, "
            "in-process Celery, dev token issuer")


def _setup(client: TestClient, admin_token: str) -> None:
    headers = _auth(admin_token)
    for name in ("hr", "finance"):
        _check(client.post("/v1/admin/departments", json={"name": name}, headers=headers))
    for subject, role, department in ROLES:
        _check(client.post("/v1/admin/role-assignments", headers=headers,
                           json={"subject": subject, "role": role, "department": department}))
    _say("departments hr, finance; hr-staff and finance-staff are editors of their own; carol is compliance")


def _upload_all(client: TestClient, tokens: dict[str, str]) -> None:
    jobs = []
    for path in sorted(DOCS_DIR.iterdir()):
        department = path.name.split("-", 1)[0]
        uploader = "alice" if department == "hr" else "bob"
        response = _check(client.post("/v1/documents", headers=_auth(tokens[uploader]),
                                      data={"department": department, "title": path.stem},
                                      files={"file": (path.name, path.read_bytes())}))
        jobs.append((path.name, response.json()["job_id"], uploader))
    for name, job_id, uploader in jobs:
        status = _wait(client, tokens[uploader], job_id)
        _say(f"ingested {name}: {status['status']}" + (f" ({status['error']})" if status["error"] else ""))


def _wait(client: TestClient, token: str, job_id: str, timeout: float = 300.0) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = _check(client.get(f"/v1/jobs/{job_id}", headers=_auth(token))).json()
        if status["status"] in ("ready", "failed"):
            return status  # type: ignore[no-any-return]
        time.sleep(0.3)
    raise TimeoutError("ingestion did not finish in time")


def _ask(client: TestClient, token: str, subject: str, question: str, departments: list[str] | None) -> None:
    body: dict[str, object] = {"question": question, "purpose": "demo"}
    if departments:
        body["departments"] = departments
    result = _check(client.post("/v1/query", headers=_auth(token), json=body)).json()
    scope = f" (asking for departments {departments})" if departments else ""
    print(f"\n{subject} asks{scope}: {question}")
    if result["refused"]:
        print(f"  REFUSED [{result['reason']}]: {result['answer']}")
        return
    print(f"  {result['answer']}")
    for citation in result["citations"]:
        print(f"    [{citation['n']}] {citation['department']}/{citation['title']} "
              f"(chunk {citation['chunk_id'][-6:]}, score {citation['score']:.2f})")


def _show_audit(client: TestClient, token: str) -> None:
    export = _check(client.get("/v1/audit/retrievals", params={"format": "jsonl"}, headers=_auth(token)))
    lines = [json.loads(line) for line in export.text.splitlines() if line]
    events = [line for line in lines if "manifest" not in line]
    manifest = next((line["manifest"] for line in lines if "manifest" in line), {})
    print(f"\ncarol (compliance) exports the retrieval ledger: {len(events)} events, hash-chained; "
          f"manifest: {manifest.get('rows', '?')} rows, last hash {str(manifest.get('last_hash'))[:12]}…")
    for event in events:
        print(f"  {_describe(event)}")


def _describe(event: dict[str, object]) -> str:
    """One ledger row as a line: admin actions by type, retrievals by decision and masked question."""
    head = f"#{event['id']} {event['subject']:<10} hash={str(event['hash'])[:12]}…"
    if event["event_type"] != "retrieval":
        return f"{head} admin action: {event['event_type']} {event.get('departments_searched') or ''}"
    reason = f" [{event['reason']}]" if event["reason"] else ""
    return (f"{head} {event['decision']}{reason} searched={event['departments_searched']} "
            f"question: {event['question_masked']}")


def _check(response):  # type: ignore[no-untyped-def]
    if response.status_code >= 400:
        raise RuntimeError(f"demo step failed: HTTP {response.status_code} {response.text}")
    return response


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _say(message: str) -> None:
    print(f"== {message}")
