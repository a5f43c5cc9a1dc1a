"""Prometheus metrics: one registry for the process, metadata only (never content)."""

from __future__ import annotations

import threading
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.registry import Collector

from core import forksafe

_LOCK_TYPES = (type(threading.Lock()), type(threading.RLock()))


class _Registry(CollectorRegistry):
    """A registry whose locks, and every lock of each metric registered in it (its labelled children and their
    values too), are free again in a forked child: a thread of the parent may have been counting as it forked, and
    prometheus_client renews none."""

    def register(self, collector: Collector) -> None:
        super().register(collector)
        forksafe.renewed(collector, _free_locks)


def _free_locks(obj: object) -> None:
    """Every lock a prometheus_client object holds, through its attributes, lists and dicts, made free."""
    pending, seen = [obj], set()
    while pending:
        item = pending.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, _LOCK_TYPES):
            item._at_fork_reinit()  # type: ignore[union-attr]
        elif isinstance(item, dict):
            pending += [*item.keys(), *item.values()]
        elif isinstance(item, list | tuple):
            pending += item
        elif item is obj or type(item).__module__.startswith("prometheus_client."):
            pending += getattr(item, "__dict__", {}).values()


REGISTRY = forksafe.renewed(_Registry(auto_describe=True), _free_locks)

QUERIES = Counter("govrag_queries_total",
                  "Governed queries by the ledger's decision (answered, refused, blocked, withheld, error)",
                  ["decision"], registry=REGISTRY)
QUERY_LATENCY = Histogram("govrag_query_latency_seconds", "End-to-end governed query latency", registry=REGISTRY)
AUTHZ_RECHECK_DROPS = Counter(
    "govrag_authz_recheck_drops_total",
    "ALERT: hits returned by the filtered search that failed the policy re-check (filter and policy disagree)",
    ["department"], registry=REGISTRY)
SELF_GRANTS_REFUSED = Counter(
    "govrag_authz_self_grants_refused_total",
    "ALERT: policy changes refused because they would raise the acting admin's own access (another admin must make"
    " them), by the department the access was sought in",
    ["department"], registry=REGISTRY)
SERVED_KEYS_MISSING = Counter(
    "govrag_served_keys_missing_total",
    "ALERT: hits of served documents whose data key is missing (a key store restored from an older backup) or does"
    " not open (its key row altered): their chunks are left out of answers until the documents are uploaded again",
    ["department"], registry=REGISTRY)
DEPARTMENT_KEYS_UNREADABLE = Counter(
    "govrag_department_keys_unreadable_total",
    "ALERT: queries that left out a department whose key does not open under the master key (its key row altered),"
    " and ingestion runs it failed: none of its documents is cited, uploaded or ingested until that row is restored"
    " from a backup",
    ["department"], registry=REGISTRY)
PLACEHOLDER_MAPS_UNREADABLE = Counter(
    "govrag_placeholder_maps_unreadable_total",
    "ALERT: reveals refused as the document's placeholder map does not open under its key or does not parse (its"
    " file altered): its placeholders cannot be revealed until the document is uploaded again",
    ["department"], registry=REGISTRY)
AUDIT_WRITE_FAILURES = Counter("govrag_audit_write_failures_total", "ALERT: audit events that could not be written",
                               registry=REGISTRY)
AUDIT_MIRROR_WRITE_FAILURES = Counter(
    "govrag_audit_mirror_write_failures_total",
    "ALERT: signed audit checkpoints that could not be appended to the mirror file (GOVRAG_AUDIT_CHECKPOINT_FILE): each"
    " is in the database only, where a database writer can delete it unseen (the retrieval was recorded and answered)",
    registry=REGISTRY)
INGESTED_DOCUMENTS = Counter("govrag_ingested_documents_total", "Ingestion outcomes by department",
                             ["department", "status"], registry=REGISTRY)
# issue 5: guardrails and the kill switch
FIREWALL_BLOCKS = Counter("govrag_firewall_blocks_total", "ALERT: questions blocked by the prompt firewall",
                          ["department"], registry=REGISTRY)
GUARD_HITS = Counter("govrag_guard_hits_total", "Guard detections (firewall, retrieved text, output guard)", ["kind"],
                     registry=REGISTRY)
OUTPUT_GUARD_WITHHELD = Counter("govrag_output_guard_withheld_total",
                                "ALERT: answers withheld by the output guard (canary or system prompt)", ["reason"],
                                registry=REGISTRY)
ANSWER_FALLBACKS = Counter("govrag_answer_fallbacks_total", "Generated answers replaced by the extractive one",
                           ["reason"], registry=REGISTRY)
KILL_SWITCH_CHANGES = Counter("govrag_kill_switch_changes_total", "Kill-switch changes", ["scope", "mode"],
                              registry=REGISTRY)
KILL_SWITCH_AUTO_TRIPS = Counter("govrag_kill_switch_auto_trips_total",
                                 "ALERT: departments moved to retrieval_only by the automatic trip", ["department"],
                                 registry=REGISTRY)
# issue 6: HTTP, kill-switch state, queue depth, audit volume (documents/chunks by state: audit/observability.py)
HTTP_REQUESTS = Counter("govrag_http_requests_total", "HTTP requests by route template, method and status",
                        ["route", "method", "status"], registry=REGISTRY)
HTTP_LATENCY = Histogram("govrag_http_request_duration_seconds", "HTTP request latency by route template",
                         ["route", "method"], registry=REGISTRY,
                         buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
KILL_SWITCH_STATE = Gauge("govrag_kill_switch_state", "Kill-switch mode per scope: 0 normal, 1 retrieval_only, "
                          "2 disabled (refreshed at scrape)", ["scope"], registry=REGISTRY)
QUEUE_DEPTH = Gauge("govrag_queue_depth", "Ingestion tasks waiting in the broker queue (refreshed at scrape)",
                    ["queue"], registry=REGISTRY)
AUDIT_EVENTS = Counter("govrag_audit_events_total", "Ledger rows written, by event type", ["event_type"],
                       registry=REGISTRY)


# The caller chooses the method: any other name is counted as "other", or each made-up one would be a new series.
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE"})


def route_and_method(scope: Any) -> tuple[str, str]:
    """A request's route template ("unmatched" when none) and method ("other" when not a standard one): never the raw
    path or query string, so ids stay out of labels and a caller's text out of the logs."""
    route = getattr(scope.get("route"), "path", None) or "unmatched"
    method = scope["method"] if scope["method"] in HTTP_METHODS else "other"
    return route, method


def observe_request(route: str, method: str, status: int, seconds: float) -> None:
    """Count and time one HTTP request under its route template and method (from `route_and_method`)."""
    HTTP_REQUESTS.labels(route=route, method=method, status=str(status)).inc()
    HTTP_LATENCY.labels(route=route, method=method).observe(seconds)
