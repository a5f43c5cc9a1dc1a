"""Key rotation on real PostgreSQL: department keys renewed, document keys rewrapped, nothing re-embedded."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from core import blobs
from core.db import unit_of_work
from core.keystore import KeyStore, keystore_for
from core.models import WrappedKey
from ingestion import keys
from retrieval.store import open_vector_store
from tests.conftest import PLATFORM_ADMIN, auth, wait_for_job

TEXT = b"The Oslo office wellness budget is 300 kroner per employee per quarter. Ref ROTCANARY-3."


def _versions(settings, kind: str, owner: str) -> list[tuple[int, int]]:  # type: ignore[no-untyped-def]
    with unit_of_work(settings.resolved_database_url) as session:
        rows = session.scalars(select(WrappedKey).where(WrappedKey.kind == kind, WrappedKey.owner == owner))
        return sorted((row.version, row.parent_version) for row in rows)


def _readable(settings, department: str, document_id: str) -> bytes:  # type: ignore[no-untyped-def]
    store = keystore_for(settings)
    store._cache.clear()  # force unwrapping from the database rows, not a cached key
    with unit_of_work(settings.resolved_database_url) as session:
        key = store.document_key(session=session, department=department, document_id=document_id)
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
                                      version=version) == 1
    assert _versions(settings, "document", uploads[0]) == [(1, 1), (2, 2)]  # old wrapping kept until the end
    assert all(_readable(settings, department, d).startswith(TEXT) for d in uploads)

    # The whole rotation (the service finishes the half-done one, then a second full one).
    reports = keys.rotate_department_keys(settings=settings, departments=[department], batch_size=2)
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
                keys.rotate_department_keys(settings=settings, departments=[department]))))
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
                store.finish_rotation(session=other, department=department, version=version)
        return real_unwrap(self, session, owner, row)  # type: ignore[arg-type]

    monkeypatch.setattr(KeyStore, "_unwrap_document", finish_first)
    answer = client.post("/v1/query", headers=auth(token),
                         json={"question": "What is the Oslo office wellness budget?", "departments": [department]})
    assert finished == [1]
    assert answer.status_code == 200, answer.text
    assert "300" in answer.json()["answer"]
    assert [v for v, _ in _versions(settings, "department", department)] == [version]  # v1 is gone indeed
