"""The FastAPI application factory."""

from __future__ import annotations

import functools
import gc
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio.to_thread
from fastapi import Depends, FastAPI
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import ERROR_RESPONSES, crash_response, error_response, install_error_handlers
from api.query_params import strict_query
from api.routers import admin, audit, authz, documents, guard_admin, health, ingestion_admin, metrics, query
from authz.dev_issuer import DevIssuer
from authz.enforcer import get_enforcer
from authz.tokens import TokenVerifier
from core import blobs, broker, keystore, migrate, timing
from core.cache import Rechecked
from core.errors import ErrorCode, loading
from core.logs import configure_logging, request_id_var
from core.metrics import observe_request, route_and_method
from core.settings import Settings, get_settings
from core.sweeper import Sweeper, at_most_every
from core.text import NUL, NUL_MESSAGE
from core.tracing import configure_tracing
from guard import controls
from guard.firewall import get_firewall
from ingestion import service as ingestion_service
from ingestion.purge import ORPHAN_SWEEP_SECONDS, PURGE_GRACE_SECONDS, purge_pending, sweep_orphan_files
from retrieval.models import hold_generator
from retrieval.store import close_vector_store, open_vector_store, vector_store_is_open
from workers.celery_app import GovragCelery, close_celery, create_celery
from workers.dispatch import resend_unfinished, send_unsent, sweep_jobs
from workers.inprocess import InProcessWorker

logger = logging.getLogger(__name__)

MULTIPART_OVERHEAD_BYTES = 64 * 1024
BODY_TOO_LARGE = "request body exceeds the upload limit"


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the API for `settings` (default: from the environment); its lifespan starts it (`start`) unless the caller
    did."""
    settings = settings or get_settings()
    # Swagger UI and ReDoc load their scripts from a public CDN: not in production (/openapi.json stays).
    pages = {} if not settings.is_production else {"docs_url": None, "redoc_url": None}
    app = FastAPI(title="govrag", version="0.1.0", lifespan=_lifespan, **pages)
    app.state.settings, app.state.started = settings, None
    install_error_handlers(app)
    app.add_middleware(RequestContext)
    # Their own answers (readyz: {"ready", "checks"}, a 503 included); a probe's or a scraper's query string (a
    # Prometheus job's `params`, a cache buster) is left alone: they read none.
    for module in (health, metrics):
        app.include_router(module.router)
    for module in (documents, query, admin, authz, audit, guard_admin, ingestion_admin):
        app.include_router(module.router, responses=ERROR_RESPONSES, dependencies=[Depends(strict_query)])
    return app


@dataclass(frozen=True)
class Background:
    """The API's threads, made by `start`: the lifespan runs them while it serves, and stops them."""

    worker: InProcessWorker | None
    sweeper: Sweeper | None

    def run(self) -> None:
        """Start the worker, then the sweeper."""
        if self.worker is not None:
            self.worker.start()
        if self.sweeper is not None:
            self.sweeper.start()

    def stop(self) -> None:
        """Stop the sweeper, then the worker (which hands back a job it cannot finish in time)."""
        if self.sweeper is not None:
            self.sweeper.stop()
        if self.worker is not None:
            self.worker.stop()


def start(app: FastAPI) -> Background:
    """Every step the API takes before it serves, a failure raised as it is (the data dir, the schema, the master key,
    the blob store, the policy, the dev issuer, the vector store, the models, the jobs the in-memory broker lost), then
    the master key's verifiers stored, and the threads to run, kept as `app.state.started`. `govrag serve` calls it
    before uvicorn, whose start would say a refusal as a traceback, not in one line; the lifespan calls it when the
    caller did not. Nothing runs yet: the vector store it opened (not one this process had open before) and the answer
    model it holds (`app.state.model`, released by the lifespan's end) are released if a later step fails."""
    settings: Settings = app.state.settings
    migrate.make_data_dir(settings)
    migrate.require_head(settings.resolved_database_url)  # never serve requests the schema cannot answer
    keystore.require_master_opens(settings, first_start=True)  # nor with a master key that does not open what is stored
    configure_logging(settings.log_level)
    configure_tracing(settings)
    blobs.open_at_start(settings.blob_dir, settings.resolved_database_url)  # its volume away: a 503
    app.state.schema_watch = migrate.SchemaWatch(settings.resolved_database_url)
    app.state.master_key_watch = Rechecked(functools.partial(keystore.master_key_refusal, settings),
                                           keystore.MASTER_CHECK_SECONDS)
    app.state.not_ready = health.not_ready_said()
    app.state.enforcer = get_enforcer(settings.resolved_database_url, settings.authz_default_clearance,
                                      settings.authz_policy_check_seconds)
    app.state.dev_issuer = DevIssuer.from_settings(settings) if settings.dev_issuer else None
    app.state.verifier = TokenVerifier.from_settings(settings, app.state.dev_issuer)
    app.state.celery = create_celery(settings)
    opened_before = vector_store_is_open(settings)  # by its caller (a test): theirs to close
    open_vector_store(settings)
    app.state.model = None
    try:
        # The answer model first: a GGUF llama.cpp does not load is a path to fix, said at once.
        app.state.model = hold_generator(settings)
        background = _ready(app.state.celery, settings)
        keystore.record_master_verifiers(settings)  # last: a start refused by an earlier step pins no master key
    except BaseException:
        if app.state.model is not None:
            app.state.model.release()
        if not opened_before:
            close_vector_store(settings)
        raise
    app.state.started = background
    return background


