"""Housekeeping in every API process: sweeps that finish what a failure left half done (an ingestion job the broker
never got, a deleted document whose vectors the vector store could not drop yet), run every few seconds."""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field

from core.errors import Unavailable, unavailable_dependency

logger = logging.getLogger(__name__)

# What a sweep wrapped by `at_most_every` returns in a round it does not run: neither a success nor a failure.
NOT_RUN = object()
# A sweep failing round after round on the same bug says so again (without its traceback) at most once per this many
# rounds: every 10 minutes at the default 10 s interval (GOVRAG_JOB_SWEEP_SECONDS).
STILL_FAILING_EVERY_ROUNDS = 60


@dataclass
class _Failing:
    """A sweep failing since round `first_round` (at `since`, in `time.monotonic()` seconds); the failures it logged
    (a dependency's name, a bug's `_failure_site`), the last line above DEBUG in round `logged_round`."""

    first_round: int
    since: float
    logged: set[Hashable] = field(default_factory=set)
    logged_round: int = 0


class Sweeper:
    """Runs each named sweep every `interval` seconds in one background thread; a sweep that fails is logged and
    tried again next time, and does not hold back the others. A failure is logged as it starts, not every round."""

    def __init__(self, sweeps: Mapping[str, Callable[[], object]], *, interval: float) -> None:
        self._sweeps, self._interval = dict(sweeps), interval
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="govrag-sweeper", daemon=True)
        self._round = 0
        self._failing: dict[str, _Failing] = {}

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread (one never started has nothing to stop)."""
        self._stopping.set()
        if self._thread.ident is not None:
            self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stopping.wait(self._interval):
            self.run_round()

    def run_round(self) -> None:
        """Run each sweep once; one that fails is logged (`_failed`) and holds back none of the others."""
        self._round += 1
        for name, sweep in self._sweeps.items():
            try:
                outcome = sweep()
            except Exception as exc:  # noqa: BLE001 - the next round tries again
                self._failed(name, exc)
                continue
            if outcome is not NOT_RUN:
                self._ran(name)

    def _ran(self, name: str) -> None:
        failing = self._failing.pop(name, None)
        if failing is not None:
            logger.info("the %s sweep runs again, %d round(s) and %.0f s after it failed", name,
                        self._round - failing.first_round, time.monotonic() - failing.since)

    def _failed(self, name: str, exc: Exception) -> None:
        """Each failure is logged once (`_log_failure`) while the sweep fails, even as failures take turns; its rounds
        after that at DEBUG. A bug is said to fail still at most once per `STILL_FAILING_EVERY_ROUNDS`."""
        dependency = unavailable_dependency(exc)
        what = dependency or _failure_site(exc)
        failing = self._failing.setdefault(name, _Failing(first_round=self._round, since=time.monotonic()))
        if what not in failing.logged:
            failing.logged.add(what)
            failing.logged_round = self._round
            _log_failure(name, exc, dependency)
        elif dependency is None and self._round - failing.logged_round >= STILL_FAILING_EVERY_ROUNDS:
            failing.logged_round = self._round
            logger.error("the %s sweep still fails (%s), %d rounds after it failed: the next round tries again",
                         name, type(exc).__name__, self._round - failing.first_round)
        else:
            logger.debug("the %s sweep failed again (%s)", name, dependency or type(exc).__name__)


def _log_failure(name: str, exc: Exception, dependency: str | None) -> None:
    """A dependency away is a warning, a bug an error. A database error keeps its traceback: its outage and a missing
    table (SQLite's OperationalError) look alike. An `Unavailable` is said, not an accident: no traceback."""
    if dependency is None:
        logger.error("the %s sweep failed", name, exc_info=exc)
    else:
        logger.warning("the %s sweep waits for the %s: the next round tries again", name, dependency,
                       exc_info=None if isinstance(exc, Unavailable) else exc)


def _failure_site(exc: BaseException) -> Hashable:
    """A bug's type and the lines it was raised through: the same bug, round after round, is one failure."""
    return type(exc), *((frame.f_code, line) for frame, line in traceback.walk_tb(exc.__traceback__))


def at_most_every(seconds: float, sweep: Callable[[], object]) -> Callable[[], object]:
    """`sweep`, run at most once per `seconds` (a round before then returns `NOT_RUN`); the first round runs it, and a
    run that fails counts too, so a failing sweep is not retried every round."""
    last_run: float | None = None

    def throttled() -> object:
        nonlocal last_run
        now = time.monotonic()
        if last_run is not None and now - last_run < seconds:
            return NOT_RUN
        last_run = now
        return sweep()

    return throttled
