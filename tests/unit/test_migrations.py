"""The schema changes only through Alembic: one head, and up → down → up works on both databases."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect

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
