"""`govrag migrate` in a process of its own that stops as it commits one revision, for a test to interrupt it there.

Usage: python -m tests.support.migrate_stopped_at_revision REVISION [COMMAND ...] (settings from GOVRAG_* in the
environment; COMMAND: `migrate` unless another govrag command that migrates first is given, e.g. `keys rotate`)
Prints `running` once the upgrade has run every statement of REVISION, its record in Alembic's version table included,
and is about to commit its transaction, then waits to be interrupted (SIGINT: Ctrl-C) or killed.
"""

from __future__ import annotations

import signal
import sys
import time

from sqlalchemy import Engine, event

from api.cli import main


def _stop_before_committing(revision: str) -> None:
    recorded: list[str] = []

    @event.listens_for(Engine, "before_cursor_execute")
    def _record(_connection, _cursor, statement, *_args) -> None:  # type: ignore[no-untyped-def]
        if statement.startswith("UPDATE alembic_version SET version_num=") and f"='{revision}'" in statement:
            recorded.append(revision)

    @event.listens_for(Engine, "commit")
    def _stop(_connection) -> None:  # type: ignore[no-untyped-def]
        if recorded:
            print("running", flush=True)
            while True:
                time.sleep(60)


if __name__ == "__main__":
    # Ctrl-C as at a terminal: a test run started in the background by a shell without job control (CI) ignores
    # SIGINT, every child inherits that, and a Python started ignoring it never raises KeyboardInterrupt.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    _stop_before_committing(sys.argv[1])
    sys.exit(main(sys.argv[2:] or ["migrate"]))
