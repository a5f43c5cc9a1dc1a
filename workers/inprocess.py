"""A Celery worker thread inside the API process, for embedded stores that allow one process."""

from __future__ import annotations

import threading

from celery.exceptions import WorkerShutdown
from celery.platforms import EX_OK
from celery.worker import WorkController, state
from kombu.asynchronous import set_event_loop

from ingestion import service as ingestion_service
from workers.celery_app import INGEST_TASK, GovragCelery


class InProcessWorker:
    """Consumes the app's queue in a daemon thread; stopped with the API."""

    def __init__(self, app: GovragCelery) -> None:
        app.finalize()
        # Kombu keeps one event loop per process and Celery's worker takes it if one exists: a second worker in the
        # process (an API restarted in the same process, as tests do) would share the first's, and `stop` would
        # shut down whichever worker thread ran the loop next. Each worker gets its own.
        set_event_loop(None)
        app.set_current()  # the solo pool starts in this thread, and with it the loading of the models (tasks.py)
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
        """Finish the current task and stop, in the worker's own thread: its event loop raises `WorkerShutdown`, as
        after a signal. Stopping from the caller's thread would use the broker connection that the worker thread is
        polling (kombu's are not thread-safe); with a job enqueued just before, it waited forever for a BRPOP reply.
        A run still going after `timeout` is abandoned (the process exits under it) and its job handed back: the
        next start runs it again as a retry, not as a run that crashed (a clean stop must never count towards the
        crashed-runs limit; a kill, which runs none of this, still does). A worker never started (the API's start
        failed before it) has nothing to stop."""
        if self._thread.ident is None:
            return
        hub = getattr(self._controller, "hub", None)
        if hub is None or not self._thread.is_alive():
            self._controller.stop(in_sighandler=False)
        else:
            hub.call_soon(_shut_down)
        self._thread.join(timeout)
        if self._thread.is_alive():
            for job_id in self._running_jobs():
                ingestion_service.hand_back(settings=self._app.govrag_settings, job_id=job_id)

    def _running_jobs(self) -> list[str]:
        """The ids of the ingestion jobs this worker's thread is running (Celery's record of accepted tasks)."""
        return [request.args[1] for request in list(state.active_requests)
                if request.hostname == self._controller.hostname and request.task_name == INGEST_TASK]


def _shut_down() -> None:
    """Run by the worker's event loop: a warm shutdown, handled by `WorkController.start` in that thread."""
    raise WorkerShutdown(EX_OK)
