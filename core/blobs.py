"""Encrypted raw uploads on disk, one file per document, sealed under the document key.

The store is a directory holding a marker file (`MARKER`, empty) beside what it stores: a directory without
it is not the store, whether missing (its volume not mounted) or an empty mount point, or the disk below one. Only a
process's start (`open_at_start`: the API, `govrag worker`, the in-process `govrag ingest`) creates the directory and
its marker, and only for a fresh deployment (no document in the database: the store never held anything) or for a
store written before markers (it holds files of ours). With documents in the database and no marker, the volume is
not mounted: that start writes nothing, logs an error and goes on. From then on every operation here without the
marker raises `Unavailable("blob volume")` (`_mounted`), waited out like any other outage: nothing is written where
the volume should be (a file there would be hidden, then lost, once it is mounted), and nothing read or listed there
is taken for the truth (no file is not "no original", "no placeholder map" or "nothing to remove")."""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy import select

from core import crypto
from core.db import unit_of_work
from core.errors import Unavailable
from core.models import Document

logger = logging.getLogger(__name__)

MARKER = ".govrag-blobs"  # in the store's directory, empty: this is govrag's blob store (see the module docstring)

# What this module writes: `<document id>.bin` (the upload), `<document id>.<generation>.pii` (the placeholder map
# of one index generation; `<document id>.pii` is generation 0's, written before generations), each through a
# `.tmp` sibling renamed into place.
_STORED_NAME = re.compile(r"(?P<document_id>[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})"
                          r"\.(?:bin|(?:[1-9][0-9]*\.)?pii)(?P<unfinished>\.tmp)?")
_MAP_GENERATION = re.compile(r"\.(?P<generation>[1-9][0-9]*)\.pii")


def open_at_start(blob_dir: Path, database_url: str) -> bool:
    """At a process's start only, after its schema check: make the blob store ready, unless the database shows that
    it existed and its volume is not mounted (`open_store`). Whether the store is there."""
    with unit_of_work(database_url) as session:
        documents_exist = session.scalar(select(Document.id).limit(1)) is not None
    return open_store(blob_dir, documents_exist=documents_exist)


def open_store(blob_dir: Path, *, documents_exist: bool) -> bool:
    """Write the store's marker where the store is known to be: a directory of ours without one (a store from before
    markers), or, with no document in the database (every document, a retired one too, keeps its row), any directory
    (created if missing, with the data directory above it). Otherwise the volume is not mounted: write nothing
    (it would land on the disk below the mount point) and say so; a server goes on (queries need no blobs). Whether
    the store is there."""
    if (blob_dir / MARKER).is_file():
        return True
    if _holds_stored_files(blob_dir) or not documents_exist:
        blob_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        _write_marker(blob_dir)
        return True
    logger.error("the blob volume is not mounted: %s has no %s marker though the database holds documents; uploads "
                 "and reveals are a 503 and ingestion runs wait until it is mounted there. If it is mounted there: a "
                 "store from before the marker is marked at the next start; one holding no file of govrag's (every "
                 "document deleted) is the store once an empty %s is created", blob_dir, MARKER, blob_dir / MARKER)
    return False


def _holds_stored_files(blob_dir: Path) -> bool:
    """Whether the directory holds a file this module wrote (a store from before markers)."""
    try:
        with os.scandir(blob_dir) as entries:
            return any(_STORED_NAME.fullmatch(entry.name) is not None for entry in entries)
    except FileNotFoundError:
        return False


def _write_marker(blob_dir: Path) -> None:
    """Create the marker, empty: only its presence is read. Created in place, never replaced (no hard link, which
    object store mounts and SMB shares refuse), so of processes starting at the same moment (the API beside a
    worker) the first one's stays and the others find it."""
    (blob_dir / MARKER).touch(mode=0o600)


def _mounted(blob_dir: Path) -> Path:
    """`blob_dir`, which must hold the store's marker: without it, its volume is not mounted (`Unavailable`)."""
    if not (blob_dir / MARKER).is_file():
        raise Unavailable("blob volume")
    return blob_dir


def _path(blob_dir: Path, document_id: str) -> Path:
    return _mounted(blob_dir) / f"{document_id}.bin"


def write_sealed(blob_dir: Path, document_id: str, key: bytes, data: bytes) -> None:
    """Store the raw upload encrypted; written to a temp file then renamed, so never half-written."""
    _write_sealed(_path(blob_dir, document_id), key, data, f"govrag:raw:{document_id}")


