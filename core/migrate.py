"""Run Alembic migrations programmatically: the only way the schema changes.

Also what the running code needs from the schema: `require_head` (start-up refuses a database at another revision;
`migrate_in_development` before `govrag serve`'s; `require_head_for_command` before a command uses the database,
migrating first only where `command_migrates_first`) and `SchemaWatch` (readiness notices a schema changed under a
running process), the guard every downgrade runs first (`refuse_downgrade_losing_data`, over each migration's
`data_at_risk`), and the one an upgrade written as SQL meets where its data step needs govrag (`offline_guard`).
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from alembic import command, op
from alembic.config import Config
from alembic.runtime.migration import MigrationContext, MigrationInfo
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import Connection, column, create_engine, event, exc, inspect, make_url, pool, select, table, text

from core.cache import Rechecked
from core.db import transaction_lock, unit_of_work
from core.errors import Unavailable, UnusablePath, check_writable, unavailable_dependency
from core.logs import PASSWORD_PARAMETERS, mask_secrets

if TYPE_CHECKING:
    from core.settings import Settings

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
SCHEMA_CHECK_SECONDS = 5.0  # how long readiness trusts its last look at the database's revision
MIGRATION_LOCK = "schema migration"  # the `transaction_lock` an upgrade or a downgrade holds while it runs
VERSION_TABLE = table("alembic_version", column("version_num"))  # Alembic's record of the revision (its default name)
DEPLOYMENT_TABLE = table("deployment", column("id"))  # migration 0016's one row: the id audit signatures bind


class MigrationError(Exception):
    """A schema problem told to an operator in one line; `exit_code` is what the CLI exits with."""

    exit_code = 1


class DatabaseUnreachable(MigrationError):
    """The database did not accept a connection."""


class UnknownRevision(MigrationError):
    """The database (or a requested target) is at a revision this release does not ship."""

    exit_code = 2


class SchemaMismatch(MigrationError):
    """The database's revision is not the one this release's code was written for."""


class DeploymentMissing(SchemaMismatch):
    """The database is at the code's revision but its deployment id row is gone: a restore to complete, exit 2 (no
    outage that ends by waiting, nor a migration that mends it: a new id would fail every checkpoint signed with the
    old one)."""

    exit_code = 2


class DowngradeRefused(MigrationError):
    """A downgrade would delete data the schema it returns to cannot hold."""


class MigrationInterrupted(KeyboardInterrupt):
    """A Ctrl-C that stopped an upgrade, with the line to say: the revision the database was left at. Still a
    KeyboardInterrupt, which no `except Exception` on its way swallows; `exit_code` 130, as for any Ctrl-C."""

    exit_code = 130


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
    """The database's revision (None before the first migration); DatabaseUnreachable if it cannot be asked. Read
    from Alembic's version table itself: a MigrationContext says two INFO lines each time one is made ("Context impl
    PostgresqlImpl.", "Will assume transactional DDL."), a running API's log every few seconds (`SchemaWatch`)."""
    with _connection(database_url) as connection:
        return _revision(connection)


def _revision(connection: Connection) -> str | None:
    if not inspect(connection).has_table(VERSION_TABLE.name):
        return None
    revisions = connection.execute(select(VERSION_TABLE.c.version_num)).scalars().all()
    if len(revisions) > 1:  # as Alembic's get_current_revision: branches this release (one head) never makes
        raise CommandError(f"Version table '{VERSION_TABLE.name}' has more than one head present")
    return revisions[0] if revisions else None


def schema_problem(database_url: str) -> str | None:
    """Why this release cannot run on the database's schema, or None when it is at the code's head with its
    deployment id."""
    refusal = _schema_refusal(database_url)
    return None if refusal is None else str(refusal)


def require_head(database_url: str) -> None:
    """Refuse to start (SchemaMismatch, saying what to do) unless the database is at the code's head with its
    deployment id (DeploymentMissing)."""
    refusal = _schema_refusal(database_url)
    if refusal is not None:
        raise refusal


def _schema_refusal(database_url: str) -> SchemaMismatch | None:
    """What `require_head` raises for the database's schema (its revision, then its deployment row); None: nothing."""
    with _connection(database_url) as connection:
        current, head = _revision(connection), head_revision()
        if current == head:
            return _deployment_missing(connection)
    if current is not None and not _known(current):
        return SchemaMismatch(f"database schema is at {current}, newer than this release knows (it needs {head}): "
                              "run the release that migrated it")
    return SchemaMismatch(f"database schema is at {current or 'no revision'}, this release needs {head}: run "
                          "`govrag migrate`")


