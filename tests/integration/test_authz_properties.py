"""Property: every chunk the filter returns, and every chunk the re-check opens, is one the oracle allows.

The decision (authz.service.read_scope on the real PostgreSQL policy), the mandatory Qdrant payload filter
(retrieval.store.AccessFilter against a real local-mode Qdrant) and the re-check before decryption
(authz.service.readable_chunk_level) are exercised directly with fixed vectors, so thousands of random worlds
stay fast. The oracle below restates the rules in plain Python without Casbin or Qdrant.
GOVRAG_PROPERTY_EXAMPLES raises the number of worlds (default 60; `make test-property` runs 1500).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from qdrant_client import QdrantClient
from sqlalchemy import delete
from sqlalchemy.orm import Session

from authz import repository
from authz import service as authz_service
from authz.enforcer import ROLE_PERMISSIONS, ROLE_PREFIX, PolicyEnforcer
from authz.identity import GROUP_PREFIX, Identity
from core.db import get_engine
from core.models import CasbinRule, Clearance, Document
from ingestion.schemas import Classification
from retrieval.store import AccessFilter, VectorPoint, VectorStore, collection_name

EXAMPLES = int(os.environ.get("GOVRAG_PROPERTY_EXAMPLES", "60"))
DEPARTMENTS = ("dp0", "dp1", "dp2")
GROUPS = ("g0", "g1", "g2", "g3")
LEVELS = tuple(c.value for c in Classification)
DEFAULT_CLEARANCE = "internal"
DIM = 4
COUNTS = {"worlds": 0, "queries": 0, "hits": 0, "recheck_decisions": 0, "violations": 0}


@dataclass
class World:
    users: list[tuple[str, ...]]  # groups of u0, u1, ...
    grants: list[tuple[str, str, str]]  # principal, role, department
    links: list[tuple[str, str, str]]  # role, inherits, department
    clearances: list[tuple[str, str, str]]  # principal, department, level
    documents: list[tuple[str, tuple[str, ...], str]]  # department, acl groups, classification
    requests: list[tuple[int, tuple[str, ...] | None]] = field(default_factory=list)


def _principals(n_users: int) -> list[str]:
    return [f"u{i}" for i in range(n_users)] + [GROUP_PREFIX + g for g in GROUPS]


@st.composite
def worlds(draw: st.DrawFn) -> World:
    users = draw(st.lists(st.sets(st.sampled_from(GROUPS), max_size=3).map(lambda s: tuple(sorted(s))),
                          min_size=1, max_size=4))
    principal = st.sampled_from(_principals(len(users)))
    department, role = st.sampled_from(DEPARTMENTS), st.sampled_from(sorted(ROLE_PERMISSIONS))
    grants = draw(st.lists(st.tuples(principal, role, department), min_size=1, max_size=8, unique=True))
    links = draw(st.lists(st.tuples(role, role, department).filter(lambda t: t[0] != t[1]), max_size=3, unique=True))
    clearances = draw(st.dictionaries(st.tuples(principal, department), st.sampled_from(LEVELS), max_size=6))
    documents = draw(st.lists(st.tuples(department, st.sets(st.sampled_from(GROUPS), max_size=2).map(
        lambda s: tuple(sorted(s))), st.sampled_from(LEVELS)), min_size=1, max_size=10))
    requested = st.one_of(st.none(), st.lists(st.sampled_from((*DEPARTMENTS, "ghost", "DP0", "dp0 ")),
                                              max_size=3).map(tuple))
    requests = draw(st.lists(st.tuples(st.integers(0, len(users) - 1), requested), min_size=1, max_size=6))
    return World(users, grants, links, [(p, d, lvl) for (p, d), lvl in clearances.items()], documents, requests)


# --- the oracle: the rules in plain Python ---

def _oracle_roles(world: World, subjects: tuple[str, ...], department: str) -> set[str]:
    roles = {r for p, r, d in world.grants if d == department and p in subjects}
    frontier = list(roles)
    while frontier:
        current = frontier.pop()
        for role, inherits, d in world.links:
            if d == department and role == current and inherits not in roles:
                roles.add(inherits)
                frontier.append(inherits)
    return roles


def oracle_allows(world: World, subjects: tuple[str, ...], groups: tuple[str, ...],
                  document: tuple[str, tuple[str, ...], str]) -> bool:
    department, acl, level = document
    if not any("read" in ROLE_PERMISSIONS[r] for r in _oracle_roles(world, subjects, department)):
        return False
    if acl and not set(acl) & set(groups):
        return False
    levels = [lvl for p, d, lvl in world.clearances if d == department and p in subjects]
    clearance = max((LEVELS.index(lvl) for lvl in levels), default=LEVELS.index(DEFAULT_CLEARANCE))
    return LEVELS.index(level) <= clearance


# --- the real components ---

@pytest.fixture(scope="module")
def policy_db(make_pg_database: Callable[[], str]) -> str:
    from core import migrate

    url = make_pg_database()
    migrate.upgrade(url)
    with Session(get_engine(url)) as session:
        for name in DEPARTMENTS:
            repository.add_department(session, name)
        session.commit()
    return url


@pytest.fixture(scope="module")
def enforcer(policy_db: str) -> PolicyEnforcer:
    return PolicyEnforcer(policy_db, default_clearance=DEFAULT_CLEARANCE, check_seconds=3600.0)


@pytest.fixture(scope="module")
def store() -> Iterator[VectorStore]:
    client = QdrantClient(":memory:")
    yield VectorStore(client, dimension=DIM, payload_indexes=False)
    client.close()


def _write_policy(url: str, world: World) -> None:
    with Session(get_engine(url)) as session:
        session.execute(delete(CasbinRule).where(CasbinRule.ptype == "g"))
        session.execute(delete(Clearance))
        session.add_all([CasbinRule(ptype="g", v0=p, v1=ROLE_PREFIX + r, v2=d) for p, r, d in world.grants])
        session.add_all([CasbinRule(ptype="g", v0=ROLE_PREFIX + a, v1=ROLE_PREFIX + b, v2=d)
                         for a, b, d in world.links])
        session.add_all([Clearance(subject=p, department=d, level=lvl) for p, d, lvl in world.clearances])
        repository.bump_policy_version(session)
        session.commit()


def _index(store: VectorStore, world: World) -> None:
    for department in DEPARTMENTS:
        store._client.delete_collection(collection_name(department))  # noqa: SLF001 (test reset)
    for i, (department, acl, level) in enumerate(world.documents):
        for chunk in range(2):
            store.upsert(department, [VectorPoint(
                document_id=f"doc{i}", chunk_index=chunk, vector=[1.0, 0.1 * i, 0.05 * chunk, 0.2],
                payload={"document_id": f"doc{i}", "chunk_id": f"doc{i}:{chunk}", "chunk_index": chunk,
                         "department": department, "acl_groups": list(acl),
                         "acl_scope": "groups" if acl else "open", "classification": level,
                         "classification_rank": Classification(level).rank, "sealed_text": "x"})])


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                        HealthCheck.too_slow])
@given(world=worlds())
def test_filter_and_recheck_never_exceed_the_oracle(world: World, policy_db: str, enforcer: PolicyEnforcer,
                                                    store: VectorStore) -> None:
    _write_policy(policy_db, world)
    _index(store, world)
    total = 2 * len(world.documents)
    COUNTS["worlds"] += 1
    with Session(get_engine(policy_db)) as session:
        for user, requested in world.requests:
            identity = Identity(subject=f"u{user}", groups=world.users[user], is_platform_admin=False)
            scope = authz_service.read_scope(session=session, enforcer=enforcer, identity=identity,
                                             requested=list(requested) if requested is not None else None)
            hits = [h for d, clearance in scope.clearance_by_department.items()
                    for h in store.search(d, [1.0, 0.0, 0.0, 0.0], AccessFilter(identity.groups, clearance), total)]
            COUNTS["queries"] += 1
            COUNTS["hits"] += len(hits)
            returned = {h.payload["chunk_id"] for h in hits}
            expected = {f"doc{i}:{c}" for i, doc in enumerate(world.documents) for c in range(2)
                        if oracle_allows(world, identity.subjects, identity.groups, doc)
                        and (requested is None or doc[0] in requested)}
            COUNTS["violations"] += len(returned - expected)
            assert returned <= expected, "the filter returned a chunk the oracle denies"
            assert returned == expected, "the filter hid a chunk the oracle allows"
        for user, groups in enumerate(world.users):
            identity = Identity(subject=f"u{user}", groups=groups, is_platform_admin=False)
            for doc in world.documents:
                row = Document(department=doc[0], acl_groups=list(doc[1]), classification=doc[2])
                COUNTS["recheck_decisions"] += 1
                payload = {"department": doc[0], "classification": doc[2]}
                readable = authz_service.readable_chunk_level(enforcer, identity, row, payload) is not None
                assert readable == oracle_allows(world, identity.subjects, groups, doc)


def test_property_counts_are_reported() -> None:
    """Runs after the property test in this module: it saw worlds and queries, and no violation."""
    print(f"\nauthz property test: {COUNTS}")  # noqa: T201
    assert COUNTS["violations"] == 0
    assert COUNTS["worlds"] == 0 or COUNTS["queries"] >= COUNTS["worlds"]