def _write_sealed(target: Path, key: bytes, data: bytes, context: str) -> None:
    temp = target.with_name(target.name + ".tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(crypto.seal(key, data, context))
    temp.replace(target)


def read_sealed(blob_dir: Path, document_id: str, key: bytes) -> bytes:
    """The raw upload, decrypted; FileNotFoundError when the document's file is missing (the store is there,
    looked at again after the read: a volume unmounted just before it is `Unavailable`, not a lost file)."""
    try:
        sealed = _path(blob_dir, document_id).read_bytes()
    except FileNotFoundError:
        _mounted(blob_dir)
        raise
    return crypto.open_sealed(key, sealed, f"govrag:raw:{document_id}")


def has_original(blob_dir: Path, document_id: str) -> bool:
    """Whether the document's sealed upload is stored (a refused attachment never had one of its own)."""
    return _path(blob_dir, document_id).is_file()


def remove(blob_dir: Path, document_id: str) -> None:
    """Delete the stored upload and every sealed placeholder map of the document. With the store's marker missing
    (its volume not mounted) nothing can be removed, and the files would be back with the volume: `Unavailable`."""
    _path(blob_dir, document_id).unlink(missing_ok=True)
    for _, path in _maps(blob_dir, document_id):
        path.unlink(missing_ok=True)


# issue 3: reversible pseudonymisation — placeholder → original, sealed under the same document key


def _map_path(blob_dir: Path, document_id: str, generation: int) -> Path:
    return _mounted(blob_dir) / (f"{document_id}.{generation}.pii" if generation else f"{document_id}.pii")


def _maps(blob_dir: Path, document_id: str) -> list[tuple[int, Path]]:
    """(generation, path) of each placeholder map the document has."""
    blob_dir = _mounted(blob_dir)
    found = [(0, path) for path in blob_dir.glob(f"{document_id}.pii")]
    for path in blob_dir.glob(f"{document_id}.*.pii"):
        numbered = _MAP_GENERATION.fullmatch(path.name[len(document_id):])
        if numbered is not None:
            found.append((int(numbered["generation"]), path))
    return found


def write_sealed_map(blob_dir: Path, document_id: str, key: bytes, data: bytes, generation: int) -> None:
    """Store the placeholder map of one index generation of a document, encrypted (temp file, then rename)."""
    _write_sealed(_map_path(blob_dir, document_id, generation), key, data, f"govrag:pii-map:{document_id}")


def remove_superseded_maps(blob_dir: Path, document_id: str, *, served: int | None, through: int,
                           keep_numbering: bool = True) -> None:
    """Delete the document's placeholder maps of generations up to `through` (as `retrieval.store.superseded_points`
    selects its points) but the one its next run numbers from: the served one, or while it serves none (failed or
    quarantined, it may run again) and `keep_numbering` (its department still keeps maps), the newest one. That one
    goes at the end of a later run that ends ready (serving its own map, if it keeps one), or with the document
    (`remove`); reveal reads only the served generation's map."""
    maps = [(generation, path) for generation, path in _maps(blob_dir, document_id) if generation <= through]
    newest = max((generation for generation, _ in maps), default=None) if keep_numbering else None
    kept = served if served is not None else newest
    for generation, path in maps:
        if generation != kept:
            path.unlink(missing_ok=True)


def remove_map(blob_dir: Path, document_id: str, generation: int) -> None:
    """Delete the placeholder map of one index generation of the document, if it has one."""
    _map_path(blob_dir, document_id, generation).unlink(missing_ok=True)


def read_sealed_map(blob_dir: Path, document_id: str, key: bytes, generation: int) -> bytes | None:
    """The placeholder map of one index generation, decrypted; None when that generation kept none (or it was
    removed meanwhile)."""
    try:
        sealed = _map_path(blob_dir, document_id, generation).read_bytes()
    except FileNotFoundError:
        return None
    return crypto.open_sealed(key, sealed, f"govrag:pii-map:{document_id}")


def read_newest_sealed_map(blob_dir: Path, document_id: str, key: bytes, below: int) -> bytes | None:
    """The placeholder map of the newest generation below `below` still stored, decrypted; None when none is."""
    for generation in sorted((generation for generation, _ in _maps(blob_dir, document_id) if generation < below),
                             reverse=True):
        found = read_sealed_map(blob_dir, document_id, key, generation)
        if found is not None:
            return found
    return None


def stale_files(blob_dir: Path, older_than_seconds: float) -> Iterator[tuple[str, Path, bool]]:
    """(document id, path, whether it is an unfinished write) for each file this module wrote that has not been
    modified for `older_than_seconds`; other files in the directory (the marker among them) are never listed. With
    the store's marker missing, `Unavailable` (the orphan sweep waits for the volume) rather than nothing to list."""
    cutoff = time.time() - older_than_seconds
    with os.scandir(_mounted(blob_dir)) as entries:
        for entry in entries:
            match = _STORED_NAME.fullmatch(entry.name)
            if match is None or not entry.is_file(follow_symlinks=False):
                continue
            try:
                modified = entry.stat(follow_symlinks=False).st_mtime
            except FileNotFoundError:  # removed meanwhile (a purge)
                continue
            if modified < cutoff:
                yield match["document_id"], Path(entry.path), match["unfinished"] is not None
