"""`govrag audit ...` and `govrag export training-data`: operator commands with database access.

An operator who can run these holds the database credentials and the checkpoint key, so the CLI acts with
global scope; every export and purge is still written to the ledger under `cli:<actor>`.
"""

from __future__ import annotations

import argparse
import errno
import functools
import getpass
import json
import os
import secrets
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO, TextIO

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import TypeAdapter
from sqlalchemy.orm import Session

from api import cli_args
from api.cli_failures import failure
from audit.integrity import load_public_keys
from audit.schemas import (
    AdminEventType,
    Decision,
    EventType,
    ExportDocumentId,
    ExportFilters,
    ExportFormat,
    ExportSubject,
    RequestId,
    deployment_pin,
    utc_bound,
)
from authz.identity import MAX_SUBJECT_CHARS, Identity, operator_identity
from core import keystore, migrate
from core.crypto import sync_folder
from core.db import get_session_factory
from core.errors import ErrorCode, GovragError, making_files_in
from core.files import regular_file_opener
from core.models import DOCUMENT_ID_CHARS
from core.settings import get_settings
from core.text import DepartmentName

EXIT_UNVERIFIED = 3  # `govrag audit verify`: the ledger fails verification (told apart from an outage's 1)


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`govrag audit verify|export|verify-export|verify-mirror|public-key|checkpoint|purge`; `govrag export
    training-data`."""
    audit = commands.add_parser("audit", help="verify, export, checkpoint or purge the ledger; check an export or a "
                                "checkpoint mirror file")
    audit_commands = audit.add_subparsers(required=True, metavar="ACTION")
    verifying = (f"walk the hash chain and signed checkpoints; exit {EXIT_UNVERIFIED} when the ledger fails "
                 "verification (tampering), 1 when the database is unavailable")
    verifying_ledger = audit_commands.add_parser("verify", help=verifying, description=verifying)
    verifying_ledger.add_argument("--deployment-id", type=deployment_id_argument,
                                  help="the deployment the database must be (the id recorded, a UUID): another is "
                                  f"reason other_deployment, exit {EXIT_UNVERIFIED}")
    verifying_ledger.set_defaults(run=verify)
    exporting = audit_commands.add_parser("export", help="stream ledger events (JSONL, CSV or OCSF) with a manifest")
    add_export_arguments(exporting)
    exporting.set_defaults(run=export)
    checking = (f"check an export file against its signed manifest (whole, unchanged, this deployment's); exit "
                f"{EXIT_UNVERIFIED} when it fails")
    checking_export = audit_commands.add_parser("verify-export", help=checking, description=checking)
    checking_export.add_argument("file", help="the export, its manifest the last line")
    checking_export.add_argument("--deployment-id", type=deployment_id_argument,
                                 help="the deployment it must come from, a UUID (default: this database's); with "
                                 "GOVRAG_AUDIT_CHECKPOINT_KEY set, no database is needed")
    checking_export.add_argument("--public-key", type=public_key_argument, metavar="PEM_FILE",
                                 help="check the manifest's Ed25519 signature with this public key (`govrag audit "
                                 "public-key`) alone, no secret, no database; takes --deployment-id")
    checking_export.set_defaults(run=verify_export)
    mirroring = (f"check a checkpoint mirror file (GOVRAG_AUDIT_CHECKPOINT_FILE) with the Ed25519 public key alone, "
                 f"no secret, no database: every checkpoint this deployment's, as signed; exit {EXIT_UNVERIFIED} when "
                 "it fails")
    checking_mirror = audit_commands.add_parser("verify-mirror", help=mirroring, description=mirroring)
    checking_mirror.add_argument("file", help="the mirror file, a checkpoint a line")
    checking_mirror.add_argument("--public-key", type=public_keys_argument, metavar="PEM_FILE", required=True,
                                 action="extend", help="the public key `govrag audit public-key` printed; again for "
                                 "each key used before a rotation, the current one first (a previous key's line holds "
                                 "only up to the newest event a line of the first key anchors); a file of several "
                                 "keys (`public-key --all`) gives each, in its order")
    checking_mirror.add_argument("--deployment-id", type=deployment_id_argument, required=True,
                                 help="the deployment the checkpoints must be of, a UUID (deployments sharing a "
                                 "checkpoint key share the public key)")
    checking_mirror.set_defaults(run=verify_mirror)
    publishing = audit_commands.add_parser(
        "public-key", help="print the Ed25519 public key (PEM) that checks this deployment's export manifests and "
        "checkpoints (give it to auditors: it cannot sign)")
    publishing.add_argument("--all", action="store_true", help="after the current key, print the public key of each "
                            "previous checkpoint key (GOVRAG_AUDIT_CHECKPOINT_PREVIOUS_KEYS), as configured: they "
                            "check what was signed before a rotation")
    publishing.set_defaults(run=public_key)
    audit_commands.add_parser(
        "checkpoint", help="sign a checkpoint at the end of the chain (none when the newest covers it)").set_defaults(
        run=checkpoint)
    purging = audit_commands.add_parser("purge", help="retention: signed, audited purge of expired events")
    add_actor_argument(purging)
    purging.set_defaults(run=purge)

    export_data = commands.add_parser("export", help="export data sets")
    export_kinds = export_data.add_subparsers(required=True, metavar="KIND")
    training = export_kinds.add_parser("training-data", help="redacted chunks queries may cite, as JSONL")
    training.add_argument("--department", required=True)
    training.add_argument("--output", "-o", default="-", help="file path, or - for stdout")
    add_actor_argument(training)
    training.set_defaults(run=training_data)


def add_actor_argument(parser: argparse.ArgumentParser) -> None:
    """--actor: who is running the command, as recorded in the ledger."""
    parser.add_argument("--actor", type=cli_args.actor, default=None,
                        help="recorded as cli:<actor> (default: the OS user)")


def deployment_id_argument(text: str) -> str:
    """--deployment-id: a UUID, normalised as `GET /v1/audit/verify?deployment_id=` takes it (`deployment_pin`);
    anything else a usage error (exit 2), not a verification failed as if by another deployment (exit 3)."""
    try:
        return deployment_pin(text)
    except ValueError:
        raise argparse.ArgumentTypeError("not a UUID; give the deployment_id that `govrag audit verify` "
                                         "prints") from None


def public_keys_argument(path: str) -> list[Ed25519PublicKey]:
    """--public-key of verify-mirror: every Ed25519 public key in a PEM file, in its order (`public-key --all`
    writes several); a file holding anything else a usage error (exit 2)."""
    try:
        return load_public_keys(Path(path).read_bytes())
    except (OSError, ValueError) as exc:
        raise argparse.ArgumentTypeError(f"no Ed25519 public key in PEM there ({type(exc).__name__}); give the file "
                                         "`govrag audit public-key` wrote") from None


def public_key_argument(path: str) -> Ed25519PublicKey:
    """--public-key of verify-export: a PEM file holding one Ed25519 public key; a file of several a usage error (exit
    2), as anything else is: the export checks with one key, and the file's first may not be the one that signed."""
    keys = public_keys_argument(path)
    if len(keys) > 1:
        raise argparse.ArgumentTypeError(f"the file holds {len(keys)} public keys; give the file of the one key the "
                                         "manifest's key_id names (`govrag audit public-key --all` says each key id)")
    return keys[0]


