"""Unwrapped keys leave a process's memory within GOVRAG_KEY_CACHE_SECONDS: a document deleted by one process (its key
row shredded) had its data key kept by every other process that had read it, until evicted by size, possibly never.
Two KeyStore instances on one real PostgreSQL database stand for two processes."""

from __future__ import annotations

import base64
from collections.abc import Callable
from pathlib import Path

import pytest

from core import crypto, keystore, migrate
from core.db import unit_of_work
from core.keystore import KeyState, KeyStore
from core.settings import Settings
from tests.support.forking import exit_code_of_child_forked_holding
from tests.unit.test_cache import Clock

AGE = 300.0  # the default GOVRAG_KEY_CACHE_SECONDS
MASTERS = {1: crypto.new_key()}


@pytest.fixture
def url(make_pg_database: Callable[[], str]) -> str:
    """A database of its own with the department `hr` and its document `d1` keyed (dropped with the session)."""
    url = make_pg_database()
    migrate.upgrade(url)
    with unit_of_work(url) as session:
        creator = KeyStore(MASTERS)
        creator.create_department_key(session=session, department="hr")
        creator.create_document_key(session=session, department="hr", document_id="d1")
    return url


@pytest.fixture
def unwraps(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The context of each key row unwrapped (crypto's own function, counted)."""
    seen: list[str] = []
    real = crypto.open_sealed

    def counted(key: bytes, sealed: bytes, context: str) -> bytes:
        seen.append(context)
        return real(key, sealed, context)

    monkeypatch.setattr(keystore.crypto, "open_sealed", counted)
    return seen


def _read(store: KeyStore, url: str) -> KeyState:
    with unit_of_work(url) as session:
        return store.document_key(session=session, department="hr", document_id="d1").state


def test_a_deleted_documents_key_leaves_another_process_within_the_max_age(url: str, unwraps: list[str]) -> None:
    clock = Clock()
    deleting, other = KeyStore(MASTERS, clock=clock), KeyStore(MASTERS, clock=clock)
    assert _read(other, url) is KeyState.opened
    with unit_of_work(url) as session:
        deleting.shred_document_key(session=session, document_id="d1")
    clock.now += AGE - 1
    assert _read(other, url) is KeyState.opened  # still in the other process's memory, not read again
    assert unwraps == ["govrag:department:hr:v1", "govrag:document:d1:v1"]
    clock.now += 1
    other._cache.expire()  # what its sweeper does when nothing asks
    assert len(other._cache) == 0  # the document's data key, and its department's key, are gone from memory
    assert _read(other, url) is KeyState.missing  # read from the database: shredded


def test_a_key_older_than_the_max_age_is_unwrapped_again(url: str, unwraps: list[str]) -> None:
    clock = Clock()
    store = KeyStore(MASTERS, clock=clock)
    assert [_read(store, url) for _ in range(2)] == [KeyState.opened] * 2
    assert len(unwraps) == 2  # the department key, then the document's: once each
    clock.now += AGE
    assert _read(store, url) is KeyState.opened
    assert len(unwraps) == 4


def test_a_cache_of_0_seconds_keeps_no_key(url: str, unwraps: list[str]) -> None:
    store, deleting = KeyStore(MASTERS, cache_seconds=0), KeyStore(MASTERS)
    assert [_read(store, url) for _ in range(2)] == [KeyState.opened] * 2
    assert len(unwraps) == 4 and len(store._cache) == 0
    with unit_of_work(url) as session:
        deleting.shred_document_key(session=session, document_id="d1")
    assert _read(store, url) is KeyState.missing


def test_the_setting_reaches_the_key_store(tmp_path: Path) -> None:
    master = base64.b64encode(MASTERS[1]).decode()
    store = KeyStore.from_settings(Settings(data_dir=tmp_path, key_cache_seconds=0, master_key=master))
    store._cache.put(("document", "d1"), b"k")
    assert len(store._cache) == 0
    with pytest.raises(ValueError):
        Settings(key_cache_seconds=-1)


def test_each_cache_age_has_its_own_key_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings with another GOVRAG_KEY_CACHE_SECONDS for the same master key got the first one's store, and its age;
    the store is found again by its master key without holding it in the clear (masked in any repr)."""
    monkeypatch.setattr(keystore, "_KEYSTORES", {})
    master = base64.b64encode(MASTERS[1]).decode()
    none_kept = keystore.keystore_for(Settings(data_dir=tmp_path, key_cache_seconds=0, master_key=master))
    kept = keystore.keystore_for(Settings(data_dir=tmp_path, master_key=master))
    for store in (none_kept, kept):
        store._cache.put(("document", "d1"), b"k")
    assert (len(none_kept._cache), len(kept._cache)) == (0, 1)
    assert keystore.keystore_for(Settings(data_dir=tmp_path, master_key=master)) is kept
    assert master not in repr(keystore._KEYSTORES)


@pytest.fixture
def key_file_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """One entry each time a key store parses its key file (crypto's own parser, counted)."""
    seen: list[str] = []
    real = crypto.parse_master_keyring

    def counted(text: str) -> dict[int, bytes]:
        seen.append("read")
        return real(text)

    monkeypatch.setattr(keystore.crypto, "parse_master_keyring", counted)
    return seen


def test_a_master_keyring_from_a_key_file_leaves_memory_within_the_max_age(url: str, tmp_path: Path,
                                                                            key_file_reads: list[str]) -> None:
    """The master keys stayed in memory as long as the process lived, though the keys they unwrap leave it within
    the age: now they leave with them, and are read again from the key file when next needed."""
    key_file, clock = tmp_path / "master.key", Clock()
    crypto.write_master_keyring(key_file, MASTERS)
    store = KeyStore(MASTERS, key_file=key_file, clock=clock)
    assert _read(store, url) is KeyState.opened
    assert key_file_reads == []  # the keyring it was given, as read at its start
    clock.now += AGE
    assert _read(store, url) is KeyState.opened
    assert key_file_reads == ["read"]  # read again from the file, with the keys it unwraps
    clock.now += AGE - 1
    assert _read(store, url) is KeyState.opened and key_file_reads == ["read"]  # then held as long as they are
    clock.now += 1
    for cache in (store._cache, store._key_file_ring):
        cache.expire()  # what its sweeper does when nothing asks
    assert (len(store._cache), len(store._key_file_ring)) == (0, 0)  # no key, master or other, left in memory


def test_a_child_forked_while_another_thread_makes_a_key_store_makes_one(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A request thread making the process's key store as a Celery prefork or gunicorn parent forks: the child can
    make its own (the lock the thread held is not the child's)."""
    monkeypatch.setattr(keystore, "_KEYSTORES", {})
    settings = Settings(data_dir=tmp_path, master_key=base64.b64encode(MASTERS[1]).decode())
    code = exit_code_of_child_forked_holding(keystore._KEYSTORES_LOCK,
                                             lambda: isinstance(keystore.keystore_for(settings), KeyStore))
    assert code == 0


def test_a_document_key_lookup_never_shows_the_key(url: str) -> None:
    """Its repr (a log line's argument, an assertion's message, a traceback's locals) names its state only."""
    with unit_of_work(url) as session:
        found = KeyStore(MASTERS).document_key(session=session, department="hr", document_id="d1")
    assert found.key is not None
    assert repr(found) == "DocumentKey(state=<KeyState.opened: 'opened'>)"
