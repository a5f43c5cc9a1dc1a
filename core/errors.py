"""One error type for the whole service, with codes that map to HTTP statuses."""

from __future__ import annotations

import errno
import logging
import os
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Literal

from sqlalchemy import exc as db_errors

from core.error_pickling import UnpickledAsRaised

logger = logging.getLogger(__name__)


class ErrorCode(Enum):
    """Each code carries the HTTP status the API answers with; codes may share one (each is a member of its own)."""

    status: int

    def __new__(cls, status: int) -> ErrorCode:
        code = object.__new__(cls)
        code._value_ = len(cls.__members__)  # not the status: two codes of one status would be one member
        code.status = status
        return code

    invalid_request = 400
    unauthenticated = 401
    forbidden = 403
    not_found = 404
    conflict = 409
    duplicate_upload = 409  # the department already holds this content (the message names its document): not sent
    document_key_unreadable = 410  # the document's key row no longer opens (altered): gone for good, upload it again
    placeholder_map_unreadable = 410  # the document's placeholder map does not open or parse (altered): upload again
    payload_too_large = 413
    unsupported_type = 415
    unavailable = 503
    department_key_unreadable = 503  # its key row no longer opens under the master key (altered): restore the row
    kill_switch_disabled = 503  # an admin switched answering off (the kill switch's `disabled`): no outage, no fault
    audit_mirror_unreadable = 503  # something else than a readable file at the checkpoint mirror's path: to fix there
    internal = 500

    @property
    def refuses_input(self) -> bool:
        """Whether the code refuses what the caller asked or gave (to change before asking again), rather than saying
        that the deployment's own state, data or settings failed: decided for each code by what it means,
        never by the status it shares with others (a 410 is data altered in the database, not a request to fix)."""
        return self in _INPUT_REFUSALS


_INPUT_REFUSALS = frozenset({ErrorCode.invalid_request, ErrorCode.unauthenticated, ErrorCode.forbidden,
                             ErrorCode.not_found, ErrorCode.conflict, ErrorCode.duplicate_upload,
                             ErrorCode.payload_too_large, ErrorCode.unsupported_type})


class GovragError(UnpickledAsRaised):
    """A failure safe to show a client: the message never carries user content."""

    # The department's document a `duplicate_upload` names (ingestion.service.DuplicateUpload), which the API's 409
    # says in its error body's field of that name; None for any other error.
    duplicate_of: str | None = None

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class StartRefused(UnpickledAsRaised):
    """A process cannot start (or a command go on) for a reason said to the operator in one line: what, where and the
    way out, never a secret; `exit_code` is what the CLI exits with."""

    exit_code = 1


class UnusablePath(StartRefused):
    """A path the settings name that does not exist or this user may not use (the data dir, a SQLite file's folder,
    the embedded vector store's folder, the dev issuer's key), or a file there that does not parse (a key file, the
    embedding model's ONNX export): no outage that ends by waiting, but README's exit 2 (a path to fix, as a master
    key file that does not parse is a setting to fix)."""

    exit_code = 2

    @classmethod
    def refused(cls, what: str, error: OSError, setting: str, *, fix: str | None = None,
                instead: str = "a folder this user may write") -> UnusablePath:
        """Every such line, one shape: `what` (naming its path), the system's reason for refusing this user (`error`'s
        strerror, never a traceback) on the file it names, and the way out: `fix` (letting this user read and write
        that file, unless said) or `setting` pointed `instead` (at a folder this user may write, unless said)."""
        return cls(f"cannot use {what}: {_reason(error)} "
                   f"({fix or 'let this user read and write it'}, or point {setting} at {instead})")


class AddressUnusable(StartRefused):
    """An address `govrag serve` cannot listen on (another process listens there, a host this machine does not have,
    a port this user may not use): an argument to fix, as a path is, so exit 2; refused before anything starts."""

    exit_code = 2

    def __init__(self, address: str, error: Exception) -> None:
        super().__init__(f"cannot listen on {address}: {_reason(error)} (give another --port, or a --host of this "
                         "machine)")


class MasterKeyRefused(StartRefused):
    """The configured master keyring does not open the keys stored in the database: a wrong GOVRAG_MASTER_KEY, a key
    file from elsewhere or lost (never made afresh over stored keys), a replica not given the version a master
    rotation made current. Nothing it served could be read, and keys it wrapped would be lost once the right key is
    back: a setting to fix, exit 2, as a key file that does not parse. Names where the key is read (`key_file`, else
    GOVRAG_MASTER_KEY only), never key material; `client_message` says it without the key file's path (for /readyz,
    which asks no login, and API clients; the path is in the server's log line). `readiness` is /readyz's
    `checks.master_key`. `only_verifiers`: nothing but the check a first start stored (no department made yet), which
    the operator of a key lost for good may delete to start afresh: the line says so."""

    exit_code = 2
    readiness = "mismatch"

    def __init__(self, why: str | None, key_file: Path | None, *, only_verifiers: bool = False) -> None:
        super().__init__(_master_key_line(why, None if key_file is None else str(key_file), only_verifiers))
        self.client_message = _master_key_line(why, None if key_file is None else "the master key file",
                                               only_verifiers)