def _deployment_missing(connection: Connection) -> DeploymentMissing | None:
    """DeploymentMissing unless the `deployment` row migration 0016 minted is there (a partial restore can leave it,
    or its whole table, out: every checkpoint due, and so every query, would then fail)."""
    if not inspect(connection).has_table(DEPLOYMENT_TABLE.name):
        lost = "table migration 0016 created"
    elif connection.execute(select(DEPLOYMENT_TABLE.c.id).where(DEPLOYMENT_TABLE.c.id == 1)).first() is None:
        lost = "row migration 0016 minted"
    else:
        return None
    return DeploymentMissing(f"the database records no deployment id (the `deployment` {lost} is missing, as after a "
                             "partial restore): put it back as docs/audit.md says (\"A lost deployment row\")")


def migrate_to_head(settings: Settings, report: Callable[[str], None] | None = None) -> None:
    """What `govrag migrate` does: make the data dir (UnusablePath if this user cannot) and bring the schema to head
    (`report`: as `upgrade`)."""
    make_data_dir(settings)
    upgrade(settings.resolved_database_url, report=report)


def migrate_in_development(settings: Settings) -> None:
    """`govrag serve`'s first step outside production, `migrate_to_head`, so that a fresh embedded default, or one a
    newer release left behind, needs no `govrag migrate`. Production never migrates: its `require_head` refuses."""
    if not settings.is_production:
        migrate_to_head(settings)


def command_migrates_first(settings: Settings) -> bool:
    """Whether a CLI command on the database (not `govrag serve`, the deployment's own process, nor `govrag migrate`)
    migrates it before it starts: only in development on the embedded SQLite database, one local file the command and
    `govrag serve` share and nothing else runs against. On a server database (PostgreSQL) it never does, whatever
    GOVRAG_ENV says (development unless set, so also on a shell pointed at production): an upgrade there would take a
    running API of the older release out of service (`/readyz` 503), for a command as harmless as `govrag audit
    verify`. There, as in production, a schema off the code's revision is refused: `govrag migrate` is the way."""
    return not settings.is_production and settings.embedded_database


def make_data_dir(settings: Settings) -> None:
    """Create the data dir (and its parents) if missing, as every start does first; UnusablePath, said in one line, if
    this user cannot."""
    data_dir = settings.data_dir.resolve()  # the folder the system refuses is then named whole, as the data dir is
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UnusablePath.refused(f"the data dir {data_dir}", error, "GOVRAG_DATA_DIR", fix="create it") from None


def require_head_for_command(settings: Settings) -> None:
    """A CLI command's start on the database (an in-process `govrag ingest`, `govrag keys rotate`, `govrag audit ...`,
    `govrag export training-data`), before it reads or writes anything: `migrate_to_head` where
    `command_migrates_first`, then `require_head`. A database it cannot reach is Unavailable("database"), which the
    command says as it says any outage (`unavailable_dependency`), without the address (the converse of `reached`, for
    a start naming it); a folder it cannot use is UnusablePath, as for a start."""
    try:
        if command_migrates_first(settings):
            migrate_to_head(settings)
        require_head(settings.resolved_database_url)
    except DatabaseUnreachable:
        raise Unavailable("database") from None


class SchemaWatch(Rechecked[str]):
    """The schema problem of a running process's database, asked at most every SCHEMA_CHECK_SECONDS."""

    def __init__(self, database_url: str, every_seconds: float | None = None) -> None:
        super().__init__(lambda: schema_problem(database_url),
                         SCHEMA_CHECK_SECONDS if every_seconds is None else every_seconds)


def upgrade(database_url: str, revision: str = "head", *, report: Callable[[str], None] | None = None) -> None:
    """Bring the schema up to `revision`, each revision in a transaction of its own (migrations/env.py), one process
    at a time (`_one_at_a_time`). `report` is told of each revision applied once its transaction committed
    (`_told_once_committed`: "migrated 0013 -> 0014 (blob store id)"), without Alembic's INFO logging."""
    with _interruption_said(database_url):
        _refuse_unknown(current_revision(database_url))
        config = alembic_config(database_url)
        with _one_at_a_time(database_url), _revision_errors(), _told_once_committed(config, report):
            command.upgrade(config, revision)


@contextmanager
def _interruption_said(database_url: str) -> Iterator[None]:
    """A Ctrl-C in the block as MigrationInterrupted, one line naming the revision the database is at once the one under
    way was rolled back (each revision is a transaction of its own), instead of a traceback."""
    try:
        yield
    except KeyboardInterrupt:
        try:
            current = current_revision(database_url)
        except (Exception, KeyboardInterrupt):  # unreachable now, or a second Ctrl-C
            where = "the database's revision could not be read"
        else:
            where = f"the database is at revision {current}" if current else "the database is at no revision yet"
        raise MigrationInterrupted(f"interrupted; {where} (run govrag migrate again to finish)") from None


