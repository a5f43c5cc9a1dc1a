"""Shared fixtures: a fresh PostgreSQL database, Redis as the broker, a real Celery worker, local Qdrant."""

from __future__ import annotations

import os

for _name, _value in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("DO_NOT_TRACK", "1"),
                      ("UNSTRUCTURED_DISABLE_NOTICE", "1"), ("TOKENIZERS_PARALLELISM", "false")):
    os.environ[_name] = _value

import logging  # noqa: E402
import struct  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
import weakref  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from contextlib import ExitStack  # noqa: E402
from pathlib import Path  # noqa: E402

import psycopg  # noqa: E402
import pytest  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from sqlalchemy import Connection, Engine, event, make_url  # noqa: E402

from bench.common import PG_ADMIN_DSN, throwaway_postgres  # noqa: E402

REDIS_URL = os.environ.get("GOVRAG_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
PLATFORM_ADMIN = "root-admin"


# The URLs of the databases the running test made: their engines' pooled connections are closed after it
# (`_close_the_pooled_connections_of_its_databases`), else each test's pool stays open until the session ends and
# the suite runs out of PostgreSQL's connections (max_connections, 100 here).
_MADE_BY_THIS_TEST: list[str] = []


@pytest.fixture
def clean_logging() -> Iterator[None]:
    """Restore the logging tree afterwards (other tests share the process): a test whose command configures logging
    (`core.logs.configure_logging`) leaves no handler writing to its captured stderr, closed once it ends."""
    root = logging.getLogger()
    saved = {name: (lg.handlers[:], lg.propagate, lg.level) for name, lg in logging.Logger.manager.loggerDict.items()
             if isinstance(lg, logging.Logger)}
    root_saved = (root.handlers[:], root.level)
    yield
    for name, (handlers, propagate, level) in saved.items():
        logger = logging.getLogger(name)
        logger.handlers[:], logger.propagate, logger.level = handlers, propagate, level
    root.handlers[:], root.level = root_saved


@pytest.fixture(scope="session")
def make_pg_database() -> Iterator[Callable[[], str]]:
    """Creates throw-away databases on the machine's PostgreSQL; all dropped at the end."""
    with ExitStack() as databases:

        def make() -> str:
            url = databases.enter_context(throwaway_postgres("govrag_test"))
            _MADE_BY_THIS_TEST.append(url)
            return url

        yield make


# The engines (`core.db.get_engine`, one per URL for the process's life) the running test connected: after it, the
# idle pooled connections of those that reach a database it made (however its URL was spelt: a password added, as
# `govrag serve`'s test of its printed URL adds one, is another engine) or a SQLite file (a test's own database file
# in tmp_path kept each pooled connection's descriptors, the file, its -wal and -shm, ~3 a test and over a thousand
# by the end of the suite) are closed.
_ENGINES_USED: weakref.WeakSet[Engine] = weakref.WeakSet()


@event.listens_for(Engine, "engine_connect")
def _note_an_engine(connection: Connection) -> None:
    _ENGINES_USED.add(connection.engine)


@pytest.fixture(autouse=True)
def _close_the_pooled_connections_of_its_databases() -> Iterator[None]:
    """After each test, the idle pooled connections to the databases it made or the SQLite files it used are closed
    (an engine still in use, by a fixture shared with later tests, opens new ones when asked)."""
    yield
    made = {make_url(url).database for url in _MADE_BY_THIS_TEST}
    _MADE_BY_THIS_TEST.clear()
    for engine in list(_ENGINES_USED):
        if engine.dialect.name == "sqlite" or engine.url.database in made:
            engine.dispose()
    _ENGINES_USED.clear()


def allow_connections(database: str, allowed: bool) -> None:
    """The test database stops taking connections (those open are dropped too: the server went away), or takes them
    again: a database outage, and its end."""
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as admin:
        admin.execute(f'ALTER DATABASE "{database}" WITH ALLOW_CONNECTIONS {str(allowed).lower()}')
        if not allowed:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (database,))


@pytest.fixture(scope="session")
def pg_url(make_pg_database: Callable[[], str]) -> str:
    """A migrated PostgreSQL database for the integration suite."""
    from core import migrate

    url = make_pg_database()
    migrate.upgrade(url)
    return url


