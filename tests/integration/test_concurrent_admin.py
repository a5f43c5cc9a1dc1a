"""Two admins at once: the same department, role grant or kill switch sent concurrently is decided one after the
other (each used to race its check against the other's insert: 500s and duplicate rows)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient

from bench.common import libpq_dsn
from core.db import _PROCESS_LOCKS, get_session_factory, transaction_lock
from tests.conftest import PLATFORM_ADMIN, auth, wait_for_document
from tests.support.polling import lines_until

AT_ONCE = 4
ROOT = Path(__file__).resolve().parents[2]


def _at_once(send: Callable[[int], Any]) -> list[Any]:
    barrier = threading.Barrier(AT_ONCE)

    def released(i: int) -> Any:
        barrier.wait()
        return send(i)

    with ThreadPoolExecutor(AT_ONCE) as pool:
        return list(pool.map(released, range(AT_ONCE)))


@pytest.fixture(scope="module")
def admin(issue_token: Callable[..., str]) -> dict[str, str]:
    return auth(issue_token(PLATFORM_ADMIN))


def _rows(settings, query: str, *params: object) -> list[tuple[Any, ...]]:  # type: ignore[no-untyped-def]
    dsn = libpq_dsn(settings.resolved_database_url)
    with psycopg.connect(dsn) as conn:
        return conn.execute(query, params).fetchall()


def test_one_department_of_a_name_however_many_admins_create_it(client: TestClient, admin: dict[str, str]) -> None:
    name = f"ops{uuid.uuid4().hex[:6]}"
    codes = _at_once(lambda _: client.post("/v1/admin/departments", json={"name": name}, headers=admin).status_code)
    assert sorted(codes) == [201] + [409] * (AT_ONCE - 1)


def test_a_role_granted_at_once_is_one_rule_and_one_audit_event(client: TestClient, admin: dict[str, str],
                                                                settings) -> None:  # type: ignore[no-untyped-def]
    department = f"ops{uuid.uuid4().hex[:6]}"
    assert client.post("/v1/admin/departments", json={"name": department}, headers=admin).status_code == 201
    grant = {"subject": "zed", "role": "reader", "department": department}
    codes = _at_once(lambda _: client.post("/v1/admin/role-assignments", json=grant, headers=admin).status_code)
    assert sorted(codes) == [200] * (AT_ONCE - 1) + [201]  # granting what is granted is no error, and no creation
    assert _rows(settings, "SELECT count(*) FROM casbin_rule WHERE ptype = 'g' AND v0 = 'zed' AND v2 = %s",
                 department) == [(1,)]
    assert _rows(settings, "SELECT count(*) FROM retrieval_events WHERE event_type = 'role_granted' "
                 "AND departments_searched::text LIKE %s", f"%{department}%") == [(1,)]


def test_a_kill_switch_pulled_at_once_records_every_change_in_order(client: TestClient, admin: dict[str, str],
                                                                    settings) -> None:  # type: ignore[no-untyped-def]
    department = f"ops{uuid.uuid4().hex[:6]}"
    assert client.post("/v1/admin/departments", json={"name": department}, headers=admin).status_code == 201
    modes = ["retrieval_only", "disabled", "retrieval_only", "disabled"]
    codes = _at_once(lambda i: client.post("/v1/admin/kill-switch", headers=admin, json={
        "scope": department, "mode": modes[i], "reason": f"drill {i}"}).status_code)
    assert codes == [200] * AT_ONCE
    changes = _rows(settings, "SELECT details->>'previous', details->>'mode' FROM retrieval_events "
                    "WHERE event_type = 'kill_switch' AND details->>'scope' = %s ORDER BY id", department)
    assert len(changes) == AT_ONCE
    assert changes[0][0] == "normal" and all(changes[i][0] == changes[i - 1][1] for i in range(1, AT_ONCE))
    client.post("/v1/admin/kill-switch", headers=admin, json={"scope": department, "mode": "normal", "reason": "end"})


def test_sqlite_process_locks_last_until_the_transaction_ends(tmp_path: Path) -> None:
    """The embedded database's side of `transaction_lock`: a savepoint ending keeps the lock, the commit or the
    rollback releases it, and nothing is left behind."""
    sessions = get_session_factory(f"sqlite:///{tmp_path / 'locks.db'}")
    order: list[str] = []
    with sessions() as first:
        transaction_lock(first, "desk")
        with first.begin_nested():
            transaction_lock(first, "desk")  # taken again inside: no self-deadlock
        waiter = threading.Thread(target=_take_and_note, args=(sessions, order))
        waiter.start()
        waiter.join(0.5)
        assert waiter.is_alive() and order == []  # still waiting: the savepoint's end released nothing
        order.append("first commits")
        first.commit()
        waiter.join(10)
    assert order == ["first commits", "second has the lock"]
    with sessions() as rolled_back:
        transaction_lock(rolled_back, "desk")
        rolled_back.rollback()
    assert not _PROCESS_LOCKS._locks  # released on commit and on rollback, the name forgotten


def test_sqlite_shared_process_locks_admit_each_other_and_hold_off_an_exclusive_one(tmp_path: Path) -> None:
    """`transaction_lock(shared=True)` on the embedded database: uploads wrapping keys take it together; a rotation
    retiring a key version (exclusive) waits until the last of them has ended."""
    sessions = get_session_factory(f"sqlite:///{tmp_path / 'locks.db'}")
    order: list[str] = []
    with sessions() as first, sessions() as second:
        transaction_lock(first, "desk", shared=True)
        transaction_lock(second, "desk", shared=True)  # not waiting for the first
        waiter = threading.Thread(target=_take_and_note, args=(sessions, order))
        waiter.start()
        first.commit()
        waiter.join(0.5)
        assert waiter.is_alive() and order == []  # still held shared by the second
        order.append("second commits")
        second.commit()
        waiter.join(10)
    assert order == ["second commits", "second has the lock"]
    assert not _PROCESS_LOCKS._locks


@pytest.mark.parametrize(("held_shared", "asked_shared", "waits"),
                         [(True, False, True), (False, True, True), (True, True, False)],
                         ids=["exclusive-waits-for-shared", "shared-waits-for-exclusive", "shared-with-shared"])
def test_sqlite_locks_hold_off_another_process(tmp_path: Path, held_shared: bool, asked_shared: bool,
                                               waits: bool) -> None:
    """`govrag keys rotate` beside `govrag serve` on the embedded database: the lock was only this process's, so a
    rotation in another process retired a key version while an upload here was wrapping under it. Now a file lock
    next to the database holds off the other process too (shared with shared, exclusive with neither)."""
    url = f"sqlite:///{tmp_path / 'locks.db'}"
    with get_session_factory(url)() as first:
        transaction_lock(first, "keys:department:desk", shared=held_shared)
        other = subprocess.Popen(  # noqa: S603 (fixed argv)
            [sys.executable, "-m", "tests.support.lock_process", url, "keys:department:desk",
             "shared" if asked_shared else "exclusive"], cwd=ROOT, text=True, stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(ROOT)})
        lines_until(other, "ready")
        try:
            other.wait(timeout=3)
        except subprocess.TimeoutExpired:
            assert waits, "the other process waited for a lock it may share"
        else:
            assert not waits, "the other process took the lock this one holds"
        first.commit()
        out, _ = other.communicate(timeout=60)
    assert other.returncode == 0 and out == "locked\n"
    assert not list((tmp_path / "locks.db.locks").iterdir())  # the last holder removed its lock file


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///:memory:"])
def test_in_memory_sqlite_locks_stay_in_the_process(url: str, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """An in-memory database belongs to one process: the process lock alone, no lock file anywhere."""
    monkeypatch.chdir(tmp_path)
    with get_session_factory(url)() as session:
        transaction_lock(session, "desk")
        assert "desk" in _PROCESS_LOCKS._locks
        session.commit()
    assert not _PROCESS_LOCKS._locks
    assert not list(tmp_path.iterdir())


def _take_and_note(sessions, order: list[str]) -> None:  # type: ignore[no-untyped-def]
    with sessions() as second:
        transaction_lock(second, "desk")
        order.append("second has the lock")
        second.commit()


def test_a_quarantined_document_reviewed_at_once_gets_one_decision(client: TestClient, admin: dict[str, str],
                                                                   issue_token: Callable[..., str],
                                                                   settings) -> None:  # type: ignore[no-untyped-def]
    """Two approvals and two rejections at once: one decision stands, the others find nothing to review. Before, all
    four were accepted: a rejection could be followed by an approval that queued a job for a shredded key."""
    department = f"ops{uuid.uuid4().hex[:6]}"
    assert client.post("/v1/admin/departments", json={"name": department}, headers=admin).status_code == 201
    assert client.post("/v1/admin/role-assignments", headers=admin,
                       json={"subject": "quinn", "role": "editor", "department": department}).status_code == 201
    codes = _at_once(lambda _: client.put(f"/v1/admin/departments/{department}/ingestion-policy",
                                          json={"ai_max_level": "public"}, headers=admin).status_code)
    assert codes == [200] * AT_ONCE  # a first policy saved at once: one insert, then replacements (500s before)
    token = issue_token("quinn", [])
    editor = auth(token)
    uploaded = client.post("/v1/documents", headers=editor, data={"department": department},
                           files={"file": ("plan.txt", f"Internal plan {uuid.uuid4().hex}.".encode())})
    document_id = uploaded.json()["document_id"]
    assert wait_for_document(client, token, document_id)["status"] == "quarantined"
    actions = ["approve", "reject", "approve", "reject"]
    codes = _at_once(lambda i: client.post(f"/v1/admin/quarantine/{document_id}/{actions[i]}",
                                           headers=admin).status_code)
    assert sorted(codes) == [200, 404, 404, 404]
    assert len(_rows(settings, "SELECT id FROM retrieval_events WHERE event_type LIKE 'quarantine%%' "
                     "AND details->>'document_id' = %s", document_id)) == 1