class MasterKeyFileMissing(MasterKeyRefused):
    """The key file is gone while the database holds what its key sealed: never made afresh over them (a start), and
    a running replica, which re-reads it when it changes, says so (`readiness` "missing"), not a key that fails."""

    readiness = "missing"

    def __init__(self, key_file: Path, *, only_verifiers: bool = False) -> None:
        self.key_file = key_file
        super().__init__(f"the key file does not exist; no new one is made over {'it' if only_verifiers else 'them'}",
                         key_file, only_verifiers=only_verifiers)


class MasterKeyFileUnreadable(MasterKeyRefused):
    """The key file cannot be read (no permission, a folder) or no longer parses (garbled, not text) under a running
    process, which reads it again when it changes and once its copy is GOVRAG_KEY_CACHE_SECONDS old: `readiness`
    "unreadable", the system's reason said, never the file's bytes (nor, to clients, its path)."""

    readiness = "unreadable"

    def __init__(self, key_file: Path, reason: str) -> None:
        super().__init__(f"the key file cannot be read: {reason}", key_file)


class MasterKeyVersionMissing(MasterKeyRefused):
    """The keyring lacks a master version the stored keys are wrapped under (`current`: the newest one, which new keys
    are wrapped under): a replica not given the version a master rotation made current, a key file replaced under a
    running process by one without it (an old copy, another installation's). `readiness` "mismatch", as any key
    that does not open them. A rotation retiring a version as a key is read is none: the key's row, rewrapped before
    the version left the key file, is read again first (`KeyStore.department_key`)."""

    def __init__(self, version: int, key_file: Path | None, *, current: bool = False) -> None:
        super().__init__(f"it has no version {version}, {'the current one' if current else 'which wraps some of them'}",
                         key_file)


def _master_key_line(why: str | None, key_file: str | None, only_verifiers: bool) -> str:
    """MasterKeyRefused's line: what fails, why, where the key is read, and (nothing but a first start's check stored)
    how to start afresh."""
    source = "GOVRAG_MASTER_KEY" if key_file is None else f"GOVRAG_MASTER_KEY or {key_file}"
    if only_verifiers:
        return (f"the master key does not open the check the first start stored (no department was made yet"
                f"{f'; {why}' if why else ''}): restore the master key that start used ({source}), or, if it is lost "
                "for good, delete the rows of table master_key_verifiers and start again")
    return (f"the master key does not open the stored keys{f' ({why})' if why else ''}: restore the master key used "
            f"to write them ({source})")


class BrokenInstall(StartRefused):
    """A model or weights file shipped with govrag does not load (missing, unreadable, garbled): no setting or wait
    fixes it, the install does; exit 1, a start that ran and failed."""

    def __init__(self, what: str, error: Exception) -> None:
        super().__init__(f"cannot load {what}: {_reason(error)}; the install is broken: reinstall govrag (`make "
                         "install` in a fresh checkout, or an image built from one)")


# What a model or weights file shipped with govrag raises when it does not load: missing or unreadable (OSError),
# garbled (ValueError: numpy's refusal, JSON's; zipfile.BadZipFile, EOFError: a cut .npz; LookupError: an array or a
# field it lacks), a library it needs missing or unloadable (ImportError), torch's refusal (RuntimeError). A TypeError,
# AttributeError, NameError, ... is a bug in govrag, never "reinstall": it stays one.
BROKEN_INSTALL_ERRORS = (OSError, ValueError, zipfile.BadZipFile, EOFError, LookupError, ImportError, RuntimeError)


@contextmanager
def loading(what: str) -> Iterator[None]:
    """Load `what`, shipped with govrag: a failure a broken install raises is BrokenInstall (its traceback logged at
    DEBUG); a refusal the loader said itself, and a bug, go on as they are. Only around a load: elsewhere such an
    error stays what it is."""
    try:
        yield
    except StartRefused:
        raise
    except Exception as error:
        if not _broken_install(error):
            raise
        logger.debug("loading %s failed", what, exc_info=True)
        raise BrokenInstall(what, error) from error


def _broken_install(error: Exception) -> bool:
    """Whether `error` is what a model file that does not load raises: BROKEN_INSTALL_ERRORS or safetensors' refusal
    of garbled weights (tokenizers' bare Exception only as `reading_tokenizer` makes it a ValueError)."""
    from safetensors import SafetensorError  # only once a load failed: the CLI's other commands never import it

    return isinstance(error, (*BROKEN_INSTALL_ERRORS, SafetensorError))


@contextmanager
def reading_tokenizer() -> Iterator[None]:
    """Around the load of a tokenizer.json, and only there: tokenizers refuses a garbled one with a bare Exception (it
    has no type of its own), a ValueError here, so `loading` says a broken install. A bare Exception raised anywhere
    else in a load stays what it is."""
    try:
        yield
    except Exception as error:
        if type(error) is not Exception:
            raise
        raise ValueError("tokenizers refused the tokenizer file") from error