@contextmanager
def _told_once_committed(config: Config, report: Callable[[str], None] | None) -> Iterator[None]:
    """`report` told of each revision the upgrade in the block applies, once it committed. Alembic's on_version_apply
    is called in the revision's transaction, before a commit that may yet fail or be interrupted: the revision is held
    until its connection begins the next transaction (the next revision's) or the block ends without an error."""
    if report is None:
        yield
        return
    held: list[str] = []

    def tell(*_: object) -> None:
        while held:
            report(held.pop(0))

    def hold(ctx: MigrationContext, step: MigrationInfo, **_: object) -> None:
        if not event.contains(ctx.connection, "begin", tell):
            event.listen(ctx.connection, "begin", tell)
        held.append(_applied(step))

    config.attributes["on_version_apply"] = hold
    yield
    tell()


def _applied(step: MigrationInfo) -> str:
    """A revision applied, in words: its revision, the one before and the name of its file."""
    name = Path(_scripts().get_revision(step.up_revision_id).path).stem.partition("_")[2].replace("_", " ")
    return f"migrated {', '.join(step.source_revision_ids) or 'base'} -> {step.up_revision_id} ({name})"


def downgrade(database_url: str, revision: str) -> None:
    """Take the schema down to `revision`, refusing before any step runs if one of them would delete data (the
    check migrations/env.py runs for every downgrade: refuse_downgrade_losing_data); one process at a time."""
    _refuse_unknown(current_revision(database_url))
    with _one_at_a_time(database_url), _revision_errors():
        command.downgrade(alembic_config(database_url), revision)


@contextmanager
def _one_at_a_time(database_url: str) -> Iterator[None]:
    """MIGRATION_LOCK held around a schema change. Two processes started together on a database not yet migrated
    (`govrag migrate` beside a `govrag serve` in development; on the embedded default, `govrag serve` and a `govrag
    audit verify`, two `govrag ingest`) both ran the same steps: the second ended in a traceback on what the first had
    just created, and on SQLite could run a data step twice. The second now waits, and Alembic, reading the revision
    again under the lock, finds nothing left to do."""
    with unit_of_work(database_url) as session:
        transaction_lock(session, MIGRATION_LOCK)
        yield


def refuse_downgrade_losing_data(migration: MigrationContext) -> None:
    """Before any step of a downgrade runs, DowngradeRefused if a revision it would undo holds data (its migration's
    `data_at_risk`): the one place this is checked, so that a refusal comes before any revision was undone for good
    (each commits on its own). Writing such a downgrade as SQL (`--sql`) is refused: no rows to count."""
    plan = migration._migrations_fn  # the command's own plan: what alembic runs next, relative targets resolved
    if getattr(plan, "__name__", "") != "downgrade" or plan is None:
        return
    for step in plan(migration.get_current_heads(), migration):
        revision, at_risk = step.revision.revision, getattr(step.revision.module, "data_at_risk", None)
        if at_risk is None:
            continue
        if migration.as_sql:
            raise DowngradeRefused(f"refusing to write SQL undoing revision {revision}: what it would delete cannot "
                                   "be counted without the database. Nothing was changed")
        lost = at_risk(migration.connection)
        if lost:
            raise DowngradeRefused(f"refusing to undo revision {revision}: it would delete {'; '.join(lost)}. "
                                   "Nothing was changed")


def count_rows(connection: Connection, table: str, where: str = "") -> int:
    """Rows of `table` (matching the SQL condition `where`); for downgrade guards."""
    condition = f" WHERE {where}" if where else ""
    return int(connection.execute(text(f"SELECT count(*) FROM {table}{condition}")).scalar_one())  # noqa: S608


def rows_at_risk(connection: Connection, checks: list[tuple[str, str, str]]) -> list[str]:
    """For each (what, table, condition) holding rows: "N what"."""
    counted = ((what, count_rows(connection, table, where)) for what, table, where in checks)
    return [f"{count} {what}" for what, count in counted if count]


