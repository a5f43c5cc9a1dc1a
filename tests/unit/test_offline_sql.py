"""The migrations written as SQL (Alembic's offline mode, `alembic upgrade --sql`), for a DBA who reviews the SQL before
it runs: the whole chain renders for PostgreSQL and SQLite with its backfills in it, the script runs on a new database
(psql, sqlite3) and gives what the migrations run by govrag give, and the backfills SQL cannot do (0010's, 0023's,
0025's and 0026's title redaction) fail the script rather than being left out."""

from __future__ import annotations

import io
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import Connection, create_engine, inspect, make_url, text

from core import migrate
from tests.unit.test_migrations import _execute

BACKFILLS = [  # a statement of each revision that changes rows, as rendered on both databases
    "UPDATE casbin_rule SET v1=('role:' || casbin_rule.v1) WHERE casbin_rule.ptype = 'g'",  # 0003
    "UPDATE ingestion_jobs SET sent_at = created_at;",  # 0006
    "UPDATE documents SET title = '(deleted)', sha256 = '', size_bytes = 0, content_type = '' WHERE status = "
    "'deleted';",  # 0010
    "CONSTRAINT apply_0010_with_govrag_to_redact_titles CHECK (documents_to_redact = 0)",  # 0010: its guard
    "UPDATE documents SET approved_level = classification WHERE approved_by IS NOT NULL;",  # 0011
    "UPDATE documents SET served_generation = 0 WHERE status = 'ready';",  # 0012
    "INSERT INTO deployment (id, deployment_id, minted_at) VALUES (1, ",  # 0016
    "UPDATE documents SET unbound_through = index_generation;",  # 0020
    "UPDATE documents SET maps_unbound_through = index_generation;",  # 0021
    "UPDATE documents SET duplicate_of = substr(error, 71) WHERE substr(error, 1, 70) = 'duplicate upload: ",  # 0022
    "CONSTRAINT apply_0023_with_govrag_to_redact_titles CHECK (documents_to_redact = 0)",  # 0023: its guard
    "SELECT count(*) FROM documents WHERE status NOT IN ('deleted', 'rejected') AND replace(title, '.', '') <> title",
    "CONSTRAINT apply_0025_with_govrag_to_redact_titles CHECK (documents_to_redact = 0)",  # 0025: its guard
    "SELECT count(*) FROM documents WHERE status NOT IN ('deleted', 'rejected') AND length(title) - "
    "length(replace(title, '.', '')) >= 2",
    "CONSTRAINT apply_0026_with_govrag_to_redact_titles CHECK (documents_to_redact = 0)",  # 0026: its guard
    "SELECT count(*) FROM documents WHERE status NOT IN ('deleted', 'rejected') AND substr(title, length(title), 1) = "
    "'>' AND replace(title, '.<', '') <> title",
]
GRANTS = [("alice", "reader"), ("bob", "role:editor"), ("carol", ""), ("dave", None), ("erin", "Role:auditor"),
          ("frank", "role:"), ("gina", "ROLE:admin")]  # no role inheritance: undoing 0003 refuses to drop it
DOCUMENT_COLUMNS = "id, department, title, content_type, size_bytes, sha256, acl_groups, classification, status, " \
                   "error, chunk_count, uploaded_by, created_at, updated_at, flagged_chunks, approved_by"
DOCUMENTS = [  # at 0010: one for each backfill after it
    "('ready', 'hr', 't', 'text/plain', 1, 'ab', '[]', 'internal', 'ready', NULL, 1, 'ed', '2026-01-01', "
    "'2026-01-01', 0, 'rita')",
    "('queued', 'hr', 't', 'text/plain', 1, 'cd', '[]', 'internal', 'queued', NULL, 0, 'ed', '2026-01-01', "
    "'2026-01-01', 0, NULL)",
    "('copy', 'hr', 't', 'text/plain', 1, 'ef', '[]', 'internal', 'failed', 'duplicate upload: the department already "
    "has this content as document 0b8e4bfa-6bd1-4a8e-9a53-5d2d7f0f5c1e', 0, 'ed', '2026-01-01', '2026-01-01', 0, NULL)",
]


def _database(kind: str, tmp_path: Path, make_pg_database: Callable[[], str], name: str = "schema") -> str:
    return f"sqlite:///{tmp_path / name}.db" if kind == "sqlite" else make_pg_database()


def _written_as_sql(url: str, revisions: str = "head") -> str:
    """The upgrade to `revisions` as Alembic's offline mode writes it for `url`'s database, none of it run."""
    config = migrate.alembic_config(url)
    config.output_buffer = io.StringIO()
    command.upgrade(config, revisions, sql=True)
    return config.output_buffer.getvalue()


