"""The schema changes only through Alembic: one head, up → down → up works on both databases, and the schema it builds
is the one the models describe."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import JSON, Column, create_engine, inspect, text

from core import migrate
from core.models import Base

EXPECTED_TABLES = {"departments", "documents", "ingestion_jobs", "wrapped_keys", "casbin_rule", "retrieval_events",
                   "blob_store"}


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


def _database(kind: str, tmp_path: Path, make_pg_database: Callable[[], str]) -> str:
    return f"sqlite:///{tmp_path / 'schema.db'}" if kind == "sqlite" else make_pg_database()


@pytest.mark.parametrize("kind", ["sqlite", "pg"])
def test_the_migrated_schema_is_the_models(kind: str, tmp_path: Path, make_pg_database: Callable[[], str]) -> None:
    """Nothing compared them: the models lacked two indexes the migrations made (documents' department and sha256,
    the ledger's event_type), took retrieval_events.departments_requested as nullable (NOT NULL since 0001) and lacked
    seven server defaults. Whatever autogenerate would change in a database at head is reported here."""
    url = _database(kind, tmp_path, make_pg_database)
    migrate.upgrade(url)
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={
                "compare_type": True, "compare_server_default": _literal_defaults_differ})
            differences = [_difference(diff) for diff in compare_metadata(context, Base.metadata)]
    finally:
        engine.dispose()
    assert not differences, "the migrated schema differs from the models:\n" + "\n".join(differences)


def _literal_defaults_differ(_context: MigrationContext, _inspected: Column[Any], column: Column[Any],
                             inspected_default: str | None, _default: object, rendered_default: str | None
                             ) -> bool | None:
    """Two server defaults alembic cannot compare, compared as literals; None leaves every other to alembic.
    PostgreSQL has no `=` for json, so alembic's comparing SELECT ('[]'::json = '[]') fails on a JSON column; on
    SQLite alembic unquotes only a literal of one character or more, so '' reflected as ('') never equals ''."""
    if inspected_default is None or rendered_default is None:
        return None
    if isinstance(column.type, JSON) or rendered_default == "":
        return _literal(inspected_default) != _literal(rendered_default)
    return None


def _literal(default: str) -> str:
    """A server default's literal without the parentheses SQLite reflects, the cast PostgreSQL adds, or quotes."""
    default = re.sub(r"::[a-z ]+$", "", default.removeprefix("(").removesuffix(")"))
    return default.removeprefix("'").removesuffix("'")


def _difference(diff: Any) -> str:
    """One difference compare_metadata found, as what autogenerate would do to the database."""
    if isinstance(diff, list):  # one column's changes: (op, schema, table, column, existing, old, new) each
        return "; ".join(f"{op} {table}.{column}: {_shown(old)} -> {_shown(new)}"
                         for op, _, table, column, _, old, new in diff)
    op, *subjects = diff
    return " ".join([op, *(str(getattr(subject, "name", subject)) for subject in subjects if subject is not None)])


def _shown(value: object) -> str:
    """A nullability, a type, or a server default's SQL."""
    sql = getattr(value, "arg", value)
    return repr(getattr(sql, "text", sql))


def _execute(url: str, *statements: str) -> None:
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            for statement in statements:
                conn.execute(text(statement))
    finally:
        engine.dispose()


@pytest.mark.parametrize("kind", ["sqlite", "pg"])
def test_downgrade_refuses_to_drop_the_hashed_ledger_columns(kind: str, tmp_path: Path,
                                                              make_pg_database: Callable[[], str]) -> None:
    """Undoing 0002 dropped the columns every ledger hash covers (and the signed checkpoints): upgraded again, verify
    reported tampering. Now the downgrade refuses, names the revision and what would be lost, and changes nothing."""
    from audit import service as audit_service
    from audit.schemas import AdminEventType
    from authz.identity import operator_identity
    from core.db import get_engine, unit_of_work
    from core.models import utcnow
    from core.settings import Settings
    from tests.support.legacy_checkpoint import add_v1_checkpoint

    url = _database(kind, tmp_path, make_pg_database)
    migrate.upgrade(url, "0015")  # a checkpoint signed before the deployment id (0016), which undoing 0016 keeps
    settings = Settings(data_dir=tmp_path, database_url=url, audit_checkpoint_every=0)
    with unit_of_work(url) as session:
        audit_service.record_admin_event(session=session, identity=operator_identity("ops"), settings=settings,
                                         event_type=AdminEventType.key_rotation, details={"new_version": 2})
    add_v1_checkpoint(settings, at=1, created_at=utcnow().replace(microsecond=0))
    migrate.upgrade(url)
    get_engine.cache_clear()
    with pytest.raises(migrate.DowngradeRefused, match=r"revision 0002: .*1 ledger events.*1 signed audit checkpoints"):
        migrate.downgrade(url, "0001")
    assert migrate.current_revision(url) == migrate.head_revision()  # no step ran, on SQLite too
    with unit_of_work(url) as session:
        assert audit_service.verify(session=session, settings=settings).ok
    get_engine.cache_clear()


@pytest.mark.parametrize(("what", "rows"), [
    ("clearances", "INSERT INTO authz_clearances (subject, department, level, updated_at) "
                   "VALUES ('alice', 'hr', 'confidential', '2026-01-01 00:00:00')"),
    ("role inheritance rules", "INSERT INTO casbin_rule (ptype, v0, v1, v2) "
                               "VALUES ('g', 'role:lead', 'role:editor', 'hr')"),
    ("custom role permissions", "INSERT INTO casbin_rule (ptype, v0, v1) VALUES ('p', 'read', 'role:auditor')"),
])
def test_downgrade_refuses_to_drop_the_authorization_model(what: str, rows: str, tmp_path: Path) -> None:
    """Undoing 0003 dropped clearances, role inheritance and custom roles without a word."""
    url = f"sqlite:///{tmp_path / 'schema.db'}"
    migrate.upgrade(url)
    _execute(url, rows)
    with pytest.raises(migrate.DowngradeRefused, match=rf"revision 0003: .*1 {what}"):
        migrate.downgrade(url, "0002")
    assert migrate.current_revision(url) == migrate.head_revision()


@pytest.mark.parametrize(("target", "revision", "rows"), [
    ("0004", "0005", ["INSERT INTO guard_controls (scope, kill_mode, updated_by, updated_at) "
                      "VALUES ('hr', 'retrieval_only', 'ops', '2026-01-01 00:00:00')"]),
    ("0006", "0007", ["INSERT INTO pending_purges (document_id, department, retired_at) "
                      "VALUES ('d1', 'hr', '2026-01-01 00:00:00')"]),
    ("0000", "0001", ["INSERT INTO departments (name, created_at) VALUES ('hr', '2026-01-01 00:00:00')"]),
    # a checkpoint signed with the deployment id, which a downgrade would delete (checked only with it again)
    ("0015", "0016", ["INSERT INTO audit_checkpoints (created_at, kind, last_event_id, last_hash, event_count, "
                      "signature) VALUES ('2026-01-01 00:00:00', 'manual', 1, 'h', 0, 'v2.signed')"]),
])
def test_other_destructive_downgrades_refuse_when_they_would_drop_data(target: str, revision: str, rows: list[str],
                                                                       tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'schema.db'}"
    migrate.upgrade(url)
    _execute(url, *rows)
    with pytest.raises(migrate.DowngradeRefused, match=rf"revision {revision}: "):
        migrate.downgrade(url, "base" if target == "0000" else target)
    assert migrate.current_revision(url) == migrate.head_revision()


def test_a_refusing_downgrade_is_also_refused_when_run_through_alembic(tmp_path: Path) -> None:
    """The guard is in the migration itself: `alembic downgrade` (not only govrag's helper) stops before dropping."""
    from alembic import command

    url = f"sqlite:///{tmp_path / 'schema.db'}"
    migrate.upgrade(url)
    _execute(url, "INSERT INTO guard_controls (scope, kill_mode, updated_by, updated_at) "
                  "VALUES ('hr', 'retrieval_only', 'ops', '2026-01-01 00:00:00')")
    with pytest.raises(migrate.DowngradeRefused, match="revision 0005"):
        command.downgrade(migrate.alembic_config(url), "0004")
    assert "guard_controls" in _tables(url)
    assert migrate.current_revision(url) == migrate.head_revision()  # SQLite undid head..0006 before 0005 refused
    with pytest.raises(migrate.DowngradeRefused, match="revision 0005"):
        # a relative target (0004, counted from the head) is judged the same way
        command.downgrade(migrate.alembic_config(url), f"-{int(migrate.head_revision()) - 4}")
    assert migrate.current_revision(url) == migrate.head_revision()


def test_a_downgrade_counts_what_each_revision_would_delete_once(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The data check ran before any step and again in each migration's own downgrade; it runs once, before."""
    url = f"sqlite:///{tmp_path / 'schema.db'}"
    migrate.upgrade(url)
    counted: list[tuple[str, str]] = []
    count_rows = migrate.count_rows
    monkeypatch.setattr(migrate, "count_rows", lambda connection, table, where="": counted.append((table, where))
                        or count_rows(connection, table, where))
    migrate.downgrade(url, "0008")  # undoes 0016, 0011 and 0009 (each checked) and the others
    assert migrate.current_revision(url) == "0008"
    assert sorted(counted) == sorted(set(counted)) and {table for table, _ in counted} == {
        "documents", "ingestion_jobs", "audit_checkpoints"}


def test_a_downgrade_written_as_sql_is_refused_where_a_revision_may_hold_data(tmp_path: Path) -> None:
    """`alembic downgrade --sql` cannot count rows: it stopped with an AttributeError at a revision holding data
    (the check in the migration); it is refused, and one that drops no data is still written."""
    import contextlib
    import io

    from alembic import command

    config = migrate.alembic_config(f"sqlite:///{tmp_path / 'schema.db'}")
    with pytest.raises(migrate.DowngradeRefused, match="revision 0009: .*cannot be counted"):
        command.downgrade(config, "0010:0008", sql=True)
    written = io.StringIO()
    with contextlib.redirect_stdout(written):
        command.downgrade(config, "0010:0009", sql=True)
    assert "Running downgrade 0010 -> 0009" in written.getvalue()


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


@pytest.mark.parametrize("query", ["password={pw}", "PassWord={pw}&connect_timeout=2", "sslpassword={pw}",
                                   "passfile=/tmp/{pw}"])
def test_an_unreachable_database_never_prints_a_password_given_as_a_query_parameter(
        query: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """libpq (and psycopg) take `?password=`; a misspelt option (`PassWord`, refused by libpq) is hidden too."""
    password = "S3cret-Pw-7781"
    url = f"postgresql+psycopg://govrag@127.0.0.1:1/govrag?{query.format(pw=password)}"
    assert _cli(monkeypatch, tmp_path, url, ["migrate"]) == 1
    error = capsys.readouterr().err
    assert "cannot reach the database at postgresql+psycopg://govrag@127.0.0.1:1/govrag" in error, error
    assert password not in error, error
    with pytest.raises(migrate.DatabaseUnreachable) as refused:  # what start-up (require_head) says
        migrate.require_head(url)
    assert password not in str(refused.value)


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


@pytest.mark.usefixtures("make_pg_database")
def test_titles_stored_before_redaction_are_redacted_and_retired_rows_forget_their_original(
        make_pg_database: Callable[[], str]) -> None:
    """Titles were stored raw (a file name with an e-mail address), and a deleted document kept its title and hash."""
    url = make_pg_database()
    migrate.upgrade(url, "0009")
    engine = create_engine(url)
    columns = "id, department, title, content_type, size_bytes, sha256, acl_groups, classification, status, " \
              "chunk_count, uploaded_by, created_at, updated_at, flagged_chunks"
    values = "'text/plain', 10, :sha, '[]', 'internal', :status, 0, 'ed', now(), now(), 0"
    try:
        with engine.begin() as connection:
            connection.execute(text("INSERT INTO departments (name, created_at) VALUES ('hr', now())"))
            for document_id, title, status in [("a", "Travel claim maria.gonzalez@example.com.txt", "ready"),
                                               ("b", "Quarterly report 2024.pdf", "ready"),
                                               ("c", "Dismissal of maria.gonzalez@example.com.txt", "deleted")]:
                connection.execute(text(f"INSERT INTO documents ({columns}) VALUES (:id, 'hr', :title, {values})"),  # noqa: S608
                                   {"id": document_id, "title": title, "sha": "ab" * 32, "status": status})
        migrate.upgrade(url)
        with engine.connect() as connection:
            rows = connection.execute(text("SELECT id, title, sha256, size_bytes FROM documents ORDER BY id")).all()
    finally:
        engine.dispose()
    assert [tuple(row) for row in rows] == [("a", "Travel claim <EMAIL_ADDRESS>.txt", "ab" * 32, 10),
                                            ("b", "Quarterly report 2024.pdf", "ab" * 32, 10),
                                            ("c", "(deleted)", "", 0)]


def test_approvals_stored_before_0011_cover_the_level_they_released_and_a_held_one_refuses_the_downgrade(
        tmp_path: Path) -> None:
    """An approval recorded no level (every later run skipped the review); 0011 gives approved documents the level
    they hold, and undoing it is refused while a document is held because its level rose since its approval."""
    url = f"sqlite:///{tmp_path / 'schema.db'}"
    migrate.upgrade(url, "0010")
    columns = "id, department, title, content_type, size_bytes, sha256, acl_groups, classification, status, " \
              "chunk_count, uploaded_by, created_at, updated_at, flagged_chunks, approved_by"
    values = "'t', 'text/plain', 1, 'ab', '[]', 'confidential', 'ready', 0, 'ed', '2026-01-01', '2026-01-01', 0"
    _execute(url, "INSERT INTO departments (name, created_at) VALUES ('hr', '2026-01-01 00:00:00')",
             f"INSERT INTO documents ({columns}) VALUES ('a', 'hr', {values}, 'rolf')",  # noqa: S608
             f"INSERT INTO documents ({columns}) VALUES ('b', 'hr', {values}, NULL)")  # noqa: S608
    migrate.upgrade(url)
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            levels = connection.execute(text("SELECT id, approved_level FROM documents ORDER BY id")).all()
    finally:
        engine.dispose()
    assert [tuple(row) for row in levels] == [("a", "confidential"), ("b", None)]
    _execute(url, "UPDATE documents SET classification = 'restricted', status = 'quarantined' WHERE id = 'a'")
    with pytest.raises(migrate.DowngradeRefused, match=r"revision 0011: .*1 documents' approved levels"):
        migrate.downgrade(url, "0010")
    assert migrate.current_revision(url) == migrate.head_revision()


def test_documents_ready_before_0012_serve_the_points_they_have_and_a_numbered_generation_refuses_the_downgrade(
        tmp_path: Path) -> None:
    """Points indexed before index generations carry none: a ready document serves them as generation 0, any other
    serves none until its run ends ready. Undoing 0012 is refused once a run has numbered a generation: an upgrade
    after it would number runs again from 0 and not know which points to cite."""
    url = f"sqlite:///{tmp_path / 'schema.db'}"
    migrate.upgrade(url, "0011")
    columns = "id, department, title, content_type, size_bytes, sha256, acl_groups, classification, status, " \
              "chunk_count, uploaded_by, created_at, updated_at, flagged_chunks"
    row = "('{id}', 'hr', 't', 'text/plain', 1, 'ab', '[]', 'internal', '{status}', 0, 'ed', '2026-01-01', " \
          "'2026-01-01', 0)"
    rows = ", ".join(row.format(id=i, status=status) for i, status in (("a", "ready"), ("b", "queued"),
                                                                       ("c", "quarantined")))
    _execute(url, "INSERT INTO departments (name, created_at) VALUES ('hr', '2026-01-01 00:00:00')",
             f"INSERT INTO documents ({columns}) VALUES {rows}")  # noqa: S608
    migrate.upgrade(url)
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            served = connection.execute(text("SELECT id, index_generation, served_generation FROM documents "
                                             "ORDER BY id")).all()
    finally:
        engine.dispose()
    assert [tuple(row) for row in served] == [("a", 0, 0), ("b", 0, None), ("c", 0, None)]
    _execute(url, "UPDATE documents SET index_generation = 1, served_generation = 1, unbound_through = 1, "
                  "maps_unbound_through = 1 WHERE id = 'a'")  # numbered before 0020 and 0021: only 0012 holds it
    with pytest.raises(migrate.DowngradeRefused, match=r"revision 0012: .*1 documents' index generations"):
        migrate.downgrade(url, "0011")
    assert migrate.current_revision(url) == migrate.head_revision()
    _execute(url, "UPDATE documents SET index_generation = 0, served_generation = 0")
    migrate.downgrade(url, "0011")  # nothing numbered yet: nothing to lose
    assert migrate.current_revision(url) == "0011"


@pytest.mark.parametrize("kind", ["sqlite", "pg"])
def test_the_recorded_blob_store_id_goes_with_0014_and_the_next_start_records_the_store_again(
        kind: str, tmp_path: Path, make_pg_database: Callable[[], str]) -> None:
    """0014 records the id of the database's blob store; undoing it loses only that record."""
    from core import blobs

    url = _database(kind, tmp_path, make_pg_database)
    migrate.upgrade(url)
    blob_dir = tmp_path / "blobs"
    assert blobs.open_at_start(blob_dir, url)
    store_id = (blob_dir / blobs.MARKER).read_text().strip()
    migrate.downgrade(url, "0013")
    assert "blob_store" not in _tables(url)
    migrate.upgrade(url)
    assert blobs.open_at_start(blob_dir, url)
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            assert connection.execute(text("SELECT store_id FROM blob_store")).scalars().all() == [store_id]
    finally:
        engine.dispose()


@pytest.mark.parametrize("kind", ["sqlite", "pg"])
def test_the_master_key_verifiers_go_with_0018_and_the_next_start_stores_them_again(
        kind: str, tmp_path: Path, make_pg_database: Callable[[], str]) -> None:
    """0018 keeps a verifier per master key version in use; undoing it loses only them."""
    import base64

    from core import crypto, keystore
    from core.settings import Settings

    url = _database(kind, tmp_path, make_pg_database)
    migrate.upgrade(url)
    settings = Settings(data_dir=tmp_path, database_url=url, master_key=base64.b64encode(crypto.new_key()).decode())

    def verifiers() -> list[int]:
        engine = create_engine(url)
        try:
            with engine.connect() as connection:
                return list(connection.execute(text("SELECT version FROM master_key_verifiers")).scalars())
        finally:
            engine.dispose()

    keystore.record_master_verifiers(settings)
    assert verifiers() == [1]
    migrate.downgrade(url, "0017")
    assert "master_key_verifiers" not in _tables(url)
    migrate.upgrade(url)
    assert verifiers() == []
    keystore.record_master_verifiers(settings)
    assert verifiers() == [1]


@pytest.mark.parametrize("kind", ["sqlite", "pg"])
def test_ed25519_checkpoint_signatures_go_with_0019_which_refuses_to_drop_one(
        kind: str, tmp_path: Path, make_pg_database: Callable[[], str]) -> None:
    """0019 stores each checkpoint's Ed25519 signature beside its HMAC; undoing it is refused while one is stored
    (the `v3.` checkpoints could no longer be checked), and goes once none is."""
    from audit import service as audit_service
    from authz.identity import operator_identity
    from core.db import get_engine, unit_of_work
    from core.settings import Settings

    url = _database(kind, tmp_path, make_pg_database)
    migrate.upgrade(url, "0018")
    assert "signature_ed25519" not in _columns(url, "audit_checkpoints")
    migrate.upgrade(url)
    settings = Settings(data_dir=tmp_path, database_url=url)
    with unit_of_work(url) as session:
        audit_service.checkpoint_now(session=session, settings=settings)  # the ledger is empty: none signed
        audit_service.record_admin_event(session=session, identity=operator_identity("ops"), settings=settings,
                                         event_type="kill_switch")  # an admin action: signed at once
    get_engine.cache_clear()
    with pytest.raises(migrate.DowngradeRefused, match=r"revision 0019: .*1 audit checkpoints signed with Ed25519"):
        migrate.downgrade(url, "0018")
    assert migrate.current_revision(url) == migrate.head_revision()
    _execute(url, "DELETE FROM audit_checkpoints")
    migrate.downgrade(url, "0018")
    assert "signature_ed25519" not in _columns(url, "audit_checkpoints")
    migrate.upgrade(url)
    assert "signature_ed25519" in _columns(url, "audit_checkpoints")


def _columns(url: str, table: str) -> set[str]:
    engine = create_engine(url)
    try:
        return {column["name"] for column in inspect(engine).get_columns(table)}
    finally:
        engine.dispose()


@pytest.mark.parametrize("kind", ["sqlite", "pg"])
@pytest.mark.parametrize(("revision", "column", "sealed"), [
    ("0020", "unbound_through", "chunks' contexts"),
    ("0021", "maps_unbound_through", "placeholder maps' contexts"),
], ids=["chunks", "placeholder-maps"])
def test_generations_numbered_before_their_context_bound_the_run_keep_the_old_one_and_a_later_one_refuses_downgrade(
        kind: str, tmp_path: Path, make_pg_database: Callable[[], str], revision: str, column: str,
        sealed: str) -> None:
    """0020 (chunks) and 0021 (placeholder maps) record every generation a document numbered before them as sealed
    under the context naming no run (`column`), so what they sealed keeps opening; undoing either is refused once a
    run has numbered a later one, whose chunks or map the release before would not open."""
    url, before = _database(kind, tmp_path, make_pg_database), f"{int(revision) - 1:04d}"
    migrate.upgrade(url, before)
    columns = "id, department, title, content_type, size_bytes, sha256, acl_groups, classification, status, " \
              "chunk_count, uploaded_by, created_at, updated_at, flagged_chunks, index_generation, served_generation"
    rows = ("('a', 'hr', 't', 'text/plain', 1, 'ab', '[]', 'internal', 'ready', 1, 'ed', '2026-01-01', '2026-01-01', "
            "0, 3, 2), ('b', 'hr', 't', 'text/plain', 1, 'cd', '[]', 'internal', 'queued', 0, 'ed', '2026-01-01', "
            "'2026-01-01', 0, 0, NULL)")
    _execute(url, "INSERT INTO departments (name, created_at) VALUES ('hr', '2026-01-01 00:00:00')",
             f"INSERT INTO documents ({columns}) VALUES {rows}")  # noqa: S608
    migrate.upgrade(url, revision)
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            unbound = connection.execute(text(f"SELECT id, {column} FROM documents ORDER BY id")).all()  # noqa: S608
    finally:
        engine.dispose()
    assert [tuple(row) for row in unbound] == [("a", 3), ("b", 0)]
    _execute(url, "UPDATE documents SET index_generation = 1 WHERE id = 'b'")  # a run numbered since
    with pytest.raises(migrate.DowngradeRefused,
                       match=rf"revision {revision}: .*1 documents indexed with their run bound in their {sealed}"):
        migrate.downgrade(url, before)
    assert migrate.current_revision(url) == revision
    _execute(url, "UPDATE documents SET index_generation = 0 WHERE id = 'b'")
    migrate.downgrade(url, before)
    assert column not in _columns(url, "documents")


@pytest.mark.parametrize("kind", ["sqlite", "pg"])
def test_duplicates_refused_before_0022_name_their_copy_from_their_reason_and_undoing_it_keeps_the_reason(
        kind: str, tmp_path: Path, make_pg_database: Callable[[], str]) -> None:
    """Code told an attachment refused as a duplicate, and the copy it names, by its reason's words. 0022 records the
    copy in `duplicate_of`, taken from the reasons of refusals recorded before (those words exactly, then an id: not
    a reason worded otherwise or in other case, nor one with nothing or more than an id after them); undoing it
    leaves every reason as it was, which the release before reads."""
    url = _database(kind, tmp_path, make_pg_database)
    migrate.upgrade(url, "0021")
    words = "duplicate upload: the department already has this content as document "
    copy = "0b8e4bfa-6bd1-4a8e-9a53-5d2d7f0f5c1e"
    errors = {"refused": words + copy, "retired": words + copy, "shouted": words.upper() + copy, "bare": words,
              "long": words + copy + "0", "other": "the attachment is empty or could not be read", "none": None}
    columns = "id, department, title, content_type, size_bytes, sha256, acl_groups, classification, status, error, " \
              "chunk_count, uploaded_by, created_at, updated_at, flagged_chunks"
    row = "('{id}', 'hr', 't', 'text/plain', 1, 'ab', '[]', 'internal', '{status}', {error}, 0, 'ed', '2026-01-01', " \
          "'2026-01-01', 0)"
    rows = ", ".join(row.format(id=name, status="deleted" if name == "retired" else "failed",
                                error="NULL" if error is None else f"'{error}'") for name, error in errors.items())
    _execute(url, "INSERT INTO departments (name, created_at) VALUES ('hr', '2026-01-01 00:00:00')",
             f"INSERT INTO documents ({columns}) VALUES {rows}")  # noqa: S608
    engine = create_engine(url)
    try:
        migrate.upgrade(url, "0022")
        with engine.connect() as connection:
            named = dict(connection.execute(text("SELECT id, duplicate_of FROM documents")).all())
        assert named == {"refused": copy, "retired": copy, "shouted": None, "bare": None, "long": None, "other": None,
                         "none": None}
        migrate.downgrade(url, "0021")
        assert "duplicate_of" not in _columns(url, "documents")
        with engine.connect() as connection:
            kept = dict(connection.execute(text("SELECT id, error FROM documents")).all())
        assert kept == errors
    finally:
        engine.dispose()


TITLES_BEFORE_0023 = {  # as the rule before guard.pii's `_kept_in_title` stored them → as 0023 leaves them
    "email": ("Claim of maria.gonzalez@example.com", "Claim of <EMAIL_ADDRESS>"),
    "ip": ("Access from 10.0.0.1", "Access from <IP_ADDRESS>"),
    "handle": ("Access for maria.gonzalez", "Access for <STAFF_HANDLE>"),  # the department's recognizer
    "allowed": ("Relay at 10.9.9.9", "Relay at 10.9.9.9"),  # on the department's allow-list
    "lease": ("Jordan Office Lease.pdf", "Jordan Office Lease.pdf"),  # a name cut at the extension stays cut
    "chain": ("Jordan Office Lease.pdf.gpg", "Jordan Office Lease.pdf.gpg"),  # nor at a compound one's start
    "dated": ("Minutes 2024.05.17.tar.gz", "Minutes 2024.05.17.tar.gz"),  # a date before one is no value
    "notes": ("<PERSON> notes.txt", "<PERSON> notes.txt"),
    "beside": ("Notes for <PERSON> Rivera.docx", "Notes for <PERSON> Rivera.docx"),  # the NER reads Rivera beside it
    "again": ("Letter from Rivera to <PERSON>.Rivera", "Letter from Rivera to <PERSON>.Rivera"),  # nor finds it again
    "long": ("x" * 290 + " 10.0.0.1", "x" * 285 + " … <IP_ADDRESS>"),  # cut to 300 characters as a title is set
    "deleted": ("Dismissal of maria.gonzalez@example.com", "Dismissal of maria.gonzalez@example.com"),  # retired
}


HANDLE = {"entity": "STAFF_HANDLE", "pattern": "\\b[a-z]+\\.[a-z]{6,}\\b", "checksum": "none", "context": [],
          "score": 0.6}


def _titles(url: str) -> dict[str, str]:
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            return dict(connection.execute(text("SELECT id, title FROM documents")).all())
    finally:
        engine.dispose()


def _store_titles(url: str, titles: dict[str, str], *, allow_list: list[str], recognizers: object,
                  retired: tuple[str, ...] = ("deleted", "rejected")) -> None:
    """Department hr, its ingestion policy (`recognizers`: JSON, as the row holds them) and a document of it for each
    title, named by its key: `ready` but for those named as a retired status."""
    columns = "id, department, title, content_type, size_bytes, sha256, acl_groups, classification, status, " \
              "chunk_count, uploaded_by, created_at, updated_at, flagged_chunks"
    policy = "department, ai_max_level, injection_action, keywords, allow_list, recognizers, reversible, updated_by, " \
             "updated_at"
    engine = create_engine(url)
    try:
        with engine.begin() as connection:
            connection.execute(text("INSERT INTO departments (name, created_at) VALUES ('hr', '2026-01-01 00:00:00')"))
            connection.execute(text(f"INSERT INTO ingestion_policies ({policy}) VALUES ('hr', 'confidential', "  # noqa: S608
                                    "'exclude', '{}', :allow_list, :recognizers, false, 'ed', '2026-01-01')"),
                               {"allow_list": json.dumps(allow_list), "recognizers": json.dumps(recognizers)})
            connection.execute(text(f"INSERT INTO documents ({columns}) VALUES (:id, 'hr', :title, 'text/plain', 1, "  # noqa: S608
                                    "'ab', '[]', 'internal', :status, 1, 'ed', '2026-01-01', '2026-01-01', 0)"),
                               [{"id": name, "title": title, "status": name if name in retired else "ready"}
                                for name, title in titles.items()])
    finally:
        engine.dispose()


@pytest.mark.parametrize("kind", ["sqlite", "pg"])
def test_titles_stored_with_a_value_in_what_looks_like_an_extension_have_only_that_value_redacted_by_0023(
        kind: str, tmp_path: Path, make_pg_database: Callable[[], str]) -> None:
    """Before `_kept_in_title`, a span reaching into what looks like a file extension was dropped, so a title ending
    in an address (`.com`), an IP address (`.1`) or a department's handle was stored with it raw. 0023 redacts those
    values, under the department's rules (its recognizer, its allow-list), and nothing else: a name the NER cuts at
    the extension, a title redacted before (the NER would take `Rivera` beside its placeholder for a name), a retired
    document's row."""
    url = _database(kind, tmp_path, make_pg_database)
    migrate.upgrade(url, "0022")
    _store_titles(url, {name: before for name, (before, _after) in TITLES_BEFORE_0023.items()},
                  allow_list=["10.9.9.9"], recognizers=[HANDLE])
    migrate.upgrade(url, "0023")
    assert _titles(url) == {name: after for name, (_before, after) in TITLES_BEFORE_0023.items()}


# A department's handle alone, not a piece of a longer dotted name (a domain): not found before a `.tar`; and a unit's
# code, which is found in a placeholder (`EMAIL_ADDRESS` of `<EMAIL_ADDRESS>`).
LONE_HANDLE = {**HANDLE, "pattern": "(?<![\\w.])[a-z]+\\.[a-z]{6,}(?![\\w.])"}
UNIT_CODE = {"entity": "UNIT_CODE", "pattern": "\\b[A-Z]+_[A-Z]+\\b", "checksum": "none", "context": [], "score": 0.6}
TITLES_BEFORE_0025 = {  # as the rule before a title was read without each extension of a chain stored them → 0025's
    "bare": ("maria@example.com.tar.gz", "<EMAIL_ADDRESS>.tar.gz"),
    "claim": ("Claim of maria@example.com.pdf.gpg", "Claim of <EMAIL_ADDRESS>.pdf.gpg"),
    "three": ("Claim of maria@example.com.tar.gz.001", "Claim of <EMAIL_ADDRESS>.tar.gz.001"),
    "private": ("anna.berg@ops.acme.internal.tar.gz", "<EMAIL_ADDRESS>.tar.gz"),
    "handle": ("Access for maria.gonzalez.tar.gz", "Access for <STAFF_HANDLE>.tar.gz"),  # the department's recognizer
    "allowed": ("Write to help@example.com.pdf.gpg", "Write to help@example.com.pdf.gpg"),  # on its allow-list
    "name": ("Meeting notes Brian.docx.enc", "Meeting notes <PERSON>.docx.enc"),  # the NER took `Brian.docx`
    "cut": ("<PERSON> Horak.docx.enc", "<PERSON> <PERSON>.docx.enc"),  # stored for `Jan Horak.docx.enc`
    "final": ("Report by <PERSON> Gonzalez.final.pdf", "Report by <PERSON> <PERSON>.final.pdf"),
    "beside": ("Notes for <PERSON> and maria@example.com.pdf.gpg", "Notes for <PERSON> and <EMAIL_ADDRESS>.pdf.gpg"),
    "redacted": ("Claim of <EMAIL_ADDRESS> draft.pdf.gpg", "Claim of <EMAIL_ADDRESS> draft.pdf.gpg"),  # no UNIT_CODE
    "dated": ("Minutes 2024.05.17.tar.gz", "Minutes 2024.05.17.tar.gz"),  # a date before a chain is no value
    "lease": ("Jordan Office <PERSON>.gpg", "Jordan Office <PERSON>.gpg"),  # its chain cut by the NER: none left
    "one": ("Letter to <PERSON> Novak.docx", "Letter to <PERSON> Novak.docx"),  # no chain: read whole before
    "long": ("x" * 280 + " j@ex.io.pdf.gpg", "x" * 280 + " <EMAIL_ADDRESS>.pdf"),  # cut to 300 as a title is set
    "deleted": ("Dismissal of maria@example.com.pdf.gpg", "Dismissal of maria@example.com.pdf.gpg"),  # retired
    "rejected": ("Scan of maria@example.com.tar.gz", "Scan of maria@example.com.tar.gz"),
    # Stored while a chain was read three extensions deep and in one case alone: `.Pdf`, `.Docx` no extension to it.
    "capitals": ("Claim of maria@example.com.Pdf.Gpg", "Claim of <EMAIL_ADDRESS>.Pdf.Gpg"),
    "deep": ("Mail maria@example.com.backup.old.tar.gz.001", "Mail <EMAIL_ADDRESS>.backup.old.tar.gz.001"),
    "cut_capitals": ("<PERSON> Horak.Docx.Enc", "<PERSON> <PERSON>.Docx.Enc"),
    "deep_name": ("Meeting notes Brian.backup.old.tar.gz", "Meeting notes <PERSON>.backup.old.tar.gz"),
}


@pytest.mark.parametrize("kind", ["sqlite", "pg"])
@pytest.mark.parametrize("batch", [500, 2], ids=["one-batch", "batches-of-2"])
def test_titles_stored_with_a_value_hidden_by_a_compound_extension_have_it_redacted_by_0025(
        kind: str, batch: int, tmp_path: Path, make_pg_database: Callable[[], str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A title was read as it is and without its last extension alone, so what a chain of two or more hid was stored
    raw: an address (`.com.pdf.gpg`, `.com.backup.old.tar.gz.001`, `.com.Pdf.Gpg`), a department's handle, the word
    of a name the NER cut at the inner extension (`<PERSON> Horak.docx.enc`). 0025 redacts what the title's readings
    without two extensions and more find, under the department's rules (its recognizers, its allow-list), names too,
    and nothing else: not a placeholder already there (UNIT_CODE matches `EMAIL_ADDRESS` in one), a title without a
    chain, a retired document's row. Read in batches of two (by id, each batch's titles updated before the next is
    read), no row is skipped: the same titles come out."""
    monkeypatch.setattr("migrations.stored_titles.BATCH", batch)
    url = _database(kind, tmp_path, make_pg_database)
    migrate.upgrade(url, "0024")
    _store_titles(url, {name: before for name, (before, _after) in TITLES_BEFORE_0025.items()},
                  allow_list=["help@example.com"], recognizers=[LONE_HANDLE, UNIT_CODE])
    migrate.upgrade(url)
    assert _titles(url) == {name: after for name, (_before, after) in TITLES_BEFORE_0025.items()}


@pytest.mark.parametrize("kind", ["sqlite", "pg"])
def test_0025_loads_no_model_for_titles_without_a_chain_and_undoing_it_restores_nothing(
        kind: str, tmp_path: Path, make_pg_database: Callable[[], str]) -> None:
    """Live titles with dots but no chain of extensions (a date, a version, one extension) and a retired one with a
    chain: 0025 leaves each byte for byte without asking for the PII model. Undone, it changes nothing; a title with
    a chain stored meanwhile is redacted when it runs again."""
    url = _database(kind, tmp_path, make_pg_database)
    migrate.upgrade(url, "0024")
    titles = {"dated": "Minutes 2024.05.17", "version": "Release v1.2.3 notes", "one": "Letter to <PERSON> Novak.docx",
              "deleted": "Dismissal of maria@example.com.pdf.gpg"}
    _store_titles(url, titles, allow_list=[], recognizers=[])
    from guard.pii import get_redactor  # the PII model's one loader: its cache counts every call

    asked = get_redactor.cache_info()
    migrate.upgrade(url)
    assert get_redactor.cache_info() == asked
    assert _titles(url) == titles
    migrate.downgrade(url, "0024")
    assert _titles(url) == titles
    _execute(url, "UPDATE documents SET title = 'Claim of maria@example.com.pdf.gpg' WHERE id = 'one'")
    migrate.upgrade(url)
    assert _titles(url) == {**titles, "one": "Claim of <EMAIL_ADDRESS>.pdf.gpg"}


TITLES_BEFORE_0026 = {  # as a rule taking a capitalised chain for names stored them → as 0026 leaves them
    "claim": ("Claim of maria@example.com.<PERSON>.<PERSON>", "Claim of <EMAIL_ADDRESS>.<PERSON>.<PERSON>"),  # .Pdf.Gpg
    "bare": ("maria@example.com.<PERSON>.<PERSON>", "<EMAIL_ADDRESS>.<PERSON>.<PERSON>"),  # .Backup.Old
    "one": ("Mail maria@example.com.<PERSON>", "Mail <EMAIL_ADDRESS>.<PERSON>"),  # a run of one
    "types": ("Access from 10.0.0.1.<PERSON>.<UNIT_CODE>", "Access from <IP_ADDRESS>.<PERSON>.<UNIT_CODE>"),  # any
    "tar": ("Scan maria@example.com.tar.<PERSON>", "Scan <EMAIL_ADDRESS>.tar.<PERSON>"),  # a chain before the run
    "handle": ("Access for maria.gonzalez.<PERSON>", "Access for <STAFF_HANDLE>.<PERSON>"),  # the department's
    "allowed": ("Write to help@example.com.<PERSON>.<PERSON>", "Write to help@example.com.<PERSON>.<PERSON>"),
    # No NER: the word beside a placeholder is not read as a name (the NER takes `Rivera` in the title without the run).
    "beside": ("Notes for <PERSON> Rivera at maria@example.com.<PERSON>.<PERSON>",
               "Notes for <PERSON> Rivera at <EMAIL_ADDRESS>.<PERSON>.<PERSON>"),
    # Nor one the context patterns find (read whole when the title was set): only the values the run hid.
    "titled": ("Letter from Dr. Maria Rivera at maria@example.com.<PERSON>",
               "Letter from Dr. Maria Rivera at <EMAIL_ADDRESS>.<PERSON>"),
    "redacted": ("Claim of <EMAIL_ADDRESS> copy.<PERSON>.<PERSON>", "Claim of <EMAIL_ADDRESS> copy.<PERSON>.<PERSON>"),
    "dated": ("Minutes 2024.05.17.<PERSON>", "Minutes 2024.05.17.<PERSON>"),  # a date before a run is no value
    "middle": ("Ask Dr.<PERSON> about <PERSON>", "Ask Dr.<PERSON> about <PERSON>"),  # no run at the end
    "inside": ("Letter to Dr.<PERSON> Rivera", "Letter to Dr.<PERSON> Rivera"),
    "none": ("Notes on <PERSON>", "Notes on <PERSON>"),
    "long": ("x" * 274 + " j@ex.io.<PERSON>.<PERSON>", "x" * 274 + " <EMAIL_ADDRESS>.<PERSON>."),  # cut to 300
    "deleted": ("Dismissal of maria@example.com.<PERSON>.<PERSON>", "Dismissal of maria@example.com.<PERSON>.<PERSON>"),
    "rejected": ("Scan of maria@example.com.<PERSON>", "Scan of maria@example.com.<PERSON>"),
}


@pytest.mark.parametrize("kind", ["sqlite", "pg"])
def test_titles_stored_with_a_value_before_a_chain_taken_for_names_have_it_redacted_by_0026(
        kind: str, tmp_path: Path, make_pg_database: Callable[[], str]) -> None:
    """The NER took a capitalised chain (`.Pdf.Gpg`, `.Backup.Old`) for names, and the value it hid was stored raw
    before them: `Claim of maria@example.com.<PERSON>.<PERSON>`, which ends in no apparent extension (0023 and 0025
    leave it). 0026 redacts what the value recognizers find in the title without that run of placeholders (a run of
    one, of any type, before a chain), under the department's rules (its recognizer, its allow-list), and nothing
    else: no name (a word beside a placeholder, one the context patterns find), not a placeholder already there
    (UNIT_CODE matches `EMAIL_ADDRESS`), a title with no run at its end, a retired document's row."""
    url = _database(kind, tmp_path, make_pg_database)
    migrate.upgrade(url, "0025")
    _store_titles(url, {name: before for name, (before, _after) in TITLES_BEFORE_0026.items()},
                  allow_list=["help@example.com"], recognizers=[LONE_HANDLE, UNIT_CODE])
    migrate.upgrade(url, "0026")
    assert _titles(url) == {name: after for name, (_before, after) in TITLES_BEFORE_0026.items()}


@pytest.mark.parametrize("kind", ["sqlite", "pg"])
def test_0026_loads_no_model_for_titles_without_a_run_and_undoing_it_restores_nothing(
        kind: str, tmp_path: Path, make_pg_database: Callable[[], str]) -> None:
    """Live titles ending in a placeholder with no dot before it, or with one after a dot mid-title, and a retired one
    with a run: 0026 leaves each byte for byte without asking for the PII model. Undone, it changes nothing; a title
    with a run stored meanwhile is redacted when it runs again."""
    url = _database(kind, tmp_path, make_pg_database)
    migrate.upgrade(url, "0025")
    titles = {"none": "Notes on <PERSON>", "middle": "Ask Dr.<PERSON> about <PERSON>",
              "inside": "Letter to Dr.<PERSON> Rivera", "deleted": "Dismissal of maria@example.com.<PERSON>.<PERSON>"}
    _store_titles(url, titles, allow_list=[], recognizers=[])
    from guard.pii import get_redactor  # the PII model's one loader: its cache counts every call

    asked = get_redactor.cache_info()
    migrate.upgrade(url, "0026")
    assert get_redactor.cache_info() == asked
    assert _titles(url) == titles
    migrate.downgrade(url, "0025")
    assert _titles(url) == titles
    _execute(url, "UPDATE documents SET title = 'Claim of maria@example.com.<PERSON>.<PERSON>' WHERE id = 'none'")
    migrate.upgrade(url, "0026")
    assert _titles(url) == {**titles, "none": "Claim of <EMAIL_ADDRESS>.<PERSON>.<PERSON>"}


@pytest.mark.parametrize("kind", ["sqlite", "pg"])
@pytest.mark.parametrize("recognizers", [[{"entity": "STAFF_HANDLE"}], "none", [{**HANDLE, "pattern": "(a"}]],
                         ids=["no-pattern", "not-a-list", "no-regex"])
@pytest.mark.parametrize(("revision", "title"), [("0023", "Access from 10.0.0.1"),
                                                 ("0025", "Claim of maria@example.com.pdf.gpg"),
                                                 ("0026", "Claim of maria@example.com.<PERSON>.<PERSON>")])
def test_a_title_revision_stops_on_a_department_policy_it_cannot_apply_naming_the_department(
        kind: str, recognizers: object, revision: str, title: str, tmp_path: Path,
        make_pg_database: Callable[[], str]) -> None:
    """A policy row the API would not have saved (edited by hand: a recognizer without its pattern, recognizers not a
    list, a pattern that does not compile) cannot say how the department's titles were redacted: 0023, 0025, 0026 stop
    with a MigrationError naming the department (the CLI's one line, not a traceback quoting the row), the database
    left at the revision before with its titles as stored."""
    url, before = _database(kind, tmp_path, make_pg_database), f"{int(revision) - 1:04d}"
    migrate.upgrade(url, before)
    _store_titles(url, {"d": title}, allow_list=[], recognizers=recognizers)
    with pytest.raises(migrate.MigrationError, match=f"revision {revision}: the ingestion policy of department 'hr'"):
        migrate.upgrade(url, revision)
    assert migrate.current_revision(url) == before
    assert _titles(url) == {"d": title}


@pytest.mark.parametrize("kind", ["sqlite", "pg"])
def test_0024_gives_jobs_a_request_id_empty_for_those_queued_before_and_undoing_it_keeps_the_jobs(
        kind: str, tmp_path: Path, make_pg_database: Callable[[], str]) -> None:
    """A job kept no request id, so a send of it after the first carried its sender's (`-` for the sweep's). 0024
    adds `ingestion_jobs.request_id`: empty for the jobs queued before it (they were queued under no id it could
    know), the creator's for those after; undoing it drops the column and keeps every job."""
    url = _database(kind, tmp_path, make_pg_database)
    migrate.upgrade(url, "0023")
    job = "id, document_id, status, attempts, crashed_runs, created_at, updated_at"
    _execute(url, "INSERT INTO departments (name, created_at) VALUES ('hr', '2026-01-01 00:00:00')",
             "INSERT INTO documents (id, department, title, content_type, size_bytes, sha256, acl_groups, "
             "classification, status, chunk_count, uploaded_by, created_at, updated_at, flagged_chunks) VALUES "
             "('d', 'hr', 't', 'text/plain', 1, 'ab', '[]', 'internal', 'queued', 0, 'ed', '2026-01-01', "
             "'2026-01-01', 0)",
             f"INSERT INTO ingestion_jobs ({job}) VALUES ('before', 'd', 'queued', 0, 0, '2026-01-01', "  # noqa: S608
             "'2026-01-01')")
    migrate.upgrade(url, "0024")
    creator = "0123456789abcdef0123456789abcdef"
    _execute(url, f"INSERT INTO ingestion_jobs ({job}, request_id) VALUES ('after', 'd', 'queued', 0, 0, "  # noqa: S608
                  f"'2026-01-01', '2026-01-01', '{creator}')")
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            kept = dict(connection.execute(text("SELECT id, request_id FROM ingestion_jobs")).all())
        assert kept == {"before": None, "after": creator}
        migrate.downgrade(url, "0023")
        assert "request_id" not in _columns(url, "ingestion_jobs")
        with engine.connect() as connection:
            assert sorted(connection.execute(text("SELECT id FROM ingestion_jobs")).scalars()) == ["after", "before"]
    finally:
        engine.dispose()
