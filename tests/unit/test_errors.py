"""`unavailable_dependency`: the one way to ask whether a failure is an outage, and of which dependency; every error
govrag defines pickled and unpickled as it was raised."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import pytest
from safetensors import SafetensorError
from sqlalchemy.exc import OperationalError

from api.app import BodyTooLarge
from audit.exceptions import MirrorUnreadable
from authz.tokens import IdPURLRefused, VerifierSettingsRefused
from core import migrate
from core.blobs import GarbledMarker
from core.broker import RedisSkipped
from core.crypto import DecryptionError
from core.error_pickling import InterruptUnpickledAsRaised, UnpickledAsRaised
from core.errors import (
    AddressUnusable,
    BrokenInstall,
    EmbeddedStoreHeld,
    ErrorCode,
    FolderUnwritable,
    GovragError,
    HiddenNameTaken,
    MasterKeyFileMissing,
    MasterKeyFileUnreadable,
    MasterKeyRefused,
    MasterKeyVersionMissing,
    StartRefused,
    Unavailable,
    UnusablePath,
    loading,
    reading_tokenizer,
    unavailable_dependency,
)
from core.files import NOT_A_REGULAR_FILE, NotARegularFile
from core.http import BodyRefused, CredentialsInURL, NotDecodable, TooLarge, TooSlow, UnusablePort, URLRefused
from core.keystore import DepartmentKeyMissing, DepartmentKeyUnreadable
from guard.redteam import CorpusError, TokenRefused
from ingestion.keys import MasterRotationReport, OldMasterVersionsKept, OldMasterVersionsKeptInterrupted
from ingestion.sandbox import Abandoned, ProgramMissing
from ingestion.scratch import Terminated
from ingestion.service import DuplicateUpload
from retrieval.gguf_file import NotWholeGGUF
from retrieval.models import ModelClosed, ModelError
from tests.support.project_modules import project_modules
from workers.tasks import TransientFault


def _raised(failure: BaseException, cause: BaseException | None) -> BaseException:
    """`failure` as `raise failure from cause` leaves it."""
    try:
        raise failure from cause
    except BaseException as caught:  # noqa: BLE001 - handed back to the test
        return caught


def _database_down() -> OperationalError:
    return OperationalError("SELECT 1", {}, ConnectionRefusedError("connection refused"))


def _audit_unavailable(cause: BaseException) -> BaseException:
    """What the audit log raises when an event cannot be written (audit.service: `raise ... from exc`)."""
    return _raised(GovragError(ErrorCode.unavailable, "the audit log is unavailable"), cause)


def test_a_failure_raised_from_an_outage_names_the_dependency() -> None:
    """The audit log's `unavailable`, raised from the database going as the event was written, was no outage to
    anyone asking `unavailable_dependency` (only the key rotation CLI looked behind it, with a helper of its own);
    it now names the database, as deep as the explicit causes go."""
    assert unavailable_dependency(_audit_unavailable(_database_down())) == "database"
    kept = _raised(RuntimeError("old versions kept"), _audit_unavailable(Unavailable("vector store")))
    assert unavailable_dependency(kept) == "vector store"


def test_a_failure_raised_from_anything_else_or_while_handling_an_outage_is_none() -> None:
    assert unavailable_dependency(_audit_unavailable(ValueError("cannot hash the event"))) is None
    assert unavailable_dependency(_raised(RuntimeError("no cause"), None)) is None
    with pytest.raises(RuntimeError) as during:
        try:
            raise _database_down()
        except OperationalError:
            raise RuntimeError("a bug in the cleanup")  # noqa: B904 - its context, not its cause
    assert during.value.__context__ is not None and unavailable_dependency(during.value) is None


def test_a_cause_chain_made_into_a_loop_ends() -> None:
    first, second = RuntimeError("first"), RuntimeError("second")
    first.__cause__, second.__cause__ = second, first
    assert unavailable_dependency(first) is None


def _loaded(what: str, failure: Exception) -> BaseException:
    """What `loading(what)` lets out when the load inside it raises `failure`."""
    try:
        with loading(what):
            raise failure
    except BaseException as raised:  # noqa: BLE001 - handed back to the test
        return raised
    raise AssertionError("loading swallowed the failure")


@pytest.mark.parametrize("bug", [TypeError("takes 2 arguments"), AttributeError("no attribute 'coef'"),
                                 NameError("np"), AssertionError()], ids=lambda bug: type(bug).__name__)
def test_a_bug_in_a_load_is_no_broken_install(bug: Exception) -> None:
    """`loading` took any Exception for a broken install: a programming error said "reinstall govrag", which cannot
    fix it. Only what a file or library that does not load raises is one now."""
    assert _loaded("the PII model", bug) is bug


@pytest.mark.parametrize(("failure", "reason"), [
    (FileNotFoundError(2, "No such file or directory", "/x/scanner_weights.npz"),
     "No such file or directory on /x/scanner_weights.npz"),
    (ValueError("Cannot load file containing pickled data"), "ValueError"),
    (zipfile.BadZipFile("File is not a zip file"), "BadZipFile"),
    (KeyError("coef"), "KeyError"),
    (ModuleNotFoundError("No module named 'onnxruntime'", name="onnxruntime"), "ModuleNotFoundError (onnxruntime)"),
    (SafetensorError("Error while deserializing header"), "SafetensorError"),
], ids=lambda value: type(value).__name__ if isinstance(value, Exception) else "")
def test_what_a_file_or_library_that_does_not_load_raises_is_a_broken_install(failure: Exception,
                                                                                reason: str) -> None:
    raised = _loaded("the embedding model", failure)
    assert isinstance(raised, BrokenInstall) and raised.__cause__ is failure
    assert str(raised).startswith(f"cannot load the embedding model: {reason}; the install is broken")


def test_a_bare_exception_is_a_broken_install_only_from_a_tokenizer_load() -> None:
    """tokenizers refuses a garbled tokenizer.json with a bare Exception: `loading` took one from any load for a
    broken install, the PII model's or the scanner's too, where it is no refusal of a file. Only inside
    `reading_tokenizer` is it one."""
    bare = Exception("raised by a library for no file of ours")
    assert _loaded("the PII model", bare) is bare
    with pytest.raises(BrokenInstall, match=r"^cannot load the embedding model: ValueError; the install is broken"):
        with loading("the embedding model"), reading_tokenizer():
            raise Exception("expected value at line 1 column 1")  # what tokenizers raises
    with pytest.raises(TypeError), reading_tokenizer():
        raise TypeError("a bug stays one")


# One of each error a module of govrag defines (tests.support.project_modules), raised as the code raises it.
_ROTATED = MasterRotationReport(new_version=3, keys_rewrapped=4, retired_versions=(1, 2))
RAISED = [
    GovragError(ErrorCode.not_found, "document not found"),
    Unavailable("database"),
    StartRefused("cannot start"),
    UnusablePath.refused("the data directory /srv/data", PermissionError(13, "Permission denied", "/srv/data"),
                         "GOVRAG_DATA_DIR"),
    AddressUnusable("127.0.0.1:8000", OSError(98, "Address already in use")),
    MasterKeyRefused("it has no version 2", Path("/run/keys/master"), only_verifiers=True),
    MasterKeyFileMissing(Path("/run/keys/master")),
    MasterKeyFileUnreadable(Path("/run/keys/master"), "Permission denied"),
    MasterKeyVersionMissing(3, None, current=True),
    BrokenInstall("the embedding model", ValueError("garbled")),
    FolderUnwritable(13, "Permission denied", "/srv/inbox"),
    HiddenNameTaken(21, "Is a directory", "/srv/inbox", None, ".govrag-lock"),
    NotARegularFile(22, NOT_A_REGULAR_FILE, "/srv/data/audit-checkpoints.jsonl"),
    MirrorUnreadable(13, "Permission denied", "/srv/data/audit-checkpoints.jsonl"),
    EmbeddedStoreHeld(Path("/srv/data/qdrant")),
    VerifierSettingsRefused("GOVRAG_JWKS_URL or GOVRAG_OIDC_ISSUER is required"),
    IdPURLRefused("GOVRAG_OIDC_ISSUER is not an https URL"),
    DepartmentKeyUnreadable("hr"),
    DepartmentKeyMissing("hr"),
    OldMasterVersionsKept(_ROTATED),
    OldMasterVersionsKeptInterrupted(_ROTATED),
    DuplicateUpload("0b6f7f1e-4f61-4b8e-9c3e-2f1a5d7c9e01"),
    BodyTooLarge(),
    GarbledMarker(),
    RedisSkipped(),
    DecryptionError("ciphertext failed authentication"),
    TooSlow("no complete response within 10 s"),
    URLRefused("must be an http(s) URL, such as http://127.0.0.1:8000"),
    CredentialsInURL("must not hold a user name or password (user:password@)"),
    UnusablePort("must name a port from 1 to 65535"),
    BodyRefused(502, "the body is cut short"),
    TooLarge(200, "the body is over 1048576 bytes"),
    NotDecodable(200, "the body is not valid gzip"),
    migrate.MigrationError("cannot migrate"),
    migrate.DatabaseUnreachable("cannot reach the database at 127.0.0.1:5432: connection refused"),
    migrate.UnknownRevision("database schema is at 9999, which this release does not know"),
    migrate.SchemaMismatch("database schema is at 0015, this release needs 0016: run govrag migrate"),
    migrate.DeploymentMissing("the database records no deployment id"),
    migrate.DowngradeRefused("refusing to undo revision 0016"),
    migrate.MigrationInterrupted("interrupted; the database is at 0015 (run govrag migrate again to finish)"),
    TokenRefused(),
    CorpusError("no eval-split attack in the corpus in /srv/corpus"),
    Abandoned(),
    ProgramMissing(2, "No such file or directory", "pdftotext"),
    Terminated(),
    NotWholeGGUF("it does not start as a GGUF file does"),
    ModelError("RuntimeError"),
    ModelClosed("the answer model was closed"),
    TransientFault("OperationalError"),
]


def _error_kinds() -> set[type[BaseException]]:
    """Every public exception class a module of govrag defines, the pickling bases (never raised) left out."""
    return {kind for module in project_modules() for kind in vars(module).values()
            if isinstance(kind, type) and issubclass(kind, BaseException) and kind.__module__ == module.__name__
            and not kind.__name__.startswith("_")} - {UnpickledAsRaised, InterruptUnpickledAsRaised}


def test_every_error_govrag_defines_is_checked_for_pickling() -> None:
    """A new error (or subclass of one) anywhere in govrag is in RAISED, so the test below checks that it pickles
    whole. The check looked only at core.errors' errors and their subclasses: OldMasterVersionsKeptInterrupted (a
    KeyboardInterrupt) and core.http's BodyRefused (its status an argument) were not among them, and neither came back
    from a pickle (a TypeError)."""
    assert {type(error) for error in RAISED} == _error_kinds()


@pytest.mark.parametrize("raised", RAISED, ids=lambda error: type(error).__name__)
def test_an_error_unpickles_as_it_was_raised(raised: BaseException) -> None:
    """A Celery worker's exception crosses the pool's pipe pickled: `Unavailable("database")` came back saying "the the
    database is unavailable is unavailable" (its built line passed to its `__init__` again), a department key
    unreadable with its line built twice, a GovragError, a master key refused, old master versions kept (a Ctrl-C
    cutting their removal too) or a body refused as a TypeError or an AttributeError. Its line, its args and every
    field (code, dependency, path, status, ...) are kept."""
    assert _as_said(pickle.loads(pickle.dumps(raised))) == _as_said(raised)  # noqa: S301 - pickled here


def _as_said(error: BaseException) -> tuple[object, ...]:
    """What an error says: its type, line and args, its attributes, and an OSError's own (not among them)."""
    said_by_os = tuple(getattr(error, name) for name in ("errno", "strerror", "filename", "filename2")
                       if isinstance(error, OSError))
    return type(error), str(error), error.args, vars(error), said_by_os
