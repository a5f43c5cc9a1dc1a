"""What a `govrag` command says of a failure it knows, in one place: a Ctrl-C, a dependency unavailable, a department
key that does not open, a refusal of the user's input, a failure of the deployment's own (its state, data or
settings), a path the system refuses. Each is one line, never a traceback nor a server's address, with README's exit
code (130, 1, 2); the command adds what the failure left (`Failure.why`, `when`), and `cli.main` says, as `line`, one
that a command let out. Light to import (what `failure` tells apart is imported as it
runs): `cli.main` says a Ctrl-C with it while the command's own imports have not finished."""

from __future__ import annotations

from typing import NamedTuple

EXIT_FAILED = 1  # it ran and something failed: a dependency unavailable
EXIT_USAGE = 2  # changed nothing, something to fix first: a refusal, a path, a key row altered, a failure of its own
EXIT_INTERRUPTED = 130  # a Ctrl-C, as a shell says a process SIGINT ended


class Failure(NamedTuple):
    """A known failure: what it is, when the same command run again goes on, and the exit code."""

    why: str  # "interrupted", "stopped: the database is unavailable", "failed: ...", "refused: ..."
    when: str  # "to go on", "once it is back", "once that row is restored", "once that is fixed"
    exit_code: int

    @property
    def line(self) -> str:
        """The failure said alone, for a command that changed nothing: what to fix (exit 2, the reason says it), or
        else to run it again and when."""
        return self.why if self.exit_code == EXIT_USAGE else f"{self.why}; run the same command again {self.when}"


INTERRUPTED = Failure("interrupted", "to go on", EXIT_INTERRUPTED)


def failure(exc: BaseException, *, where: str = "") -> Failure | None:
    """The known failure `exc` is, or None for any other (a bug: its traceback is the way to find it), and for a
    Ctrl-C in a migration, which `cli.main` says with the revision it left. An outage is found through the failure a
    refusal was raised from (the ledger's `unavailable`); `where`: the path an OSError naming none was about."""
    from core.errors import FolderUnwritable, GovragError, HiddenNameTaken, unavailable_dependency
    from core.keystore import DepartmentKeyUnreadable
    from core.migrate import MigrationInterrupted

    if isinstance(exc, MigrationInterrupted):
        return None
    if isinstance(exc, KeyboardInterrupt):
        return INTERRUPTED
    if isinstance(exc, DepartmentKeyUnreadable):
        return department_key_failure(str(exc))
    if (dependency := unavailable_dependency(exc)) is not None:
        return Failure(f"stopped: the {dependency} is unavailable", "once it is back", EXIT_FAILED)
    if isinstance(exc, GovragError):  # by what it means, not its status: a 410 or the ledger's own 503 refuses nothing
        said = "refused" if exc.code.refuses_input else "failed"
        return Failure(f"{said}: {exc.message}", "once that is fixed", EXIT_USAGE)
    if isinstance(exc, FolderUnwritable):  # of the folder the user gave, never of the hidden file made there
        return Failure(f"failed: cannot write in the folder {exc.filename} ({exc.strerror}): make it writable for "
                       "this user", "once that is fixed", EXIT_USAGE)
    if isinstance(exc, HiddenNameTaken):  # what is in the way, named, rather than the system's "Is a directory"
        return Failure(f"failed: cannot write in the folder {exc.filename}: a folder named {exc.filename2} is in the "
                       "way there (govrag writes a hidden file of that name first): move it away or remove it",
                       "once that is fixed", EXIT_USAGE)
    if isinstance(exc, OSError):  # a missing folder, no permission, a full disk: the system's reason, never a traceback
        name = exc.filename or where
        reason = exc.strerror or type(exc).__name__
        return Failure(f"failed: {reason}: {name}" if name else f"failed: {reason}", "once that is fixed", EXIT_USAGE)
    return None


def department_key_failure(message: str) -> Failure:
    """A department key that does not open (DepartmentKeyUnreadable: its key row altered or missing; through an API,
    its 503 `department_key_unreadable`), by its `message`: a row to restore, exit 2."""
    return Failure(f"failed: {message}", "once that row is restored", EXIT_USAGE)
