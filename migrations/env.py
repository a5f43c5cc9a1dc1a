"""Alembic environment: the URL comes from the caller's config, never from a file. Each revision runs in a
transaction of its own, on SQLite too (`_transactional_ddl`): one interrupted (Ctrl-C, a crash, a failing step) leaves
the database exactly at the revision before it, the ones before kept."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, Engine, engine_from_config, event, pool

from core.migrate import refuse_downgrade_losing_data
from core.models import Base

config = context.config
target_metadata = Base.metadata


def run_migrations_offline() -> None:
    """Emit SQL without a connection (`sql=True`, Alembic's `--sql`), each revision between a BEGIN and a COMMIT of
    its own as online, on SQLite too: a script run with psql's ON_ERROR_STOP or sqlite3's -bail that fails in a
    revision (a guard refusing it, README "Schema as SQL") leaves the database at the revision before it."""
    context.configure(url=config.get_main_option("sqlalchemy.url"), target_metadata=target_metadata,
                      literal_binds=True, render_as_batch=True, transactional_ddl=True,
                      transaction_per_migration=True)
    _migrate()


def run_migrations_online() -> None:
    """Run against a live connection (one passed in by the caller, or a new one)."""
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = engine_from_config(config.get_section(config.config_ini_section, {}), prefix="sqlalchemy.",
                                poolclass=pool.NullPool)
    if engine.dialect.name == "sqlite":
        _transactional_ddl(engine)
    with engine.connect() as new_connection:
        _run(new_connection)


def _transactional_ddl(engine: Engine) -> None:
    """SQLite's schema changes in the transaction SQLAlchemy begins (its pysqlite recipe): the driver begins one only
    before DML, so each CREATE or ALTER before it committed on its own, and a revision interrupted in its middle left
    its changes without its record (a column, a table, a batch copy `_alembic_tmp_*`) for the next upgrade to fail
    on. The driver now begins none; SQLAlchemy's `begin` emits BEGIN IMMEDIATE, and the driver's COMMIT or ROLLBACK
    ends it. IMMEDIATE: a revision reads (its version, a table to copy) before it writes, and a deferred BEGIN's first
    write failed at once ("database is locked", no wait) if another process had written in between."""

    @event.listens_for(engine, "connect")
    def _no_implicit_begin(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
        dbapi_connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def _begin(connection: Connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def _run(connection) -> None:  # type: ignore[no-untyped-def]
    context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True,
                      transaction_per_migration=True, on_version_apply=config.attributes.get("on_version_apply"))
    _migrate()


def _migrate() -> None:
    """Run the planned steps; a downgrade is checked for data it would delete before any of them runs."""
    with context.begin_transaction():
        refuse_downgrade_losing_data(context.get_context())  # before any step: each revision commits on its own
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
