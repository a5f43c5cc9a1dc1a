"""The re-check's one statement (`ingestion.repository.served_documents`, built once with an expanding list of ids)
on both databases in one process: no ids asks nothing, and lists of any length, one after another, each get exactly
their served documents."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from authz import repository as authz_repository
from core import migrate
from core.db import get_session_factory
from core.models import Document, DocumentStatus
from ingestion import repository

SERVED_COUNT = 1000  # more ids than a query's re-check ever sends


def _document(status: str, served_generation: int | None) -> Document:
    return Document(id=str(uuid.uuid4()), department="desk", title="note", content_type="text/plain", size_bytes=1,
                    sha256="0" * 64, uploaded_by="editor", status=status, served_generation=served_generation)


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_served_documents_of_empty_short_and_long_lists(database: str, tmp_path: Path,
                                                        make_pg_database: Callable[[], str]) -> None:
    url = f"sqlite:///{tmp_path / 'govrag.db'}" if database == "sqlite" else make_pg_database()
    migrate.upgrade(url)
    served = [_document(DocumentStatus.ready, 1) for _ in range(SERVED_COUNT)]
    not_served = [_document(DocumentStatus.failed, 1), _document(DocumentStatus.ready, None)]
    with get_session_factory(url)() as session:
        authz_repository.add_department(session, "desk")
        session.add_all([*served, *not_served])
        session.flush()
        served_ids = {document.id for document in served}
        asked = served_ids | {document.id for document in not_served} | {"not-a-document"}

        assert repository.served_documents(session, set()) == {}
        assert set(repository.served_documents(session, asked)) == served_ids
        one = served[0].id
        assert repository.served_documents(session, {one, not_served[0].id}) == {one: served[0]}
        session.rollback()
