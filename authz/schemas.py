"""Request and response shapes for departments, roles, assignments, clearances and explanations."""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, Field, model_validator

from authz.identity import GROUP_PREFIX, MAX_SUBJECT_CHARS, RESERVED_PREFIXES, token_can_carry
from core.text import DepartmentName, RequestModel
from ingestion.schemas import Classification

GLOBAL_SCOPE = "global"  # the kill switch's platform-wide scope
RESERVED_DEPARTMENT_NAMES = frozenset({GLOBAL_SCOPE})  # scopes that must never name a department
# Casbin stores policy rows as text and splits them on commas outside ( ) and [ ]: a bracket in a stored name made
# every later policy load fail (every process, every department), so names stored in the policy hold none.
SUBJECT_PATTERN = rf"^[^\s,*()\[\]]{{1,{MAX_SUBJECT_CHARS}}}$"
ROLE_PATTERN = r"^[a-z][a-z0-9_-]{0,62}$"
GROUP_PATTERN = r"^[^\s,*()\[\]]{1,240}$"
CHUNK_ID_PATTERN = r"^[^:]{1,64}:[0-9]{1,9}$"


def _printable(name: str) -> str:
    """A name a token can carry (`token_can_carry`, the token verifier's rule): a grant to any other granted nothing,
    and showed in listings as the name it looks like."""
    if not token_can_carry(name):
        raise ValueError("holds a control, format or other unprintable character (a zero-width space, a direction "
                         "mark, a variation selector, ...), which no token carries")
    return name


def _user_or_group(subject: str) -> str:
    """A subject a token can carry, or group:<a group name a token's groups claim can carry>."""
    _printable(subject)
    if subject.startswith(GROUP_PREFIX):
        if not re.fullmatch(GROUP_PATTERN, subject.removeprefix(GROUP_PREFIX)):
            raise ValueError("a group subject is group:<name>, the name 1-240 characters without spaces, brackets, "
                             "',' or '*'")
    elif subject.startswith(RESERVED_PREFIXES):
        raise ValueError("a subject is a user or group:<name>, never a role or one of the platform's own actors")
    return subject


# A user subject or group:<name>; "role:" principals are only written by the role-hierarchy API.
Subject = Annotated[str, Field(pattern=SUBJECT_PATTERN, description="a user subject or group:<name>"),
                    AfterValidator(_user_or_group)]


def _not_reserved(subject: str) -> str:
    """Any subject as the policy may hold it, but never a role (that row is a hierarchy link) or the platform's own."""
    if not subject.startswith(GROUP_PREFIX) and subject.startswith(RESERVED_PREFIXES):
        raise ValueError("a subject is a user or group:<name>, never a role or one of the platform's own actors")
    return subject


# A subject as a stored row may hold it, also one stored before today's rules (the listings mark those `invalid`).
StoredSubject = Annotated[str, Field(min_length=1, max_length=MAX_SUBJECT_CHARS, description="a subject as listed"),
                          AfterValidator(_not_reserved)]


class Permission(StrEnum):
    read = "read"
    upload = "upload"
    delete = "delete"
    reveal = "reveal"
    export_audit = "export_audit"
    manage = "manage"


class DepartmentIn(RequestModel):
    name: DepartmentName


class DepartmentOut(BaseModel):
    name: str


class RoleAssignmentKey(RequestModel):
    """An assignment to revoke: as granted, or as listed (also a row stored before today's rules on subjects)."""

    subject: StoredSubject
    role: str = Field(pattern=ROLE_PATTERN)
    department: DepartmentName


class RoleAssignment(RoleAssignmentKey):
    subject: Subject


class RoleAssignmentOut(BaseModel):
    subject: str
    role: str
    department: str
    invalid: str | None = Field(default=None, description="set on a stored row that grants nothing: why")


class GroupMappingKey(RequestModel):
    """A mapping to withdraw: as made, or as listed (also a row stored before today's rules on group names)."""

    group: str = Field(max_length=MAX_SUBJECT_CHARS - len(GROUP_PREFIX), description="the group as listed")
    role: str = Field(pattern=ROLE_PATTERN)
    department: DepartmentName


class GroupMapping(GroupMappingKey):
    """Members of an IdP group hold `role` in `department`."""

    group: Annotated[str, Field(pattern=GROUP_PATTERN, description="the group as the token's groups claim carries it"),
                     AfterValidator(_printable)]


class GroupMappingOut(BaseModel):
    group: str
    role: str
    department: str
    invalid: str | None = Field(default=None, description="set on a stored row that grants nothing: why")


class RoleDefinition(RequestModel):
    name: str = Field(pattern=ROLE_PATTERN)
    permissions: list[Permission] = Field(min_length=1)


class RoleInheritance(RequestModel):
    """Inside `department`, holders of `role` also hold `inherits` (and what it inherits)."""

    role: str = Field(pattern=ROLE_PATTERN)
    inherits: str = Field(pattern=ROLE_PATTERN)
    department: DepartmentName


class ClearanceKey(RequestModel):
    """A clearance to remove: as set, or as listed (also one stored before today's rules on subjects)."""

    subject: StoredSubject
    department: DepartmentName


class ClearanceIn(ClearanceKey):
    subject: Subject
    level: Classification  # the highest classification the subject may read there


class ClearanceOut(BaseModel):
    subject: str
    department: str
    level: str
    invalid: str | None = Field(default=None, description="set on a stored row that grants nothing: why")


class PolicyVersionOut(BaseModel):
    version: int


class ExplainRequest(RequestModel):
    """Would this subject (with these groups) see this document or chunk?"""

    subject: Subject
    groups: list[str] = Field(default_factory=list, max_length=500)
    document_id: str | None = Field(default=None, max_length=64)
    chunk_id: str | None = Field(default=None, max_length=80, pattern=CHUNK_ID_PATTERN,
                                 description="<document_id>:<chunk index>, as citations give it")

    @model_validator(mode="after")
    def _one_target(self) -> ExplainRequest:
        if (self.document_id is None) == (self.chunk_id is None):
            raise ValueError("give exactly one of document_id or chunk_id")
        return self

    @property
    def target_document_id(self) -> str:
        """The document the request is about (a chunk id is "<document_id>:<index>")."""
        return self.document_id or str(self.chunk_id).rsplit(":", 1)[0]

    @property
    def chunk_index(self) -> int:
        """The chunk's place in its document (only with a chunk_id)."""
        return int(str(self.chunk_id).rsplit(":", 1)[1])


class ExplainCheck(BaseModel):
    # department_read, acl, clearance: the visibility rule; department_upload: editors see every document of their
    # department; lineage: an attachment is seen only with every e-mail above it; chunk_payload: an unsound payload
    name: Literal["department_read", "acl", "clearance", "department_upload", "lineage", "chunk_payload"]
    passed: bool
    detail: str
    rules: list[str] = Field(default_factory=list)


class ExplainOut(BaseModel):
    decision: Literal["allow", "deny"]
    subject: str
    document_id: str
    chunk_id: str | None
    department: str | None
    policy_version: int
    checks: list[ExplainCheck]
