"""Housekeeping in every API process: sweeps that finish what a failure left half done (an ingestion job the broker
never got, a deleted document whose vectors the vector store could not drop yet), run every few seconds."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping

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
                except Exception:  # noqa: BLE001 - a dependency may be briefly away; the next round tries again
                    logger.exception("the %s sweep failed", name)
