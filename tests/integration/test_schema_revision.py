"""The API and the worker run only on the schema revision their code was written for (production never migrates); so do
the commands on the database (an in-process `govrag ingest`, `govrag keys rotate`, `govrag audit ...`), which migrate
first only the embedded SQLite database in development (`migrate.command_migrates_first`)."""

from __future__ import annotations

import logging
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Connection, Engine, create_engine, event, inspect, text

from core import migrate
from tests.support.file_permissions import permission_bits_bind
from tests.support.govrag_process import govrag_env, run_govrag
from tests.support.polling import lines_until
from tests.support.schema_revision import set_revision

ROOT = Path(__file__).resolve().parents[2]


def _settings(url: str, data_dir: Path):  # type: ignore[no-untyped-def]
    from core.settings import Settings

    return Settings(data_dir=data_dir, database_url=url, broker_url="memory://", inprocess_worker=False,
                    admins=["root-admin"])


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
    set_revision(url, "0099")
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
    set_revision(url, "0008")
    assert watch.problem() is None  # still the cached answer
    assert migrate.SchemaWatch(url, every_seconds=0).problem() is not None


def test_reading_the_revision_logs_nothing_and_a_migration_still_logs_its_steps(
        make_pg_database: Callable[[], str], caplog: pytest.LogCaptureFixture) -> None:
    """Each schema check of a running API (/readyz's SchemaWatch, every few seconds) and each start's require_head
    logged Alembic's "Context impl PostgresqlImpl." and "Will assume transactional DDL.", noise in a service's log.
    Reading the revision now logs nothing; a migration still logs each step it runs."""
    url = make_pg_database()
    migrate.upgrade(url, "0008")
    with caplog.at_level(logging.INFO, logger="alembic"):
        migrate.upgrade(url)
        upgraded = caplog.messages
        caplog.clear()
        migrate.require_head(url)
        assert migrate.SchemaWatch(url, every_seconds=0).problem() is None
    assert [record.getMessage() for record in caplog.records if record.name.startswith("alembic")] == []
    assert any(message.startswith("Running upgrade 0008 -> 0009") for message in upgraded), upgraded


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
    monkeypatch.setattr("uvicorn.Server.run", lambda *_a, **_k: started.append("api"))
    monkeypatch.setattr("workers.celery_app.GovragCelery.worker_main", lambda *_a, **_k: started.append("worker"))
    get_settings.cache_clear()
    try:
        codes = [cli.main(["worker"])]
        monkeypatch.setattr(type(get_settings()), "is_production", property(lambda _self: True))
        codes.append(cli.main(["serve", "--port", "0"]))
    finally:
        get_settings.cache_clear()
    assert codes == [1, 1] and started == []
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"govrag: database schema is at 0008, this release needs {migrate.head_revision()}: "
                     "run `govrag migrate`"] * 2


