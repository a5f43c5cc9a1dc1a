"""govrag's reads of the broker's Redis beside Celery share one breaker per process (core/broker.py): the guard's
shared counter (tests/integration/test_kill_switch_scope.py), the queue-depth metric read at each /metrics scrape and
the job sweep's look for lost jobs. A hung Redis (accepts, never answers) held each scrape and each sweep round for
`GOVRAG_BROKER_SOCKET_TIMEOUT_SECONDS`, each trying it again. After a read fails, they skip Redis until
`REDIS_COOL_DOWN_SECONDS` have passed. The cool-down is set to an hour (never passes within a test) or 0 (has passed),
so nothing here depends on the clock: the connections the hung endpoint took are counted. Sending a job goes through
the same breaker."""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from api.app import create_app
from audit import observability
from core import broker, metrics, migrate
from core.db import unit_of_work
from core.models import IngestionJob
from core.settings import Settings
from core.sweeper import NOT_RUN, Sweeper
from guard import controls
from retrieval.store import close_vector_store
from tests.conftest import PLATFORM_ADMIN, auth, desk_member
from tests.support.hung_redis import breaker_said, redis_that_hangs
from workers.celery_app import create_celery
from workers.dispatch import send_unsent, sweep_jobs


def _settings(tmp_path: Path, broker_url: str, **overrides: object) -> Settings:
    url = f"sqlite:///{tmp_path / 'breaker.db'}"
    migrate.upgrade(url)
    return Settings(data_dir=tmp_path, database_url=url, broker_url=broker_url,  # type: ignore[arg-type]
                    broker_socket_timeout_seconds=1.5, task_queue=f"breaker-{uuid.uuid4().hex[:8]}",
                    guard_auto_trip_per_minute=100, **overrides)


def _scrape(settings: Settings) -> float | None:
    """Refresh the scrape-time gauges, as GET /metrics does: the queue depth then exposed."""
    with unit_of_work(settings.resolved_database_url) as session:
        observability.refresh(session=session, settings=settings)
    return metrics.REGISTRY.get_sample_value("govrag_queue_depth", {"queue": settings.task_queue})


def _said(caplog: pytest.LogCaptureFixture, *loggers: str) -> list[str]:
    return [record.getMessage() for record in caplog.records
            if record.name in loggers and record.levelno > logging.DEBUG]


def test_after_a_redis_failure_scrapes_keep_the_queue_depth_without_trying_redis_until_the_cool_down_passes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The scrape that finds Redis hung leaves the gauge at its last value with a warning, as before; the scrapes
    after it leave it there without trying Redis or a word, until the cool-down has passed and one reads it again."""
    caplog.set_level(logging.DEBUG)
    monkeypatch.setattr(broker, "REDIS_COOL_DOWN_SECONDS", 3600.0)
    with redis_that_hangs() as (endpoint, real, broker_url):
        settings = _settings(tmp_path, broker_url)
        real.rpush(settings.task_queue, "a", "b")
        endpoint.hung = False
        assert (_scrape(settings), endpoint.connections) == (2.0, 1)
        endpoint.hung = True
        assert (_scrape(settings), endpoint.connections) == (2.0, 2)  # hung: the gauge as it was
        real.rpush(settings.task_queue, "c")
        assert [(_scrape(settings), endpoint.connections) for _ in range(3)] == [(2.0, 2)] * 3  # Redis not tried
        endpoint.hung = False
        monkeypatch.setattr(broker, "REDIS_COOL_DOWN_SECONDS", 0.0)
        assert (_scrape(settings), endpoint.connections) == (3.0, 3)  # tried again, and read
        real.delete(settings.task_queue)
    opened, closed = breaker_said(3600.0)
    assert _said(caplog, "audit.observability", "core.broker") == [opened, "metrics: queue depth unavailable", closed]


def test_after_a_redis_failure_job_sweeps_skip_the_broker_read_until_the_cool_down_passes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The round that finds Redis hung says the sweep waits for the broker, as before; the rounds after it do not
    try Redis and log nothing (neither a failure nor the sweep running again), until the cool-down has passed and a
    round reads the broker again: the sweep runs again."""
    caplog.set_level(logging.DEBUG)
    monkeypatch.setattr(broker, "REDIS_COOL_DOWN_SECONDS", 3600.0)
    with redis_that_hangs() as (endpoint, _, broker_url):
        app = create_celery(_settings(tmp_path, broker_url))
        sweeper = Sweeper({"ingestion job": lambda: sweep_jobs(app, older_than_seconds=0)}, interval=60)
        sweeper.run_round()
        tried = endpoint.connections
        assert tried >= 1
        said = _said(caplog, "core.sweeper", "workers.dispatch")
        for _ in range(3):
            sweeper.run_round()
        assert (endpoint.connections, _said(caplog, "core.sweeper", "workers.dispatch")) == (tried, said)
        endpoint.hung = False
        monkeypatch.setattr(broker, "REDIS_COOL_DOWN_SECONDS", 0.0)
        sweeper.run_round()
        assert endpoint.connections > tried
    assert _said(caplog, "core.broker") == list(breaker_said(3600.0))
    waited, ran = _said(caplog, "core.sweeper", "workers.dispatch")
    assert waited == "the ingestion job sweep waits for the broker: the next round tries again"
    assert ran.startswith("the ingestion job sweep runs again, 4 round(s) and ")


