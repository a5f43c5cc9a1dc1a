"""authorization model: clearances, group mappings, policy versions (issue 4)

Role names in casbin_rule get a "role:" prefix, so no user subject can ever equal a role
(Casbin treats a name as linked to itself). p rows become (action, role) so the enforcer can
index them by action. Group -> role mappings are grouping rows whose subject is group:<name>.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

from core.migrate import rows_at_risk

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

ROLE_PREFIX = "role:"
DEFAULT_ROLE_PERMISSIONS = {
    "reader": ("read",),
    "editor": ("read", "upload", "delete"),
    "compliance": ("export_audit",),
    "privacy_officer": ("read", "reveal"),
    "admin": ("manage",),
}
_rules = sa.table("casbin_rule", sa.column("id", sa.Integer), sa.column("ptype", sa.String),
                  sa.column("v0", sa.String), sa.column("v1", sa.String), sa.column("v2", sa.String))


def upgrade() -> None:
    op.create_table(
        "authz_clearances",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("subject", sa.String(length=255), nullable=False),
        sa.Column("department", sa.String(length=64), nullable=False),
        sa.Column("level", sa.String(length=32), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_authz_clearances")),
        sa.UniqueConstraint("subject", "department", name=op.f("uq_authz_clearances_subject")),
    )
    with op.batch_alter_table("authz_clearances") as batch:
        batch.create_index(batch.f("ix_authz_clearances_department"), ["department"], unique=False)
    state = op.create_table(
        "authz_policy_state",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_authz_policy_state")),
    )
    op.bulk_insert(state, [{"id": 1, "version": 1, "updated_at": datetime.now(UTC)}])
    _prefix_roles()


def _prefix_roles() -> None:
    """One UPDATE, no rows read into Python, so it renders as SQL (`--sql`) too."""
    op.execute(_rules.update().where(_rules.c.ptype == "g", _rules.c.v1 != "", ~_has_role_prefix())
               .values(v1=sa.literal(ROLE_PREFIX) + _rules.c.v1))
    op.execute(_rules.delete().where(_rules.c.ptype == "p"))
    op.bulk_insert(_rules, [{"ptype": "p", "v0": action, "v1": ROLE_PREFIX + role}
                            for role, actions in DEFAULT_ROLE_PERMISSIONS.items() for action in actions])


def _has_role_prefix() -> sa.ColumnElement[bool]:
    """v1 starts with ROLE_PREFIX, in its case (substr, not LIKE: SQLite's LIKE ignores case); NULL for a NULL v1."""
    return sa.func.substr(_rules.c.v1, 1, len(ROLE_PREFIX)) == ROLE_PREFIX


def data_at_risk(connection: sa.Connection) -> list[str]:
    """What undoing this revision would delete: clearances, role inheritance, custom roles and permissions."""
    at_risk = rows_at_risk(connection, [
        ("clearances", "authz_clearances", ""),
        ("role inheritance rules", "casbin_rule", f"ptype = 'g' AND v0 LIKE '{ROLE_PREFIX}%'"),
    ])
    defaults = {(action, ROLE_PREFIX + role) for role, actions in DEFAULT_ROLE_PERMISSIONS.items()
                for action in actions}
    permissions = connection.execute(sa.select(_rules.c.v0, _rules.c.v1).where(_rules.c.ptype == "p")).all()
    custom = [row for row in permissions if tuple(row) not in defaults]
    if custom:
        at_risk.append(f"{len(custom)} custom role permissions")
    return at_risk


def downgrade() -> None:
    op.execute(_rules.delete().where(_rules.c.ptype == "g", _rules.c.v0.like(ROLE_PREFIX + "%")))
    op.execute(_rules.update().where(_rules.c.ptype == "g", _has_role_prefix())
               .values(v1=sa.func.substr(_rules.c.v1, len(ROLE_PREFIX) + 1)))
    op.execute(_rules.delete().where(_rules.c.ptype == "p"))
    op.bulk_insert(_rules, [{"ptype": "p", "v0": role, "v1": action}
                            for role, actions in DEFAULT_ROLE_PERMISSIONS.items() if role != "privacy_officer"
                            for action in actions])
    op.drop_table("authz_policy_state")
    with op.batch_alter_table("authz_clearances") as batch:
        batch.drop_index(batch.f("ix_authz_clearances_department"))
    op.drop_table("authz_clearances")