@pytest.fixture
def cli_env(request: pytest.FixtureRequest, make_pg_database: Callable[[], str], tmp_path: Path,
            monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """GOVRAG_* variables for a fresh database at the code's revision and a data dir tmp_path/data; the department `hr`
    exists. The database is PostgreSQL, or the embedded default (SQLite in the data dir) for a test parametrizing
    `cli_env` (indirect) with "embedded"."""
    from authz import service as authz_service
    from core import migrate
    from core.db import unit_of_work
    from core.keystore import keystore_for
    from core.settings import get_settings
    from retrieval.store import close_vector_store

    monkeypatch.setenv("GOVRAG_DATA_DIR", str(tmp_path / "data"))
    if getattr(request, "param", "postgresql") == "embedded":
        monkeypatch.delenv("GOVRAG_DATABASE_URL", raising=False)
        (tmp_path / "data").mkdir()
    else:
        monkeypatch.setenv("GOVRAG_DATABASE_URL", make_pg_database())
    get_settings.cache_clear()
    settings = get_settings()
    url = settings.resolved_database_url
    migrate.upgrade(url)
    with unit_of_work(url) as session:
        authz_service.create_department(session=session, keystore=keystore_for(settings), name="hr")
    yield url
    close_vector_store(settings)
    get_settings.cache_clear()


@pytest.fixture(scope="session")
def settings(pg_url: str, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """The production shape where the machine allows: PostgreSQL, Redis broker; Qdrant in local mode."""
    from core.settings import Settings

    return Settings(
        data_dir=tmp_path_factory.mktemp("govrag-data"), database_url=pg_url, broker_url=REDIS_URL,
        task_queue=f"govrag-test-{uuid.uuid4().hex[:8]}", inprocess_worker=True, admins=[PLATFORM_ADMIN],
        max_upload_bytes=2 * 1024 * 1024,
    )


@pytest.fixture(scope="session")
def client(settings) -> Iterator[TestClient]:  # type: ignore[no-untyped-def]
    """The API with a real Celery worker thread consuming from Redis (embedded Qdrant allows one process)."""
    from api.app import create_app
    from retrieval.store import close_vector_store

    with TestClient(create_app(settings)) as test_client:
        yield test_client
    close_vector_store(settings)


@pytest.fixture(scope="session")
def issue_token(client: TestClient) -> Callable[..., str]:
    """Tokens from the app's dev issuer: issue_token("alice", ["hr-staff"])."""
    issuer = client.app.state.dev_issuer  # type: ignore[attr-defined]

    def issue(subject: str, groups: list[str] | None = None, **kwargs: object) -> str:
        return issuer.issue(subject, groups or [], **kwargs)  # type: ignore[no-any-return]

    return issue


def auth(token: str) -> dict[str, str]:
    """An Authorization header."""
    return {"Authorization": f"Bearer {token}"}


def damaged_doc() -> bytes:
    """An OLE2 header (the legacy Office magic) claiming 2**65535-byte sectors: a .doc no reader can open."""
    header = bytearray(b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(504))
    header[0x18:0x22] = struct.pack("<HH2sHH", 0x3E, 3, b"\xfe\xff", 0xFFFF, 6)
    return bytes(header) + bytes(1024)


def desk_member(client: TestClient, role: str) -> str:
    """On a fresh app: a department `desk` where `stella` holds `role` (granted by the platform admin); her token."""
    issuer = client.app.state.dev_issuer  # type: ignore[attr-defined]
    admin = auth(issuer.issue(PLATFORM_ADMIN, []))
    assert client.post("/v1/admin/departments", json={"name": "desk"}, headers=admin).status_code == 201
    assert client.post("/v1/admin/role-assignments", headers=admin,
                       json={"subject": "stella", "role": role, "department": "desk"}).status_code == 201
    return str(issuer.issue("stella", []))


def wait_for_job(client: TestClient, token: str, job_id: str, timeout: float = 180.0) -> dict[str, object]:
    """Poll a job until it has ended (ready, failed, quarantined, or withdrawn because its document was deleted)."""
    return _poll(client, token, f"/v1/jobs/{job_id}", ("queued", "processing"), timeout, "ingestion job")


def wait_for_document(client: TestClient, token: str, document_id: str, timeout: float = 180.0) -> dict[str, object]:
    """Poll a document until it reaches a final state (quarantined and rejected count)."""
    return _poll(client, token, f"/v1/documents/{document_id}", ("queued", "processing"), timeout, "document")


def wait_for_attachments(client: TestClient, token: str, document_id: str, timeout: float = 60.0) -> dict[str, object]:
    """Poll an ingested e-mail until its attachments have been taken (`attachment_ids` is set)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        document = client.get(f"/v1/documents/{document_id}", headers=auth(token)).json()
        if document["attachment_ids"]:
            return document  # type: ignore[no-any-return]
        time.sleep(0.25)
    raise AssertionError("the attachments were not taken in time")


def _poll(client: TestClient, token: str, url: str, pending: tuple[str, ...], timeout: float,
          what: str) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = client.get(url, headers=auth(token))
        assert response.status_code == 200, response.text
        if response.json()["status"] not in pending:
            return response.json()  # type: ignore[no-any-return]
        time.sleep(0.25)
    raise AssertionError(f"{what} did not finish in time")