def check_writable(folder: Path) -> None:
    """PermissionError (the system's EACCES, naming `folder`) unless this user may write in `folder` and search it, as
    making files there needs: for an UnusablePath line said before the system refuses anything."""
    if not os.access(folder, os.W_OK | os.X_OK, effective_ids=True):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(folder))


def _reason(error: Exception) -> str:
    """Why `error` happened, without its message (a library's may run to lines, or advise loading unsafely): the
    system's reason and the file for an OSError, the module for an ImportError that names one, else the error's type."""
    if isinstance(error, ImportError) and error.name:
        return f"{type(error).__name__} ({error.name})"
    if not isinstance(error, OSError):
        return type(error).__name__
    on = f" on {error.filename}" if error.filename else ""
    return f"{error.strerror or type(error).__name__}{on}"


class FolderUnwritable(OSError):
    """This user may not make files in a folder (no permission, a read-only file system): an OSError whose `filename`
    is that folder, which the user named or chose, never the hidden file govrag was making there."""


class HiddenNameTaken(OSError):
    """A folder stands where govrag makes a hidden file in a folder (a temporary copy, a lock), named like it: an
    OSError whose `filename` is the folder the user named or chose, `filename2` the name of the folder in the way,
    for the user to move or remove (never the system's bare "Is a directory", which names neither)."""


_WRITES_REFUSED = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})


@contextmanager
def making_files_in(folder: Path) -> Iterator[None]:
    """Around making a hidden file beside one of the user's (a temporary copy, a lock): an OSError there names
    `folder`, not that file (the system's reason kept); FolderUnwritable when the folder refuses this user's writes,
    HiddenNameTaken when a folder has that file's name."""
    try:
        yield
    except OSError as error:
        if error.errno == errno.EISDIR and error.filename is not None:
            raise HiddenNameTaken(error.errno, error.strerror, str(folder), None,
                                  Path(os.fsdecode(error.filename)).name) from error
        said = FolderUnwritable if error.errno in _WRITES_REFUSED else OSError
        raise said(error.errno, error.strerror, str(folder)) from error


class EmbeddedStoreHeld(StartRefused):
    """Another process (a running `govrag serve`, most likely) has the embedded store open: one process per path."""

    def __init__(self, path: Path) -> None:
        super().__init__(f"the embedded vector store in {path} is held by another process (a running `govrag serve`?):"
                         " stop it, or set GOVRAG_QDRANT_URL to a Qdrant server that several processes can share")
        self.path = path


# What an outage names (`Unavailable`, `unavailable_dependency`): fixed names, safe to send to a client (the API's 503
# carries one as its `dependency`), never an address nor an error's text.
Dependency = Literal["database", "vector store", "identity provider", "broker", "blob volume", "temporary directory"]


class Unavailable(UnpickledAsRaised):
    """A service govrag depends on did not answer (the vector store server, ...): nothing is wrong with the request or
    the document, and the same call succeeds once it is back. The API answers 503; ingestion waits it out."""

    def __init__(self, dependency: Dependency) -> None:
        super().__init__(f"the {dependency} is unavailable")
        self.dependency = dependency


# The database refused or dropped the connection (down, restarting, out of connections, locked, a deadlock victim).
_DATABASE_UNAVAILABLE = (db_errors.OperationalError, db_errors.InterfaceError, db_errors.TimeoutError,
                         db_errors.DisconnectionError)


def unavailable_dependency(exc: BaseException) -> Dependency | None:
    """Which dependency `exc` says is unreachable ("database", "vector store"), itself or through the failure it was
    raised from (`raise ... from`: the audit log's `unavailable` when the database goes as an event is written), or
    None for any other failure. Only the explicit cause is followed: a failure raised while handling an outage is no
    outage."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:  # a chain made into a loop by hand still ends
        if (dependency := _named_outage(cause)) is not None:
            return dependency
        seen.add(id(cause))
        cause = cause.__cause__
    return None


def _named_outage(exc: BaseException) -> Dependency | None:
    """The dependency `exc` itself says is unreachable, or None."""
    if isinstance(exc, Unavailable):
        return exc.dependency
    if isinstance(exc, _DATABASE_UNAVAILABLE) and not _statement_refused(exc):
        return "database"
    return None


def _statement_refused(exc: db_errors.SQLAlchemyError) -> bool:
    """PostgreSQL (or its client library) refused a statement for what it is, on a connection still up: more than
    65,535 parameters (no SQLSTATE), a program limit exceeded (SQLSTATE class 54). The same statement fails again
    however long the caller waits: a bug, not an outage. A lost connection, a deadlock, a lock or statement
    timeout, too many connections keep their SQLSTATE (or invalidate the connection) and stay outages; so does
    every SQLite error (no SQLSTATE attribute at all)."""
    if not isinstance(exc, db_errors.OperationalError) or exc.statement is None or exc.connection_invalidated:
        return False
    sqlstate = getattr(exc.orig, "sqlstate", "")
    return sqlstate is None or sqlstate.startswith("54")
