"""Encrypted raw uploads on disk, one file per document, sealed under the document key.

The store is a directory holding a marker file (`MARKER`) with the store's id; the database records the id of its store
(`BlobStore`). Only a process's start (`open_at_start`) creates the directory and its marker, adopts a store from
before markers or ids, or refuses a directory that is not this database's store, or where it cannot write them
(nothing written; an error logged, at DEBUG while the same refusal repeats): the table "The blob store's marker" in
docs/scaling.md gives each situation, what a start does and the way out.

A store mounted after a start that recorded none is decided as a start would at its first use (`_judge`), its id
recorded on a connection of its own. So any caller whose transaction writes before it uses the store must call
`decide_first_use` before that first write: on SQLite the record would otherwise wait for the write lock that
transaction holds (the busy timeout, then "database is locked").

From then on every operation here without this store's marker raises `Unavailable("blob volume")` (`_mounted`), waited
out like any other outage: nothing is written where the volume should be (a file there would be hidden, then lost, once
it is mounted, or mixed into another deployment's store), and nothing read or listed there is taken for the truth (no
file is not "no original", "no placeholder map" or "nothing to remove"). The orphan sweep lists only a store checked
against the database (`_verified`)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import stat
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from core import crypto, forksafe
from core.db import transaction_lock, unit_of_work
from core.errors import Unavailable
from core.models import BlobStore, Document

logger = logging.getLogger(__name__)

MARKER = ".govrag-blobs"  # in the store's directory, holding the store's id (see the module docstring)

_ID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"  # a document's or a store's (a UUID)
# What this module writes: `<document id>.bin` (the upload), `<document id>.<generation>.pii` (the placeholder map
# of one index generation; `<document id>.pii` is generation 0's, written before generations), each through a
# `.tmp` sibling renamed into place.
_STORED_NAME = re.compile(rf"(?P<document_id>{_ID})\.(?:bin|(?:[1-9][0-9]*\.)?pii)(?P<unfinished>\.tmp)?")
_MAP_GENERATION = re.compile(r"\.(?P<generation>[1-9][0-9]*)\.pii")
# How many documents' files an id-less store is looked at for one the database knows (one query's parameters).
_SAMPLED_DOCUMENTS = 500


class GarbledMarker(ValueError):
    """The marker holds something other than a store id (its content is never quoted)."""


@dataclass(frozen=True)
class _Seen:
    """What this process knows of a store directory: the store id its database records (None: none was recorded at
    its start), the database it asks when a store appears there while that database records none (None: no start in
    this process, whose operations take any marker, but whose orphan sweep does not: `_verified`), the marker last
    judged there (`_signature`) and whether it was that store's. A marker is read again only when its signature
    changes, so an operation costs one stat, as before ids. `undecided`: the decision could not read the marker, list
    the directory or write either (permissions, a full disk), so each use decides again (`_mounted`) until it can."""

    store_id: str | None
    marker: tuple[int, ...] | None = None
    ours: bool = False
    database_url: str | None = None
    undecided: bool = False


_seen: dict[Path, _Seen] = {}
# The refusals logged as errors for each directory since its store was last taken (`_say_refused`), and their lock.
_refusals_said: dict[Path, set[str]] = {}
_refusals_lock = forksafe.lock()
_Marked = str | GarbledMarker | OSError | None  # the marker's id, "" (empty), what kept it unread, or no marker


def open_at_start(blob_dir: Path, database_url: str) -> bool:
    """At a process's start (after its schema check), and at the first use of a store mounted after a start that
    recorded none (`_judge`): make the blob store ready, unless the database shows that its volume is not mounted or
    another store is (`open_store`); record the store's id if the database has none. Processes (and threads) deciding
    at once take turns. Whether the store is there."""
    with unit_of_work(database_url) as session:
        transaction_lock(session, "blob store")
        documents_exist = session.scalar(select(Document.id).limit(1)) is not None
        recorded = session.scalar(select(BlobStore.store_id).where(BlobStore.id == 1))
        opened, seen = _decide(blob_dir, documents_exist=documents_exist, store_id=recorded,
                               knows=lambda document_ids: _knows_any(session, document_ids))
        if opened is not None and recorded is None:
            session.add(BlobStore(id=1, store_id=opened))
    _seen[blob_dir] = replace(seen, database_url=database_url)  # once recorded: a failed commit decides again
    return opened is not None


def open_store(blob_dir: Path, *, documents_exist: bool, store_id: str | None = None,
               knows: Callable[[set[str]], bool] = lambda _document_ids: False) -> str | None:
    """Open the store at `blob_dir` for the database recording `store_id` (None: none yet), holding documents or not,
    and knowing which of some documents (`knows`: whether it holds a row of one of them; every document, a retired one
    too, keeps its row): its id, or None when it is not there (an error logged saying why and what to do; nothing
    written), as the table "The blob store's marker" in docs/scaling.md says. A server goes on either way (queries need
    no blobs)."""
    opened, _seen[blob_dir] = _decide(blob_dir, documents_exist=documents_exist, store_id=store_id, knows=knows)
    return opened


def _decide(blob_dir: Path, *, documents_exist: bool, store_id: str | None,
            knows: Callable[[set[str]], bool]) -> tuple[str | None, _Seen]:
    """`open_store`'s decision, logged when it refuses: the id opened (or None) and what this process then knows."""
    signature = _signature(blob_dir)  # taken before the read: a marker changed after it is judged again when used
    marked = _read_marker(blob_dir)
    opened, stored = _adopt(blob_dir, marked, documents_exist=documents_exist, store_id=store_id, knows=knows)
    unwritten: OSError | None = None
    if opened is not None and opened != marked:  # a fresh store, or one without an id yet
        try:
            _mark(blob_dir, opened)
        except OSError as error:  # refused as any other directory, until it can be written
            opened, unwritten = None, error
    if opened is None:
        _say_refused(blob_dir, _refusal(blob_dir, marked, store_id, stored, unwritten))
    else:
        _say_taken(blob_dir)
    undecided = isinstance(marked, OSError) or isinstance(stored, OSError) or unwritten is not None
    return opened, _Seen(opened or store_id, None if undecided else signature,  # None: its marker judged when used
                         ours=opened is not None, undecided=undecided)


