"""`govrag ingest PATH` in-process and `govrag keys rotate`, against their own PostgreSQL database and data dir."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from api.cli import main
from core.db import unit_of_work
from core.settings import get_settings


@pytest.fixture
def cli_env(make_pg_database: Callable[[], str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """GOVRAG_* variables for a fresh database and data dir; the department `hr` exists."""
    from authz import service as authz_service
    from core import migrate
    from core.keystore import keystore_for

    url = make_pg_database()
    migrate.upgrade(url)
    monkeypatch.setenv("GOVRAG_DATABASE_URL", url)
    monkeypatch.setenv("GOVRAG_DATA_DIR", str(tmp_path / "data"))
    get_settings.cache_clear()
    settings = get_settings()
    with unit_of_work(url) as session:
        authz_service.create_department(session=session, keystore=keystore_for(settings), name="hr")
    yield url
    from retrieval.store import close_vector_store

    close_vector_store(settings)
    get_settings.cache_clear()


def test_ingest_folder_reports_each_outcome(cli_env: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "inbox"
    folder.mkdir()
    (folder / "leave.md").write_text("# Parental leave\n\nParents get sixteen weeks of paid leave.\n")
    (folder / "leave-copy.md").write_text("# Parental leave\n\nParents get sixteen weeks of paid leave.\n")
    (folder / "photo.txt").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    (folder / "keys.txt").write_text("Deploy with AKIAIOSFODNN7EXAMPLE tonight.")
    code = main(["ingest", str(folder), "--department", "hr", "--acl-group", "hr-staff"])
    out = capsys.readouterr().out
    assert code == 1  # one file was refused
    assert "ready: 1" in out and "duplicate: 1" in out and "refused: 1" in out and "quarantined: 1" in out
    assert "PNG" in out and "AKIAIOSFODNN7EXAMPLE" not in out

    assert main(["keys", "rotate", "--department", "hr"]) == 0
    rotated = capsys.readouterr().out
    assert "hr" in rotated and "2" in rotated
