"""The blob store's marker missing (its directory missing, or an empty mount point) is its volume not mounted: every
blob operation says so (`Unavailable`, an outage to wait out), none creates or writes anything (an upload written
there would be hidden, then lost, once the volume is mounted over it), and none takes the empty place for the truth
(no original, no placeholder map, nothing to remove). Only a process's start creates the directory and its marker,
and only for a fresh deployment (no document in the database) or a store written before markers."""

from __future__ import annotations

import errno
import logging
import os
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


@pytest.mark.parametrize("operation", OPERATIONS)
def test_every_blob_operation_on_a_directory_without_the_marker_is_an_outage_and_writes_nothing(
    tmp_path: Path, operation: str
) -> None:
    """An empty mount point (or the disk below it) is a directory too: it was taken for the store, and an upload
    written into it was hidden, then lost, once the volume was mounted over it."""
    mount_point = tmp_path / "blobs"
    mount_point.mkdir()
    with pytest.raises(Unavailable) as caught:
        OPERATIONS[operation](mount_point)
    assert unavailable_dependency(caught.value) == "blob volume"
    assert list(mount_point.iterdir()) == []


def test_with_the_directory_there_a_missing_file_is_no_outage(tmp_path: Path) -> None:
    """What the callers tell apart: the document's own file gone (its run fails at once) from the volume away."""
    blobs.open_store(tmp_path / "blobs", documents_exist=False)
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
    blobs.open_store(blob_dir, documents_exist=False)
    blobs.write_sealed(blob_dir, DOCUMENT, KEY, b"the upload")
    checked = blobs._path

    def then_unmounted(directory: Path, document_id: str) -> Path:
        path = checked(directory, document_id)
        directory.rename(tmp_path / "elsewhere")
        return path

    monkeypatch.setattr(blobs, "_path", then_unmounted)
    with pytest.raises(Unavailable):
        blobs.read_sealed(blob_dir, DOCUMENT, KEY)


def test_a_fresh_deployment_gets_its_directory_and_marker_private_and_writes_then_go_there(tmp_path: Path) -> None:
    blob_dir = tmp_path / "data" / "blobs"
    blobs.open_store(blob_dir, documents_exist=False)
    marker = (blob_dir / blobs.MARKER).stat().st_ino
    blobs.open_store(blob_dir, documents_exist=True)  # a restart, documents stored since: the same store
    assert (blob_dir / blobs.MARKER).stat().st_ino == marker
    assert stat.S_IMODE(blob_dir.stat().st_mode) & 0o077 == 0
    assert stat.S_IMODE((blob_dir / blobs.MARKER).stat().st_mode) == 0o600
    blobs.write_sealed(blob_dir, DOCUMENT, KEY, b"the upload")
    assert blobs.read_sealed(blob_dir, DOCUMENT, KEY) == b"the upload"
    assert list(blobs.stale_files(blob_dir, -60)) == [(DOCUMENT, blob_dir / f"{DOCUMENT}.bin", False)]  # not the marker


def test_an_empty_fresh_volume_mounted_at_the_directory_is_marked(tmp_path: Path) -> None:
    """No document in the database: an empty directory (a new volume, perhaps with a file of its own) is the store."""
    blob_dir = tmp_path / "blobs"
    (blob_dir / "lost+found").mkdir(parents=True)
    blobs.open_store(blob_dir, documents_exist=False)
    blobs.write_sealed(blob_dir, DOCUMENT, KEY, b"the upload")
    assert blobs.read_sealed(blob_dir, DOCUMENT, KEY) == b"the upload"


