"""Encrypted raw uploads on disk, one file per document, sealed under the document key."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

from core import crypto

# What this module writes: `<document id>.bin` (the upload), `<document id>.pii` (its placeholder map), each
# through a `.tmp` sibling renamed into place.
_STORED_NAME = re.compile(r"(?P<document_id>[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})"
                          r"\.(?:bin|pii)(?P<unfinished>\.tmp)?")


def _path(blob_dir: Path, document_id: str) -> Path:
    return blob_dir / f"{document_id}.bin"


def write_sealed(blob_dir: Path, document_id: str, key: bytes, data: bytes) -> None:
    """Store the raw upload encrypted; written to a temp file then renamed, so never half-written."""
    _write_sealed(_path(blob_dir, document_id), key, data, f"govrag:raw:{document_id}")


def _write_sealed(target: Path, key: bytes, data: bytes, context: str) -> None:
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    temp = target.with_name(target.name + ".tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(crypto.seal(key, data, context))
    temp.replace(target)


def read_sealed(blob_dir: Path, document_id: str, key: bytes) -> bytes:
    """The raw upload, decrypted."""
    return crypto.open_sealed(key, _path(blob_dir, document_id).read_bytes(), f"govrag:raw:{document_id}")


def remove(blob_dir: Path, document_id: str) -> None:
    """Delete the stored upload and the document's sealed placeholder map, if present."""
    _path(blob_dir, document_id).unlink(missing_ok=True)
    remove_map(blob_dir, document_id)


# issue 3: reversible pseudonymisation — placeholder → original, sealed under the same document key


def _map_path(blob_dir: Path, document_id: str) -> Path:
    return blob_dir / f"{document_id}.pii"


def write_sealed_map(blob_dir: Path, document_id: str, key: bytes, data: bytes) -> None:
    """Store a document's placeholder map encrypted (temp file, then rename)."""
    _write_sealed(_map_path(blob_dir, document_id), key, data, f"govrag:pii-map:{document_id}")


def remove_map(blob_dir: Path, document_id: str) -> None:
    """Delete the document's sealed placeholder map, if present."""
    _map_path(blob_dir, document_id).unlink(missing_ok=True)


def read_sealed_map(blob_dir: Path, document_id: str, key: bytes) -> bytes | None:
    """The placeholder map, decrypted; None when the document kept none."""
    path = _map_path(blob_dir, document_id)
    if not path.exists():
        return None
    return crypto.open_sealed(key, path.read_bytes(), f"govrag:pii-map:{document_id}")


def stale_files(blob_dir: Path, older_than_seconds: float) -> Iterator[tuple[str, Path, bool]]:
    """(document id, path, whether it is an unfinished write) for each file this module wrote that has not been
    modified for `older_than_seconds`; other files in the directory are not ours and are never listed."""
    cutoff = time.time() - older_than_seconds
    try:
        entries = os.scandir(blob_dir)
    except FileNotFoundError:
        return
    with entries:
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
