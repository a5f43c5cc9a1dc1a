"""The broker's Redis as govrag uses it (the guard's shared counters, the queue-depth metric, the job sweep's look
for lost jobs, the sending of ingestion tasks, /readyz's broker check): with the same socket timeouts as Celery's own
connections, so a Redis that does not answer counts as down alike everywhere, and through one breaker per broker URL
and process, so a hung one holds one read, send or probe per cool-down, not each."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

import redis
from kombu.exceptions import OperationalError

from core import forksafe
from core.settings import Settings

logger = logging.getLogger(__name__)
T = TypeVar("T")

# Redis not reached, or not answering in time: redis-py's errors for either, kombu's for a connection it could not make
UNREACHABLE = (redis.ConnectionError, redis.TimeoutError, OperationalError)
# After a read or send of the broker's Redis fails to reach it, this process's reads and sends skip it for this long;
# then one tries it again (one at a time). A hung Redis holds one of them per process and cool-down, not each.
REDIS_COOL_DOWN_SECONDS = 5.0


def is_redis(broker_url: str) -> bool:
    """True when the broker is Redis (a redis:// or rediss:// URL, its scheme in lower case as the settings hand it
    on), which govrag reads beside Celery; False on the in-process `memory://` broker."""
    return broker_url.startswith(("redis://", "rediss://"))


def is_in_memory(broker_url: str) -> bool:
    """True on the in-process `memory://` broker, which lives in one process's memory and starts empty."""
    return broker_url.startswith("memory://")


def socket_timeouts(settings: Settings) -> dict[str, float]:
    """`broker_socket_timeout_seconds` for each socket operation and for each connection attempt."""
    return {"socket_timeout": settings.broker_socket_timeout_seconds,
            "socket_connect_timeout": settings.broker_socket_timeout_seconds}


def redis_client(settings: Settings) -> redis.Redis:
    """A redis-py client for the broker URL (a redis:// or rediss:// one); it connects on its first command."""
    return redis.Redis.from_url(settings.broker_url, **socket_timeouts(settings))


class RedisSkipped(redis.RedisError):
    """The breaker is open (the broker's Redis failed a moment ago): the read or send did not try Redis."""


class _Breaker:
    """Closed: every read tries Redis. Open (a read could not reach it): reads skip it until the cool-down since the
    failure has passed, then the one read that asks first probes Redis while the others keep skipping it until the
    probe ends, however long it takes; an answer closes it. Each opening and closing is logged once."""

    def __init__(self) -> None:
        self._lock = forksafe.lock()
        self._failed_at: float | None = None  # monotonic time of the last failure; None while closed
        self._probing = False  # a read is trying Redis while the breaker is open

    def read(self, call: Callable[[], T]) -> T:
        """`call`'s result if the breaker lets it try Redis (else `RedisSkipped`). An answer closes the breaker, Redis
        unreached (`UNREACHABLE`) opens it; anything else raised (an error Redis answered, the caller's own past its
        answer) leaves it as it was. Either way a probe ends and the next read may probe."""
        if not self._admits():
            raise RedisSkipped
        try:
            result = call()
        except UNREACHABLE:
            self._failed()
            raise
        except BaseException:
            self._ended()
            raise
        self._answered()
        return result

    def _admits(self) -> bool:
        """Whether this read may try Redis: always while closed, while open one at a time once per cool-down."""
        with self._lock:
            if self._failed_at is None:
                return True
            if self._probing or time.monotonic() - self._failed_at < REDIS_COOL_DOWN_SECONDS:
                return False
            self._probing = True
            return True

    def _failed(self) -> None:
        with self._lock:
            opening = self._failed_at is None
            self._failed_at, self._probing = time.monotonic(), False
        if opening:
            logger.warning("broker's Redis failed: govrag skips it (guard hit counts, queue depth, lost jobs,"
                           " readiness) and sends no ingestion task, each left unsent for the sweep, trying it again"
                           " after %s s",
                           REDIS_COOL_DOWN_SECONDS)

    def _ended(self) -> None:
        with self._lock:
            self._probing = False

    def _answered(self) -> None:
        with self._lock:
            closing = self._failed_at is not None
            self._failed_at, self._probing = None, False
        if closing:
            logger.warning("broker's Redis answers again: govrag tries it again, ingestion tasks too")


_BREAKERS: dict[str, _Breaker] = {}
_BREAKERS_LOCK = forksafe.lock()
forksafe.rebuilt_in_child(_BREAKERS)  # a probe the parent was running is not in the child: it starts closed


def guarded(broker_url: str, call: Callable[[], T]) -> T:
    """`call` on the broker at `broker_url`: through its breaker on Redis (`through_breaker`), straight on the
    in-memory broker, which lives in this process and cannot hang."""
    return through_breaker(broker_url, call) if is_redis(broker_url) else call()


def through_breaker(broker_url: str, call: Callable[[], T]) -> T:
    """`call`, a read of the broker's Redis at `broker_url` or a send of a task to it, through this process's breaker
    for it (`_Breaker.read`): `RedisSkipped` without trying Redis for `REDIS_COOL_DOWN_SECONDS` after a call could not
    reach it."""
    with _BREAKERS_LOCK:
        if broker_url not in _BREAKERS:
            _BREAKERS[broker_url] = _Breaker()
        breaker = _BREAKERS[broker_url]
    return breaker.read(call)