def _ready(celery: GovragCelery, settings: Settings) -> Background:
    """The models loaded (the answer model, held by `start`, aside), and the threads made (not run): an in-process
    worker when the store is embedded, with the jobs the in-memory broker lost sent again."""
    ingestion_service.load_models(settings)  # embedder, PII model, scanner: what a worker loads as it starts
    with loading("the prompt firewall's weights"):  # issue 5: the guard weights before the first query
        get_firewall()
    # The models above leave ~0.5 M long-lived objects that a full garbage collection would walk, pausing every
    # request for ~0.3 s (measured here). Frozen, the collector skips them.
    gc.collect()
    gc.freeze()
    worker = InProcessWorker(celery) if settings.inprocess_worker else None
    sweeper = _sweeper(celery, settings)
    if worker is not None and broker.is_in_memory(settings.broker_url):
        resend_unfinished(celery)  # the in-memory broker starts empty: what was queued is gone
        if sweeper is None:  # no sweep sends a job never sent (its API died before): the start does
            send_unsent(celery, older_than_seconds=0)
    return Background(worker, sweeper)


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Start the API (`start`) unless its caller did, run its threads while it serves, stop them and close its
    connections (`_close_connections`), a failure to run its threads included."""
    background = app.state.started or start(app)
    app.state.started = None  # the next run of the lifespan (a test client entered again) starts afresh
    # Sync endpoints run in anyio's thread pool (40 threads by default). Queries are CPU-bound under one GIL: more
    # threads than this only stretch every request, and the ledger's serialised append with them.
    anyio.to_thread.current_default_thread_limiter().total_tokens = app.state.settings.api_threads
    try:
        background.run()
        logger.info("govrag ready (env=%s, in-process worker=%s)", app.state.settings.env,
                    background.worker is not None)
        yield
    finally:
        try:
            background.stop()
        finally:
            # From a thread: closing runs event loops (on the event loop they are left to the garbage collector, which
            # never collects what the start froze), and the model's close waits for the answers still being made.
            await anyio.to_thread.run_sync(_close_connections, app)


def _close_connections(app: FastAPI) -> None:
    """The connections the API kept open: the verifier's to the IdP, those kept to send tasks on the broker
    (`close_celery`), the guard's hit counters' to Redis (`close_redis_counters`), then the answer model's hold
    released, which closes it (the model server's connections and their event loops, or llama.cpp's model) unless
    another holder has it. Else every app a process starts and stops keeps them open for the process's life (the
    broker's and the counters': those of its URL, which every app on it shares)."""
    try:
        app.state.verifier.close()
    finally:
        try:
            close_celery(app.state.celery)
        finally:
            try:
                controls.close_redis_counters()
            finally:
                app.state.model.release()


def _sweeper(celery: GovragCelery, settings: Settings) -> Sweeper | None:
    """The housekeeping thread: ingestion jobs the broker never got, purges an outage postponed, orphaned files."""
    if settings.job_sweep_seconds <= 0:
        return None
    return Sweeper({
        "ingestion job": functools.partial(sweep_jobs, celery, older_than_seconds=settings.job_resend_after_seconds),
        "document purge": functools.partial(purge_pending, settings, older_than_seconds=PURGE_GRACE_SECONDS),
        "orphan file": at_most_every(ORPHAN_SWEEP_SECONDS, functools.partial(sweep_orphan_files, settings)),
    }, interval=settings.job_sweep_seconds)


class RequestContext:
    """A request id for every line and response, stage timings, request metrics and log line; oversized bodies
    refused before they are read (a declared Content-Length) or as they are read (chunked); a client gone before the
    response's end logged as such, never as a crash. Plain ASGI: Starlette's BaseHTTPMiddleware costs a task and a
    stream per request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        token = request_id_var.set(uuid.uuid4().hex)
        started, response = time.perf_counter(), _Response(receive, send, scope["app"].state.settings)
        timing.start_request()
        try:
            try:
                await self._answer(scope, response)
            except ClientDisconnect:
                if not response.client_gone:  # Starlette's name (ASGI 2.4) for an OSError of the app's own stream
                    raise
            if response.client_gone and not response.ended:  # nothing more can be said to it: no crash
                logger.info("the client went away before the response's end")
        finally:
            _record_request(scope, response.status, time.perf_counter() - started)
            request_id_var.reset(token)

    async def _answer(self, scope: Scope, response: _Response) -> None:
        """The app's response, else a crash's (`crash_response`) while none has begun."""
        settings: Settings = scope["app"].state.settings
        try:
            refusal = _refusal(scope, settings)
            await (refusal or self.app)(scope, _within_limit(response.receive, _body_limit(settings)), response.send)
        except ClientDisconnect:
            raise
        except Exception as exc:
            if response.started:  # the response has begun: nothing more can be said to this client
                raise
            await crash_response(exc)(scope, response.receive, response.send)


