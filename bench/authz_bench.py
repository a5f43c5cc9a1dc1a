"""Authorization cost per query with ~1000 policies, on PostgreSQL.

    .venv/bin/python -m bench.authz_bench [--assignments 1000] [--queries 2000]

Builds a throw-away database (migrated), bulk-loads role assignments for users and groups over 20
departments plus per-department role hierarchy links and clearances, then times:
  * read_scope: the whole per-query decision (forced policy-version check, read in every department,
    clearance and roles per searched department) — what every /v1/query pays before searching;
  * the re-check per hit (may_read_chunk), paid for each hit before decryption;
  * raw enforce() rate of casbin.FastEnforcer (cache_key_order=[0]) vs casbin.Enforcer on the same policy,
    and vs the pre-issue-4 model (request sub, dom, act) on plain Enforcer;
  * a full policy reload (what a process does when the version moves).
Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable

import casbin
from sqlalchemy.orm import Session
from sqlalchemy_adapter import Adapter

from bench.common import machine, percentile, throwaway_postgres
from core import migrate
from core.db import get_engine
from core.models import CasbinRule, Clearance, Department

DEPARTMENTS = [f"dept{i:02d}" for i in range(20)]
ROLES = ["reader", "editor", "compliance", "privacy_officer", "admin"]
OLD_MODEL = """
[request_definition]
r = sub, dom, act
[policy_definition]
p = role, act
[role_definition]
g = _, _, _
[policy_effect]
e = some(where (p.eft == allow))
[matchers]
m = g(r.sub, p.role, r.dom) && r.act == p.act
"""


def _load(url: str, assignments: int, rng: random.Random) -> list[tuple[str, tuple[str, ...]]]:
    users = [f"user{i:04d}" for i in range(max(10, assignments // 5))]
    groups = [f"team{i:02d}" for i in range(40)]
    rows: set[tuple[str, str, str]] = set()
    while len(rows) < assignments:
        subject = rng.choice(users) if rng.random() < 0.7 else "group:" + rng.choice(groups)
        rows.add((subject, "role:" + rng.choice(ROLES), rng.choice(DEPARTMENTS)))
    with Session(get_engine(url)) as session:
        session.add_all([Department(name=d) for d in DEPARTMENTS])
        session.add_all([CasbinRule(ptype="g", v0=s, v1=r, v2=d) for s, r, d in rows])
        session.add_all([CasbinRule(ptype="g", v0="role:editor", v1="role:reader", v2=d) for d in DEPARTMENTS])
        cleared = {(s, d) for s, _, d in sorted(rows)[: assignments // 10]}
        session.add_all([Clearance(subject=s, department=d, level=rng.choice(["public", "confidential"]))
                         for s, d in sorted(cleared)])
        session.commit()
    return [(u, tuple(rng.sample(groups, 3))) for u in users]


def _rate(calls: int, fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        fn()
    return calls / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--assignments", type=int, default=1000)
    parser.add_argument("--queries", type=int, default=2000)
    args = parser.parse_args()
    rng = random.Random(4)
    with throwaway_postgres("govrag_bench_authz") as url:
        migrate.upgrade(url)
        callers = _load(url, args.assignments, rng)
        _measure(url, callers, args, rng)


def _measure(url: str, callers: list[tuple[str, tuple[str, ...]]], args: argparse.Namespace,
             rng: random.Random) -> None:
    from authz import service as authz_service
    from authz.enforcer import MODEL_PATH, PolicyEnforcer
    from authz.identity import Identity

    enforcer = PolicyEnforcer(url)
    identities = [Identity(subject=u, groups=g, is_platform_admin=False) for u, g in callers]
    with Session(get_engine(url)) as session:
        per_query = []
        for _ in range(args.queries):
            identity = rng.choice(identities)
            started = time.perf_counter()
            authz_service.read_scope(session=session, enforcer=enforcer, identity=identity)
            per_query.append((time.perf_counter() - started) * 1000)
        searched = statistics.mean(len(authz_service.read_scope(session=session, enforcer=enforcer,
                                                                identity=i).departments) for i in identities[:200])
    recheck = _rate(args.queries * 5, lambda: authz_service.may_read_chunk(
        enforcer, rng.choice(identities), department=rng.choice(DEPARTMENTS), acl_groups=["team01"],
        classification="internal"))
    requests = [(rng.choice(["read", "upload", "manage"]), s, rng.choice(DEPARTMENTS))
                for i in identities for s in i.subjects][:5000]
    adapter = Adapter(get_engine(url), db_class=CasbinRule, create_table=False)
    fast = casbin.FastEnforcer(str(MODEL_PATH), adapter, cache_key_order=[0])
    plain = casbin.Enforcer(str(MODEL_PATH), adapter)
    old_model = casbin.model.Model()
    old_model.load_model_from_text(OLD_MODEL)
    old = casbin.Enforcer(old_model)
    for action, role in {(r[0], r[1]) for r in plain.get_policy()}:
        old.add_policy(role, action)
    old.add_grouping_policies([list(row) for row in plain.get_grouping_policy()])
    cycle = iter(requests * 100)
    fast_rate = _rate(len(requests), lambda: fast.enforce(*next(cycle)))
    plain_rate = _rate(len(requests), lambda: plain.enforce(*next(cycle)))
    old_rate = _rate(len(requests), lambda: (lambda a, s, d: old.enforce(s, d, a))(*next(cycle)))
    started = time.perf_counter()
    for _ in range(10):
        with Session(get_engine(url)) as session:
            enforcer._load(session, enforcer.version)  # noqa: SLF001 (timing the reload itself)
    reload_ms = (time.perf_counter() - started) * 100
    rows = len(plain.get_grouping_policy()) + len(plain.get_policy())
    print(f"machine: {machine()}")  # noqa: T201
    print(f"policy: {rows} casbin rows ({args.assignments} assignments, {len(DEPARTMENTS)} departments), "  # noqa: T201
          f"{len(enforcer.clearances())} clearances; callers with 3 groups each; {searched:.1f} readable depts avg")
    print(f"authz cost per query (read_scope over {len(DEPARTMENTS)} departments, incl. version check): "  # noqa: T201
          f"p50 {percentile(per_query, 50):.2f} ms, p95 {percentile(per_query, 95):.2f} ms, "
          f"mean {statistics.mean(per_query):.2f} ms")
    print(f"re-check per hit: {recheck:,.0f}/s ({1000 / recheck:.3f} ms per hit)")  # noqa: T201
    print(f"enforce(): FastEnforcer {fast_rate:,.0f}/s, Enforcer {plain_rate:,.0f}/s, "  # noqa: T201
          f"pre-issue-4 model {old_rate:,.0f}/s")
    print(f"policy reload (load_policy + clearances + permissions): {reload_ms:.1f} ms")  # noqa: T201


if __name__ == "__main__":
    main()
