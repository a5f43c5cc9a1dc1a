"""Encrypted raw uploads on disk, one file per document, sealed under the document key."""

from __future__ import annotations

import os
from pathlib import Path

from core import crypto


def _path(blob_dir: Path, document_id: str) -> Path:
    return blob_dir / f"{document_id}.bin"


def write_sealed(blob_dir: Path, document_id: str, key: bytes, data: bytes) -> None:
    """Store the raw upload encrypted; written to a temp file then renamed, so never half-written."""
    blob_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    target = _path(blob_dir, document_id)
    temp = target.with_suffix(".tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(crypto.seal(key, data, f"govrag:raw:{document_id}"))
    temp.replace(target)


def read_sealed(blob_dir: Path, document_id: str, key: bytes) -> bytes:
    """The raw upload, decrypted."""
    return crypto.open_sealed(key, _path(blob_dir, document_id).read_bytes(), f"govrag:raw:{document_id}")


def remove(blob_dir: Path, document_id: str) -> None:
    """Delete the stored upload, if present."""
    _path(blob_dir, document_id).unlink(missing_ok=True)
