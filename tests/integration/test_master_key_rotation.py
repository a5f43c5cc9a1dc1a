"""Master-key rotation: department keys rewrapped under a new master version, nothing re-encrypted or re-embedded.

Runs on the session's real stack (PostgreSQL, Redis worker, embedded Qdrant, key file in the data dir) and, for
keys given in settings, on a fresh PostgreSQL and a SQLite database.
"""

from __future__ import annotations

import base64
import os
import stat
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event, select
from sqlalchemy.orm import Session

from api import cli, cli_keys
from audit import integrity
from authz.identity import operator_identity
from core import blobs, crypto, migrate
from core import keystore as keystore_module
from core.db import transaction_lock, unit_of_work
from core.errors import MasterKeyRefused
from core.keystore import MASTER_WRAPPED_KINDS, KeyStore, keystore_for
from core.models import Document, RetrievalEvent, WrappedKey
from core.settings import Settings
from ingestion import keys
from retrieval.store import open_vector_store
from tests.conftest import PLATFORM_ADMIN, auth, wait_for_job
from tests.support.lock_waits import waits_for_a_file_lock
from tests.support.polling import wait_until

ROTATOR = operator_identity("tester")
ROOT = Path(__file__).resolve().parents[2]

TEXT = b"The Bergen office bicycle allowance is 450 kroner per employee per month. Ref MASTERROT-7."


def _master_parents(settings: Settings) -> set[int]:
    with unit_of_work(settings.resolved_database_url) as session:
        return set(session.scalars(select(WrappedKey.parent_version).where(
            WrappedKey.kind.in_(MASTER_WRAPPED_KINDS))))


def _read_all(store: KeyStore, settings: Settings, documents: dict[str, str]) -> None:
    """Every document's stored bytes open through `store` (a fresh one: nothing cached)."""
    with unit_of_work(settings.resolved_database_url) as session:
        for document_id, department in documents.items():
            key = store.document_key(session=session, department=department, document_id=document_id).key
            assert key is not None
            assert blobs.read_sealed(settings.blob_dir, document_id, key).startswith(TEXT)


def _ingest(client: TestClient, token: str, department: str) -> str:
    response = client.post("/v1/documents", headers=auth(token), data={"department": department},
                           files={"file": ("bikes.txt", TEXT + department.encode())})
    assert response.status_code == 202
    assert wait_for_job(client, token, response.json()["job_id"])["status"] == "ready"
    return str(response.json()["document_id"])


