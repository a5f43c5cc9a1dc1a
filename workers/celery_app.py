"""The Celery application: JSON only, late acks, one task at a time per worker process."""

from __future__ import annotations

import logging
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from queue import Empty
from urllib.parse import parse_qsl, urlsplit

from celery import Celery
from kombu.utils.functional import lazy

from core import broker
from core.settings import Settings

logger = logging.getLogger(__name__)


class GovragCelery(Celery):
    """A Celery app that carries the settings its tasks run with."""

    govrag_settings: Settings


INGEST_TASK = "govrag.ingest_document"
# The message header carrying the request id of whoever sent a task (an upload, a re-index, a command's run, the run
# of another task), under which the task's run logs (workers.tasks); a retry's message and a redelivery keep it.
REQUEST_ID_HEADER = "govrag_request_id"
WORKER_START_SECONDS = 60.0
# Every task govrag sends: one retry, at once. kombu's default (3 retries) reconnected to a hung Redis again and again,
# each try waiting out the socket timeout, while the upload that sent it waited: a publish whose pooled connection
# stopped answering took 5 of them (15.6 s at the default 3 s), now 3 (its own, and kombu's reconnect, which tries
# twice). The retry still catches a pooled connection Redis closed (a restart, its idle timeout), which fails at once.
PUBLISH_RETRY_POLICY = {"max_retries": 1, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.2}


def create_celery(settings: Settings) -> GovragCelery:
    """A Celery app for these settings (broker from GOVRAG_BROKER_URL)."""
    app = GovragCelery("govrag", broker=settings.broker_url)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_queue=settings.task_queue,
        task_ignore_result=True,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        # a prefork child loads its models before it reports itself up (workers.tasks, worker_process_init): 1-2 s
        # alone, 4-6 s when two children load at once on 2 busy cores; Celery's 4 s default killed such a child
        worker_proc_alive_timeout=WORKER_START_SECONDS,
        broker_transport_options=_transport_options(settings),
        broker_use_ssl=_broker_tls(settings.broker_url),
        task_publish_retry_policy=PUBLISH_RETRY_POLICY,
    )
    app.govrag_settings = settings
    from workers.tasks import register_tasks  # tasks import this module for the app type

    register_tasks(app)
    return app


@contextmanager
def celery_for_command(settings: Settings) -> Iterator[GovragCelery]:
    """A Celery app for a one-shot command's run (`govrag reindex`'s sends, `govrag worker`), the broker connections it
    kept closed as the run ends, however it ends (`close_celery`, as the API's stop does): a command run in-process
    (a test's, a script's) left them open for the process's life."""
    app = create_celery(settings)
    try:
        yield app
    finally:
        close_celery(app)


def _transport_options(settings: Settings) -> dict[str, float]:
    """A worker killed mid-task never acks: the broker hands the task out again after the visibility timeout.
    A Redis that accepts connections but does not answer (hung, or half a network partition) would hold a publish,
    so an upload, for ever: each socket operation gives up after `broker_socket_timeout_seconds` and the job is
    left unsent for the sweep (workers/dispatch.py)."""
    options: dict[str, float] = {"visibility_timeout": settings.broker_visibility_timeout}
    if broker.is_redis(settings.broker_url):
        options |= broker.socket_timeouts(settings)
    return options


def _broker_tls(broker_url: str) -> dict[str, ssl.VerifyMode] | None:
    """Celery's TLS options for the broker: on a rediss:// URL, the server's certificate checked. kombu reads a
    rediss:// URL naming no ssl_ parameter as asking for TLS without that check (CERT_NONE, and a warning), where
    redis-py (the guard's counters, the queue-depth metric) checks it: so a man in the middle the counters refused
    would have read and written the tasks. A URL naming any ssl_ parameter has kombu hand those to redis-py in place
    of these, so its default (required) or the URL's ssl_cert_reqs is what both use; `ssl_cert_reqs=none`, the one
    way to turn the check off, is said at start."""
    url = urlsplit(broker_url)
    if url.scheme != "rediss":
        return None  # kombu speaks TLS to any broker given TLS options, a redis:// one too
    if ("ssl_cert_reqs", "none") in parse_qsl(url.query):
        logger.warning("GOVRAG_BROKER_URL asks for no check of the Redis server's certificate (ssl_cert_reqs=none): "
                       "anyone between govrag and Redis can read and change the tasks")
    return {"ssl_cert_reqs": ssl.CERT_REQUIRED}


def close_celery(app: GovragCelery) -> None:
    """Close the broker connections kept idle for sending tasks, then refill the pool with unconnected ones, so that
    any app sending on that URL afterwards (the next API a test starts) connects again as it sends. Called as the API
    stops: else each API started and stopped left its pooled connection to Redis open for the process's life.

    kombu's pool belongs to the broker URL in this process, not to the app (`pools.connections`): another app on the
    URL (a test's session API, its worker or sweeper thread) may be sending on one of its connections right now.
    Only the idle ones are closed, each taken out of the pool first (its queue hands one to one thread), never one
    in use: closing that under its send broke it with AttributeError or "I/O operation on closed file" rather than
    the broker's error a send is ready for (`_published`). A connection in use when this runs goes back to the pool
    open; at an API's stop none is (its threads stopped, its requests answered). An idle producer holds no connection
    (kombu releases it with the producer), so the producer pool has nothing to close."""
    pool = app.pool
    while True:
        try:
            connection = pool._resource.get_nowait()  # kombu's own force_close_all reads the queue so
        except Empty:
            break
        if not isinstance(connection, lazy):  # a lazy one was never connected
            pool.close_resource(connection)
    pool.setup()
