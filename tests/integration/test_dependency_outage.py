"""An outage of the database or the vector store server is a 503 the client may retry (it was a 500 "internal error",
logged as a crash), and the API recovers by itself when the database is back; so is the blob volume not mounted,
which an ingestion run waits out too. Real PostgreSQL: the test database stops taking connections; a Qdrant URL
where nothing listens; the blob directory renamed away."""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import bindparam, make_url, text
from sqlalchemy.exc import OperationalError

from core.db import get_engine
from core.errors import unavailable_dependency
from tests.conftest import PLATFORM_ADMIN, allow_connections, auth, desk_member
from tests.support.govrag_process import run_govrag
from tests.support.hung_redis import redis_that_hangs
from tests.support.sockets import connections_to
from tests.support.task_retries import Scheduled, task_at_retry

if TYPE_CHECKING:
    from core.settings import Settings
    from retrieval.store import VectorIndex


@pytest.fixture
def outage(make_pg_database: Callable[[], str], tmp_path: Path) -> Iterator[dict[str, object]]:
    from api.app import create_app
    from core import migrate
    from core.settings import Settings
    from retrieval.store import close_vector_store

    url = make_pg_database()
    migrate.upgrade(url)
    settings = Settings(data_dir=tmp_path / "data", database_url=url, broker_url="memory://", inprocess_worker=False,
                        job_sweep_seconds=0, admins=[PLATFORM_ADMIN], authz_policy_check_seconds=0)
    database = url.rsplit("/", 1)[1]
    with TestClient(create_app(settings)) as client:
        try:
            yield {"client": client, "editor": auth(desk_member(client, "editor")), "database": database}
        finally:
            allow_connections(database, True)
    close_vector_store(settings)


def _requests() -> list[tuple[str, str, dict[str, object]]]:
    return [
        ("POST", "/v1/query", {"json": {"question": "When does the desk open?"}}),
        ("GET", f"/v1/documents/{uuid.uuid4()}", {}),
        ("POST", "/v1/documents", {"data": {"department": "desk"}, "files": {"file": ("rota.txt", b"Open at nine.")}}),
    ]


