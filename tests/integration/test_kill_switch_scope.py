"""Kill switch (issue 5): the automatic trip counts across API replicas through Redis (in-process when embedded),
and no department may take the name of the global scope."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import select

from authz.identity import Identity
from core import broker, migrate
from core.db import unit_of_work
from core.models import RetrievalEvent
from core.settings import Settings
from guard import controls, repository
from guard.schemas import KillMode
from tests.conftest import PLATFORM_ADMIN, REDIS_URL, auth
from tests.support.hung_redis import RedisThatHangs, breaker_said, redis_that_hangs

ROOT = Path(__file__).resolve().parents[2]


def _department(client: TestClient, admin: str) -> str:
    name = f"trip{uuid.uuid4().hex[:6]}"
    assert client.post("/v1/admin/departments", json={"name": name}, headers=auth(admin)).status_code == 201
    return name


def _hit(settings: Settings, *departments: str) -> list[str]:
    with unit_of_work(settings.resolved_database_url) as session:
        return controls.record_guard_hit(session=session, settings=settings, departments=list(departments),
                                         kind="firewall")


def _mode(settings: Settings, department: str) -> KillMode:
    with unit_of_work(settings.resolved_database_url) as session:
        return controls.kill_mode(session=session, settings=settings, departments=[department])


def _automatic_trips(settings: Settings, department: str) -> list[dict[str, object]]:
    """The kill-switch changes the automatic trip recorded for the department."""
    with unit_of_work(settings.resolved_database_url) as session:
        return [event.details for event in session.scalars(select(RetrievalEvent).where(
            RetrievalEvent.event_type == "kill_switch", RetrievalEvent.subject == "system:guard"))
            if event.details["scope"] == department]


def test_global_is_not_a_department_name(client: TestClient, issue_token: Callable[..., str]) -> None:
    admin = issue_token(PLATFORM_ADMIN)
    response = client.post("/v1/admin/departments", json={"name": "global"}, headers=auth(admin))
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_request"
    assert "reserved" in response.json()["error"]["message"]
    listed = client.get("/v1/admin/departments", headers=auth(admin)).json()
    assert "global" not in {d["name"] for d in listed}


def test_replicas_count_guard_hits_together_in_redis(client: TestClient, issue_token: Callable[..., str],
                                                     settings: Settings) -> None:
    department = _department(client, issue_token(PLATFORM_ADMIN))
    limit = settings.guard_auto_trip_per_minute
    assert settings.broker_url.startswith("redis://") and limit >= 4
    other = subprocess.run(  # noqa: S603 (fixed argv)
        [sys.executable, "-m", "tests.support.guard_hits_process", settings.resolved_database_url, REDIS_URL,
         department, str(limit - 2), str(limit)],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120,
        check=True)
    assert json.loads(other.stdout.strip().splitlines()[-1])["trips"] == [[]] * (limit - 2)
    assert _hit(settings, department) == []  # limit - 1 across both processes; 1 in this one
    assert _mode(settings, department) is KillMode.normal
    assert _hit(settings, department) == [department]  # the limit, counted across processes
    assert _mode(settings, department) is KillMode.retrieval_only
    trips = _automatic_trips(settings, department)
    assert len(trips) == 1 and trips[0]["mode"] == "retrieval_only"  # one trip, audited once
    keys = redis.Redis.from_url(REDIS_URL).keys(f"govrag:guard-hits:*:{department}")
    assert keys == []  # the winning replica reset the counter


def test_redis_window_forgets_hits_older_than_a_minute_and_expires(settings: Settings) -> None:
    department = f"ttl{uuid.uuid4().hex[:6]}"
    client = redis.Redis.from_url(REDIS_URL)
    _hit(settings, department)
    [key] = client.keys(f"govrag:guard-hits:*:{department}")
    assert client.zcard(key) == 1 and 0 < client.ttl(key) <= 61
    old = time.time() - 61  # a hit from more than a minute ago (another replica, earlier) no longer counts
    client.zadd(key, {f"{old:.6f}-old": old})
    _hit(settings, department)
    assert client.zcard(key) == 2  # the old one trimmed, two recent ones left


def test_embedded_default_counts_in_process(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'embedded.db'}"
    migrate.upgrade(url)
    embedded = Settings(data_dir=tmp_path, database_url=url, broker_url="memory://", guard_auto_trip_per_minute=3)
    department = f"emb{uuid.uuid4().hex[:6]}"
    assert [_hit(embedded, department) for _ in range(3)] == [[], [], [department]]
    assert _mode(embedded, department) is KillMode.retrieval_only
    assert redis.Redis.from_url(REDIS_URL).keys(f"govrag:guard-hits:*:{department}") == []


def _reset(settings: Settings, department: str) -> None:
    admin = Identity(subject=PLATFORM_ADMIN, groups=(), is_platform_admin=True)
    with unit_of_work(settings.resolved_database_url) as session:
        controls.set_kill_switch(session=session, settings=settings, identity=admin, scope=department,
                                 mode=KillMode.normal, reason="false alarm, reset by the admin")


def _one_hit_after_a_reset(settings: Settings) -> tuple[list[str], KillMode]:
    """Trip a department with `limit` hits, let the admin reset it, then one more hit: its trips and mode."""
    department = f"trip{uuid.uuid4().hex[:6]}"
    trips = [_hit(settings, department) for _ in range(settings.guard_auto_trip_per_minute)]
    assert trips[-1] == [department] and _mode(settings, department) is KillMode.retrieval_only
    _reset(settings, department)
    return _hit(settings, department), _mode(settings, department)


def test_embedded_counter_one_hit_after_an_admin_reset_does_not_retrip(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'embedded.db'}"
    migrate.upgrade(url)
    embedded = Settings(data_dir=tmp_path, database_url=url, broker_url="memory://", guard_auto_trip_per_minute=3)
    assert _one_hit_after_a_reset(embedded) == ([], KillMode.normal)


def test_redis_down_one_hit_after_an_admin_reset_does_not_retrip(tmp_path: Path) -> None:
    """Redis (the shared counter) down: hits are counted in this process, and the trip must empty that window as
    the embedded counter does, else one hit after the admin's reset trips the department again."""
    url = f"sqlite:///{tmp_path / 'down.db'}"
    migrate.upgrade(url)
    down = Settings(data_dir=tmp_path, database_url=url, broker_url="redis://127.0.0.1:9/0",
                    guard_auto_trip_per_minute=3)
    assert _one_hit_after_a_reset(down) == ([], KillMode.normal)