def _adopt(blob_dir: Path, marked: _Marked, *, documents_exist: bool, store_id: str | None,
           knows: Callable[[set[str]], bool]) -> tuple[str | None, set[str] | OSError]:
    """`open_store`'s decision, writing nothing: the store's id (or None; `_decide` writes it into the marker where
    the marker does not hold it yet), and the documents of the files of govrag's it found in the directory (none when
    the marker decided alone; the OSError when it could not be listed), for `_refusal` to word a refusal by without
    listing the directory again."""
    if isinstance(marked, Exception):
        return None, set()
    if marked and store_id is not None:
        return (marked if marked == store_id else None), set()
    stored = _stored_document_ids(blob_dir)
    if isinstance(stored, OSError):  # not a directory this process can list (a file there): nothing to decide by
        return None, stored
    if stored and not knows(stored):  # another deployment's files, whose documents the orphan sweep would not find
        return None, stored
    if marked:
        return marked, stored
    if marked == "" or stored:
        if store_id is None:
            return str(uuid.uuid4()), stored
        # Not without a marker: that may be the disk below the mount point, written before markers, the volume away.
        return (store_id if marked == "" and stored else None), stored
    if documents_exist:
        return None, stored
    return store_id or str(uuid.uuid4()), stored


def _say_refused(blob_dir: Path, refusal: str) -> None:
    """Log a refusal as an error, once while the store is refused (each use decides again while the decision could not
    read or write, `_Seen.undecided`, and reads again a marker `_judge` could not read): a refusal said already since
    the store was last taken is logged at DEBUG, a different one as an error, as the sweeps log an outage
    (`core.sweeper`)."""
    with _refusals_lock:
        said = _refusals_said.setdefault(blob_dir, set())
        repeated = refusal in said
        said.add(refusal)
    logger.log(logging.DEBUG if repeated else logging.ERROR, "%s", refusal)


def _say_taken(blob_dir: Path) -> None:
    """Log, once, that the store is used after a refusal was logged."""
    with _refusals_lock:
        refused = _refusals_said.pop(blob_dir, None) is not None
    if refused:
        logger.info("the blob store at %s is used now: uploads, reveals and ingestion runs go on", blob_dir)


