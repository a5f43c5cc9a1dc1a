"""Database engine and sessions: one engine per URL per process."""

from __future__ import annotations

import fcntl
import hashlib
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.orm import Session, SessionTransaction, sessionmaker

from core import forksafe

_ADVISORY_SPACE = 0x676F7672  # the key space of `transaction_lock` (the ledger's one-key advisory lock is apart)
_HELD = "govrag_transaction_locks"  # session.info key: the names this transaction holds → their file locks (SQLite)


@lru_cache
def get_engine(url: str) -> Engine:
    """The process-wide engine for a database URL. `hide_parameters`: a database error's text (which may reach a log)
    names the statement but never the values bound to it (titles, subjects, masked questions)."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30}, hide_parameters=True)
        event.listen(engine, "connect", _sqlite_pragmas)
    else:
        engine = create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=10, hide_parameters=True)
    return forksafe.renewed(engine, _new_pool)


def _new_pool(engine: Engine) -> None:
    """In a forked child: a pool of its own, the parent's connections left to it, unclosed (SQLAlchemy's way for
    a fork: a connection used by two processes mixes their conversations)."""
    engine.dispose(close=False)


def is_postgres(session: Session) -> bool:
    """True on PostgreSQL (advisory locks, server-side cursors); False on the embedded SQLite."""
    return session.get_bind().dialect.name == "postgresql"


def hold_sqlite_write_lock(session: Session) -> None:
    """SQLite: take the database's write lock now (`BEGIN IMMEDIATE`), held until the transaction ends, so no other
    transaction writes between what this one reads next and what it writes; a transaction that has written already
    holds it (the driver begins one only before its first write). PostgreSQL: nothing (the caller locks what it
    reads)."""
    if is_postgres(session):
        return
    connection = session.connection()
    if not connection.connection.dbapi_connection.in_transaction:  # type: ignore[union-attr]
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def transaction_lock(session: Session, name: str, *, shared: bool = False) -> None:
    """Hold the lock called `name` until the session's transaction ends: transactions taking the same name run their
    check-then-write one after the other, each seeing what the other committed (two copies of an upload, two admins
    creating the same department or moving the same kill switch). `shared`: any number of transactions hold it at
    once; one taking it exclusively waits until none does, and holds off all others while it has it (uploads wrapping
    keys under a key version, a rotation retiring that version).

    PostgreSQL: a transaction-scoped advisory lock (distinct names may rarely share a key: they then wait for each
    other, harmlessly). SQLite: a process lock per name, then (a database file, which other processes may open:
    `govrag keys rotate` beside `govrag serve`) a file lock on that name's file next to it (`_NameFileLock`); both
    released when the outermost transaction commits or rolls back."""
    if is_postgres(session):
        function = "pg_advisory_xact_lock_shared" if shared else "pg_advisory_xact_lock"
        session.execute(text(f"SELECT {function}(:space, :key)"),
                        {"space": _ADVISORY_SPACE, "key": _advisory_key(name)})
        return
    session.connection()  # a transaction is begun, so its end (which releases the lock) will come
    held: dict[str, _NameFileLock | None] = session.info.setdefault(_HELD, {})
    if name in held:
        return
    _PROCESS_LOCKS.acquire(name, shared=shared)
    try:
        locks = _lock_dir(session)
        held[name] = _NameFileLock.acquire(locks, name, shared=shared) if locks is not None else None
    except BaseException:
        _PROCESS_LOCKS.release(name)
        raise


def lock_is_held(session: Session, name: str) -> bool:
    """Whether another transaction holds the lock called `name` (`transaction_lock`) exclusively right now, asked
    without waiting. PostgreSQL: a shared try of its advisory lock, which (got) this transaction then holds until it
    ends; a name sharing its key with another held lock reads as held (rarely: 1 in 2^32). SQLite: this process's
    lock of that name, then its file's, which a holder in another process keeps locked."""
    if is_postgres(session):
        got = session.scalar(text("SELECT pg_try_advisory_xact_lock_shared(:space, :key)"),
                             {"space": _ADVISORY_SPACE, "key": _advisory_key(name)})
        return not got
    if _PROCESS_LOCKS.held_exclusively(name):
        return True
    locks = _lock_dir(session)
    return locks is not None and _NameFileLock.held(locks, name)


def keep_idle_transaction_open(connection: Connection) -> None:
    """A transaction left idle for as long as a lock it holds must be (a file's run) is not ended by a server's (or
    database's, or role's) timeout on idle transactions (PostgreSQL 17: on any transaction), the lock with it,
    unseen: both timeouts off for this transaction alone. SQLite: nothing (no such timeout)."""
    if connection.dialect.name != "postgresql":
        return
    connection.execute(text("SELECT set_config(name, '0', true) FROM pg_settings "
                            "WHERE name IN ('idle_in_transaction_session_timeout', 'transaction_timeout')"))