def test_the_shared_counter_gives_up_on_redis_after_the_broker_socket_timeout(tmp_path: Path) -> None:
    """The counter had a fixed 1 s timeout whatever `broker_socket_timeout_seconds` said. Redis unreachable, a hit is
    still counted (in this process) and the department still trips: the query is never failed for the counter."""
    url = f"sqlite:///{tmp_path / 'down.db'}"
    migrate.upgrade(url)
    down = Settings(data_dir=tmp_path, database_url=url, broker_url="redis://127.0.0.1:9/0",
                    broker_socket_timeout_seconds=4.5, guard_auto_trip_per_minute=2)
    kwargs = controls._trip_counter(down)._client.connection_pool.connection_kwargs  # type: ignore[union-attr]
    assert (kwargs["socket_timeout"], kwargs["socket_connect_timeout"]) == (4.5, 4.5)
    department = f"down{uuid.uuid4().hex[:6]}"
    assert [_hit(down, department) for _ in range(2)] == [[], [department]]


def _drop_connections(server: socket.socket, tries: list[int]) -> None:
    """A Redis that takes each connection and drops it at once, counting them, until the server closes."""
    with contextlib.suppress(OSError):
        while True:
            connection, _ = server.accept()
            tries.append(1)
            connection.close()


def test_a_hit_tries_redis_once_not_once_per_department(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each try of a hung Redis holds the query `broker_socket_timeout_seconds`: a blocked query searching many
    departments tried it once per department (20 of them, a minute at the default 3 s, one of the API's few threads
    held throughout). Once Redis fails, the hit's other departments count in this process, and all still trip; the
    next hit, within the breaker's cool-down, does not try Redis at all."""
    url = f"sqlite:///{tmp_path / 'drop.db'}"
    migrate.upgrade(url)
    monkeypatch.setattr(broker, "REDIS_COOL_DOWN_SECONDS", 3600.0)  # passes only when the test says so
    server = socket.create_server(("127.0.0.1", 0))
    tries: list[int] = []
    threading.Thread(target=_drop_connections, args=(server, tries), daemon=True).start()
    dropping = Settings(data_dir=tmp_path, database_url=url, guard_auto_trip_per_minute=2,
                        broker_url=f"redis://127.0.0.1:{server.getsockname()[1]}/0")
    departments = [f"drop{uuid.uuid4().hex[:6]}" for _ in range(3)]
    assert (_hit(dropping, *departments), len(tries)) == ([], 1)
    assert (_hit(dropping, *departments), len(tries)) == (departments, 1)
    server.close()


def test_after_a_redis_failure_guard_hits_skip_redis_until_the_cool_down_passes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A hung Redis held every guard hit for `broker_socket_timeout_seconds`, each trying it again: an attacker's
    blocked questions were each slow. After a failure the breaker opens: hits count in this process (the block and
    the automatic trip as before) without trying Redis until `REDIS_COOL_DOWN_SECONDS` have passed, then one hit
    probes; a probe that fails keeps it open, one answered closes it and hits count in Redis again. The cool-down
    is set to an hour (never passes within the test) or 0 (has passed), so nothing here depends on the clock."""
    url = f"sqlite:///{tmp_path / 'hung.db'}"
    migrate.upgrade(url)
    caplog.set_level(logging.WARNING, logger="core.broker")
    monkeypatch.setattr(broker, "REDIS_COOL_DOWN_SECONDS", 3600.0)
    attacked, later = (f"hung{uuid.uuid4().hex[:6]}" for _ in range(2))
    with redis_that_hangs() as (endpoint, real, broker_url):
        settings = Settings(data_dir=tmp_path, database_url=url, broker_url=broker_url,
                            broker_socket_timeout_seconds=1.5, guard_auto_trip_per_minute=3)
        hits = [(_hit(settings, attacked), endpoint.connections) for _ in range(3)]
        assert hits == [([], 1), ([], 1), ([attacked], 1)]  # one try of Redis; counted here, and the third trips
        monkeypatch.setattr(broker, "REDIS_COOL_DOWN_SECONDS", 0.0)
        assert (_hit(settings, later), endpoint.connections) == ([], 2)  # the probe: still hung, stays open
        monkeypatch.setattr(broker, "REDIS_COOL_DOWN_SECONDS", 3600.0)
        endpoint.hung = False
        assert (_hit(settings, later), endpoint.connections) == ([], 2)  # answers now, but the cool-down runs
        monkeypatch.setattr(broker, "REDIS_COOL_DOWN_SECONDS", 0.0)
        assert [_hit(settings, later) for _ in range(2)] == [[], []]  # the probe closes it; then Redis as usual
        [key] = real.keys(f"govrag:guard-hits:*:{later}")
        assert (real.zcard(key), endpoint.connections) == (2, 3)
        real.delete(key)
    assert [record.getMessage() for record in caplog.records if record.name == "core.broker"] == list(
        breaker_said(3600.0))


def _hit_that_hangs_on(endpoint: RedisThatHangs, settings: Settings, department: str) -> threading.Thread:
    """A guard hit on its own thread, returned once it holds a connection to the hung endpoint."""
    hit = threading.Thread(target=_hit, args=(settings, department), daemon=True)
    hit.start()
    assert endpoint.taken.acquire(timeout=120), "the hit never tried Redis"
    return hit


def test_while_a_probe_of_a_hung_redis_runs_other_guard_hits_do_not_try_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The cool-down ran from the probe's start, so a probe outlasting it (the socket timeout has no upper bound, and
    a probe may wait on the connection, a TLS handshake and the reply) let the next hit probe too, and the one after:
    every concurrent hit was held again. One probe at a time: while it runs, hits count in this process without
    trying Redis. The cool-down is 0 (has passed), so only the running probe holds them back, whatever the clock."""
    url = f"sqlite:///{tmp_path / 'probe.db'}"
    migrate.upgrade(url)
    monkeypatch.setattr(broker, "REDIS_COOL_DOWN_SECONDS", 0.0)
    department = f"probe{uuid.uuid4().hex[:6]}"
    with redis_that_hangs() as (endpoint, _, broker_url):
        settings = Settings(data_dir=tmp_path, database_url=url, broker_url=broker_url,
                            broker_socket_timeout_seconds=10.0, guard_auto_trip_per_minute=100)
        opening = _hit_that_hangs_on(endpoint, settings, department)
        endpoint.drop()  # Redis fails: the breaker opens
        opening.join()
        probe = _hit_that_hangs_on(endpoint, settings, department)
        assert (_hit(settings, department), endpoint.connections) == ([], 2)  # counted here while the probe hangs
        endpoint.drop()
        probe.join()


def test_a_scope_that_is_no_department_is_refused_and_nothing_is_stored(client: TestClient,
                                                                       issue_token: Callable[..., str]) -> None:
    """A responder's typo ('finanse' for 'finance') must not answer 200 while nothing is switched off."""
    admin, typo = auth(issue_token(PLATFORM_ADMIN)), f"finanse{uuid.uuid4().hex[:6]}"
    refused = [client.post("/v1/admin/kill-switch", headers=admin,
                           json={"scope": typo, "mode": "disabled", "reason": "incident"}),
               client.put("/v1/admin/firewall-mode", headers=admin, json={"department": typo, "mode": "block"}),
               client.put("/v1/admin/firewall-mode", headers=admin, json={"department": "global", "mode": "off"})]
    for response in refused:
        assert response.status_code == 404, response.text
        assert response.json()["error"]["message"] == "no such department"
    scopes = {state["scope"] for state in client.get("/v1/admin/guard", headers=admin).json()}
    assert typo not in scopes


@pytest.mark.parametrize("reason", ["   ", "\t", "\u200b", "drill\nsecond line", "\x1b[2J\x1b[31mall clear\x1b[0m",
                                    "incident\u202e24 txe",
                                    "model\u00a0paused", "drill\ufe00\ufe01", "drill \U000e0100\U000e0141\U000e0142",
                                    "drill\U000e0141", "\u26a0\ufe0f\ufe0f model paused"])
def test_a_kill_switch_reason_is_printable_text(client: TestClient, issue_token: Callable[..., str],
                                                reason: str) -> None:
    """A reason of spaces only, or carrying line breaks, control, escape or bidi characters, was stored, listed by
    GET /v1/admin/guard and exported from the ledger (a terminal showing either ran the escapes). It is a 422 that
    stores nothing; ordinary text in any script is taken. So is text hidden in variation selectors (which
    `isprintable` passes): a run of them, or one of VS17-VS256 after a letter, each standing for a byte."""
    admin = issue_token(PLATFORM_ADMIN)
    department = _department(client, admin)
    response = client.post("/v1/admin/kill-switch", headers=auth(admin),
                           json={"scope": department, "mode": "retrieval_only", "reason": reason})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_request" and "body.reason: Value error, a reason is printable" in error["message"]
    assert "all clear" not in response.text and "txe" not in response.text
    assert department not in {s["scope"] for s in client.get("/v1/admin/guard", headers=auth(admin)).json()}
    taken = client.post("/v1/admin/kill-switch", headers=auth(admin),
                        json={"scope": department, "mode": "normal", "reason": "Störung – Modell geprüft (№ 7)"})
    assert taken.status_code == 200 and taken.json()["reason"] == "Störung – Modell geprüft (№ 7)", taken.text


@pytest.mark.parametrize("reason", ["\u26a0\ufe0f outage", "\u2764\ufe0f thanks, on-call", "\u845b\U000e0100 office"],
                         ids=["warning sign emoji", "red heart emoji", "ideographic variation"])
def test_a_kill_switch_reason_keeps_a_character_s_own_variation_selector(
        client: TestClient, issue_token: Callable[..., str], reason: str) -> None:
    """Refusing every variation selector in a reason refused an emoji's own single one too (U+26A0 U+FE0F, as
    keyboards type it). Only selectors that hide text are refused (`guard.normalise.has_hidden_selectors`); a
    variation sequence, one character and its one selector, is taken and listed as sent."""
    token = issue_token(PLATFORM_ADMIN)
    admin, department = auth(token), _department(client, token)
    taken = client.post("/v1/admin/kill-switch", headers=admin,
                        json={"scope": department, "mode": "retrieval_only", "reason": reason})
    assert taken.status_code == 200 and taken.json()["reason"] == reason, taken.text
    listed = [s["reason"] for s in client.get("/v1/admin/guard", headers=admin).json() if s["scope"] == department]
    client.post("/v1/admin/kill-switch", headers=admin, json={"scope": department, "mode": "normal", "reason": "end"})
    assert listed == [reason], listed


def test_a_kill_switch_change_is_logged_without_who_made_it(client: TestClient, issue_token: Callable[..., str],
                                                            caplog: pytest.LogCaptureFixture) -> None:
    """Log lines name no subject (the ledger says who, the line's request id leads there): the kill switch's warning
    named the admin who switched it."""
    admin = issue_token(PLATFORM_ADMIN)
    department = _department(client, admin)
    caplog.set_level(logging.WARNING, logger="guard.controls")
    response = client.post("/v1/admin/kill-switch", headers=auth(admin),
                           json={"scope": department, "mode": "retrieval_only", "reason": "drill"})
    assert response.status_code == 200, response.text
    said = [record.getMessage() for record in caplog.records if record.name == "guard.controls"]
    assert said == [f"kill switch: scope={department} mode=retrieval_only (was normal)"]


def test_a_kill_switch_reason_is_recorded_whole(client: TestClient, issue_token: Callable[..., str],
                                               settings: Settings) -> None:
    """The API takes a reason of up to 500 characters and says it is exported from the ledger, but the ledger kept
    its first 200: an incident's account was cut where compliance reads it."""
    admin = issue_token(PLATFORM_ADMIN)
    department = _department(client, admin)
    reason = ("Model paused after the red team run of 30 November: " + "canary seen in a draft answer; " * 20)[:500]
    response = client.post("/v1/admin/kill-switch", headers=auth(admin),
                           json={"scope": department, "mode": "retrieval_only", "reason": reason})
    assert response.status_code == 200, response.text
    with unit_of_work(settings.resolved_database_url) as session:
        recorded = [event.details["reason"] for event in session.scalars(
            select(RetrievalEvent).where(RetrievalEvent.event_type == "kill_switch")) if
            event.details["scope"] == department]
    assert recorded == [reason]


# Another API replica: an admin's kill-switch change made there (its own process, its own cache of the controls).
OTHER_REPLICA = """
import sys
from authz.identity import Identity
from core.db import unit_of_work
from core.settings import Settings
from guard import controls
from guard.schemas import KillMode
url, data_dir, department, mode = sys.argv[1:]
admin = Identity(subject="root-admin", groups=(), is_platform_admin=True)
with unit_of_work(url) as session:  # this deployment's data dir: its master key signs the admin action's checkpoint
    controls.set_kill_switch(session=session, settings=Settings(database_url=url, data_dir=data_dir,
                                                                broker_url="memory://"),
                             identity=admin, scope=department, mode=KillMode(mode), reason="incident: model off")
"""


def _switch_on_another_replica(settings: Settings, department: str, mode: KillMode) -> None:
    subprocess.run([sys.executable, "-c", OTHER_REPLICA, settings.resolved_database_url,  # noqa: S603
                    str(settings.data_dir), department, mode.value],
                   cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True, timeout=120)


def _stored_mode(settings: Settings, department: str) -> KillMode:
    with unit_of_work(settings.resolved_database_url) as session:
        return controls.list_states(session=session, settings=settings)[department].kill_mode


def test_an_automatic_trip_never_writes_over_a_kill_switch_another_replica_just_disabled(settings: Settings) -> None:
    """This replica read the department `normal` (its cache of the controls, up to GOVRAG_GUARD_CACHE_SECONDS old);
    an admin on another replica then disabled it; guard hits here tripped it to `retrieval_only` over the admin's
    `disabled`, and the model answered again. The trip reads the stored mode under the scope's lock first."""
    replica = settings.model_copy(update={"guard_auto_trip_per_minute": 2, "guard_cache_seconds": 3600.0,
                                          "broker_url": "memory://"})  # a cache that has not expired yet
    department = f"inc{uuid.uuid4().hex[:6]}"
    assert _mode(replica, department) is KillMode.normal  # read (and cached) before the admin's change
    _switch_on_another_replica(replica, department, KillMode.disabled)
    assert [_hit(replica, department) for _ in range(2)] == [[], []]
    assert _stored_mode(replica, department) is KillMode.disabled
    assert _automatic_trips(replica, department) == []


def test_an_automatic_trip_reads_the_stored_mode_afresh_when_the_session_holds_the_row(settings: Settings) -> None:
    """A session that already holds the department's row (sessions keep loaded rows across commits) counts the
    guard hits. The trip's locked read must take the admin's `disabled` committed on another replica in between, not
    the values of the row the session holds."""
    replica = settings.model_copy(update={"guard_auto_trip_per_minute": 2, "guard_cache_seconds": 3600.0,
                                          "broker_url": "memory://"})
    department = f"inc{uuid.uuid4().hex[:6]}"
    _switch_on_another_replica(replica, department, KillMode.normal)  # the department's row exists
    with unit_of_work(replica.resolved_database_url) as session:
        held = repository.get_or_create(session, department)
        session.commit()
        assert controls.kill_mode(session=session, settings=replica, departments=[department]) is KillMode.normal
        _switch_on_another_replica(replica, department, KillMode.disabled)
        assert [controls.record_guard_hit(session=session, settings=replica, departments=[department],
                                          kind="firewall") for _ in range(2)] == [[], []]
        assert held.kill_mode == KillMode.disabled.value
    assert _stored_mode(replica, department) is KillMode.disabled
    assert _automatic_trips(replica, department) == []
