"""`govrag ingest` in a process of its own that stops in the middle of its file's run, for a test to kill it there.

Usage: python -m tests.support.cli_stopped_mid_run PATH DEPARTMENT (settings from GOVRAG_* in the environment)
Prints `running` once the run has claimed the file's document and reached its pipeline, then waits to be killed.
"""

from __future__ import annotations

import sys
import time

from api.cli import main
from ingestion import service


def _protect_until_killed(*_: object, **__: object) -> object:
    print("running", flush=True)
    while True:
        time.sleep(60)


if __name__ == "__main__":
    service.protect = _protect_until_killed  # type: ignore[assignment]
    main(["ingest", sys.argv[1], "--department", sys.argv[2]])
