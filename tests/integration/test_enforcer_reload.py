"""Two threads of one process reloading the policy at once: the one that read an older version never installs it
over the newer one another thread loaded meanwhile."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
from sqlalchemy import delete
from sqlalchemy.orm import Session

from authz import repository
from authz.enforcer import ROLE_PREFIX, PolicyEnforcer
from core import migrate
from core.db import get_engine
from core.models import CasbinRule

DEPARTMENT = "finance"
READER = ("alice", ROLE_PREFIX + "reader", DEPARTMENT)


def _change_policy(url: str, *, grant: bool) -> int:
    """Grant or revoke alice's reader role in finance, moving the version as authz.service does; the new version."""
    with Session(get_engine(url)) as session:
        if grant:
            session.add(CasbinRule(ptype="g", v0=READER[0], v1=READER[1], v2=READER[2]))
        else:
            session.execute(delete(CasbinRule).where(CasbinRule.ptype == "g", CasbinRule.v0 == READER[0]))
        version = repository.bump_policy_version(session)
        session.commit()
    return version


def test_a_slower_reload_never_installs_an_older_version(make_pg_database: Callable[[], str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    url = make_pg_database()
    migrate.upgrade(url)
    with Session(get_engine(url)) as session:
        repository.add_department(session, DEPARTMENT)
        session.commit()
    enforcer = PolicyEnforcer(url, check_seconds=3600.0)
    granted = _change_policy(url, grant=True)
    assert PolicyEnforcer(url).enforce(*READER[::2], "read")  # the grant is one the policy gives

    read_version, go_on = threading.Event(), threading.Event()
    stored_version = repository.policy_version

    def held_back_after_the_first_read(session: Session) -> int:
        version = stored_version(session)
        if threading.current_thread().name == "slower" and not read_version.is_set():
            read_version.set()
            assert go_on.wait(timeout=120)
        return version

    monkeypatch.setattr(repository, "policy_version", held_back_after_the_first_read)
    slower = threading.Thread(target=lambda: enforcer.refresh(force=True), name="slower")
    slower.start()
    assert read_version.wait(timeout=120)  # the slower thread saw the version that granted alice
    revoked = _change_policy(url, grant=False)
    assert enforcer.refresh(force=True) == revoked > granted  # this thread loads the revocation
    go_on.set()
    slower.join(timeout=120)
    assert not slower.is_alive()
    assert enforcer.version == revoked  # not relabelled, nor reloaded, as the older version
    assert not enforcer.enforce(*READER[::2], "read")