def _run_script(url: str, sql: str) -> subprocess.CompletedProcess[str]:
    """`sql` run as a DBA runs it: psql stopping at the first error, sqlite3 with -bail."""
    database = make_url(url)
    if database.get_backend_name() == "sqlite":
        argv = ["sqlite3", "-bail", str(database.database)]
    else:
        dsn = database.set(drivername="postgresql").render_as_string(hide_password=False)
        argv = ["psql", "--no-psqlrc", "--quiet", "-v", "ON_ERROR_STOP=1", dsn]
    return subprocess.run(argv, input=sql, capture_output=True, text=True, check=False, timeout=120)  # noqa: S603


def _schema(url: str) -> dict[str, tuple[object, ...]]:
    """Each table's columns (name, type, nullability, default), primary key, foreign keys and indexes."""
    engine = create_engine(url)
    try:
        schema = inspect(engine)
        return {table: ([(c["name"], str(c["type"]), c["nullable"], c["default"]) for c in schema.get_columns(table)],
                        schema.get_pk_constraint(table)["constrained_columns"],
                        sorted((fk["name"] or "", fk["constrained_columns"], fk["referred_table"])
                               for fk in schema.get_foreign_keys(table)),
                        sorted((index["name"], index["column_names"], bool(index["unique"]))
                               for index in schema.get_indexes(table)))
                for table in schema.get_table_names()}
    finally:
        engine.dispose()


def _rows(url: str, query: str) -> list[tuple[object, ...]]:
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            return [tuple(row) for row in connection.execute(text(query))]
    finally:
        engine.dispose()


@pytest.mark.parametrize("url", ["postgresql+psycopg://govrag@127.0.0.1:5432/govrag", "sqlite:///govrag.db"],
                         ids=["postgresql", "sqlite"])
def test_the_whole_chain_renders_as_sql_with_every_backfill(url: str) -> None:
    """The offline run stopped at 0003 on PostgreSQL (it read the role rules into Python) and at 0002 on SQLite (a
    batch copy of a table it could not reflect); no database is reached here."""
    sql = _written_as_sql(url)
    missing = [statement for statement in BACKFILLS if statement not in sql]
    assert not missing, f"the SQL written lacks {missing}"
    assert "-- Revision 0010 redacts the PII in the titles of documents" in sql
    assert "-- Revision 0023 redacts, with govrag's PII model" in sql
    assert "-- Revision 0025 redacts, with govrag's PII model" in sql
    assert "-- Revision 0026 redacts, with govrag's PII model" in sql
    assert sql.rstrip().endswith("COMMIT;")
    assert f"version_num='{migrate.head_revision()}'" in sql


@pytest.mark.parametrize("kind", ["pg", "sqlite"])
def test_the_sql_written_builds_new_databases_each_with_its_own_deployment_id(
        kind: str, tmp_path: Path, make_pg_database: Callable[[], str]) -> None:
    """One script, applied to two new databases (as a reviewed script is to staging and production), brings each to
    the code's head with the schema the migrations make (columns with their types, defaults and nullability, keys,
    indexes: 0002 and 0013 add theirs in place on SQLite); each mints its own deployment id (the id was fixed when
    the script was written)."""
    online, first, second = (_database(kind, tmp_path, make_pg_database, name) for name in ("online", "a", "b"))
    migrate.upgrade(online)
    sql = _written_as_sql(first)
    for url in (first, second):
        ran = _run_script(url, sql)
        assert ran.returncode == 0, ran.stderr
        migrate.require_head(url)
        assert _schema(url) == _schema(online)
    ids = {url: _rows(url, "SELECT deployment_id FROM deployment")[0][0] for url in (first, second)}
    assert ids[first] != ids[second]


