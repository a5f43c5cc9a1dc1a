"""guard controls: department guard modes and the kill switch (issue 5)

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from core.migrate import rows_at_risk

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "guard_controls",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("scope", sa.String(length=64), nullable=False),
        sa.Column("firewall_mode", sa.String(length=8), nullable=True),
        sa.Column("kill_mode", sa.String(length=16), nullable=False, server_default="normal"),
        sa.Column("reason", sa.String(length=500), nullable=True),
        sa.Column("canary", sa.String(length=64), nullable=True),
        sa.Column("updated_by", sa.String(length=255), nullable=False, server_default=""),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_guard_controls")),
        sa.UniqueConstraint("scope", name=op.f("uq_guard_controls_scope")),
    )


def data_at_risk(connection: sa.Connection) -> list[str]:
    """What undoing this revision would delete: firewall modes and kill switches."""
    return rows_at_risk(connection, [("guard controls (firewall modes, kill switches)", "guard_controls", "")])


def downgrade() -> None:
    op.drop_table("guard_controls")
