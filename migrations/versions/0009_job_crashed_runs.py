"""ingestion jobs count the runs a worker died in (a document that crashes its worker is failed, not retried for ever)

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from core.migrate import rows_at_risk

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("ingestion_jobs") as batch:
        batch.add_column(sa.Column("crashed_runs", sa.Integer(), nullable=False, server_default="0"))


def data_at_risk(connection: sa.Connection) -> list[str]:
    """What undoing this revision would lose: how often a job's worker died (the crash loop breaker)."""
    return rows_at_risk(connection, [("ingestion jobs' crashed-run counts", "ingestion_jobs", "crashed_runs <> 0")])


def downgrade() -> None:
    with op.batch_alter_table("ingestion_jobs") as batch:
        batch.drop_column("crashed_runs")
