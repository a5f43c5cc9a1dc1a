"""Housekeeping in every API process: sweeps that finish what a failure left half done (an ingestion job the broker
never got, a deleted document whose vectors the vector store could not drop yet), run every few seconds."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping

from core.errors import Unavailable

logger = logging.getLogger(__name__)


class Sweeper:
    """Runs each named sweep every `interval` seconds in one background thread; a sweep that fails is logged and
    tried again next time, and does not hold back the others."""

    def __init__(self, sweeps: Mapping[str, Callable[[], object]], *, interval: float) -> None:
        self._sweeps, self._interval = dict(sweeps), interval
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="govrag-sweeper", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stopping.wait(self._interval):
            for name, sweep in self._sweeps.items():
                try:
                    sweep()
                except Unavailable as away:  # a volume not mounted, the vector store down: said, not a failure
                    logger.warning("the %s sweep waits for the %s: the next round tries again", name, away.dependency)
                except Exception:  # noqa: BLE001 - the next round tries again; a database error keeps its traceback
                    logger.exception("the %s sweep failed", name)  # (its outage and a missing table look alike)


def at_most_every(seconds: float, sweep: Callable[[], object]) -> Callable[[], object]:
    """`sweep`, run at most once per `seconds` (a round before then does nothing); the first round runs it, and a run
    that fails counts too, so a failing sweep is not retried every round."""
    last_run: float | None = None

    def throttled() -> object:
        nonlocal last_run
        now = time.monotonic()
        if last_run is not None and now - last_run < seconds:
            return None
        last_run = now
        return sweep()

    return throttled
