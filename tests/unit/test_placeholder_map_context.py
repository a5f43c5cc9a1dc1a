"""A placeholder map opens only as the map of its own document and run (department, index generation). Its associated
data named the document only, and the document key is the same for every generation: an earlier generation's map
copied over (or restored from a backup onto) a later one's file opened and was revealed. Maps sealed before 0021 open
under that context for the generations the database records as sealed so (`Document.maps_unbound_through`), and for
no later one; a map sealed since never opens under it."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import pytest

from core import blobs, crypto

KEY = crypto.new_key()
DOCUMENT = str(uuid.uuid4())
DEPARTMENT = "hr"


@pytest.fixture
def blob_dir(tmp_path: Path) -> Path:
    """A fresh store."""
    directory = tmp_path / "blobs"
    blobs.open_store(directory, documents_exist=False)
    return directory


def _file(blob_dir: Path, generation: int, document_id: str = DOCUMENT) -> Path:
    return blob_dir / f"{document_id}.{generation}.pii"


def _read(blob_dir: Path, generation: int, *, unbound_through: int = 0) -> bytes | None:
    return blobs.read_sealed_map(blob_dir, DOCUMENT, KEY, generation, department=DEPARTMENT,
                                 unbound_through=unbound_through)


def test_a_map_opens_as_its_own_generations(blob_dir: Path) -> None:
    blobs.write_sealed_map(blob_dir, DOCUMENT, KEY, b'{"first": 1}', 1, department=DEPARTMENT)
    blobs.write_sealed_map(blob_dir, DOCUMENT, KEY, b'{"second": 2}', 2, department=DEPARTMENT)
    assert _read(blob_dir, 1) == b'{"first": 1}'
    assert _read(blob_dir, 2) == b'{"second": 2}'
    assert blobs.read_newest_sealed_map(blob_dir, DOCUMENT, KEY, below=3, department=DEPARTMENT,
                                        unbound_through=0) == b'{"second": 2}'


def test_an_earlier_generations_map_copied_over_a_later_ones_does_not_open(blob_dir: Path) -> None:
    blobs.write_sealed_map(blob_dir, DOCUMENT, KEY, b'{"first": 1}', 1, department=DEPARTMENT)
    blobs.write_sealed_map(blob_dir, DOCUMENT, KEY, b'{"second": 2}', 2, department=DEPARTMENT)
    shutil.copyfile(_file(blob_dir, 1), _file(blob_dir, 2))
    with pytest.raises(crypto.DecryptionError):
        _read(blob_dir, 2)
    with pytest.raises(crypto.DecryptionError):  # as the map a re-index numbers from
        blobs.read_newest_sealed_map(blob_dir, DOCUMENT, KEY, below=3, department=DEPARTMENT, unbound_through=0)


def test_another_documents_map_copied_over_this_ones_does_not_open(blob_dir: Path) -> None:
    other = str(uuid.uuid4())
    blobs.write_sealed_map(blob_dir, other, KEY, b'{"theirs": 1}', 1, department=DEPARTMENT)
    shutil.copyfile(_file(blob_dir, 1, other), _file(blob_dir, 1))
    with pytest.raises(crypto.DecryptionError):
        _read(blob_dir, 1)


def test_a_map_sealed_for_another_department_does_not_open(blob_dir: Path) -> None:
    blobs.write_sealed_map(blob_dir, DOCUMENT, KEY, b'{"first": 1}', 1, department="finance")
    with pytest.raises(crypto.DecryptionError):
        _read(blob_dir, 1)


def _seal_as_before_0021(blob_dir: Path, generation: int, data: bytes) -> None:
    """A map as the release before 0021 sealed it: its associated data named the document only."""
    _file(blob_dir, generation).write_bytes(crypto.seal(KEY, data, f"govrag:pii-map:{DOCUMENT}"))


def test_a_map_sealed_before_0021_opens_for_its_generation(blob_dir: Path) -> None:
    _seal_as_before_0021(blob_dir, 1, b'{"first": 1}')
    _seal_as_before_0021(blob_dir, 2, b'{"second": 2}')
    assert _read(blob_dir, 1, unbound_through=2) == b'{"first": 1}'
    assert blobs.read_newest_sealed_map(blob_dir, DOCUMENT, KEY, below=3, department=DEPARTMENT,
                                        unbound_through=2) == b'{"second": 2}'


def test_a_map_sealed_before_0021_copied_over_a_later_generations_does_not_open(blob_dir: Path) -> None:
    """The old context binds no generation: only the database says which generations may open under it."""
    _seal_as_before_0021(blob_dir, 1, b'{"first": 1}')
    shutil.copyfile(_file(blob_dir, 1), _file(blob_dir, 2))
    with pytest.raises(crypto.DecryptionError):
        _read(blob_dir, 2, unbound_through=1)


def test_a_map_sealed_since_0021_never_opens_under_the_context_before_it(blob_dir: Path) -> None:
    """No fallback: a map of a later generation copied onto one the database records as sealed before 0021 is opened
    under the old context only, and that does not open it."""
    blobs.write_sealed_map(blob_dir, DOCUMENT, KEY, b'{"first": 1}', 1, department=DEPARTMENT)
    with pytest.raises(crypto.DecryptionError):
        _read(blob_dir, 1, unbound_through=1)