class _Response:
    """A request's response as it is sent: its status (500 until one is sent), whether it began and ended, and
    whether the server said its client gone, by `http.disconnect` (`receive`) or by a send that raised an OSError (ASGI
    2.4; uvicorn's `ClientDisconnected`). `send` adds the request id (and Server-Timing) to its headers, and raises
    that OSError as Starlette's `ClientDisconnect`, whatever ASGI version the server says (Starlette converts it in a
    stream only, and only under 2.4). Only the server's: an OSError of the app's own work is a failure."""

    def __init__(self, receive: Receive, send: Send, settings: Settings) -> None:
        self._receive, self._send, self._settings = receive, send, settings
        self.status, self.started, self.ended, self.client_gone = 500, False, False, False

    async def receive(self) -> Message:
        message = await self._receive()
        self.client_gone = self.client_gone or message["type"] == "http.disconnect"
        return message

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status, self.started = message["status"], True
            headers = MutableHeaders(scope=message)
            headers["X-Request-ID"] = request_id_var.get()
            if self._settings.server_timing and (stages := timing.server_timing_header()):
                headers["Server-Timing"] = stages
        try:
            await self._send(message)
        except OSError as gone:
            self.client_gone = True
            raise ClientDisconnect from gone
        self.ended = message["type"] == "http.response.body" and not message.get("more_body", False)


def _record_request(scope: Scope, status: int, seconds: float) -> None:
    """The request's metrics and its log line: method, route template, status, duration (uvicorn's access line, the
    raw request line with its query string, is off: core.logs)."""
    route, method = route_and_method(scope)
    observe_request(route, method, status, seconds)
    logger.info("%s %s %d %.1f ms", method, route, status, seconds * 1000)


class BodyTooLarge(StarletteHTTPException):
    """A request body passed the limit as it was read (sent chunked, without a Content-Length): the error handler
    answers it like an oversized declared body, whoever sent it, before anything reads further."""

    def __init__(self) -> None:
        super().__init__(status_code=413, detail=BODY_TOO_LARGE)


def _body_limit(settings: Settings) -> int:
    """The most body bytes a request may carry: an upload and its multipart framing."""
    return settings.max_upload_bytes + MULTIPART_OVERHEAD_BYTES


def _within_limit(receive: Receive, limit: int) -> Receive:
    """`receive`, raising `BodyTooLarge` as soon as more than `limit` body bytes have arrived: the JSON parser and
    the multipart parser (temporary files) never take in more, and neither does an unauthenticated caller."""
    received = 0

    async def receive_within_limit() -> Message:
        nonlocal received
        message = await receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                raise BodyTooLarge
        return message

    return receive_within_limit


def _too_large() -> JSONResponse:
    return error_response(413, ErrorCode.payload_too_large.name, BODY_TOO_LARGE)


def _refusal(scope: Scope, settings: Settings) -> JSONResponse | None:
    """A request refused before it runs: an oversized declared body, or a NUL in the URL (PostgreSQL stores none)."""
    if _declared_size(scope) > _body_limit(settings):
        return _too_large()
    if NUL in scope["path"] or b"%00" in scope.get("query_string", b""):
        return error_response(422, ErrorCode.invalid_request.name, f"invalid request: the URL's {NUL_MESSAGE}")
    return None


def _declared_size(scope: Scope) -> int:
    """The request's Content-Length, 0 when absent or malformed (the body limit applies as it is read)."""
    declared = Headers(scope=scope).get("content-length")
    return int(declared) if declared is not None and declared.isdigit() else 0
