"""Alembic environment: the URL comes from the caller's config, never from a file."""

from __future__ import annotations

from alembic import context
from sqlalchemy import engine_from_config, pool

from core.migrate import refuse_downgrade_losing_data
from core.models import Base

config = context.config
target_metadata = Base.metadata


def run_migrations_offline() -> None:
    """Emit SQL without a connection."""
    context.configure(url=config.get_main_option("sqlalchemy.url"), target_metadata=target_metadata,
                      literal_binds=True, render_as_batch=True)
    _migrate()


def run_migrations_online() -> None:
    """Run against a live connection (one passed in by the caller, or a new one)."""
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = engine_from_config(config.get_section(config.config_ini_section, {}), prefix="sqlalchemy.",
                                poolclass=pool.NullPool)
    with engine.connect() as new_connection:
        _run(new_connection)


def _run(connection) -> None:  # type: ignore[no-untyped-def]
    context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
    _migrate()


def _migrate() -> None:
    """Run the planned steps; a downgrade is checked for data it would delete before any of them runs."""
    with context.begin_transaction():
        refuse_downgrade_losing_data(context.get_context())  # before any step: SQLite cannot undo one
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
