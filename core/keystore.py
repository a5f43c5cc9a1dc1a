"""Envelope key hierarchy: master key → department keys → per-document data keys.

Department and document keys are stored only wrapped (encrypted) in `wrapped_keys`.
Deleting a document's key row crypto-shreds everything sealed under it.
The master key is versioned (a keyring): a department row's `parent_version` names the master version that
wraps it; new keys are wrapped under the newest version. Each master version in use also seals a fixed text (its
verifier, `MasterKeyVerifier`): a wrong master key is told by it before any key is stored under it (`check_masters`).

A rotation retires a key version only once no transaction can still wrap under it: wrapping takes the parent's lock
(`transaction_lock`) shared before reading the version, the steps that look for rows under old versions before
retiring take it exclusively. Reading takes no lock: a reader whose key row's version was retired after it read the
row reads the row that replaced it (`document_key`).

A shredded key must stay shredded: a department rotation rewraps document keys (a new row each) under the department's
lock held exclusively, and a transaction shredding document keys holds that lock shared from before its first write
until it ends (`lock_department_keys`), so the two run one after the other: a rewrap never reads a row a shredding
has deleted but not committed, nor commits a row that a shredding then misses.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import SecretStr
from sqlalchemy import delete, exists, func, select, union_all
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, aliased

from core import crypto, forksafe
from core.cache import BoundedCache
from core.db import is_postgres, transaction_lock, unit_of_work
from core.error_pickling import UnpickledAsRaised
from core.errors import (
    MasterKeyFileMissing,
    MasterKeyFileUnreadable,
    MasterKeyRefused,
    MasterKeyVersionMissing,
)
from core.models import Document, MasterKeyVerifier, WrappedKey
from core.settings import DEFAULT_KEY_CACHE_SECONDS, Settings

logger = logging.getLogger(__name__)

_CACHE_SIZE = 4096
# Rows wrapped directly by the master key: department keys and the audit checkpoint key.
MASTER_WRAPPED_KINDS = ("department", "checkpoint")
_CHECKPOINT_OWNER = "audit"
_CHECKPOINT_HKDF_INFO = b"govrag audit checkpoint v1"
_VERIFIER = b"govrag master key verifier"  # what each master version in use seals in its MasterKeyVerifier row
MASTER_CHECK_SECONDS = 5.0  # how long readiness trusts its last look at whether the master key opens the stored keys
_MASTER_LOCK = "keys:master"  # shared: wrapping under the newest master version; exclusive: finding rows to rewrap


class KeyState(enum.Enum):
    """What `KeyStore.document_key` found for a document."""

    opened = "opened"  # its key row opened: `DocumentKey.key` holds its data key
    missing = "missing"  # no key row: shredded (deleted, rejected), or lost (a key store restored from an older backup)
    # Its key row does not open under its department key, which opened (the row altered in the database): that
    # document alone is lost, not its department.
    unreadable = "unreadable"


@dataclass(frozen=True)
class DocumentKey:
    """A document's data key lookup: `key` is set exactly when `state` is `opened` (never in its repr)."""

    state: KeyState
    key: bytes | None = field(default=None, repr=False)


class DepartmentKeyUnreadable(UnpickledAsRaised, crypto.DecryptionError):
    """A department's key row does not open under the master key, which opens the other stored keys (the row altered
    in the database): no document's damage, every document of the department is unreadable. The message names the
    department, never key material."""

    def __init__(self, department: str,
                 why: str = "does not open under the master key (its key row was altered in the database)") -> None:
        super().__init__(f"the key of department {department} {why}: restore that row from a backup")


class DepartmentKeyMissing(DepartmentKeyUnreadable):
    """A department with no key row at all (deleted in the database, or a database restored without it): every
    document of the department is unreadable and no upload can be keyed, as when its row is altered; said the same
    way (the API's 503 `department_key_unreadable`, the CLI's exit 2), naming what is wrong."""

    def __init__(self, department: str) -> None:
        super().__init__(department, "is missing from the database (its key row was deleted)")


