"""`GET /v1/audit/retrievals` served over HTTP as `govrag serve` serves it, its stream cut off midway: the ledger,
which recorded the export before its first row was read, then records it as failed. Against a PostgreSQL database
of the test's own."""

from __future__ import annotations

import logging
import math
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from sqlalchemy import select

from bench.common import PG_ADMIN_DSN
from tests.conftest import PLATFORM_ADMIN, auth
from tests.integration.test_client_gone import GONE_LINE
from tests.support.polling import wait_until
from tests.support.served import served

PADDED_EVENT_BYTES = 1 << 20
CALLER_BUFFER_BYTES = 1 << 16  # the caller's receive buffer, fixed (no autotuning): it holds this much unread


def _ledger_bytes() -> int:
    """More than the loopback connection holds between the API and a caller that stops reading (the server's send
    buffer at its largest, the caller's receive buffer), four times over: the export is midway when the caller
    stops."""
    send_buffer = int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
    return 4 * (send_buffer + CALLER_BUFFER_BYTES)


@pytest.fixture
def served_ledger(make_pg_database: Callable[[], str], tmp_path: Path) -> Iterator[tuple[str, str, str]]:
    """An API on a database of its own, served over HTTP, whose ledger holds the department `hr`'s admin events of
    PADDED_EVENT_BYTES each, `_ledger_bytes()` in all: its URL, the token of a compliance officer in `hr`, the
    database's URL."""
    from api.app import create_app
    from audit import service as audit_service
    from audit.schemas import AdminEventType
    from authz.identity import operator_identity
    from core import migrate
    from core.db import unit_of_work
    from core.settings import Settings
    from retrieval.store import close_vector_store

    url = make_pg_database()
    migrate.upgrade(url)
    settings = Settings(data_dir=tmp_path / "data", database_url=url, broker_url="memory://", inprocess_worker=False,
                        job_sweep_seconds=0, admins=[PLATFORM_ADMIN])
    app = create_app(settings)
    try:
        with served(app) as api_url:
            with _http(api_url) as http:
                admin = auth(app.state.dev_issuer.issue(PLATFORM_ADMIN, []))
                assert http.post("/v1/admin/departments", json={"name": "hr"}, headers=admin).status_code == 201
                assert http.post("/v1/admin/role-assignments", headers=admin, json={
                    "subject": "olga", "role": "compliance", "department": "hr"}).status_code == 201
            with unit_of_work(url) as session:
                for _ in range(math.ceil(_ledger_bytes() / PADDED_EVENT_BYTES)):
                    audit_service.record_admin_event(
                        session=session, identity=operator_identity("seeder"), event_type=AdminEventType.reveal,
                        department="hr", settings=settings, details={"padding": "x" * PADDED_EVENT_BYTES})
            yield api_url, app.state.dev_issuer.issue("olga", []), url
    finally:
        close_vector_store(settings)


def _http(api_url: str) -> httpx.Client:
    """A client whose receive buffer is CALLER_BUFFER_BYTES, going to the API directly (no proxy)."""
    buffer = [(socket.SOL_SOCKET, socket.SO_RCVBUF, CALLER_BUFFER_BYTES)]
    return httpx.Client(base_url=api_url, trust_env=False, timeout=300,
                        transport=httpx.HTTPTransport(socket_options=buffer))


def _ledger_tail(url: str) -> list[tuple[str, str, list[str], dict[str, Any], str]]:
    """The ledger's last two events: their type, subject, departments, details and request id."""
    from core.db import unit_of_work
    from core.models import RetrievalEvent

    with unit_of_work(url) as session:
        events = session.scalars(select(RetrievalEvent).order_by(RetrievalEvent.id.desc()).limit(2)).all()
        return [(event.event_type, event.subject, event.departments_requested, event.details, event.request_id)
                for event in reversed(events)]


def _export_then_failed(url: str, error: str, request_id: str) -> bool:
    """Whether the ledger ends with olga's export of `hr` and its `export_failed` event naming `error`, both of the
    request `request_id`."""
    tail = _ledger_tail(url)
    return [event[:3] for event in tail] == [("export", "olga", ["hr"]), ("export_failed", "olga", ["hr"])] and (
        tail[-1][3] == {"export": "export", "error": error}) and [event[4] for event in tail] == [request_id] * 2


def _drop_the_export_connection(url: str) -> None:
    """The database drops the API's connection reading the export (between two reads, its transaction open), as a
    restart or a failover does; new connections are taken."""
    database = url.rsplit("/", 1)[1]
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as admin:
        dropped = admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND "
                                "state = 'idle in transaction'", (database,)).fetchall()
    assert dropped == [(True,)]


def test_an_export_whose_database_connection_is_lost_midway_is_recorded_as_failed(
        served_ledger: tuple[str, str, str]) -> None:
    """The API's export stream cut off midway by its database connection lost: the caller got no manifest, while the
    ledger ended with the export, as if it had been made. Now an `export_failed` event follows it, by the same
    officer in the same department with the export's request id, naming the error's class, recorded before the
    stream is closed."""
    api_url, token, url = served_ledger
    with _http(api_url) as http, http.stream("GET", "/v1/audit/retrievals", headers=auth(token)) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        assert next(lines).startswith("{")
        assert _ledger_tail(url)[-1][:3] == ("export", "olga", ["hr"])
        _drop_the_export_connection(url)
        with pytest.raises(httpx.RemoteProtocolError):  # no end: cut off
            for line in lines:
                assert not line.startswith('{"manifest"')
    assert _export_then_failed(url, "OperationalError", response.headers["X-Request-ID"])


def test_an_export_whose_caller_goes_away_midway_is_recorded_as_failed(served_ledger: tuple[str, str, str],
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    """The caller of the API's export gone midway (its connection closed): the ledger ended with the export, as if
    it had been received. Now an `export_failed` event follows it, naming no error but `client_disconnected`, and the
    API logs the caller gone (uvicorn, of ASGI 2.3, said it by `http.disconnect`; a server's send that raises is
    test_client_gone.py's), as it did not."""
    caplog.set_level(logging.INFO)
    api_url, token, url = served_ledger
    with _http(api_url) as http, http.stream("GET", "/v1/audit/retrievals", headers=auth(token)) as response:
        assert response.status_code == 200
        assert next(response.iter_lines()).startswith("{")
    request_id = response.headers["X-Request-ID"]
    wait_until(lambda: _export_then_failed(url, "client_disconnected", request_id), 60, "the export recorded as failed")
    wait_until(lambda: GONE_LINE in caplog.messages, 60, "the caller gone logged")