def test_a_start_with_documents_in_the_database_and_no_directory_creates_nothing_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The store existed (the database holds documents): its directory missing is its volume not mounted, and the
    start created it on the disk below, where the uploads that followed were lost once the volume was mounted."""
    blob_dir = tmp_path / "data" / "blobs"
    with caplog.at_level(logging.ERROR, logger="core.blobs"):
        blobs.open_store(blob_dir, documents_exist=True)
    assert list(tmp_path.iterdir()) == []
    assert [record.getMessage() for record in caplog.records] == [
        f"the blob volume is not mounted: {blob_dir} has no .govrag-blobs marker though the database holds documents; "
        "uploads and reveals are a 503 and ingestion runs wait until it is mounted there. If it is mounted there: a "
        "store from before the marker is marked at the next start; one holding no file of govrag's (every document "
        f"deleted) is the store once an empty {blob_dir / '.govrag-blobs'} is created"]
    with pytest.raises(Unavailable):
        blobs.write_sealed(blob_dir, DOCUMENT, KEY, b"the upload")
    assert list(tmp_path.iterdir()) == []


def test_a_start_with_documents_in_the_database_and_an_empty_mount_point_writes_nothing(tmp_path: Path) -> None:
    mount_point = tmp_path / "blobs"
    mount_point.mkdir()
    blobs.open_store(mount_point, documents_exist=True)
    with pytest.raises(Unavailable):
        blobs.write_sealed(mount_point, DOCUMENT, KEY, b"the upload")
    assert list(mount_point.iterdir()) == []


def test_the_volume_mounted_after_the_start_is_used_without_a_restart(tmp_path: Path) -> None:
    """What a run waits for: the store (its marker with it) back where it belongs."""
    blob_dir, volume = tmp_path / "blobs", tmp_path / "volume"
    blobs.open_store(volume, documents_exist=False)
    blobs.write_sealed(volume, DOCUMENT, KEY, b"the upload")
    blobs.open_store(blob_dir, documents_exist=True)
    with pytest.raises(Unavailable):
        blobs.read_sealed(blob_dir, DOCUMENT, KEY)
    volume.rename(blob_dir)
    assert blobs.read_sealed(blob_dir, DOCUMENT, KEY) == b"the upload"


def test_a_store_from_before_the_marker_is_marked_at_the_start_and_used(tmp_path: Path) -> None:
    """A deployment upgraded to the marker: its directory holds files of ours, so it is the store."""
    blob_dir = tmp_path / "blobs"
    blobs.open_store(blob_dir, documents_exist=False)
    blobs.write_sealed(blob_dir, DOCUMENT, KEY, b"the upload")
    (blob_dir / blobs.MARKER).unlink()  # as every store was before markers
    blobs.open_store(blob_dir, documents_exist=True)
    assert (blob_dir / blobs.MARKER).is_file()
    assert blobs.read_sealed(blob_dir, DOCUMENT, KEY) == b"the upload"


def test_a_store_from_before_the_marker_whose_documents_were_all_deleted_is_refused_with_the_way_out(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Mounted, but holding no file of ours (every document deleted, its files purged): no start can tell it from an
    empty mount point. The error said the volume was not mounted, and how to mark only a store holding files."""
    blob_dir = tmp_path / "blobs"
    blob_dir.mkdir()
    with caplog.at_level(logging.ERROR, logger="core.blobs"):
        blobs.open_store(blob_dir, documents_exist=True)
    [said] = [record.getMessage() for record in caplog.records]
    marker = blob_dir / blobs.MARKER
    assert said.endswith(f"holding no file of govrag's (every document deleted) is the store once an empty {marker} "
                         "is created")
    marker.touch()  # as the error says
    blobs.write_sealed(blob_dir, DOCUMENT, KEY, b"the upload")
    assert blobs.read_sealed(blob_dir, DOCUMENT, KEY) == b"the upload"


def test_a_marker_written_at_the_same_moment_by_another_process_stays_and_no_other_file_is_left(
    tmp_path: Path
) -> None:
    """The API and a worker starting together on a fresh deployment: the first marker written is the store's."""
    blobs.open_store(tmp_path, documents_exist=False)
    first = (tmp_path / blobs.MARKER).stat().st_ino
    blobs._write_marker(tmp_path)  # the other process, which found no marker a moment ago
    assert (tmp_path / blobs.MARKER).stat().st_ino == first
    assert [path.name for path in tmp_path.iterdir()] == [blobs.MARKER]


def test_a_fresh_store_on_a_filesystem_without_hard_links_is_marked_and_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Object store mounts and SMB shares (a shared volume the docs allow at /data) refuse hard links: the marker was
    linked into place, so every start of a fresh deployment there failed with an OSError (the API never served)."""

    def refused(*_args: object, **_kwargs: object) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")  # as such a filesystem answers link(2)

    monkeypatch.setattr(os, "link", refused)
    blob_dir = tmp_path / "blobs"
    blobs.open_store(blob_dir, documents_exist=False)
    assert [path.name for path in blob_dir.iterdir()] == [blobs.MARKER]
    assert stat.S_IMODE((blob_dir / blobs.MARKER).stat().st_mode) == 0o600
    blobs.write_sealed(blob_dir, DOCUMENT, KEY, b"the upload")
    assert blobs.read_sealed(blob_dir, DOCUMENT, KEY) == b"the upload"
