"""The blob store's marker missing (its directory missing, or an empty mount point) is its volume not mounted: every
blob operation says so (`Unavailable`, an outage to wait out), none creates or writes anything (an upload written
there would be hidden, then lost, once the volume is mounted over it), and none takes the empty place for the truth
(no original, no placeholder map, nothing to remove). Only a process's start creates the directory and its marker,
and only for a fresh deployment (no document in the database) or a store written before markers.

The marker holds the store's id and the database records it: a store with another id mounted there (another
deployment's volume, a restored copy belonging to another database) is refused the same way, nothing written into it
(on the embedded SQLite and on PostgreSQL). While the database records no id, a store holding files of documents it
does not know is refused too, at a start or at the first use of a volume mounted after it: the orphan sweep would
delete them, and it sweeps only a store checked against the database."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import stat
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from sqlalchemy import create_engine, delete, select, text, update

from authz import service as authz_service
from core import blobs, migrate
from core.db import unit_of_work
from core.errors import Unavailable, unavailable_dependency
from core.keystore import keystore_for
from core.models import BlobStore, Document, DocumentStatus
from core.settings import Settings
from ingestion import quarantine
from ingestion import service as ingestion_service
from ingestion.purge import sweep_orphan_files
from ingestion.schemas import Classification
from tests.support.file_permissions import permission_bits_bind

KEY = bytes(32)
DOCUMENT = str(uuid.uuid4())

OPERATIONS: dict[str, Callable[[Path], object]] = {
    "write_sealed": lambda blob_dir: blobs.write_sealed(blob_dir, DOCUMENT, KEY, b"the upload"),
    "write_sealed_map": lambda blob_dir: blobs.write_sealed_map(blob_dir, DOCUMENT, KEY, b"{}", 1, department="hr"),
    "read_sealed": lambda blob_dir: blobs.read_sealed(blob_dir, DOCUMENT, KEY),
    "read_sealed_map": lambda blob_dir: blobs.read_sealed_map(blob_dir, DOCUMENT, KEY, 1, department="hr",
                                                              unbound_through=0),
    "read_newest_sealed_map": lambda blob_dir: blobs.read_newest_sealed_map(blob_dir, DOCUMENT, KEY, below=2,
                                                                            department="hr", unbound_through=0),
    "has_original": lambda blob_dir: blobs.has_original(blob_dir, DOCUMENT),
    "remove": lambda blob_dir: blobs.remove(blob_dir, DOCUMENT),
    "remove_superseded_maps": lambda blob_dir: blobs.remove_superseded_maps(blob_dir, DOCUMENT, served=None, through=1),
    "remove_map": lambda blob_dir: blobs.remove_map(blob_dir, DOCUMENT, 1),
    "stale_files": lambda blob_dir: list(blobs.stale_files(blob_dir, 0)),
}


def _said(caplog: pytest.LogCaptureFixture) -> list[str]:
    """What this module logged (a migration run in the test logs too, once logging is configured at INFO)."""
    return [record.getMessage() for record in caplog.records if record.name == "core.blobs"]


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
    assert blobs.read_sealed_map(tmp_path / "blobs", DOCUMENT, KEY, 1, department="hr", unbound_through=0) is None


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
    assert _said(caplog) == [
        f"the blob volume is not mounted: {blob_dir} has no .govrag-blobs marker though the database holds documents; "
        "uploads and reveals are a 503 and ingestion runs wait until it is mounted there. If it is mounted there: a "
        "store from before the marker holding files of this database's documents is marked at the next start; one "
        f"holding no file of govrag's (every document deleted) is the store once an empty {blob_dir / '.govrag-blobs'} "
        "is created"]
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


def test_a_store_from_before_the_marker_whose_documents_were_all_deleted_is_refused_with_the_way_out(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Mounted, but holding no file of ours (every document deleted, its files purged): no start can tell it from an
    empty mount point. The error said the volume was not mounted, and how to mark only a store holding files."""
    blob_dir = tmp_path / "blobs"
    blob_dir.mkdir()
    with caplog.at_level(logging.ERROR, logger="core.blobs"):
        blobs.open_store(blob_dir, documents_exist=True)
    [said] = _said(caplog)
    marker = blob_dir / blobs.MARKER
    assert said.endswith(f"holding no file of govrag's (every document deleted) is the store once an empty {marker} "
                         "is created")
    marker.touch()  # as the error says
    blobs.write_sealed(blob_dir, DOCUMENT, KEY, b"the upload")
    assert blobs.read_sealed(blob_dir, DOCUMENT, KEY) == b"the upload"


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


def _migrated(kind: str, tmp_path: Path, make_pg_database: Callable[[], str], name: str = "govrag") -> str:
    url = f"sqlite:///{tmp_path / f'{name}.db'}" if kind == "sqlite" else make_pg_database()
    migrate.upgrade(url)
    return url


def _recorded(url: str) -> str | None:
    """The id of the blob store the database records."""
    with unit_of_work(url) as session:
        return session.scalar(select(BlobStore.store_id))


def _marked(blob_dir: Path) -> str:
    return (blob_dir / blobs.MARKER).read_text().strip()


