"""retired documents awaiting the purge of their vectors and stored bytes (done after the key shred commits)

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from core.migrate import rows_at_risk

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Documents retired before this table were purged in the transaction that retired them: none is pending.
    op.create_table(
        "pending_purges",
        sa.Column("document_id", sa.String(36), primary_key=True),
        sa.Column("department", sa.String(64), nullable=False),
        sa.Column("retired_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_pending_purges_retired_at", "pending_purges", ["retired_at"])


def data_at_risk(connection: sa.Connection) -> list[str]:
    """What undoing this revision would delete: deleted documents whose vectors and files are still to purge."""
    return rows_at_risk(connection, [("pending purges of deleted documents", "pending_purges", "")])


def downgrade() -> None:
    op.drop_index("ix_pending_purges_retired_at", table_name="pending_purges")
    op.drop_table("pending_purges")
