"""Kill switch, per-department firewall modes and canaries: stored in the database, cached for under a second."""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
from collections import defaultdict, deque
from dataclasses import dataclass

import redis
from sqlalchemy.orm import Session

from audit import service as audit_service
from audit.schemas import AdminEventType
from authz.identity import SYSTEM_PREFIX, Identity
from core import broker, forksafe, metrics
from core.settings import Settings
from guard import repository
from guard.firewall import GuardMode
from guard.schemas import GLOBAL_SCOPE, KillMode

logger = logging.getLogger(__name__)
SYSTEM_IDENTITY = Identity(subject=f"{SYSTEM_PREFIX}guard", groups=(), is_platform_admin=True)
_MODE_ORDER = {GuardMode.off: 0, GuardMode.flag: 1, GuardMode.block: 2}


@dataclass(frozen=True)
class ScopeState:
    """One scope's stored controls."""

    kill_mode: KillMode
    firewall_mode: GuardMode | None
    reason: str | None
    canary: str | None


class _Cache:
    """The whole guard_controls table, re-read when older than the TTL (every process sees changes in < TTL)."""

    def __init__(self) -> None:
        self._lock = forksafe.lock()
        self._loaded: dict[str, tuple[float, dict[str, ScopeState]]] = {}

    def states(self, session: Session, ttl: float) -> dict[str, ScopeState]:
        key = str(session.get_bind().url)
        with self._lock:
            cached = self._loaded.get(key)
            if cached is not None and time.monotonic() - cached[0] < ttl:
                return cached[1]
        states = {row.scope: ScopeState(KillMode(row.kill_mode), GuardMode(row.firewall_mode)
                                        if row.firewall_mode else None, row.reason, row.canary)
                  for row in repository.all_controls(session)}
        with self._lock:
            self._loaded[key] = (time.monotonic(), states)
        return states

    def clear(self) -> None:
        with self._lock:
            self._loaded.clear()


_CACHE = _Cache()


def _states(session: Session, settings: Settings) -> dict[str, ScopeState]:
    return _CACHE.states(session, settings.guard_cache_seconds)


def kill_mode(*, session: Session, settings: Settings, departments: list[str]) -> KillMode:
    """The most restrictive kill-switch mode of the global scope and the departments searched."""
    states = _states(session, settings)
    modes = [states[s].kill_mode for s in (GLOBAL_SCOPE, *departments) if s in states]
    return max(modes, key=lambda m: m.severity, default=KillMode.normal)


def firewall_mode(*, session: Session, settings: Settings, departments: list[str]) -> GuardMode:
    """The strictest firewall mode among the departments searched (the settings default where none is stored)."""
    states = _states(session, settings)
    default = GuardMode(settings.firewall_default_mode)
    modes = [(states[d].firewall_mode if d in states else None) or default for d in departments] or [default]
    return max(modes, key=lambda m: _MODE_ORDER[m])


def canaries(*, session: Session, settings: Settings) -> dict[str, str]:
    """Every department's canary token (department → token)."""
    return {scope: s.canary for scope, s in _states(session, settings).items() if s.canary and scope != GLOBAL_SCOPE}


def ensure_canary(*, session: Session, settings: Settings, department: str) -> str:
    """The department's canary, minted (random, stored) on first use."""
    known = canaries(session=session, settings=settings).get(department)
    if known:
        return known
    row = repository.get_or_create(session, department)
    if not row.canary:
        row.canary = f"CNRY-{secrets.token_hex(8)}"
        session.commit()
        _CACHE.clear()
    return row.canary