def _files(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in directory.iterdir()}


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_a_fresh_deployment_gets_a_store_id_in_its_marker_and_its_database_and_a_restart_opens_it(
        kind: str, tmp_path: Path, make_pg_database: Callable[[], str]) -> None:
    url = _migrated(kind, tmp_path, make_pg_database)
    blob_dir = tmp_path / "data" / "blobs"
    assert blobs.open_at_start(blob_dir, url)
    store_id = _marked(blob_dir)
    assert str(uuid.UUID(store_id, version=4)) == store_id == _recorded(url)
    assert stat.S_IMODE((blob_dir / blobs.MARKER).stat().st_mode) == 0o600
    marker = (blob_dir / blobs.MARKER).stat().st_ino
    blobs.write_sealed(blob_dir, DOCUMENT, KEY, b"the upload")
    assert blobs.open_at_start(blob_dir, url)  # a restart on the same store
    assert (blob_dir / blobs.MARKER).stat().st_ino == marker and _recorded(url) == store_id
    assert blobs.read_sealed(blob_dir, DOCUMENT, KEY) == b"the upload"


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_a_volume_of_another_deployment_is_refused_and_nothing_is_written_into_it(
        kind: str, tmp_path: Path, make_pg_database: Callable[[], str], caplog: pytest.LogCaptureFixture) -> None:
    """Any govrag store mounted at the blob path was taken as this deployment's: its uploads went into another
    deployment's volume, and every document of its own was "missing" there."""
    ours, theirs = _migrated(kind, tmp_path, make_pg_database, "ours"), _migrated(kind, tmp_path, make_pg_database,
                                                                                   "theirs")
    blob_dir, their_volume = tmp_path / "blobs", tmp_path / "their-volume"
    assert blobs.open_at_start(blob_dir, ours) and blobs.open_at_start(their_volume, theirs)
    blobs.write_sealed(their_volume, DOCUMENT, KEY, b"their upload")
    our_id, their_id = _recorded(ours), _recorded(theirs)
    blob_dir.rename(tmp_path / "our-volume")
    their_volume.rename(blob_dir)  # their volume mounted where ours belongs
    before = _files(blob_dir)
    with caplog.at_level(logging.ERROR, logger="core.blobs"):
        assert not blobs.open_at_start(blob_dir, ours)
        for operation in OPERATIONS.values():
            with pytest.raises(Unavailable) as caught:
                operation(blob_dir)
            assert unavailable_dependency(caught.value) == "blob volume"
    assert _files(blob_dir) == before and _recorded(ours) == our_id
    assert _said(caplog) == [
        f"a different blob store is mounted: {blob_dir} holds store {their_id}, this database's store is {our_id}; "
        "nothing is written into it, and uploads and reveals are a 503 and ingestion runs wait until this "
        f"database's store is mounted there. Mount the volume whose .govrag-blobs holds {our_id} there, or run this "
        f"process against the database of store {their_id}"]
    blob_dir.rename(their_volume)
    (tmp_path / "our-volume").rename(blob_dir)  # ours mounted back: used without a restart
    blobs.write_sealed(blob_dir, DOCUMENT, KEY, b"our upload")
    assert blobs.read_sealed(blob_dir, DOCUMENT, KEY) == b"our upload"


