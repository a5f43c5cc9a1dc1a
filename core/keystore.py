"""Envelope key hierarchy: master key → department keys → per-document data keys.

Department and document keys are stored only wrapped (encrypted) in `wrapped_keys`.
Deleting a document's key row crypto-shreds everything sealed under it.
"""

from __future__ import annotations

import threading

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from core import crypto
from core.cache import BoundedCache
from core.models import WrappedKey
from core.settings import Settings

MASTER_VERSION = 1
_CACHE_SIZE = 4096


class KeyStore:
    """Creates, unwraps and destroys keys; caches unwrapped document keys in memory."""

    def __init__(self, master_key: bytes) -> None:
        self._master = master_key
        self._cache: BoundedCache[tuple[str, str], bytes] = BoundedCache(_CACHE_SIZE)

    @classmethod
    def from_settings(cls, settings: Settings) -> KeyStore:
        """Master key from env, else from the key file (generated only outside production)."""
        if settings.master_key is not None:
            return cls(crypto.decode_master_key(settings.master_key.get_secret_value()))
        key_file = settings.resolved_master_key_file
        return cls(crypto.load_or_create_master_key_file(key_file, create=not settings.is_production))

    def create_department_key(self, *, session: Session, department: str) -> None:
        """Create the department's key when the department is created."""
        key = crypto.new_key()
        wrapped = crypto.seal(self._master, key, _context("department", department, 1))
        session.add(WrappedKey(kind="department", owner=department, version=1,
                               parent_version=MASTER_VERSION, wrapped=wrapped))
        session.flush()
        self._remember(("department", f"{department}:v1"), key)

    def department_key(self, *, session: Session, department: str, version: int | None = None) -> bytes:
        """The department's key (the latest version, or a given one), unwrapped by the master key."""
        row = (_latest(session, "department", department) if version is None
               else _version(session, "department", department, version))
        if row is None:
            raise LookupError("department has no key")
        ref = ("department", f"{department}:v{row.version}")
        cached = self._cached(ref)
        if cached is not None:
            return cached
        key = crypto.open_sealed(self._master, row.wrapped, _context("department", department, row.version))
        self._remember(ref, key)
        return key

    def create_document_key(self, *, session: Session, department: str, document_id: str) -> bytes:
        """A new data key for a document, stored wrapped by the department key."""
        key = crypto.new_key()
        parent_row = _latest(session, "department", department)
        if parent_row is None:
            raise LookupError("department has no key")
        parent = self.department_key(session=session, department=department, version=parent_row.version)
        wrapped = crypto.seal(parent, key, _context("document", document_id, 1))
        session.add(WrappedKey(kind="document", owner=document_id, version=1, parent_version=parent_row.version,
                               wrapped=wrapped))
        session.flush()
        self._remember(("document", document_id), key)
        return key

    def document_key(self, *, session: Session, department: str, document_id: str) -> bytes | None:
        """The document's data key, or None once it has been shredded."""
        cached = self._cached(("document", document_id))
        if cached is not None:
            return cached
        row = _latest(session, "document", document_id)
        if row is None:
            return None
        key = self._unwrap_document(session, department, row)
        self._remember(("document", document_id), key)
        return key

    def _unwrap_document(self, session: Session, department: str, row: WrappedKey) -> bytes:
        """Open a document key row with the department key version that wrapped it."""
        parent = self.department_key(session=session, department=department, version=row.parent_version)
        return crypto.open_sealed(parent, row.wrapped, _context("document", row.owner, row.version))

    # --- rotation: new department key, document keys rewrapped (data keys unchanged: nothing re-encrypted) ---

    def begin_rotation(self, *, session: Session, department: str) -> int:
        """Add a new department key version; documents stay readable through their old wrapping."""
        current = _latest(session, "department", department)
        if current is None:
            raise LookupError("department has no key")
        version = current.version + 1
        key = crypto.new_key()
        session.add(WrappedKey(kind="department", owner=department, version=version, parent_version=MASTER_VERSION,
                               wrapped=crypto.seal(self._master, key, _context("department", department, version))))
        session.flush()
        self._remember(("department", f"{department}:v{version}"), key)
        return version

    def rewrap_documents(self, *, session: Session, department: str, document_ids: list[str],
                         version: int) -> int:
        """Wrap these documents' keys under department key `version`; returns how many were rewrapped."""
        parent = self.department_key(session=session, department=department, version=version)
        done = 0
        for document_id in document_ids:
            row = _latest(session, "document", document_id)
            if row is None or row.parent_version >= version:
                continue  # shredded meanwhile, or already under the new key
            data_key = self._unwrap_document(session, department, row)
            session.add(WrappedKey(kind="document", owner=document_id, version=row.version + 1,
                                   parent_version=version,
                                   wrapped=crypto.seal(parent, data_key,
                                                       _context("document", document_id, row.version + 1))))
            done += 1
        session.flush()
        return done

    def finish_rotation(self, *, session: Session, department: str, version: int,
                        document_ids: list[str]) -> None:
        """Drop the superseded wrappings and the old department key versions (after every rewrap committed)."""
        for document_id in document_ids:
            latest = _latest(session, "document", document_id)
            if latest is not None:
                session.execute(delete(WrappedKey).where(WrappedKey.kind == "document",
                                                         WrappedKey.owner == document_id,
                                                         WrappedKey.version < latest.version))
        session.execute(delete(WrappedKey).where(WrappedKey.kind == "department", WrappedKey.owner == department,
                                                 WrappedKey.version < version))
        self._cache.discard_where(lambda ref: ref[0] == "department" and ref[1].startswith(f"{department}:v")
                                  and ref[1] != f"{department}:v{version}")

    def shred_document_key(self, *, session: Session, document_id: str) -> None:
        """Destroy the document's key: its ciphertexts become unreadable for good."""
        session.execute(delete(WrappedKey).where(WrappedKey.kind == "document", WrappedKey.owner == document_id))
        self._cache.pop(("document", document_id))

    def _cached(self, ref: tuple[str, str]) -> bytes | None:
        return self._cache.get(ref)

    def _remember(self, ref: tuple[str, str], key: bytes) -> None:
        self._cache.put(ref, key)


def _latest(session: Session, kind: str, owner: str) -> WrappedKey | None:
    query = select(WrappedKey).where(WrappedKey.kind == kind, WrappedKey.owner == owner)
    return session.scalars(query.order_by(WrappedKey.version.desc()).limit(1)).first()


def _version(session: Session, kind: str, owner: str, version: int) -> WrappedKey | None:
    query = select(WrappedKey).where(WrappedKey.kind == kind, WrappedKey.owner == owner,
                                     WrappedKey.version == version)
    return session.scalars(query).first()


def _context(kind: str, owner: str, version: int) -> str:
    return f"govrag:{kind}:{owner}:v{version}"


_KEYSTORES: dict[str, KeyStore] = {}
_KEYSTORES_LOCK = threading.Lock()


def keystore_for(settings: Settings) -> KeyStore:
    """The process's key store for these settings' master key source."""
    source = (settings.master_key.get_secret_value() if settings.master_key is not None
              else str(settings.resolved_master_key_file.resolve()))
    with _KEYSTORES_LOCK:
        if source not in _KEYSTORES:
            _KEYSTORES[source] = KeyStore.from_settings(settings)
        return _KEYSTORES[source]