def filter_argument(kind: Any, rule: str) -> Callable[[str], str]:
    """An argparse type for an export filter, read as the API's query parameter of type `kind` reads it (one
    definition for both, `audit.schemas`): a value the API takes the command takes too; anything else a usage error
    (exit 2) saying `rule`, never quoting the value, before anything is exported or recorded."""
    adapter = TypeAdapter(kind)

    def checked(text: str) -> str:
        try:
            return str(adapter.validate_python(text))
        except ValueError:
            raise argparse.ArgumentTypeError(rule) from None

    return checked


def window_bound(text: str) -> datetime:
    """An ISO time for --since/--until, in UTC as the API takes it (argparse reports a ValueError as a usage error)."""
    return utc_bound(datetime.fromisoformat(text))


_PRINTABLE = "printable characters, no line break nor control character"
_DECISIONS = ", ".join(decision.value for decision in Decision)


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    """Filters and format of `govrag audit export`."""
    parser.add_argument("--format", choices=[f.value for f in ExportFormat], default="jsonl")
    parser.add_argument("--since", type=window_bound, help="ISO time, inclusive")
    parser.add_argument("--until", type=window_bound, help="ISO time, exclusive")
    parser.add_argument("--user", dest="subject", help="the subject whose events to export",
                        type=filter_argument(ExportSubject, f"1 to {MAX_SUBJECT_CHARS} {_PRINTABLE}"))
    parser.add_argument("--department", type=filter_argument(DepartmentName, "not a department name (lower-case "
                                                                             "letters, digits, '-' or '_')"))
    parser.add_argument("--decision", help=f"one of {_DECISIONS}",
                        type=filter_argument(Decision, f"not a decision; give one of {_DECISIONS}"))
    parser.add_argument("--document-id", type=filter_argument(ExportDocumentId,
                                                              f"1 to {DOCUMENT_ID_CHARS} {_PRINTABLE}"))
    parser.add_argument("--event-type", type=filter_argument(EventType, "not an event type the ledger records "
                                                                        "(`retrieval`, `export`, an admin action)"))
    parser.add_argument("--request-id", help="the events of one API request (its X-Request-ID) or one command's run "
                        "(cli-...)", type=filter_argument(RequestId, "not a request id; give an API request's "
                                                          "X-Request-ID (32 lower-case hex digits) or a command run's "
                                                          "(cli- and 32)"))
    parser.add_argument("--output", "-o", default="-", help="file path, or - for stdout")
    add_actor_argument(parser)


