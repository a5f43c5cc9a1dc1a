"""A separate process taking one `transaction_lock` on a shared SQLite file (for the cross-process lock test).

Usage: python -m tests.support.lock_process <database_url> <name> shared|exclusive
Prints `ready` once started, `locked` once it holds the lock, then commits (releasing it) and exits.
"""

from __future__ import annotations

import sys

from core.db import get_session_factory, transaction_lock


def main(database_url: str, name: str, mode: str) -> None:
    print("ready", flush=True)
    with get_session_factory(database_url)() as session:
        transaction_lock(session, name, shared=mode == "shared")
        print("locked", flush=True)
        session.commit()


if __name__ == "__main__":
    main(*sys.argv[1:4])
