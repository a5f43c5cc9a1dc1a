"""A fresh database with two departments for `govrag keys rotate` tests, what the ledger and the keys say after, and a
key row altered or deleted as in the database."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.db import unit_of_work
from core.models import Document, RetrievalEvent, WrappedKey
from core.settings import Settings

DEPARTMENTS = ("alpha", "beta")  # rotated in this order (`list_departments` sorts)


def two_departments(make_pg_database: Callable[[], str], tmp_path: Path) -> Settings:
    """A migrated database of its own (PostgreSQL, which a test may cut off; or the SQLite URL `make_pg_database`
    returns), a key file in `tmp_path`, departments alpha and beta with one document (and its key) each."""
    from authz import service as authz_service
    from core import migrate
    from core.keystore import keystore_for

    url = make_pg_database()
    migrate.upgrade(url)
    settings = Settings(data_dir=tmp_path / "data", database_url=url)
    store = keystore_for(settings)
    with unit_of_work(url) as session:
        for department in DEPARTMENTS:
            authz_service.create_department(session=session, keystore=store, name=department)
            session.add(Document(id=f"{department}-doc", department=department, title="t", content_type="text/plain",
                                 size_bytes=1, sha256="0" * 64, uploaded_by="tester", status="ready"))
            store.create_document_key(session=session, department=department, document_id=f"{department}-doc")
    return settings


def database_name(settings: Settings) -> str:
    return settings.resolved_database_url.rsplit("/", 1)[1]


def department_key_versions(settings: Settings, department: str) -> list[int]:
    """The department's key versions still stored: one once a rotation has finished, two while one is half-done."""
    with unit_of_work(settings.resolved_database_url) as session:
        return sorted(session.scalars(select(WrappedKey.version).where(WrappedKey.kind == "department",
                                                                      WrappedKey.owner == department)))


def rotation_events(settings: Settings) -> list[RetrievalEvent]:
    """The ledger's `key_rotation` events, oldest first."""
    with unit_of_work(settings.resolved_database_url) as session:
        return list(session.scalars(select(RetrievalEvent).where(RetrievalEvent.event_type == "key_rotation")
                                    .order_by(RetrievalEvent.id)))


def audited_department_versions(settings: Settings, department: str) -> list[int]:
    """The new versions the ledger says the department's key was rotated to."""
    return [event.details["new_version"] for event in rotation_events(settings)
            if event.departments_requested == [department]]


def audited_details(settings: Settings, department: str) -> list[dict[str, Any]]:
    return [event.details for event in rotation_events(settings) if event.departments_requested == [department]]


def exit_code_unless_interrupted(command: Callable[[], int]) -> int | None:
    """`command`'s exit code, or None when a Ctrl-C escaped it (caught here: it would end the test session)."""
    try:
        return command()
    except KeyboardInterrupt:
        return None


def alter_key_row(settings: Settings, session: Session, owner: str, kind: str = "document") -> None:
    """Flip one bit of the authentication tag of a document's (or a department's) key row; this process forgets the
    keys it opened too, as one that never opened them."""
    from core.keystore import keystore_for

    row = session.scalars(select(WrappedKey).where(WrappedKey.kind == kind, WrappedKey.owner == owner)).one()
    row.wrapped = row.wrapped[:-1] + bytes([row.wrapped[-1] ^ 0x01])
    keystore_for(settings)._cache.clear()


@contextmanager
def department_key_deleted(settings: Settings, department: str) -> Iterator[None]:
    """The department's key rows deleted in the database (this process forgets the keys it opened, as one that never
    opened them), put back as they were when the block ends."""
    from core.keystore import keystore_for

    url = settings.resolved_database_url
    with unit_of_work(url) as session:
        rows = session.scalars(select(WrappedKey).where(WrappedKey.kind == "department",
                                                        WrappedKey.owner == department)).all()
        kept = [(row.version, row.parent_version, row.wrapped) for row in rows]
        for row in rows:
            session.delete(row)
    keystore_for(settings)._cache.clear()
    try:
        yield
    finally:
        with unit_of_work(url) as session:
            session.add_all(WrappedKey(kind="department", owner=department, version=version, parent_version=parent,
                                       wrapped=wrapped) for version, parent, wrapped in kept)
