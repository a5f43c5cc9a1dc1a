"""The API run as `govrag serve` runs it under uvicorn: no log record carries a request's query string (uvicorn's
access line would: the raw request line), and each request is logged as its method, route template and status."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn

from api import serving
from api.app import create_app
from core import migrate
from core.settings import Settings
from tests.support.polling import wait_until

MARKER = "zqmarker41"  # nothing the masks replace


class _Records(logging.Handler):
    """Every record that reaches the root logger, as its rendered message and logger name."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[tuple[str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append((record.name, record.getMessage()))


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, uvicorn.Server]]:
    """The app under a real uvicorn server configured as `govrag serve` configures it, on a free port."""
    settings = Settings(data_dir=tmp_path, admins=["admin"], broker_url="memory://", inprocess_worker=False)
    migrate.upgrade(settings.resolved_database_url)
    root = logging.getLogger()
    saved = {name: (lg.handlers[:], lg.propagate) for name, lg in logging.Logger.manager.loggerDict.items()
             if isinstance(lg, logging.Logger)}
    root_saved = (root.handlers[:], root.level)
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=0, **serving.UVICORN_OPTIONS))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 120
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.1)
        port = server.servers[0].sockets[0].getsockname()[1]
        yield f"http://127.0.0.1:{port}", server
    finally:
        server.should_exit = True
        thread.join(60)
        for name, (handlers, propagate) in saved.items():
            logger = logging.getLogger(name)
            logger.handlers[:], logger.propagate = handlers, propagate
        root.handlers[:], root.level = root_saved


def test_a_query_string_reaches_no_log_record_and_each_request_is_logged(
        served: tuple[str, uvicorn.Server]) -> None:
    base, server = served
    records = _Records()
    root = logging.getLogger()
    root.addHandler(records)
    root.setLevel(logging.INFO)
    token = server.config.app.state.dev_issuer.issue("auditor", [])
    try:
        with httpx.Client(base_url=base, timeout=30) as http:
            statuses = [
                http.get(f"/healthz?user={MARKER}").status_code,
                http.get("/v1/audit/retrievals", params={"user": MARKER, "junk": MARKER * 1000},
                         headers={"Authorization": f"Bearer {token}"}).status_code,
                http.get(f"/{MARKER}?user={MARKER}").status_code,
            ]
        expected = (f"GET /healthz {statuses[0]} ", f"GET /v1/audit/retrievals {statuses[1]} ",
                    f"GET unmatched {statuses[2]} ")
        # The middleware logs a request once its response is sent, on the server's thread: this client may read the
        # last response before that line is written.
        wait_until(lambda: all(_logged(records, start) for start in expected), 60, f"a log line for each of {expected}")
    finally:
        root.removeHandler(records)
    server_lines = [line for line in records.lines if line[0] != "httpx"]  # httpx: this test's own client
    assert not [line for line in server_lines if MARKER in line[1]]
    assert not [line for line in server_lines if line[0] == "uvicorn.access"]


def _logged(records: _Records, start: str) -> bool:
    """Whether the API logged a request line beginning `start` (its method, route template and status)."""
    return any(name == "api.app" and message.startswith(start) for name, message in records.lines)
