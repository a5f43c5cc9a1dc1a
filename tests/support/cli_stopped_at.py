"""A `govrag` command in a process of its own, run as `python -m api.cli` runs it, that stops at one step of its start
for a test to interrupt it there.

Usage: python -m tests.support.cli_stopped_at EVENT NAME COMMAND ...
The step is the first audit event EVENT (`sys.audit`: "import" as a module is first imported, "open" as a file is
opened, "sqlite3.connect" as a database is) whose first argument is NAME. There it prints `stopped` and waits to be
interrupted (SIGINT: Ctrl-C), which raises KeyboardInterrupt out of that step as a Ctrl-C there would, or killed.
Nothing of govrag is imported before the hook is installed: the step may be one of `api.cli`'s own imports.
"""

from __future__ import annotations

import runpy
import signal
import sys
import time


def _stop_at(event: str, name: str) -> None:
    stopped: list[bool] = []

    def hook(raised: str, arguments: tuple[object, ...]) -> None:
        if stopped or raised != event or not arguments or str(arguments[0]) != name:
            return
        stopped.append(True)
        print("stopped", flush=True)
        while True:
            time.sleep(60)

    sys.addaudithook(hook)


if __name__ == "__main__":
    # Ctrl-C as at a terminal: a test run started in the background by a shell without job control (CI) ignores
    # SIGINT, every child inherits that, and a Python started ignoring it never raises KeyboardInterrupt.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    _stop_at(sys.argv[1], sys.argv[2])
    sys.argv = ["govrag", *sys.argv[3:]]
    runpy.run_module("api.cli", run_name="__main__", alter_sys=True)
