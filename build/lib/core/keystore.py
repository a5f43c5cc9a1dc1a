"""Envelope key hierarchy: master key → department keys → per-document data keys.

Department and document keys are stored only wrapped (encrypted) in `wrapped_keys`.
Deleting a document's key row crypto-shreds everything sealed under it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from core import crypto
from core.models import WrappedKey
from core.settings import Settings

MASTER_VERSION = 1
_CACHE_SIZE = 4096


class KeyStore:
    """Creates, unwraps and destroys keys; caches unwrapped document keys in memory."""

    def __init__(self, master_key: bytes) -> None:
        self._master = master_key
        self._cache: OrderedDict[tuple[str, str], bytes] = OrderedDict()
        self._lock = threading.Lock()

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
        self._remember(("department", department), key)

    def department_key(self, *, session: Session, department: str) -> bytes:
        """The department's key, unwrapped by the master key."""
        cached = self._cached(("department", department))
        if cached is not None:
            return cached
        row = _latest(session, "department", department)
        if row is None:
            raise LookupError("department has no key")
        key = crypto.open_sealed(self._master, row.wrapped, _context("department", department, row.version))
        self._remember(("department", department), key)
        return key

    def create_document_key(self, *, session: Session, department: str, document_id: str) -> bytes:
        """A new data key for a document, stored wrapped by the department key."""
        key = crypto.new_key()
        parent = self.department_key(session=session, department=department)
        wrapped = crypto.seal(parent, key, _context("document", document_id, 1))
        session.add(WrappedKey(kind="document", owner=document_id, version=1, parent_version=1, wrapped=wrapped))
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
        parent = self.department_key(session=session, department=department)
        key = crypto.open_sealed(parent, row.wrapped, _context("document", document_id, row.version))
        self._remember(("document", document_id), key)
        return key

    def shred_document_key(self, *, session: Session, document_id: str) -> None:
        """Destroy the document's key: its ciphertexts become unreadable for good."""
        session.execute(delete(WrappedKey).where(WrappedKey.kind == "document", WrappedKey.owner == document_id))
        with self._lock:
            self._cache.pop(("document", document_id), None)

    def _cached(self, ref: tuple[str, str]) -> bytes | None:
        with self._lock:
            key = self._cache.get(ref)
            if key is not None:
                self._cache.move_to_end(ref)
            return key

    def _remember(self, ref: tuple[str, str], key: bytes) -> None:
        with self._lock:
            self._cache[ref] = key
            self._cache.move_to_end(ref)
            while len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)


def _latest(session: Session, kind: str, owner: str) -> WrappedKey | None:
    query = select(WrappedKey).where(WrappedKey.kind == kind, WrappedKey.owner == owner)
    return session.scalars(query.order_by(WrappedKey.version.desc()).limit(1)).first()


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