def _advisory_key(name: str) -> int:
    """The key of a lock name in `transaction_lock`'s advisory key space (PostgreSQL)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "big", signed=True)


def _lock_dir(session: Session) -> Path | None:
    """Where the SQLite database's name locks live: `<database file>.locks`; None for an in-memory database."""
    url = session.get_bind().url
    database = url.database or ""
    if url.query.get("uri") == "true":
        database = database.removeprefix("file:")
    if database in ("", ":memory:") or url.query.get("mode") == "memory":
        return None
    return Path(database).with_name(Path(database).name + ".locks")


@dataclass
class _NameFileLock:
    """A lock name's file, locked (`flock`, shared or exclusive) by this descriptor: processes sharing one SQLite file
    wait for each other as threads of one process do (after `_NamedLocks`, which orders this process's own).

    One file per name (its hash), so distinct names never wait for each other; the last holder to release removes it,
    so per-document names leave nothing behind. A waiter that then gets the lock on the removed file opens the new
    one."""

    path: Path
    fd: int

    @staticmethod
    def path_of(directory: Path, name: str) -> Path:
        return directory / f"{hashlib.sha256(name.encode()).hexdigest()[:32]}.lock"

    @classmethod
    def acquire(cls, directory: Path, name: str, *, shared: bool) -> _NameFileLock:
        directory.mkdir(mode=0o700, exist_ok=True)
        path = cls.path_of(directory, name)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
                if _same_file(fd, path):
                    return cls(path, fd)
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)  # locked a file the last holder removed meanwhile: lock the one at `path` now

    @classmethod
    def held(cls, directory: Path, name: str) -> bool:
        """Whether another descriptor (this process's or another's) holds the name's file, asked without waiting;
        a file no one holds is removed, as its last holder's release would."""
        path = cls.path_of(directory, name)
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return True
        cls(path, fd).release()
        return False

    def release(self) -> None:
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # taken only when no one else holds the file
            self.path.unlink(missing_ok=True)
        except OSError:
            pass  # held (shared) by another, which removes the file then; or already removed
        finally:
            os.close(self.fd)


def _same_file(fd: int, path: Path) -> bool:
    """Whether the open file `fd` is still the one at `path`."""
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    opened = os.fstat(fd)
    return (named.st_dev, named.st_ino) == (opened.st_dev, opened.st_ino)


@dataclass
class _NamedLock:
    users: int = 0  # holders and waiters: the name is forgotten when none is left
    readers: int = 0  # shared holders
    writer: bool = False  # held exclusively


class _NamedLocks:
    """Process read-write locks by name, each kept only while someone holds or waits for it. A shared request waits
    only for an exclusive holder, never for an exclusive waiter: one holding it shared and waiting for another lock
    cannot deadlock with an exclusive waiter (PostgreSQL detects such cycles; a process lock would hang)."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._locks: dict[str, _NamedLock] = {}
        forksafe.renewed(self, _NamedLocks._forked)

    def _forked(self) -> None:
        """In a forked child: no name held or waited for (the parent's transactions are not the child's)."""
        self._changed, self._locks = threading.Condition(), {}

    def acquire(self, name: str, *, shared: bool = False) -> None:
        with self._changed:
            lock = self._locks.setdefault(name, _NamedLock())
            lock.users += 1
            self._changed.wait_for(lambda: not lock.writer and (shared or not lock.readers))
            if shared:
                lock.readers += 1
            else:
                lock.writer = True

    def held_exclusively(self, name: str) -> bool:
        """Whether a transaction of this process holds `name` exclusively now."""
        with self._changed:
            lock = self._locks.get(name)
            return lock is not None and lock.writer

    def release(self, name: str) -> None:
        with self._changed:
            lock = self._locks[name]
            if lock.writer:  # held exclusively: by the releasing transaction alone
                lock.writer = False
            else:
                lock.readers -= 1
            lock.users -= 1
            if not lock.users:
                del self._locks[name]
            self._changed.notify_all()


_PROCESS_LOCKS = _NamedLocks()


@event.listens_for(Session, "after_transaction_end")
def _release_process_locks(session: Session, transaction: SessionTransaction) -> None:
    if transaction.parent is None and _HELD in session.info:  # not a savepoint (an attachment refused) ending
        for name, file_lock in session.info.pop(_HELD).items():
            if file_lock is not None:
                file_lock.release()
            _PROCESS_LOCKS.release(name)


def _sqlite_pragmas(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
    """WAL lets the API read while the worker thread writes; foreign keys on.

    No ANALYZE, nor `PRAGMA optimize`: without statistics the planner picks an index by its shape alone, and the
    indexes are shaped so that the hot queries' plans are right so (migration 0015). Measured with bench/sqlite_plans.py
    (50,000 documents, 200,000 ledger events): a full ANALYZE kept those plans' seeks (find_duplicate then sorts its
    few rows), and made key rotation's `document_ids_with_keys` read the whole documents table in id order (9 ms -> 52
    ms a department)."""
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


@lru_cache
def get_session_factory(url: str) -> sessionmaker[Session]:
    """A session factory bound to the engine for `url`."""
    return sessionmaker(bind=get_engine(url), expire_on_commit=False)


@contextmanager
def unit_of_work(url: str) -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    session = get_session_factory(url)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
