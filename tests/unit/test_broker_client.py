"""govrag's own redis-py clients of the broker (the guard's shared counters, the queue-depth metric) give up on a
Redis after `broker_socket_timeout_seconds`, as Celery's connections do: they had a fixed 1 s per socket operation
(and the metric's connection attempt redis-py's own 5 s), whatever the setting said."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import redis

from core import broker
from core.settings import Settings
from tests.conftest import REDIS_URL
from tests.support.forking import exit_code_of_child
from workers.celery_app import create_celery

UNREACHABLE = "redis://127.0.0.1:9/0"  # the discard port: nothing listens, the connection is refused at once


def _settings(tmp_path: Path, url: str) -> Settings:
    return Settings(data_dir=tmp_path / "data", broker_url=url, broker_socket_timeout_seconds=4.5)


def test_a_broker_client_gives_up_after_the_setting_as_celery_does(tmp_path: Path) -> None:
    settings = _settings(tmp_path, REDIS_URL)
    with broker.redis_client(settings) as client:
        kwargs = client.connection_pool.connection_kwargs
        assert (kwargs["socket_timeout"], kwargs["socket_connect_timeout"]) == (4.5, 4.5)
        assert client.ping()
    celery = create_celery(settings).conf.broker_transport_options
    assert (celery["socket_timeout"], celery["socket_connect_timeout"]) == (4.5, 4.5)


def test_a_broker_client_of_an_unreachable_redis_raises_what_its_callers_catch(tmp_path: Path) -> None:
    """A RedisError, which the guard's counter and the metric catch (counting in this process, the gauge left)."""
    with broker.redis_client(_settings(tmp_path, UNREACHABLE)) as client, pytest.raises(redis.ConnectionError):
        client.ping()


def test_a_child_forked_while_the_breaker_is_open_tries_redis_at_once(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The breakers are rebuilt in a forked child (a Celery prefork child, a gunicorn-style worker): one open in the
    parent, or held by a probe running on a thread the child does not have, would keep the child off Redis."""
    monkeypatch.setattr(broker, "REDIS_COOL_DOWN_SECONDS", 3600.0)
    url = f"{UNREACHABLE[:-1]}15"  # a breaker of its own: other tests read the unreachable URL through theirs
    with broker.redis_client(_settings(tmp_path, url)) as client, pytest.raises(redis.ConnectionError):
        broker.through_breaker(url, client.ping)
    with pytest.raises(broker.RedisSkipped):
        broker.through_breaker(url, lambda: True)
    assert exit_code_of_child(lambda: broker.through_breaker(url, lambda: True)) == 0


def _open_breaker(tmp_path: Path, url: str) -> None:
    """A read of the unreachable Redis at `url` through its breaker: it opens."""
    with broker.redis_client(_settings(tmp_path, url)) as client, pytest.raises(redis.ConnectionError):
        broker.through_breaker(url, client.ping)


def _raise(error: Exception) -> None:
    raise error


def test_a_probe_ended_by_an_error_past_redis_lets_the_next_read_probe(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A probe that ends in an error other than Redis unreached (the sweep's too many tasks, a bug in the read) ends
    the probe: with the cool-down passed, the next read tries Redis, not skipped for a probe no longer running."""
    monkeypatch.setattr(broker, "REDIS_COOL_DOWN_SECONDS", 3600.0)
    url = f"{UNREACHABLE[:-1]}14"  # a breaker of its own
    _open_breaker(tmp_path, url)
    monkeypatch.setattr(broker, "REDIS_COOL_DOWN_SECONDS", 0.0)
    for raised in (LookupError("the read stopped past its answers"), redis.ResponseError("WRONGTYPE")):
        with pytest.raises(type(raised)):
            broker.through_breaker(url, functools.partial(_raise, raised))
    assert broker.through_breaker(url, lambda: "read") == "read"
