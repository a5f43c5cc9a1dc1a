"""A separate process making authorization decisions on the shared database (for the multi-process test).

Reads commands on stdin, answers one JSON line each:
  grant|revoke <subject> <role> <department>   change the policy (as a platform admin would)
  check <subject> <department>                 is_allowed(read): the ordinary path (version checked every 0.5 s)
  query <subject> <department>                 read_scope: the query path (version checked every time)
"""

from __future__ import annotations

import json
import sys
import time

from sqlalchemy.orm import Session

from authz import service as authz_service
from authz.enforcer import PolicyEnforcer
from authz.identity import Identity
from authz.schemas import RoleAssignment
from core.db import get_engine


def main(database_url: str) -> None:
    enforcer = PolicyEnforcer(database_url, check_seconds=0.5)
    admin = Identity(subject="root-admin", groups=(), is_platform_admin=True)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        command, *args = line.split()
        with Session(get_engine(database_url)) as session:
            result = _run(session, enforcer, admin, command, args)
        print(json.dumps({"result": result, "version": enforcer.version, "t": time.time()}), flush=True)


def _run(session: Session, enforcer: PolicyEnforcer, admin: Identity, command: str, args: list[str]) -> object:
    if command in ("grant", "revoke"):
        subject, role, department = args
        ctx = authz_service.ChangeContext(session=session, enforcer=enforcer, actor=admin)
        change = authz_service.assign_role if command == "grant" else authz_service.revoke_role
        change(ctx=ctx, assignment=RoleAssignment(subject=subject, role=role, department=department))
        return "ok"
    subject, department = args
    identity = Identity(subject=subject, groups=(), is_platform_admin=False)
    if command == "check":
        return authz_service.is_allowed(enforcer, identity, "read", department)
    return authz_service.read_scope(session=session, enforcer=enforcer, identity=identity,
                                    requested=[department]).departments == [department]


if __name__ == "__main__":
    main(sys.argv[1])