class KeyStore:
    """Creates, unwraps and destroys keys; caches unwrapped keys in memory for at most `cache_seconds` (by `clock`),
    so a key shredded or retired by another process leaves this one within that time. The master keyring read from
    `key_file` is held the same way: read again once it is `cache_seconds` old, or as soon as the file changed (a
    master rotation elsewhere); one given (GOVRAG_MASTER_KEY) is kept, as the process's environment keeps it anyway.
    Dropping one drops a reference only: Python's `bytes` cannot be safely zeroed (a caller may still hold it), so its
    memory is freed, not wiped."""

    def __init__(self, masters: Mapping[int, bytes], *, key_file: Path | None = None,
                 cache_seconds: float = DEFAULT_KEY_CACHE_SECONDS, clock: Callable[[], float] = time.monotonic) -> None:
        self._key_file = key_file
        self._masters = dict(masters) if key_file is None else {}  # the keyring given, kept
        # The key file's keyring, under the file's stamp as it was read (one entry: a new stamp evicts the old one).
        self._key_file_ring: BoundedCache[_Stamp | None, dict[int, bytes]] = BoundedCache(1, max_age=cache_seconds,
                                                                                         clock=clock)
        if key_file is not None:
            self._key_file_ring.put(_stamp(key_file), dict(masters))
        self._cache: BoundedCache[tuple[str, str], bytes] = BoundedCache(_CACHE_SIZE, max_age=cache_seconds,
                                                                          clock=clock)

    @classmethod
    def from_settings(cls, settings: Settings, *, sealed: MasterSealed | None = None) -> KeyStore:
        """Master keyring from env, else from the key file (generated only outside production, and never while the
        database holds what a master key sealed: MasterKeyFileMissing, the one that sealed it is lost). What it holds
        is `sealed` when the caller read it, else read in a session of its own."""
        if settings.master_key is not None:
            return cls(crypto.parse_master_keyring(settings.master_key.get_secret_value()),
                       cache_seconds=settings.key_cache_seconds)
        key_file = settings.resolved_master_key_file
        if not key_file.exists():
            if sealed is None:
                with unit_of_work(settings.resolved_database_url) as session:
                    sealed = MasterSealed.read(session)
            if not sealed.empty:
                raise MasterKeyFileMissing(key_file, only_verifiers=not sealed.rows)
            return cls(crypto.load_or_create_master_keyring(key_file, create=not settings.is_production),
                       key_file=key_file, cache_seconds=settings.key_cache_seconds)
        return cls(_read_key_file(key_file), key_file=key_file, cache_seconds=settings.key_cache_seconds)

    def create_department_key(self, *, session: Session, department: str) -> None:
        """Create the department's key when the department is created."""
        key = crypto.new_key()
        self._wrap_under_master(session, "department", department, 1, key)
        self._remember(("department", f"{department}:v1"), key)

    def department_key(self, *, session: Session, department: str, version: int | None = None) -> bytes:
        """The department's key (the latest version, or a given one), unwrapped by the master key. One that does not
        open is DepartmentKeyUnreadable (its row altered), or MasterKeyRefused when the master key is not that
        version's or the keyring lacks it (the key file replaced under a running process): every department's is
        unreadable then. No key row
        is DepartmentKeyMissing; `version` alone gone (retired by a rotation since it was read) a LookupError."""
        row = _department_row(session, department, version)
        ref = ("department", f"{department}:v{row.version}")
        cached = self._cached(ref)
        if cached is not None:
            return cached
        row, master = self._master_wrapping(session, row)
        try:
            key = crypto.open_sealed(master, row.wrapped, _context("department", department, row.version))
        except crypto.DecryptionError as exc:
            if not _master_opens(session, master, row.parent_version):  # a key file replaced by another key
                raise MasterKeyRefused(None, self._key_file) from None
            raise DepartmentKeyUnreadable(department) from exc
        self._remember(ref, key)
        return key

    def create_document_key(self, *, session: Session, department: str, document_id: str) -> bytes:
        """A new data key for a document, stored wrapped by the department key."""
        key = crypto.new_key()
        lock_department_keys(session, department)  # before reading the version
        parent_row = _department_row(session, department)
        parent = self.department_key(session=session, department=department, version=parent_row.version)
        wrapped = crypto.seal(parent, key, _context("document", document_id, 1))
        session.add(WrappedKey(kind="document", owner=document_id, version=1, parent_version=parent_row.version,
                               wrapped=wrapped))
        session.flush()
        self._remember(("document", document_id), key)
        return key

    def document_key(self, *, session: Session, department: str, document_id: str) -> DocumentKey:
        """The document's data key, or why there is none: `missing` once it has been shredded, `unreadable` when its
        key row does not open (each caller decides what that document's loss means; a department key that does not
        open is DepartmentKeyUnreadable)."""
        cached = self._cached(("document", document_id))
        if cached is not None:
            return DocumentKey(KeyState.opened, cached)
        try:
            found = self._open_latest(session, department, document_id)
        except LookupError:  # the version that wrapped the row read was retired since (a rotation finishing)
            found = self._open_latest(session, department, document_id)  # the row that replaced it
        if found.key is not None:
            self._remember(("document", document_id), found.key)
        return found

    def _open_latest(self, session: Session, department: str, document_id: str) -> DocumentKey:
        """The document's newest key row, unwrapped."""
        row = _latest(session, "document", document_id)
        if row is None:
            return DocumentKey(KeyState.missing)
        key = self._unwrap_document(session, department, row)
        return DocumentKey(KeyState.unreadable) if key is None else DocumentKey(KeyState.opened, key)

    def _unwrap_document(self, session: Session, department: str, row: WrappedKey) -> bytes | None:
        """Open a document key row with the department key version that wrapped it; None if the row does not open."""
        parent = self.department_key(session=session, department=department, version=row.parent_version)
        try:
            return crypto.open_sealed(parent, row.wrapped, _context("document", row.owner, row.version))
        except crypto.DecryptionError:
            return None

    # --- rotation: new department key, document keys rewrapped (data keys unchanged: nothing re-encrypted) ---

    def begin_rotation(self, *, session: Session, department: str) -> int:
        """Add a new department key version; documents stay readable through their old wrapping. A lock of its own
        (uploads do not wait for it), held before the newest version is read, makes a rotation begun meanwhile wait,
        then add the version after this one (both read the same newest version, and one failed adding it again).
        Every stored version is opened first: one that does not open (DepartmentKeyUnreadable) begins nothing, as
        its documents could not be rewrapped."""
        transaction_lock(session, f"keys:rotation:{department}")
        current = _department_row(session, department)
        stored = select(WrappedKey.version).where(WrappedKey.kind == "department", WrappedKey.owner == department)
        for old in session.scalars(stored).all():
            self.department_key(session=session, department=department, version=old)
        version = current.version + 1
        key = crypto.new_key()
        self._wrap_under_master(session, "department", department, version, key)
        self._remember(("department", f"{department}:v{version}"), key)
        return version

    def rewrap_documents(self, *, session: Session, department: str, document_ids: list[str],
                         version: int, unreadable: set[str]) -> int:
        """Wrap these documents' keys under department key `version`; returns how many were rewrapped. The
        department's lock, held exclusively before any row is read, waits for shreddings in flight (their keys are
        then found gone) and holds off those arriving until this transaction ends (they then delete the new rows too).
        A document whose key row no longer opens (altered in the database) is left as it is and its id added to
        `unreadable`: one document's damage need not stop a rotation.
        """
        transaction_lock(session, _department_lock(department))
        if _version(session, "department", department, version) is None:
            return 0  # retired by a rotation begun after this one that finished first: every key is under a newer one
        parent = self.department_key(session=session, department=department, version=version)
        done = 0
        for document_id in document_ids:
            row = _latest(session, "document", document_id)
            if row is None or row.parent_version >= version:
                continue  # shredded meanwhile, or already under the new key
            data_key = self._unwrap_document(session, department, row)
            if data_key is None:
                unreadable.add(document_id)
                continue
            session.add(WrappedKey(kind="document", owner=document_id, version=row.version + 1,
                                   parent_version=version,
                                   wrapped=crypto.seal(parent, data_key,
                                                       _context("document", document_id, row.version + 1))))
            done += 1
        session.flush()
        return done

    def finish_rotation(self, *, session: Session, department: str, version: int, unreadable: set[str]) -> int:
        """Drop the superseded wrappings and the old department key versions (after every rewrap committed); returns
        how many document keys were still under an old version and rewrapped here. The department's lock, held
        exclusively, waits for uploads that read an old version: their keys are rewrapped here, never lost; uploads
        arriving meanwhile wait, then wrap under `version`. Shreddings wait too (or are waited for), so the rows
        deleted here and the rows a shredding deletes are never each locked by the other. A key row left unreadable
        (`rewrap_documents`) goes with the other superseded wrappings: that document's key is then missing."""
        transaction_lock(session, _department_lock(department))
        late = self.rewrap_documents(session=session, department=department, version=version,
                                     document_ids=_documents_only_below(session, department, version),
                                     unreadable=unreadable)
        documents = select(Document.id).where(Document.department == department)
        session.execute(delete(WrappedKey).where(WrappedKey.kind == "document", WrappedKey.owner.in_(documents),
                                                 WrappedKey.parent_version < version))
        session.execute(delete(WrappedKey).where(WrappedKey.kind == "department", WrappedKey.owner == department,
                                                 WrappedKey.version < version))
        self._cache.discard_where(lambda ref: ref[0] == "department" and ref[1].startswith(f"{department}:v")
                                  and ref[1] != f"{department}:v{version}")
        return late

    # --- master rotation: a new master version, master-wrapped rows rewrapped in place, old versions retired ---

    def checkpoint_key(self, *, session: Session) -> bytes:
        """The audit checkpoint HMAC key: stored wrapped once the master has rotated, else derived from it."""
        cached = self._cached(("checkpoint", _CHECKPOINT_OWNER))
        if cached is not None:
            return cached
        row = _latest(session, "checkpoint", _CHECKPOINT_OWNER)
        if row is None:  # never rotated: the oldest master version is the original one
            masters = self._masters_now()
            key = crypto.derive_key(masters[min(masters)], _CHECKPOINT_HKDF_INFO)
        else:
            row, master = self._master_wrapping(session, row)
            key = crypto.open_sealed(master, row.wrapped, _context("checkpoint", _CHECKPOINT_OWNER, row.version))
        self._remember(("checkpoint", _CHECKPOINT_OWNER), key)
        return key

    def keep_checkpoint_key(self, *, session: Session) -> None:
        """Store the checkpoint key wrapped, so signatures made under the original master outlive it."""
        if _latest(session, "checkpoint", _CHECKPOINT_OWNER) is not None:
            return
        self._wrap_under_master(session, "checkpoint", _CHECKPOINT_OWNER, 1, self.checkpoint_key(session=session))

    def _wrap_under_master(self, session: Session, kind: str, owner: str, version: int, key: bytes) -> None:
        """Store `key` wrapped under the newest master version, read under the master lock held shared: a master
        rotation finds this row (and rewraps it) before it retires that version. That version's verifier is stored
        first if it has none, and must open under it."""
        transaction_lock(session, _MASTER_LOCK, shared=True)
        master_version, master = self._current_master()
        newest = _newest_master_version(session)
        if newest is not None and newest > master_version:  # a replica not given the version a rotation made current
            raise MasterKeyVersionMissing(newest, self._key_file, current=True)
        self._record_verifier(session, master_version, master)
        session.add(WrappedKey(kind=kind, owner=owner, version=version, parent_version=master_version,
                               wrapped=crypto.seal(master, key, _context(kind, owner, version))))
        session.flush()

    def check_masters(self, sealed: MasterSealed, *, session: Session, record: bool = False) -> None:
        """MasterKeyRefused unless this keyring opens what is `sealed` under each master version in use (a wrong key
        fails authentication), so a process never starts to serve keys it cannot open nor to wrap new ones the right key
        would not open, with no department key stored yet too. A version's key is right when its verifier opens, else
        when one of the keys it wraps does (the first, or another: the one that did not open was altered, its
        department alone unreadable, DepartmentKeyUnreadable where its key is used), never every process refused for
        one altered row. `session`: the one `sealed` was read in. `record`: the master lock held shared there since
        before the read (a rotation retiring a version, and its verifier, ran before or runs after); each version just
        opened without a verifier that opens gets one (a database from before verifiers, an altered verifier; with
        nothing sealed yet, the newest version's)."""
        # The keyring read after the rows: a master rotation beside this check writes its new version to the key file
        # before it rewraps any row under it, so a row read under that version finds it there (read before the rows,
        # the keyring could lack it: a false refusal mid-rotation).
        try:
            masters = self._masters_now()
        except MasterKeyFileMissing as missing:  # deleted since this key store read it
            raise MasterKeyFileMissing(missing.key_file, only_verifiers=not sealed.rows) from None
        firsts = {row.parent_version: row for row in sealed.rows}
        verified = {verifier.version for verifier in sealed.verifiers
                    if verifier.version in masters and _verifies(masters[verifier.version], verifier)}
        for version in sorted(firsts.keys() | {verifier.version for verifier in sealed.verifiers}):
            if version not in masters:
                raise MasterKeyVersionMissing(version, self._key_file)
            first = firsts.get(version)
            if version not in verified and not (first is not None and _opens(masters[version], first)
                                                or _any_opens(session, masters[version], version)):
                raise MasterKeyRefused(None, self._key_file, only_verifiers=not sealed.rows)
        if record:
            in_use = set(firsts) or ({max(masters)} if sealed.empty else set())
            for version in sorted(in_use - verified):
                self._record_verifier(session, version, masters[version])

    def _record_verifier(self, session: Session, version: int, master: bytes) -> None:
        """Store master `version`'s verifier unless one is (processes starting or wrapping at once: one is kept);
        MasterKeyRefused unless the one stored opens under `master` (another key of that version stored first) or a
        key `master` wraps does (the verifier altered in the database: stored again)."""
        fresh = crypto.seal(master, _VERIFIER, _verifier_context(version))
        insert = (postgresql.insert if is_postgres(session) else sqlite.insert)(MasterKeyVerifier).values(
            version=version, sealed=fresh)
        session.execute(insert.on_conflict_do_nothing(index_elements=[MasterKeyVerifier.version]))
        stored = session.scalars(select(MasterKeyVerifier).where(MasterKeyVerifier.version == version)).one()
        if _verifies(master, stored):
            return
        if not _any_opens(session, master, version):
            raise MasterKeyRefused(None, self._key_file, only_verifiers=_holds_only_verifiers(session))
        logger.warning("the master key verifier of version %d does not open while the keys under that version do "
                       "(its row was altered in the database): stored again", version)
        stored.sealed = fresh
        session.flush()

    def forget_master_verifiers(self, *, session: Session, version: int) -> None:
        """Drop the verifiers of every master version but `version`: in the transaction that found no row needs them
        (`retirable_master_versions`, its master lock held), as the versions are retired."""
        session.execute(delete(MasterKeyVerifier).where(MasterKeyVerifier.version != version))

    def master_rotation(self) -> contextlib.AbstractContextManager[None]:
        """Held for a whole master rotation: the key file's lock (`crypto.master_keyring_lock`), so two rotations
        never write the file from the same ring; keys from settings need none (nothing is written)."""
        return contextlib.nullcontext() if self._key_file is None else crypto.master_keyring_lock(self._key_file)

    def add_master_version(self) -> int:
        """A new master version: generated into the key file (inside `master_rotation`), or (keys from settings) the
        newest one given."""
        masters = self._masters_now()
        if self._key_file is None:
            if len(masters) < 2:
                raise LookupError("GOVRAG_MASTER_KEY holds one version: add the new key as 'v<N+1>:<base64>' "
                                  "next to the current one, deploy it everywhere, then rotate")
            return max(masters)
        version = max(masters) + 1
        crypto.write_master_keyring(self._key_file, {**masters, version: crypto.new_key()})
        return self._current_master()[0]

    def rewrap_under_master(self, *, session: Session, version: int, limit: int) -> int:
        """Rewrap up to `limit` master-wrapped rows still under another version (in place; key material unchanged).
        The master lock, held exclusively, waits for keys being wrapped under an older version: they are found."""
        transaction_lock(session, _MASTER_LOCK)
        master = self._master(version)
        self._record_verifier(session, version, master)
        rows = session.scalars(select(WrappedKey).where(WrappedKey.kind.in_(MASTER_WRAPPED_KINDS),
                                                        WrappedKey.parent_version != version)
                               .order_by(WrappedKey.id).limit(limit).with_for_update()).all()
        for row in rows:
            context = _context(row.kind, row.owner, row.version)
            try:
                key = crypto.open_sealed(self._master(row.parent_version), row.wrapped, context)
            except crypto.DecryptionError as exc:  # the keyring opened the stored keys (`check_masters`): row altered
                if row.kind != "department":
                    raise
                raise DepartmentKeyUnreadable(row.owner) from exc
            row.wrapped, row.parent_version = crypto.seal(master, key, context), version
        session.flush()
        return len(rows)

    def retirable_master_versions(self, *, session: Session, version: int) -> list[int]:
        """Every master version but `version`, once no row needs them (else RuntimeError). Checked under the master
        lock held exclusively, which the transaction keeps: no key is wrapped under an old version until it ends."""
        transaction_lock(session, _MASTER_LOCK)
        pending = session.scalars(select(WrappedKey.id).where(WrappedKey.kind.in_(MASTER_WRAPPED_KINDS),
                                                              WrappedKey.parent_version != version).limit(1)).first()
        if pending is not None:
            raise RuntimeError("rows are still wrapped under an old master version")
        return sorted(v for v in self._masters_now() if v != version)

    def retire_master_versions(self, *, session: Session, version: int) -> list[int]:
        """Drop every master version but `version` once no row needs them (from the key file; else the caller
        removes them from GOVRAG_MASTER_KEY). Returns the retired versions. Checked and written under the master
        lock held exclusively: no key is wrapped under a version as it is retired."""
        retired = self.retirable_master_versions(session=session, version=version)
        masters = self._masters_now()
        if self._key_file is not None and retired:
            crypto.write_master_keyring(self._key_file, {version: masters[version]})
            self._masters_now()
        return retired

    def _masters_now(self) -> dict[int, bytes]:
        """The keyring: the one given, else the key file's, read again once the one held is `cache_seconds` old or
        the file changed (a rotation elsewhere)."""
        if self._key_file is None:
            return self._masters
        stamp = _stamp(self._key_file)
        masters = self._key_file_ring.get(stamp)
        if masters is None:
            masters = _read_key_file(self._key_file)
            self._key_file_ring.put(stamp, masters)
        return masters

    def _master(self, version: int) -> bytes:
        """Master `version`'s key: MasterKeyVersionMissing when the keyring lacks it."""
        masters = self._masters_now()
        if version not in masters:
            raise MasterKeyVersionMissing(version, self._key_file)
        return masters[version]

    def _master_wrapping(self, session: Session, row: WrappedKey) -> tuple[WrappedKey, bytes]:
        """The master-wrapped `row` and its master version's key. A version the keyring lacks may have been retired by
        a master rotation since the row was read: it retires one only once every row under it is rewrapped and
        committed, so the row is read again (`expire`: the identity map would keep the columns read before; the
        caller has no change pending on a master-wrapped row). A new statement sees that commit on PostgreSQL (READ
        COMMITTED) and on SQLite in a session that has written nothing (no read transaction is held between
        statements; one that has written holds the write lock, which the rotation's commit would have waited for),
        but not inside a SQLite savepoint begun before any write: there the row is still the old one, the master key's
        refusal, which a worker waits out. Still under a version the keyring lacks, MasterKeyVersionMissing (the key
        file replaced by one without it). Gone meanwhile (a department rotation retiring that version of the key):
        LookupError, as `_department_row`."""
        masters = self._masters_now()
        if row.parent_version in masters:
            return row, masters[row.parent_version]
        kind, owner, version = row.kind, row.owner, row.version
        session.expire(row)  # its columns loaded afresh by the query below
        fresh = _version(session, kind, owner, version)
        if fresh is None:
            raise LookupError(f"{kind} key version {version} was retired")
        return fresh, self._master(fresh.parent_version)

    def _current_master(self) -> tuple[int, bytes]:
        masters = self._masters_now()
        version = max(masters)
        return version, masters[version]

    def shred_document_key(self, *, session: Session, document_id: str) -> None:
        """Destroy the document's key: its ciphertexts become unreadable for good. The caller holds its
        department's lock (`lock_department_keys`) from before its transaction's first write."""
        session.execute(delete(WrappedKey).where(WrappedKey.kind == "document", WrappedKey.owner == document_id))
        self._cache.pop(("document", document_id))

    def _cached(self, ref: tuple[str, str]) -> bytes | None:
        return self._cache.get(ref)

    def _remember(self, ref: tuple[str, str], key: bytes) -> None:
        self._cache.put(ref, key)