def set_kill_switch(*, session: Session, settings: Settings, identity: Identity, scope: str, mode: KillMode,
                    reason: str) -> ScopeState:
    """Store the mode for `scope` and audit the change (commits)."""
    row = repository.get_or_create(session, scope)
    previous = row.kill_mode
    row.kill_mode, row.reason, row.updated_by = mode.value, reason, identity.subject
    session.flush()
    audit_service.record_admin_event(session=session, identity=identity, event_type=AdminEventType.kill_switch,
                                     department=None if scope == GLOBAL_SCOPE else scope, settings=settings,
                                     details={"scope": scope, "mode": mode.value, "previous": previous,
                                              "reason": reason})
    _CACHE.clear()
    metrics.KILL_SWITCH_CHANGES.labels(scope=scope, mode=mode.value).inc()
    # Who did it is the ledger's (the line's request id leads there): log lines name no subject.
    logger.warning("kill switch: scope=%s mode=%s (was %s)", scope, mode.value, previous)
    return ScopeState(mode, GuardMode(row.firewall_mode) if row.firewall_mode else None, row.reason, row.canary)


def set_firewall_mode(*, session: Session, settings: Settings, identity: Identity, department: str,
                      mode: GuardMode) -> None:
    """Store a department's firewall mode and audit it (commits)."""
    row = repository.get_or_create(session, department)
    previous = row.firewall_mode
    row.firewall_mode, row.updated_by = mode.value, identity.subject
    session.flush()
    audit_service.record_admin_event(session=session, identity=identity, event_type="firewall_mode",
                                     department=department, settings=settings,
                                     details={"mode": mode.value, "previous": previous})
    _CACHE.clear()


def list_states(*, session: Session, settings: Settings) -> dict[str, ScopeState]:
    """Every stored scope (fresh from the database)."""
    _CACHE.clear()
    return _states(session, settings)


class _TripWindow:
    """Guard hits per department in the last minute (per process: the embedded default)."""

    def __init__(self) -> None:
        self._lock = forksafe.lock()
        self._hits: dict[str, deque[float]] = defaultdict(deque)

    def add(self, department: str) -> int:
        now = time.monotonic()
        with self._lock:
            window = self._hits[department]
            window.append(now)
            while window and now - window[0] > 60.0:
                window.popleft()
            return len(window)

    def claim(self, department: str) -> bool:
        """Reset the department's window; True for the one caller that emptied it (that caller trips)."""
        with self._lock:
            return bool(self._hits.pop(department, None))


class _RedisTripCounter:
    """Guard hits per department in the last minute, shared by every replica: a Redis sorted set of hit times
    (older ones trimmed on each hit) that expires a minute after the last hit. Each Redis call passes the breaker
    govrag's reads of the broker's Redis share (`broker.through_breaker`)."""

    def __init__(self, client: redis.Redis, namespace: str, broker_url: str) -> None:
        self._client = client
        self._namespace = namespace
        self._broker_url = broker_url

    def _key(self, department: str) -> str:
        return f"govrag:guard-hits:{self._namespace}:{department}"

    def add(self, department: str) -> int:
        return broker.through_breaker(self._broker_url, lambda: self._add(department))

    def _add(self, department: str) -> int:
        key, now = self._key(department), time.time()
        pipe = self._client.pipeline()  # MULTI/EXEC: the four steps apply together
        pipe.zadd(key, {f"{now:.6f}-{secrets.token_hex(4)}": now})
        pipe.zremrangebyscore(key, "-inf", now - 60.0)
        pipe.zcard(key)
        pipe.expire(key, 61)
        _, _, count, _ = pipe.execute()
        return int(count)

    def claim(self, department: str) -> bool:
        """Reset the department's window; DEL is atomic, so exactly one replica wins the trip."""
        return broker.through_breaker(self._broker_url, lambda: bool(self._client.delete(self._key(department))))

    def close(self) -> None:
        """Close the client's idle connections, never one a hit is counting on right now (it is closed as the client
        is garbage, once that hit is done with it)."""
        self._client.connection_pool.disconnect(inuse_connections=False)


_TRIPS = _TripWindow()
_REDIS_COUNTERS: dict[tuple[str, float, str], _RedisTripCounter] = {}
_REDIS_COUNTERS_LOCK = forksafe.lock()
forksafe.rebuilt_in_child(_REDIS_COUNTERS)  # a forked child makes its own Redis connections


