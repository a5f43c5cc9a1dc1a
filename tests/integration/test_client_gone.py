"""A client gone while the API answers, told the way a server of ASGI 2.4 tells it: its `send()` raises an OSError
(uvicorn's `ClientDisconnected`, raised by its newer versions). The installed uvicorn says ASGI 2.3 over HTTP and
drops such a send silently (test_served_export_cut_off.py serves that), so a harness stands in for the server here: it
hands the API a request, then takes `sends_before_gone` messages and raises on every send after them, its `receive`
then saying `http.disconnect`."""

from __future__ import annotations

import errno
import logging
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.utils import ClientDisconnected

from api.app import RequestContext
from api.routers.audit import _ExportStream
from tests.conftest import PLATFORM_ADMIN, auth

GONE_LINE = "the client went away before the response's end"


def _served_until_gone(client: TestClient, path: str, token: str, *, spec_version: str,
                       sends_before_gone: int, app: ASGIApp | None = None) -> list[dict[str, Any]]:
    """`GET path` with `token`, handed to the API (or `app`, in the API's) as a server saying `spec_version` would,
    whose client goes after `sends_before_gone` messages: the messages it took. Whatever the app raises is raised
    here."""
    taken: list[dict[str, Any]] = []
    gone = anyio.Event()
    requested = False

    async def receive() -> dict[str, Any]:
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if len(taken) >= sends_before_gone:
            gone.set()
            raise ClientDisconnected
        taken.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": spec_version}, "http_version": "1.1",
             "method": "GET", "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "",
             "query_string": b"", "headers": [(b"host", b"testserver"), *_headers(auth(token))],
             "client": ("testclient", 50000), "server": ("testserver", 80), "state": {}, "app": client.app}
    client.portal.call(app or client.app, scope, receive, send)  # type: ignore[union-attr, arg-type]
    return taken


def _headers(headers: dict[str, str]) -> list[tuple[bytes, bytes]]:
    return [(name.lower().encode(), value.encode()) for name, value in headers.items()]


def _request_id(taken: list[dict[str, Any]]) -> str:
    start = next(message for message in taken if message["type"] == "http.response.start")
    return dict(start["headers"])[b"x-request-id"].decode()


def _events_of(database_url: str, request_id: str) -> list[tuple[str, dict[str, Any]]]:
    """The ledger's events of the request `request_id`, in order: their type and details."""
    from core.db import unit_of_work
    from core.models import RetrievalEvent

    with unit_of_work(database_url) as session:
        events = session.scalars(select(RetrievalEvent).where(RetrievalEvent.request_id == request_id)
                                 .order_by(RetrievalEvent.id)).all()
        return [(event.event_type, event.details) for event in events]


def _said(caplog: pytest.LogCaptureFixture) -> tuple[list[str], list[str]]:
    """The API's lines: those saying a client gone, and those of a warning or worse (with their exception's class)."""
    lines = [record for record in caplog.records if record.name.startswith(("api", "audit", "core", "uvicorn"))]
    gone = [record.getMessage() for record in lines if record.getMessage() == GONE_LINE]
    worse = [f"{record.getMessage()} {record.exc_info!r}" for record in lines if record.levelno >= logging.WARNING]
    return gone, worse


@pytest.fixture
def officer(client: TestClient, issue_token: Callable[..., str]) -> str:
    """A compliance officer's token in a department of the test's own, whose ledger holds its creation and her
    role."""
    department, subject = f"gone{uuid.uuid4().hex[:6]}", f"olga-{uuid.uuid4().hex[:6]}"
    admin = auth(issue_token(PLATFORM_ADMIN))
    assert client.post("/v1/admin/departments", json={"name": department}, headers=admin).status_code == 201
    assert client.post("/v1/admin/role-assignments", headers=admin, json={
        "subject": subject, "role": "compliance", "department": department}).status_code == 201
    return issue_token(subject)


@pytest.mark.parametrize("spec_version", ["2.3", "2.4"])
def test_an_export_whose_servers_send_raises_is_recorded_as_a_client_gone(
        client: TestClient, settings, officer: str, caplog: pytest.LogCaptureFixture,  # type: ignore[no-untyped-def]
        spec_version: str) -> None:
    """A server's send raising once the caller of the export went away: under ASGI 2.4 Starlette made it a
    `ClientDisconnect`, which left the API as a crash (the server's traceback); under 2.3 the OSError itself did, and
    the ledger's `export_failed` named its class, not `client_disconnected`. Now either is recorded as a caller gone,
    logged as one, and the API returns to the server."""
    caplog.set_level(logging.INFO)
    taken = _served_until_gone(client, "/v1/audit/retrievals", officer, spec_version=spec_version,
                               sends_before_gone=2)
    assert [message["type"] for message in taken] == ["http.response.start", "http.response.body"]
    assert taken[1]["more_body"] and taken[1]["body"].startswith(b"{")
    events = _events_of(settings.resolved_database_url, _request_id(taken))
    assert events == [("export", events[0][1]), ("export_failed", {"export": "export", "error": "client_disconnected"})]
    assert _said(caplog) == ([GONE_LINE], [])


@pytest.mark.parametrize("sends_before_gone", [0, 1])
def test_an_answer_whose_servers_send_raises_is_logged_as_a_client_gone(
        client: TestClient, officer: str, caplog: pytest.LogCaptureFixture, sends_before_gone: int) -> None:
    """A JSON answer (the audit public key) to a caller gone, under ASGI 2.4: the server's OSError, on the answer's
    start or its body, left the API as a crash (the server's traceback). Now it is logged as a client gone and the
    API returns to the server."""
    caplog.set_level(logging.INFO)
    taken = _served_until_gone(client, "/v1/audit/public-key", officer, spec_version="2.4",
                               sends_before_gone=sends_before_gone)
    assert len(taken) == sends_before_gone
    assert _said(caplog) == ([GONE_LINE], [])


def test_an_oserror_of_the_apps_own_stream_is_a_failure_not_a_client_gone(
        client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    """An export stream whose rows fail with an OSError of their own (a disk's: EIO; no real export's rows can be made
    to, so the stream's rows are the test's) while its caller is still there, served by the API's request middleware
    to a server saying ASGI 2.4. Starlette raises that OSError as `ClientDisconnect`: the middleware took that for a
    client gone, logged it as one at INFO and returned to the server as if nothing had failed, and the export's
    `export_failed` said `client_disconnected`. Only the server's send (or `http.disconnect`) says a client gone: the
    failure reaches the server, no client gone is logged, and the export's failure is the OSError's (EIO)."""
    caplog.set_level(logging.INFO)
    recorded: list[BaseException | str] = []  # the export's failure, as `record_failed(failure=...)` was given it

    def rows() -> Iterator[str]:
        yield "{}\n"
        raise OSError(errno.EIO, "Input/output error")

    async def export(scope: Scope, receive: Receive, send: Send) -> None:
        stream = _ExportStream(rows(), media_type="application/x-ndjson",
                               record_failed=lambda failure: recorded.append(failure))
        await stream(scope, receive, send)

    with pytest.raises(Exception) as failed:
        _served_until_gone(client, "/v1/audit/retrievals", "-", spec_version="2.4", sends_before_gone=100,
                           app=RequestContext(export))
    assert isinstance(failed.value, OSError) or isinstance(failed.value.__context__, OSError)
    assert len(recorded) == 1 and isinstance(recorded[0], OSError) and recorded[0].errno == errno.EIO
    assert GONE_LINE not in caplog.messages