def _hit(settings: Settings, department: str) -> list[str]:
    with unit_of_work(settings.resolved_database_url) as session:
        return controls.record_guard_hit(session=session, settings=settings, departments=[department],
                                         kind="firewall")


def test_a_failed_scrape_holds_back_the_guard_counter_and_the_sweep_too(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One breaker for the broker's Redis in a process: a scrape that finds it hung opens it for the guard's counter
    (the hit counts in this process) and for the sweep's broker read as well, neither trying Redis."""
    monkeypatch.setattr(broker, "REDIS_COOL_DOWN_SECONDS", 3600.0)
    department = f"held{uuid.uuid4().hex[:6]}"
    with redis_that_hangs() as (endpoint, real, broker_url):
        settings = _settings(tmp_path, broker_url)
        _scrape(settings)
        assert endpoint.connections == 1
        assert _hit(settings, department) == []
        assert sweep_jobs(create_celery(settings), older_than_seconds=0) is NOT_RUN  # lost jobs not looked for
        assert endpoint.connections == 1
        assert real.keys(f"govrag:guard-hits:*:{department}") == []


def test_an_error_redis_answers_leaves_the_breaker_closed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An error Redis answers (a guard hit's key holding another type: WRONGTYPE) is no outage, and a sweep's broker
    read that stops past its answers (too many tasks) no more: the guard breaker opened on either, so the next hits
    counted in their process and the sweep sent them there at every round. Now the next read tries Redis."""
    monkeypatch.setattr(broker, "REDIS_COOL_DOWN_SECONDS", 3600.0)
    refused, counted = (f"answer{uuid.uuid4().hex[:6]}" for _ in range(2))
    with redis_that_hangs() as (endpoint, real, broker_url):
        endpoint.hung = False
        settings = _settings(tmp_path, broker_url)
        keys = [controls._trip_counter(settings)._key(name) for name in (refused, counted)]  # type: ignore[union-attr]
        real.set(keys[0], "not a sorted set")
        assert (_hit(settings, refused), _hit(settings, counted)) == ([], [])  # the first counted in this process
        assert real.zcard(keys[1]) == 1
        real.delete(*keys)


def test_an_api_stopped_closes_the_connection_its_guard_hit_counter_kept_to_redis(tmp_path: Path) -> None:
    """The guard's shared counters are the process's, one Redis client per broker URL, timeout and database: each
    kept its connection for the process's life, an API long stopped (or a test's endpoint long gone) included. The
    API's stop now closes them; the count is Redis's, so a hit after it (an API still running, or started again)
    goes on from where it was. Real Redis through an endpoint of its own, this process's connections to it counted."""
    from tests.support.sockets import connections_to

    department = f"stop{uuid.uuid4().hex[:6]}"
    with redis_that_hangs() as (endpoint, real, broker_url):
        endpoint.hung = False
        settings = _settings(tmp_path, broker_url, inprocess_worker=False, job_sweep_seconds=0)
        port = endpoint.server.getsockname()[1]
        with TestClient(create_app(settings)):
            assert _hit(settings, department) == []
            assert connections_to(port) == 1  # the counter's
        close_vector_store(settings)
        assert connections_to(port) == 0  # main: 1, for the process's life
        assert _hit(settings, department) == []
        key = controls._trip_counter(settings)._key(department)  # type: ignore[union-attr]
        assert real.zcard(key) == 2
        controls.close_redis_counters()
        assert connections_to(port) == 0
        real.delete(key)


def test_a_hit_in_flight_as_an_api_stops_keeps_its_connection_and_counts_in_redis(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The counters are the process's, so one API's stop closes them under another's hit in flight: only the idle
    connections are closed, never the one a hit has sent its command on (closed, the hit's read fails: its count
    falls back to this process's window, an auto-trip replicas would have made together missed, or an I/O error
    escapes). The forgotten counter still counts in Redis, and the breaker stays closed."""
    department = f"fly{uuid.uuid4().hex[:6]}"
    with redis_that_hangs() as (endpoint, real, broker_url):
        endpoint.hung = False
        settings = _settings(tmp_path, broker_url)
        counter = controls._trip_counter(settings)
        assert isinstance(counter, controls._RedisTripCounter)
        pool = counter._client.connection_pool
        in_flight = pool.get_connection()
        in_flight.send_command("PING")  # a hit's command sent, its reply not read yet
        controls.close_redis_counters()
        assert in_flight.read_response() in (b"PONG", "PONG", True)  # closed under it: the read fails
        pool.release(in_flight)
        monkeypatch.setattr(controls._TRIPS, "add", lambda _: pytest.fail("counted in this process"))
        assert controls._count(counter, department) == (1, counter)
        assert controls._trip_counter(settings) is not counter  # the next hit's: a new client, the same count
        assert controls._count(controls._trip_counter(settings), department)[0] == 2
        controls.close_redis_counters()
        real.delete(counter._key(department))


def _upload(client: TestClient, editor: dict[str, str], n: int) -> str:
    """A desk editor's upload, accepted; its job's id."""
    response = client.post("/v1/documents", headers=editor, data={"department": "desk"},
                           files={"file": (f"note-{n}.txt", f"Note {n}: the desk opens at nine.".encode())})
    assert response.status_code == 202, response.text
    return str(response.json()["job_id"])


def _unsent(settings: Settings) -> set[str]:
    with unit_of_work(settings.resolved_database_url) as session:
        return set(session.scalars(select(IngestionJob.id).where(IngestionJob.sent_at.is_(None))))


def test_an_upload_s_send_to_a_hung_redis_retries_once_and_opens_the_breaker_the_sweep_sends_its_job_later(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """An upload whose send found Redis hung (its pooled connection stopped answering) was retried 3 times by
    kombu (Celery's default publish retry policy), each reconnection waiting out the socket timeout: 4 new
    connections tried, 15.6 s at the default 3 s, and every upload after it the same, the send not going through the
    breaker. Now one retry (`PUBLISH_RETRY_POLICY`: kombu's reconnection tries twice), and the breaker opens: the
    next upload does not try Redis. Both are accepted, their jobs unsent; once Redis answers, the sweep's send after
    the cool-down sends them, one connection. Connections counted, no clock."""
    caplog.set_level(logging.WARNING, logger="core.broker")
    monkeypatch.setattr(broker, "REDIS_COOL_DOWN_SECONDS", 3600.0)
    with redis_that_hangs() as (endpoint, real, broker_url):
        endpoint.hung = False
        settings = _settings(tmp_path, broker_url, admins=[PLATFORM_ADMIN], inprocess_worker=False,
                             job_sweep_seconds=0)
        with TestClient(create_app(settings)) as client:
            editor = auth(desk_member(client, "editor"))
            _upload(client, editor, 0)  # sent: its connections kept in kombu's pool
            tried = endpoint.connections
            endpoint.hung = True
            held = _upload(client, editor, 1)
            assert endpoint.connections - tried == 2  # its send: one retry (main: 4)
            skipped = _upload(client, editor, 2)
            assert endpoint.connections - tried == 2  # the breaker open: Redis not tried (main: 4 more)
            assert _unsent(settings) == {held, skipped}
            endpoint.hung = False
            monkeypatch.setattr(broker, "REDIS_COOL_DOWN_SECONDS", 0.0)
            assert send_unsent(client.app.state.celery, older_than_seconds=0) == 2  # type: ignore[attr-defined]
        close_vector_store(settings)
        assert (_unsent(settings), real.llen(settings.task_queue)) == (set(), 3)
        real.delete(*real.keys(f"*{settings.task_queue}*"))
    assert _said(caplog, "core.broker") == list(breaker_said(3600.0))


def test_readiness_probes_skip_a_hung_redis_while_the_breaker_is_open_and_say_it_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """/readyz connected to the broker outside its breaker: with Redis hung, every probe waited out the socket timeout
    on a connection of its own (3 s at the default), and probes came faster than they were answered. Now the probe
    that finds Redis hung opens the breaker (not ready, as before), and those after it are not ready at once, Redis
    not tried, until the cool-down has passed and one probes it again: ready once it answers. A hung Redis is logged
    once ("unreachable", tried or skipped), and once as the broker is ok again. Connections counted, no clock."""
    caplog.set_level(logging.INFO)
    monkeypatch.setattr(broker, "REDIS_COOL_DOWN_SECONDS", 3600.0)
    with redis_that_hangs() as (endpoint, _, broker_url):
        endpoint.hung = False
        settings = _settings(tmp_path, broker_url, inprocess_worker=False, job_sweep_seconds=0)
        with TestClient(create_app(settings)) as client:
            assert client.get("/readyz").json()["checks"]["broker"] == "ok"
            endpoint.hung = True
            probes = [client.get("/readyz")]
            tried = endpoint.connections  # the first probe's (its connection, and kombu's retry of it)
            probes += [client.get("/readyz") for _ in range(3)]
            assert [(probe.status_code, probe.json()["checks"]["broker"]) for probe in probes] == [(503, "down")] * 4
            assert endpoint.connections == tried  # the breaker open: Redis not tried (main: each probe tried it)
            endpoint.hung = False
            monkeypatch.setattr(broker, "REDIS_COOL_DOWN_SECONDS", 0.0)
            assert client.get("/readyz").json() == {"ready": True, "checks": dict.fromkeys(probes[0].json()["checks"],
                                                                                          "ok")}
        close_vector_store(settings)
    opened, closed = breaker_said(3600.0)
    assert _said(caplog, "core.broker", "api.routers.health") == [
        opened, "not ready: broker down (unreachable)", closed, "broker ok again"]


def test_a_guard_hit_that_could_not_reach_redis_makes_readiness_down_until_the_cool_down_passes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The readiness probe shares the breaker of govrag's other uses of the broker's Redis: once a guard hit (or a
    scrape, a sweep, a send) could not reach it, /readyz is not ready without trying Redis, even though Redis answers
    again, until the cool-down (5 s) has passed; then the first probe tries Redis, and is ready. This is the price of a
    hung Redis holding one probe per cool-down (README: an orchestrator should let readiness fail for longer than the
    cool-down before taking the API out of rotation). On main the probe tried Redis, which answered: ready at once.
    Connections counted, no clock."""
    caplog.set_level(logging.INFO)
    monkeypatch.setattr(broker, "REDIS_COOL_DOWN_SECONDS", 3600.0)
    department = f"ready{uuid.uuid4().hex[:6]}"
    with redis_that_hangs() as (endpoint, real, broker_url):
        endpoint.hung = False
        settings = _settings(tmp_path, broker_url, inprocess_worker=False, job_sweep_seconds=0)
        with TestClient(create_app(settings)) as client:
            assert client.get("/readyz").status_code == 200
            endpoint.hung = True
            endpoint.drop()  # the guard's kept connection, if any, fails: its hit reconnects, to a hung Redis
            assert _hit(settings, department) == []  # counted in this process: the breaker opens
            endpoint.hung = False  # Redis answers again
            tried = endpoint.connections
            probe = client.get("/readyz")
            assert (probe.status_code, probe.json()["checks"]["broker"]) == (503, "down")
            assert endpoint.connections == tried  # not tried: the breaker a guard hit opened
            monkeypatch.setattr(broker, "REDIS_COOL_DOWN_SECONDS", 0.0)
            assert client.get("/readyz").status_code == 200
            assert endpoint.connections > tried  # the probe after the cool-down tried Redis, and closed the breaker
        close_vector_store(settings)
        assert real.keys(f"govrag:guard-hits:*:{department}") == []  # the hit never reached Redis
    opened, closed = breaker_said(3600.0)
    assert _said(caplog, "core.broker", "api.routers.health") == [
        opened, "not ready: broker down (unreachable)", closed, "broker ok again"]