# Whether the Document row a query reads still has its data key: a key row of it, at any version (a rotation keeps two
# for a while; shredding deletes them all). Existence only, in the query: nothing is read per row or unwrapped, so a
# row whose key would not open (tampered, its department key lost) is found like any other.
HAS_DOCUMENT_KEY = exists().where(WrappedKey.kind == "document", WrappedKey.owner == Document.id)


def _opens(master: bytes, row: WrappedKey) -> bool:
    """Whether the master-wrapped `row` opens under `master`."""
    try:
        crypto.open_sealed(master, row.wrapped, _context(row.kind, row.owner, row.version))
    except crypto.DecryptionError:
        return False
    return True


def _verifies(master: bytes, verifier: MasterKeyVerifier) -> bool:
    """Whether `verifier` opens under `master`, its version's key."""
    try:
        crypto.open_sealed(master, verifier.sealed, _verifier_context(verifier.version))
    except crypto.DecryptionError:
        return False
    return True


def _master_opens(session: Session, master: bytes, version: int) -> bool:
    """Whether `master` is master `version`'s right key: its verifier opens, or (none stored that opens) a key it
    wraps does. A department key row that does not open under a right one was altered; under a wrong one (the key file
    replaced under a running process), nothing does."""
    verifier = session.get(MasterKeyVerifier, version)
    return (verifier is not None and _verifies(master, verifier)) or _any_opens(session, master, version)


