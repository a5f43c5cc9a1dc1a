"""/metrics and OpenTelemetry spans on the real query and ingestion paths: metadata only, never content."""

from __future__ import annotations

import gc
import json
import logging
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from kombu.transport import memory
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from pydantic import SecretStr

from core import tracing
from core.logs import JsonFormatter, MaskingFilter
from tests.conftest import PLATFORM_ADMIN, auth, desk_member, wait_for_job
from tests.support.polling import wait_until

QUESTION = "What is the codeword for the Zephyr-Obsidian launch window?"
DOC = "Launch Notes\n\nThe Zephyr-Obsidian launch window codeword is LANTERN-FIG-2231, owned by Priya Raman.\n"
CONTENT = ["Zephyr-Obsidian", "LANTERN-FIG-2231", "Priya Raman", "codeword"]


def _setup(client: TestClient, issue_token: Callable[..., str]) -> tuple[str, str]:
    dept, user = f"obs{uuid.uuid4().hex[:8]}", f"obs-user-{uuid.uuid4().hex[:6]}"
    admin = issue_token(PLATFORM_ADMIN)
    assert client.post("/v1/admin/departments", json={"name": dept}, headers=auth(admin)).status_code == 201
    assert client.post("/v1/admin/role-assignments", headers=auth(admin),
                       json={"subject": user, "role": "editor", "department": dept}).status_code == 201
    return dept, issue_token(user)


def _ingest_and_ask(client: TestClient, dept: str, token: str) -> None:
    upload = client.post("/v1/documents", headers=auth(token), data={"department": dept, "title": "launch"},
                         files={"file": ("launch.txt", DOC.encode())})
    assert upload.status_code == 202, upload.text
    assert wait_for_job(client, token, upload.json()["job_id"])["status"] == "ready"
    answer = client.post("/v1/query", headers=auth(token), json={"question": QUESTION, "departments": [dept]})
    assert answer.status_code == 200, answer.text


def test_spans_cover_query_and_ingestion_with_metadata_only(client: TestClient, settings,  # type: ignore[no-untyped-def]
                                                           issue_token: Callable[..., str]) -> None:
    dept, token = _setup(client, issue_token)
    exporter = InMemorySpanExporter()
    assert tracing.configure_tracing(settings, exporter=exporter) is True
    try:
        _ingest_and_ask(client, dept, token)
    finally:
        tracing.shutdown_tracing()
    spans = exporter.get_finished_spans()
    names = {span.name for span in spans}
    assert {"govrag.query", "govrag.authz", "govrag.guard", "govrag.search", "govrag.decrypt", "govrag.model",
            "govrag.audit", "govrag.ingest", "govrag.ingest.parse", "govrag.ingest.chunk", "govrag.ingest.redact",
            "govrag.ingest.protect", "govrag.ingest.index", "govrag.embed"} <= names
    query = next(span for span in spans if span.name == "govrag.query")
    children = {span.name for span in spans if span.parent and span.parent.span_id == query.context.span_id}
    assert {"govrag.authz", "govrag.audit"} <= children
    assert any(dict(span.attributes or {}).get("govrag.departments") == (dept,) for span in spans)
    dumped = " ".join(f"{span.name} {dict(span.attributes or {})} {span.events}" for span in spans)
    assert not [needle for needle in CONTENT if needle in dumped]


