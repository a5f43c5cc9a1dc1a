"""The revision a database records, set by hand: a migration run or undone by another release's process."""

from __future__ import annotations

from sqlalchemy import create_engine, text


def set_revision(url: str, revision: str) -> None:
    """Record `revision` in the database at `url`, its schema left as it is."""
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(text("UPDATE alembic_version SET version_num = :r"), {"r": revision})
    finally:
        engine.dispose()
