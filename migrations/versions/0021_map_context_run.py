"""documents record which index generations kept placeholder maps sealed before map contexts bound their run

A document's data key is the same for every index generation, and a placeholder map's associated data named the
document only: the map of an earlier generation (one a re-index has since dropped values from), copied over the served
generation's file or restored onto it from a backup by someone able to write the blob store, opened and was revealed.
Maps sealed from this revision on bind their generation and department too, as chunks do since 0020. Those sealed
before it keep opening under the context they were sealed with: every generation a document has numbered so far
(`index_generation`) is recorded as one of them (`maps_unbound_through`), read from the database when a map is opened,
so no file passes a later generation's map off as one of these.

Undoing this revision is refused once a run has numbered a generation after it: the release before would not open
that generation's map.

Revision ID: 0021
Revises: 0020
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from core.migrate import rows_at_risk

revision = "0021"
down_revision = "0020"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("documents") as batch:
        batch.add_column(sa.Column("maps_unbound_through", sa.Integer(), nullable=False, server_default="0"))
    op.get_bind().execute(sa.text("UPDATE documents SET maps_unbound_through = index_generation"))


def data_at_risk(connection: sa.Connection) -> list[str]:
    """What undoing this revision would lose: the placeholder maps of the generations numbered since, which the
    release before would not open."""
    return rows_at_risk(connection, [("documents indexed with their run bound in their placeholder maps' contexts",
                                      "documents", "index_generation > maps_unbound_through")])


def downgrade() -> None:
    with op.batch_alter_table("documents") as batch:
        batch.drop_column("maps_unbound_through")