def _any_opens(session: Session, master: bytes, version: int) -> bool:
    """Whether any master-wrapped row under master `version` opens under `master` (each row read once at most)."""
    rows = session.scalars(select(WrappedKey).where(WrappedKey.kind.in_(MASTER_WRAPPED_KINDS),
                                                    WrappedKey.parent_version == version))
    return any(_opens(master, row) for row in rows)


def _latest(session: Session, kind: str, owner: str) -> WrappedKey | None:
    query = select(WrappedKey).where(WrappedKey.kind == kind, WrappedKey.owner == owner)
    return session.scalars(query.order_by(WrappedKey.version.desc()).limit(1)).first()


def _version(session: Session, kind: str, owner: str, version: int) -> WrappedKey | None:
    query = select(WrappedKey).where(WrappedKey.kind == kind, WrappedKey.owner == owner,
                                     WrappedKey.version == version)
    return session.scalars(query).first()


def _department_row(session: Session, department: str, version: int | None = None) -> WrappedKey:
    """The department's key row, its newest or `version`: DepartmentKeyMissing when the department has none at all;
    LookupError when `version` alone is gone (retired by a rotation since it was read: the caller reads again)."""
    row = (_latest(session, "department", department) if version is None
           else _version(session, "department", department, version))
    if row is not None:
        return row
    if version is None or _latest(session, "department", department) is None:
        raise DepartmentKeyMissing(department)
    raise LookupError(f"department key version {version} was retired")


