"""`api.cli_failures.failure`: which known failure an exception is, the line it makes and its exit code."""

from __future__ import annotations

import argparse
import errno
import os

import httpx
import pytest
from sqlalchemy.exc import OperationalError

from api import cli
from api.cli_failures import failure
from core.errors import ErrorCode, FolderUnwritable, GovragError
from core.keystore import DepartmentKeyUnreadable
from core.migrate import MigrationInterrupted


def _raised_from(cause: BaseException, exc: Exception) -> Exception:
    try:
        raise exc from cause
    except Exception as raised:
        return raised


def test_each_known_failure_is_one_line_with_readmes_exit_code() -> None:
    outage = OperationalError("SELECT 1", {}, Exception("connection refused"))
    ledger_unavailable = _raised_from(outage, GovragError(ErrorCode.unavailable, "the audit log is unavailable"))
    said = {name: (stop.line, stop.exit_code) for name, exc in {
        "ctrl-c": KeyboardInterrupt(),
        "outage": outage,
        "refusal raised from an outage": ledger_unavailable,
        "refusal": GovragError(ErrorCode.not_found, "no such department"),
        "internal": GovragError(ErrorCode.internal, "the model server is not on the allowlist"),
        "department key": DepartmentKeyUnreadable("hr"),
        "path": FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), "/no/such/out.jsonl"),
        "full disk": OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
    }.items() if (stop := failure(exc, where="out.jsonl")) is not None}
    assert said == {
        "ctrl-c": ("interrupted; run the same command again to go on", 130),
        "outage": ("stopped: the database is unavailable; run the same command again once it is back", 1),
        "refusal raised from an outage": (
            "stopped: the database is unavailable; run the same command again once it is back", 1),
        "refusal": ("refused: no such department", 2),
        "internal": ("failed: the model server is not on the allowlist", 2),  # no refusal of the user's input
        "department key": ("failed: the key of department hr does not open under the master key (its key row was "
                           "altered in the database): restore that row from a backup", 2),
        "path": ("failed: No such file or directory: /no/such/out.jsonl", 2),
        "full disk": ("failed: No space left on device: out.jsonl", 2),
    }


def test_a_govrag_error_is_said_by_what_it_means_not_by_its_http_status() -> None:
    """Every GovragError but an internal one (a 500) said "refused:", as if the user's input were wrong: the ledger
    failing on its own (a 503 with no outage behind it) and a document's key row altered (a 410) are no refusal of
    the input. The deployment's own failure is said "failed:" (exit 2, something to fix first), the user's input
    alone "refused:"."""
    said = {name: (stop.line, stop.exit_code) for name, exc in {
        "ledger failed": _raised_from(ValueError("a value it cannot hash"),
                                      GovragError(ErrorCode.unavailable, "the audit log is unavailable")),
        "document key altered": GovragError(ErrorCode.document_key_unreadable, "the document's key does not open"),
        "input": GovragError(ErrorCode.unsupported_type, "unsupported file type"),
        "folder": FolderUnwritable(errno.EROFS, os.strerror(errno.EROFS), "/srv/keys"),
    }.items() if (stop := failure(exc)) is not None}
    assert said == {
        "ledger failed": ("failed: the audit log is unavailable", 2),
        "document key altered": ("failed: the document's key does not open", 2),
        "input": ("refused: unsupported file type", 2),
        "folder": ("failed: cannot write in the folder /srv/keys (Read-only file system): make it writable for this "
                   "user", 2),
    }
    assert {code.name for code in ErrorCode if not code.refuses_input} == {
        "document_key_unreadable", "placeholder_map_unreadable", "unavailable", "department_key_unreadable",
        "kill_switch_disabled", "audit_mirror_unreadable", "internal"}


@pytest.mark.parametrize(("code", "message", "said"), [
    ("duplicate_upload", "the department holds this content already as document 7", "duplicate"),
    ("conflict", "duplicate upload: the department already has this content as document 7", "refused"),
])
def test_a_duplicate_upload_is_told_by_its_code_never_by_its_messages_wording(code: str, message: str,
                                                                               said: str) -> None:
    """`govrag ingest` took a file for a duplicate when the refusal's message started "duplicate upload": a message
    reworded turned duplicates into `refused` (exit 1), and any other refusal worded so was a duplicate. The code
    `duplicate_upload` says it now, the wording never does, in process (the GovragError's code) and through the API
    (its answer's code) alike."""
    from api.cli_ingest import _answer_code, _api_error, _not_taken

    answer = httpx.Response(409, json={"error": {"code": code, "message": message, "request_id": "r"}})
    assert _not_taken(_answer_code(answer, _api_error(answer))) == _not_taken(ErrorCode[code]) == said


def test_a_bug_and_a_ctrl_c_in_a_migration_are_left_to_their_caller() -> None:
    """A bug keeps its traceback; `cli.main` says an interrupted migration with the revision it left."""
    assert failure(ValueError("a bug")) is None and failure(MigrationInterrupted("at 0014")) is None
    assert failure(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))).why == "failed: No space left on device"


def test_a_bug_in_a_command_still_raises_through_cli_main(monkeypatch: pytest.MonkeyPatch) -> None:
    """`cli.main` says in one line only the failures `failure` knows: a bug a command lets out keeps its traceback."""
    def bug(_args: argparse.Namespace) -> int:
        raise ValueError("a bug")

    monkeypatch.setattr(cli, "_token", bug)
    with pytest.raises(ValueError, match="a bug"):
        cli.main(["token", "--sub", "alice"])