def _trip_counter(settings: Settings) -> _TripWindow | _RedisTripCounter:
    """Redis when the deployment has it (the broker URL), so replicas count together; else this process."""
    if not broker.is_redis(settings.broker_url):
        return _TRIPS
    # One deployment = one database: replicas of it share counters, other deployments on the same Redis do not.
    namespace = hashlib.sha256(settings.resolved_database_url.encode()).hexdigest()[:16]
    with _REDIS_COUNTERS_LOCK:
        key = (settings.broker_url, settings.broker_socket_timeout_seconds, namespace)
        if key not in _REDIS_COUNTERS:
            _REDIS_COUNTERS[key] = _RedisTripCounter(broker.redis_client(settings), namespace, settings.broker_url)
        return _REDIS_COUNTERS[key]


def close_redis_counters() -> None:
    """Forget the Redis counters of this process and close their idle connections. Called as the API stops (api.app):
    else each broker URL, Redis timeout and database an API counted hits for kept a client, and its connection, for
    the process's life (a test's hung or refusing endpoint too). The counts are Redis's: the next hit, from an API
    still running or started again, makes a new client and goes on counting where they were."""
    with _REDIS_COUNTERS_LOCK:
        counters = list(_REDIS_COUNTERS.values())
        _REDIS_COUNTERS.clear()
    for counter in counters:
        counter.close()


def record_guard_hit(*, session: Session, settings: Settings, departments: list[str], kind: str) -> list[str]:
    """Count a blocked injection or output-guard hit; departments over the limit go to retrieval_only. Once Redis
    fails, the hit's further departments count in this process: a hung Redis holds the query for a socket timeout
    once, not once per department it searched; and so do later hits until `broker.REDIS_COOL_DOWN_SECONDS` have
    passed (the breaker, which a failed read of the queue depth or of lost jobs opens as well), so it holds one hit
    per cool-down, not every one. The query's block never depends on this."""
    metrics.GUARD_HITS.labels(kind=kind).inc()
    limit, tripped = settings.guard_auto_trip_per_minute, []
    if limit <= 0:
        return tripped
    counter = _trip_counter(settings)
    for department in departments:
        count, counter = _count(counter, department)
        if count >= limit and kill_mode(
                session=session, settings=settings, departments=[department]) is KillMode.normal \
                and _claim(counter, department) and _trip(session, settings, department, limit):
            metrics.KILL_SWITCH_AUTO_TRIPS.labels(department=department).inc()
            tripped.append(department)
    return tripped


def _trip(session: Session, settings: Settings, department: str, limit: int) -> bool:
    """Move the department to retrieval_only if its stored mode, read under the scope's lock, is still normal. The
    cached mode may be up to `guard_cache_seconds` old: an admin on another replica may have disabled the department
    meanwhile, and a trip must never write retrieval_only over that (queries would be answered again). Commits."""
    if KillMode(repository.get_or_create(session, department).kill_mode) is not KillMode.normal:
        session.commit()  # nothing written: ends the transaction, which releases the scope's lock
        return False
    set_kill_switch(session=session, settings=settings, identity=SYSTEM_IDENTITY, scope=department,
                    mode=KillMode.retrieval_only, reason=f"automatic trip: {limit} guard hits in a minute")
    return True


def _count(counter: _TripWindow | _RedisTripCounter, department: str) -> tuple[int, _TripWindow | _RedisTripCounter]:
    """Add one hit: the window's count and the counter that holds it (Redis unreachable: this process's, so the
    trip resets the window that counted, exactly as in the embedded default, rather than failing the query)."""
    try:
        return counter.add(department), counter
    except redis.RedisError:  # logged by the breaker as it opens; broker.RedisSkipped while it is open
        return _TRIPS.add(department), _TRIPS


def _claim(counter: _TripWindow | _RedisTripCounter, department: str) -> bool:
    """Win the right to trip by resetting the window that counted (Redis gone since the count: trip anyway; a
    second trip changes nothing)."""
    try:
        return counter.claim(department)
    except redis.RedisError:
        return True
