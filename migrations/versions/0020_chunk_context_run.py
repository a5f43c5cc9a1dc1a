"""documents record which index generations were sealed before chunk contexts bound their run

A document's data key is the same for every index generation, and a chunk's associated data named its place, level
and scanner version only: a chunk of an earlier generation (sealed before a re-index redacted more of it or raised its
level), copied by someone able to write the vector store into the served generation's point, opened and was served.
Chunks sealed from this revision on bind their generation and department too. Those sealed before it keep opening
under the context they were sealed with: every generation a document has numbered so far (`index_generation`) is
recorded as one of them (`unbound_through`), read from the database at query time, so no payload passes a later
generation's chunk off as one of these. A re-index seals the document's chunks under the new context.

Undoing this revision is refused once a run has numbered a generation after it: the release before would not open
that generation's chunks.

Revision ID: 0020
Revises: 0019
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from core.migrate import rows_at_risk

revision = "0020"
down_revision = "0019"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("documents") as batch:
        batch.add_column(sa.Column("unbound_through", sa.Integer(), nullable=False, server_default="0"))
    op.get_bind().execute(sa.text("UPDATE documents SET unbound_through = index_generation"))


def data_at_risk(connection: sa.Connection) -> list[str]:
    """What undoing this revision would lose: the chunks of the generations numbered since, which the release before
    would not open."""
    return rows_at_risk(connection, [("documents indexed with their run bound in their chunks' contexts", "documents",
                                      "index_generation > unbound_through")])


def downgrade() -> None:
    with op.batch_alter_table("documents") as batch:
        batch.drop_column("unbound_through")