@pytest.mark.parametrize("kind", ["pg", "sqlite"])
def test_the_backfills_written_as_sql_give_the_rows_the_migrations_give(
        kind: str, tmp_path: Path, make_pg_database: Callable[[], str]) -> None:
    """Two databases holding the same rows, one migrated by govrag, the other by scripts written as SQL: from 0002 to
    0010 with role grants (0003 prefixes their roles), then from 0010 with documents and a job (every backfill after
    it: approved levels, served and unbound generations, duplicates)."""
    online, offline = (_database(kind, tmp_path, make_pg_database, name) for name in ("online", "offline"))
    for url in (online, offline):
        migrate.upgrade(url, "0002")
        _add_grants(url)
    _migrate_both(online, offline, "0002", "0010")
    for url in (online, offline):
        _execute(url, "INSERT INTO departments (name, created_at) VALUES ('hr', '2026-01-01 00:00:00')",
                 f"INSERT INTO documents ({DOCUMENT_COLUMNS}) VALUES {', '.join(DOCUMENTS)}",  # noqa: S608
                 "INSERT INTO ingestion_jobs (id, document_id, status, attempts, created_at, updated_at, sent_at, "
                 "crashed_runs) VALUES ('j', 'queued', 'queued', 0, '2026-01-01', '2026-01-01', NULL, 0)")
    _migrate_both(online, offline, "0010", "head")
    for query in ("SELECT * FROM casbin_rule ORDER BY id", "SELECT * FROM documents ORDER BY id",
                  "SELECT * FROM ingestion_jobs ORDER BY id", "SELECT * FROM alembic_version"):
        assert _rows(offline, query) == _rows(online, query)
    assert _rows(offline, "SELECT duplicate_of, approved_level, served_generation FROM documents ORDER BY id") == [
        ("0b8e4bfa-6bd1-4a8e-9a53-5d2d7f0f5c1e", None, None), (None, None, None), (None, "internal", 0)]


def _migrate_both(online: str, offline: str, start: str, end: str) -> None:
    """`online` upgraded to `end` by govrag, `offline` by the script written from `start` to `end`."""
    migrate.upgrade(online, end)
    ran = _run_script(offline, _written_as_sql(offline, f"{start}:{end}"))
    assert ran.returncode == 0, ran.stderr


@pytest.mark.parametrize("kind", ["pg", "sqlite"])
def test_the_sql_written_stops_at_0010_while_a_title_is_to_redact(
        kind: str, tmp_path: Path, make_pg_database: Callable[[], str]) -> None:
    """0010 redacts titles with the PII model, which SQL cannot: the script says so and fails there (not leaving the
    titles unredacted), the database left at 0009 with nothing of 0010 done; govrag's own migration then redacts."""
    url = _database(kind, tmp_path, make_pg_database)
    migrate.upgrade(url, "0009")
    title = "Travel claim maria.gonzalez@example.com.txt"
    rows = ", ".join(f"('{status}', 'hr', '{title}', 'text/plain', 1, 'ab', '[]', 'internal', '{status}', NULL, 0, "
                     "'ed', '2026-01-01', '2026-01-01', 0, NULL)" for status in ("deleted", "ready"))
    _execute(url, "INSERT INTO departments (name, created_at) VALUES ('hr', '2026-01-01 00:00:00')",
             f"INSERT INTO documents ({DOCUMENT_COLUMNS}) VALUES {rows}")  # noqa: S608
    ran = _run_script(url, _written_as_sql(url, "0009:head"))
    assert ran.returncode != 0
    assert "apply_0010_with_govrag_to_redact_titles" in ran.stderr
    assert migrate.current_revision(url) == "0009"
    assert _rows(url, "SELECT id, title, sha256 FROM documents ORDER BY id") == [("deleted", title, "ab"),
                                                                                 ("ready", title, "ab")]
    migrate.upgrade(url)
    assert _rows(url, "SELECT id, title, sha256 FROM documents ORDER BY id") == [
        ("deleted", "(deleted)", ""), ("ready", "Travel claim <EMAIL_ADDRESS>.txt", "ab")]


# revision: (what its guard lets pass, what it stops, what govrag's run makes of that)
TITLES_READ_BY_THE_MODEL = {
    "0023": ("Access notes", "Access from 10.0.0.1", "Access from <IP_ADDRESS>"),  # a '.'
    "0025": ("Access notes.pdf", "Claim of maria@example.com.pdf.gpg", "Claim of <EMAIL_ADDRESS>.pdf.gpg"),  # two
    "0026": ("Notes on <PERSON>", "Claim of maria@example.com.<PERSON>.<PERSON>",  # ends in '>', holds '.<'
             "Claim of <EMAIL_ADDRESS>.<PERSON>.<PERSON>"),
}


