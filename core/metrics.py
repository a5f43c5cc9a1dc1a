"""Prometheus metrics: one registry for the process, metadata only (never content)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

QUERIES = Counter("govrag_queries_total", "Governed queries by decision", ["decision"], registry=REGISTRY)
QUERY_LATENCY = Histogram("govrag_query_latency_seconds", "End-to-end governed query latency", registry=REGISTRY)
AUTHZ_RECHECK_DROPS = Counter(
    "govrag_authz_recheck_drops_total",
    "ALERT: hits returned by the filtered search that failed the policy re-check (filter and policy disagree)",
    ["department"], registry=REGISTRY)
AUDIT_WRITE_FAILURES = Counter("govrag_audit_write_failures_total", "ALERT: audit events that could not be written",
                               registry=REGISTRY)
INGESTED_DOCUMENTS = Counter("govrag_ingested_documents_total", "Ingestion outcomes by department",
                             ["department", "status"], registry=REGISTRY)
