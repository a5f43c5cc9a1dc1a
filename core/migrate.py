"""Run Alembic migrations programmatically: the only way the schema changes."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import Connection, create_engine, exc, make_url, pool

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
class MigrationError(Exception):
    """A schema problem told to an operator in one line; `exit_code` is what the CLI exits with."""

    exit_code = 1


class DatabaseUnreachable(MigrationError):
    """The database did not accept a connection."""


class UnknownRevision(MigrationError):
    """The database (or a requested target) is at a revision this release does not ship."""

    exit_code = 2


def alembic_config(database_url: str) -> Config:
    """An Alembic config pointing at the packaged migrations and `database_url`."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


@lru_cache(maxsize=1)
def _scripts() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config("sqlite://"))


def head_revision() -> str:
    """The revision this release's code needs."""
    return str(_scripts().get_current_head())


def current_revision(database_url: str) -> str | None:
    """The database's revision (None before the first migration); DatabaseUnreachable if it cannot be asked."""
    with _connection(database_url) as connection:
        return MigrationContext.configure(connection).get_current_revision()


def upgrade(database_url: str, revision: str = "head") -> None:
    """Bring the schema up to `revision`."""
    _refuse_unknown(current_revision(database_url))
    with _revision_errors():
        command.upgrade(alembic_config(database_url), revision)


def downgrade(database_url: str, revision: str) -> None:
    """Take the schema down to `revision`."""
    command.downgrade(alembic_config(database_url), revision)


def _known(revision: str) -> bool:
    try:
        return _scripts().get_revision(revision) is not None
    except CommandError:
        return False


def _refuse_unknown(current: str | None) -> None:
    if current is not None and not _known(current):
        raise UnknownRevision(f"database schema is at {current}, which this release does not know (its newest is "
                              f"{head_revision()}): run the release that migrated it")


@contextmanager
def _revision_errors() -> Iterator[None]:
    """Alembic's revision lookup errors as UnknownRevision (one line, no traceback)."""
    try:
        yield
    except CommandError as error:
        if "revision" not in str(error).lower():
            raise
        raise UnknownRevision(str(error)) from None


@contextmanager
def _connection(database_url: str) -> Iterator[Connection]:
    """A short-lived connection; DatabaseUnreachable (host and driver reason, never the password) if refused."""
    engine = create_engine(database_url, poolclass=pool.NullPool)
    try:
        try:
            connection = engine.connect()
        except exc.OperationalError as error:
            where = make_url(database_url).render_as_string(hide_password=True)
            reason = str(error.orig).strip().splitlines()[0] if error.orig else type(error).__name__
            raise DatabaseUnreachable(f"cannot reach the database at {where}: {reason}") from None
        with connection:
            yield connection
    finally:
        engine.dispose()
