"""The blob directory missing is its volume not mounted: every blob operation says so (`Unavailable`, an outage to
wait out), none creates the directory (an upload written there would be hidden, then lost, once the volume is
mounted over it), and none takes the empty place for the truth (no original, no placeholder map, nothing to remove).
Only a process's start creates it."""

from __future__ import annotations

import stat
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from core import blobs
from core.errors import Unavailable, unavailable_dependency

KEY = bytes(32)
DOCUMENT = str(uuid.uuid4())

OPERATIONS: dict[str, Callable[[Path], object]] = {
    "write_sealed": lambda blob_dir: blobs.write_sealed(blob_dir, DOCUMENT, KEY, b"the upload"),
    "write_sealed_map": lambda blob_dir: blobs.write_sealed_map(blob_dir, DOCUMENT, KEY, b"{}", 1),
    "read_sealed": lambda blob_dir: blobs.read_sealed(blob_dir, DOCUMENT, KEY),
    "read_sealed_map": lambda blob_dir: blobs.read_sealed_map(blob_dir, DOCUMENT, KEY, 1),
    "read_newest_sealed_map": lambda blob_dir: blobs.read_newest_sealed_map(blob_dir, DOCUMENT, KEY, below=2),
    "has_original": lambda blob_dir: blobs.has_original(blob_dir, DOCUMENT),
    "remove": lambda blob_dir: blobs.remove(blob_dir, DOCUMENT),
    "remove_superseded_maps": lambda blob_dir: blobs.remove_superseded_maps(blob_dir, DOCUMENT, served=None, through=1),
    "remove_map": lambda blob_dir: blobs.remove_map(blob_dir, DOCUMENT, 1),
    "stale_files": lambda blob_dir: list(blobs.stale_files(blob_dir, 0)),
}


@pytest.mark.parametrize("operation", OPERATIONS)
def test_every_blob_operation_with_the_directory_missing_is_an_outage_and_creates_nothing(
    tmp_path: Path, operation: str
) -> None:
    unmounted = tmp_path / "data" / "blobs"
    with pytest.raises(Unavailable) as caught:
        OPERATIONS[operation](unmounted)
    assert unavailable_dependency(caught.value) == "blob volume"
    assert list(tmp_path.iterdir()) == []  # neither the blob directory nor the data directory above it


def test_with_the_directory_there_a_missing_file_is_no_outage(tmp_path: Path) -> None:
    """What the callers tell apart: the document's own file gone (its run fails at once) from the volume away."""
    blobs.create_dir(tmp_path / "blobs")
    with pytest.raises(FileNotFoundError):
        blobs.read_sealed(tmp_path / "blobs", DOCUMENT, KEY)
    assert not blobs.has_original(tmp_path / "blobs", DOCUMENT)
    assert blobs.read_sealed_map(tmp_path / "blobs", DOCUMENT, KEY, 1) is None


def test_a_volume_unmounted_between_the_check_and_the_read_is_an_outage_not_a_lost_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The directory is looked at before the read: a volume unmounted just after that made the read's
    FileNotFoundError look like the document's own file lost (its run failed at once, "upload it again")."""
    blob_dir = tmp_path / "blobs"
    blobs.create_dir(blob_dir)
    blobs.write_sealed(blob_dir, DOCUMENT, KEY, b"the upload")
    checked = blobs._path

    def then_unmounted(directory: Path, document_id: str) -> Path:
        path = checked(directory, document_id)
        directory.rename(tmp_path / "elsewhere")
        return path

    monkeypatch.setattr(blobs, "_path", then_unmounted)
    with pytest.raises(Unavailable):
        blobs.read_sealed(blob_dir, DOCUMENT, KEY)


def test_the_start_up_creates_the_directory_private_and_writes_then_go_there(tmp_path: Path) -> None:
    blob_dir = tmp_path / "data" / "blobs"
    blobs.create_dir(blob_dir)
    blobs.create_dir(blob_dir)  # a restart: it is there already
    assert stat.S_IMODE(blob_dir.stat().st_mode) & 0o077 == 0
    blobs.write_sealed(blob_dir, DOCUMENT, KEY, b"the upload")
    assert blobs.read_sealed(blob_dir, DOCUMENT, KEY) == b"the upload"
