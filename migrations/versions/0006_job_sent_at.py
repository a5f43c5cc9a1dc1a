"""ingestion jobs record when their task reached the broker (an unsent job is sent again)

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from core.migrate import rows_at_risk

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("ingestion_jobs") as batch:
        batch.add_column(sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True))
    # Jobs from before this column were sent when they were created.
    op.execute("UPDATE ingestion_jobs SET sent_at = created_at")


def data_at_risk(connection: sa.Connection) -> list[str]:
    """What undoing this revision would lose: which jobs never reached the broker (an upgrade marks all sent)."""
    return rows_at_risk(connection, [("ingestion jobs not yet sent to the broker", "ingestion_jobs",
                                      "sent_at IS NULL")])


def downgrade() -> None:
    with op.batch_alter_table("ingestion_jobs") as batch:
        batch.drop_column("sent_at")