def test_master_rotation_interrupted_then_rerun(client: TestClient, issue_token: Callable[..., str],
                                               settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    admin = issue_token(PLATFORM_ADMIN)
    documents: dict[str, str] = {}
    for _ in range(2):
        department = f"mrot{uuid.uuid4().hex[:6]}"
        assert client.post("/v1/admin/departments", json={"name": department},
                           headers=auth(admin)).status_code == 201
        client.post("/v1/admin/role-assignments", headers=auth(admin),
                    json={"subject": "mira", "role": "editor", "department": department})
        documents[_ingest(client, issue_token("mira", []), department)] = department
    key_file = settings.resolved_master_key_file
    sealed_before = {d: sorted(str(p["sealed_text"]) for p in open_vector_store(settings).scroll_payloads(d))
                     for d in set(documents.values())}
    checkpoint_key_before = integrity.checkpoint_key(settings)
    other_process = KeyStore.from_settings(settings)  # loaded before the rotation, as a running replica would be
    first_ring = crypto.load_or_create_master_keyring(key_file, create=False)

    # Interrupted: the first batch commits, then the process dies.
    real_rewrap, calls = KeyStore.rewrap_under_master, []

    def crash_after_one_batch(self: KeyStore, **kwargs: object) -> int:
        if calls:
            raise RuntimeError("simulated crash")
        calls.append(1)
        return real_rewrap(self, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(KeyStore, "rewrap_under_master", crash_after_one_batch)
    with pytest.raises(RuntimeError, match="simulated crash"):
        keys.rotate_master_key(settings=settings, batch_size=1, identity=ROTATOR)
    monkeypatch.undo()
    half_ring = crypto.load_or_create_master_keyring(key_file, create=False)
    new_version = max(first_ring) + 1
    assert set(half_ring) == {*first_ring, new_version}  # the old version is kept while rows still need it
    assert new_version in _master_parents(settings) and len(_master_parents(settings)) > 1
    _read_all(KeyStore.from_settings(settings), settings, documents)  # a fresh process reads everything

    # Re-run through the CLI: finishes under a newer version, retires the rest, audits it.
    monkeypatch.setattr(cli_keys, "get_settings", lambda: settings)
    assert cli.main(["keys", "rotate", "--master", "--actor", "tester"]) == 0
    final_ring = crypto.load_or_create_master_keyring(key_file, create=False)
    assert list(final_ring) == [new_version + 1]
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert _master_parents(settings) == {new_version + 1}

    # The old versions are gone and not needed: only the new master opens everything.
    only_new = KeyStore({new_version + 1: final_ring[new_version + 1]})
    _read_all(only_new, settings, documents)
    only_old = KeyStore(half_ring)
    with unit_of_work(settings.resolved_database_url) as session, pytest.raises(MasterKeyRefused):
        only_old.department_key(session=session, department=next(iter(documents.values())))
    _read_all(other_process, settings, documents)  # the replica loaded before re-reads the key file
    with unit_of_work(settings.resolved_database_url) as session:
        assert only_new.checkpoint_key(session=session) == checkpoint_key_before  # old signatures still verify
    assert integrity.checkpoint_key(settings) == checkpoint_key_before

    sealed_after = {d: sorted(str(p["sealed_text"]) for p in open_vector_store(settings).scroll_payloads(d))
                    for d in set(documents.values())}
    assert sealed_after == sealed_before  # nothing re-encrypted or re-embedded
    with unit_of_work(settings.resolved_database_url) as session:
        event = session.scalars(select(RetrievalEvent).where(RetrievalEvent.event_type == "key_rotation",
                                                             RetrievalEvent.subject == "cli:tester")
                                .order_by(RetrievalEvent.id.desc())).first()
    assert event is not None and event.details["scope"] == "master"
    assert event.details["new_version"] == new_version + 1
    assert sorted(event.details["retired_versions"]) == sorted(half_ring)

    keystore_for(settings)._cache.clear()
    department = next(iter(documents.values()))
    answer = client.post("/v1/query", headers=auth(issue_token("mira", [])),
                         json={"question": "What is the Bergen office bicycle allowance?", "departments": [department]})
    assert answer.status_code == 200 and "450" in answer.json()["answer"]
    new_department = f"mrot{uuid.uuid4().hex[:6]}"  # created after the rotation: wrapped under the new version
    assert client.post("/v1/admin/departments", json={"name": new_department},
                       headers=auth(admin)).status_code == 201
    with unit_of_work(settings.resolved_database_url) as session:
        assert only_new.department_key(session=session, department=new_department)


def _b64() -> str:
    return base64.b64encode(crypto.new_key()).decode()


@pytest.fixture(params=["postgresql", "sqlite"])
def database_url(request: pytest.FixtureRequest, make_pg_database: Callable[[], str], tmp_path: Path) -> str:
    url = make_pg_database() if request.param == "postgresql" else f"sqlite:///{tmp_path / 'keys.db'}"
    migrate.upgrade(url)
    return url


def test_master_rotation_with_keys_from_settings(database_url: str, tmp_path: Path) -> None:
    old, new = _b64(), _b64()

    def configured(master_key: str) -> Settings:
        return Settings(data_dir=tmp_path, database_url=database_url, master_key=master_key)

    before = configured(old)  # a bare key is version 1
    store = keystore_for(before)
    with unit_of_work(database_url) as session:
        for department in ("alpha", "beta"):
            store.create_department_key(session=session, department=department)
        data_key = store.create_document_key(session=session, department="alpha", document_id="doc-1")
    sealed = crypto.seal_text(data_key, "quarterly numbers", "govrag:chunk:doc-1:0")
    checkpoint_key = integrity.checkpoint_key(before)
    with pytest.raises(LookupError, match="GOVRAG_MASTER_KEY"):
        keys.rotate_master_key(settings=before, identity=ROTATOR)  # the operator must supply the new version first

    report = keys.rotate_master_key(settings=configured(f"v2:{new},v1:{old}"), identity=ROTATOR, batch_size=1)
    assert (report.new_version, report.keys_rewrapped, report.retired_versions) == (2, 3, (1,))
    again = keys.rotate_master_key(settings=configured(f"v2:{new}\nv1:{old}"), identity=ROTATOR)
    assert again.keys_rewrapped == 0  # idempotent
    assert [entry.name for entry in tmp_path.iterdir() if "master.key" in entry.name] == []  # no file, no lock

    after = KeyStore.from_settings(configured(f"v2:{new}"))  # v1 removed from the secret
    with unit_of_work(database_url) as session:
        key = after.document_key(session=session, department="alpha", document_id="doc-1").key
        assert key is not None and crypto.open_text(key, sealed, "govrag:chunk:doc-1:0") == "quarterly numbers"
        assert after.department_key(session=session, department="beta")
        assert after.checkpoint_key(session=session) == checkpoint_key
    with unit_of_work(database_url) as session, pytest.raises(MasterKeyRefused):  # a wrong key: no row altered
        KeyStore({2: crypto.new_key()}).department_key(session=session, department="beta")


def test_master_keyring_text_round_trips(tmp_path: Path) -> None:
    ring = {1: crypto.new_key(), 3: crypto.new_key()}
    assert crypto.parse_master_keyring(crypto.format_master_keyring(ring)) == ring
    assert crypto.parse_master_keyring(base64.b64encode(ring[1]).decode()) == {1: ring[1]}
    with pytest.raises(ValueError, match="distinct"):
        crypto.parse_master_keyring(f"v1:{_b64()},v1:{_b64()}")
    path = tmp_path / "master.key"
    crypto.write_master_keyring(path, ring)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert crypto.load_or_create_master_keyring(path, create=False) == ring


def test_a_department_created_as_the_master_rotates_stays_readable(client: TestClient, issue_token: Callable[..., str],
                                                                   settings: Settings,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A department whose key was wrapped under the old master version commits only once the rotation is looking
    for rows to rewrap: the rotation used to miss it and retire that version from the key file (the department's
    key, and every document in it, lost). Now the rewrap waits for it, then rewraps it."""
    department, past_the_check, rotation, reports = f"mrot{uuid.uuid4().hex[:6]}", threading.Event(), [], []
    real_create, real_retire = KeyStore.create_department_key, KeyStore.retire_master_versions

    def rotate_meanwhile(self: KeyStore, **kwargs: str) -> None:
        real_create(self, **kwargs)  # wrapped under the current master version, the transaction still open
        rotation.append(threading.Thread(target=lambda: reports.append(
            keys.rotate_master_key(settings=settings, identity=ROTATOR))))
        rotation[0].start()
        assert past_the_check.wait(timeout=60)  # then the department commits (201)

    def lock(session: Session, name: str, *, shared: bool = False) -> None:
        if not shared:
            past_the_check.set()  # the rotation waits for the master lock before it looks for rows to rewrap ...
        transaction_lock(session, name, shared=shared)

    def retire(self: KeyStore, **kwargs: object) -> list[int]:
        past_the_check.set()  # ... or (before the fix) has looked already, and retires the old version
        return real_retire(self, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(KeyStore, "create_department_key", rotate_meanwhile)
    monkeypatch.setattr(keystore_module, "transaction_lock", lock, raising=False)
    monkeypatch.setattr(KeyStore, "retire_master_versions", retire)
    ring_before = crypto.load_or_create_master_keyring(settings.resolved_master_key_file, create=False)
    response = client.post("/v1/admin/departments", json={"name": department},
                           headers=auth(issue_token(PLATFORM_ADMIN)))
    assert response.status_code == 201, response.text
    rotation[0].join(timeout=60)
    assert [report.retired_versions for report in reports] == [tuple(sorted(ring_before))]
    assert _master_parents(settings) == {max(ring_before) + 1}
    with unit_of_work(settings.resolved_database_url) as session:
        assert KeyStore.from_settings(settings).department_key(session=session, department=department)


def _audited_master_versions(settings: Settings) -> list[int]:
    from tests.support.key_rotation import rotation_events

    return [event.details["new_version"] for event in rotation_events(settings)
            if event.details.get("scope") == "master"]


def _cli_on(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Callable[[], int]:
    monkeypatch.setattr(cli_keys, "get_settings", lambda: settings)
    return lambda: cli.main(["keys", "rotate", "--master", "--actor", "tester"])


def test_a_crash_right_after_the_master_rotation_commits_leaves_it_audited(
        make_pg_database: Callable[[], str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The command wrote the master rotation's audit event only once the rotation had returned, in a transaction of
    its own: a crash as soon as its last step committed (the old versions checked unneeded and dropped from the key
    file) left the master key rotated and the ledger without a word of it. The event now commits with the check;
    only then are the old versions dropped, so a crash there leaves them in the file, unused, and audited."""
    from contextlib import contextmanager

    from tests.support.key_rotation import two_departments

    settings = two_departments(make_pg_database, tmp_path)
    rotate, key_file = _cli_on(settings, monkeypatch), settings.resolved_master_key_file
    real_retirable, real_retire, real_unit_of_work = (KeyStore.__dict__.get("retirable_master_versions"),
                                                      KeyStore.retire_master_versions, keys.unit_of_work)
    last_step: list[str] = []

    def retire(self: KeyStore, **kwargs: object) -> list[int]:
        last_step.append("retire")
        return real_retire(self, **kwargs)  # type: ignore[arg-type]

    def retirable(self: KeyStore, **kwargs: object) -> list[int]:
        last_step.append("retirable")
        return real_retirable(self, **kwargs)  # type: ignore[misc]

    @contextmanager
    def crash_once_the_last_step_commits(url: str):  # type: ignore[no-untyped-def]
        with real_unit_of_work(url) as session:
            yield session
        if last_step:
            raise RuntimeError("simulated crash")

    monkeypatch.setattr(KeyStore, "retire_master_versions", retire)
    monkeypatch.setattr(KeyStore, "retirable_master_versions", retirable, raising=False)  # where it exists
    monkeypatch.setattr(keys, "unit_of_work", crash_once_the_last_step_commits)
    with pytest.raises(RuntimeError, match="simulated crash"):
        rotate()
    monkeypatch.setattr(keys, "unit_of_work", real_unit_of_work)
    assert _master_parents(settings) == {2} and _audited_master_versions(settings) == [2]

    assert rotate() == 0  # run again: rotated once more, audited, every old version dropped
    assert _master_parents(settings) == {3} and _audited_master_versions(settings) == [2, 3]
    assert list(crypto.load_or_create_master_keyring(key_file, create=False)) == [3]


@pytest.mark.parametrize("when", ["starting", "rewrapping", "dropping the old versions"])
def test_the_database_going_away_during_a_master_rotation_is_said_in_one_line_and_running_again_finishes(
        make_pg_database: Callable[[], str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str], when: str) -> None:
    """PostgreSQL refusing connections as the master rotation started, rewrapped or dropped the old versions ended
    the command in a traceback. Now it is one line naming the database (never its address) that says whether the
    rotation is done and audited, exit 1; the same command run once it is back finishes (a newer version), audited."""
    from tests.conftest import allow_connections
    from tests.support.key_rotation import database_name, two_departments

    settings = two_departments(make_pg_database, tmp_path)
    database = database_name(settings)
    rotate = _cli_on(settings, monkeypatch)
    step = {"rewrapping": "rewrap_under_master", "dropping the old versions": "retire_master_versions"}.get(when)
    if step is not None:
        real_step = getattr(KeyStore, step)

        def the_database_goes(self: KeyStore, **kwargs: object) -> object:
            allow_connections(database, False)
            return real_step(self, **kwargs)

        monkeypatch.setattr(KeyStore, step, the_database_goes)
    else:
        allow_connections(database, False)
    monkeypatch.setenv("COLUMNS", "400")
    try:
        code = rotate()
    finally:
        allow_connections(database, True)
        monkeypatch.undo()
    rotate = _cli_on(settings, monkeypatch)
    err = " ".join(capsys.readouterr().err.split())
    assert code == 1 and "Traceback" not in err and database not in err
    if when == "dropping the old versions":
        assert ("stopped: the database is unavailable; the master key is now v2 and audited, but the old versions (v1) "
                "are still in the key file, unused: run the same command again once it is back") in err, err
    else:
        assert ("stopped: the database is unavailable; the master key is not rotated (nothing audited, every key stays "
                "readable): run the same command again once it is back") in err, err
    _left_as_said_then_finished(settings, rotate, audited=when == "dropping the old versions")


def _left_as_said_then_finished(settings: Settings, rotate: Callable[[], int], *, audited: bool) -> None:
    """A master rotation stopped midway left rotated to v2 and audited, or not rotated at all, v1 in the key file
    either way; the same command run again finishes it under a newer version, audited, every key readable."""
    key_file = settings.resolved_master_key_file
    assert _master_parents(settings) == ({2} if audited else {1})
    assert _audited_master_versions(settings) == ([2] if audited else [])
    assert 1 in crypto.load_or_create_master_keyring(key_file, create=False)

    assert rotate() == 0
    final = max(crypto.load_or_create_master_keyring(key_file, create=False))
    assert list(crypto.load_or_create_master_keyring(key_file, create=False)) == [final]
    assert _master_parents(settings) == {final} and _audited_master_versions(settings)[-1] == final
    with unit_of_work(settings.resolved_database_url) as session:
        assert KeyStore.from_settings(settings).department_key(session=session, department="alpha")


@pytest.mark.parametrize("when", ["rewrapping", "dropping the old versions"])
def test_a_ctrl_c_during_a_master_rotation_says_what_an_outage_says_and_running_again_finishes(
        make_pg_database: Callable[[], str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str], when: str) -> None:
    """A Ctrl-C as the master rotation rewrapped or dropped the old versions ended the command in a traceback; now it
    says, as an outage does, whether the rotation is done and audited and the command that finishes it, exit 130;
    that command finishes (a newer version), audited."""
    from tests.support.key_rotation import exit_code_unless_interrupted, two_departments

    settings = two_departments(make_pg_database, tmp_path)
    rotate = _cli_on(settings, monkeypatch)
    step = {"rewrapping": "rewrap_under_master", "dropping the old versions": "retire_master_versions"}[when]

    def interrupted(self: KeyStore, **kwargs: object) -> object:
        raise KeyboardInterrupt

    monkeypatch.setattr(KeyStore, step, interrupted)
    monkeypatch.setenv("COLUMNS", "400")
    code = exit_code_unless_interrupted(rotate)
    monkeypatch.undo()
    rotate = _cli_on(settings, monkeypatch)
    err = " ".join(capsys.readouterr().err.split())
    assert code == 130 and "Traceback" not in err
    if when == "dropping the old versions":
        assert ("interrupted; the master key is now v2 and audited, but the old versions (v1) are still in the key "
                "file, unused: run the same command again to go on (it rotates once more and removes them)") in err, err
    else:
        assert ("interrupted; the master key is not rotated (nothing audited, every key stays readable): run the same "
                "command again to go on") in err, err
    _left_as_said_then_finished(settings, rotate, audited=when == "dropping the old versions")


def test_a_ctrl_c_as_the_old_master_versions_are_dropped_stays_an_interrupt_that_says_the_rotation_is_done(
        make_pg_database: Callable[[], str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`rotate_master_key` turned a Ctrl-C in its last step into `OldMasterVersionsKept`, an Exception: a caller's
    `except Exception` swallowed the interrupt (a test run went on). It is still a KeyboardInterrupt now, with the
    report the CLI needs: rotated to v2 and audited, v1 still in the key file."""
    from tests.support.key_rotation import two_departments

    settings = two_departments(make_pg_database, tmp_path)

    def interrupted(self: KeyStore, **kwargs: object) -> object:
        raise KeyboardInterrupt

    monkeypatch.setattr(KeyStore, "retire_master_versions", interrupted)
    with pytest.raises(KeyboardInterrupt) as caught:
        keys.rotate_master_key(settings=settings, identity=ROTATOR)
    assert isinstance(caught.value, keys.OldMasterVersionsKeptInterrupted) and caught.value.report.new_version == 2
    assert _audited_master_versions(settings) == [2]
    assert set(crypto.load_or_create_master_keyring(settings.resolved_master_key_file, create=False)) == {1, 2}


def test_two_master_rotations_at_once_run_one_after_the_other_and_lose_no_key(
        make_pg_database: Callable[[], str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A rotation reads the keyring, adds a version and writes the ring back. A second `govrag keys rotate --master`
    run while the first was between reading and writing read the same ring and wrote the same version with a key of
    its own: the first then wrote over it, after the second had wrapped every department key under it (all lost for
    good). Now the second waits for the key file's lock, then rotates once more."""
    from tests.support.key_rotation import DEPARTMENTS, two_departments

    settings = two_departments(make_pg_database, tmp_path)
    url, key_file = settings.resolved_database_url, settings.resolved_master_key_file
    with unit_of_work(url) as session:
        store = keystore_for(settings)
        data_keys = {d: store.document_key(session=session, department=d, document_id=f"{d}-doc").key
                     for d in DEPARTMENTS}
        checkpoint_key = store.checkpoint_key(session=session)
    real_new_key, other = crypto.new_key, []

    def new_key_once_another_rotation_is_done_or_waits() -> bytes:
        if not other:  # this rotation has read the keyring
            env = {**os.environ, "GOVRAG_DATA_DIR": str(settings.data_dir), "GOVRAG_DATABASE_URL": url}
            other.append(subprocess.Popen([sys.executable, "-m", "api.cli", "keys", "rotate", "--master"],  # noqa: S603
                                          cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
            wait_until(lambda: other[0].poll() is not None or waits_for_a_file_lock(other[0].pid), timeout=300,
                       what="the other rotation to end or to wait for a lock")
        return real_new_key()

    monkeypatch.setattr(crypto, "new_key", new_key_once_another_rotation_is_done_or_waits)
    first = keys.rotate_master_key(settings=settings, identity=ROTATOR)
    output, errors = other[0].communicate(timeout=600)

    fresh = KeyStore(crypto.load_or_create_master_keyring(key_file, create=False))  # a process started now
    with unit_of_work(url) as session:
        assert {d: fresh.document_key(session=session, department=d, document_id=f"{d}-doc").key
                for d in DEPARTMENTS} == data_keys
        assert fresh.checkpoint_key(session=session) == checkpoint_key
    assert (first.new_version, other[0].returncode) == (2, 0), errors
    assert "master key now v3" in output
    assert list(crypto.load_or_create_master_keyring(key_file, create=False)) == [3]


@pytest.mark.parametrize("read", ["department key", "document key"])
def test_a_key_read_as_a_master_rotation_retires_its_version_opens_not_refused(
        database_url: str, tmp_path: Path, read: str) -> None:
    """Another process's master rotation ran whole (rewrapped, committed, the old version dropped from the key file)
    between a replica's read of a department key row and its read of the keyring: the row's version was no longer in
    it, a LookupError (a 500, a job's generic retries). It is no refusal either: the row, rewrapped before the version
    left the key file, is read again and opens under the new version."""
    from authz import service as authz_service

    settings = Settings(data_dir=tmp_path / "data", database_url=database_url)
    with unit_of_work(database_url) as session:
        authz_service.create_department(session=session, keystore=keystore_for(settings), name="desk")
        session.add(Document(id="doc", department="desk", title="t", content_type="text/plain", size_bytes=1,
                             sha256="0" * 64, uploaded_by="tester", status="ready"))
        data_key = keystore_for(settings).create_document_key(session=session, department="desk", document_id="doc")
        department_key = keystore_for(settings).department_key(session=session, department="desk")
    replica, rotated = KeyStore.from_settings(settings), []  # another process's: nothing opened yet

    def rotate_once_the_department_row_is_read(target: WrappedKey, _context: object) -> None:
        if target.kind == "department" and not rotated:
            rotated.append(None)  # the rotation's own reads go on
            rotated[0] = keys.rotate_master_key(settings=settings, identity=ROTATOR)

    event.listen(WrappedKey, "load", rotate_once_the_department_row_is_read)
    try:
        with unit_of_work(database_url) as session:
            if read == "department key":
                assert replica.department_key(session=session, department="desk") == department_key
            else:
                assert replica.document_key(session=session, department="desk", document_id="doc").key == data_key
    finally:
        event.remove(WrappedKey, "load", rotate_once_the_department_row_is_read)
    assert [report.retired_versions for report in rotated] == [(1,)]
    assert _master_parents(settings) == {2}


def test_a_query_under_a_key_file_without_the_stored_version_is_a_503_not_a_500(
        client: TestClient, issue_token: Callable[..., str], settings: Settings) -> None:
    """The key file replaced under the running API by one without the master version the department keys are wrapped
    under: a query finding a document answered 500 "internal error" (a LookupError). It is now the master key's 503
    `unavailable`, naming the missing version and not the key file's path; the key back, the query answers."""
    admin = issue_token(PLATFORM_ADMIN)
    department = f"mrot{uuid.uuid4().hex[:6]}"
    assert client.post("/v1/admin/departments", json={"name": department}, headers=auth(admin)).status_code == 201
    client.post("/v1/admin/role-assignments", headers=auth(admin),
                json={"subject": "mira", "role": "editor", "department": department})
    _ingest(client, issue_token("mira", []), department)
    key_file = settings.resolved_master_key_file
    right = crypto.load_or_create_master_keyring(key_file, create=False)

    def query() -> object:
        keystore_for(settings)._cache.clear()  # as a replica that never opened the keys
        return client.post("/v1/query", headers=auth(issue_token("mira", [])), json={
            "question": "What is the Bergen office bicycle allowance?", "departments": [department]})

    try:
        with crypto.master_keyring_lock(key_file):
            crypto.write_master_keyring(key_file, {max(right) + 1: crypto.new_key()})
        refused = query()
    finally:
        with crypto.master_keyring_lock(key_file):
            crypto.write_master_keyring(key_file, right)
    assert refused.status_code == 503, refused.text  # type: ignore[attr-defined]
    assert refused.json()["error"]["code"] == "unavailable"  # type: ignore[attr-defined]
    assert refused.json()["error"]["message"] == (  # type: ignore[attr-defined]
        f"the master key does not open the stored keys (it has no version {max(right)}, which wraps some of them): "
        "restore the master key used to write them (GOVRAG_MASTER_KEY or the master key file)")
    assert str(key_file) not in refused.text  # type: ignore[attr-defined]
    answered = query()
    assert answered.status_code == 200 and "450" in answered.json()["answer"]  # type: ignore[attr-defined]