def test_metrics_expose_routes_audit_queue_and_documents(client: TestClient, settings,  # type: ignore[no-untyped-def]
                                                         issue_token: Callable[..., str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    dept, token = _setup(client, issue_token)
    _ingest_and_ask(client, dept, token)
    text = client.get("/metrics").text
    assert 'govrag_http_requests_total{method="POST",route="/v1/query",status="200"}' in text
    assert 'govrag_http_request_duration_seconds_bucket{le="0.005",method="POST",route="/v1/query"}' in text
    assert f'govrag_documents{{department="{dept}",status="ready"}} 1.0' in text
    assert f'govrag_queue_depth{{queue="{settings.task_queue}"}}' in text
    assert 'govrag_audit_events_total{event_type="retrieval"}' in text
    assert "govrag_audit_write_failures_total" in text and "govrag_authz_recheck_drops_total" in text
    assert not [needle for needle in CONTENT if needle in text]
    monkeypatch.setattr(settings, "metrics_token", SecretStr("scrape-secret"))
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers={"Authorization": "Bearer scrape-secret"}).status_code == 200


def test_a_department_status_left_empty_counts_zero(client: TestClient, issue_token: Callable[..., str]) -> None:
    """`govrag_documents` and `govrag_document_chunks` set only the (department, status) pairs the database counted:
    once a status's last document left it (deleted here; a queued one once ready) its series kept the old number."""
    dept, token = _setup(client, issue_token)
    upload = client.post("/v1/documents", headers=auth(token), data={"department": dept, "title": "launch"},
                         files={"file": ("launch.txt", DOC.encode())})
    assert wait_for_job(client, token, upload.json()["job_id"])["status"] == "ready"
    assert f'govrag_documents{{department="{dept}",status="ready"}} 1.0' in client.get("/metrics").text
    assert client.delete(f"/v1/documents/{upload.json()['document_id']}", headers=auth(token)).status_code == 204
    text = client.get("/metrics").text
    assert f'govrag_documents{{department="{dept}",status="ready"}} 0.0' in text
    assert f'govrag_document_chunks{{department="{dept}",status="ready"}} 0.0' in text
    assert f'govrag_documents{{department="{dept}",status="deleted"}} 1.0' in text


def test_startup_freezes_the_loaded_models_out_of_the_garbage_collector(client: TestClient) -> None:
    """After start-up a full collection skips the models' objects (~0.3 s of pause each time otherwise)."""
    assert client.get("/healthz").status_code == 200
    assert gc.get_freeze_count() > 100_000


def test_a_made_up_http_method_is_counted_as_other(client: TestClient) -> None:
    """The caller chooses the method: each made-up one must not become a new series."""
    made_up = f"X{uuid.uuid4().hex[:10].upper()}"
    assert client.request(made_up, "/v1/documents/whatever").status_code in (404, 405)
    text = client.get("/metrics").text
    assert f'method="{made_up}"' not in text and 'method="other"' in text


class _JsonLines(logging.Handler):
    """The log lines as an operator reads them: through the masking filter, which stamps the request id, as JSON."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[dict[str, str]] = []
        self.setFormatter(JsonFormatter())
        self.addFilter(MaskingFilter())

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(self.format(record)))

    def ingested(self, document_id: str) -> list[dict[str, str]]:
        return [line for line in self.lines if line["message"].startswith(f"ingested document {document_id}:")]

    def celery_succeeded(self) -> list[str]:
        """The request id of each line in which Celery says a task succeeded."""
        return [line["request_id"] for line in self.lines
                if line["logger"] == "celery.app.trace" and " succeeded in " in line["message"]]


@pytest.fixture
def worker_lines(clean_logging: None) -> Iterator[_JsonLines]:
    """The lines logged at INFO and above while the test runs, the ingestion service's and Celery's INFO lines (a
    task received, succeeded) included."""
    lines = _JsonLines()
    logging.getLogger().addHandler(lines)
    for name in ("ingestion.service", "celery"):
        logging.getLogger(name).setLevel(logging.INFO)
    try:
        yield lines
    finally:
        logging.getLogger().removeHandler(lines)


def test_the_worker_logs_an_upload_under_the_upload_requests_id(client: TestClient, worker_lines: _JsonLines,
                                                                 issue_token: Callable[..., str]) -> None:
    dept, token = _setup(client, issue_token)
    upload = client.post("/v1/documents", headers=auth(token), data={"department": dept, "title": "launch"},
                         files={"file": ("launch.txt", DOC.encode())})
    assert upload.status_code == 202, upload.text
    document_id = upload.json()["document_id"]
    assert wait_for_job(client, token, upload.json()["job_id"])["status"] == "ready"
    wait_until(lambda: bool(worker_lines.ingested(document_id)), 60, "the worker's line saying it ingested it")
    assert [line["request_id"] for line in worker_lines.ingested(document_id)] == [upload.headers["X-Request-ID"]]


# A task's header as govrag sends it (a command run's id), and forged ones: text after a valid id, upper-case hex, a
# short id, not a string
GENUINE = f"cli-{uuid.uuid4().hex}"
FORGED = ["0123456789abcdef0123456789abcdef\n{\"request_id\": \"admin\"}", "0123456789abcdef0123456789abcdef\n",
          "0123456789ABCDEF0123456789ABCDEF", "cli-0123456789abcdef", ["0123456789abcdef0123456789abcdef"]]


def test_a_task_logs_the_request_id_its_message_carries_and_a_forged_one_not_at_all(
        client: TestClient, settings, issue_token: Callable[..., str],  # type: ignore[no-untyped-def]
        worker_lines: _JsonLines) -> None:
    dept, _ = _setup(client, issue_token)
    expected = {_sent_with_header(client, settings, dept, n, header): [GENUINE if header == GENUINE else "-"]
                for n, header in enumerate([GENUINE, *FORGED])}
    wait_until(lambda: all(worker_lines.ingested(document_id) for document_id in expected), 300,
               "the worker's lines saying it ingested them")
    assert {document_id: [line["request_id"] for line in worker_lines.ingested(document_id)]
            for document_id in expected} == expected
    # Celery's own line about each run too
    wait_until(lambda: len(worker_lines.celery_succeeded()) == len(expected), 60, "Celery's lines saying they ran")
    assert sorted(worker_lines.celery_succeeded()) == sorted(["-"] * len(FORGED) + [GENUINE])
    # nor is a forged header's text anywhere in any line: Celery's own lines and every field included
    assert not [line for line in worker_lines.lines if "0123456789abcdef" in json.dumps(line).lower()]


def _sent_with_header(client: TestClient, settings, dept: str, n: int,  # type: ignore[no-untyped-def]
                      header: object) -> str:
    """A document accepted and its task sent with `header` as its request id, as another sender of tasks might;
    returns the document's id."""
    from core.db import unit_of_work
    from ingestion import service as ingestion_service
    from ingestion.schemas import Classification
    from workers.celery_app import INGEST_TASK, REQUEST_ID_HEADER
    from workers.dispatch import record_sent

    with unit_of_work(settings.resolved_database_url) as session:
        accepted = ingestion_service.accept_upload(
            session=session, settings=settings, uploaded_by="sender", department=dept, filename=f"launch-{n}.txt",
            data=f"{DOC}\nCopy {n}.\n".encode(), title=None, acl_groups=[], classification=Classification.internal)
    client.app.state.celery.tasks[INGEST_TASK].apply_async(  # type: ignore[attr-defined]
        args=[accepted.document_id, accepted.job_id], time_limit=None, headers={REQUEST_ID_HEADER: header})
    record_sent(settings, [accepted.job_id])
    return accepted.document_id


@pytest.mark.parametrize("sent_again_by", ["sweep", "start"])
def test_a_job_sent_again_runs_under_the_id_of_the_request_that_queued_it(
        sent_again_by: str, tmp_path: Path, worker_lines: _JsonLines) -> None:
    """A job's task carried the id its sender logged under, so only its first send was the upload's: one the sweep
    sent (the broker was down at the upload) or an embedded API's start sent again (its broker's memory lost the
    task) ran under `-`, and its creator's request could not be followed into the worker. The job keeps that id
    now, and every send carries it."""
    from api.app import create_app
    from retrieval.store import close_vector_store
    from tests.integration.test_job_dispatch import UNREACHABLE_BROKER, _embedded

    _url, first = _embedded(tmp_path, broker_url=UNREACHABLE_BROKER if sent_again_by == "sweep" else "memory://")
    with TestClient(create_app(first)) as client:
        editor = desk_member(client, "editor")
        upload = client.post("/v1/documents", headers=auth(editor), data={"department": "desk", "title": "launch"},
                             files={"file": ("launch.txt", DOC.encode())})
        assert upload.status_code == 202, upload.text
    close_vector_store(first)
    memory.Channel.queues.pop(first.task_queue, None)  # what a new process starts with: an empty broker
    again = {"sweep": {"job_sweep_seconds": 0.2, "job_resend_after_seconds": 0.0}, "start": {}}[sent_again_by]
    restarted = first.model_copy(update={"broker_url": "memory://", "inprocess_worker": True, **again})
    document_id = upload.json()["document_id"]
    with TestClient(create_app(restarted)) as client:
        assert wait_for_job(client, editor, upload.json()["job_id"])["status"] == "ready"
        wait_until(lambda: bool(worker_lines.ingested(document_id)), 60, "the worker's line saying it ingested it")
    close_vector_store(restarted)
    assert {line["request_id"] for line in worker_lines.ingested(document_id)} == {upload.headers["X-Request-ID"]}
