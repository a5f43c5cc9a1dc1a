"""A master key that does not open the stored keys is refused before anything is served, worked or written: a wrong
GOVRAG_MASTER_KEY, a key file from elsewhere, one lost (never made afresh over stored keys), a replica not given the
version a master rotation made current. Before, `govrag serve` started and /readyz said ready while every query and
upload in an existing department failed with a 500, and new departments' keys were wrapped under the wrong key, lost
once the right one was restored; a replica holding only a retired master version went on wrapping new keys under it.
"""

from __future__ import annotations

import base64
import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import delete, event, select

from api import cli
from api.app import create_app
from authz import service as authz_service
from core import crypto, keystore, migrate
from core.db import get_engine, unit_of_work
from core.errors import MasterKeyRefused
from core.keystore import KeyStore, keystore_for
from core.models import Document, MasterKeyVerifier, WrappedKey
from core.settings import Settings, get_settings
from ingestion import keys
from retrieval.onnx_embedder import onnx_path
from retrieval.store import close_vector_store
from tests.conftest import PLATFORM_ADMIN, auth, desk_member
from tests.integration.test_master_key_rotation import ROTATOR
from tests.support.govrag_process import govrag_env, run_govrag, start_refusal
from tests.support.schema_revision import set_revision

WRONG_KEY = base64.b64encode(b"w" * 32).decode()
RESTORE = "restore the master key used to write them"
START_AFRESH = "or, if it is lost for good, delete the rows of table master_key_verifiers and start again"


def _stored(url: str) -> list[tuple[str, str, int, int, bytes]]:
    """Every key row, master key verifier and document, as they are: a refused command changed none."""
    with unit_of_work(url) as session:
        rows = [(r.kind, r.owner, r.version, r.parent_version, r.wrapped) for r in session.scalars(
            select(WrappedKey).order_by(WrappedKey.id))]
        verifiers = [("verifier", "", v.version, v.version, v.sealed) for v in session.scalars(
            select(MasterKeyVerifier).order_by(MasterKeyVerifier.version))]
        return rows + verifiers + [("document", d, 0, 0, b"") for d in session.scalars(select(Document.id))]


def _verifiers(url: str) -> list[int]:
    """The master key versions a verifier is stored for."""
    with unit_of_work(url) as session:
        return list(session.scalars(select(MasterKeyVerifier.version).order_by(MasterKeyVerifier.version)))


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