def offline_guard(revision: str, constraint: str, documents_where: str, comment: str) -> None:
    """A data step written as SQL (`--sql`) that only govrag's Python can do: the script says so (`comment`, each of
    its lines as an SQL comment) and fails here, on a CHECK constraint named `constraint`, on a database holding a
    document matching `documents_where` (an SQL condition), which then takes `revision` from govrag (README "Schema
    as SQL"). A database without such documents, a new one among them, passes it with nothing changed. What it writes
    is part of each calling revision's script, shipped and run as it was: change it only to write the same SQL, byte
    for byte (`alembic upgrade --sql` before and after); a guard of another shape is a helper of its own."""
    guard = f"offline_guard_{revision}"
    op.get_context().impl.static_output("".join(f"-- {line}\n" for line in comment.splitlines()))
    op.execute(f"CREATE TEMPORARY TABLE {guard} (documents_to_redact INTEGER CONSTRAINT {constraint} "
               "CHECK (documents_to_redact = 0))")
    op.execute(f"INSERT INTO {guard} (documents_to_redact) "  # noqa: S608
               f"SELECT count(*) FROM documents WHERE {documents_where}")
    op.execute(f"DROP TABLE {guard}")


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


def shown_url(database_url: str) -> str:
    """The database's URL as it may be printed (`_without_passwords`)."""
    return _without_passwords(database_url)[0]


def _without_passwords(database_url: str) -> tuple[str, list[str]]:
    """The URL as it may be printed (`***` for the user-info password, password-like query parameters left out), and
    the values hidden."""
    url = make_url(database_url)
    hidden = {key: value for key, value in url.query.items() if key.lower() in PASSWORD_PARAMETERS}
    secrets = [url.password or ""] + [item for value in hidden.values()
                                      for item in ((value,) if isinstance(value, str) else value)]
    url = url.difference_update_query(hidden)
    return url.render_as_string(hide_password=True), [secret for secret in secrets if secret]


@contextmanager
def _connection(database_url: str) -> Iterator[Connection]:
    """A short-lived connection; DatabaseUnreachable (host and driver reason, never the password) if refused."""
    engine = create_engine(database_url, poolclass=pool.NullPool)
    try:
        try:
            connection = engine.connect()
        except (exc.OperationalError, exc.ProgrammingError) as error:  # refused, or an option libpq does not take
            raise _unreachable(database_url, error) from None
        with connection:
            yield connection
    finally:
        engine.dispose()


@contextmanager
def reached(database_url: str) -> Iterator[None]:
    """A start's step after `require_head`: the database lost since (an outage, `unavailable_dependency`) is
    DatabaseUnreachable, said in one line as `require_head` says it, never a traceback naming the server."""
    try:
        yield
    except Exception as error:
        if unavailable_dependency(error) != "database":
            raise
        raise _unreachable(database_url, error) from None


def _unreachable(database_url: str, error: Exception) -> DatabaseUnreachable | UnusablePath:
    """`error`, the database refusing or dropping the connection, in one line: host and the driver's reason, never the
    password (DatabaseUnreachable); or, for a SQLite file, its folder when that is why (UnusablePath)."""
    if (unusable := _sqlite_folder_unusable(database_url)) is not None:
        return unusable
    where, secrets = _without_passwords(database_url)
    driver_error = getattr(error, "orig", None)
    reason = str(driver_error).strip().splitlines()[0] if driver_error else ""
    if not reason or any(secret in reason for secret in secrets) or mask_secrets(reason) != reason:
        reason = type(error).__name__  # the driver echoes option values: one may be the password
    return DatabaseUnreachable(f"cannot reach the database at {where}: {reason}")


def _sqlite_folder_unusable(database_url: str) -> UnusablePath | None:
    """The file `database_url` names, when SQLite cannot open it because of its folder (SQLite makes no folder, and
    needs to write in it: the file, its journal), as UnusablePath; else None."""
    url = make_url(database_url)
    name = url.database
    if url.get_backend_name() != "sqlite" or not name or name == ":memory:" or url.query.get("uri"):
        return None  # another database, one in memory, or a `file:` URI (its path is SQLite's to read)
    database = Path(name).resolve()
    try:  # the system's own reason where it gives one: the folder missing, or one above it not searchable
        if not stat.S_ISDIR(database.parent.stat().st_mode):
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(database.parent))
        check_writable(database.parent)  # as SQLite, with this user's rights
    except OSError as error:
        # no such folder: one GOVRAG_DATABASE_URL names (the data dir is made before the database is opened)
        missing = error.errno in (errno.ENOENT, errno.ENOTDIR)
        return UnusablePath.refused(f"the database at {database}", error,
                                    "GOVRAG_DATABASE_URL" if missing else "GOVRAG_DATA_DIR or GOVRAG_DATABASE_URL",
                                    fix="create it" if missing else None)
    return None
