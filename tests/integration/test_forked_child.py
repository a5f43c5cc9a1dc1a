"""A forked child (a Celery prefork child, a gunicorn-style worker) builds its own connections and stores
(core/forksafe.py): it never talks on the parent's connection, nor closes what the parent has open."""

from __future__ import annotations

import fcntl
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import text

from core.db import get_engine
from core.errors import EmbeddedStoreHeld
from core.settings import Settings
from retrieval.store import close_vector_store, open_vector_store
from tests.support.forking import exit_code_of_child

BACKEND_PID = text("SELECT pg_backend_pid()")


def test_a_forked_child_queries_on_a_connection_of_its_own(make_pg_database: Callable[[], str]) -> None:
    """The parent's pooled connection is the parent's: the child's query goes to another server process, and the
    parent's connection still answers after the child ended."""
    engine = get_engine(make_pg_database())
    with engine.connect() as connection:
        parents = connection.scalar(BACKEND_PID)

    def child_has_its_own() -> bool:
        with engine.connect() as connection:
            return connection.scalar(BACKEND_PID) != parents

    assert exit_code_of_child(child_has_its_own) == 0
    with engine.connect() as connection:
        assert connection.scalar(BACKEND_PID) == parents


def test_a_forked_child_neither_uses_nor_closes_the_parents_embedded_store(tmp_path: Path) -> None:
    """An embedded store is one process's: the child has none open (closing it closes nothing of the parent's, whose
    engine lock stays held), and opening one there is EmbeddedStoreHeld."""
    settings = Settings(data_dir=tmp_path, vector_backend="qdrant_local")
    store = open_vector_store(settings)

    def child_finds_it_held() -> bool:
        close_vector_store(settings)
        try:
            open_vector_store(settings)
        except EmbeddedStoreHeld:
            return True
        return False

    try:
        assert exit_code_of_child(child_finds_it_held) == 0
        with (settings.resolved_qdrant_path / ".lock").open("r+") as other, pytest.raises(BlockingIOError):
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert open_vector_store(settings) is store
    finally:
        close_vector_store(settings)
