"""CLI commands that need the embedded vector store, run beside a serving API on the same data dir: one process may
hold that store, so they refuse in one clear line before writing anything (no traceback, no ledger row, no
document row)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text

from core import migrate
from tests.conftest import PLATFORM_ADMIN, auth, wait_for_job
from tests.support.govrag_process import govrag_env, run_govrag


@pytest.fixture
def serving(tmp_path: Path) -> Iterator[tuple[TestClient, Path]]:
    """An API on the embedded default (as `govrag serve` runs it) with one ready document in `hr`."""
    from api.app import create_app
    from core.settings import Settings
    from retrieval.store import close_vector_store

    data_dir = tmp_path / "data"
    settings = Settings(data_dir=data_dir, admins=[PLATFORM_ADMIN], broker_url="memory://", inprocess_worker=True)
    data_dir.mkdir()
    migrate.upgrade(settings.resolved_database_url)
    try:
        with TestClient(create_app(settings)) as client:
            admin = auth(client.app.state.dev_issuer.issue(PLATFORM_ADMIN, []))
            assert client.post("/v1/admin/departments", json={"name": "hr"}, headers=admin).status_code == 201
            assert client.post("/v1/admin/role-assignments", headers=admin,
                               json={"subject": "edith", "role": "editor", "department": "hr"}).status_code == 201
            editor = client.app.state.dev_issuer.issue("edith", [])
            job = client.post("/v1/documents", headers=auth(editor), data={"department": "hr"},
                              files={"file": ("a.txt", b"Annual leave is 28 days for every employee.")}).json()
            assert wait_for_job(client, editor, job["job_id"])["status"] == "ready"
            yield client, data_dir
    finally:
        close_vector_store(settings)


def _column(data_dir: Path, query: str) -> list[str]:
    engine = create_engine(f"sqlite:///{data_dir / 'govrag.db'}")
    try:
        with engine.connect() as conn:
            return [str(row[0]) for row in conn.execute(text(query))]
    finally:
        engine.dispose()


def test_training_export_beside_serve_refuses_without_a_ledger_row(serving: tuple[TestClient, Path],
                                                                    tmp_path: Path) -> None:
    """It printed `Can't init WAL: Kind(WouldBlock)` in a traceback, exit 1, after recording a `training_export` for
    an export that never happened."""
    _, data_dir = serving
    before = _column(data_dir, "SELECT event_type FROM retrieval_events ORDER BY id")
    result = run_govrag(["export", "training-data", "--department", "hr", "-o", str(tmp_path / "hr.jsonl")],
                        env=govrag_env(data_dir=str(data_dir)))
    assert result.returncode == 1, result.stderr[-800:]
    assert "Traceback" not in result.stderr
    assert "held by another process" in result.stderr and "GOVRAG_QDRANT_URL" in result.stderr
    assert _column(data_dir, "SELECT event_type FROM retrieval_events ORDER BY id") == before
    assert not (tmp_path / "hr.jsonl").exists()


def test_ingest_beside_serve_refuses_before_writing_a_document(serving: tuple[TestClient, Path],
                                                              tmp_path: Path) -> None:
    """Every file came back `failed: internal error` and left a failed document row behind."""
    _, data_dir = serving
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "policy.txt").write_text("Remote work is allowed two days a week.", encoding="utf-8")
    before = _column(data_dir, "SELECT id FROM documents ORDER BY id")
    result = run_govrag(["ingest", str(inbox), "--department", "hr"], env=govrag_env(data_dir=str(data_dir)))
    assert result.returncode == 1, result.stderr[-800:]
    message = " ".join(result.stderr.split())  # rich wraps long lines
    assert "Traceback" not in message and "held by another process" in message and "--api-url" in message
    assert _column(data_dir, "SELECT id FROM documents ORDER BY id") == before
