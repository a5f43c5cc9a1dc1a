"""A Celery worker thread inside the API process, for embedded stores that allow one process."""

from __future__ import annotations

import threading

from celery.worker import WorkController

from workers.celery_app import GovragCelery


class InProcessWorker:
    """Consumes the app's queue in a daemon thread; stopped with the API."""

    def __init__(self, app: GovragCelery) -> None:
        app.finalize()
        self._controller = WorkController(
            app=app, concurrency=1, pool="solo", hostname=f"govrag-inprocess-{id(self)}@localhost",
            without_heartbeat=True, without_mingle=True, without_gossip=True,
            queues=[app.govrag_settings.task_queue],
        )
        self._app = app
        self._thread = threading.Thread(target=self._run, name="govrag-worker", daemon=True)

    def start(self) -> None:
        """Start consuming."""
        self._thread.start()

    def _run(self) -> None:
        # Celery resolves the "current app" per thread; without this the thread would use the default app.
        self._app.set_current()
        self._controller.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the current task and stop."""
        self._controller.stop(in_sighandler=False)
        self._thread.join(timeout)
