"""an approval records the level it released a document at (a re-run at a higher level goes back for review)

An approval used to be permanent: `approved_by` was set and every later run (a re-index under a stricter policy)
skipped the review whatever level it found. `approved_level` is the level the reviewer was shown; a run that finds
the document above it quarantines it again (ingestion/pipeline.py). Documents approved before take the level they
hold now, the level their last run released them at.

Revision ID: 0011
Revises: 0010
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from core.migrate import rows_at_risk

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("documents") as batch:
        batch.add_column(sa.Column("approved_level", sa.String(length=32), nullable=True))
    op.get_bind().execute(sa.text(
        "UPDATE documents SET approved_level = classification WHERE approved_by IS NOT NULL"))


def data_at_risk(connection: sa.Connection) -> list[str]:
    """What undoing this revision would lose: approvals held below the document's level (the release before this
    one would take such a document as approved at any level)."""
    return rows_at_risk(connection, [
        ("documents' approved levels (held for review since their level rose)", "documents",
         "approved_level IS NOT NULL AND approved_level <> classification"),
    ])


def downgrade() -> None:
    with op.batch_alter_table("documents") as batch:
        batch.drop_column("approved_level")
