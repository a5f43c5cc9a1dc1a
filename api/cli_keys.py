"""`govrag keys rotate`: new department keys (document keys rewrapped) or a new master key (department keys
rewrapped), each rotation audited as it commits (issue 3)."""

from __future__ import annotations

import argparse
import shlex
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

from api import cli_args
from api.cli_failures import failure
from core import keystore, migrate
from core.settings import get_settings

if TYPE_CHECKING:
    from ingestion.keys import MasterRotationReport, RotationReport


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `keys rotate`."""
    keys = commands.add_parser("keys", help="key management")
    key_commands = keys.add_subparsers(required=True, metavar="ACTION")
    rotate = key_commands.add_parser("rotate", help="new department keys (document keys rewrapped) or a new "
                                                    "master key (department keys rewrapped); no re-embedding")
    scope = rotate.add_mutually_exclusive_group()
    scope.add_argument("--department", action="append", dest="departments",
                       help="only this department (repeatable; default: all)")
    scope.add_argument("--master", action="store_true", help="rotate the master key instead")
    rotate.add_argument("--actor", type=cli_args.actor, default="cli", help="who is recorded in the audit ledger")
    rotate.set_defaults(run=rotate_command)


def rotate_command(args: argparse.Namespace) -> int:
    """Rotate department keys (or the master key), each rotation audited as it commits; a database outage, a Ctrl-C
    (at the start or midway), a department key that does not open or a key file that cannot be written
    (`cli_failures.failure`) is one line saying what is done and how to go on, exit 1 (130 for a Ctrl-C, 2 for the
    key row or the file). The schema is
    migrated first only on the embedded SQLite database in development (`migrate.command_migrates_first`); else one at
    another revision than the code's is refused first (SchemaMismatch, said by `cli.main`)."""
    if args.master:
        return _rotate_master(args)
    from authz import service as authz_service
    from authz.identity import operator_identity
    from core.db import unit_of_work
    from ingestion import keys

    settings = get_settings()
    try:
        migrate.require_head_for_command(settings)
        keystore.require_master_opens(settings)
        with unit_of_work(settings.resolved_database_url) as session:
            chosen, unknown = authz_service.departments_named(session=session, named=args.departments or [])
    except (Exception, KeyboardInterrupt) as exc:  # before any rotation began
        if (stop := failure(exc)) is None:
            raise
        Console(stderr=True).print(f"{stop.why}; nothing rotated: run the same command again {stop.when}",
                                   markup=False)
        return stop.exit_code
    if unknown:
        Console(stderr=True).print(f"no such department: {', '.join(unknown)}; nothing rotated", markup=False)
        return 2
    if not chosen:  # no department yet (a fresh embedded default): done, and said rather than an empty table
        Console().print("no departments yet; nothing to rotate")
        return 0
    reports: list[keys.RotationReport] = []
    identity = operator_identity(args.actor)
    try:
        for department in chosen:  # one by one: an outage leaves the ones done audited, and this loop knows them
            reports += keys.rotate_department_keys(settings=settings, identity=identity, departments=[department])
    except (Exception, KeyboardInterrupt) as exc:  # a Ctrl-C as an outage: no traceback to read
        if (stop := failure(exc)) is None:
            raise
        _rotation_stopped(reports, stop.why, chosen[len(reports):], args.actor, stop.when)
        return stop.exit_code
    _print_rotations(reports)
    return 0 if reports or not args.departments else 1


def _print_rotations(reports: list[RotationReport]) -> None:
    """The rotations done, then a line (on stderr) per department with documents whose key no longer opened."""
    table = Table(title="key rotation")
    for column in ("department", "new key version", "document keys rewrapped", "document keys unreadable"):
        table.add_column(column)
    for report in reports:
        table.add_row(report.department, str(report.new_version), str(report.documents_rewrapped),
                      str(len(report.documents_unreadable)))
    Console().print(table)
    for report in reports:
        if report.documents_unreadable:
            Console(stderr=True).print(
                f"{report.department}: the data keys of these documents no longer open under the department key "
                f"(their key rows altered in the database), so they were not rewrapped and are lost for good with "
                f"the old key version: {', '.join(report.documents_unreadable)}; delete each (DELETE "
                "/v1/documents/<id>) or upload it again", markup=False, soft_wrap=True)  # one line, for a log


def _rotation_stopped(done: list[RotationReport], why: str, left: list[str], actor: str, when: str) -> None:
    """What an outage or a Ctrl-C midway left: the rotations committed (each audited with it), and the command that
    rotates the rest (the one it stopped in, begun and not finished, is redone under a newer version: nothing is
    lost)."""
    if done:
        _print_rotations(done)
    rotated = ", ".join(f"{report.department} (v{report.new_version})" for report in done) or "none"
    named = [argument for department in left for argument in ("--department", department)]
    again = shlex.join(["govrag", "keys", "rotate", *named, "--actor", actor])
    Console(stderr=True).print(f"{why}; rotated and audited: {rotated}; not rotated: {', '.join(left)}; run "
                               f"`{again}` {when}", markup=False)


def _rotate_master(args: argparse.Namespace) -> int:
    """Rotate the master key, audited (an admin event without a department) as the rotation's last step commits."""
    from authz.identity import operator_identity
    from ingestion import keys

    settings = get_settings()
    where = "removed from the key file" if settings.master_key is None else "remove them from GOVRAG_MASTER_KEY"
    try:
        migrate.require_head_for_command(settings)
        keystore.require_master_opens(settings)
        report = keys.rotate_master_key(settings=settings, identity=operator_identity(args.actor))
    except LookupError as exc:  # keys from settings: the new version must be supplied first
        Console(stderr=True).print(str(exc))
        return 2
    except (keys.OldMasterVersionsKept, keys.OldMasterVersionsKeptInterrupted) as kept:  # rotated and audited
        if (code := _master_stopped(kept.report, kept.__cause__ or kept)) is None:
            raise
        return code
    except (Exception, KeyboardInterrupt) as exc:  # a Ctrl-C as an outage: no traceback to read
        if (code := _master_stopped(None, exc)) is None:
            raise
        return code
    rewrapped = report.keys_rewrapped
    Console().print(f"master key now v{report.new_version}: {rewrapped} key{'s' * (rewrapped != 1)} rewrapped; "
                    f"old versions no longer needed: {_versions(report.retired_versions)} ({where})")
    return 0


def _master_stopped(kept: MasterRotationReport | None, exc: BaseException) -> int | None:
    """Say what a known failure (`cli_failures.failure`: an outage, a Ctrl-C, a key file that cannot be written) left
    of the master rotation: not rotated (nothing audited), or rotated and audited with the old versions `kept` in the
    key file; and the exit code. None for any other failure."""
    if (stop := failure(exc)) is None:
        return None
    if kept is None:
        left, then = "the master key is not rotated (nothing audited, every key stays readable)", ""
    else:
        left = (f"the master key is now v{kept.new_version} and audited, but the old versions "
                f"({_versions(kept.retired_versions)}) are still in the key file, unused")
        then = " (it rotates once more and removes them)"
    Console(stderr=True).print(f"{stop.why}; {left}: run the same command again {stop.when}{then}", markup=False)
    return stop.exit_code


def _versions(versions: tuple[int, ...]) -> str:
    return ", ".join(f"v{v}" for v in versions) or "none"
