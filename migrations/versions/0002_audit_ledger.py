"""ledger, checkpoints and retention (issue 6)

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from core.migrate import rows_at_risk

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_NEW_COLUMNS = ("roles", "policy_version", "guard_verdicts", "model_backend", "model_id", "kill_switch_mode",
                "details")


def upgrade() -> None:
    # recreate="never": SQLite adds each column in place (constant defaults), so no copy of the table is made and the
    # revision renders as SQL (`--sql`) without reading the table's definition from a database
    with op.batch_alter_table("retrieval_events", schema=None, recreate="never") as batch_op:
        batch_op.add_column(sa.Column("roles", sa.JSON(), nullable=False, server_default=sa.text("'[]'")))
        batch_op.add_column(sa.Column("policy_version", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("guard_verdicts", sa.JSON(), nullable=False, server_default=sa.text("'{}'")))
        batch_op.add_column(sa.Column("model_backend", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("model_id", sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column("kill_switch_mode", sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column("details", sa.JSON(), nullable=False, server_default=sa.text("'{}'")))
        batch_op.create_index(batch_op.f("ix_retrieval_events_event_type"), ["event_type"], unique=False)
    op.create_table(
        "audit_checkpoints",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("last_event_id", sa.Integer(), nullable=False),
        sa.Column("last_hash", sa.String(length=64), nullable=False),
        sa.Column("event_count", sa.Integer(), nullable=False),
        sa.Column("signature", sa.String(length=128), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_checkpoints")),
    )


def data_at_risk(connection: sa.Connection) -> list[str]:
    """What undoing this revision would delete: every ledger event's hash covers the columns it drops."""
    return rows_at_risk(connection, [
        ("ledger events (their hashes cover the roles, policy, guard and model columns)", "retrieval_events", ""),
        ("signed audit checkpoints", "audit_checkpoints", ""),
    ])


def downgrade() -> None:
    op.drop_table("audit_checkpoints")
    with op.batch_alter_table("retrieval_events", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_retrieval_events_event_type"))
        for name in reversed(_NEW_COLUMNS):
            batch_op.drop_column(name)
