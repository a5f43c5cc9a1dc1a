"""Key rotation on real PostgreSQL: department keys renewed, document keys rewrapped, nothing re-embedded."""

from __future__ import annotations

import uuid
from collections.abc import Callable

from fastapi.testclient import TestClient
from sqlalchemy import select

from core import blobs
from core.db import unit_of_work
from core.keystore import keystore_for
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


def test_rotation_rewraps_without_reembedding(client: TestClient, issue_token: Callable[..., str],
                                              settings) -> None:  # type: ignore[no-untyped-def]
    department = f"rot{uuid.uuid4().hex[:6]}"
    admin = issue_token(PLATFORM_ADMIN)
    assert client.post("/v1/admin/departments", json={"name": department}, headers=auth(admin)).status_code == 201
    client.post("/v1/admin/role-assignments", headers=auth(admin),
                json={"subject": "rita", "role": "editor", "department": department})
    token = issue_token("rita", [])
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
