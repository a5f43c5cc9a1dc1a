"""A master key that does not open the stored keys is refused before anything is served, worked or written: a wrong
GOVRAG_MASTER_KEY, a key file from elsewhere, one lost (never made afresh over stored keys), a replica not given the
version a master rotation made current. Before, `govrag serve` started and /readyz said ready while every query and
upload in an existing department failed with a 500, and new departments' keys were wrapped under the wrong key, lost
once the right one was restored; a replica holding only a retired master version went on wrapping new keys under it.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from api import cli
from api.app import create_app
from authz import service as authz_service
from core import crypto, keystore, migrate
from core.db import unit_of_work
from core.errors import MasterKeyRefused
from core.keystore import KeyStore, keystore_for
from core.models import Document, WrappedKey
from core.settings import Settings, get_settings
from ingestion import keys
from retrieval.store import close_vector_store
from tests.conftest import PLATFORM_ADMIN, auth
from tests.integration.test_master_key_rotation import ROTATOR
from tests.support.govrag_process import govrag_env, run_govrag

WRONG_KEY = base64.b64encode(b"w" * 32).decode()
RESTORE = "restore the master key used to write them"


def _stored(url: str) -> list[tuple[str, str, int, int, bytes]]:
    """Every key row and document, as they are: a refused command changed none."""
    with unit_of_work(url) as session:
        rows = [(r.kind, r.owner, r.version, r.parent_version, r.wrapped) for r in session.scalars(
            select(WrappedKey).order_by(WrappedKey.id))]
        return rows + [("document", d, 0, 0, b"") for d in session.scalars(select(Document.id))]


def _last_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr[-3000:]
    return stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("argv", [
    ["ingest", "{inbox}", "--department", "hr"],
    ["keys", "rotate"],
    ["keys", "rotate", "--master"],
    ["export", "training-data", "--department", "hr", "--output", "{out}"],
    ["audit", "verify"],
], ids=["ingest", "keys-rotate", "keys-rotate-master", "training-export", "audit-verify"])
def test_a_command_opening_the_key_store_refuses_a_master_key_that_does_not_open_the_stored_keys(
        argv: list[str], cli_env: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`hr`'s key is wrapped by the key file's master key; GOVRAG_MASTER_KEY now names another. The ingestion failed
    every file, the department rotation wrapped hr's new key under the wrong master key and dropped the old one (the
    key lost with the right master key back), the master rotation said the key had one version, the export and the
    verification ran. Now: one line, exit 2, nothing written, no key material said."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "leave.md").write_text("Leave policy: 25 days.\n")
    before = _stored(cli_env)
    monkeypatch.setenv("GOVRAG_MASTER_KEY", WRONG_KEY)
    get_settings.cache_clear()
    code = cli.main([part.format(inbox=inbox, out=tmp_path / "out.jsonl") for part in argv])
    stderr = capsys.readouterr().err
    assert (code, _last_line(stderr)) == (2, f"govrag: the master key does not open the stored keys: {RESTORE} "
                                             "(GOVRAG_MASTER_KEY)")
    assert _stored(cli_env) == before
    right = crypto.parse_master_keyring((tmp_path / "data" / "master.key").read_text())
    assert all(secret not in stderr for secret in (WRONG_KEY, *(base64.b64encode(k).decode() for k in right.values())))


def test_a_worker_refuses_a_master_key_that_does_not_open_the_stored_keys(cli_env: str, tmp_path: Path) -> None:
    """A `govrag worker` process (it needs a Qdrant server's URL, never reached before the check) started and took
    jobs it could not decrypt."""
    result = run_govrag(["worker"], timeout=300, env=govrag_env(
        data_dir=str(tmp_path / "data"), database_url=cli_env, master_key=WRONG_KEY, qdrant_url="http://127.0.0.1:9"))
    assert (result.returncode, _last_line(result.stderr)) == (
        2, f"govrag: the master key does not open the stored keys: {RESTORE} (GOVRAG_MASTER_KEY)")


def _replaced(key_file: Path) -> None:
    key_file.write_text(crypto.format_master_keyring({1: crypto.new_key()}))  # one from elsewhere


def _lost(key_file: Path) -> None:
    key_file.unlink()


@pytest.mark.parametrize("cli_env", ["embedded"], indirect=True)
@pytest.mark.parametrize(("spoil", "why"), [
    (_replaced, ""),
    (_lost, " (the key file {key_file} does not exist; no new one is made over them)"),
], ids=["replaced", "lost"])
def test_an_embedded_serve_refuses_a_key_file_that_does_not_open_the_stored_keys(
        spoil: Callable[[Path], None], why: str, cli_env: str, tmp_path: Path) -> None:
    """The embedded default's key file restored from elsewhere, or lost: `govrag serve` started (a lost one made
    afresh, the keys under the old one unreadable for good unless it was found). Now one line, exit 2, nothing
    written, no key file made."""
    data_dir = tmp_path / "data"
    key_file = data_dir / "master.key"
    spoil(key_file)
    spoiled = key_file.read_bytes() if key_file.exists() else None
    before = _stored(cli_env)
    result = run_govrag(["serve", "--port", "0"], timeout=300, env=govrag_env(data_dir=str(data_dir)))
    assert (result.returncode, _last_line(result.stderr)) == (
        2, f"govrag: the master key does not open the stored keys{why.format(key_file=key_file)}: {RESTORE} "
           f"(GOVRAG_MASTER_KEY or {key_file})")
    assert "Started server process" not in result.stderr
    assert (key_file.read_bytes() if key_file.exists() else None) == spoiled
    assert _stored(cli_env) == before


@pytest.fixture
def master_check_seconds() -> float:
    """How long /readyz keeps its answer about the master key: asked afresh on each probe unless a test says."""
    return 0.0


@pytest.fixture
def served(make_pg_database: Callable[[], str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
           master_check_seconds: float) -> Iterator[tuple[TestClient, Settings]]:
    """A running API on a database of its own, its key file in its data dir, the department `hr` made."""
    monkeypatch.setattr(keystore, "MASTER_CHECK_SECONDS", master_check_seconds)
    url = make_pg_database()
    migrate.upgrade(url)
    settings = Settings(data_dir=tmp_path / "data", database_url=url, broker_url="memory://", inprocess_worker=False,
                        job_sweep_seconds=0)
    with unit_of_work(url) as session:
        keystore_for(settings).create_department_key(session=session, department="hr")
    try:
        with TestClient(create_app(settings)) as client:
            yield client, settings
    finally:
        close_vector_store(settings)


def test_readyz_reports_a_master_key_that_no_longer_opens_the_stored_keys(
        served: tuple[TestClient, Settings]) -> None:
    """The key file replaced under a running replica (re-read when it changes): /readyz said ready. Now 503 with
    `checks.master_key: "mismatch"` and the line a start is refused with, until the right key is back."""
    client, settings = served
    key_file = settings.resolved_master_key_file
    right = crypto.parse_master_keyring(key_file.read_text())
    assert client.get("/readyz").json()["checks"]["master_key"] == "ok"
    with crypto.master_keyring_lock(key_file):
        crypto.write_master_keyring(key_file, {1: crypto.new_key()})
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["checks"]["master_key"] == "mismatch"
    assert response.json()["reason"] == (f"the master key does not open the stored keys: {RESTORE} (GOVRAG_MASTER_KEY "
                                         f"or {key_file})")
    with crypto.master_keyring_lock(key_file):
        crypto.write_master_keyring(key_file, right)
    assert client.get("/readyz").json()["checks"]["master_key"] == "ok"


@pytest.mark.parametrize("master_check_seconds", [3600.0])
def test_readyz_keeps_its_answer_about_the_master_key_for_a_while(served: tuple[TestClient, Settings]) -> None:
    """Probes come every few seconds from each replica's orchestrator: each one ran the check's queries and unwraps.
    The answer is kept MASTER_CHECK_SECONDS (a key file replaced meanwhile is noticed once it is asked again)."""
    client, settings = served
    assert client.get("/readyz").json()["checks"]["master_key"] == "ok"
    with crypto.master_keyring_lock(settings.resolved_master_key_file):
        crypto.write_master_keyring(settings.resolved_master_key_file, {1: crypto.new_key()})
    assert client.get("/readyz").json()["checks"]["master_key"] == "ok"


def test_a_replica_without_the_current_master_version_wraps_nothing_under_a_retired_one(
        make_pg_database: Callable[[], str], tmp_path: Path) -> None:
    """Keys from settings, rotated to v2 (v1 retired); a replica still given only v1 wrapped the next department's
    key under v1: readable by no replica given v2 alone. Its start is refused, and so is each wrap."""
    url = make_pg_database()
    migrate.upgrade(url)
    old, new = (base64.b64encode(crypto.new_key()).decode() for _ in range(2))
    with unit_of_work(url) as session:
        KeyStore(crypto.parse_master_keyring(old)).create_department_key(session=session, department="alpha")
    rotating = Settings(data_dir=tmp_path, database_url=url, master_key=f"v2:{new},v1:{old}")
    report = keys.rotate_master_key(settings=rotating, identity=ROTATOR)
    assert report.retired_versions == (1,)
    stale = Settings(data_dir=tmp_path, database_url=url, master_key=old)
    with pytest.raises(MasterKeyRefused) as refused:
        keystore.require_master_opens(stale)
    assert str(refused.value) == (f"the master key does not open the stored keys (it has no version 2, which wraps "
                                  f"some of them): {RESTORE} (GOVRAG_MASTER_KEY)")
    before = _stored(url)
    with unit_of_work(url) as session, pytest.raises(MasterKeyRefused, match=r"no version 2, the current one"):
        KeyStore(crypto.parse_master_keyring(old)).create_department_key(session=session, department="beta")
    assert _stored(url) == before
    keystore.require_master_opens(Settings(data_dir=tmp_path, database_url=url, master_key=f"v2:{new}"))


def test_a_running_replica_left_without_the_current_master_version_answers_503_creating_a_department(
        make_pg_database: Callable[[], str], tmp_path: Path) -> None:
    """A replica running with only v1 while a master rotation made v2 current: `POST /v1/admin/departments` was a 500
    ("internal error"). Now a 503 that says what to do, no key material in it, and no department made."""
    url = make_pg_database()
    migrate.upgrade(url)
    old, new = (base64.b64encode(crypto.new_key()).decode() for _ in range(2))
    stale = Settings(data_dir=tmp_path / "data", database_url=url, broker_url="memory://", inprocess_worker=False,
                     job_sweep_seconds=0, master_key=old, admins=[PLATFORM_ADMIN])
    with unit_of_work(url) as session:
        authz_service.create_department(session=session, keystore=keystore_for(stale), name="alpha")
    rotating = Settings(data_dir=tmp_path, database_url=url, master_key=f"v2:{new},v1:{old}")
    try:
        with TestClient(create_app(stale)) as client:
            keys.rotate_master_key(settings=rotating, identity=ROTATOR)  # after the replica started
            before = _stored(url)
            admin = auth(client.app.state.dev_issuer.issue(PLATFORM_ADMIN, []))  # type: ignore[attr-defined]
            response = client.post("/v1/admin/departments", json={"name": "beta"}, headers=admin)
            listed = client.get("/v1/admin/departments", headers=admin).json()
    finally:
        close_vector_store(stale)
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "unavailable"
    assert response.json()["error"]["message"] == ("the master key does not open the stored keys (it has no version 2, "
                                                   f"the current one): {RESTORE} (GOVRAG_MASTER_KEY)")
    assert old not in response.text and new not in response.text
    assert _stored(url) == before
    assert listed == [{"name": "alpha"}]
