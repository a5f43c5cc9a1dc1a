"""OpenTelemetry tracing of the query and ingestion paths: off by default, OTLP when configured.

Instrumentation is applied at start-up only when tracing is enabled (as OpenTelemetry's own instrumentations do),
so the disabled path costs nothing and domain code carries no tracing calls. Spans carry metadata only: the
stage name, departments, document ids, result counts, durations and error class names — never arguments such
as questions, document text, tokens or keys, and never exception messages.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from opentelemetry.trace import Status, StatusCode

from core import forksafe, timing
from core.settings import Settings

logger = logging.getLogger(__name__)

_SAFE_KWARGS = ("department", "departments", "document_id", "job_id")
_lock = forksafe.lock()
_state: dict[str, Any] = {"tracer": None, "provider": None, "originals": []}


def configure_tracing(settings: Settings, *, exporter: SpanExporter | None = None) -> bool:
    """Enable tracing when GOVRAG_OTEL_ENABLED (or a test exporter is given); idempotent. True if enabled.

    GOVRAG_SERVER_TIMING alone instruments the same stages for the `Server-Timing` response header only."""
    if not settings.otel_enabled and exporter is None:
        if settings.server_timing:
            with _lock:
                if not _state["originals"]:
                    _instrument()
        return False
    with _lock:
        if _state["provider"] is not None:
            return True
        provider = TracerProvider(resource=Resource.create({"service.name": settings.otel_service_name}))
        if exporter is not None:
            provider.add_span_processor(SimpleSpanProcessor(exporter))
        elif settings.otel_exporter_otlp_endpoint:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            provider.add_span_processor(BatchSpanProcessor(
                OTLPSpanExporter(endpoint=settings.otel_exporter_otlp_endpoint)))
        if exporter is None:
            trace.set_tracer_provider(provider)  # so other instrumentations join the same traces
        _state["provider"], _state["tracer"] = provider, provider.get_tracer("govrag")
        if not _state["originals"]:
            _instrument()
    return True


def shutdown_tracing() -> None:
    """Undo the instrumentation and flush spans (tests, process exit)."""
    with _lock:
        for owner, name, original in reversed(_state["originals"]):
            setattr(owner, name, original)
        _state["originals"].clear()
        provider = _state["provider"]
        _state["provider"] = _state["tracer"] = None
    if provider is not None:
        provider.shutdown()


def _targets() -> list[tuple[Any, str, str]]:
    """(owner, attribute, span name) for each traced stage of the query and ingestion paths."""
    from audit import service as audit_service
    from authz import service as authz_service
    from guard import service as guard_service
    from guard.pii import PiiRedactor
    from ingestion import pipeline
    from ingestion import service as ingestion_service
    from retrieval import generation
    from retrieval import service as retrieval_service
    from retrieval.edge_store import EdgeVectorStore
    from retrieval.embeddings import Embedder
    from retrieval.onnx_embedder import OnnxEmbedder
    from retrieval.store import VectorStore

    stores = [(cls, method, name) for cls in (VectorStore, EdgeVectorStore)
              for method, name in (("search_many", "search"), ("upsert", "ingest.index"))]
    embedders = [(cls, "embed", "embed") for cls in (Embedder, OnnxEmbedder)]
    return [
        (retrieval_service, "answer_query", "query"), (authz_service, "read_scope", "authz"),
        (guard_service, "admit", "guard"), (retrieval_service, "_recheck_and_open", "decrypt"),
        (generation, "respond", "model"), (audit_service, "record_retrieval", "audit"),
        (ingestion_service, "run_ingestion", "ingest"), (pipeline, "parse_document", "ingest.parse"),
        (pipeline, "chunk_sections", "ingest.chunk"), (PiiRedactor, "redact_many", "ingest.redact"),
        (ingestion_service, "protect", "ingest.protect"), *stores, *embedders,
    ]


def _instrument() -> None:
    for owner, name, span_name in _targets():
        original = getattr(owner, name)
        setattr(owner, name, _traced(original, span_name))
        _state["originals"].append((owner, name, original))


def _traced(function: Callable[..., Any], name: str) -> Callable[..., Any]:
    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with timing.stage(name):
            return _in_span(function, name, args, kwargs)

    return wrapper


def _in_span(function: Callable[..., Any], name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Call `function`, inside a span when a tracer is configured."""
    tracer = _state["tracer"]
    if tracer is None:
        return function(*args, **kwargs)
    with tracer.start_as_current_span(f"govrag.{name}", attributes=_attributes(kwargs),
                                      record_exception=False, set_status_on_exception=False) as span:
        try:
            result = function(*args, **kwargs)
        except Exception as exc:
            span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
            span.set_attribute("error.type", type(exc).__name__)
            raise
        if isinstance(result, list | tuple | dict):
            span.set_attribute("govrag.result_count", len(result))
        return result


def _attributes(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Only identifiers and names, never content."""
    found: dict[str, Any] = {}
    for key in _SAFE_KWARGS:
        value = kwargs.get(key)
        if isinstance(value, str):
            found[f"govrag.{key}"] = value[:128]
        elif isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
            found[f"govrag.{key}"] = [v[:128] for v in value][:50]
    return found