def _documents_only_below(session: Session, department: str, version: int) -> list[str]:
    """The department's documents whose keys are wrapped only under department key versions older than `version`."""
    newer = aliased(WrappedKey)
    rewrapped = exists().where(newer.kind == "document", newer.owner == WrappedKey.owner,
                               newer.parent_version >= version)
    query = select(WrappedKey.owner).where(
        WrappedKey.kind == "document", WrappedKey.parent_version < version, ~rewrapped,
        WrappedKey.owner.in_(select(Document.id).where(Document.department == department)))
    return list(session.scalars(query.distinct()))


def lock_department_keys(session: Session, department: str) -> None:
    """Hold the department's key lock shared until the transaction ends: before wrapping a document key under its
    newest version (a rotation retiring the older ones waits for it), and before shredding any of its document keys
    (and before the transaction's first write: a rotation holding it exclusively writes key rows the shredding
    deletes). A rotation's rewrap then never wraps a key again as it is shredded."""
    transaction_lock(session, _department_lock(department), shared=True)


def _department_lock(department: str) -> str:
    """Shared: wrapping under the department's newest key version, or shredding document keys; exclusive: wrapping
    document keys under a new version, retiring the older ones."""
    return f"keys:department:{department}"


@dataclass(frozen=True)
class MasterSealed:
    """What is sealed under each master version in use: the first master-wrapped row (a department or checkpoint
    key), the verifier."""

    rows: Sequence[WrappedKey]
    verifiers: Sequence[MasterKeyVerifier]

    @classmethod
    def read(cls, session: Session) -> MasterSealed:
        """Read in `session`: two queries."""
        first = (select(func.min(WrappedKey.id)).where(WrappedKey.kind.in_(MASTER_WRAPPED_KINDS))
                 .group_by(WrappedKey.parent_version))
        return cls(rows=session.scalars(select(WrappedKey).where(WrappedKey.id.in_(first))).all(),
                   verifiers=session.scalars(select(MasterKeyVerifier)).all())

    @property
    def empty(self) -> bool:
        """Nothing sealed under a master key yet: no department made, no start recorded its key."""
        return not self.rows and not self.verifiers