def test_another_store_mounted_while_running_is_refused_at_the_next_operation(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The check at each operation costs a stat; a marker that changed (another volume) is read, and refused."""
    blob_dir, their_volume = tmp_path / "blobs", tmp_path / "their-volume"
    our_id = blobs.open_store(blob_dir, documents_exist=False)
    their_id = blobs.open_store(their_volume, documents_exist=False)
    blobs.write_sealed(blob_dir, DOCUMENT, KEY, b"our upload")
    blob_dir.rename(tmp_path / "our-volume")
    their_volume.rename(blob_dir)
    with caplog.at_level(logging.ERROR, logger="core.blobs"):
        for _ in range(3):
            with pytest.raises(Unavailable):
                blobs.write_sealed(blob_dir, DOCUMENT, KEY, b"our next upload")
    assert [path.name for path in blob_dir.iterdir()] == [blobs.MARKER]  # nothing written into theirs
    [said] = _said(caplog)  # once, not at every operation
    assert said.startswith(f"a different blob store is mounted: {blob_dir} holds store {their_id}, this database's "
                           f"store is {our_id}")


def test_an_operation_reads_the_marker_only_when_it_changed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blob_dir = tmp_path / "blobs"
    blobs.open_store(blob_dir, documents_exist=False)
    reads: list[Path] = []
    read_marker = blobs._read_marker
    monkeypatch.setattr(blobs, "_read_marker", lambda directory: reads.append(directory) or read_marker(directory))
    for _ in range(5):
        blobs.write_sealed(blob_dir, DOCUMENT, KEY, b"the upload")
        assert blobs.read_sealed(blob_dir, DOCUMENT, KEY) == b"the upload"
    assert reads == [blob_dir]


@pytest.mark.parametrize("marker", ["empty", "absent"])
@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_a_store_from_before_ids_or_markers_is_given_an_id_that_the_database_records_and_used(
        kind: str, marker: str, tmp_path: Path, make_pg_database: Callable[[], str]) -> None:
    """An upgraded deployment: its directory, with an empty marker (as every marker was before ids) or none (as every
    store was before markers), holds files of its database's documents, so it is the store, as before; it gets its id
    now."""
    url = _upgraded_knowing(kind, tmp_path, make_pg_database, DOCUMENT)
    blob_dir = tmp_path / "blobs"
    _store_from_before_ids(blob_dir, DOCUMENT)
    if marker == "absent":
        (blob_dir / blobs.MARKER).unlink()
    assert blobs.open_at_start(blob_dir, url)
    assert _recorded(url) == _marked(blob_dir) and uuid.UUID(_marked(blob_dir))
    assert blobs.read_sealed(blob_dir, DOCUMENT, KEY) == b"the upload"
    assert sorted(path.name for path in blob_dir.iterdir()) == sorted([blobs.MARKER, f"{DOCUMENT}.bin"])


@pytest.mark.parametrize("marker", ["empty", "absent"])
def test_a_store_without_an_id_is_refused_once_the_database_records_one_until_its_id_is_written(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, marker: str) -> None:
    """A restored copy from before ids (or before markers) may be another database's: no id, no adoption."""
    blob_dir = tmp_path / "blobs"
    blobs.open_store(blob_dir, documents_exist=False)
    blobs.write_sealed(blob_dir, DOCUMENT, KEY, b"the upload")
    if marker == "empty":
        (blob_dir / blobs.MARKER).write_bytes(b"")
    else:
        (blob_dir / blobs.MARKER).unlink()
    recorded = str(uuid.uuid4())
    with caplog.at_level(logging.ERROR, logger="core.blobs"):
        assert blobs.open_store(blob_dir, documents_exist=True, store_id=recorded) is None
        with pytest.raises(Unavailable):
            blobs.read_sealed(blob_dir, DOCUMENT, KEY)
    [said] = _said(caplog)
    taken = " (a start takes it as this database's only when it holds a file of a document the database knows)"
    assert said.startswith(f"the blob store at {blob_dir} has no store id (it was marked before ids, or not at all) "
                           f"while this database's store is {recorded}: it may be another's"
                           f"{taken if marker == 'empty' else ''}; nothing is written into it")
    assert said.endswith(f"If it is this database's store, write {recorded} into {blob_dir / blobs.MARKER}: it is "
                         "used from then on")
    (blob_dir / blobs.MARKER).write_text(f"{recorded}\n")  # as the error says
    assert blobs.read_sealed(blob_dir, DOCUMENT, KEY) == b"the upload"


@pytest.mark.parametrize("content", [b"not an id", b"\xff\xfe", str(uuid.uuid4()).encode()[:-4]])
def test_a_garbled_marker_is_refused_with_a_clear_error_that_quotes_nothing_of_it(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, content: bytes) -> None:
    blob_dir = tmp_path / "blobs"
    store_id = blobs.open_store(blob_dir, documents_exist=False)
    (blob_dir / blobs.MARKER).write_bytes(content)
    with caplog.at_level(logging.ERROR, logger="core.blobs"):
        assert blobs.open_store(blob_dir, documents_exist=True, store_id=store_id) is None
        with pytest.raises(Unavailable):
            blobs.write_sealed(blob_dir, DOCUMENT, KEY, b"the upload")
    assert _said(caplog) == [
        f"the blob store's marker {blob_dir / blobs.MARKER} cannot be read (it holds no store id); uploads and "
        "reveals are a 503 and ingestion runs wait until it holds this database's store id. If it is this "
        f"database's store, write {store_id} into {blob_dir / blobs.MARKER}: it is used from then on"]
    assert [path.name for path in blob_dir.iterdir()] == [blobs.MARKER]


@pytest.mark.parametrize("unlistable", ["a file", "below a file", "not readable", "not searchable"])
def test_a_blob_directory_that_cannot_be_listed_is_refused_until_it_can_be(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, unlistable: str) -> None:
    """A file where the directory should be (or above it), or a directory this process may not read: its listing
    raised, and the start crashed with a traceback. It is refused as another directory that is not the store is (one
    error, nothing written or recorded, an outage), and the store is taken at its first use once it is there."""
    url = f"sqlite:///{tmp_path / 'govrag.db'}"
    migrate.upgrade(url)
    blob_dir = tmp_path / "data" / "blobs"
    if unlistable == "a file":
        blob_dir.parent.mkdir()
        blob_dir.write_bytes(b"not a directory")
    elif unlistable == "below a file":
        blob_dir.parent.write_bytes(b"not a directory")
    else:  # a store from before ids (no id recorded: its files decide), with its permissions wrong
        blob_dir.mkdir(parents=True)
        (blob_dir / blobs.MARKER).write_bytes(b"")
        blob_dir.chmod(0o300 if unlistable == "not readable" else 0)
    with permission_bits_bind(), caplog.at_level(logging.ERROR, logger="core.blobs"):
        assert not blobs.open_at_start(blob_dir, url)
        refused = _said(caplog)
        with pytest.raises(Unavailable):
            blobs.write_sealed(blob_dir, DOCUMENT, KEY, b"the upload")
    waiting, marker = "uploads and reveals are a 503 and ingestion runs wait until", blob_dir / blobs.MARKER
    reason = "Permission denied" if unlistable.startswith("not") else "Not a directory"
    if unlistable == "not searchable":  # not even its marker can be looked at: refused as an unreadable marker
        assert refused == [f"the blob store's marker {marker} cannot be read ({reason}); {waiting} it holds this "
                           f"database's store id. If it is this database's store, empty {marker}: it is given an id "
                           "at the next start"]
    else:
        assert refused == [f"the blob directory {blob_dir} cannot be listed ({reason}); {waiting} it can be: mount "
                           "the blob volume there, as a directory this process can read"]
    assert _recorded(url) is None
    if unlistable.startswith("not"):
        blob_dir.chmod(0o700)  # as the error says
    else:
        (tmp_path / "data").unlink() if unlistable == "below a file" else blob_dir.unlink()
        blob_dir.mkdir(parents=True, exist_ok=True)  # the volume mounted there: a store from before ids
        (blob_dir / blobs.MARKER).write_bytes(b"")
    blobs.write_sealed(blob_dir, DOCUMENT, KEY, b"the upload")  # no restart
    assert _recorded(url) == _marked(blob_dir) and uuid.UUID(_marked(blob_dir))


@pytest.mark.parametrize("unwritable", ["its parent not writable", "not writable", "marked before ids, not writable",
                                        "the disk full"])
def test_a_blob_store_that_cannot_be_created_or_marked_is_refused_until_it_can_be(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, unwritable: str) -> None:
    """A fresh deployment's directory that cannot be created (its parent not writable), or a directory whose marker
    cannot be written (a fresh one, or a store from before ids): the write raised, and the start crashed with a
    traceback. It is refused as a directory that is not the store is (one error naming the directory, the OS's reason
    and what to do; nothing recorded; an outage), and the store is taken at its first use once it can be written."""
    url = f"sqlite:///{tmp_path / 'govrag.db'}"
    migrate.upgrade(url)
    blob_dir = tmp_path / "data" / "blobs"
    blob_dir.parent.mkdir()

    def full() -> None:
        """The marker's temp file writes to /dev/full, as to a full disk (a failed write removes it: space freed)."""
        if unwritable == "the disk full":
            (blob_dir / f"{blobs.MARKER}.tmp").symlink_to("/dev/full")

    if unwritable == "its parent not writable":
        blob_dir.parent.chmod(0o500)
    else:
        blob_dir.mkdir()
        if unwritable.startswith("marked"):  # no document yet: a start takes it, giving it an id
            (blob_dir / blobs.MARKER).write_bytes(b"")
        if unwritable != "the disk full":
            blob_dir.chmod(0o500)
    with permission_bits_bind(), caplog.at_level(logging.ERROR, logger="core.blobs"):
        full()
        assert not blobs.open_at_start(blob_dir, url)
        for _ in range(3):  # each use decides again (an upload flood during the outage)
            full()
            with pytest.raises(Unavailable):
                blobs.write_sealed(blob_dir, DOCUMENT, KEY, b"the upload")
        [refused] = _said(caplog)  # once: the uses deciding again said it at DEBUG
    reason = "No space left on device" if unwritable == "the disk full" else "Permission denied"
    assert refused == (f"the blob store cannot be created or marked in {blob_dir} ({reason}); uploads and reveals "
                       "are a 503 and ingestion runs wait until it can be: make that directory (or, while it is "
                       "missing, the one above it) writable by this process, on a volume mounted read-write with "
                       "free space")
    assert _recorded(url) is None
    left = {} if unwritable.startswith("its parent") else {"blobs": b""}
    if unwritable.startswith("marked"):
        left[f"blobs/{blobs.MARKER}"] = b""
    assert {str(path.relative_to(blob_dir.parent)): b"" if path.is_dir() else path.read_bytes()
            for path in blob_dir.parent.rglob("*")} == left  # as it was
    blob_dir.parent.chmod(0o700)  # as the error says
    if blob_dir.is_dir():
        blob_dir.chmod(0o700)
    with permission_bits_bind():
        blobs.write_sealed(blob_dir, DOCUMENT, KEY, b"the upload")  # no restart
    assert _recorded(url) == _marked(blob_dir) and uuid.UUID(_marked(blob_dir))
    assert blobs.read_sealed(blob_dir, DOCUMENT, KEY) == b"the upload"


def test_a_refusal_decided_again_at_each_use_is_an_error_once_and_the_store_taken_after_it_one_info_line(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """While a start could not list or write the directory, each use decides again as a start: each use (an upload
    flood during that outage) logged the full error again, and a fresh deployment's directory that could not be
    listed (a file at its path) stayed refused once the file was gone, until a restart. A refusal is an error once
    while the store is refused, a different one too (even as they take turns), their repeats DEBUG; the store taken
    (at the next use, no restart) is one INFO line, and a refusal after that an error again."""
    url = f"sqlite:///{tmp_path / 'govrag.db'}"
    migrate.upgrade(url)
    blob_dir = tmp_path / "data" / "blobs"
    blob_dir.parent.mkdir()
    blob_dir.write_bytes(b"not a directory")

    def refused_uses(count: int) -> None:
        for _ in range(count):
            with pytest.raises(Unavailable):
                blobs.write_sealed(blob_dir, DOCUMENT, KEY, b"the upload")

    with permission_bits_bind(), caplog.at_level(logging.DEBUG, logger="core.blobs"):
        assert not blobs.open_at_start(blob_dir, url)
        refused_uses(3)
        blob_dir.unlink()
        blob_dir.mkdir(mode=0o500)  # a directory it may not write
        refused_uses(3)
        blob_dir.rmdir()
        blob_dir.write_bytes(b"not a directory")  # the first refusal again
        refused_uses(2)
        blob_dir.unlink()  # as the error says: a fresh deployment's store is created at the next use
        for _ in range(3):
            blobs.write_sealed(blob_dir, DOCUMENT, KEY, b"the upload")
        ours, theirs = _marked(blob_dir), str(uuid.uuid4())
        (blob_dir / blobs.MARKER).write_text(f"{theirs}\n")  # another store: refused again
        refused_uses(2)
        (blob_dir / blobs.MARKER).write_text(f"{ours}\n")
        blobs.write_sealed(blob_dir, DOCUMENT, KEY, b"the upload")
    said = [(record.levelname, record.getMessage()) for record in caplog.records if record.name == "core.blobs"]
    errors = [message for level, message in said if level == "ERROR"]
    assert [message.split(";")[0] for message in errors] == [
        f"the blob directory {blob_dir} cannot be listed (Not a directory)",
        f"the blob store cannot be created or marked in {blob_dir} (Permission denied)",
        f"a different blob store is mounted: {blob_dir} holds store {theirs}, this database's store is {ours}"]
    listed, unwritten, _ = errors
    taken = f"the blob store at {blob_dir} is used now: uploads, reveals and ingestion runs go on"
    assert said == [("ERROR", listed), *[("DEBUG", listed)] * 3, ("ERROR", unwritten), *[("DEBUG", unwritten)] * 2,
                    *[("DEBUG", listed)] * 2, ("INFO", taken), ("ERROR", errors[2]), ("INFO", taken)]
    assert _recorded(url) == ours


def test_a_marker_made_unreadable_while_running_is_logged_as_a_starts_refusal_is(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A marker that became unreadable while the process ran, the store's id recorded, was refused (`_judge`) with no
    log line at all, at every use, and the store taken back without one. It is logged as a start's refusal is: an
    error once, its repeats (it is read again at each use) DEBUG, a different refusal (another store's marker put
    there) an error, the store taken again one INFO line, and unreadable after that an error again. Each marker
    written has a size of its own, so that each is told from the one before without a clock tick between them."""
    url = f"sqlite:///{tmp_path / 'govrag.db'}"
    migrate.upgrade(url)
    blob_dir = tmp_path / "blobs"
    assert blobs.open_at_start(blob_dir, url)
    marker, ours, theirs = blob_dir / blobs.MARKER, _marked(blob_dir), str(uuid.uuid4())
    written = iter(range(2, 10))

    def marked(store_id: str, mode: int) -> None:
        marker.chmod(0o600)
        marker.write_text(store_id + "\n" * next(written))
        marker.chmod(mode)

    def refused_uses(count: int) -> None:
        for _ in range(count):
            with pytest.raises(Unavailable):
                blobs.write_sealed(blob_dir, DOCUMENT, KEY, b"the upload")

    with permission_bits_bind(), caplog.at_level(logging.DEBUG, logger="core.blobs"):
        blobs.write_sealed(blob_dir, DOCUMENT, KEY, b"the upload")
        marked(ours, 0)  # unreadable
        refused_uses(3)
        marked(theirs, 0o600)  # another store's
        refused_uses(2)
        marked(ours, 0o600)
        blobs.write_sealed(blob_dir, DOCUMENT, KEY, b"the upload")
        marked(ours, 0)
        refused_uses(1)
        marked(ours, 0o600)
        blobs.write_sealed(blob_dir, DOCUMENT, KEY, b"the upload")
    said = [(record.levelname, record.getMessage()) for record in caplog.records if record.name == "core.blobs"]
    unreadable = (f"the blob store's marker {marker} cannot be read (Permission denied); uploads and reveals are a "
                  f"503 and ingestion runs wait until it holds this database's store id. If it is this database's "
                  f"store, write {ours} into {marker}: it is used from then on")
    theirs_said = next(message for _, message in said if message.startswith("a different blob store is mounted"))
    assert theirs_said.startswith(f"a different blob store is mounted: {blob_dir} holds store {theirs}, this "
                                  f"database's store is {ours};")
    taken = f"the blob store at {blob_dir} is used now: uploads, reveals and ingestion runs go on"
    assert said == [("ERROR", unreadable), *[("DEBUG", unreadable)] * 2, ("ERROR", theirs_said),  # theirs read once
                    ("INFO", taken), ("ERROR", unreadable), ("INFO", taken)]
    assert _recorded(url) == ours


def test_a_volume_unmounted_while_running_is_logged_as_a_starts_refusal_is(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The store's marker gone while the process ran (its volume unmounted, the directory moved away) was an outage with
    no line saying why: each operation raised Unavailable silently (an API logged a warning per 503, naming no
    directory), and the store mounted again was taken without the INFO line. It is logged as a start's refusal is: an
    error once (the uses after it, the volume still away, say nothing more), the store taken again one INFO line, and
    away again an error again; another store's volume mounted there instead is that refusal, an error."""
    url = f"sqlite:///{tmp_path / 'govrag.db'}"
    migrate.upgrade(url)
    blob_dir, aside = tmp_path / "blobs", tmp_path / "blobs.unmounted"
    assert blobs.open_at_start(blob_dir, url)
    ours, theirs = _marked(blob_dir), str(uuid.uuid4())

    def refused_uses(count: int) -> None:
        for _ in range(count):
            with pytest.raises(Unavailable):
                blobs.write_sealed(blob_dir, DOCUMENT, KEY, b"the upload")

    with caplog.at_level(logging.DEBUG, logger="core.blobs"):
        blobs.write_sealed(blob_dir, DOCUMENT, KEY, b"the upload")
        blob_dir.rename(aside)  # unmounted
        refused_uses(3)
        aside.rename(blob_dir)  # mounted again
        assert blobs.read_sealed(blob_dir, DOCUMENT, KEY) == b"the upload"
        blob_dir.rename(aside)
        refused_uses(1)
        blob_dir.mkdir()
        (blob_dir / blobs.MARKER).write_text(f"{theirs}\n")  # another store's volume mounted there instead
        refused_uses(2)
        shutil.rmtree(blob_dir)
        aside.rename(blob_dir)
        blobs.write_sealed(blob_dir, DOCUMENT, KEY, b"the upload")
    said = [(record.levelname, record.getMessage()) for record in caplog.records if record.name == "core.blobs"]
    gone = (f"the blob volume is no longer mounted at {blob_dir}: the store's marker {blobs.MARKER} is gone; uploads "
            f"and reveals are a 503 and ingestion runs wait until it is mounted there again")
    theirs_said = next(message for _, message in said if message.startswith("a different blob store is mounted"))
    assert theirs_said.startswith(f"a different blob store is mounted: {blob_dir} holds store {theirs}, this "
                                  f"database's store is {ours};")
    taken = f"the blob store at {blob_dir} is used now: uploads, reveals and ingestion runs go on"
    assert said == [("ERROR", gone), ("INFO", taken), ("ERROR", gone), ("ERROR", theirs_said), ("INFO", taken)]
    assert _recorded(url) == ours


NOT_HERE = "nothing is written into it, and uploads and reveals are a 503 and ingestion runs wait until"
STORE_WITHOUT_ID = ("the blob store at {blob_dir} has no store id (it was marked before ids, or not at all) while this "
                    "database's store is {recorded}: it may be another's")
# How a start's refusal begins, by situation (documents in the database): what its files of govrag's decide.
REFUSALS = {
    "not mounted": "the blob volume is not mounted: {blob_dir} has no .govrag-blobs marker though the database holds "
                   "documents; uploads and reveals are a 503 and ingestion runs wait until it is mounted there.",
    "not mounted, an id recorded": "the blob volume is not mounted: {blob_dir} has no .govrag-blobs marker though the "
                                   "database holds documents;",
    "their files, no marker": "the blob volume at {blob_dir} holds another deployment's files: its store, from before "
                              "markers, holds files of documents this database does not know",
    "our files, no marker, an id recorded": f"{STORE_WITHOUT_ID}; {NOT_HERE}",
    "an empty marker, an id recorded": f"{STORE_WITHOUT_ID} (a start takes it as this database's only when it holds a "
                                       f"file of a document the database knows); {NOT_HERE}",
}


@pytest.mark.parametrize("situation", REFUSALS)
def test_a_refused_start_lists_the_directory_once_and_says_why(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, situation: str) -> None:
    """The decision lists the directory (its files of govrag's choose the refusal); the refusal's message listed it
    again."""
    blob_dir, recorded = tmp_path / "blobs", str(uuid.uuid4())
    if "files" in situation:
        _store_from_before_ids(blob_dir, DOCUMENT if situation.startswith("our") else str(uuid.uuid4()))
        (blob_dir / blobs.MARKER).unlink()
    else:
        blob_dir.mkdir()
        if "an empty marker" in situation:
            (blob_dir / blobs.MARKER).write_bytes(b"")
    listings: list[Path] = []
    listed = blobs._stored_document_ids
    monkeypatch.setattr(blobs, "_stored_document_ids",
                        lambda directory: listings.append(directory) or listed(directory))
    with caplog.at_level(logging.ERROR, logger="core.blobs"):
        assert blobs.open_store(blob_dir, documents_exist=True,
                                store_id=recorded if situation.endswith("an id recorded") else None,
                                knows=lambda document_ids: DOCUMENT in document_ids) is None
    assert listings == [blob_dir]
    [refused] = _said(caplog)
    assert refused.startswith(REFUSALS[situation].format(blob_dir=blob_dir, recorded=recorded))


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_processes_starting_at_once_on_a_fresh_deployment_open_one_store(
        kind: str, tmp_path: Path, make_pg_database: Callable[[], str]) -> None:
    """The API and workers starting together: each found no marker; they take turns, so one id is written and
    recorded, and every one of them opens that store."""
    url = _migrated(kind, tmp_path, make_pg_database)
    blob_dir = tmp_path / "blobs"
    barrier = threading.Barrier(4)

    def start(_: int) -> bool:
        barrier.wait()
        return blobs.open_at_start(blob_dir, url)

    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(start, range(4))) == [True] * 4
    assert _marked(blob_dir) == _recorded(url)
    assert [path.name for path in blob_dir.iterdir()] == [blobs.MARKER]


def _at_0013_with_a_document(kind: str, tmp_path: Path, make_pg_database: Callable[[], str], document_id: str) -> str:
    """A deployment from before store ids: its database at 0013, holding one document."""
    url = f"sqlite:///{tmp_path / 'govrag.db'}" if kind == "sqlite" else make_pg_database()
    migrate.upgrade(url, "0013")
    columns = "id, department, title, content_type, size_bytes, sha256, acl_groups, classification, status, " \
              "chunk_count, uploaded_by, created_at, updated_at, flagged_chunks"
    engine = create_engine(url)
    try:
        with engine.begin() as connection:
            connection.execute(text("INSERT INTO departments (name, created_at) VALUES ('hr', '2026-01-01')"))
            connection.execute(text(f"INSERT INTO documents ({columns}) VALUES (:id, 'hr', 't', 'text/plain', 1, "  # noqa: S608
                                    "'ab', '[]', 'internal', 'ready', 0, 'ed', '2026-01-01', '2026-01-01', 0)"),
                               {"id": document_id})
    finally:
        engine.dispose()
    return url


def _upgraded_knowing(kind: str, tmp_path: Path, make_pg_database: Callable[[], str], document_id: str) -> str:
    """A deployment from before store ids holding one document, upgraded to them (its database records no store)."""
    url = _at_0013_with_a_document(kind, tmp_path, make_pg_database, document_id)
    migrate.upgrade(url)
    return url


def _store_from_before_ids(blob_dir: Path, document_id: str) -> None:
    """The blob store as a deployment from before store ids left it: an empty marker beside the document's file."""
    blobs.open_store(blob_dir, documents_exist=False)
    blobs.write_sealed(blob_dir, document_id, KEY, b"the upload")
    (blob_dir / blobs.MARKER).write_bytes(b"")


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_a_deployment_upgraded_from_0013_with_documents_opens_its_store_with_no_manual_step(
        kind: str, tmp_path: Path, make_pg_database: Callable[[], str]) -> None:
    url = _at_0013_with_a_document(kind, tmp_path, make_pg_database, DOCUMENT)
    blob_dir = tmp_path / "blobs"
    _store_from_before_ids(blob_dir, DOCUMENT)
    migrate.upgrade(url)
    assert blobs.open_at_start(blob_dir, url)
    assert _recorded(url) == _marked(blob_dir) and uuid.UUID(_marked(blob_dir))
    assert blobs.read_sealed(blob_dir, DOCUMENT, KEY) == b"the upload"
    uploaded = str(uuid.uuid4())
    blobs.write_sealed(blob_dir, uploaded, KEY, b"an upload after the upgrade")
    assert blobs.open_at_start(blob_dir, url)  # the next start: the same store
    assert blobs.read_sealed(blob_dir, uploaded, KEY) == b"an upload after the upgrade"


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_a_backup_of_the_store_from_before_ids_restored_after_the_upgrade_is_taken_and_another_one_is_not(
        kind: str, tmp_path: Path, make_pg_database: Callable[[], str], caplog: pytest.LogCaptureFixture) -> None:
    """A backup of the blob volume taken before ids has an empty marker, while the database records an id since the
    upgrade: it was refused (an operator had to write the id by hand). It holds files of this database's documents,
    so it is this database's store; a store without an id holding none of them may be another's, and files of ours
    with no marker may be the disk below the mount point: both stay refused."""
    url = _at_0013_with_a_document(kind, tmp_path, make_pg_database, DOCUMENT)
    blob_dir, backup, theirs = tmp_path / "blobs", tmp_path / "backup", tmp_path / "their-volume"
    _store_from_before_ids(backup, DOCUMENT)
    _store_from_before_ids(theirs, str(uuid.uuid4()))
    shutil.copytree(backup, blob_dir)
    migrate.upgrade(url)
    assert blobs.open_at_start(blob_dir, url)
    recorded = _recorded(url)
    shutil.rmtree(blob_dir)
    theirs.rename(blob_dir)  # another deployment's store from before ids mounted there
    with caplog.at_level(logging.ERROR, logger="core.blobs"):
        assert not blobs.open_at_start(blob_dir, url)
        assert (blob_dir / blobs.MARKER).read_bytes() == b""  # nothing written into theirs
        shutil.rmtree(blob_dir)
        shutil.copytree(backup, blob_dir)
        (blob_dir / blobs.MARKER).unlink()  # our files without a marker: maybe the disk below the mount point
        assert not blobs.open_at_start(blob_dir, url)
        assert not (blob_dir / blobs.MARKER).exists()
    assert len(_said(caplog)) == 2
    shutil.rmtree(blob_dir)
    backup.rename(blob_dir)  # the backup restored
    assert blobs.open_at_start(blob_dir, url)
    assert _marked(blob_dir) == recorded == _recorded(url)
    assert blobs.read_sealed(blob_dir, DOCUMENT, KEY) == b"the upload"


def _another_deployments_volume(volume: Path, document_id: str) -> str:
    """A store of another deployment, holding a file of one of its documents: its id."""
    store_id = blobs.open_store(volume, documents_exist=False)
    blobs.write_sealed(volume, document_id, KEY, b"their upload")
    assert store_id is not None
    return store_id


def _refused_as_anothers(blob_dir: Path, marker: str) -> str:
    """The error refusing another deployment's store whose marker holds `marker`: its id, or "empty", or "absent"."""
    store = "that store" if marker in ("empty", "absent") else f"store {marker}"
    told = {"empty": "store, marked before ids,", "absent": "store, from before markers,"}.get(marker, store)
    return (f"the blob volume at {blob_dir} holds another deployment's files: its {told} holds files of documents "
            "this database does not know, and this database records no store yet; nothing is written into it or "
            "deleted from it, and uploads and reveals are a 503 and ingestion runs wait until this database's store "
            f"is mounted there. Mount this deployment's volume there, or run this process against the database of "
            f"{store}, or, to start afresh deliberately, use an empty directory")


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_a_fresh_database_pointed_at_another_deployments_volume_is_refused_and_its_files_survive_a_sweep(
        kind: str, tmp_path: Path, make_pg_database: Callable[[], str], caplog: pytest.LogCaptureFixture) -> None:
    """A database recording no store took any store's marker: another deployment's volume became its store, and the
    orphan sweep deleted that deployment's files (no document of this database owns them)."""
    settings = Settings(data_dir=tmp_path / "data", database_url=_migrated(kind, tmp_path, make_pg_database))
    settings.data_dir.mkdir()
    their_id = _another_deployments_volume(settings.blob_dir, str(uuid.uuid4()))
    before = _files(settings.blob_dir)
    with caplog.at_level(logging.ERROR, logger="core.blobs"):
        assert not blobs.open_at_start(settings.blob_dir, settings.resolved_database_url)
        with pytest.raises(Unavailable) as caught:
            sweep_orphan_files(settings, older_than_seconds=-60)
        with pytest.raises(Unavailable):
            blobs.write_sealed(settings.blob_dir, DOCUMENT, KEY, b"our upload")
    assert unavailable_dependency(caught.value) == "blob volume"
    assert _files(settings.blob_dir) == before and _recorded(settings.resolved_database_url) is None
    assert _said(caplog) == [_refused_as_anothers(settings.blob_dir, their_id)]


@pytest.mark.parametrize("database", ["fresh", "upgraded"])
@pytest.mark.parametrize("marker", ["empty", "absent"])
@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_another_deployments_store_without_an_id_is_refused_and_its_files_survive_a_sweep(
        kind: str, marker: str, database: str, tmp_path: Path, make_pg_database: Callable[[], str],
        caplog: pytest.LogCaptureFixture) -> None:
    """A database recording no store gave a new id to any store from before ids (an empty marker) or before markers
    (files of govrag's, no marker) without looking whose files it held: another deployment's volume became its store,
    and the orphan sweep deleted that deployment's files (no document of this database owns them)."""
    url = (_migrated(kind, tmp_path, make_pg_database) if database == "fresh" else
           _upgraded_knowing(kind, tmp_path, make_pg_database, DOCUMENT))
    settings = Settings(data_dir=tmp_path / "data", database_url=url)
    _store_from_before_ids(settings.blob_dir, str(uuid.uuid4()))  # theirs, holding a document of theirs
    if marker == "absent":
        (settings.blob_dir / blobs.MARKER).unlink()
    before = _files(settings.blob_dir)
    with caplog.at_level(logging.ERROR, logger="core.blobs"):
        assert not blobs.open_at_start(settings.blob_dir, url)
        with pytest.raises(Unavailable):
            sweep_orphan_files(settings, older_than_seconds=-60)
        with pytest.raises(Unavailable):
            blobs.write_sealed(settings.blob_dir, DOCUMENT, KEY, b"our upload")
    assert _files(settings.blob_dir) == before and _recorded(url) is None
    assert _said(caplog) == [_refused_as_anothers(settings.blob_dir, marker)]


@pytest.mark.parametrize("marker", ["id", "empty"])
@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_a_volume_holding_only_a_marker_is_adopted(
        kind: str, marker: str, tmp_path: Path, make_pg_database: Callable[[], str]) -> None:
    """Nothing in it for the sweep to delete: a store marked elsewhere (or whose files were all purged) is taken, its
    id kept (an empty marker, from before ids, is given one)."""
    url = _migrated(kind, tmp_path, make_pg_database)
    blob_dir = tmp_path / "blobs"
    store_id = blobs.open_store(tmp_path / "marked-elsewhere", documents_exist=False)
    if marker == "empty":
        (tmp_path / "marked-elsewhere" / blobs.MARKER).write_bytes(b"")
    (tmp_path / "marked-elsewhere").rename(blob_dir)
    (blob_dir / "lost+found").mkdir()  # not a file of govrag's
    assert blobs.open_at_start(blob_dir, url)
    assert _recorded(url) == _marked(blob_dir) and uuid.UUID(_marked(blob_dir))
    assert marker == "empty" or _marked(blob_dir) == store_id
    blobs.write_sealed(blob_dir, DOCUMENT, KEY, b"the upload")
    assert sweep_orphan_files(Settings(data_dir=tmp_path, database_url=url), older_than_seconds=-60) == 1  # checked


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_a_volume_mounted_after_a_start_that_recorded_no_store_is_checked_at_its_first_use(
        kind: str, tmp_path: Path, make_pg_database: Callable[[], str], caplog: pytest.LogCaptureFixture) -> None:
    """An upgraded deployment started with its volume away records no store; whatever marker appeared then was
    taken, another deployment's too (its files then swept). The first use decides as a start does, and records."""
    url = _upgraded_knowing(kind, tmp_path, make_pg_database, DOCUMENT)
    blob_dir, theirs, ours = tmp_path / "blobs", tmp_path / "their-volume", tmp_path / "our-volume"
    their_id = _another_deployments_volume(theirs, str(uuid.uuid4()))
    our_id = blobs.open_store(ours, documents_exist=False)  # marked with an id, holding a document the database knows
    blobs.write_sealed(ours, DOCUMENT, KEY, b"our upload")
    with caplog.at_level(logging.ERROR, logger="core.blobs"):
        assert not blobs.open_at_start(blob_dir, url)  # not mounted: nothing recorded
        theirs.rename(blob_dir)
        before = _files(blob_dir)
        for _ in range(3):
            with pytest.raises(Unavailable):
                blobs.has_original(blob_dir, DOCUMENT)
        with pytest.raises(Unavailable):
            list(blobs.stale_files(blob_dir, -60))
    assert _files(blob_dir) == before and _recorded(url) is None
    assert _said(caplog)[1:] == [_refused_as_anothers(blob_dir, their_id)]  # once, after the start's "not mounted"
    blob_dir.rename(theirs)
    ours.rename(blob_dir)
    assert blobs.read_sealed(blob_dir, DOCUMENT, KEY) == b"our upload"
    assert _recorded(url) == our_id  # every process agrees from now on, and so does this one:
    blob_dir.rename(ours)
    theirs.rename(blob_dir)
    with pytest.raises(Unavailable):
        blobs.has_original(blob_dir, DOCUMENT)
    assert _said(caplog)[-1].startswith(f"a different blob store is mounted: {blob_dir} holds store {their_id}, "
                                        f"this database's store is {our_id}")


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_threads_first_using_a_store_mounted_after_the_start_take_turns_and_record_one_id(
        kind: str, tmp_path: Path, make_pg_database: Callable[[], str]) -> None:
    """The deployment's store from before ids (an empty marker) mounted after the start: it is given an id at its
    first use, once, under the start's lock, and every thread using it then opens that store."""
    url = _upgraded_knowing(kind, tmp_path, make_pg_database, DOCUMENT)
    blob_dir, volume = tmp_path / "blobs", tmp_path / "volume"
    _store_from_before_ids(volume, DOCUMENT)
    assert not blobs.open_at_start(blob_dir, url)
    volume.rename(blob_dir)
    barrier = threading.Barrier(4)

    def first_use(_: int) -> bytes:
        barrier.wait()
        return blobs.read_sealed(blob_dir, DOCUMENT, KEY)

    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(first_use, range(4))) == [b"the upload"] * 4
    assert uuid.UUID(_marked(blob_dir)) and _recorded(url) == _marked(blob_dir)


def _with_a_department(kind: str, tmp_path: Path, make_pg_database: Callable[[], str]) -> Settings:
    """A migrated database holding the department `desk` (and no document), and settings of a process using it."""
    url = _migrated(kind, tmp_path, make_pg_database)
    settings = Settings(data_dir=tmp_path / "data", database_url=url, broker_url="memory://", inprocess_worker=False)
    settings.data_dir.mkdir()
    with unit_of_work(url) as session:
        authz_service.create_department(session=session, keystore=keystore_for(settings), name="desk")
    return settings


def _upload(settings: Settings, content: bytes) -> str:
    """Upload `content` to `desk`, committed: the document's id."""
    with unit_of_work(settings.resolved_database_url) as session:
        return ingestion_service.accept_upload(
            session=session, settings=settings, uploaded_by="stella", department="desk", filename="notes.txt",
            data=content, title=None, acl_groups=[], classification=Classification.internal).document_id


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_an_upload_first_using_a_store_mounted_after_the_start_is_accepted_and_records_the_store(
        kind: str, tmp_path: Path, make_pg_database: Callable[[], str]) -> None:
    """The first use records the store's id on a connection of its own: an upload's came after its transaction wrote
    the document's key, so on SQLite it waited for the write lock that transaction held (the 30 s busy timeout),
    then failed ("database is locked")."""
    settings = _with_a_department(kind, tmp_path, make_pg_database)
    _another_deployments_volume(settings.blob_dir, str(uuid.uuid4()))
    assert not blobs.open_at_start(settings.blob_dir, settings.resolved_database_url)  # theirs: nothing recorded
    settings.blob_dir.rename(tmp_path / "their-volume")
    our_id = blobs.open_store(tmp_path / "our-volume", documents_exist=False)  # ours: only its marker
    (tmp_path / "our-volume").rename(settings.blob_dir)
    document_id = _upload(settings, b"Shift notes: the lifts were inspected.")
    assert _recorded(settings.resolved_database_url) == our_id == _marked(settings.blob_dir)
    assert (settings.blob_dir / f"{document_id}.bin").is_file()


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_a_reindex_of_a_failed_document_first_using_a_store_mounted_after_the_start_queues_it(
        kind: str, tmp_path: Path, make_pg_database: Callable[[], str]) -> None:
    """Whether a failed document named kept its original was the store's first use, after the re-index's first
    write: on SQLite its id's record waited for the write lock that transaction held, then failed."""
    settings = _with_a_department(kind, tmp_path, make_pg_database)
    url, volume = settings.resolved_database_url, tmp_path / "volume"
    assert blobs.open_at_start(settings.blob_dir, url)
    document_id = _upload(settings, b"Shift notes: the heating was serviced.")
    with unit_of_work(url) as session:
        session.execute(update(Document).where(Document.id == document_id).values(status=DocumentStatus.failed))
        session.execute(delete(BlobStore))  # as a deployment from before store ids, upgraded:
    (settings.blob_dir / blobs.MARKER).write_bytes(b"")
    settings.blob_dir.rename(volume)
    assert not blobs.open_at_start(settings.blob_dir, url)  # started with its volume away: nothing recorded
    volume.rename(settings.blob_dir)
    with unit_of_work(url) as session:
        reindex = quarantine.queue_reindex(session=session, settings=settings, department="desk",
                                           document_ids=[document_id], serve_previous=True)
    assert [queued for queued, _job in reindex.queued] == [document_id]
    assert _recorded(url) == _marked(settings.blob_dir) and uuid.UUID(_marked(settings.blob_dir))


def test_the_orphan_sweep_never_deletes_from_a_store_this_process_did_not_check_against_its_database(
        tmp_path: Path) -> None:
    """A process that opened no store (no start) takes any store's marker for its operations, but a sweep from it
    deleted what its database does not know: another deployment's files, maybe."""
    settings = Settings(data_dir=tmp_path / "data")
    settings.data_dir.mkdir()
    migrate.upgrade(settings.resolved_database_url)
    _another_deployments_volume(tmp_path / "their-volume", DOCUMENT)
    (tmp_path / "their-volume").rename(settings.blob_dir)
    before = _files(settings.blob_dir)
    with pytest.raises(Unavailable):
        sweep_orphan_files(settings, older_than_seconds=-60)
    assert _files(settings.blob_dir) == before


@pytest.mark.parametrize("written", ["marker", "upload"])
def test_a_write_that_fails_leaves_no_temp_file_behind(tmp_path: Path, written: str) -> None:
    """A write through a `.tmp` sibling that failed left the sibling: the marker's is no name the orphan sweep
    removes, so it stayed for good."""
    blob_dir = tmp_path / "blobs"
    store_id = blobs.open_store(blob_dir, documents_exist=False)
    target = blob_dir / (blobs.MARKER if written == "marker" else f"{DOCUMENT}.bin")
    target.unlink(missing_ok=True)
    (target / "in-the-way").mkdir(parents=True)  # the rename into place fails
    with pytest.raises(IsADirectoryError):
        if written == "marker":
            blobs._mark(blob_dir, str(store_id))
        else:
            blobs.write_sealed(blob_dir, DOCUMENT, KEY, b"the upload")
    assert not any(path.name.endswith(".tmp") for path in blob_dir.iterdir())
