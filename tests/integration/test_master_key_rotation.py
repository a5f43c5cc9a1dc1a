"""Master-key rotation: department keys rewrapped under a new master version, nothing re-encrypted or re-embedded.

Runs on the session's real stack (PostgreSQL, Redis worker, embedded Qdrant, key file in the data dir) and, for
keys given in settings, on a fresh PostgreSQL and a SQLite database.
"""

from __future__ import annotations

import base64
import stat
import threading
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from api import cli, cli_ingest
from audit import integrity
from core import blobs, crypto, migrate
from core import keystore as keystore_module
from core.db import transaction_lock, unit_of_work
from core.keystore import MASTER_WRAPPED_KINDS, KeyStore, keystore_for
from core.models import RetrievalEvent, WrappedKey
from core.settings import Settings
from ingestion import keys
from retrieval.store import open_vector_store
from tests.conftest import PLATFORM_ADMIN, auth, wait_for_job

TEXT = b"The Bergen office bicycle allowance is 450 kroner per employee per month. Ref MASTERROT-7."


def _master_parents(settings: Settings) -> set[int]:
    with unit_of_work(settings.resolved_database_url) as session:
        return set(session.scalars(select(WrappedKey.parent_version).where(
            WrappedKey.kind.in_(MASTER_WRAPPED_KINDS))))


def _read_all(store: KeyStore, settings: Settings, documents: dict[str, str]) -> None:
    """Every document's stored bytes open through `store` (a fresh one: nothing cached)."""
    with unit_of_work(settings.resolved_database_url) as session:
        for document_id, department in documents.items():
            key = store.document_key(session=session, department=department, document_id=document_id)
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
        keys.rotate_master_key(settings=settings, batch_size=1)
    monkeypatch.undo()
    half_ring = crypto.load_or_create_master_keyring(key_file, create=False)
    new_version = max(first_ring) + 1
    assert set(half_ring) == {*first_ring, new_version}  # the old version is kept while rows still need it
    assert new_version in _master_parents(settings) and len(_master_parents(settings)) > 1
    _read_all(KeyStore.from_settings(settings), settings, documents)  # a fresh process reads everything

    # Re-run through the CLI: finishes under a newer version, retires the rest, audits it.
    monkeypatch.setattr(cli_ingest, "get_settings", lambda: settings)
    assert cli.main(["keys", "rotate", "--master", "--actor", "tester"]) == 0
    final_ring = crypto.load_or_create_master_keyring(key_file, create=False)
    assert list(final_ring) == [new_version + 1]
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert _master_parents(settings) == {new_version + 1}

    # The old versions are gone and not needed: only the new master opens everything.
    only_new = KeyStore({new_version + 1: final_ring[new_version + 1]})
    _read_all(only_new, settings, documents)
    only_old = KeyStore(half_ring)
    with unit_of_work(settings.resolved_database_url) as session, pytest.raises(LookupError):
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
        keys.rotate_master_key(settings=before)  # the operator must supply the new version first

    report = keys.rotate_master_key(settings=configured(f"v2:{new},v1:{old}"), batch_size=1)
    assert (report.new_version, report.keys_rewrapped, report.retired_versions) == (2, 3, (1,))
    assert keys.rotate_master_key(settings=configured(f"v2:{new}\nv1:{old}")).keys_rewrapped == 0  # idempotent

    after = KeyStore.from_settings(configured(f"v2:{new}"))  # v1 removed from the secret
    with unit_of_work(database_url) as session:
        key = after.document_key(session=session, department="alpha", document_id="doc-1")
        assert key is not None and crypto.open_text(key, sealed, "govrag:chunk:doc-1:0") == "quarterly numbers"
        assert after.department_key(session=session, department="beta")
        assert after.checkpoint_key(session=session) == checkpoint_key
    with unit_of_work(database_url) as session, pytest.raises(crypto.DecryptionError):
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
        rotation.append(threading.Thread(target=lambda: reports.append(keys.rotate_master_key(settings=settings))))
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