@pytest.mark.parametrize("kind", ["pg", "sqlite"])
@pytest.mark.parametrize("revision", TITLES_READ_BY_THE_MODEL)
def test_the_sql_written_stops_at_a_title_revision_while_a_live_title_may_hold_what_it_reads(
        kind: str, revision: str, tmp_path: Path, make_pg_database: Callable[[], str]) -> None:
    """0023 reads titles that may end in what looks like a file extension (a '.'), 0025 those that may end in a chain
    of them (two), 0026 those that may end in a run of placeholders (ending in '>', holding '.<'), with the PII model,
    which SQL cannot: the script passes a database whose live titles hold none (a
    retired document's does not count), and fails on one whose live title does, the database left at the revision
    before with the title as stored; govrag's own migration redacts it."""
    url, before = _database(kind, tmp_path, make_pg_database), f"{int(revision) - 1:04d}"
    passes, stops, redacted = TITLES_READ_BY_THE_MODEL[revision]
    retired = "Dismissal of maria@example.com.pdf.gpg"
    migrate.upgrade(url, before)
    rows = ", ".join(f"('{status}', 'hr', '{title}', 'text/plain', 1, 'ab', '[]', 'internal', '{status}', NULL, 0, "
                     "'ed', '2026-01-01', '2026-01-01', 0, NULL)"
                     for status, title in (("deleted", retired), ("ready", passes)))
    _execute(url, "INSERT INTO departments (name, created_at) VALUES ('hr', '2026-01-01 00:00:00')",
             f"INSERT INTO documents ({DOCUMENT_COLUMNS}) VALUES {rows}")  # noqa: S608
    sql = _written_as_sql(url, f"{before}:{revision}")
    ran = _run_script(url, sql)
    assert ran.returncode == 0, ran.stderr
    assert migrate.current_revision(url) == revision
    migrate.downgrade(url, before)
    _execute(url, f"UPDATE documents SET title = '{stops}' WHERE id = 'ready'")  # noqa: S608
    ran = _run_script(url, sql)
    assert ran.returncode != 0
    assert f"apply_{revision}_with_govrag_to_redact_titles" in ran.stderr
    assert migrate.current_revision(url) == before
    query = "SELECT id, title FROM documents ORDER BY id"
    assert _rows(url, query) == [("deleted", retired), ("ready", stops)]
    migrate.upgrade(url, revision)
    assert _rows(url, query) == [("deleted", retired), ("ready", redacted)]


def _add_grants(url: str) -> None:
    engine = create_engine(url)
    try:
        with engine.begin() as connection:
            connection.execute(text("INSERT INTO casbin_rule (ptype, v0, v1) VALUES ('g', :user, :role)"),
                               [{"user": user, "role": role} for user, role in GRANTS])
    finally:
        engine.dispose()


def _prefixed_as_before(connection: Connection) -> None:
    """0003's upgrade as it was written before it rendered as SQL: each grant read into Python."""
    for row_id, role in connection.execute(text("SELECT id, v1 FROM casbin_rule WHERE ptype = 'g'")).all():
        if role and not role.startswith("role:"):
            connection.execute(text("UPDATE casbin_rule SET v1 = :v1 WHERE id = :id"),
                               {"v1": "role:" + role, "id": row_id})


def _unprefixed_as_before(connection: Connection) -> None:
    """0003's downgrade of the grants as it was written before."""
    connection.execute(text("DELETE FROM casbin_rule WHERE ptype = 'g' AND v0 LIKE 'role:%'"))
    for row_id, role in connection.execute(text("SELECT id, v1 FROM casbin_rule WHERE ptype = 'g'")).all():
        if role and role.startswith("role:"):
            connection.execute(text("UPDATE casbin_rule SET v1 = :v1 WHERE id = :id"), {"v1": role[5:], "id": row_id})


def _run_as_before(url: str, step: Callable[[Connection], None]) -> None:
    engine = create_engine(url)
    try:
        with engine.begin() as connection:
            step(connection)
    finally:
        engine.dispose()


@pytest.mark.parametrize("kind", ["pg", "sqlite"])
def test_0003_prefixes_and_unprefixes_the_grants_in_sql_as_its_python_loop_did(
        kind: str, tmp_path: Path, make_pg_database: Callable[[], str]) -> None:
    """0003 read every grant into Python to prefix its role (which cannot be written as SQL); its single UPDATEs give
    the same rows, up and down: empty and NULL roles, a role already prefixed, another case of the prefix."""
    now, before = (_database(kind, tmp_path, make_pg_database, name) for name in ("now", "before"))
    for url in (now, before):
        migrate.upgrade(url, "0002")
        _add_grants(url)
    query = "SELECT id, v0, v1 FROM casbin_rule WHERE ptype = 'g' ORDER BY id"
    migrate.upgrade(now, "0003")
    _run_as_before(before, _prefixed_as_before)
    assert _rows(now, query) == _rows(before, query)
    assert ("alice", "role:reader") in [row[1:] for row in _rows(now, query)]
    migrate.downgrade(now, "0002")
    _run_as_before(before, _unprefixed_as_before)
    assert _rows(now, query) == _rows(before, query)
