"""Key rotation on real PostgreSQL (and SQLite where it differs): department keys renewed, document keys rewrapped,
nothing re-embedded."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from authz.identity import operator_identity
from core import blobs
from core.db import unit_of_work
from core.keystore import KeyState, KeyStore, keystore_for
from core.models import WrappedKey
from ingestion import keys
from retrieval.store import open_vector_store
from tests.conftest import PLATFORM_ADMIN, auth, desk_member, wait_for_job
from tests.support.lock_waits import wait_for_a_lock_wait

ROTATOR = operator_identity("tester")

TEXT = b"The Oslo office wellness budget is 300 kroner per employee per quarter. Ref ROTCANARY-3."


def _versions(settings, kind: str, owner: str) -> list[tuple[int, int]]:  # type: ignore[no-untyped-def]
    with unit_of_work(settings.resolved_database_url) as session:
        rows = session.scalars(select(WrappedKey).where(WrappedKey.kind == kind, WrappedKey.owner == owner))
        return sorted((row.version, row.parent_version) for row in rows)


def _readable(settings, department: str, document_id: str) -> bytes:  # type: ignore[no-untyped-def]
    store = keystore_for(settings)
    store._cache.clear()  # force unwrapping from the database rows, not a cached key
    with unit_of_work(settings.resolved_database_url) as session:
        key = store.document_key(session=session, department=department, document_id=document_id).key
    assert key is not None
    return blobs.read_sealed(settings.blob_dir, document_id, key)


def _department_with_editor(client: TestClient, issue_token: Callable[..., str]) -> tuple[str, str]:
    """A new department and the token of rita, its editor."""
    department = f"rot{uuid.uuid4().hex[:6]}"
    admin = issue_token(PLATFORM_ADMIN)
    assert client.post("/v1/admin/departments", json={"name": department}, headers=auth(admin)).status_code == 201
    client.post("/v1/admin/role-assignments", headers=auth(admin),
                json={"subject": "rita", "role": "editor", "department": department})
    return department, issue_token("rita", [])


def test_rotation_rewraps_without_reembedding(client: TestClient, issue_token: Callable[..., str],
                                              settings) -> None:  # type: ignore[no-untyped-def]
    department, token = _department_with_editor(client, issue_token)
    uploads = []
    for n in range(3):
        response = client.post("/v1/documents", headers=auth(token), data={"department": department},
                               files={"file": (f"w{n}.txt", TEXT + f" copy {n}".encode())})
        assert response.status_code == 202
        assert wait_for_job(client, token, response.json()["job_id"])["status"] == "ready"
        uploads.append(response.json()["document_id"])
    vectors_before = sorted(str(p["sealed_text"]) for p in open_vector_store(settings).scroll_payloads(department))

    # Staged by hand: after each stage every document still opens.
    store = keystore_for(settings)
    with unit_of_work(settings.resolved_database_url) as session:
        version = store.begin_rotation(session=session, department=department)
    assert version == 2
    assert all(_readable(settings, department, d).startswith(TEXT) for d in uploads)
    with unit_of_work(settings.resolved_database_url) as session:
        assert store.rewrap_documents(session=session, department=department, document_ids=uploads[:1],
                                      version=version, unreadable=set()) == 1
    assert _versions(settings, "document", uploads[0]) == [(1, 1), (2, 2)]  # old wrapping kept until the end
    assert all(_readable(settings, department, d).startswith(TEXT) for d in uploads)

    # The whole rotation (the service finishes the half-done one, then a second full one).
    reports = keys.rotate_department_keys(settings=settings, identity=ROTATOR, departments=[department],
                                          batch_size=2)
    assert reports[0].new_version == 3 and reports[0].documents_rewrapped == 3
    assert [version for version, _ in _versions(settings, "department", department)] == [3]  # under any master
    for document_id in uploads:
        assert [parent for _, parent in _versions(settings, "document", document_id)] == [3]
        assert _readable(settings, department, document_id).startswith(TEXT)
    vectors_after = sorted(str(p["sealed_text"]) for p in open_vector_store(settings).scroll_payloads(department))
    assert vectors_after == vectors_before  # nothing re-encrypted or re-embedded

    store._cache.clear()
    answer = client.post("/v1/query", headers=auth(token),
                         json={"question": "What is the Oslo office wellness budget?", "departments": [department]})
    assert answer.status_code == 200 and "300" in answer.json()["answer"]


def test_an_upload_committed_as_the_rotation_finishes_stays_readable(
        client: TestClient, issue_token: Callable[..., str], settings, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """An upload that read department key v1 before the rotation began commits only as the rotation finishes: the
    finish used to delete v1 under it, and the accepted document could never be opened again. Now the finish waits
    for the upload, then rewraps its key."""
    department = f"rot{uuid.uuid4().hex[:6]}"
    admin = issue_token(PLATFORM_ADMIN)
    assert client.post("/v1/admin/departments", json={"name": department}, headers=auth(admin)).status_code == 201
    client.post("/v1/admin/role-assignments", headers=auth(admin),
                json={"subject": "rita", "role": "editor", "department": department})
    finishing, rotation, reports = threading.Event(), [], []
    real_write, real_finish = blobs.write_sealed, KeyStore.finish_rotation

    def rotate_meanwhile(*args: object) -> None:  # the upload's key is wrapped, its transaction still open
        if not rotation:
            rotation.append(threading.Thread(target=lambda: reports.extend(
                keys.rotate_department_keys(settings=settings, identity=ROTATOR, departments=[department]))))
            rotation[0].start()
            assert finishing.wait(timeout=60)  # the rotation is at its last step; the upload then commits
        real_write(*args)  # type: ignore[arg-type]

    def finish(self: KeyStore, **kwargs: object) -> int:
        finishing.set()
        return real_finish(self, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(blobs, "write_sealed", rotate_meanwhile)
    monkeypatch.setattr(KeyStore, "finish_rotation", finish)
    token = issue_token("rita", [])
    response = client.post("/v1/documents", headers=auth(token), data={"department": department},
                           files={"file": ("race.txt", TEXT + b" uploaded during a rotation")})
    assert response.status_code == 202, response.text
    rotation[0].join(timeout=60)
    document_id = response.json()["document_id"]
    assert reports == [keys.RotationReport(department=department, new_version=2, documents_rewrapped=1)]
    assert _versions(settings, "document", document_id) == [(2, 2)]
    assert _readable(settings, department, document_id).startswith(TEXT)
    assert wait_for_job(client, token, response.json()["job_id"])["status"] == "ready"


def test_a_query_that_read_a_key_row_as_the_rotation_finished_is_answered(
        client: TestClient, issue_token: Callable[..., str], settings, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """A query read the document's key row (under department key v1), then the rotation's last step committed and
    deleted v1 before the query unwrapped the row: the query failed with a 500. Now it reads the row again."""
    department, token = _department_with_editor(client, issue_token)
    response = client.post("/v1/documents", headers=auth(token), data={"department": department},
                           files={"file": ("oslo.txt", TEXT)})
    assert response.status_code == 202
    assert wait_for_job(client, token, response.json()["job_id"])["status"] == "ready"
    store, url = keystore_for(settings), settings.resolved_database_url
    with unit_of_work(url) as session:
        version = store.begin_rotation(session=session, department=department)
    store._cache.clear()  # the query unwraps from the rows it reads
    real_unwrap, finished = KeyStore._unwrap_document, []

    def finish_first(self: KeyStore, session: object, owner: str, row: WrappedKey) -> bytes:
        if owner == department and not finished:  # the query holds row v1: the rotation's last step commits now
            finished.append(row.parent_version)
            with unit_of_work(url) as other:
                store.finish_rotation(session=other, department=department, version=version, unreadable=set())
        return real_unwrap(self, session, owner, row)  # type: ignore[arg-type]

    monkeypatch.setattr(KeyStore, "_unwrap_document", finish_first)
    answer = client.post("/v1/query", headers=auth(token),
                         json={"question": "What is the Oslo office wellness budget?", "departments": [department]})
    assert finished == [1]
    assert answer.status_code == 200, answer.text
    assert "300" in answer.json()["answer"]
    assert [v for v, _ in _versions(settings, "department", department)] == [version]  # v1 is gone indeed


def _ready_upload(client: TestClient, token: str, department: str, name: str, data: bytes) -> str:
    response = client.post("/v1/documents", headers=auth(token), data={"department": department},
                           files={"file": (name, data)})
    assert response.status_code == 202, response.text
    assert wait_for_job(client, token, response.json()["job_id"])["status"] == "ready"
    return response.json()["document_id"]  # type: ignore[no-any-return]


def _in_a_transaction(url: str, step: Callable[[Session], object]) -> None:
    with unit_of_work(url) as session:
        step(session)


def _shredded(settings, department: str, document_id: str) -> bool:  # type: ignore[no-untyped-def]
    store = keystore_for(settings)
    store._cache.clear()
    with unit_of_work(settings.resolved_database_url) as session:
        found = store.document_key(session=session, department=department, document_id=document_id)
    return found.state is KeyState.missing and _versions(settings, "document", document_id) == []


def test_a_rotation_reaching_a_document_whose_deletion_has_not_committed_leaves_it_shredded(
        client: TestClient, issue_token: Callable[..., str], settings) -> None:  # type: ignore[no-untyped-def]
    """A rotation's rewrap read a document's key row while its deletion, not yet committed, had deleted it, and wrapped
    the key again under the new department key version once the deletion committed: the deleted document had a live
    key again (its stored bytes and vectors, in backups too, readable), which the rotation's last step kept. The
    rewrap now waits for the deletion (the department's key lock), then finds no key to wrap."""
    from ingestion import service as ingestion_service

    department, token = _department_with_editor(client, issue_token)
    deleted_id = _ready_upload(client, token, department, "gone.txt", TEXT + b" to be deleted")
    kept_id = _ready_upload(client, token, department, "kept.txt", TEXT + b" to be kept")
    reports: list[keys.RotationReport] = []
    rotation = threading.Thread(target=lambda: reports.extend(
        keys.rotate_department_keys(settings=settings, identity=ROTATOR, departments=[department])))
    with unit_of_work(settings.resolved_database_url) as deletion:
        ingestion_service.delete_document(session=deletion, settings=settings, document_id=deleted_id,
                                          can_delete=lambda _: True)
        rotation.start()
        wait_for_a_lock_wait(settings.resolved_database_url, rotation)
    rotation.join(timeout=60)
    assert not rotation.is_alive() and reports[0].new_version == 2
    assert _shredded(settings, department, deleted_id)
    assert _versions(settings, "document", kept_id) == [(2, 2)]
    assert _readable(settings, department, kept_id).startswith(TEXT)


def test_a_deletion_of_a_document_whose_rewrap_has_not_committed_shreds_the_new_wrapping_too(
        client: TestClient, issue_token: Callable[..., str], settings) -> None:  # type: ignore[no-untyped-def]
    """A deletion ran while a rotation's batch had wrapped the document's key under the new version but not
    committed: it deleted the rows it saw (the old one) and the batch then committed the new one, so the deleted
    document had a live key again. The deletion now waits for the batch (the department's key lock), then deletes
    both rows."""
    department, token = _department_with_editor(client, issue_token)
    deleted_id = _ready_upload(client, token, department, "gone.txt", TEXT + b" to be deleted")
    kept_id = _ready_upload(client, token, department, "kept.txt", TEXT + b" to be kept")
    store, url = keystore_for(settings), settings.resolved_database_url
    with unit_of_work(url) as session:
        version = store.begin_rotation(session=session, department=department)
    deleted: list = []  # type: ignore[type-arg]
    deletion = threading.Thread(target=lambda: deleted.append(
        client.delete(f"/v1/documents/{deleted_id}", headers=auth(token))))
    with unit_of_work(url) as rewrap:
        assert store.rewrap_documents(session=rewrap, department=department, document_ids=[deleted_id, kept_id],
                                      version=version, unreadable=set()) == 2
        deletion.start()
        wait_for_a_lock_wait(url, deletion)
    deletion.join(timeout=60)
    with unit_of_work(url) as session:
        assert store.finish_rotation(session=session, department=department, version=version,
                                     unreadable=set()) == 0
    assert not deletion.is_alive() and deleted[0].status_code == 204, deleted[0].text
    assert _shredded(settings, department, deleted_id)
    assert _versions(settings, "document", kept_id) == [(2, 2)]
    assert _readable(settings, department, kept_id).startswith(TEXT)


@pytest.mark.parametrize("first", ["deletion", "finish"])
def test_a_rotation_finishing_and_a_deletion_of_two_documents_run_one_after_the_other(
        client: TestClient, issue_token: Callable[..., str], settings, first: str) -> None:  # type: ignore[no-untyped-def]
    """A rotation's last step deletes the department's old key rows in one statement, while a deletion retiring
    several documents (here one and a failed copy of its content) deletes each one's rows in turn: meeting in
    opposite orders, each could hold a row the other waited for, and PostgreSQL aborted one (the admin's deletion
    a 500, or the rotation). Whichever comes first, the other now waits for the department's key lock before it
    writes anything (an advisory lock wait, not a row's), and both end."""
    from sqlalchemy import update

    from core.models import Document
    from ingestion import service as ingestion_service

    department, token = _department_with_editor(client, issue_token)
    url, store = settings.resolved_database_url, keystore_for(settings)
    data = TEXT + b" uploaded twice"
    failed_id = _ready_upload(client, token, department, "first.txt", data)
    with unit_of_work(url) as session:  # as a re-index whose runs all failed leaves it
        session.execute(update(Document).where(Document.id == failed_id).values(status="failed"))
    copy_id = _ready_upload(client, token, department, "again.txt", data)  # a failed document is no duplicate
    kept_id = _ready_upload(client, token, department, "kept.txt", TEXT + b" to be kept")
    with unit_of_work(url) as session:
        version = store.begin_rotation(session=session, department=department)
    with unit_of_work(url) as session:
        store.rewrap_documents(session=session, department=department, version=version,
                               document_ids=[failed_id, copy_id, kept_id], unreadable=set())
    retired: list[str] = []

    def delete(session: Session) -> None:
        retired.extend(ingestion_service.delete_document(session=session, settings=settings, document_id=copy_id,
                                                         can_delete=lambda _: True)[1])

    def finish(session: Session) -> None:
        store.finish_rotation(session=session, department=department, version=version, unreadable=set())

    held, waiting = (delete, finish) if first == "deletion" else (finish, delete)
    second = threading.Thread(target=lambda: _in_a_transaction(url, waiting))
    with unit_of_work(url) as session:
        held(session)
        second.start()
        waited_for = wait_for_a_lock_wait(url, second)
    second.join(timeout=60)
    assert waited_for == "advisory"
    assert not second.is_alive() and sorted(retired) == sorted([failed_id, copy_id])
    assert _shredded(settings, department, failed_id) and _shredded(settings, department, copy_id)
    assert _versions(settings, "document", kept_id) == [(2, 2)]
    assert [v for v, _ in _versions(settings, "department", department)] == [version]


def test_on_sqlite_a_rotation_batch_reaching_a_document_whose_deletion_has_not_committed_leaves_it_shredded(
        tmp_path: Path) -> None:
    """On the embedded SQLite a rotation's batch read the document's key row outside any transaction (the driver
    begins one only before the first write), waited for the deletion's write lock, then wrapped the key again once
    the deletion committed. The batch now takes the department's key lock before it reads, which the deletion holds
    until it commits."""
    from api.app import create_app
    from core import migrate
    from core.settings import Settings
    from ingestion import service as ingestion_service
    from ingestion.schemas import Classification
    from retrieval.store import close_vector_store

    url = f"sqlite:///{tmp_path / 'govrag.db'}"
    migrate.upgrade(url)
    settings = Settings(data_dir=tmp_path / "data", database_url=url, admins=[PLATFORM_ADMIN], broker_url="memory://",
                        inprocess_worker=False, job_sweep_seconds=0, task_queue=f"govrag-rot-{uuid.uuid4().hex[:8]}")
    with TestClient(create_app(settings)) as client:
        desk_member(client, "editor")
    close_vector_store(settings)

    def upload(n: int) -> str:
        with unit_of_work(url) as session:
            return ingestion_service.accept_upload(
                session=session, settings=settings, uploaded_by="stella", department="desk", filename=f"{n}.txt",
                data=TEXT + f" copy {n}".encode(), title=None, acl_groups=[],
                classification=Classification.internal).document_id

    deleted_id, kept_id = upload(0), upload(1)
    store = keystore_for(settings)
    with unit_of_work(url) as session:
        version = store.begin_rotation(session=session, department="desk")
    batch = threading.Thread(target=_in_a_transaction, args=(url, lambda session: store.rewrap_documents(
        session=session, department="desk", document_ids=[deleted_id, kept_id], version=version,
        unreadable=set())))
    with unit_of_work(url) as deletion:
        ingestion_service.delete_document(session=deletion, settings=settings, document_id=deleted_id,
                                          can_delete=lambda _: True)
        batch.start()
        waited_for = wait_for_a_lock_wait(url, batch)  # before: it read the row, then waited to write
    batch.join(timeout=60)
    assert waited_for == "keys:department:desk"
    assert not batch.is_alive()
    assert _shredded(settings, "desk", deleted_id)
    assert _versions(settings, "document", kept_id) == [(1, 1), (2, 2)]
    assert _readable(settings, "desk", kept_id).startswith(TEXT)


def _cli_on(settings, monkeypatch: pytest.MonkeyPatch) -> Callable[..., int]:  # type: ignore[no-untyped-def]
    """`govrag keys rotate ...` run in this process against `settings`."""
    from api import cli, cli_keys

    monkeypatch.setattr(cli_keys, "get_settings", lambda: settings)
    return lambda *args: cli.main(["keys", "rotate", "--actor", "tester", *args])


def test_a_crash_right_after_a_department_rotation_commits_leaves_it_audited(
        make_pg_database: Callable[[], str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The command wrote the rotations' audit events only after every department was rotated, each in a transaction
    of its own: a crash (a kill, a Ctrl-C, the database going) as soon as a department's last step committed left
    its key rotated and the ledger without a word of it. The event now commits with that last step."""
    from contextlib import contextmanager

    from tests.support.key_rotation import audited_department_versions, department_key_versions, two_departments

    settings = two_departments(make_pg_database, tmp_path)
    rotate = _cli_on(settings, monkeypatch)
    real_finish, real_unit_of_work, finishing = KeyStore.finish_rotation, keys.unit_of_work, []

    def finish(self: KeyStore, **kwargs: object) -> int:
        finishing.append(kwargs["department"])
        return real_finish(self, **kwargs)  # type: ignore[arg-type]

    @contextmanager
    def crash_once_the_finish_commits(url: str):  # type: ignore[no-untyped-def]
        with real_unit_of_work(url) as session:
            yield session
        if finishing:  # the transaction that ran finish_rotation has committed
            raise RuntimeError("simulated crash")

    monkeypatch.setattr(KeyStore, "finish_rotation", finish)
    monkeypatch.setattr(keys, "unit_of_work", crash_once_the_finish_commits)
    with pytest.raises(RuntimeError, match="simulated crash"):
        rotate()
    monkeypatch.setattr(keys, "unit_of_work", real_unit_of_work)
    assert finishing == ["alpha"]
    assert department_key_versions(settings, "alpha") == [2] and audited_department_versions(settings, "alpha") == [2]
    assert department_key_versions(settings, "beta") == [1] and audited_department_versions(settings, "beta") == []

    assert rotate() == 0  # run again: every department rotated once more, each audited
    assert audited_department_versions(settings, "alpha") == [2, 3]
    assert department_key_versions(settings, "alpha") == [3]
    assert audited_department_versions(settings, "beta") == [2] and department_key_versions(settings, "beta") == [2]


def test_the_database_going_away_mid_rotation_says_what_was_rotated_and_running_again_finishes(
        make_pg_database: Callable[[], str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """PostgreSQL stopping as the second department's rotation reached its last step ended the command in a traceback,
    the first department rotated and not audited. Now the first is audited as its rotation commits, and the command
    says in one line that the database is unavailable (never its address), what was rotated, what was not and how
    to go on, exit 1; that command, run once the database is back, finishes the half-done rotation and audits it."""
    from tests.conftest import allow_connections
    from tests.support.key_rotation import (
        audited_department_versions,
        audited_details,
        database_name,
        department_key_versions,
        two_departments,
    )

    settings = two_departments(make_pg_database, tmp_path)
    database, rotate, real_finish = database_name(settings), _cli_on(settings, monkeypatch), KeyStore.finish_rotation

    def the_database_goes_at_betas_last_step(self: KeyStore, **kwargs: object) -> int:
        if kwargs["department"] == "beta":
            allow_connections(database, False)
        return real_finish(self, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(KeyStore, "finish_rotation", the_database_goes_at_betas_last_step)
    monkeypatch.setenv("COLUMNS", "400")
    try:
        code = rotate()
    finally:
        allow_connections(database, True)
    monkeypatch.setattr(KeyStore, "finish_rotation", real_finish)
    err = " ".join(capsys.readouterr().err.split())
    assert code == 1
    assert ("stopped: the database is unavailable; rotated and audited: alpha (v2); not rotated: beta; "
            "run `govrag keys rotate --department beta --actor tester` once it is back") in err, err
    assert "Traceback" not in err and database not in err and "postgres" not in err
    assert audited_details(settings, "alpha") == [{"new_version": 2, "documents_rewrapped": 1,
                                                   "documents_unreadable": []}]
    assert department_key_versions(settings, "alpha") == [2]
    assert department_key_versions(settings, "beta") == [1, 2] and audited_department_versions(settings, "beta") == []

    assert rotate("--department", "beta") == 0  # the command it said
    assert audited_details(settings, "beta") == [{"new_version": 3, "documents_rewrapped": 1,
                                                  "documents_unreadable": []}]
    assert department_key_versions(settings, "beta") == [3]
    assert audited_department_versions(settings, "alpha") == [2] and department_key_versions(settings, "alpha") == [2]
    assert _readable_key(settings, "beta")


def test_a_ctrl_c_mid_rotation_says_what_was_rotated_and_running_again_finishes(
        make_pg_database: Callable[[], str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A Ctrl-C in the second department's rotation ended the command in a traceback; now it says, as an outage
    does, what was rotated (and audited) and the command that rotates the rest, exit 130."""
    from tests.support.key_rotation import (
        audited_department_versions,
        department_key_versions,
        exit_code_unless_interrupted,
        two_departments,
    )

    settings = two_departments(make_pg_database, tmp_path)
    rotate, real_finish = _cli_on(settings, monkeypatch), KeyStore.finish_rotation

    def interrupted_at_betas_last_step(self: KeyStore, **kwargs: object) -> int:
        if kwargs["department"] == "beta":
            raise KeyboardInterrupt
        return real_finish(self, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(KeyStore, "finish_rotation", interrupted_at_betas_last_step)
    monkeypatch.setenv("COLUMNS", "400")
    code = exit_code_unless_interrupted(rotate)
    assert code == 130
    err = " ".join(capsys.readouterr().err.split())
    assert ("interrupted; rotated and audited: alpha (v2); not rotated: beta; run `govrag keys rotate --department "
            "beta --actor tester` to go on") in err and "Traceback" not in err, err
    monkeypatch.setattr(KeyStore, "finish_rotation", real_finish)
    assert rotate("--department", "beta") == 0
    assert audited_department_versions(settings, "beta") == [3] and department_key_versions(settings, "beta") == [3]


def test_the_database_away_as_the_rotation_starts_is_said_in_one_line(
        make_pg_database: Callable[[], str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """The database refusing connections as the command started ended it in a traceback; now it is one line naming
    it, exit 1, nothing rotated."""
    from tests.conftest import allow_connections
    from tests.support.key_rotation import database_name, department_key_versions, two_departments

    settings = two_departments(make_pg_database, tmp_path)
    database, rotate = database_name(settings), _cli_on(settings, monkeypatch)
    monkeypatch.setenv("COLUMNS", "400")
    allow_connections(database, False)
    try:
        code = rotate()
    finally:
        allow_connections(database, True)
    err = " ".join(capsys.readouterr().err.split())
    assert code == 1
    assert "the database is unavailable; nothing rotated: run the same command again once it is back" in err, err
    assert "Traceback" not in err and database not in err
    assert department_key_versions(settings, "alpha") == [1] and department_key_versions(settings, "beta") == [1]


def test_a_ctrl_c_as_the_departments_are_listed_says_nothing_rotated(
        make_pg_database: Callable[[], str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A Ctrl-C while the command still listed the departments, before any rotation began, ended it in a
    traceback; now it says nothing was rotated and to run it again, exit 130."""
    from authz import service as authz_service
    from tests.support.key_rotation import department_key_versions, exit_code_unless_interrupted, two_departments

    settings = two_departments(make_pg_database, tmp_path)
    rotate = _cli_on(settings, monkeypatch)

    def interrupted(**kwargs: object) -> list[str]:
        raise KeyboardInterrupt

    monkeypatch.setattr(authz_service, "list_departments", interrupted)
    monkeypatch.setenv("COLUMNS", "400")
    code = exit_code_unless_interrupted(rotate)
    err = " ".join(capsys.readouterr().err.split())
    assert code == 130
    assert "interrupted; nothing rotated: run the same command again to go on" in err and "Traceback" not in err, err
    assert department_key_versions(settings, "alpha") == [1] and department_key_versions(settings, "beta") == [1]


def _readable_key(settings, department: str) -> bytes | None:  # type: ignore[no-untyped-def]
    """The department's document key, unwrapped from its rows (nothing cached)."""
    store = keystore_for(settings)
    store._cache.clear()
    with unit_of_work(settings.resolved_database_url) as session:
        return store.document_key(session=session, department=department, document_id=f"{department}-doc").key


@pytest.mark.parametrize("backend", ["postgresql", "sqlite"])
def test_two_rotations_of_a_department_begun_at_once_both_finish(
        make_pg_database: Callable[[], str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, backend: str) -> None:
    """Two `govrag keys rotate --department alpha` begun at once both read v1 as the newest version and both added
    v2: one failed on the duplicate key row, in a traceback. Now the second waits for the first to add its version
    (an advisory lock on PostgreSQL, a name lock on SQLite), then adds the next one; both finish, audited, and the
    document key opens under the newest."""
    from core import crypto
    from tests.support.key_rotation import audited_department_versions, department_key_versions, two_departments

    database = make_pg_database if backend == "postgresql" else lambda: f"sqlite:///{tmp_path / 'govrag.db'}"
    settings = two_departments(database, tmp_path)
    real_new_key, paused, go_on = crypto.new_key, threading.Event(), threading.Event()
    reports: list[keys.RotationReport] = []
    failures: list[BaseException] = []

    def first_pauses() -> bytes:  # the first rotation has read the newest version, not yet added its own
        if not paused.is_set():
            paused.set()
            assert go_on.wait(timeout=60)
        return real_new_key()

    def rotate() -> None:
        try:
            reports.extend(keys.rotate_department_keys(settings=settings, identity=ROTATOR, departments=["alpha"]))
        except Exception as exc:  # noqa: BLE001 - asserted below
            failures.append(exc)

    monkeypatch.setattr(crypto, "new_key", first_pauses)
    first, second = threading.Thread(target=rotate), threading.Thread(target=rotate)
    first.start()
    assert paused.wait(timeout=60)
    second.start()
    waited_for = wait_for_a_lock_wait(settings.resolved_database_url, second)  # before: it finished, not waiting
    go_on.set()
    first.join(timeout=120)
    second.join(timeout=120)
    assert waited_for == ("advisory" if backend == "postgresql" else "keys:rotation:alpha")
    assert failures == []
    assert sorted(report.new_version for report in reports) == [2, 3]
    assert sorted(audited_department_versions(settings, "alpha")) == [2, 3]
    assert department_key_versions(settings, "alpha") == [3]
    assert _readable_key(settings, "alpha") is not None


def test_a_rotation_overtaken_by_one_begun_after_it_finishes_with_nothing_left_to_do(
        make_pg_database: Callable[[], str], tmp_path: Path) -> None:
    """A rotation that had added v2 was overtaken by one begun after it (v3), which finished first and retired v2:
    the first one's next batch, or its last step, failed looking for v2 (LookupError). Now it finds every key under
    the newer version and finishes with nothing to rewrap."""
    from tests.support.key_rotation import department_key_versions, two_departments

    settings = two_departments(make_pg_database, tmp_path)
    store, url = keystore_for(settings), settings.resolved_database_url
    with unit_of_work(url) as session:
        overtaken = store.begin_rotation(session=session, department="alpha")
    [report] = keys.rotate_department_keys(settings=settings, identity=ROTATOR, departments=["alpha"])
    assert (overtaken, report.new_version) == (2, 3)
    with unit_of_work(url) as session:
        assert store.rewrap_documents(session=session, department="alpha", document_ids=["alpha-doc"],
                                      version=overtaken, unreadable=set()) == 0
    with unit_of_work(url) as session:
        assert store.finish_rotation(session=session, department="alpha", version=overtaken, unreadable=set()) == 0
    assert department_key_versions(settings, "alpha") == [3]
    assert _readable_key(settings, "alpha") is not None


def test_a_rotation_meeting_a_document_key_row_that_no_longer_opens_rotates_the_rest_and_names_it(
        make_pg_database: Callable[[], str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A document's key row altered in the database (it no longer opens under its department key) failed the
    department's rotation in its batch, in a traceback, at every run until that document was deleted: the
    department's key could not be rotated at all, and each run left a version begun. The rotation now rewraps the
    other keys, finishes and retires the old version; the document it could not rewrap (its key lost with the old
    version, as it was already unreadable) is named in the command's output, with what to do, and in the audit
    event. The next rotation has nothing left to skip."""
    from core.models import Document
    from tests.support.key_rotation import alter_key_row, audited_details, department_key_versions, two_departments

    settings = two_departments(make_pg_database, tmp_path)
    url, damaged = settings.resolved_database_url, "alpha-damaged"
    with unit_of_work(url) as session:
        session.add(Document(id=damaged, department="alpha", title="t", content_type="text/plain", size_bytes=1,
                             sha256="1" * 64, uploaded_by="tester", status="ready"))
        keystore_for(settings).create_document_key(session=session, department="alpha", document_id=damaged)
    with unit_of_work(url) as session:
        alter_key_row(settings, session, damaged)
    rotate = _cli_on(settings, monkeypatch)
    assert rotate("--department", "alpha") == 0
    err = capsys.readouterr().err
    assert ("alpha: the data keys of these documents no longer open under the department key (their key rows "
            "altered in the database), so they were not rewrapped and are lost for good with the old key version: "
            f"{damaged}; delete each (DELETE /v1/documents/<id>) or upload it again") in err.splitlines(), err
    assert "Traceback" not in err
    assert audited_details(settings, "alpha") == [{"new_version": 2, "documents_rewrapped": 1,
                                                   "documents_unreadable": [damaged]}]
    assert department_key_versions(settings, "alpha") == [2] and _versions(settings, "document", damaged) == []
    assert _readable_key(settings, "alpha") is not None
    assert rotate("--department", "alpha") == 0
    assert audited_details(settings, "alpha")[-1] == {"new_version": 3, "documents_rewrapped": 1,
                                                      "documents_unreadable": []}


@pytest.mark.parametrize("damaged", ["alpha", "beta"])
def test_a_rotation_meeting_a_department_key_that_does_not_open_stops_in_one_line(
        make_pg_database: Callable[[], str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str], damaged: str) -> None:
    """A department key row altered in the database (the master key opens the other stored keys) ended `govrag keys
    rotate` in a traceback, a version of that department begun; and the master rotation in a traceback too. Altered,
    the row that the start's master key check opens first (alpha's) refused every command as if the master key were
    wrong. Each rotation now stops in one line naming the department (never key material) and what was done, exit 2,
    nothing of that department begun; the row restored, the command it said finishes."""
    from tests.support.key_rotation import (
        alter_key_row,
        audited_department_versions,
        department_key_versions,
        two_departments,
    )

    settings = two_departments(make_pg_database, tmp_path)
    url, rotate = settings.resolved_database_url, _cli_on(settings, monkeypatch)
    monkeypatch.setenv("COLUMNS", "400")
    with unit_of_work(url) as session:
        alter_key_row(settings, session, damaged, kind="department")
    unreadable = (f"failed: the key of department {damaged} does not open under the master key (its key row was "
                  "altered in the database): restore that row from a backup")
    codes = [rotate(), rotate("--master")]
    err = [" ".join(line.split()) for line in capsys.readouterr().err.splitlines()]
    rotated, left = ("none", "alpha, beta") if damaged == "alpha" else ("alpha (v2)", "beta")
    named = " ".join(f"--department {department}" for department in left.split(", "))
    assert codes == [2, 2] and err == [
        f"{unreadable}; rotated and audited: {rotated}; not rotated: {left}; run `govrag keys rotate {named} --actor "
        "tester` once that row is restored",
        f"{unreadable}; the master key is not rotated (nothing audited, every key stays readable): run the same "
        "command again once that row is restored"], err
    assert department_key_versions(settings, damaged) == [1] and audited_department_versions(settings, damaged) == []
    with unit_of_work(url) as session:  # the same bit flipped back
        alter_key_row(settings, session, damaged, kind="department")
    assert rotate(*named.split()) == 0 and rotate("--master") == 0
    assert department_key_versions(settings, damaged) == [2] and audited_department_versions(settings, damaged) == [2]
    assert _readable_key(settings, damaged) is not None
