"""the database records a random deployment id, which every audit checkpoint and export manifest signs

A checkpoint signed the chain's position only: two deployments sharing a checkpoint key (the same
GOVRAG_AUDIT_CHECKPOINT_KEY, or a master key copied to staging) each took the other's checkpoints and, once exports
were signed, exports as their own. Checkpoints signed from this revision on carry the id (`v2.` signatures); the
ones signed before it keep verifying as they were signed.

Undoing this revision deletes the id, which the signatures made since cannot be checked without: it is refused while
a checkpoint signed with it is stored.

Revision ID: 0016
Revises: 0015
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

from core.migrate import rows_at_risk

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None


def upgrade() -> None:
    table = op.create_table(
        "deployment",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("deployment_id", sa.String(length=36), nullable=False),
        sa.Column("minted_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_deployment")),
    )
    op.bulk_insert(table, [{"id": 1, "deployment_id": str(uuid.uuid4()), "minted_at": datetime.now(UTC)}])


def data_at_risk(connection: sa.Connection) -> list[str]:
    """What undoing this revision would lose: the id the checkpoints signed since are checked with."""
    return rows_at_risk(connection, [("audit checkpoints signed with the deployment id", "audit_checkpoints",
                                      "signature LIKE 'v2.%'")])


def downgrade() -> None:
    op.drop_table("deployment")