@pytest.mark.parametrize("cli_env", ["postgresql", "embedded"], indirect=True)
def test_a_command_that_only_reads_writes_no_verifier_on_a_database_from_before_verifiers(
        cli_env: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`hr`'s key stored before migration 0018 (no verifier): `govrag audit verify`, an export and its check stored
    the master key's verifier, a write by a command that only reads (the database of a read-only replica, an
    auditor's login). They now check the master key and write nothing; `govrag serve` stores it at its start."""
    with unit_of_work(cli_env) as session:
        session.execute(delete(MasterKeyVerifier))
    before = _stored(cli_env)
    exported = tmp_path / "ledger.jsonl"
    for argv in (["audit", "verify"], ["audit", "export", "--output", str(exported)],
                 ["audit", "verify-export", str(exported)],
                 ["export", "training-data", "--department", "hr", "--output", str(tmp_path / "training.jsonl")]):
        assert cli.main(argv) == 0, capsys.readouterr().err
        assert _stored(cli_env) == before, argv


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
    (_lost, " (the key file does not exist; no new one is made over them)"),
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
        2, f"govrag: the master key does not open the stored keys{why}: {RESTORE} "
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
    """A running API on a database of its own, its key file in its data dir, the department `hr` made, the
    platform admin PLATFORM_ADMIN."""
    monkeypatch.setattr(keystore, "MASTER_CHECK_SECONDS", master_check_seconds)
    monkeypatch.setattr(migrate, "SCHEMA_CHECK_SECONDS", 0.0)  # the schema asked afresh on each probe
    url = make_pg_database()
    migrate.upgrade(url)
    settings = Settings(data_dir=tmp_path / "data", database_url=url, broker_url="memory://", inprocess_worker=False,
                        job_sweep_seconds=0, admins=[PLATFORM_ADMIN])
    with unit_of_work(url) as session:
        keystore_for(settings).create_department_key(session=session, department="hr")
    try:
        with TestClient(create_app(settings)) as client:
            yield client, settings
    finally:
        close_vector_store(settings)


def test_readyz_reports_a_master_key_that_no_longer_opens_the_stored_keys(
        served: tuple[TestClient, Settings], caplog: pytest.LogCaptureFixture) -> None:
    """The key file replaced under a running replica (re-read when it changes): /readyz said ready. Now 503 with
    `checks.master_key: "mismatch"` and the line a start is refused with, until the right key is back. The key file's
    path is in the server's log line only: /readyz asks no login (it named the path to anyone)."""
    client, settings = served
    key_file = settings.resolved_master_key_file
    right = crypto.parse_master_keyring(key_file.read_text())
    assert client.get("/readyz").json()["checks"]["master_key"] == "ok"
    with crypto.master_keyring_lock(key_file):
        crypto.write_master_keyring(key_file, {1: crypto.new_key()})
    with caplog.at_level(logging.WARNING, logger="api.routers.health"):
        response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["checks"]["master_key"] == "mismatch"
    assert response.json()["reason"] == (f"the master key does not open the stored keys: {RESTORE} (GOVRAG_MASTER_KEY "
                                         "or the master key file)")
    assert str(key_file) not in response.text and str(settings.data_dir) not in response.text
    assert f"{RESTORE} (GOVRAG_MASTER_KEY or {key_file})" in caplog.text
    with crypto.master_keyring_lock(key_file):
        crypto.write_master_keyring(key_file, right)
    assert client.get("/readyz").json()["checks"]["master_key"] == "ok"


def test_readyz_says_the_master_key_file_is_missing(served: tuple[TestClient, Settings],
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """The key file deleted under a running replica: /readyz read `checks.master_key: "down"`, no reason, as if the
    database were away. Now "missing" (not "mismatch": no key fails, there is none), a reason that says so without
    the path (in the log line), and "ok" once it is restored."""
    client, settings = served
    key_file = settings.resolved_master_key_file
    kept = key_file.read_bytes()
    key_file.unlink()
    with caplog.at_level(logging.WARNING, logger="api.routers.health"):
        response = client.get("/readyz")
    assert (response.status_code, response.json()["checks"]["master_key"]) == (503, "missing")
    assert response.json()["reason"] == ("the master key does not open the stored keys (the key file does not exist; "
                                         f"no new one is made over them): {RESTORE} (GOVRAG_MASTER_KEY or the master "
                                         "key file)")
    assert str(settings.data_dir) not in response.text
    assert f"(GOVRAG_MASTER_KEY or {key_file})" in caplog.text
    key_file.write_bytes(kept)
    key_file.chmod(0o600)
    assert client.get("/readyz").json()["checks"]["master_key"] == "ok"


def _made_a_folder(key_file: Path) -> None:
    key_file.unlink()
    key_file.mkdir()


def _garbled(key_file: Path) -> None:
    key_file.write_bytes(b"\xff" + key_file.read_bytes())  # not UTF-8: its UnicodeDecodeError held the file's bytes


@pytest.mark.parametrize(("spoil", "reason"), [
    (_made_a_folder, "Is a directory"),
    (_garbled, "it does not hold `v<N>:<base64>` entries"),
], ids=["unreadable", "garbled"])
def test_a_key_file_that_cannot_be_read_under_a_running_replica_is_refused_clearly(
        spoil: Callable[[Path], None], reason: str, served: tuple[TestClient, Settings],
        caplog: pytest.LogCaptureFixture) -> None:
    """The key file made unreadable or garbled under a running replica (read again when it changes, and once its copy
    is GOVRAG_KEY_CACHE_SECONDS old): its OSError or UnicodeDecodeError (which holds the file's bytes) was a request's
    500 and /readyz's "down". Now the master key refusal: 503, `checks.master_key: "unreadable"`, the reason said,
    never the file's bytes, its path in the server's log only; "ok" once the file is back."""
    client, settings = served
    key_file = settings.resolved_master_key_file
    kept = key_file.read_bytes()
    spoil(key_file)
    admin = auth(client.app.state.dev_issuer.issue(PLATFORM_ADMIN, []))  # type: ignore[attr-defined]
    with caplog.at_level(logging.WARNING):
        ready = client.get("/readyz")
        created = client.post("/v1/admin/departments", json={"name": "beta"}, headers=admin)
    line = f"the master key does not open the stored keys (the key file cannot be read: {reason}): {RESTORE} "
    assert (ready.status_code, ready.json()["checks"]["master_key"]) == (503, "unreadable")
    assert ready.json()["reason"] == f"{line}(GOVRAG_MASTER_KEY or the master key file)"
    assert (created.status_code, created.json()["error"]) == (503, {
        "code": "unavailable", "message": f"{line}(GOVRAG_MASTER_KEY or the master key file)",
        "request_id": created.json()["error"]["request_id"]})
    assert f"{line}(GOVRAG_MASTER_KEY or {key_file})" in caplog.text
    shown = ready.text + created.text + caplog.text
    assert "Traceback" not in shown and str(settings.data_dir) not in ready.text + created.text
    masters = crypto.parse_master_keyring(kept.decode()).values()
    assert all(base64.b64encode(key).decode() not in shown for key in masters)
    if key_file.is_dir():
        key_file.rmdir()
    key_file.write_bytes(kept)
    assert client.get("/readyz").json()["checks"]["master_key"] == "ok"


def _probes(client: TestClient, count: int) -> set[int]:
    """The statuses of `count` probes of /readyz."""
    return {client.get("/readyz").status_code for _ in range(count)}


def _said(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str]]:
    """Each WARNING (or worse) logged, and each line readiness logged, with its level."""
    return [(record.levelname, record.getMessage()) for record in caplog.records
            if record.levelno >= logging.WARNING or record.name == "api.routers.health"]


def test_readyz_logs_why_it_is_not_ready_once_per_change(served: tuple[TestClient, Settings],
                                                          caplog: pytest.LogCaptureFixture) -> None:
    """Refused, /readyz logged its WARNING at each probe (every few seconds, from each orchestrator), the same line
    for as long as the key stayed wrong. It now logs when why it is not ready changes: once as the key stops opening
    the stored keys, once more (INFO) as it is ready again, once as its key file is then deleted; each probe is still
    answered 503 (and counted as one by govrag_http_requests_total)."""
    client, settings = served
    key_file = settings.resolved_master_key_file
    right = key_file.read_bytes()
    with caplog.at_level(logging.INFO):
        assert _probes(client, 2) == {200}
        with crypto.master_keyring_lock(key_file):
            crypto.write_master_keyring(key_file, {1: crypto.new_key()})
        assert _probes(client, 3) == {503}
        key_file.write_bytes(right)
        assert _probes(client, 2) == {200}
        key_file.unlink()
        assert _probes(client, 3) == {503}
    assert _said(caplog) == [
        ("WARNING", f"not ready: master_key mismatch (the master key does not open the stored keys: {RESTORE} "
                    f"(GOVRAG_MASTER_KEY or {key_file}))"),
        ("INFO", "master_key ok again"),
        ("WARNING", "not ready: master_key missing (the master key does not open the stored keys (the key file does "
                    f"not exist; no new one is made over them): {RESTORE} (GOVRAG_MASTER_KEY or {key_file}))")]


def test_readyz_says_each_checks_reason_once_while_another_comes_and_goes(served: tuple[TestClient, Settings],
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    """The master key refused, then the schema changed under the API and put back: /readyz logged every failing
    check's reason as one line, so the master key's WARNING was said again as the schema's came and again as it went,
    and no line said the schema was back. Each check's reason is now said once as it appears, and once (INFO) as that
    check is ok again; each probe is still answered 503 until both are."""
    client, settings = served
    key_file, url = settings.resolved_master_key_file, settings.resolved_database_url
    right = key_file.read_bytes()
    with caplog.at_level(logging.INFO):
        with crypto.master_keyring_lock(key_file):
            crypto.write_master_keyring(key_file, {1: crypto.new_key()})
        assert _probes(client, 3) == {503}
        set_revision(url, "0008")
        assert _probes(client, 3) == {503}
        set_revision(url, migrate.head_revision())
        assert _probes(client, 3) == {503}
        key_file.write_bytes(right)
        assert _probes(client, 2) == {200}
    assert _said(caplog) == [
        ("WARNING", f"not ready: master_key mismatch (the master key does not open the stored keys: {RESTORE} "
                    f"(GOVRAG_MASTER_KEY or {key_file}))"),
        ("WARNING", f"not ready: schema mismatch (database schema is at 0008, this release needs "
                    f"{migrate.head_revision()}: run `govrag migrate`)"),
        ("INFO", "schema ok again"),
        ("INFO", "master_key ok again")]


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


@pytest.mark.parametrize("database", ["postgresql", "embedded"])
def test_serve_refuses_a_wrong_master_key_before_any_department_is_made(
        database: str, make_pg_database: Callable[[], str], tmp_path: Path) -> None:
    """Nothing was sealed under the master key until the first department was made: a wrong GOVRAG_MASTER_KEY (another
    installation's, a secret mistyped) passed the check and `govrag serve` started, to wrap that department's key under
    it (lost once the right key was back) and sign audit checkpoints with it. The first start stores a verifier sealed
    under its master key: a start with another is one line, exit 2, nothing written."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    database_url = {"database_url": make_pg_database()} if database == "postgresql" else {}
    first = Settings(data_dir=data_dir, **database_url)
    url = first.resolved_database_url
    migrate.upgrade(url)
    keystore.record_master_verifiers(first)  # `govrag serve`'s first: the key file made, its verifier
    assert _verifiers(url) == [1]
    before = _stored(url)
    result = run_govrag(["serve", "--port", "0"], timeout=300,
                        env=govrag_env(data_dir=str(data_dir), master_key=WRONG_KEY, **database_url))
    assert start_refusal(result) == (2, "govrag: the master key does not open the check the first start stored (no "
                                        "department was made yet): restore the master key that start used "
                                        f"(GOVRAG_MASTER_KEY), {START_AFRESH}")
    assert _stored(url) == before
    keystore.require_master_opens(first)  # the right key still opens it


def test_a_database_from_before_verifiers_gets_them_from_the_first_start_that_opens_its_keys(
        make_pg_database: Callable[[], str], tmp_path: Path) -> None:
    """A database whose keys were stored before verifiers existed: a start with a key that fails writes none (its
    verifier would lock the right key out), the first start whose key opens the stored keys writes one per master
    version they are under."""
    url = make_pg_database()
    migrate.upgrade(url)
    right = Settings(data_dir=tmp_path, database_url=url, master_key=base64.b64encode(crypto.new_key()).decode())
    with unit_of_work(url) as session:
        KeyStore.from_settings(right).create_department_key(session=session, department="hr")
        session.execute(delete(MasterKeyVerifier))  # as stored before 0018
    with pytest.raises(MasterKeyRefused):
        keystore.require_master_opens(Settings(data_dir=tmp_path, database_url=url, master_key=WRONG_KEY))
    assert _verifiers(url) == []
    keystore.record_master_verifiers(right)
    assert _verifiers(url) == [1]
    with unit_of_work(url) as session:
        session.execute(delete(WrappedKey))  # hr's key gone: the verifier alone still tells the wrong key
    with pytest.raises(MasterKeyRefused):
        keystore.require_master_opens(Settings(data_dir=tmp_path, database_url=url, master_key=WRONG_KEY))


@pytest.mark.parametrize("database", ["postgresql", "sqlite"])
def test_a_master_rotation_stores_its_new_versions_verifier_and_drops_the_retired_ones(
        database: str, make_pg_database: Callable[[], str], tmp_path: Path) -> None:
    """Keys from settings, no department made: the rotation stores v2's verifier and drops v1's once v1 is retired, so
    v2 alone starts (v1 removed from the secret), and a keyring without v2, or another v2, is refused."""
    url = make_pg_database() if database == "postgresql" else f"sqlite:///{tmp_path / 'keys.db'}"
    migrate.upgrade(url)
    old, new = (base64.b64encode(crypto.new_key()).decode() for _ in range(2))

    def configured(master_key: str) -> Settings:
        return Settings(data_dir=tmp_path, database_url=url, master_key=master_key)

    keystore.record_master_verifiers(configured(old))
    assert _verifiers(url) == [1]
    keys.rotate_master_key(settings=configured(f"v2:{new},v1:{old}"), identity=ROTATOR)
    assert _verifiers(url) == [2]
    keystore.require_master_opens(configured(f"v2:{new}"))
    with pytest.raises(MasterKeyRefused, match=r"it has no version 2"):
        keystore.require_master_opens(configured(old))
    with pytest.raises(MasterKeyRefused, match=r"stored keys: restore"):
        keystore.require_master_opens(configured(f"v2:{WRONG_KEY}"))


def _api_started(data_dir: Path, database_url: str | None, master_key: str | None) -> int:
    """The API started and stopped in this process (`api.app.start` by its lifespan, as `govrag serve`, `govrag demo`
    and an application embedding it start it), with this master key (None: the embedded key file): 0, or 2 refused."""
    settings = Settings(data_dir=data_dir, database_url=database_url, master_key=master_key, broker_url="memory://",
                        inprocess_worker=False, job_sweep_seconds=0)
    try:
        with TestClient(create_app(settings)):
            return 0
    except MasterKeyRefused:
        return 2
    finally:
        close_vector_store(settings)


def _worker_started(data_dir: Path, database_url: str | None, master_key: str | None,
                    monkeypatch: pytest.MonkeyPatch) -> int:
    """`govrag worker` in this process, its start run to the end and Celery's loop not entered: its exit code."""
    from workers.celery_app import GovragCelery

    monkeypatch.setattr(GovragCelery, "worker_main", lambda _self, _argv: None)
    settings = {"DATA_DIR": str(data_dir), "DATABASE_URL": database_url, "MASTER_KEY": master_key,
                "QDRANT_URL": "http://127.0.0.1:9"}
    for name, value in settings.items():
        monkeypatch.setenv(f"GOVRAG_{name}", value or "")
        if value is None:
            monkeypatch.delenv(f"GOVRAG_{name}")
    get_settings.cache_clear()
    try:
        return cli.main(["worker"])
    finally:
        get_settings.cache_clear()


@pytest.mark.parametrize(("mode", "database"), [("api", "postgresql"), ("api", "embedded"), ("worker", "postgresql")])
def test_a_start_run_to_its_end_stores_the_verifier_that_refuses_another_key_at_the_next(
        mode: str, database: str, make_pg_database: Callable[[], str], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The verifier is stored by the last step of a start, no longer by its master key check: the first start of a
    fresh database that only ever runs the API (`govrag serve`, `govrag demo`, the in-process queue, an application
    embedding it) or a worker must still reach that step, or the next start with another key, nothing sealed yet, would
    be let in to wrap the first department's key under it. The embedded default's first start uses its key file."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    database_url = make_pg_database() if database == "postgresql" else None
    url = Settings(data_dir=data_dir, database_url=database_url).resolved_database_url
    migrate.upgrade(url)
    first = None if database == "embedded" else base64.b64encode(crypto.new_key()).decode()

    def started(master_key: str | None) -> int:
        if mode == "api":
            return _api_started(data_dir, database_url, master_key)
        return _worker_started(data_dir, database_url, master_key, monkeypatch)

    assert started(first) == 0
    assert _verifiers(url) == [1]
    before = _stored(url)
    assert started(WRONG_KEY) == 2
    assert _stored(url) == before
    assert started(first) == 0


def _broken_embedding_model(cache: Path) -> Path:
    """A model cache (GOVRAG_MODEL_CACHE) whose embedding model export onnxruntime does not load: a start refused at
    loading its models, after its master key check."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("GOVRAG_MODEL_CACHE", str(cache))
        export = onnx_path()
    export.parent.mkdir(parents=True)
    export.write_bytes(b"not a model")
    return cache


@pytest.mark.parametrize("database", ["postgresql", "sqlite"])
@pytest.mark.parametrize("argv", [["serve", "--port", "0"], ["worker"]], ids=["serve", "worker"])
def test_a_start_refused_after_its_master_key_check_stores_no_verifier(
        argv: list[str], database: str, make_pg_database: Callable[[], str], tmp_path: Path) -> None:
    """The first start on a fresh database stored its master key's verifier at its master key check, before the steps
    that followed (the models, the policy, the vector store, ...): a start one of those refused had already made its
    key, perhaps the wrong one, the one every later start must have. The verifier is now stored last, once every check
    passed: the refused start stores none, and a start with another key then starts and stores its own."""
    url = make_pg_database() if database == "postgresql" else f"sqlite:///{tmp_path / 'keys.db'}"
    migrate.upgrade(url)
    first, then = (base64.b64encode(crypto.new_key()).decode() for _ in range(2))
    result = run_govrag(argv, timeout=300, env=govrag_env(
        data_dir=str(tmp_path / "data"), database_url=url, master_key=first, qdrant_url="http://127.0.0.1:9",
        model_cache=str(_broken_embedding_model(tmp_path / "models"))))
    code, line = start_refusal(result)
    assert code == 2 and "ONNX export" in line, result.stderr[-3000:]
    assert _verifiers(url) == []
    keystore.record_master_verifiers(Settings(data_dir=tmp_path, database_url=url, master_key=then))
    assert _verifiers(url) == [1]
    with pytest.raises(MasterKeyRefused, match="does not open the check the first start stored"):
        keystore.require_master_opens(Settings(data_dir=tmp_path, database_url=url, master_key=first))


def _kept(_key_file: Path) -> None:
    """The key file left as it is."""


@pytest.mark.parametrize("spoil", [_kept, _lost], ids=["kept", "lost"])
def test_a_start_checks_the_master_key_in_one_session(spoil: Callable[[Path], None],
                                                      make_pg_database: Callable[[], str], tmp_path: Path) -> None:
    """The start's check asked whether keys were stored in a session of its own, then unwrapped them in another, and a
    key store made fresh with its key file gone asked the first question again in a third. One session now."""
    url = make_pg_database()
    migrate.upgrade(url)
    settings = Settings(data_dir=tmp_path, database_url=url)
    with unit_of_work(url) as session:
        KeyStore.from_settings(settings).create_department_key(session=session, department="hr")  # none cached
    spoil(settings.resolved_master_key_file)
    sessions: list[object] = []

    def checked_out(*connection: object) -> None:
        sessions.append(connection)

    engine = get_engine(url)
    event.listen(engine, "checkout", checked_out)
    try:
        if settings.resolved_master_key_file.exists():
            keystore.require_master_opens(settings)
        else:
            with pytest.raises(MasterKeyRefused, match="the key file does not exist"):
                keystore.require_master_opens(settings)
    finally:
        event.remove(engine, "checkout", checked_out)
    assert len(sessions) == 1


def test_a_lost_key_file_with_no_department_made_is_refused_saying_how_to_start_afresh(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No department made, the key file the first start made lost: refused (it signed the audit checkpoints) with
    "restore the master key used to write them", though no key was stored, and no word of how to go on without it.
    The line says that nothing but the first start's check is stored and how to start afresh; doing so starts."""
    for name in ("GOVRAG_DATABASE_URL", "GOVRAG_MASTER_KEY"):  # the embedded default, its key file
        monkeypatch.delenv(name, raising=False)
    settings = Settings(data_dir=tmp_path / "data")
    settings.data_dir.mkdir()
    url = settings.resolved_database_url
    migrate.upgrade(url)
    keystore.record_master_verifiers(settings)
    _lost(settings.resolved_master_key_file)
    with pytest.raises(MasterKeyRefused) as refused:
        keystore.require_master_opens(settings, first_start=True)
    assert str(refused.value) == (
        "the master key does not open the check the first start stored (no department was made yet; the key file "
        "does not exist; no new one is made over it): restore the master key that start used (GOVRAG_MASTER_KEY or "
        f"{settings.resolved_master_key_file}), {START_AFRESH}")
    monkeypatch.setattr(keystore, "_KEYSTORES", {})  # a new process (above, one whose key store read the file)
    with pytest.raises(MasterKeyRefused, match=r"no department was made yet; the key file does not exist"):
        keystore.require_master_opens(settings, first_start=True)
    with unit_of_work(url) as session:
        session.execute(delete(MasterKeyVerifier))
    monkeypatch.setattr(keystore, "_KEYSTORES", {})  # started again
    keystore.record_master_verifiers(settings)
    assert settings.resolved_master_key_file.exists() and _verifiers(url) == [1]


def _altered(url: str) -> None:
    """The master key verifier's sealed bytes changed in the database."""
    with unit_of_work(url) as session:
        verifier = session.scalars(select(MasterKeyVerifier)).one()
        verifier.sealed = verifier.sealed[:-1] + bytes([verifier.sealed[-1] ^ 1])


@pytest.mark.parametrize("database", ["postgresql", "sqlite"])
def test_an_altered_verifier_does_not_refuse_a_master_key_that_opens_the_keys_under_its_version(
        database: str, make_pg_database: Callable[[], str], tmp_path: Path) -> None:
    """The verifier row altered while the department keys under its version open: every start, /readyz and every
    department creation were refused with "restore the master key", the right one configured (an altered department
    row refuses nothing but its department). The keys that open say the key is right; a start or a department
    creation stores the verifier again, and a wrong key is still refused."""
    url = make_pg_database() if database == "postgresql" else f"sqlite:///{tmp_path / 'keys.db'}"
    migrate.upgrade(url)
    settings = Settings(data_dir=tmp_path, database_url=url, master_key=base64.b64encode(crypto.new_key()).decode())
    with unit_of_work(url) as session:
        authz_service.create_department(session=session, keystore=keystore_for(settings), name="hr")
    _altered(url)
    assert keystore.master_key_refusal(settings) is None
    with unit_of_work(url) as session:
        authz_service.create_department(session=session, keystore=keystore_for(settings), name="finance")
    _altered(url)
    keystore.record_master_verifiers(settings)
    wrong = Settings(data_dir=tmp_path, database_url=url, master_key=WRONG_KEY)
    with pytest.raises(MasterKeyRefused, match=f"stored keys: {RESTORE}"):
        keystore.require_master_opens(wrong)
    with unit_of_work(url) as session:
        session.execute(delete(WrappedKey))  # the verifier alone, stored again: it opens, and tells the wrong key
    keystore.require_master_opens(settings)
    with pytest.raises(MasterKeyRefused, match="does not open the check the first start stored"):
        keystore.require_master_opens(wrong)


@pytest.mark.parametrize("database", ["postgresql", "sqlite"])
def test_two_first_starts_at_once_with_different_keys_store_one_verifier_and_one_is_refused(
        database: str, make_pg_database: Callable[[], str], tmp_path: Path) -> None:
    """Two processes starting at once on a fresh database, each with another master key, both having found nothing
    sealed: one verifier is kept, the start whose key does not open it is refused, and the kept one opens under the
    other start's key."""
    url = make_pg_database() if database == "postgresql" else f"sqlite:///{tmp_path / 'keys.db'}"
    migrate.upgrade(url)
    starts = [Settings(data_dir=tmp_path, database_url=url, master_key=base64.b64encode(crypto.new_key()).decode())
              for _ in range(2)]
    both_read = threading.Barrier(2, timeout=60)

    def inserting(_conn: object, _cursor: object, statement: str, *_args: object) -> None:
        if statement.startswith("INSERT INTO master_key_verifiers"):
            both_read.wait()  # each has read that nothing is sealed

    outcomes: dict[int, MasterKeyRefused | None] = {}

    def start(index: int) -> None:
        try:
            keystore.record_master_verifiers(starts[index])
            outcomes[index] = None
        except MasterKeyRefused as refused:
            outcomes[index] = refused

    engine = get_engine(url)
    event.listen(engine, "before_cursor_execute", inserting)
    try:
        threads = [threading.Thread(target=start, args=(index,)) for index in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
    finally:
        event.remove(engine, "before_cursor_execute", inserting)
    assert sorted(outcome is None for outcome in outcomes.values()) == [False, True]
    assert _verifiers(url) == [1]
    winner = next(index for index, outcome in outcomes.items() if outcome is None)
    keystore.require_master_opens(starts[winner])
    with pytest.raises(MasterKeyRefused):
        keystore.require_master_opens(starts[1 - winner])


def _flip_department_row(url: str, department: str) -> None:
    """One bit of a department key row's sealed bytes flipped in the database."""
    with unit_of_work(url) as session:
        row = session.scalars(select(WrappedKey).where(WrappedKey.kind == "department",
                                                       WrappedKey.owner == department)).one()
        row.wrapped = row.wrapped[:-1] + bytes([row.wrapped[-1] ^ 1])


@pytest.mark.parametrize("database", ["postgresql", "sqlite"])
def test_one_altered_department_row_is_that_department_unreadable_never_the_master_key_refused(
        database: str, make_pg_database: Callable[[], str], tmp_path: Path) -> None:
    """A department key that does not open is MasterKeyRefused (every request a 503) only when the master key opens
    nothing of its version: an altered row, even the only one of its version, or beside an altered verifier, is that
    department's DepartmentKeyUnreadable, and the other departments' keys open; a wrong key is MasterKeyRefused."""
    url = make_pg_database() if database == "postgresql" else f"sqlite:///{tmp_path / 'keys.db'}"
    migrate.upgrade(url)
    settings = Settings(data_dir=tmp_path, database_url=url, master_key=base64.b64encode(crypto.new_key()).decode(),
                        key_cache_seconds=0)
    with unit_of_work(url) as session:
        authz_service.create_department(session=session, keystore=keystore_for(settings), name="hr")
    _flip_department_row(url, "hr")  # the only row under its version: the verifier says the key is right
    with unit_of_work(url) as session, pytest.raises(keystore.DepartmentKeyUnreadable):
        keystore_for(settings).department_key(session=session, department="hr")
    with unit_of_work(url) as session:
        authz_service.create_department(session=session, keystore=keystore_for(settings), name="finance")
    _altered(url)  # the verifier too: the finance key under that version says the key is right
    with unit_of_work(url) as session:
        with pytest.raises(keystore.DepartmentKeyUnreadable):
            keystore_for(settings).department_key(session=session, department="hr")
        assert keystore_for(settings).department_key(session=session, department="finance")
    wrong = Settings(data_dir=tmp_path, database_url=url, master_key=WRONG_KEY, key_cache_seconds=0)
    with unit_of_work(url) as session, pytest.raises(MasterKeyRefused):
        keystore_for(wrong).department_key(session=session, department="finance")


def _upload(client: TestClient, editor: dict[str, str]) -> Any:
    """An upload into `desk` (made by `desk_member`) by its editor."""
    return client.post("/v1/documents", headers=editor, data={"department": "desk"},
                       files={"file": ("notes.txt", b"Notes of the Lisbon office.")})


@pytest.mark.parametrize(("version", "why"), [(1, ""), (2, " (it has no version 1, which wraps some of them)")],
                         ids=["another key", "without its version"])
def test_an_upload_under_a_replaced_key_file_is_a_503_saying_the_master_key_not_the_department_key(
        served: tuple[TestClient, Settings], version: int, why: str) -> None:
    """The key file replaced by another key under a running replica: every department key failed to open as if its
    row were altered, an upload a 503 `department_key_unreadable` telling the operator to restore that row (and a
    query left every department out, answering as if nothing were found); replaced by a keyring without the version
    the keys are wrapped under (an old copy, another installation's), a LookupError, an upload a 500 "internal error".
    Either is now the master key's 503 `unavailable`, as /readyz says it, the key file's path left out; the department
    is none the worse once the key is back."""
    client, settings = served
    key_file = settings.resolved_master_key_file
    right = crypto.parse_master_keyring(key_file.read_text())
    editor = auth(desk_member(client, "editor"))
    keystore_for(settings)._cache.clear()  # the desk key opened when it was made: as a replica that never opened it
    with crypto.master_keyring_lock(key_file):
        crypto.write_master_keyring(key_file, {version: crypto.new_key()})
    refused, ready = _upload(client, editor), client.get("/readyz")
    line = f"the master key does not open the stored keys{why}: {RESTORE} (GOVRAG_MASTER_KEY or the master key file)"
    assert refused.status_code == 503, refused.text
    assert refused.json()["error"]["code"] == "unavailable"
    assert refused.json()["error"]["message"] == line
    assert str(key_file) not in refused.text and str(settings.data_dir) not in refused.text
    assert (ready.status_code, ready.json()["checks"]["master_key"], ready.json()["reason"]) == (503, "mismatch", line)
    with crypto.master_keyring_lock(key_file):
        crypto.write_master_keyring(key_file, right)
    assert _upload(client, editor).status_code == 202


def test_an_upload_into_a_department_without_a_key_row_is_a_503_saying_so(served: tuple[TestClient, Settings]) -> None:
    """A department whose key row was deleted in the database: `create_document_key` raised LookupError, an upload
    answered 500 "internal error". It is now the department key's 503, naming the department and the missing row (no
    key material, no path), as an altered row's is; the row put back, the upload goes through."""
    from tests.support.key_rotation import department_key_deleted

    client, settings = served
    editor = auth(desk_member(client, "editor"))
    with department_key_deleted(settings, "desk"):
        refused = _upload(client, editor)
    assert refused.status_code == 503, refused.text
    assert refused.json()["error"]["code"] == "department_key_unreadable"
    assert refused.json()["error"]["message"] == (
        "the key of department desk is missing from the database (its key row was deleted): restore that row from a "
        "backup")
    assert _upload(client, editor).status_code == 202


@pytest.mark.parametrize("database", ["postgresql", "sqlite"])
def test_a_key_row_or_master_version_missing_is_a_named_refusal_not_a_lookup_error(
        database: str, make_pg_database: Callable[[], str], tmp_path: Path) -> None:
    """A department without a key row, and a keyring without the master version its row is wrapped under, raised
    LookupError from the key store (a 500, a job's generic retries, a traceback). The first is now that department's
    DepartmentKeyMissing (an upload's, a query's, a rotation's), the second MasterKeyVersionMissing (every
    department's: the master key's refusal)."""
    from core.errors import MasterKeyVersionMissing
    from tests.support.key_rotation import department_key_deleted

    url = make_pg_database() if database == "postgresql" else f"sqlite:///{tmp_path / 'keys.db'}"
    migrate.upgrade(url)
    settings = Settings(data_dir=tmp_path / "data", database_url=url, key_cache_seconds=0)
    with unit_of_work(url) as session:
        authz_service.create_department(session=session, keystore=keystore_for(settings), name="hr")
    store = keystore_for(settings)
    with department_key_deleted(settings, "hr"), unit_of_work(url) as session:
        with pytest.raises(keystore.DepartmentKeyMissing, match="department hr is missing from the database"):
            store.department_key(session=session, department="hr")
        with pytest.raises(keystore.DepartmentKeyMissing):
            store.create_document_key(session=session, department="hr", document_id="doc")
        with pytest.raises(keystore.DepartmentKeyMissing):
            store.begin_rotation(session=session, department="hr")
    key_file = settings.resolved_master_key_file
    right = crypto.parse_master_keyring(key_file.read_text())
    crypto.write_master_keyring(key_file, {2: crypto.new_key()})
    with unit_of_work(url) as session, pytest.raises(MasterKeyVersionMissing, match="it has no version 1, which wraps"):
        store.department_key(session=session, department="hr")
    crypto.write_master_keyring(key_file, right)
    with unit_of_work(url) as session:
        assert store.department_key(session=session, department="hr")