def _refusal(blob_dir: Path, marked: _Marked, store_id: str | None, stored: set[str] | OSError,
             unwritten: OSError | None = None) -> str:
    """Why the directory is not the store of the database recording `store_id`, and what to do (one log line);
    `stored`: the documents of govrag's files `_adopt` found there, or the OSError that kept it from listing them (it
    lists the directory whenever the marker leaves the message to them); `unwritten`: the OSError that kept `_adopt`
    from writing the directory or its marker."""
    marker, waiting = blob_dir / MARKER, "uploads and reveals are a 503 and ingestion runs wait until"
    if unwritten is not None:
        return (f"the blob store cannot be created or marked in {blob_dir} ({unwritten.strerror or 'an OSError'}); "
                f"{waiting} it can be: make that directory (or, while it is missing, the one above it) writable by "
                f"this process, on a volume mounted read-write with free space")
    if isinstance(marked, Exception):
        reason = "it holds no store id" if isinstance(marked, GarbledMarker) else marked.strerror or "an OSError"
        return (f"the blob store's marker {marker} cannot be read ({reason}); {waiting} it holds this database's "
                f"store id. If it is this database's store, {_how_to_mark(marker, store_id)}")
    if isinstance(stored, OSError):
        return (f"the blob directory {blob_dir} cannot be listed ({stored.strerror or 'an OSError'}); {waiting} it "
                f"can be: mount the blob volume there, as a directory this process can read")
    if store_id is None and (marked is not None or stored):  # refused for its files only
        store = f"store {marked}" if marked else "that store"
        told = store if marked else "store, marked before ids," if marked == "" else "store, from before markers,"
        return (f"the blob volume at {blob_dir} holds another deployment's files: its {told} holds files of "
                f"documents this database does not know, and this database records no store yet; nothing is written "
                f"into it or deleted from it, and {waiting} this database's store is mounted there. Mount this "
                f"deployment's volume there, or run this process against the database of {store}, or, to start "
                f"afresh deliberately, use an empty directory")
    if marked:
        return (f"a different blob store is mounted: {blob_dir} holds store {marked}, this database's store is "
                f"{store_id}; nothing is written into it, and {waiting} this database's store is mounted there. "
                f"Mount the volume whose {MARKER} holds {store_id} there, or run this process against the database "
                f"of store {marked}")
    if marked == "" or stored:
        taken = (" (a start takes it as this database's only when it holds a file of a document the database knows)"
                 if marked == "" else "")
        return (f"the blob store at {blob_dir} has no store id (it was marked before ids, or not at all) while this "
                f"database's store is {store_id}: it may be another's{taken}; nothing is written into it, and "
                f"{waiting} this database's store is mounted there. If it is this database's store, "
                f"{_how_to_mark(marker, store_id)}")
    unmarked = ("a store from before the marker holding files of this database's documents is marked at the next "
                f"start; one holding no file of govrag's (every document deleted) is the store once an empty {marker} "
                "is created" if store_id is None else
                f"a store holding no file of govrag's (every document deleted) is the store once {marker} is "
                f"created holding {store_id}")
    return (f"the blob volume is not mounted: {blob_dir} has no {MARKER} marker though the database holds "
            f"documents; {waiting} it is mounted there. If it is mounted there: {unmarked}")


def _how_to_mark(marker: Path, store_id: str | None) -> str:
    """What an operator does to have a store taken as the database's (its marker unreadable or without an id)."""
    if store_id is None:
        return f"empty {marker}: it is given an id at the next start"
    return f"write {store_id} into {marker}: it is used from then on"


def _stored_document_ids(blob_dir: Path) -> set[str] | OSError:
    """The documents of the first files this module wrote found in the directory (a store from before markers holds
    some), `_SAMPLED_DOCUMENTS` at most: a sample to tell whose store it is, not a listing. The OSError when the
    directory cannot be listed (not a directory, or not readable by this process); none when it is missing."""
    found: set[str] = set()
    try:
        with os.scandir(blob_dir) as entries:
            for entry in entries:
                stored = _STORED_NAME.fullmatch(entry.name)
                if stored is not None:
                    found.add(stored["document_id"])
                if len(found) >= _SAMPLED_DOCUMENTS:
                    break
    except FileNotFoundError:
        pass
    except OSError as error:
        return error
    return found


def _knows_any(session: Session, document_ids: set[str]) -> bool:
    """Whether the database holds a row of one of these documents (every document, a retired one too, keeps it)."""
    return session.scalar(select(Document.id).where(Document.id.in_(document_ids)).limit(1)) is not None


