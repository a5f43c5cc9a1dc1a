"""documents record that a re-index withholds the index they served (it fails closed unless told to keep serving)

A re-index kept serving each document's previous index until its run ended (0012), and a failed one kept serving it
for good: after a rule that tightens what may be shown, exactly the content just ruled out. A re-index now stops
serving the documents at once unless asked to keep serving (`serve_previous`); `withheld` marks those it stopped, so
a run that fails leaves them `failed`, saying the re-index failed, rather than back on the index withheld.

Undoing this revision loses only that mark: a withheld document still serves nothing, and a failure of its run then
reads as a plain failure.

Revision ID: 0013
Revises: 0012
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("documents", recreate="never") as batch:  # added in place, as 0002's columns
        batch.add_column(sa.Column("withheld", sa.Boolean(), nullable=False, server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table("documents") as batch:
        batch.drop_column("withheld")
