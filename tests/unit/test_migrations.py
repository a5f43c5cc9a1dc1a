"""The schema changes only through Alembic: one head, and up → down → up works on both databases."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect, text

from core import migrate

EXPECTED_TABLES = {"departments", "documents", "ingestion_jobs", "wrapped_keys", "casbin_rule", "retrieval_events"}


def test_single_head() -> None:
    heads = ScriptDirectory.from_config(migrate.alembic_config("sqlite://")).get_heads()
    assert len(heads) == 1


def _tables(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        return set(inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


def _round_trip(url: str) -> None:
    migrate.upgrade(url)
    assert _tables(url) >= EXPECTED_TABLES
    migrate.downgrade(url, "base")
    assert _tables(url) == set()
    migrate.upgrade(url)
    assert _tables(url) >= EXPECTED_TABLES


def test_upgrade_downgrade_upgrade_sqlite(tmp_path: Path) -> None:
    _round_trip(f"sqlite:///{tmp_path / 'schema.db'}")


@pytest.mark.usefixtures("make_pg_database")
def test_upgrade_downgrade_upgrade_postgresql(make_pg_database: Callable[[], str]) -> None:
    _round_trip(make_pg_database())


def _execute(url: str, *statements: str) -> None:
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            for statement in statements:
                conn.execute(text(statement))
    finally:
        engine.dispose()


def test_migrate_on_a_database_newer_than_the_release_says_so_in_one_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """`govrag migrate` against a schema a newer release wrote printed a raw alembic traceback."""
    url = f"sqlite:///{tmp_path / 'schema.db'}"
    migrate.upgrade(url)
    _execute(url, "UPDATE alembic_version SET version_num = '0099'")
    assert _cli(monkeypatch, tmp_path, url, ["migrate"]) == 2
    error = capsys.readouterr().err
    assert error.strip().count("\n") == 0 and "Traceback" not in error
    assert "database schema is at 0099" in error and migrate.head_revision() in error


def test_migrate_on_an_unreachable_database_says_so_in_one_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    url = "postgresql+psycopg://postgres:s3cret@127.0.0.1:1/nowhere"
    assert _cli(monkeypatch, tmp_path, url, ["migrate"]) == 1
    error = capsys.readouterr().err
    assert error.strip().count("\n") == 0 and "Traceback" not in error
    assert "cannot reach the database at postgresql+psycopg://postgres:***@127.0.0.1:1/nowhere" in error
    assert "s3cret" not in error


def _cli(monkeypatch: pytest.MonkeyPatch, data_dir: Path, url: str, argv: list[str]) -> int:
    from api import cli
    from core.settings import get_settings

    monkeypatch.setenv("GOVRAG_DATA_DIR", str(data_dir))
    monkeypatch.setenv("GOVRAG_DATABASE_URL", url)
    get_settings.cache_clear()
    try:
        return cli.main(argv)
    finally:
        get_settings.cache_clear()
