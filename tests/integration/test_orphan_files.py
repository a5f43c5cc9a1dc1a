"""Stored files that no document owns: an upload whose commit failed after its file was written, a write a crash cut
short. The orphan sweep removes them once they are a day old, and never touches what a document owns or what is not
ours (real PostgreSQL, the real in-process worker)."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from fastapi.testclient import TestClient

from bench.common import libpq_dsn
from core import blobs
from ingestion.purge import ORPHAN_GRACE_SECONDS, sweep_orphan_files
from tests.conftest import PLATFORM_ADMIN, auth, wait_for_document

A_DAY_AGO = time.time() - ORPHAN_GRACE_SECONDS - 3600


@pytest.fixture(scope="module")
def desk(client: TestClient, issue_token: Callable[..., str]) -> tuple[str, str]:
    """A fresh department and its editor's token."""
    department = f"files{uuid.uuid4().hex[:6]}"
    admin = auth(issue_token(PLATFORM_ADMIN))
    assert client.post("/v1/admin/departments", json={"name": department}, headers=admin).status_code == 201
    assert client.post("/v1/admin/role-assignments", headers=admin,
                       json={"subject": "fiona", "role": "editor", "department": department}).status_code == 201
    return department, issue_token("fiona", [])


@pytest.fixture
def commit_fails_for(settings) -> Iterator[str]:  # type: ignore[no-untyped-def]
    """A title whose upload the database refuses at COMMIT (a deferred trigger raising `disk_full`), as a server
    running out of disk would: the upload's file is already written by then."""
    title = f"commit-fails-{uuid.uuid4().hex[:8]}"
    dsn = libpq_dsn(settings.resolved_database_url)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE OR REPLACE FUNCTION govrag_test_disk_full() RETURNS trigger LANGUAGE plpgsql AS "
                     "$$ BEGIN RAISE EXCEPTION 'could not extend file' USING ERRCODE = '53100'; END $$")
        conn.execute(f"CREATE CONSTRAINT TRIGGER govrag_test_disk_full AFTER INSERT ON documents DEFERRABLE "
                     f"INITIALLY DEFERRED FOR EACH ROW WHEN (NEW.title = '{title}') "
                     f"EXECUTE FUNCTION govrag_test_disk_full()")
    try:
        yield title
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("DROP TRIGGER IF EXISTS govrag_test_disk_full ON documents")


def _stored(blob_dir: Path) -> set[Path]:
    return set(blob_dir.iterdir()) if blob_dir.exists() else set()


def _age(path: Path) -> None:
    os.utime(path, (A_DAY_AGO, A_DAY_AGO))


def test_an_upload_whose_commit_failed_leaves_a_file_that_the_sweep_removes_after_a_day(
        client: TestClient, settings, desk: tuple[str, str], commit_fails_for: str) -> None:  # type: ignore[no-untyped-def]
    department, editor = desk
    before = _stored(settings.blob_dir)
    response = client.post("/v1/documents", headers=auth(editor), data={"department": department,
                                                                          "title": commit_fails_for},
                           files={"file": ("minutes.txt", f"Minutes of the board {uuid.uuid4().hex}.".encode())})
    assert response.status_code == 503, response.text
    left = _stored(settings.blob_dir) - before
    assert len(left) == 1  # the sealed original, written before the commit that failed
    orphan = left.pop()
    listed = client.get("/v1/documents", params={"department": department}, headers=auth(editor)).json()
    assert orphan.name.removesuffix(".bin") not in {d["document_id"] for d in listed["documents"]}

    assert sweep_orphan_files(settings) == 0 and orphan.exists()  # young: an upload may still be committing
    _age(orphan)
    assert sweep_orphan_files(settings) == 1
    assert not orphan.exists()


def test_the_sweep_keeps_what_a_document_owns_and_what_is_not_ours(
        client: TestClient, settings, desk: tuple[str, str],  # type: ignore[no-untyped-def]
        issue_token: Callable[..., str]) -> None:
    department, editor = desk
    marker = uuid.uuid4().hex
    response = client.post("/v1/documents", headers=auth(editor), data={"department": department},
                           files={"file": ("rota.txt", f"The weekend rota {marker} starts at nine.".encode())})
    assert response.status_code == 202, response.text
    document_id = response.json()["document_id"]
    assert wait_for_document(client, editor, document_id)["status"] == "ready"
    owned = settings.blob_dir / f"{document_id}.bin"
    cut_short = settings.blob_dir / f"{document_id}.bin.tmp"  # a rewrite a crash interrupted
    orphan, young = (settings.blob_dir / f"{uuid.uuid4()}.pii" for _ in range(2))
    orphan_generation = settings.blob_dir / f"{uuid.uuid4()}.3.pii"  # the placeholder map of an index generation
    foreign = settings.blob_dir / "README.txt"  # not a name this code writes
    marker, marker_cut_short = settings.blob_dir / blobs.MARKER, settings.blob_dir / f"{blobs.MARKER}.tmp"
    for path in (cut_short, orphan, orphan_generation, young, foreign, marker_cut_short):
        path.write_bytes(b"\0" * 16)
    for path in (owned, cut_short, orphan, orphan_generation, foreign, marker, marker_cut_short):
        _age(path)

    assert sweep_orphan_files(settings) == 3
    assert owned.exists() and young.exists() and foreign.exists() and marker.exists() and marker_cut_short.exists()
    assert not cut_short.exists() and not orphan.exists() and not orphan_generation.exists()
    assert [d for d, _, _ in blobs.stale_files(settings.blob_dir, ORPHAN_GRACE_SECONDS)] == [document_id]
    reindexed = client.post("/v1/admin/reindex", headers=auth(issue_token(PLATFORM_ADMIN)),
                            json={"department": department, "document_ids": [document_id]})
    assert reindexed.status_code == 202 and len(reindexed.json()["queued"]) == 1
    assert wait_for_document(client, editor, document_id)["status"] == "ready"  # rebuilt from the kept original
    young.unlink()
    foreign.unlink()
    marker_cut_short.unlink()
