"""The API and the worker run only on the schema revision their code was written for (production never migrates)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text

from core import migrate


def _settings(url: str, data_dir: Path):  # type: ignore[no-untyped-def]
    from core.settings import Settings

    return Settings(data_dir=data_dir, database_url=url, broker_url="memory://", inprocess_worker=False,
                    admins=["root-admin"])


def _set_revision(url: str, revision: str) -> None:
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(text("UPDATE alembic_version SET version_num = :r"), {"r": revision})
    finally:
        engine.dispose()


def test_the_api_refuses_to_start_on_a_schema_behind_the_code(tmp_path: Path,
                                                             make_pg_database: Callable[[], str]) -> None:
    """The image was upgraded but the migrate step did not run: the API started, /readyz said ready, and the first
    upload answered 500 (UndefinedColumn). Now start-up refuses and says what to do."""
    from api.app import create_app
    from retrieval.store import close_vector_store

    url = make_pg_database()
    migrate.upgrade(url, "0008")
    settings = _settings(url, tmp_path)
    head = migrate.head_revision()
    try:
        with pytest.raises(migrate.SchemaMismatch,
                           match=f"database schema is at 0008, this release needs {head}: run `govrag migrate`"):
            with TestClient(create_app(settings)):
                pass
    finally:
        close_vector_store(settings)


def test_the_api_refuses_to_start_on_a_schema_newer_than_the_code(tmp_path: Path) -> None:
    from api.app import create_app
    from retrieval.store import close_vector_store

    url = f"sqlite:///{tmp_path / 'govrag.db'}"
    migrate.upgrade(url)
    _set_revision(url, "0099")
    settings = _settings(url, tmp_path)
    try:
        with pytest.raises(migrate.SchemaMismatch, match="database schema is at 0099, newer than this release knows"):
            with TestClient(create_app(settings)):
                pass
    finally:
        close_vector_store(settings)


def test_readyz_reports_a_schema_changed_under_the_running_api(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A downgrade (or an older release's process) under a running API: /readyz said ready while requests failed."""
    from api.app import create_app
    from retrieval.store import close_vector_store

    monkeypatch.setattr(migrate, "SCHEMA_CHECK_SECONDS", 0.0)
    url = f"sqlite:///{tmp_path / 'govrag.db'}"
    migrate.upgrade(url)
    settings = _settings(url, tmp_path)
    try:
        with TestClient(create_app(settings)) as client:
            assert client.get("/readyz").json()["checks"]["schema"] == "ok"
            migrate.downgrade(url, "0008")
            response = client.get("/readyz")
    finally:
        close_vector_store(settings)
    assert response.status_code == 503
    assert response.json()["checks"]["schema"] == "mismatch"
    assert response.json()["reason"] == (f"database schema is at 0008, this release needs {migrate.head_revision()}: "
                                         "run `govrag migrate`")


def test_the_schema_check_is_cached_briefly(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'govrag.db'}"
    migrate.upgrade(url)
    watch = migrate.SchemaWatch(url, every_seconds=3600)
    assert watch.problem() is None
    _set_revision(url, "0008")
    assert watch.problem() is None  # still the cached answer
    assert migrate.SchemaWatch(url, every_seconds=0).problem() is not None


def test_production_serve_and_the_worker_refuse_a_stale_schema(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """`govrag serve` in production does not migrate: it must not start on an old schema; neither may a worker."""
    from api import cli
    from core.settings import get_settings

    url = f"sqlite:///{tmp_path / 'govrag.db'}"
    migrate.upgrade(url, "0008")
    monkeypatch.setenv("GOVRAG_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("GOVRAG_DATABASE_URL", url)
    monkeypatch.setenv("GOVRAG_QDRANT_URL", "http://127.0.0.1:1")
    started: list[str] = []
    monkeypatch.setattr("uvicorn.run", lambda *_a, **_k: started.append("api"))
    monkeypatch.setattr("workers.celery_app.GovragCelery.worker_main", lambda *_a, **_k: started.append("worker"))
    get_settings.cache_clear()
    try:
        codes = [cli.main(["worker"])]
        monkeypatch.setattr(type(get_settings()), "is_production", property(lambda _self: True))
        codes.append(cli.main(["serve"]))
    finally:
        get_settings.cache_clear()
    assert codes == [1, 1] and started == []
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"govrag: database schema is at 0008, this release needs {migrate.head_revision()}: "
                     "run `govrag migrate`"] * 2
