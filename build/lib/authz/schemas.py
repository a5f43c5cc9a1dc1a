"""Request and response shapes for departments and role assignments."""

from __future__ import annotations

from pydantic import BaseModel, Field

DEPARTMENT_PATTERN = r"^[a-z][a-z0-9_-]{0,62}$"
SUBJECT_PATTERN = r"^[^\s,*]{1,255}$"


class DepartmentIn(BaseModel):
    name: str = Field(pattern=DEPARTMENT_PATTERN, description="lower-case letters, digits, '-' or '_'")


class DepartmentOut(BaseModel):
    name: str


class RoleAssignment(BaseModel):
    subject: str = Field(pattern=SUBJECT_PATTERN, description="a user subject or group:<name>")
    role: str
    department: str = Field(pattern=DEPARTMENT_PATTERN)
