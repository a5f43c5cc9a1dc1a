"""Hang guards for patterns run on untrusted text: a run's own CPU seconds, counted in a subprocess."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

_REPO = Path(__file__).resolve().parents[2]


def cpu_seconds_of(module: str, runner: str) -> tuple[int, float]:
    """How many inputs `module.runner(finished)` got through, appending each one's name to `finished`, and the CPU
    seconds it took, after the imports (which a loaded machine can stretch to half a minute). In a subprocess: a regex
    holds the GIL, so a stalled one cannot be timed out from a thread. The subprocess's stderr is in the error if it
    did not report."""
    check = (f"import time, {module} as m; f = []; s = time.process_time(); m.{runner}(f); "
             "print(len(f), time.process_time() - s)")
    run = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=900,  # noqa: S603
                         cwd=_REPO)
    reported = run.stdout.split()
    if len(reported) != 2:
        raise AssertionError(run.stderr[-2000:])
    return int(reported[0]), float(reported[1])
