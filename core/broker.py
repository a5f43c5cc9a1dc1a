"""The broker's Redis as govrag reads it beside Celery (the guard's shared counters, the queue-depth metric): with the
same socket timeouts as Celery's own connections, so a Redis that does not answer counts as down alike everywhere."""

from __future__ import annotations

import redis

from core.settings import Settings


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
