"""Authorization decisions, departments, roles, clearances and explanations. Deny by default.

A chunk is visible only if the caller may `read` in its department, its ACL groups are empty or
share a group with the caller, and its classification is at most the caller's clearance there.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

from sqlalchemy.orm import Session

from audit import service as audit_service
from audit.schemas import AdminEventType
from authz import repository
from authz.enforcer import ROLE_PREFIX, UNLOADABLE_ROW, PolicyEnforcer, rank
from authz.identity import GROUP_PREFIX, Identity, token_can_carry
from authz.schemas import (
    RESERVED_DEPARTMENT_NAMES,
    ClearanceIn,
    ClearanceKey,
    ClearanceOut,
    ExplainCheck,
    ExplainOut,
    ExplainRequest,
    GroupMapping,
    GroupMappingKey,
    GroupMappingOut,
    RoleAssignment,
    RoleAssignmentKey,
    RoleAssignmentOut,
    RoleDefinition,
    RoleInheritance,
)
from core.db import transaction_lock
from core.errors import ErrorCode, GovragError
from core.keystore import KeyStore
from core.metrics import SELF_GRANTS_REFUSED
from core.models import Document
from core.settings import Settings
from ingestion import service as ingestion_service
from ingestion.schemas import Classification
from retrieval.store import VectorIndex

logger = logging.getLogger(__name__)

POLICY_LOCK = "policy"  # the `transaction_lock` every policy change holds (see ChangeContext)


@dataclass(frozen=True)
class ReadScope:
    """What a caller may read, decided once per query: departments with their clearance rank."""

    policy_version: int
    clearance_by_department: dict[str, int]
    roles: list[str]  # "role@department" the decision relied on (for the audit event)

    @property
    def departments(self) -> list[str]:
        """The departments that may be searched."""
        return list(self.clearance_by_department)


def is_allowed(enforcer: PolicyEnforcer, identity: Identity, action: str, department: str) -> bool:
    """True when the user, or one of their groups, holds a role granting `action` in `department`."""
    enforcer.refresh()
    return any(enforcer.enforce(subject, department, action) for subject in identity.subjects)


def require(enforcer: PolicyEnforcer, identity: Identity, action: str, department: str) -> None:
    """Raise forbidden unless `is_allowed`; the message does not reveal whether the department exists."""
    if not is_allowed(enforcer, identity, action, department):
        raise GovragError(ErrorCode.forbidden, f"not allowed to {action} in this department")


def allowed_departments(
    *, session: Session, enforcer: PolicyEnforcer, identity: Identity, action: str,
    requested: list[str] | None = None,
) -> list[str]:
    """Existing departments where `action` is allowed, narrowed to `requested` when given."""
    candidates = repository.department_names(session)
    if requested is not None:
        wanted = set(requested)
        candidates = [name for name in candidates if name in wanted]
    return [name for name in candidates if is_allowed(enforcer, identity, action, name)]


def read_scope(*, session: Session, enforcer: PolicyEnforcer, identity: Identity,
               requested: list[str] | None = None) -> ReadScope:
    """The query's decision on the freshest policy: readable departments, clearances, roles used.

    Resolved from the enforcer's per-version grant index (Casbin's role graph, computed once per policy
    version); the re-check before decryption asks Casbin's matcher instead, so the two paths are independent.
    """
    enforcer.refresh(force=True, session=session)
    decision = enforcer.read_decision(identity.subjects)
    wanted = set(decision.clearance_by_department)
    if requested is not None:
        wanted &= set(requested)
    departments = sorted(wanted)
    return ReadScope(
        policy_version=decision.version,
        clearance_by_department={d: decision.clearance_by_department[d] for d in departments},
        roles=sorted({f"{role}@{d}" for d in departments for role in decision.roles_by_department[d]}),
    )


def may_read_chunk(enforcer: PolicyEnforcer, identity: Identity, *, department: str, acl_groups: list[str],
                   classification: str) -> bool:
    """The whole rule for one chunk: read in its department, ACL open or shared, classification ≤ clearance."""
    if not is_allowed(enforcer, identity, "read", department):
        return False
    if acl_groups and not set(acl_groups) & set(identity.groups):
        return False
    return rank(classification) <= enforcer.clearance_rank(identity.subjects, department)


def readable_chunk_level(enforcer: PolicyEnforcer, identity: Identity, document: Document,
                         payload: Mapping[str, Any]) -> str | None:
    """The query path's re-check of one stored chunk before decryption: its level, when the caller may read it.
    The policy is asked again from the document row (department, ACL) and the chunk's own level as its payload states
    it (decryption then proves it); None drops the chunk. Explain asks the same of a chunk."""
    level = stored_chunk_level(document, payload)
    if level is None or not may_read_chunk(enforcer, identity, department=document.department,
                                           acl_groups=list(document.acl_groups or []), classification=level):
        return None
    return level


def stored_chunk_level(document: Document, payload: Mapping[str, Any]) -> str | None:
    """A chunk's level as its payload states it, if the payload is sound (its document's department, a known level)."""
    level = str(payload.get("classification"))
    if payload.get("department") != document.department or level not in Classification.__members__:
        return None
    return level


def may_see_document(enforcer: PolicyEnforcer, identity: Identity, document: Document, *, session: Session) -> bool:
    """Whether the caller may see a document's metadata, its title above all: its department's editors, and readers
    who may read it whole (ACL, and clearance for its level: its highest chunk's), and for an attachment each e-mail
    above it too (its title carries theirs). The one rule for the status, the listing, the review queue's answers
    and the titles in citations, so a title above someone's clearance is never shown to them."""
    line = [document, *ingestion_service.emails_above(session=session, document=document)]
    return all(_may_see_one(enforcer, identity, each) for each in line)


def _may_see_one(enforcer: PolicyEnforcer, identity: Identity, document: Document) -> bool:
    if is_allowed(enforcer, identity, "upload", document.department):
        return True
    return may_read_chunk(enforcer, identity, department=document.department,
                          acl_groups=list(document.acl_groups or []), classification=document.classification)


def may_manage(enforcer: PolicyEnforcer, identity: Identity, department: str) -> bool:
    """Platform admins manage everything; a department `admin` manages that department."""
    return identity.is_platform_admin or is_allowed(enforcer, identity, "manage", department)


def require_manage(enforcer: PolicyEnforcer, identity: Identity, department: str) -> None:
    """Raise forbidden unless `may_manage`."""
    if not may_manage(enforcer, identity, department):
        raise GovragError(ErrorCode.forbidden, "not allowed to manage in this department")


def require_platform_admin(identity: Identity) -> None:
    """Only platform admins (GOVRAG_ADMINS) may create departments and define roles."""
    if not identity.is_platform_admin:
        raise GovragError(ErrorCode.forbidden, "only platform admins may do this")


def create_department(*, session: Session, keystore: KeyStore, name: str) -> None:
    """A new department with its own wrapped key; reserved names (the kill switch's `global` scope) refused."""
    if name in RESERVED_DEPARTMENT_NAMES:
        raise GovragError(ErrorCode.invalid_request, f"'{name}' is a reserved name and cannot name a department")
    transaction_lock(session, POLICY_LOCK)  # two admins creating it at once: one 201, one 409
    if repository.department_exists(session, name):
        raise GovragError(ErrorCode.conflict, "department already exists")
    repository.add_department(session, name)
    repository.bump_policy_version(session)  # enforcers learn of it with the policy (read_scope's departments)
    keystore.create_department_key(session=session, department=name)


def require_department(session: Session, name: str) -> None:
    """Raise not_found unless a department of that name exists."""
    if not repository.department_exists(session, name):
        raise GovragError(ErrorCode.not_found, "no such department")


def list_departments(*, session: Session) -> list[str]:
    """All department names."""
    return repository.department_names(session)


def departments_named(*, session: Session, named: list[str]) -> tuple[list[str], list[str]]:
    """The departments named (every one when none is), and the names that are not departments."""
    known = list_departments(session=session)
    return [d for d in known if d in named or not named], [name for name in named if name not in known]


# --- policy changes: rows, version bump and admin audit event commit together ---

@dataclass(frozen=True)
class ChangeContext:
    """Who changes the policy, through which session, and the enforcer to refresh afterwards. Policy changes run one
    after the other from their first read (`POLICY_LOCK`): two admins granting the same role at once make one row
    and one audit event, not two."""

    session: Session
    enforcer: PolicyEnforcer
    actor: Identity
    settings: Settings | None = None

    def __post_init__(self) -> None:
        transaction_lock(self.session, POLICY_LOCK)


def _record_change(ctx: ChangeContext, event: AdminEventType, department: str | None, details: dict[str, Any]) -> int:
    """Bump the version and write the admin event; the audit service commits rows, bump and event together."""
    version = repository.bump_policy_version(ctx.session)
    audit_service.record_admin_event(session=ctx.session, identity=ctx.actor, event_type=event, department=department,
                                     details={**details, "policy_version": version}, settings=ctx.settings)
    ctx.enforcer.refresh(force=True)
    return version


# --- separation of duties: no admin raises their own access; another admin must ---

def _refuse_own_access(what: str, department: str) -> NoReturn:
    """Refuse a policy change that would raise the acting admin's own access in `department`: counted and logged
    (by department, never by subject: the subject may be a person's name or e-mail address)."""
    SELF_GRANTS_REFUSED.labels(department=department).inc()
    logger.warning("refused a policy change raising the acting admin's own access in department %s: an admin may "
                   "not %s", department, what)
    raise GovragError(ErrorCode.forbidden, f"an admin may not {what}; another admin must do it")


def _refuse_own_subject(ctx: ChangeContext, subject: str, department: str, what: str) -> None:
    """Forbidden when `subject` is the acting admin or one of the groups their token carries."""
    if subject in ctx.actor.subjects:
        _refuse_own_access(f"{what} themselves or a group they belong to", department)


def _refuse_held_role(ctx: ChangeContext, role: str, departments: list[str], what: str) -> None:
    """Forbidden when the acting admin (or one of their groups) holds `role`, inherited included, in a department."""
    ctx.enforcer.refresh(force=True, session=ctx.session)  # under POLICY_LOCK: the latest committed policy
    held = next((department for department in departments
                 if any(role in ctx.enforcer.roles(subject, department) for subject in ctx.actor.subjects)), None)
    if held is not None:
        _refuse_own_access(what, held)


def assign_role(*, ctx: ChangeContext, assignment: RoleAssignment) -> bool:
    """Grant a role in a department; False (and nothing recorded) when it was already granted. Never to the acting
    admin or a group of theirs."""
    _validate_assignment(ctx.session, assignment.role, assignment.department)
    _refuse_own_subject(ctx, assignment.subject, assignment.department, "grant a role to")
    if not repository.add_rule(ctx.session, "g", assignment.subject, ROLE_PREFIX + assignment.role,
                               assignment.department):
        return False
    _record_change(ctx, AdminEventType.role_granted, assignment.department, assignment.model_dump())
    return True


def revoke_role(*, ctx: ChangeContext, assignment: RoleAssignmentKey) -> None:
    """Withdraw a role; not_found when it was not granted."""
    _validate_assignment(ctx.session, assignment.role, assignment.department)
    if not repository.remove_rules(ctx.session, "g", assignment.subject, ROLE_PREFIX + assignment.role,
                                   assignment.department):
        raise GovragError(ErrorCode.not_found, "no such role assignment")
    _record_change(ctx, AdminEventType.role_revoked, assignment.department, assignment.model_dump())


UNCARRIED_NAME = ("stored before such names were refused: the name holds an unprintable character (a control "
                  "character, a zero-width space, a direction mark, a variation selector) no token carries, so it "
                  "grants nothing; revoke it")


def _uncarried(subject: str) -> str | None:
    """Why a stored row to `subject` grants nothing when no token can carry it (stored before such names were
    refused), else None."""
    return None if token_can_carry(subject) else UNCARRIED_NAME


def list_assignments(enforcer: PolicyEnforcer, department: str | None = None) -> list[RoleAssignmentOut]:
    """Role assignments of users and groups, optionally for one department; stored rows that grant nothing are marked
    `invalid` (those the policy leaves out come last), so an admin can revoke them."""
    enforcer.refresh()
    loaded = [(row, _uncarried(row[0])) for row in enforcer.grouping_rows()]
    unloadable = [(row, UNLOADABLE_ROW) for row in enforcer.unloadable_grouping_rows()]
    return [RoleAssignmentOut(subject=subject, role=role.removeprefix(ROLE_PREFIX), department=dept, invalid=invalid)
            for (subject, role, dept, *_), invalid in loaded + unloadable
            if not subject.startswith(ROLE_PREFIX) and (department is None or dept == department)]


def map_group(*, ctx: ChangeContext, mapping: GroupMapping) -> bool:
    """Members of an IdP group get a role in a department."""
    return assign_role(ctx=ctx, assignment=RoleAssignment(subject=GROUP_PREFIX + mapping.group, role=mapping.role,
                                                          department=mapping.department))


def unmap_group(*, ctx: ChangeContext, mapping: GroupMappingKey) -> None:
    """Withdraw a group → role mapping."""
    revoke_role(ctx=ctx, assignment=RoleAssignmentKey(subject=GROUP_PREFIX + mapping.group, role=mapping.role,
                                                      department=mapping.department))


def list_group_mappings(enforcer: PolicyEnforcer, department: str | None = None) -> list[GroupMappingOut]:
    """Group → role mappings, optionally for one department (as `list_assignments`, unloadable rows marked)."""
    return [GroupMappingOut(group=a.subject.removeprefix(GROUP_PREFIX), role=a.role, department=a.department,
                            invalid=a.invalid)
            for a in list_assignments(enforcer, department) if a.subject.startswith(GROUP_PREFIX)]


def define_role(*, ctx: ChangeContext, definition: RoleDefinition) -> RoleDefinition:
    """Create or replace a role's permissions (platform-wide role names, granted per department); the role as stored.
    No permission is added to a role the acting admin holds."""
    role, wanted = ROLE_PREFIX + definition.name, {p.value for p in definition.permissions}
    stored = {action for action, existing in repository.permission_rows(ctx.session) if existing == role}
    if wanted - stored:
        _refuse_held_role(ctx, definition.name, repository.department_names(ctx.session),
                          "add permissions to a role they hold")
    for action in sorted(wanted):
        repository.add_rule(ctx.session, "p", action, role)
    for action in sorted(stored - wanted):
        repository.remove_rules(ctx.session, "p", action, role)
    _record_change(ctx, AdminEventType.role_defined, None,
                   {"role": definition.name, "permissions": sorted(wanted)})
    return RoleDefinition(name=definition.name, permissions=sorted(wanted))


def delete_role(*, ctx: ChangeContext, name: str) -> None:
    """Remove a role that nobody holds any more; conflict while it is still granted or inherited."""
    role = ROLE_PREFIX + name
    if not any(r == role for _, r in repository.permission_rows(ctx.session)):
        raise GovragError(ErrorCode.not_found, "no such role")
    if repository.role_in_use(ctx.session, role):
        raise GovragError(ErrorCode.conflict, "role is still granted or inherited; revoke it first")
    for action, existing_role in repository.permission_rows(ctx.session):
        if existing_role == role:
            repository.remove_rules(ctx.session, "p", action, role)
    _record_change(ctx, AdminEventType.role_deleted, None, {"role": name})


def list_roles(enforcer: PolicyEnforcer) -> list[RoleDefinition]:
    """Every role with its permissions."""
    enforcer.refresh()
    permissions: dict[str, list[str]] = {}
    for action, role in enforcer.permission_rows():
        permissions.setdefault(role[len(ROLE_PREFIX):], []).append(action)
    return [RoleDefinition(name=name, permissions=sorted(actions)) for name, actions in sorted(permissions.items())]


def add_inheritance(*, ctx: ChangeContext, link: RoleInheritance) -> bool:
    """Inside a department, holders of link.role also hold link.inherits; never a role the acting admin holds there."""
    _validate_assignment(ctx.session, link.role, link.department)
    _validate_assignment(ctx.session, link.inherits, link.department)
    if link.role == link.inherits:
        raise GovragError(ErrorCode.invalid_request, "a role cannot inherit itself")
    _refuse_held_role(ctx, link.role, [link.department], "make a role they hold inherit another")
    _refuse_cycle_or_overlong_chain(ctx, link)
    if not repository.add_rule(ctx.session, "g", ROLE_PREFIX + link.role, ROLE_PREFIX + link.inherits, link.department):
        return False
    _record_change(ctx, AdminEventType.role_inheritance_added, link.department, link.model_dump())
    return True


def _refuse_cycle_or_overlong_chain(ctx: ChangeContext, link: RoleInheritance) -> None:
    """Conflict when the link closes a cycle, or makes a chain longer than Casbin's matcher follows (the grant index
    behind read_scope would follow it, the re-check would not: departments searched, then every hit dropped)."""
    below: dict[str, set[str]] = {}  # role → the roles it inherits directly
    above: dict[str, set[str]] = {}  # role → the roles inheriting it directly
    for role, inherits in repository.inheritance_links(ctx.session, link.department):
        below.setdefault(role, set()).add(inherits)
        above.setdefault(inherits, set()).add(role)
    role, inherits = ROLE_PREFIX + link.role, ROLE_PREFIX + link.inherits
    if inherits in below.get(role, set()):
        return  # already there: add_rule changes nothing
    if role in _reachable(below, inherits):
        raise GovragError(ErrorCode.conflict, f"{link.inherits} already inherits {link.role} in {link.department}: "
                                              "this link would make a cycle")
    links = _longest_chain(above, role) + 1 + _longest_chain(below, inherits)
    limit = ctx.enforcer.max_inheritance_links
    if links > limit:
        raise GovragError(ErrorCode.conflict, f"this link would make a chain of {links} inheritance links in "
                                              f"{link.department}; at most {limit} are followed")


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    """Every role reachable from `start` along the graph's links, `start` included."""
    seen, frontier = {start}, [start]
    while frontier:
        for following in graph.get(frontier.pop(), set()) - seen:
            seen.add(following)
            frontier.append(following)
    return seen


def _longest_chain(graph: dict[str, set[str]], start: str) -> int:
    """The most links a path from `start` takes along the graph (a cycle stored earlier ends a path where it closes);
    each role's longest path is worked out once, however many paths lead to it."""
    lengths: dict[str, int] = {}

    def walk(role: str, path: set[str]) -> int:
        if role not in lengths:
            path.add(role)
            lengths[role] = max((1 + walk(following, path) for following in graph.get(role, set()) - path), default=0)
            path.discard(role)
        return lengths[role]

    return walk(start, set())


def remove_inheritance(*, ctx: ChangeContext, link: RoleInheritance) -> None:
    """Withdraw a role-hierarchy link; not_found when absent."""
    if not repository.remove_rules(ctx.session, "g", ROLE_PREFIX + link.role, ROLE_PREFIX + link.inherits,
                                   link.department):
        raise GovragError(ErrorCode.not_found, "no such role inheritance")
    _record_change(ctx, AdminEventType.role_inheritance_removed, link.department, link.model_dump())


def list_inheritance(enforcer: PolicyEnforcer, department: str | None = None) -> list[RoleInheritance]:
    """The role hierarchy, optionally for one department."""
    enforcer.refresh()
    return [RoleInheritance(role=a[len(ROLE_PREFIX):], inherits=b[len(ROLE_PREFIX):], department=dept)
            for a, b, dept in enforcer.grouping_rows()
            if a.startswith(ROLE_PREFIX) and (department is None or dept == department)]


def set_clearance(*, ctx: ChangeContext, clearance: ClearanceIn) -> None:
    """Set the highest classification a subject may read in a department; never the acting admin's or their group's."""
    require_department(ctx.session, clearance.department)
    _refuse_own_subject(ctx, clearance.subject, clearance.department, "set the clearance of")
    repository.set_clearance(ctx.session, clearance.subject, clearance.department, clearance.level.value)
    _record_change(ctx, AdminEventType.clearance_set, clearance.department,
                   clearance.model_dump(mode="json"))


def remove_clearance(*, ctx: ChangeContext, key: ClearanceKey) -> None:
    """Fall back to the default clearance; not_found when none was set. The acting admin may remove their own (or
    their group's) unless that raises their clearance: one set below the default, or below a group's, held them."""
    if key.subject in ctx.actor.subjects:
        ctx.enforcer.refresh(force=True, session=ctx.session)
        without = tuple(subject for subject in ctx.actor.subjects if subject != key.subject)
        if (ctx.enforcer.clearance_rank(without, key.department)
                > ctx.enforcer.clearance_rank(ctx.actor.subjects, key.department)):
            _refuse_own_access("remove a clearance of theirs, or their group's, when that raises their own",
                               key.department)
    if not repository.delete_clearance(ctx.session, key.subject, key.department):
        raise GovragError(ErrorCode.not_found, "no such clearance")
    _record_change(ctx, AdminEventType.clearance_removed, key.department, key.model_dump())


def list_clearances(enforcer: PolicyEnforcer, department: str | None = None) -> list[ClearanceOut]:
    """Explicit clearances, optionally for one department (also one stored before today's rules on subjects, marked
    `invalid` when no token can carry it)."""
    enforcer.refresh()
    return [ClearanceOut(subject=subject, department=dept, level=level, invalid=_uncarried(subject))
            for (subject, dept), level in sorted(enforcer.clearances().items())
            if department is None or dept == department]


def _validate_assignment(session: Session, role: str, department: str) -> None:
    if not any(r == ROLE_PREFIX + role for _, r in repository.permission_rows(session)):
        raise GovragError(ErrorCode.invalid_request,
                          "unknown role; a platform admin defines roles (PUT /v1/admin/roles/{name}) and lists them")
    require_department(session, department)


# --- explanations ---

def explain_checks(enforcer: PolicyEnforcer, identity: Identity, *, department: str, acl_groups: list[str],
                   classification: str) -> list[ExplainCheck]:
    """Each part of the visibility rule (`may_read_chunk`) for one chunk or document, with the rows that decided it."""
    granting = [(s, enforcer.matched_rule(s, department, "read")) for s in identity.subjects]
    granting = [(s, rule) for s, rule in granting if rule]
    read = ExplainCheck(
        name="department_read", passed=bool(granting),
        detail=(f"read in {department} granted to {', '.join(s for s, _ in granting)}" if granting
                else f"no role of the subject or its groups grants read in {department}"),
        rules=[f"g, {s}, {ROLE_PREFIX}{r}, {department}" for s, _ in granting
               for r in enforcer.roles(s, department)] + [f"p, {', '.join(rule)}" for _, rule in granting])
    shared = sorted(set(acl_groups) & set(identity.groups))
    acl = ExplainCheck(name="acl", passed=not acl_groups or bool(shared),
                       detail=("document ACL is open" if not acl_groups else
                               f"shared groups: {shared}" if shared else "no group in common with the document ACL"))
    limit = enforcer.clearance_rank(identity.subjects, department)
    sources = [f"clearance, {s}, {department}, {lvl}" for (s, d), lvl in enforcer.clearances().items()
               if d == department and s in identity.subjects]
    clearance = ExplainCheck(
        name="clearance", passed=rank(classification) <= limit,
        detail=f"classification {classification} (rank {rank(classification)}) vs clearance rank {limit}"
               + ("" if sources else " (default clearance)"), rules=sources)
    return [read, acl, clearance]


def explain(*, session: Session, enforcer: PolicyEnforcer, store: VectorIndex, request: ExplainRequest) -> ExplainOut:
    """Whether a subject with these groups would see a served document (one queries may cite) or one of its chunks,
    and why: a document as `may_see_document` decides (status, listing, citation titles), a chunk as the query's
    re-check does (`readable_chunk_level`, at the chunk's own level)."""
    document_id = request.target_document_id
    document = ingestion_service.served_documents(session=session, document_ids={document_id}).get(document_id)
    if document is None:
        raise GovragError(ErrorCode.not_found, "no such served document")
    subject = Identity(subject=request.subject, groups=tuple(dict.fromkeys(request.groups)), is_platform_admin=False)
    enforcer.refresh(force=True)
    if request.chunk_id is None:
        allowed, checks = _explain_document(session, enforcer, subject, document)
    else:
        allowed, checks = _explain_chunk(session, enforcer, store, subject, document, request.chunk_index)
    return ExplainOut(decision="allow" if allowed else "deny", subject=request.subject,
                      document_id=document_id, chunk_id=request.chunk_id, department=document.department,
                      policy_version=enforcer.version, checks=checks)


def _explain_document(session: Session, enforcer: PolicyEnforcer, identity: Identity,
                      document: Document) -> tuple[bool, list[ExplainCheck]]:
    """`may_see_document`: the department's editors, or readers who may read it whole; for an attachment, each
    e-mail above it too."""
    editor = is_allowed(enforcer, identity, "upload", document.department)
    upload = ExplainCheck(name="department_upload", passed=editor,
                          detail=(f"upload in {document.department} granted: editors see every document there"
                                  if editor else f"no role of the subject or its groups grants upload in "
                                  f"{document.department} (editors see every document there)"))
    checks = [*explain_checks(enforcer, identity, department=document.department,
                              acl_groups=list(document.acl_groups or []), classification=document.classification),
              upload, *_lineage_check(session, enforcer, identity, document,
                                              if_hidden="so the attachment is hidden too")]
    return may_see_document(enforcer, identity, document, session=session), checks


def _explain_chunk(session: Session, enforcer: PolicyEnforcer, store: VectorIndex, identity: Identity,
                   document: Document, chunk_index: int) -> tuple[bool, list[ExplainCheck]]:
    """The query's re-check of the stored chunk; for an attachment, whether its title would be shown with it."""
    payload = store.chunk_payload(document.department, document.id, chunk_index,
                                  document.served_generation or 0)  # set: a served document
    served = payload is not None and ingestion_service.is_served(document, payload)
    if payload is None or payload.get("document_id") != document.id or not served:
        raise GovragError(ErrorCode.not_found, "no such chunk")
    level = stored_chunk_level(document, payload)
    if level is None:
        return False, [ExplainCheck(name="chunk_payload", passed=False,
                                    detail="the stored chunk's department or level does not match its document: "
                                           "the re-check drops it")]
    checks = [*explain_checks(enforcer, identity, department=document.department,
                              acl_groups=list(document.acl_groups or []), classification=level),
              *_lineage_check(session, enforcer, identity, document,
                             if_hidden="the chunk is returned under a withheld title")]
    return readable_chunk_level(enforcer, identity, document, payload) is not None, checks


def _lineage_check(session: Session, enforcer: PolicyEnforcer, identity: Identity, document: Document, *,
                   if_hidden: str) -> list[ExplainCheck]:
    """For an attachment: whether the subject may see each e-mail above it (`may_see_document`'s lineage rule)."""
    emails = ingestion_service.emails_above(session=session, document=document)
    if not emails:
        return []
    hidden = [email.id for email in emails if not _may_see_one(enforcer, identity, email)]
    detail = (f"may not see the e-mail(s) above this attachment: {', '.join(hidden)}; {if_hidden}" if hidden
              else "may see each e-mail above this attachment")
    return [ExplainCheck(name="lineage", passed=not hidden, detail=detail)]


def named_definition(name: str, body: RoleDefinition) -> RoleDefinition:
    """The body of PUT /roles/{name}, refused when it names a different role."""
    if body.name != name:
        raise GovragError(ErrorCode.invalid_request, "the role name in the path and the body differ")
    return body