def _mark(blob_dir: Path, store_id: str) -> None:
    """Write the marker holding `store_id`, creating the directory if it is missing, through a temp file renamed into
    place (never half-written, and no hard link, which object store mounts and SMB shares refuse); `open_at_start`
    writes it under its lock."""
    blob_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    _replace(blob_dir / MARKER, f"{store_id}\n".encode())


def _read_marker(blob_dir: Path) -> _Marked:
    """The id the marker holds, "" when it is empty (written before ids), None when there is none; GarbledMarker
    when it holds anything else, the OSError when it cannot be read."""
    try:
        text = (blob_dir / MARKER).read_bytes().decode("ascii", errors="replace").strip().lower()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as error:
        return error
    return text if not text or re.fullmatch(_ID, text) else GarbledMarker()


def _signature(blob_dir: Path) -> tuple[int, ...] | None:
    """What tells one marker file, and one change of it (a write, a chmod), from another without reading it; None
    without a marker."""
    try:
        found = (blob_dir / MARKER).stat()
    except OSError:  # none, or none this process may look at (the directory not searchable): its read says which
        return None
    if not stat.S_ISREG(found.st_mode):
        return None
    return found.st_dev, found.st_ino, found.st_size, found.st_ctime_ns


def _mounted(blob_dir: Path) -> Path:
    """`blob_dir`, which must hold this store's marker: without it, its volume is not mounted; with another id (or
    none while the database records one), another store is (`Unavailable` either way). A marker is judged again only
    when it changed (an error logged when it is not this store's), or, after a start that could not read or write the
    directory, decided again as at a start at each use until it can; the store's marker gone is logged once
    (`_lost`)."""
    signature = _signature(blob_dir)
    seen = _seen.get(blob_dir, _Seen(None))
    if seen.undecided and seen.database_url is not None:
        open_at_start(blob_dir, seen.database_url)
        signature, seen = _signature(blob_dir), _seen[blob_dir]
    elif signature is not None and signature != seen.marker:
        seen = _judge(blob_dir, seen, signature)
    elif signature is None and seen.ours:
        seen = _lost(blob_dir, seen)
    if signature is None or not seen.ours:
        raise Unavailable("blob volume")
    return blob_dir


def _judge(blob_dir: Path, seen: _Seen, signature: tuple[int, ...]) -> _Seen:
    """Read the marker that changed: this store's or not (a refusal logged as a start's is, `_say_refused`; one that
    cannot be read is read again at the next use). A store appearing while the database records none is decided as at
    a start, and its id recorded (`open_at_start`); without a start in this process, any store's marker (or an empty
    one) is taken."""
    if seen.store_id is None and seen.database_url is not None:
        open_at_start(blob_dir, seen.database_url)
        return _seen[blob_dir]
    marked = _read_marker(blob_dir)
    if marked is None:  # gone since the stat: judged at the next use
        return replace(seen, marker=None, ours=False)
    ours = isinstance(marked, str) and seen.store_id in (None, marked)
    if not ours:
        _say_refused(blob_dir, _refusal(blob_dir, marked, seen.store_id, set()))  # a marker read words it alone
    else:
        _say_taken(blob_dir)
    if isinstance(marked, OSError):  # unreadable: read again at the next use, until it can be
        return replace(seen, marker=None, ours=False)
    _seen[blob_dir] = replace(seen, marker=signature, ours=ours)
    return _seen[blob_dir]


def _lost(blob_dir: Path, seen: _Seen) -> _Seen:
    """The marker of the store in use gone (its volume unmounted, or the directory moved away): refused, logged as a
    start's refusal is (`_say_refused`), until a marker is there again to be judged (`_judge`: the store taken again
    one INFO line)."""
    _say_refused(blob_dir, f"the blob volume is no longer mounted at {blob_dir}: the store's marker {MARKER} is gone; "
                           f"uploads and reveals are a 503 and ingestion runs wait until it is mounted there again")
    _seen[blob_dir] = replace(seen, marker=None, ours=False)
    return _seen[blob_dir]


def decide_first_use(blob_dir: Path) -> None:
    """Have the first use of a store mounted after a start that recorded none decided now (`_judge`), by a caller
    whose transaction is about to write before it uses the store: the decision records the store's id on a connection
    of its own, which on SQLite waits for the one write lock that transaction would then hold (the busy timeout, then
    "database is locked"). Whether the store is there is left to the caller's operation on it."""
    with contextlib.suppress(Unavailable):
        _mounted(blob_dir)


