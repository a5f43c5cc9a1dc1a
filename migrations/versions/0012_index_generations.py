"""documents record the index generation their runs write and the one queries cite (a re-index keeps serving)

A re-index moved a document out of `ready` for as long as its run took, so queries lost it, and a run that failed
left it `failed` with its earlier points unserved. Each run now writes its points under a generation of its own and
the document's served generation moves to it in the transaction that marks it ready. Documents ready now serve the
points they have, which carry no generation: generation 0.

Undoing this revision is refused once a run has numbered a document's generation: the release before would serve
those points, but an upgrade after it would know neither which generation to cite nor which numbers were taken (a run
reusing one could leave an earlier run's chunks under the generation it serves).

Revision ID: 0012
Revises: 0011
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from core.migrate import rows_at_risk

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("documents") as batch:
        batch.add_column(sa.Column("index_generation", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("served_generation", sa.Integer(), nullable=True))
    op.get_bind().execute(sa.text("UPDATE documents SET served_generation = 0 WHERE status = 'ready'"))


def data_at_risk(connection: sa.Connection) -> list[str]:
    """What undoing this revision would lose: which index generation each document indexed since serves, and the
    numbers its runs took."""
    return rows_at_risk(connection, [("documents' index generations", "documents", "index_generation <> 0")])


def downgrade() -> None:
    with op.batch_alter_table("documents") as batch:
        batch.drop_column("served_generation")
        batch.drop_column("index_generation")
