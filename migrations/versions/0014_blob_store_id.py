"""the database records the id of its blob store, which the store's marker file holds

The marker (`.govrag-blobs`) was empty: any govrag blob store mounted at the blob path was taken as this
deployment's (another deployment's volume, or a restored copy belonging to another database), its documents' files
"missing" and new uploads written into it. The marker now holds a random store id and the database records it; a
start refuses a store whose id is another (core/blobs.py). The first start after this revision records the id of the
store it opens (an empty marker is given one).

Undoing this revision loses only the record: the next start after upgrading again records the store mounted then.

Revision ID: 0014
Revises: 0013
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "blob_store",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("store_id", sa.String(length=36), nullable=False),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_blob_store")),
    )


def downgrade() -> None:
    op.drop_table("blob_store")