def _verified(blob_dir: Path) -> Path:
    """`_mounted`, and a store whose id this process checked against the one its database records (or was given,
    `open_store`): the orphan sweep deletes what no document of the database owns, which in a store taken without
    that check may be another deployment's files (`Unavailable` until then)."""
    if _seen.get(_mounted(blob_dir), _Seen(None)).store_id is None:
        raise Unavailable("blob volume")
    return blob_dir


def _path(blob_dir: Path, document_id: str) -> Path:
    return _mounted(blob_dir) / f"{document_id}.bin"


def write_sealed(blob_dir: Path, document_id: str, key: bytes, data: bytes) -> None:
    """Store the raw upload encrypted; written to a temp file then renamed, so never half-written."""
    _write_sealed(_path(blob_dir, document_id), key, data, f"govrag:raw:{document_id}")


def _write_sealed(target: Path, key: bytes, data: bytes, context: str) -> None:
    _replace(target, crypto.seal(key, data, context))


def _replace(target: Path, data: bytes) -> None:
    """Write `target` (private) through a `.tmp` sibling renamed into place, so it is never half-written; a write or
    rename that fails takes its `.tmp` with it (the orphan sweep would not remove the marker's)."""
    temp = target.with_name(target.name + ".tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        temp.replace(target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


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


def _map_context(document_id: str, generation: int, department: str | None) -> str:
    """Associated data binding a placeholder map to its document and the run that sealed it (its department and index
    generation), as a chunk's binds its run (ingestion/pipeline.py `chunk_context`): the document key is the same for
    every generation, so an earlier generation's map copied over (or restored onto) a later one's file does not open,
    nor does another document's. `department` None: the context of maps sealed before 0021, which named the document
    only (`Document.maps_unbound_through` says which generations those are)."""
    if department is None:
        return f"govrag:pii-map:{document_id}"
    return f"govrag:pii-map:v2:{json.dumps([document_id, department, generation])}"  # JSON: no field passes for another


def write_sealed_map(blob_dir: Path, document_id: str, key: bytes, data: bytes, generation: int, *,
                     department: str) -> None:
    """Store the placeholder map of one index generation of a document, encrypted under the context binding its run
    (temp file, then rename)."""
    context = _map_context(document_id, generation, department)
    _write_sealed(_map_path(blob_dir, document_id, generation), key, data, context)


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


def read_sealed_map(blob_dir: Path, document_id: str, key: bytes, generation: int, *, department: str,
                    unbound_through: int) -> bytes | None:
    """The placeholder map of one index generation, decrypted under the context its run sealed it with
    (`_map_context`: the generations up to `unbound_through`, `Document.maps_unbound_through`, under the one naming
    the document only, and no others); None when that generation kept none (or it was removed meanwhile). One that
    does not open there (altered, or another generation's or document's copied over it) is `crypto.DecryptionError`,
    as a chunk's is."""
    try:
        sealed = _map_path(blob_dir, document_id, generation).read_bytes()
    except FileNotFoundError:
        return None
    sealed_by = department if generation > unbound_through else None  # from the database, never the file
    return crypto.open_sealed(key, sealed, _map_context(document_id, generation, sealed_by))


def read_newest_sealed_map(blob_dir: Path, document_id: str, key: bytes, below: int, *, department: str,
                           unbound_through: int) -> bytes | None:
    """The placeholder map of the newest generation below `below` still stored, decrypted (`read_sealed_map`); None
    when none is."""
    for generation in sorted((generation for generation, _ in _maps(blob_dir, document_id) if generation < below),
                             reverse=True):
        found = read_sealed_map(blob_dir, document_id, key, generation, department=department,
                                unbound_through=unbound_through)
        if found is not None:
            return found
    return None


def stale_files(blob_dir: Path, older_than_seconds: float) -> Iterator[tuple[str, Path, bool]]:
    """(document id, path, whether it is an unfinished write) for each file this module wrote that has not been
    modified for `older_than_seconds`; other files in the directory (the marker among them) are never listed. With
    the store's marker missing, or a store not checked against the database (`_verified`), `Unavailable` (the orphan
    sweep waits for the volume) rather than nothing to list."""
    cutoff = time.time() - older_than_seconds
    with os.scandir(_verified(blob_dir)) as entries:
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
