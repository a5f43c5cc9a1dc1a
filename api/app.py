"""The FastAPI application factory."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import anyio.to_thread
from fastapi import FastAPI, Request, Response

from api.errors import error_response, install_error_handlers
from api.routers import admin, audit, authz, documents, guard_admin, health, ingestion_admin, metrics, query
from authz.dev_issuer import DevIssuer
from authz.enforcer import get_enforcer
from authz.tokens import TokenVerifier
from core import timing
from core.errors import ErrorCode
from core.logs import configure_logging, request_id_var
from core.metrics import observe_request
from core.settings import Settings, get_settings
from core.tracing import configure_tracing
from guard.firewall import get_firewall
from guard.injection import get_scanner
from guard.pii import get_redactor
from retrieval.embeddings import get_embedder
from retrieval.store import open_vector_store
from workers.celery_app import create_celery
from workers.inprocess import InProcessWorker

logger = logging.getLogger(__name__)

MULTIPART_OVERHEAD_BYTES = 64 * 1024


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the API for `settings` (default: from the environment)."""
    app = FastAPI(title="govrag", version="0.1.0", lifespan=_lifespan)
    app.state.settings = settings or get_settings()
    install_error_handlers(app)
    app.middleware("http")(_request_context)
    for module in (health, documents, query, admin, authz, audit, guard_admin, metrics, ingestion_admin):
        app.include_router(module.router)
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Open shared clients once; run an in-process worker when the store is embedded."""
    settings: Settings = app.state.settings
    configure_logging(settings.log_level)
    configure_tracing(settings)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    # Sync endpoints run in anyio's thread pool (40 threads by default). Queries are CPU-bound under one GIL: more
    # threads than this only stretch every request, and the ledger's serialised append with them.
    anyio.to_thread.current_default_thread_limiter().total_tokens = settings.api_threads
    app.state.enforcer = get_enforcer(settings.resolved_database_url, settings.authz_default_clearance,
                                      settings.authz_policy_check_seconds)
    app.state.dev_issuer = (DevIssuer.load_or_create(settings.dev_issuer_dir, settings.oidc_issuer,
                                                     settings.oidc_audience) if settings.dev_issuer else None)
    app.state.verifier = TokenVerifier.from_settings(settings, app.state.dev_issuer)
    app.state.celery = create_celery(settings)
    open_vector_store(settings)
    get_embedder(settings.embedding_backend)
    get_redactor()
    get_firewall(), get_scanner()  # issue 5: load the guard weights before the first query
    worker = InProcessWorker(app.state.celery) if settings.inprocess_worker else None
    if worker is not None:
        worker.start()
    logger.info("govrag ready (env=%s, in-process worker=%s)", settings.env, worker is not None)
    try:
        yield
    finally:
        if worker is not None:
            worker.stop()


async def _request_context(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
    """A request id for every line and response; oversized uploads refused before the body is read."""
    token = request_id_var.set(uuid.uuid4().hex)
    started = time.perf_counter()
    timing.start_request()
    try:
        limit = request.app.state.settings.max_upload_bytes + MULTIPART_OVERHEAD_BYTES
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            response: Response = error_response(413, ErrorCode.payload_too_large.name,
                                                "request body exceeds the upload limit")
        else:
            response = await call_next(request)
        response.headers["X-Request-ID"] = request_id_var.get()
        if request.app.state.settings.server_timing and (stages := timing.server_timing_header()):
            response.headers["Server-Timing"] = stages
        observe_request(request, response.status_code, time.perf_counter() - started)
        return response
    finally:
        request_id_var.reset(token)
