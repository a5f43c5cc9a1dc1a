"""Celery tasks: thin wrappers that pass ids and call ingestion/."""

from __future__ import annotations

import logging
import threading
from contextvars import Token

from billiard.exceptions import TimeLimitExceeded
from celery import Task, current_app, signals
from celery.worker.request import Request

from core.logs import logged_as, request_id_or_none, request_id_var
from core.settings import Settings
from ingestion import scratch
from ingestion import service as ingestion_service
from ingestion.schemas import UploadAccepted
from retrieval.store import close_vector_store, vector_store_is_open
from workers.celery_app import INGEST_TASK, REQUEST_ID_HEADER, GovragCelery
from workers.dispatch import send_jobs

logger = logging.getLogger(__name__)

MAX_RETRIES = 3
# An outage of the database or the vector store is no fault of the document: waited out for about half an hour
# (backoff capped at a minute) before the job fails, instead of the ~15 s that MAX_RETRIES allows.
OUTAGE_RETRIES = 36
MAX_BACKOFF_SECONDS = 60


class TransientFault(Exception):
    """What a retry hands Celery, which logs it: the fault's type only (a library's message may quote the document)."""


def ingest_document(task: Task, document_id: str, job_id: str) -> None:
    """Ingest one document; transient faults retry with backoff, then the job fails with a reason."""
    settings = task.app.govrag_settings
    try:
        raised = ingestion_service.run_ingestion(settings=settings, document_id=document_id, job_id=job_id)
        send_jobs(task.app, _to_send(raised))  # sent before the step, which may raise (a retry finds the run ended)
        send_jobs(task.app, _to_send(ingestion_service.spawn_attachments(settings=settings, document_id=document_id)))
    except Exception as exc:
        outage = ingestion_service.outage(exc)
        retries = OUTAGE_RETRIES if outage else MAX_RETRIES
        if task.request.retries >= retries:
            send_jobs(task.app, _give_up(settings, document_id, job_id, retries, outage))
            return
        if outage:  # said in one line, no traceback: the operator's fix, not the document's fault
            logger.warning("ingestion of document %s waits: the %s is unavailable; retrying", document_id, outage)
        else:
            logger.warning("ingestion of document %s hit %s; retrying", document_id, type(exc).__name__)
        ingestion_service.hand_back(settings=settings, job_id=job_id)
        raise task.retry(exc=TransientFault(type(exc).__name__), max_retries=retries,
                         countdown=min(2 ** task.request.retries, MAX_BACKOFF_SECONDS)) from exc


def _to_send(accepted: list[UploadAccepted]) -> list[tuple[str, str]]:
    """The (document id, job id) of each job queued, as `send_jobs` takes them."""
    return [(job.document_id, job.job_id) for job in accepted]


def _give_up(settings: Settings, document_id: str, job_id: str, retries: int,
             outage: str | None) -> list[tuple[str, str]]:
    """Fail the job once its retries ran out (called in the exception's handler), saying the outage it waited out
    in one line, else an internal error with its traceback. A document whose run ended keeps its status: then it was
    the attachment step that gave up. Returns the jobs to send: the steps of e-mails that content the e-mail's step
    was to take again falls to (service.mark_failed)."""
    if outage:
        logger.warning("ingestion of document %s gave up after %d retries: the %s stayed unavailable", document_id,
                       retries, outage)
        reason = f"the {outage} was unavailable; retries exhausted"
    else:
        logger.exception("ingestion of document %s gave up after %d retries", document_id, retries)
        reason = "internal error during ingestion; retries exhausted"
    return _to_send(ingestion_service.mark_failed(settings=settings, document_id=document_id, job_id=job_id,
                                                  reason=reason))


class _RequestLoggedAsItsSender(Request):
    """A task as the worker's main process handles it: what that process does for the task's end, a hard time limit's
    failure (`IngestionTask.on_failure`, and the jobs that sends) or a child lost under it, logs under the request id
    the task carries, as its run does (`request_id_for_the_run`)."""

    def on_timeout(self, soft: bool, timeout: float) -> None:
        with logged_as(self.request_dict.get(REQUEST_ID_HEADER)):
            super().on_timeout(soft, timeout)

    def on_failure(self, exc_info: object, send_failed_event: bool = True, return_ok: bool = False) -> None:
        with logged_as(self.request_dict.get(REQUEST_ID_HEADER)):
            super().on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)