@contextmanager
def operator_session(*, opens_keys: bool = False) -> Iterator[Session]:
    """A session on the configured database at the code's revision (migrated first only where
    `migrate.command_migrates_first`: the embedded SQLite database in development; else SchemaMismatch, said by
    `cli.main`, before any command reads or writes: a ledger verified on a schema the code does not know proves nothing
    either; audit.service is imported here: it loads the PII models). A command that `opens_keys`, or signs and checks
    checkpoints with the key the master key wraps, first checks that the master key opens the stored keys
    (MasterKeyRefused, said by `cli.main`): checkpoints checked with another key would all be reported as tampered."""
    settings = get_settings()
    migrate.require_head_for_command(settings)
    if opens_keys or settings.audit_checkpoint_key is None:
        keystore.require_master_opens(settings)
    session = get_session_factory(settings.resolved_database_url)()
    try:
        yield session
    finally:
        session.close()


def reported(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Every command here, and `govrag reindex`: a known failure (`cli_failures.failure`) is its one line instead of
    a traceback: a refusal, a file that cannot be written (or read) or a department key that does not open, exit 2; an
    outage (the database, gone before the command or behind the ledger's `unavailable` as an event is recorded), said
    as `govrag ingest` says one, exit 1, never with the server's address; a Ctrl-C, exit 130 (a file being written is
    removed)."""

    @functools.wraps(command)
    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except (Exception, KeyboardInterrupt) as exc:
            if (stop := failure(exc, where=getattr(args, "output", ""))) is None:  # an export's file
                raise
            print(stop.line, file=sys.stderr)
            return stop.exit_code

    return run


def actor(args: argparse.Namespace) -> Identity:
    """Who runs the command, as the ledger records them: cli:<--actor>, or cli:<the OS user>."""
    return operator_identity(args.actor or getpass.getuser())


@reported
def verify(args: argparse.Namespace) -> int:
    """Print the verification result; exit EXIT_UNVERIFIED when the ledger fails verification (tampering, or a
    database other than --deployment-id), never 1: a monitor reading only the exit code tells it from an outage."""
    from audit import service as audit_service

    with operator_session() as session:
        result = audit_service.verify(session=session, settings=get_settings(), deployment_id=args.deployment_id)
    print(result.model_dump_json())
    return 0 if result.ok else EXIT_UNVERIFIED


@reported
def export(args: argparse.Namespace) -> int:
    """Stream the export; the manifest is the last line (and, for a file, also <file>.manifest.json)."""
    from audit import service as audit_service

    filters = ExportFilters(since=args.since, until=args.until, subject=args.subject, department=args.department,
                            decision=args.decision, document_id=args.document_id, event_type=args.event_type,
                            request_id=args.request_id)
    return _exported(args, AdminEventType.export, lambda session: audit_service.export_events(
        session=session, settings=get_settings(), identity=actor(args), scope=None, filters=filters,
        fmt=ExportFormat(args.format)))


@reported
def verify_export(args: argparse.Namespace) -> int:
    """Print the export check; exit EXIT_UNVERIFIED when the export fails it. Reads no ledger row: with --public-key,
    or with the checkpoint key configured and --deployment-id given, not the database either. A FILE.manifest.json
    beside the file must be the manifest the file ends with (`manifest_file_mismatch`)."""
    from audit import service as audit_service

    settings = get_settings()
    file = Path(args.file)
    with file.open("rb") as opened, _seekable(opened) as export_file, _if_a_file(_manifest_path(file)) as copy:
        keyed = args.deployment_id is not None and settings.audit_checkpoint_key is not None
        if args.public_key is not None or keyed:
            result = audit_service.verify_export(export_file=export_file, settings=settings, session=None,
                                                 deployment_id=args.deployment_id, public_key=args.public_key,
                                                 manifest_copy=copy)
        else:
            with operator_session() as session:
                result = audit_service.verify_export(export_file=export_file, settings=settings, session=session,
                                                     deployment_id=args.deployment_id, manifest_copy=copy)
    print(result.model_dump_json())
    return 0 if result.ok else EXIT_UNVERIFIED


@reported
def verify_mirror(args: argparse.Namespace) -> int:
    """Print the mirror check; exit EXIT_UNVERIFIED when the file fails it. Reads no database and no key but the
    public one."""
    from audit import service as audit_service

    with Path(args.file).open("rb") as mirror:
        result = audit_service.verify_mirror(mirror=mirror, public_keys=args.public_key,
                                             deployment_id=args.deployment_id)
    print(result.model_dump_json())
    return 0 if result.ok else EXIT_UNVERIFIED


@contextmanager
def _if_a_file(path: Path) -> Iterator[BinaryIO | None]:
    """`path` opened for bytes; None when there is none (no manifest beside an export from the API, or one moved
    alone: nothing to check it against). Opened once, with no check before that it could be swapped after: anything
    there but a regular file is refused (a named pipe: NotARegularFile, never waited on; a folder:
    IsADirectoryError)."""
    try:
        opened = open(path, "rb", opener=regular_file_opener)  # closed below
    except FileNotFoundError:
        opened = None
    if opened is None:
        yield None
        return
    with opened:
        yield opened


@contextmanager
def _seekable(opened: BinaryIO) -> Iterator[BinaryIO]:
    """`opened`, or, when it is a pipe (`<(zcat export.jsonl.gz)`, /dev/stdin), a copy in an unnamed temporary file:
    the check reads the manifest from the end first, then the rows, so it seeks."""
    if opened.seekable():
        yield opened
        return
    with tempfile.TemporaryFile() as copy:
        shutil.copyfileobj(opened, copy)
        yield copy


@reported
def training_data(args: argparse.Namespace) -> int:
    """Write the redacted training set with its manifest."""
    from audit import service as audit_service

    return _exported(args, AdminEventType.training_export, lambda session: audit_service.export_training_data(
        session=session, settings=get_settings(), identity=actor(args), department=args.department),
        opens_keys=True)


def _exported(args: argparse.Namespace, recorded_as: AdminEventType, lines: Callable[[Session], Iterator[str]], *,
              opens_keys: bool = False) -> int:
    """Write the export `lines` records (as `recorded_as`) and streams to --output. Once it is recorded, an export
    that does not end whole in its place (a full disk, a rename refused, a Ctrl-C, the database lost midway) is
    recorded as failed too: the ledger never says an export was made that no file holds."""
    recorded = False
    try:
        with _output(args.output) as output, operator_session(opens_keys=opens_keys) as session:
            exported = lines(session)  # recorded before the first row is read
            recorded = True
            output.manifest = _copy(exported, output.handle)
    except BaseException as error:
        if recorded:
            _record_failed(args, recorded_as, error)
        raise
    return 0


def _record_failed(args: argparse.Namespace, export_type: AdminEventType, error: BaseException) -> None:
    """An `export_failed` event after the export event of `export_type`, by the same actor and department
    (`audit.service.record_export_failed`, which the API's export records its own with)."""
    from audit import service as audit_service

    audit_service.record_export_failed(settings=get_settings(), identity=actor(args), export_type=export_type,
                                       departments=[args.department] if args.department else [], failure=error)


@reported
def public_key(args: argparse.Namespace) -> int:
    """Print the Ed25519 public key (PEM) that checks this deployment's export manifests; its key id and the
    deployment id, which an auditor keeps with it, on stderr (the PEM alone is redirected to a file). With --all, the
    previous keys' after it, each key id on a line of stderr of its own."""
    from audit import service as audit_service

    with operator_session() as session:
        published = audit_service.published_keys(session=session, settings=get_settings())
    print(published.public_key_pem, end="")
    print(f"key_id {published.key_id}, deployment_id {published.deployment_id}", file=sys.stderr)
    for key in published.previous if args.all else []:
        print(key.public_key_pem, end="")
        print(f"previous key_id {key.key_id}", file=sys.stderr)
    return 0


@reported
def checkpoint(_args: argparse.Namespace) -> int:
    """Sign a checkpoint at the end of the chain, unless the newest one covers it (the output says which)."""
    from audit import service as audit_service

    with operator_session() as session:
        event_id, signed = audit_service.checkpoint_now(session=session, settings=get_settings())
    said: dict[str, object] = {"checkpointed_event_id": event_id, "signed": signed}
    if not signed:
        said["note"] = "the ledger is empty" if event_id is None else "nothing appended since the newest checkpoint"
    print(json.dumps(said))
    return 0


@reported
def purge(args: argparse.Namespace) -> int:
    """Apply the retention period (GOVRAG_AUDIT_RETENTION_DAYS)."""
    from audit import service as audit_service

    settings = get_settings()
    if settings.audit_retention_days is None:
        raise GovragError(ErrorCode.invalid_request,
                          "no retention period configured (GOVRAG_AUDIT_RETENTION_DAYS); nothing purged")
    with operator_session() as session:
        removed = audit_service.purge_expired(session=session, settings=settings, identity=actor(args))
    print(json.dumps({"purged": removed}))
    return 0


@dataclass
class _Output:
    """Where an export is written, and its manifest (its last line) once written."""

    handle: TextIO
    manifest: str = ""


@contextmanager
def _output(output: str) -> Iterator[_Output]:
    """Where an export goes, opened before the export is recorded: a path that cannot be written fails before the
    ledger says anything was exported. A file is written whole with its manifest or not at all (`_written_whole`). A
    folder that does not exist (or is a file), or that this user may not write, is said naming it, not the hidden file
    written beside the path; so is a path that is a folder."""
    if output == "-":
        yield _Output(sys.stdout)
        return
    path = Path(output)
    if not path.parent.is_dir():
        if path.parent.exists():
            raise NotADirectoryError(errno.ENOTDIR, "not a folder", str(path.parent))
        raise FileNotFoundError(errno.ENOENT, "the folder does not exist", str(path.parent))
    if path.is_dir():  # else written in full beside it, the export recorded, and only the rename refused
        raise _a_folder(path)
    with _written_whole(path) as written:
        yield written


@contextmanager
def _written_whole(path: Path) -> Iterator[_Output]:
    """`path` and `path`.manifest.json (the manifest the block sets, as JSON) each written through a hidden file of
    this write's own beside it (`.<name>.<random>.partial`, made new: never shared by two writes of the same path),
    synced to disk, then renamed into place once both are whole, the earlier manifest removed first: a manifest
    beside `path` is never another export's (a failure from that removal to the last rename leaves `path`, the
    earlier or the new, without one). Mode 0600,
    kept: an export names who asked what, so it is its owner's alone, whatever the file it replaces allowed. A write
    that fails (a full disk), is interrupted (Ctrl-C, from the moment a hidden file is made) or is refused leaves no
    hidden file, and `path` and its manifest as they were; of two writes of one path, the one renamed last is the
    file, whole. A refused rename (`path` made a folder meanwhile) names `path`, never the hidden file."""
    manifest_path = _manifest_path(path)
    hidden: list[str] = []
    try:
        with _hidden_file(path, hidden) as handle:
            written = _Output(handle)
            yield written
        with _hidden_file(manifest_path, hidden) as handle:
            _write_manifest(handle, written.manifest)
        with _said_of(manifest_path):
            manifest_path.unlink(missing_ok=True)
        for name, target in zip(hidden, (path, manifest_path), strict=True):
            with _said_of(target):
                os.replace(name, target)
    except BaseException:
        for name in hidden:
            Path(name).unlink(missing_ok=True)
        raise
    sync_folder(path.parent)  # the renames themselves survive a power cut


@contextmanager
def _hidden_file(path: Path, made: list[str]) -> Iterator[TextIO]:
    """A new hidden file beside `path`, open for the block to write and synced to disk once it ends. Its name is drawn
    and added to `made` (which the caller removes on failure) before the file is made, so a Ctrl-C as it is made, or
    at any moment after, leaves none."""
    hidden = str(path.with_name(f".{path.name}.{secrets.token_hex(8)}.partial"))  # 64 random bits: this write's own
    made.append(hidden)
    try:
        with making_files_in(path.parent):  # a folder this user may not write: said of it, not of the hidden file
            descriptor = os.open(hidden, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        made.remove(hidden)  # another write's: never removed by this one
        raise
    with os.fdopen(descriptor, "w", encoding="utf-8", newline="") as handle:
        yield handle
        handle.flush()
        os.fsync(handle.fileno())  # a full disk some file systems only report here, before the rename, not after


@contextmanager
def _said_of(path: Path) -> Iterator[None]:
    """Around removing or renaming over `path`: a refusal names `path` (the system's names the hidden file first,
    which the user never named nor sees), a folder there as an export to a folder says it."""
    try:
        yield
    except IsADirectoryError as error:
        raise _a_folder(path) from error
    except OSError as error:
        raise OSError(error.errno, error.strerror, str(path)) from error


def _a_folder(path: Path) -> IsADirectoryError:
    """What an export to `path`, a folder, fails with."""
    return IsADirectoryError(errno.EISDIR, "a folder, not a file (give a file's path)", str(path))


def _manifest_path(path: Path) -> Path:
    """Where a file export's manifest is written beside it, and where verify-export looks for it."""
    return path.with_name(path.name + ".manifest.json")


def _write_manifest(handle: TextIO, last_line: str) -> None:
    """A file export's manifest (its last line) as <file>.manifest.json holds it."""
    handle.write(last_line.removeprefix("# manifest "))


def _copy(lines: Iterator[str], handle: TextIO) -> str:
    last = ""
    for line in lines:
        handle.write(line)
        last = line
    return last