def _holds_only_verifiers(session: Session) -> bool:
    """Whether nothing but verifiers is sealed under a master key: no department (nor checkpoint) key stored."""
    return session.scalar(select(exists().where(WrappedKey.kind.in_(MASTER_WRAPPED_KINDS)))) is not True


def _newest_master_version(session: Session) -> int | None:
    """The newest master version anything stored is sealed under: a key it wraps, or its verifier."""
    versions = union_all(select(WrappedKey.parent_version.label("version"))
                         .where(WrappedKey.kind.in_(MASTER_WRAPPED_KINDS)),
                         select(MasterKeyVerifier.version)).subquery()
    return session.scalar(select(func.max(versions.c.version)))


_Stamp = tuple[int, int, int]


def _stamp(path: Path | None) -> _Stamp | None:
    """What changes when the key file is replaced or rewritten."""
    if path is None:
        return None
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return None
    return info.st_ino, info.st_mtime_ns, info.st_size


def _read_key_file(path: Path) -> dict[int, bytes]:
    """The key file's keyring. Deleted: MasterKeyFileMissing (what it sealed is not served from memory until a restart
    refuses); unreadable or garbled: MasterKeyFileUnreadable, raised outside the handler so that no error holding the
    file's bytes (a UnicodeDecodeError's `object`) rides along as its context."""
    try:
        return crypto.parse_master_keyring(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        reason = None
    except OSError as exc:  # no permission, a folder: the system's reason, without the path its message names
        reason = exc.strerror or type(exc).__name__
    except ValueError:  # not text (UnicodeDecodeError), not base64, not 32 bytes, empty: never quoted
        reason = "it does not hold `v<N>:<base64>` entries"
    if reason is None:
        raise MasterKeyFileMissing(path)
    raise MasterKeyFileUnreadable(path, reason)


def _context(kind: str, owner: str, version: int) -> str:
    return f"govrag:{kind}:{owner}:v{version}"


def _verifier_context(version: int) -> str:
    """The associated data of master `version`'s verifier: it names the version, so no verifier passes for another."""
    return f"govrag:master-verifier:v{version}"


# The process's key stores, by master key source (GOVRAG_MASTER_KEY, masked in any repr, else the key file's path) and
# cache age: what makes one behave otherwise than another.
_KEYSTORES: dict[tuple[SecretStr | str, float], KeyStore] = {}
_KEYSTORES_LOCK = forksafe.lock()


def keystore_for(settings: Settings, *, sealed: MasterSealed | None = None) -> KeyStore:
    """The process's key store for these settings' master key source and key cache age (`KeyStore.from_settings` if
    it is new)."""
    source = (settings.master_key if settings.master_key is not None
              else str(settings.resolved_master_key_file.resolve()))
    key = (source, settings.key_cache_seconds)
    with _KEYSTORES_LOCK:
        if key not in _KEYSTORES:
            _KEYSTORES[key] = KeyStore.from_settings(settings, sealed=sealed)
        return _KEYSTORES[key]


def require_master_opens(settings: Settings, *, first_start: bool = False) -> None:
    """A start's check, before it serves, works or writes (`govrag serve`, `govrag worker`, the CLI commands that open
    the key store): MasterKeyRefused unless `settings`' master keyring opens what its database holds sealed under
    each master version in use. With nothing sealed yet there is nothing to check: a process that serves or works
    (`first_start`) makes its key store (the key file made for it where one may be); a command makes none. One
    session; nothing is written to the database: a start stores its verifiers once every other check passed
    (`record_master_verifiers`), a command never (on a database from before verifiers, `govrag audit verify` reads)."""
    _check_masters(settings, first_start=first_start, record=False)


def record_master_verifiers(settings: Settings) -> None:
    """The last step of a start that serves or works (`govrag serve`, `govrag worker`), once every other check passed:
    `require_master_opens` again, then the verifiers of the versions it opened stored where missing; with nothing
    sealed yet, its newest version's, so a later start with another key is refused. A start a later check refused has
    stored none: its key, perhaps the wrong one, is not the one every later start must have."""
    _check_masters(settings, first_start=True, record=True)


def _check_masters(settings: Settings, *, first_start: bool, record: bool) -> None:
    """`KeyStore.check_masters` on what the database holds sealed, read in one session under the master lock."""
    with unit_of_work(settings.resolved_database_url) as session:
        transaction_lock(session, _MASTER_LOCK, shared=True)  # before the read: see `check_masters`
        sealed = MasterSealed.read(session)
        if sealed.empty and not first_start:
            return
        keystore_for(settings, sealed=sealed).check_masters(sealed, session=session, record=record)


def master_key_refusal(settings: Settings) -> MasterKeyRefused | None:
    """What `require_master_opens` would refuse `settings`' master key with, or None when it opens what is stored;
    nothing is written, nor logged (readiness logs it, with the key file's path, when its answer changes). Readiness's
    question, asked at most every MASTER_CHECK_SECONDS: two queries and an unwrap per master version in use."""
    try:
        with unit_of_work(settings.resolved_database_url) as session:
            sealed = MasterSealed.read(session)
            if not sealed.empty:
                keystore_for(settings, sealed=sealed).check_masters(sealed, session=session)
    except MasterKeyRefused as refused:
        return refused
    return None