class IngestionTask(Task):
    """When the hard time limit kills a child mid-document, the worker's main process calls `on_failure`: the
    document fails with that reason instead of staying `processing` (a redelivery then finds it final), and content
    its e-mail's step was to take again falls to the next e-mail carrying it (service.mark_failed)."""

    Request = _RequestLoggedAsItsSender

    def on_failure(self, exc: BaseException, _task_id: str, args: tuple, *_: object) -> None:  # type: ignore[type-arg]
        if isinstance(exc, TimeLimitExceeded):
            document_id, job_id = args[0], args[1]
            logger.warning("ingestion of document %s hit the hard time limit; the worker child was replaced",
                           document_id)
            settings = self.app.govrag_settings
            opened_here = not vector_store_is_open(settings)
            try:
                passed_on = ingestion_service.mark_failed(
                    settings=settings, document_id=document_id, job_id=job_id,
                    reason=f"ingestion took longer than the {self.time_limit:g} s limit")
                send_jobs(self.app, _to_send(passed_on))
            finally:
                if opened_here:  # the main process keeps no store: its children (forked later) open their own
                    close_vector_store(settings)


class _RunsInThisThread(threading.local):
    """The runs a thread has in progress: each task's id, and the token that puts back the request id the thread
    logged under before it."""

    def __init__(self) -> None:
        self.tokens: dict[str, Token[str]] = {}


_runs = _RunsInThisThread()


@signals.task_prerun.connect
def request_id_for_the_run(task_id: str, task: Task, **_: object) -> None:
    """A task's run (Celery's own lines about it too: a retry, a failure, its success) logs under the request id its
    message carries (`REQUEST_ID_HEADER`: the one its job keeps, which every send of it carries, workers/dispatch.py),
    so an operator can tie a worker's line to the upload, re-index or command that queued the job, however often it
    was sent; a missing one, or one that is not a request id as govrag makes one (a forged message's text), logs
    `-`."""
    _runs.tokens[task_id] = request_id_var.set(request_id_or_none(task.request.get(REQUEST_ID_HEADER)))


@signals.task_postrun.connect
def request_id_after_the_run(task_id: str, **_: object) -> None:
    """The thread logs as before the run (`-` in a worker's)."""
    token = _runs.tokens.pop(task_id, None)
    if token is not None:
        request_id_var.reset(token)


@signals.worker_process_init.connect
def private_temp_dir_on_start(**_: object) -> None:
    """A worker process makes its private temporary directory as it starts, before it loads the models: a child
    replacing one killed at the hard time limit (or by the OOM killer) removes the plaintext that one left
    (`ingestion.scratch`). The solo pool sends this signal too; the threads pool does not: its first parse does it."""
    scratch.private_dir()


@signals.worker_process_shutdown.connect
def private_temp_dir_removed_on_exit(**_: object) -> None:
    """A prefork child of `govrag worker` removes its private temporary directory as it exits (a warm shutdown on
    SIGTERM, a child replaced after its tasks): billiard ends it with `os._exit`, which runs no atexit. One killed at
    the hard time limit sends nothing: the child replacing it removes the directory as it starts."""
    scratch.remove_own()


@signals.worker_process_init.connect
def load_models_on_start(**_: object) -> None:
    """A worker process loads the models before it takes a job (see `load_models`): a prefork child of `govrag
    worker` (a replaced one too) or a solo pool's process (the in-process worker of `govrag serve`). Celery sends
    this signal in that process, with the worker's app current; a failure is logged, and the first run loads them."""
    settings = getattr(current_app, "govrag_settings", None)
    if settings is not None:
        ingestion_service.load_models(settings)


def register_tasks(app: GovragCelery) -> None:
    """Bind the tasks to `app`, so each task reads the settings of the app that runs it."""
    app.task(name=INGEST_TASK, bind=True, base=IngestionTask, acks_late=True, max_retries=MAX_RETRIES,
             time_limit=app.govrag_settings.ingest_time_limit_seconds)(ingest_document)