def test_a_database_outage_is_a_503_to_retry_and_the_api_recovers(outage: dict[str, object],
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    client, editor = outage["client"], outage["editor"]
    assert isinstance(client, TestClient) and isinstance(editor, dict)
    allow_connections(str(outage["database"]), False)
    with caplog.at_level(logging.WARNING):
        for method, path, kwargs in _requests():
            response = client.request(method, path, headers=editor, **kwargs)  # type: ignore[arg-type]
            _assert_outage(response, "database")
            assert response.json()["error"]["request_id"] == response.headers["x-request-id"]
    assert not [r for r in caplog.records if r.name == "api.errors" and r.levelno >= logging.ERROR]
    assert [r for r in caplog.records if r.name == "api.errors" and "database unavailable" in r.getMessage()]
    allow_connections(str(outage["database"]), True)
    assert client.post("/v1/query", headers=editor, json={"question": "When does the desk open?"}).status_code == 200
    gone = client.get(f"/v1/documents/{uuid.uuid4()}", headers=editor)
    assert gone.status_code == 404 and "dependency" not in gone.json()["error"], gone.text  # an outage's field only


def _assert_outage(response: httpx.Response, dependency: str) -> None:
    """`response` is the 503 of an outage of `dependency`: named in its error body's `dependency`, which a client
    tells an outage by (`govrag ingest --api-url`), and said in its message, with Retry-After."""
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "unavailable"
    assert response.json()["error"]["dependency"] == dependency, response.text
    assert response.json()["error"]["message"] == f"the {dependency} is unavailable; try again shortly"
    assert response.headers["retry-after"] == "5"


@pytest.mark.parametrize("event", ["retrieval", "admin"])
def test_the_database_going_as_the_audit_log_writes_an_event_is_the_database_outage_s_503(
        outage: dict[str, object], monkeypatch: pytest.MonkeyPatch, event: str) -> None:
    """The audit log's own `unavailable`, raised from the database going as it wrote the event (a query's, an admin
    action's), was a 503 without `dependency` or Retry-After: to a client, a cause to fix rather than an outage to
    wait out. It is now the database outage's 503, and the same request succeeds once the database is back. Real
    PostgreSQL: the database stops taking connections as the event is added."""
    from audit import repository

    client, editor = outage["client"], outage["editor"]
    assert isinstance(client, TestClient) and isinstance(editor, dict)
    admin = auth(client.app.state.dev_issuer.issue(PLATFORM_ADMIN, []))  # type: ignore[attr-defined]
    path, headers, body, status = {
        "retrieval": ("/v1/query", editor, {"question": "When does the desk open?"}, 200),
        "admin": ("/v1/admin/departments", admin, {"name": "front"}, 201)}[event]
    real_add_events = repository.add_events

    def added_as_the_database_goes(*args: object) -> None:
        allow_connections(str(outage["database"]), False)
        real_add_events(*args)  # type: ignore[arg-type]

    with monkeypatch.context() as going:
        going.setattr(repository, "add_events", added_as_the_database_goes)
        response = client.post(path, headers=headers, json=body)
    allow_connections(str(outage["database"]), True)
    _assert_outage(response, "database")
    assert client.post(path, headers=headers, json=body).status_code == status


@contextmanager
def _blob_volume_unmounted(blob_dir: Path) -> Iterator[None]:
    """The blob directory gone for the block, as with its volume not mounted; back (mounted again) after it."""
    aside = blob_dir.with_name(f"{blob_dir.name}.unmounted")
    blob_dir.rename(aside)
    try:
        yield
    finally:
        aside.rename(blob_dir)


def test_an_upload_while_the_blob_volume_is_not_mounted_is_a_503_and_writes_nothing_in_its_place(
        outage: dict[str, object], caplog: pytest.LogCaptureFixture) -> None:
    """An upload with the blob directory missing created it again, on the disk below the mount point: the sealed
    original was hidden, then lost, once the volume was mounted over it, and from then on purges took that
    directory for the volume (removing nothing on it, dropping their records). It is now the 503 of any outage,
    nothing written, no row kept: the same upload is accepted once the volume is back."""
    client, editor = outage["client"], outage["editor"]
    assert isinstance(client, TestClient) and isinstance(editor, dict)
    blob_dir = client.app.state.settings.blob_dir  # type: ignore[attr-defined]
    upload = {"data": {"department": "desk"}, "files": {"file": ("rota.txt", b"The desk opens at nine.")}}
    with _blob_volume_unmounted(blob_dir), caplog.at_level(logging.WARNING):
        response = client.post("/v1/documents", headers=editor, **upload)  # type: ignore[arg-type]
        assert not blob_dir.exists()
    _assert_outage(response, "blob volume")
    assert not [r for r in caplog.records if r.name == "api.errors" and r.levelno >= logging.ERROR]
    assert client.get("/v1/documents", params={"department": "desk"}, headers=editor).json()["documents"] == []
    assert client.post("/v1/documents", headers=editor, **upload).status_code == 202  # type: ignore[arg-type]


def test_a_run_while_the_blob_volume_is_not_mounted_is_waited_out_as_an_outage(outage: dict[str, object]) -> None:
    """A run with the blob directory missing was retried as a fault of the document, 3 times, then failed ("retries
    exhausted") though nothing was wrong with it. It is now an outage, waited out as one of the database is, and
    the run ends ready once the volume is back."""
    from workers.tasks import MAX_RETRIES, OUTAGE_RETRIES, ingest_document

    client, editor = outage["client"], outage["editor"]
    assert isinstance(client, TestClient) and isinstance(editor, dict)
    settings = client.app.state.settings  # type: ignore[attr-defined]
    accepted = client.post("/v1/documents", headers=editor, data={"department": "desk"},
                           files={"file": ("hours.txt", b"The desk closes at five.")})
    assert accepted.status_code == 202, accepted.text
    document_id, job_id = accepted.json()["document_id"], accepted.json()["job_id"]
    scheduled: list[dict[str, object]] = []
    with _blob_volume_unmounted(settings.blob_dir):
        with pytest.raises(Scheduled):  # its ordinary retries used up: still retried
            ingest_document(task_at_retry(settings, MAX_RETRIES, scheduled), document_id, job_id)  # type: ignore[arg-type]
        assert not settings.blob_dir.exists()
    assert [retry["max_retries"] for retry in scheduled] == [OUTAGE_RETRIES]
    assert client.get(f"/v1/jobs/{job_id}", headers=editor).json()["status"] == "queued"  # handed back, not failed
    ingest_document(task_at_retry(settings, MAX_RETRIES + 1, scheduled), document_id, job_id)  # type: ignore[arg-type]
    assert client.get(f"/v1/documents/{document_id}", headers=editor).json()["status"] == "ready"
    assert len(scheduled) == 1


def test_a_refusal_raised_from_an_outage_in_a_run_is_waited_out_as_the_outage(
        outage: dict[str, object], monkeypatch: pytest.MonkeyPatch) -> None:
    """A run caught GovragError (a bad file, a limit, an original lost: the document failed for good) before it asked
    whether the failure was raised from an outage: one was failed "upload it again" though nothing was wrong with
    it. No path raises one today: the original's read is made to turn the blob volume's real outage into its
    refusal. The run now hands its job back to be retried as an outage, and ends ready once the volume is back."""
    from core.errors import ErrorCode, GovragError, Unavailable
    from ingestion import service
    from workers.tasks import OUTAGE_RETRIES, ingest_document

    client, editor = outage["client"], outage["editor"]
    assert isinstance(client, TestClient) and isinstance(editor, dict)
    settings, real_original = client.app.state.settings, service._original  # type: ignore[attr-defined]

    def refused_from_the_outage(*args: object) -> bytes:
        try:
            return real_original(*args)  # type: ignore[arg-type]
        except Unavailable as away:
            raise GovragError(ErrorCode.internal, service.ORIGINAL_UNREADABLE) from away

    monkeypatch.setattr(service, "_original", refused_from_the_outage)
    accepted = client.post("/v1/documents", headers=editor, data={"department": "desk"},
                           files={"file": ("hours.txt", b"The desk closes at five.")})
    assert accepted.status_code == 202, accepted.text
    document_id, job_id = accepted.json()["document_id"], accepted.json()["job_id"]
    scheduled: list[dict[str, object]] = []
    with _blob_volume_unmounted(settings.blob_dir), pytest.raises(Scheduled):
        ingest_document(task_at_retry(settings, 0, scheduled), document_id, job_id)  # type: ignore[arg-type]
    assert [retry["max_retries"] for retry in scheduled] == [OUTAGE_RETRIES]
    assert client.get(f"/v1/jobs/{job_id}", headers=editor).json()["status"] == "queued"  # handed back, not failed
    ingest_document(task_at_retry(settings, 1, scheduled), document_id, job_id)  # type: ignore[arg-type]
    assert client.get(f"/v1/documents/{document_id}", headers=editor).json()["status"] == "ready"


@pytest.mark.parametrize("mount_point", ["missing", "an empty directory"])
def test_an_api_started_while_the_blob_volume_is_not_mounted_writes_nothing_and_takes_the_volume_once_mounted(
        make_pg_database: Callable[[], str], tmp_path: Path, caplog: pytest.LogCaptureFixture,
        mount_point: str) -> None:
    """A start with the blob directory missing created it on the disk below the mount point (an empty mount point
    was taken for the store as it stood): the uploads that followed were hidden, then lost, once the volume was
    mounted. With documents in the database the store existed before: that start now creates nothing and says so,
    queries answer, uploads are the 503 of an outage, and once the volume is mounted it is used without a restart."""
    from api.app import create_app
    from core import migrate
    from core.settings import Settings
    from retrieval.store import close_vector_store

    url = make_pg_database()
    migrate.upgrade(url)
    settings = Settings(data_dir=tmp_path / "data", database_url=url, broker_url="memory://", inprocess_worker=False,
                        job_sweep_seconds=0, admins=[PLATFORM_ADMIN])
    with TestClient(create_app(settings)) as client:  # a fresh deployment: its store is created
        editor = auth(desk_member(client, "editor"))
        assert client.post("/v1/documents", headers=editor, data={"department": "desk"},
                           files={"file": ("rota.txt", b"The desk opens at nine.")}).status_code == 202
    close_vector_store(settings)
    volume = settings.blob_dir.rename(tmp_path / "volume")  # not mounted at the next start
    if mount_point == "an empty directory":
        settings.blob_dir.mkdir()
    upload = {"data": {"department": "desk"}, "files": {"file": ("hours.txt", b"The desk closes at five.")}}
    with caplog.at_level(logging.ERROR, logger="core.blobs"), TestClient(create_app(settings)) as client:
        response = client.post("/v1/documents", headers=editor, **upload)  # type: ignore[arg-type]
        _assert_outage(response, "blob volume")
        said = [r.getMessage() for r in caplog.records if r.name == "core.blobs"]
        assert len(said) == 1 and said[0].startswith("the blob volume is not mounted"), said
        question = {"question": "When does the desk open?"}
        assert client.post("/v1/query", headers=editor, json=question).status_code == 200  # no blob needed
        if mount_point == "an empty directory":
            assert list(settings.blob_dir.iterdir()) == []
            settings.blob_dir.rmdir()
        else:
            assert not settings.blob_dir.exists()
        volume.rename(settings.blob_dir)  # mounted
        assert client.post("/v1/documents", headers=editor, **upload).status_code == 202  # type: ignore[arg-type]
    close_vector_store(settings)


def test_a_vector_store_server_that_does_not_answer_is_a_503(tmp_path: Path) -> None:
    """The production backend (`GOVRAG_QDRANT_URL`) down: queries are a 503 to retry, not a crash."""
    from api.app import create_app
    from core import migrate
    from core.settings import Settings
    from retrieval.store import close_vector_store

    url = f"sqlite:///{tmp_path / 'govrag.db'}"
    migrate.upgrade(url)
    settings = Settings(data_dir=tmp_path / "data", database_url=url, broker_url="memory://", inprocess_worker=False,
                        job_sweep_seconds=0, admins=[PLATFORM_ADMIN], qdrant_url="http://127.0.0.1:9")
    with TestClient(create_app(settings)) as client:
        response = client.post("/v1/query", headers=auth(desk_member(client, "reader")),
                               json={"question": "When does the desk open?"})
        _assert_outage(response, "vector store")
    close_vector_store(settings)


def test_an_identity_provider_that_does_not_answer_is_a_503(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The IdP's key set cannot be fetched: the same 503 to retry as any other outage (it was a 503 without
    Retry-After, under its own message)."""
    from api.app import create_app
    from core import migrate
    from core.settings import Settings
    from retrieval.store import close_vector_store
    from tests.support.oidc_issuer import LocalIssuer

    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    with LocalIssuer() as issuer:
        token = issuer.token()
    url = f"sqlite:///{tmp_path / 'govrag.db'}"
    migrate.upgrade(url)
    settings = Settings(data_dir=tmp_path / "data", database_url=url, broker_url="memory://", inprocess_worker=False,
                        job_sweep_seconds=0, dev_issuer=False, oidc_issuer=issuer.issuer,
                        oidc_audience=issuer.audience, oidc_jwks_url=issuer.jwks_uri)
    with TestClient(create_app(settings)) as client:
        response = client.get(f"/v1/documents/{uuid.uuid4()}", headers={"Authorization": f"Bearer {token}"})
        _assert_outage(response, "identity provider")
        assert token not in response.text
    close_vector_store(settings)


def test_a_statement_postgresql_refuses_for_its_size_is_no_database_outage(settings) -> None:  # type: ignore[no-untyped-def]
    """Every OperationalError was reported as the database being down (a 503 to retry, an outage in the logs), a
    statement with too many parameters too: it fails again whatever the wait. A database that cannot be reached
    stays an outage."""
    too_many = text("SELECT 1 WHERE 1 IN :ids").bindparams(bindparam("ids", expanding=True))
    with get_engine(settings.resolved_database_url).connect() as connection, \
            pytest.raises(OperationalError) as refused:
        connection.execute(too_many, {"ids": list(range(70_000))})
    assert unavailable_dependency(refused.value) is None
    unreachable = make_url(settings.resolved_database_url).set(port=9)  # nothing listens there
    with pytest.raises(OperationalError) as down:
        get_engine(unreachable.render_as_string(hide_password=False)).connect()
    assert unavailable_dependency(down.value) == "database"


@pytest.mark.parametrize("command", ["worker", "serve"])
def test_a_start_whose_database_goes_after_its_schema_check_says_so_in_one_line(
        command: str, make_pg_database: Callable[[], str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str], clean_logging: None) -> None:
    """`govrag worker` and `govrag serve` opened the blob store (`blobs.open_at_start`) after their schema check with
    no outage handling: the database lost between the two ended in the driver's raw traceback (the worker), or in
    uvicorn's "Application startup failed" and its traceback, exit 3 (the server, whose start ran in uvicorn). Each now
    says it as the schema check says an unreachable database, "govrag: cannot reach the database at ...", one line,
    exit 1, the URL's password left out, and starts nothing (uvicorn is not run); the same command starts once the
    database is back. Real PostgreSQL: the database stops taking connections as the schema check returns."""
    from api import cli
    from core import migrate
    from core.settings import get_settings

    url, password = make_pg_database(), "a-password-never-printed"
    migrate.upgrade(url)
    with_password = make_url(url).set(password=password)  # accepted (trust) and never printed
    for name, value in (("DATA_DIR", str(tmp_path)), ("DATABASE_URL", with_password.render_as_string(False)),
                        ("BROKER_URL", "memory://"), ("QDRANT_URL", "http://127.0.0.1:9")):
        monkeypatch.setenv(f"GOVRAG_{name}", value)
    started: list[str] = []
    monkeypatch.setattr("workers.celery_app.GovragCelery.worker_main", lambda *_a, **_k: started.append("worker"))
    monkeypatch.setattr("uvicorn.Server.run",
                        lambda server, **_k: started.append(f"serve {server.config.app.state.started is not None}"))
    real_require_head, database = migrate.require_head, make_url(url).database
    argv = [command, "--port", "0"] if command == "serve" else [command]

    def checked_as_the_database_goes(database_url: str) -> None:
        real_require_head(database_url)
        allow_connections(database, False)

    get_settings.cache_clear()
    try:
        with monkeypatch.context() as outage:
            outage.setattr(migrate, "require_head", checked_as_the_database_goes)
            try:
                assert cli.main(argv) == 1
            finally:
                allow_connections(database, True)
        out, err = capsys.readouterr()
        assert (out, started) == ("", [])
        assert err.count("\n") == 1 and "Traceback" not in err and password not in err, err
        assert err.startswith(f"govrag: cannot reach the database at {with_password.render_as_string()}: "), err
        assert "***" in err
        assert cli.main(argv) == 0  # back: the same command starts
        assert started == [{"worker": "worker", "serve": "serve True"}[command]]  # the server's start not again
    finally:
        get_settings.cache_clear()


def test_a_serve_whose_database_goes_after_it_opened_the_embedded_store_says_so_in_one_line_and_releases_it(
        cli_env: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        clean_logging: None) -> None:
    """Every step of `govrag serve`'s start after the blob store's ran in uvicorn's lifespan: the database lost at one
    (loading the policy, sending again the jobs the in-memory broker lost) ended in "Application startup failed" and a
    traceback naming the database's host, exit 3, the embedded store still held. The whole start now runs before
    uvicorn: "govrag: cannot reach the database at ...", one line, exit 1, uvicorn not run, and the store released
    (another command opens it). Real PostgreSQL: the database stops taking connections as the store opens."""
    from api import app as api_app
    from api import cli
    from retrieval.store import open_vector_store

    served: list[object] = []
    monkeypatch.setattr("uvicorn.Server.run", lambda server, **_k: served.append(server))
    database = make_url(cli_env).database

    def opened_as_the_database_goes(settings: Settings) -> VectorIndex:
        store = open_vector_store(settings)
        allow_connections(str(database), False)
        return store

    monkeypatch.setattr(api_app, "open_vector_store", opened_as_the_database_goes)
    try:
        assert cli.main(["serve", "--port", "0"]) == 1
    finally:
        allow_connections(str(database), True)
    err = capsys.readouterr().err
    assert served == [] and "Traceback" not in err, err[-3000:]
    assert err.splitlines()[-1].startswith(f"govrag: cannot reach the database at {make_url(cli_env)}: "), err[-3000:]
    export = run_govrag(["export", "training-data", "--department", "hr", "-o", str(tmp_path / "hr.jsonl")])
    assert export.returncode == 0, export.stderr[-3000:]


def test_an_api_stopped_closes_its_connections_to_the_identity_provider(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Each start and stop of an API that fetched the IdP's keys left that connection and its event loop open for
    the process's life (the start freezes the garbage collector's view of the app): three starts, none left."""
    from api.app import create_app
    from core import migrate
    from core.settings import Settings
    from retrieval.store import close_vector_store
    from tests.support.oidc_issuer import LocalIssuer

    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    url = f"sqlite:///{tmp_path / 'govrag.db'}"
    migrate.upgrade(url)
    with LocalIssuer() as issuer:
        settings = Settings(data_dir=tmp_path / "data", database_url=url, broker_url="memory://",
                            inprocess_worker=False, job_sweep_seconds=0, dev_issuer=False, oidc_issuer=issuer.issuer,
                            oidc_audience=issuer.audience, oidc_jwks_url=issuer.jwks_uri)
        for _ in range(3):
            with TestClient(create_app(settings)) as client:
                response = client.get(f"/v1/documents/{uuid.uuid4()}",
                                      headers={"Authorization": f"Bearer {issuer.token()}"})
                assert response.status_code == 404
            close_vector_store(settings)
        assert issuer.connections == 3  # one a start, each closed at its stop (main left all three open)
        assert connections_to(urlsplit(issuer.jwks_uri).port or 0) == 0


def test_an_api_stopped_closes_the_connections_it_kept_to_send_jobs_to_the_broker(tmp_path: Path) -> None:
    """The connections kombu pools to send tasks belong to the broker URL in the process, not to the app: each API
    stopped left them open (2 to a Redis broker: the connection's and its channel's) for the pytest process's life,
    or govrag's. Each stop now closes them, and the next API on the URL sends its job on new ones. Real Redis, through
    an endpoint of its own (a port no other test's pool uses), whose connections from this process are counted."""
    from api.app import create_app
    from core import migrate
    from core.settings import Settings
    from retrieval.store import close_vector_store

    url = f"sqlite:///{tmp_path / 'govrag.db'}"
    migrate.upgrade(url)
    with redis_that_hangs() as (endpoint, real, broker_url):
        endpoint.hung = False
        settings = Settings(data_dir=tmp_path / "data", database_url=url, broker_url=broker_url,
                            inprocess_worker=False, job_sweep_seconds=0, admins=[PLATFORM_ADMIN],
                            task_queue=f"closed-{uuid.uuid4().hex[:8]}")
        port, editor = endpoint.server.getsockname()[1], dict[str, str]()
        for n in range(3):
            with TestClient(create_app(settings)) as client:
                editor = editor or auth(desk_member(client, "editor"))
                accepted = client.post("/v1/documents", headers=editor, data={"department": "desk"},
                                       files={"file": (f"note-{n}.txt", f"Note {n}: open at nine.".encode())})
                assert accepted.status_code == 202, accepted.text
                assert connections_to(port) > 0
            close_vector_store(settings)
            assert connections_to(port) == 0, n  # main: 2 after each stop
        assert real.llen(settings.task_queue) == 3  # each API sent its job
        real.delete(*real.keys(f"*{settings.task_queue}*"))


def test_an_api_stopping_leaves_alone_a_connection_another_app_is_sending_on(tmp_path: Path) -> None:
    """kombu pools the connections for sending per broker URL in the process: a test's session API (its worker and
    sweeper threads) and an API another test starts and stops on the same URL share them. The stop force-closed the
    connections in use as well, under the other app's send waiting for Redis's answer, which broke with
    AttributeError ('NoneType' object has no attribute ...) or ValueError, not the broker's error a send is ready
    for (`_published` let it through: an upload's 500, a sweep round failing). Now the stop closes the idle ones
    only: the send waits on, and here, its answer lost to a hung Redis, is retried once and reaches it."""
    from core.settings import Settings
    from workers.celery_app import close_celery, create_celery
    from workers.dispatch import _published

    with redis_that_hangs() as (endpoint, real, broker_url):
        endpoint.hung = False
        settings = Settings(data_dir=tmp_path, database_url=f"sqlite:///{tmp_path / 'govrag.db'}",
                            broker_url=broker_url, task_queue=f"shared-{uuid.uuid4().hex[:8]}")
        sending, stopping = create_celery(settings), create_celery(settings)
        assert _published(sending, "document", "job-1", None)  # its connection now pooled, idle
        endpoint.hung, outcome = True, list[object]()
        send = threading.Thread(target=lambda: outcome.append(_try(_published, sending, "document", "job-2", None)))
        send.start()
        assert endpoint.dropped.wait(30)  # its LPUSH went out on the pooled connection: it waits for the answer
        close_celery(stopping)  # another app's stop, on the same URL
        endpoint.hung = False
        send.join()
        assert outcome == [True]  # main: AttributeError or ValueError
        assert real.llen(settings.task_queue) == 2
        close_celery(stopping)  # idle now: closed
        assert connections_to(endpoint.server.getsockname()[1]) == 0
        real.delete(*real.keys(f"*{settings.task_queue}*"))


def _try(call: Callable[..., object], *args: object) -> object:
    """`call`'s result, or the exception it raised."""
    try:
        return call(*args)
    except Exception as exc:
        return exc