@pytest.fixture
def cli_database(cli_env: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """`cli_env` (a fresh PostgreSQL database at the code's revision, the department `hr`, a data dir tmp_path/data)
    with a retention period, so that `govrag audit purge` is not refused before it starts."""
    from core.settings import get_settings

    monkeypatch.setenv("GOVRAG_AUDIT_RETENTION_DAYS", "1")
    get_settings.cache_clear()
    return cli_env


def _off_head(url: str, schema: str) -> str:
    """Put the database one revision behind the code (an upgrade whose `govrag migrate` did not run) or at a revision
    newer than it knows (an older release on a migrated database); what a start in production says of it."""
    head = migrate.head_revision()
    if schema == "ahead":
        set_revision(url, "0099")
        return (f"govrag: database schema is at 0099, newer than this release knows (it needs {head}): run the release "
                "that migrated it")
    migrate.downgrade(url, "-1")
    below = migrate.current_revision(url)
    assert below is not None and below != head
    return f"govrag: database schema is at {below}, this release needs {head}: run `govrag migrate`"


def _run_in(environment: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Commands run from now on in production or development (GOVRAG_ENV=production would also ask for its secrets)."""
    from core.settings import Settings

    monkeypatch.setattr(Settings, "is_production", property(lambda _self: environment == "production"))


def _stored(url: str, data_dir: Path) -> tuple[str | None, dict[str, int], dict[str, bytes]]:
    """The schema's revision, the rows of every table and the files of the data dir: what a command may have
    changed."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            rows = {table: conn.execute(text(f'SELECT count(*) FROM "{table}"')).scalar_one()  # noqa: S608
                    for table in inspect(conn).get_table_names()}
    finally:
        engine.dispose()
    files = {str(path): path.read_bytes() for path in sorted(data_dir.rglob("*")) if path.is_file()}
    return migrate.current_revision(url), rows, files


# PostgreSQL, in production and in development alike (a shell pointed at a production database without
# GOVRAG_ENV=production runs in development): a schema one revision behind the code or newer than it.
REFUSED = [(environment, schema) for environment in ("production", "development") for schema in ("behind", "ahead")]


@pytest.mark.parametrize(("environment", "schema"), REFUSED)
def test_an_in_process_ingest_refuses_a_schema_off_the_codes_revision_and_stores_nothing(
        cli_database: str, environment: str, schema: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`govrag serve` and `govrag worker` refuse to start on such a schema in production, but an in-process `govrag
    ingest` never asked: it wrote into a schema it does not know (ahead), or ended in a raw traceback mid-run (behind).
    It now refuses first, in the same one line, exit 1, nothing stored and nothing migrated: on PostgreSQL in
    development too, where it had upgraded the schema under a running API of the older release."""
    from api import cli

    _run_in(environment, monkeypatch)
    said = _off_head(cli_database, schema)
    (tmp_path / "pay.md").write_text("# Pay\n\nPay day is the 25th.\n")
    before = _stored(cli_database, tmp_path / "data")
    exit_code = cli.main(["ingest", str(tmp_path / "pay.md"), "--department", "hr"])
    captured = capsys.readouterr()
    assert (exit_code, captured.err.strip().splitlines(), captured.out) == (1, [said], "")
    assert _stored(cli_database, tmp_path / "data") == before


# `govrag keys rotate` (department keys or the master key), `govrag audit ...` and `govrag export training-data`: the
# commands working on the database besides ingest, run in tmp_path (what they export goes to tmp_path/exported).
DATABASE_COMMANDS = [["keys", "rotate"], ["keys", "rotate", "--master"], ["audit", "verify"],
                     ["audit", "export", "-o", "exported"], ["audit", "checkpoint"], ["audit", "purge"],
                     ["audit", "public-key"],
                     ["export", "training-data", "--department", "hr", "-o", "exported"]]


@pytest.mark.parametrize(("environment", "schema"), REFUSED)
def test_key_rotation_and_the_audit_commands_refuse_a_schema_off_the_codes_revision_and_write_nothing(
        cli_database: str, environment: str, schema: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`govrag keys rotate` (department keys or the master key) and `govrag audit ...` rotated, checkpointed, purged
    and recorded exports into a schema they do not know; verify judged a ledger whose columns it does not know. Each
    now refuses first, as `govrag serve` does in production, writing nothing (no export file either) and migrating
    nothing: in development too, where a `govrag audit verify` from a shell without GOVRAG_ENV=production had
    upgraded a production schema under the running API (its /readyz then 503)."""
    _run_in(environment, monkeypatch)
    monkeypatch.chdir(tmp_path)
    _each_command_refuses(cli_database, (1, _off_head(cli_database, schema)), tmp_path, capsys)


def _each_command_refuses(url: str, refusal: tuple[int, str], tmp_path: Path,
                          capsys: pytest.CaptureFixture[str]) -> None:
    """Each of DATABASE_COMMANDS, run in tmp_path, exits with the code of `refusal` and says its line, alone, on
    stderr; none changes the database or the data dir or writes an export."""
    from api import cli

    before = _stored(url, tmp_path / "data")
    for command in DATABASE_COMMANDS:
        exit_code = cli.main(command)
        captured = capsys.readouterr()
        assert (exit_code, captured.err.strip().splitlines(), captured.out) == (refusal[0], [refusal[1]], ""), command
    assert _stored(url, tmp_path / "data") == before
    assert list(tmp_path.glob("*exported*")) == []


@pytest.mark.parametrize("cli_env", ["embedded"], indirect=True)
@pytest.mark.parametrize("argv", DATABASE_COMMANDS, ids=" ".join)
def test_every_command_on_the_database_migrates_an_embedded_development_schema_left_behind_as_serve_does(
        cli_database: str, argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """An embedded default (SQLite in the data dir, which only `govrag serve` and these commands open) a new release
    left behind, in development: `govrag serve` and an in-process `govrag ingest` migrate it, but `govrag keys
    rotate`, `govrag audit ...` and `govrag export training-data` said "run `govrag migrate`". Each now migrates
    first, and does what it was asked."""
    from api import cli

    monkeypatch.chdir(tmp_path)
    _off_head(cli_database, "behind")
    exit_code = cli.main(argv)
    assert (exit_code, "govrag migrate" in capsys.readouterr().err) == (0, False), argv
    assert migrate.current_revision(cli_database) == migrate.head_revision()


@pytest.mark.parametrize("cli_env", ["embedded"], indirect=True)
def test_every_command_stops_on_an_embedded_development_schema_newer_than_the_code_as_migrate_does(
        cli_database: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The embedded default a newer release migrated, in development: each command on it, migrating first, stops as
    `govrag migrate` does (exit 2, one line), writing nothing."""
    monkeypatch.chdir(tmp_path)
    _off_head(cli_database, "ahead")
    said = (f"govrag: database schema is at 0099, which this release does not know (its newest is "
            f"{migrate.head_revision()}): run the release that migrated it")
    _each_command_refuses(cli_database, (2, said), tmp_path, capsys)


def test_two_commands_migrating_one_database_at_once_run_its_steps_once(
        make_pg_database: Callable[[], str], tmp_path: Path) -> None:
    """Two processes migrating a database a new release left behind at once (`govrag migrate` beside a `govrag serve`
    starting in development; here two `govrag migrate`) both ran the missing step: the second ended in a traceback
    (UniqueViolation on the table the first had just created). The second now waits for the first, then finds nothing
    left to do. The first is held as it records its first step (alembic_version locked; reading it is still allowed)
    until the second is waiting too. Two steps, each committed on its own: the second waits for the whole upgrade,
    not for the first step's commit."""
    url = make_pg_database()
    migrate.upgrade(url)
    migrate.downgrade(url, "-2")
    env = {**os.environ, "GOVRAG_DATABASE_URL": url, "GOVRAG_DATA_DIR": str(tmp_path / "data")}
    engine = create_engine(url)
    try:
        with engine.connect() as holder:
            holder.execute(text("LOCK TABLE alembic_version IN EXCLUSIVE MODE"))
            commands = [subprocess.Popen([sys.executable, "-m", "api.cli", "migrate"], cwd=ROOT, env=env,  # noqa: S603
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                        for _ in range(2)]
            try:
                _wait_for_sessions_waiting(holder, len(commands))
            finally:
                holder.rollback()
                said = [command.communicate(timeout=600) for command in commands]
    finally:
        engine.dispose()
    head = migrate.head_revision()
    revisions = [f"{int(head) - below:04d}" for below in (2, 1, 0)]
    waited, first = sorted((command.returncode, err, out.splitlines())
                           for command, (out, err) in zip(commands, said, strict=True))
    assert waited == (0, "", [f"govrag: already at head {head} in {url}"])
    assert first[:2] == (0, "") and first[2][-1] == f"govrag: at head {head} in {url}"
    assert [step.split(" (")[0] for step in first[2][:-1]] == [
        f"govrag: migrated {before} -> {after}" for before, after in zip(revisions, revisions[1:], strict=False)]
    assert migrate.current_revision(url) == head


def test_migrate_names_each_revision_it_applies_then_the_head_and_the_database(
        make_pg_database: Callable[[], str], tmp_path: Path) -> None:
    """`govrag migrate` said "schema is at the latest revision" whether it had applied every revision or none, and not
    of which database. It now names each revision once it committed, then the head and the database, its password
    masked, on stdout (Alembic's log lines stay off)."""
    url = make_pg_database().replace("postgres@", "postgres:S3cret-Pw-7781@")  # trust: any password is taken
    env = govrag_env(database_url=url, data_dir=str(tmp_path / "data"))
    first, again = run_govrag(["migrate"], env=env), run_govrag(["migrate"], env=env)
    head, shown = migrate.head_revision(), url.replace("S3cret-Pw-7781", "***")
    *steps, done = first.stdout.splitlines()
    revisions = ["base", *(f"{number:04d}" for number in range(1, int(head) + 1))]
    assert (first.returncode, first.stderr, done) == (0, "", f"govrag: at head {head} in {shown}")
    assert [step.split(" (")[0] for step in steps] == [f"govrag: migrated {before} -> {after}"
                                                       for before, after in zip(revisions, revisions[1:], strict=False)]
    assert steps[:2] == ["govrag: migrated base -> 0001 (initial schema)",
                         "govrag: migrated 0001 -> 0002 (audit ledger)"]
    assert (again.returncode, again.stderr, again.stdout) == (0, "", f"govrag: already at head {head} in {shown}\n")


def _wait_for_sessions_waiting(connection: Connection, count: int) -> None:
    """Until `count` sessions on the connection's database wait for a lock (at most five minutes: commands start)."""
    waiting, deadline = 0, time.monotonic() + 300
    while waiting < count and time.monotonic() < deadline:
        time.sleep(0.1)
        connection.execute(text("SELECT pg_stat_clear_snapshot()"))  # else the transaction's first look is kept
        waiting = connection.execute(text(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
        )).scalar_one()
    assert waiting == count


# What each command on the database does on a fresh embedded default (no data dir yet), once migrated: what it says of
# an empty database (on stdout, or stderr for a refusal), and its exit code.
ON_A_FRESH_DEFAULT = [
    (["ingest", "pay.md", "--department", "hr"], 2, "no such department: hr; nothing ingested"),
    (["keys", "rotate"], 0, "no departments yet; nothing to rotate"),
    (["keys", "rotate", "--department", "hr"], 2, "no such department: hr; nothing rotated"),
    (["keys", "rotate", "--master"], 0, "master key now v2: 1 key rewrapped;"),  # the audit checkpoint key
    (["audit", "verify"], 0, '{"ok":true,"checked":0,"first_broken":null,"reason":null,"checkpoints_checked":0,'
                             '"purged_through":null,"unanchored":0,"deployment_id":"'),
    (["audit", "export"], 0, '"rows": 0'),
    (["audit", "checkpoint"], 0, '{"checkpointed_event_id": null, "signed": false, "note": "the ledger is empty"}'),
    (["audit", "purge"], 0, '{"purged": 0}'),
    (["export", "training-data", "--department", "hr"], 2, "refused: no such department"),
]


@pytest.mark.parametrize(("argv", "code", "said"), ON_A_FRESH_DEFAULT,
                         ids=[" ".join(argv) for argv, *_ in ON_A_FRESH_DEFAULT])
def test_every_command_on_a_fresh_embedded_default_migrates_as_serve_does(
        argv: list[str], code: int, said: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """`govrag serve` and an in-process `govrag ingest` migrate on start in development; the other commands on the
    database said "the database is unavailable ... once it is back" on a fresh data dir (the SQLite file's folder did
    not exist yet: it never comes back). Each now migrates as serve does, and says what it finds in an empty
    database."""
    from api import cli
    from core.settings import get_settings
    from retrieval.store import close_vector_store

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("GOVRAG_DATABASE_URL", raising=False)
    monkeypatch.setenv("GOVRAG_DATA_DIR", str(tmp_path / "fresh"))
    monkeypatch.setenv("GOVRAG_AUDIT_RETENTION_DAYS", "1")
    (tmp_path / "pay.md").write_text("# Pay\n\nPay day is the 25th.\n")
    get_settings.cache_clear()
    try:
        exit_code = cli.main(argv)
        settings = get_settings()
        close_vector_store(settings)
    finally:
        get_settings.cache_clear()
    captured = capsys.readouterr()
    assert (exit_code, said in " ".join((captured.out + captured.err).split())) == (code, True), captured
    assert migrate.current_revision(settings.resolved_database_url) == migrate.head_revision()


# Every start on the database, run in tmp_path: the commands working on it, `govrag migrate` and `govrag serve`.
STARTS = [["ingest", "pay.md", "--department", "hr"], ["keys", "rotate"], ["keys", "rotate", "--master"],
          ["audit", "verify"], ["export", "training-data", "--department", "hr"], ["migrate"], ["serve", "--port", "0"]]


def _what_each_start_says(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *,
                          production: bool) -> list[tuple[int, list[str], str]]:
    """Each of STARTS run in production or development (`govrag serve` must stop before uvicorn runs): its exit code,
    the lines on stderr and what is on stdout."""
    from api import cli
    from core.settings import Settings, get_settings

    monkeypatch.setattr(Settings, "is_production", property(lambda _self: production))
    monkeypatch.setattr("uvicorn.Server.run", lambda *_a, **_k: pytest.fail("govrag serve started"))
    outcomes = []
    for argv in STARTS:
        get_settings.cache_clear()
        try:
            exit_code = cli.main(argv)
        finally:
            get_settings.cache_clear()
        captured = capsys.readouterr()
        outcomes.append((exit_code, captured.err.strip().splitlines(), captured.out))
    return outcomes


def _starts_in(tmp_path: Path, *, on: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """STARTS run in tmp_path (pay.md to ingest, the data dir `data`) on the SQLite database file `on`."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pay.md").write_text("# Pay\n\nPay day is the 25th.\n")
    monkeypatch.setenv("GOVRAG_DATABASE_URL", f"sqlite:///{on}")
    monkeypatch.setenv("GOVRAG_DATA_DIR", str(tmp_path / "data"))


def test_a_sqlite_database_whose_folder_does_not_exist_is_named_not_said_to_be_unavailable(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A SQLite file in a folder that does not exist cannot be opened (SQLite makes no folder): the commands said "the
    database is unavailable; ... run the same command again once it is back", which never comes; `govrag serve` and
    `govrag migrate` "cannot reach the database at URL: unable to open database file", exit 1. Every start now names
    the file, as a path that does not exist (exit 2), in development and in production alike, and creates nothing."""
    database = tmp_path / "nowhere" / "govrag.db"
    _starts_in(tmp_path, on=database, monkeypatch=monkeypatch)
    said = (f"govrag: cannot use the database at {database}: No such file or directory on {database.parent} (create "
            "it, or point GOVRAG_DATABASE_URL at a folder this user may write)")
    outcomes = [*_what_each_start_says(monkeypatch, capsys, production=False),
                *_what_each_start_says(monkeypatch, capsys, production=True)]
    assert outcomes == [(2, [said], "")] * 2 * len(STARTS)
    assert not database.parent.exists()


@pytest.mark.parametrize("blocked", ["a file", "not searchable"])
def test_a_sqlite_database_whose_folder_is_a_file_or_under_one_not_searchable_is_named_in_one_line(
        blocked: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A SQLite file whose folder is a file was said to be in a folder that does not exist ("No such file or
    directory" on a file that does); one in a folder under another this user may not search ended every start in a
    PermissionError traceback, exit 1. Each start now gives the system's own reason on that folder in one line, exit
    2."""
    database = tmp_path / "above" / "folder" / "govrag.db"
    database.parent.parent.mkdir()
    if blocked == "a file":
        database.parent.write_text("")
        reason, way_out = "Not a directory", "create it, or point GOVRAG_DATABASE_URL"
    else:
        database.parent.mkdir()
        database.parent.parent.chmod(0o600)
        reason = "Permission denied"
        way_out = "let this user read and write it, or point GOVRAG_DATA_DIR or GOVRAG_DATABASE_URL"
    _starts_in(tmp_path, on=database, monkeypatch=monkeypatch)
    said = (f"govrag: cannot use the database at {database}: {reason} on {database.parent} ({way_out} at a folder "
            "this user may write)")
    with permission_bits_bind():  # root too is refused what the bits refuse
        outcomes = _what_each_start_says(monkeypatch, capsys, production=False)
    assert outcomes == [(2, [said], "")] * len(STARTS)


@pytest.mark.parametrize("locked", ["its parent", "the data dir"])
def test_a_data_dir_this_user_may_not_write_is_named_in_one_line(
        locked: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A data dir this user may not create (its parent not writable) ended `govrag serve`, `govrag migrate`, `govrag
    keys rotate` and an in-process `govrag ingest` in a PermissionError traceback, the audit commands in "failed:
    Permission denied: PATH"; one it may not write (SQLite cannot make the database there) was "the database is
    unavailable; ... once it is back" (exit 1), or for serve and migrate "cannot reach the database at URL: unable to
    open database file". Every start now says which folder and what to do in one line, exit 2, writing nothing."""
    data_dir = tmp_path / "parent" / "data"
    folder = data_dir.parent if locked == "its parent" else data_dir
    folder.mkdir(parents=True)
    folder.chmod(0o500)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pay.md").write_text("# Pay\n\nPay day is the 25th.\n")
    monkeypatch.delenv("GOVRAG_DATABASE_URL", raising=False)
    monkeypatch.setenv("GOVRAG_DATA_DIR", str(data_dir.relative_to(tmp_path)))  # as the default: named whole
    said = {"its parent": f"govrag: cannot use the data dir {data_dir}: Permission denied on {data_dir} (create it, "
                          "or point GOVRAG_DATA_DIR at a folder this user may write)",
            "the data dir": f"govrag: cannot use the database at {data_dir / 'govrag.db'}: Permission denied on "
                            f"{data_dir} (let this user read and write it, or point GOVRAG_DATA_DIR or "
                            "GOVRAG_DATABASE_URL at a folder this user may write)"}[locked]
    with permission_bits_bind():  # root too is refused what the bits refuse
        outcomes = _what_each_start_says(monkeypatch, capsys, production=False)
    assert outcomes == [(2, [said], "")] * len(STARTS)
    assert list(folder.iterdir()) == []


# What `govrag migrate` says of each revision it applies from 0010 (named after its file).
APPLIED = {"0011": "approved level", "0012": "index generations", "0013": "withheld reindex", "0014": "blob store id"}

# A `govrag migrate` from 0010 stopped in a revision as it commits it (every statement run, its record included), by
# Ctrl-C or a crash: 0011 adds a column, then fills it; 0013 adds a column (in place on SQLite too: no batch copy, so
# that it renders as SQL; no upgrade copies a table now); 0014 creates a table.
INTERRUPTED = [("sqlite", "0011", signal.SIGKILL), ("sqlite", "0013", signal.SIGKILL),
               ("sqlite", "0013", signal.SIGINT), ("sqlite", "0014", signal.SIGINT),
               ("pg", "0013", signal.SIGKILL), ("pg", "0014", signal.SIGINT)]


@pytest.mark.parametrize(("kind", "revision", "interruption"), INTERRUPTED,
                         ids=[f"{kind}-{revision}-{signal.Signals(sent).name}" for kind, revision, sent in INTERRUPTED])
def test_a_migration_interrupted_in_a_revision_leaves_the_revision_before_and_a_rerun_completes(
        kind: str, revision: str, interruption: signal.Signals, tmp_path: Path,
        make_pg_database: Callable[[], str]) -> None:
    """pysqlite begins a transaction only before DML: each schema change of a revision on SQLite committed on its
    own, so a `govrag migrate` interrupted in one left its changes without its record (0011's column at 0010, 0014's
    table at 0013, 0013's half-made copy `_alembic_tmp_documents` left behind), and every later `govrag migrate`
    failed on them (duplicate column, table already exists) until someone repaired the file by hand. PostgreSQL ran
    the whole upgrade in one transaction, so the revisions the run had finished were undone with it. Each revision is
    now one transaction on both: the database is exactly where the revision before left it, data intact, the
    revisions the run finished (the ones it named) kept, and `govrag migrate` again completes. The revision stopped
    as it commits is not named: Alembic's callback, in its transaction, said "migrated" before the commit. A Ctrl-C
    printed a traceback; it is now one line naming the revision the database is at, exit 130."""
    interrupted, reference = (make_pg_database() if kind == "pg" else f"sqlite:///{tmp_path / name}.db"
                              for name in ("interrupted", "reference"))
    for url in (interrupted, reference):
        migrate.upgrade(url, "0010")
        _seed_documents(url)
    env = govrag_env(database_url=interrupted, data_dir=str(tmp_path / "data"))
    returncode, said, errors = _stopped_at_revision(revision, interruption, env)
    before = f"{int(revision) - 1:04d}"
    assert returncode != 0 and said[-1:] == ["running"], errors[-2000:]
    if interruption == signal.SIGINT:  # a Ctrl-C: one line, no traceback
        assert (returncode, errors) == (130, _interrupted_at(before))
    assert said[:-1] == [f"govrag: migrated {int(step) - 1:04d} -> {step} ({APPLIED[step]})"
                         for step in APPLIED if step < revision]
    migrate.upgrade(reference, before)
    assert _schema_and_documents(interrupted) == _schema_and_documents(reference)
    rerun = run_govrag(["migrate"], env=env)
    assert rerun.returncode == 0, rerun.stderr
    migrate.upgrade(reference)
    assert _schema_and_documents(interrupted) == _schema_and_documents(reference)


@pytest.mark.parametrize("command", [("ingest", "{note}", "--department", "hr"), ("keys", "rotate"),
                                     ("keys", "rotate", "--master")], ids=["ingest", "keys rotate", "master"])
def test_a_command_migrating_first_interrupted_in_a_revision_says_so_in_one_line(command: tuple[str, ...],
                                                                                tmp_path: Path) -> None:
    """A command on the embedded database in development migrates it first: a Ctrl-C in a revision printed a
    traceback (`govrag ingest`), or a line that did not say where the database was left (`govrag keys rotate`, with
    `--master` too, which said the master key was not rotated). It is now `govrag migrate`'s line, exit 130."""
    url = f"sqlite:///{tmp_path / 'govrag.db'}"
    migrate.upgrade(url, "0010")
    (tmp_path / "note.txt").write_text("a note\n")
    env = govrag_env(database_url=url, data_dir=str(tmp_path / "data"))
    argv = [part.format(note=tmp_path / "note.txt") for part in command]
    assert _stopped_at_revision("0014", signal.SIGINT, env, *argv) == (130, ["running"], _interrupted_at("0013"))
    assert migrate.current_revision(url) == "0013"


def test_an_interrupted_upgrade_whose_revision_cannot_be_read_says_so(tmp_path: Path) -> None:
    """After a Ctrl-C the revision is read again to be said; a database failing that read is said too, no traceback."""
    url = f"sqlite:///{tmp_path / 'govrag.db'}"
    migrate.upgrade(url, "0013")
    interrupted: list[bool] = []

    def interrupt(_connection: Connection) -> None:  # as 0014 commits
        if not interrupted:
            interrupted.append(True)
            raise KeyboardInterrupt

    def fail(*_args: object) -> None:  # every statement after it
        if interrupted:
            raise sqlite3.OperationalError("disk I/O error")

    event.listen(Engine, "commit", interrupt)
    event.listen(Engine, "before_cursor_execute", fail)
    try:
        with pytest.raises(migrate.MigrationInterrupted) as stopped:
            migrate.upgrade(url)
    finally:
        event.remove(Engine, "commit", interrupt)
        event.remove(Engine, "before_cursor_execute", fail)
    assert (stopped.value.exit_code, str(stopped.value)) == (
        130, "interrupted; the database's revision could not be read (run govrag migrate again to finish)")
    assert migrate.current_revision(url) == "0013"


def _stopped_at_revision(revision: str, interruption: signal.Signals, env: dict[str, str],
                         *command_argv: str) -> tuple[int, list[str], str]:
    """A govrag command (`migrate` unless given) stopped as it commits `revision`, then sent `interruption`: its exit
    code, what it printed up to `running` and its standard error."""
    argv = [sys.executable, "-m", "tests.support.migrate_stopped_at_revision", revision, *command_argv]
    command = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,  # noqa: S603
                               text=True)
    try:
        said = lines_until(command, "running")
        command.send_signal(interruption)
        _, errors = command.communicate(timeout=120)
    finally:
        command.kill()
        command.wait(60)
    return command.returncode, said, errors


def _interrupted_at(revision: str) -> str:
    """What a Ctrl-C during an upgrade says (standard error), the database left at `revision`."""
    return f"govrag: interrupted; the database is at revision {revision} (run govrag migrate again to finish)\n"


def _seed_documents(url: str) -> None:
    """A department with an approved document, ready, and a queued one, as a database at 0010 holds them."""
    columns = "id, department, title, content_type, size_bytes, sha256, acl_groups, classification, status, " \
              "chunk_count, uploaded_by, created_at, updated_at, flagged_chunks, approved_by"
    engine = create_engine(url)
    try:
        with engine.begin() as connection:
            connection.execute(text("INSERT INTO departments (name, created_at) VALUES ('hr', '2026-01-01')"))
            connection.execute(text(
                f"INSERT INTO documents ({columns}) VALUES "  # noqa: S608
                "('a', 'hr', 'Pay', 'text/plain', 1, 'ab', '[]', 'confidential', 'ready', 2, 'ed', '2026-01-01', "
                "'2026-01-01', 0, 'rolf'), ('b', 'hr', 'Leave', 'text/plain', 1, 'cd', '[]', 'internal', 'queued', 0, "
                "'ed', '2026-01-02', '2026-01-02', 0, NULL)"))
    finally:
        engine.dispose()


def _schema_and_documents(url: str) -> tuple[str | None, dict[str, object], list[tuple[object, ...]]]:
    """The revision, every table's columns and indexes, and the rows of the documents table."""
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            found = inspect(connection)
            schema = {table: ([(column["name"], str(column["type"]), column["nullable"], str(column["default"]))
                               for column in found.get_columns(table)],
                              sorted((index["name"], *index["column_names"]) for index in found.get_indexes(table)))
                      for table in sorted(found.get_table_names())}
            documents = [tuple(row) for row in connection.execute(text("SELECT * FROM documents ORDER BY id"))]
    finally:
        engine.dispose()
    return migrate.current_revision(url), schema, documents


def test_a_sqlite_revision_holds_the_write_lock_from_its_first_read(tmp_path: Path) -> None:
    """A revision's transaction on SQLite began deferred: it read (its version, the table a batch copy reflects), then
    wrote, and a write another process committed in between (a running `govrag serve`'s worker) made its first write
    fail at once ("database is locked": SQLite does not wait when the snapshot a write would build on is stale). It
    now begins IMMEDIATE: the other writer is the one that waits (here, asking with no wait, it is refused). Undoing
    0013 drops a column, by a batch copy (its upgrade adds it in place, reading nothing)."""
    path = tmp_path / "govrag.db"
    url = f"sqlite:///{path}"
    migrate.upgrade(url, "0013")
    beside = sqlite3.connect(path, timeout=0, isolation_level=None)
    wrote: list[str] = []

    def write_as_the_copy_reflects(_connection, _cursor, statement, *_args) -> None:  # type: ignore[no-untyped-def]
        if statement == 'PRAGMA main.table_xinfo("documents")' and not wrote:
            try:
                beside.execute("INSERT INTO departments (name, created_at) VALUES ('hr', '2026-01-01')")
                wrote.append("committed")
            except sqlite3.OperationalError as error:
                wrote.append(str(error))

    event.listen(Engine, "before_cursor_execute", write_as_the_copy_reflects)
    try:
        migrate.downgrade(url, "0012")
    finally:
        event.remove(Engine, "before_cursor_execute", write_as_the_copy_reflects)
        beside.close()
    assert (wrote, migrate.current_revision(url)) == (["database is locked"], "0012")
