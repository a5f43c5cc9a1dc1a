"""documents refused as duplicates name the department's copy in a column of their own

An attachment refused as a duplicate is recorded as a failed document whose reason names the department's copy of its
content, and that refusal was told by the reason's wording ("duplicate upload: the department already has this content
as document <id>"): which refusals a deletion of the copy takes again, and whether a caller may read the copy's id. A
reason reworded in a later release would have passed old refusals over (never taken again) and shown the copy's id to
callers it is hidden from. The copy's id is now recorded as `duplicate_of` and read from there; the reason keeps its
words. Refusals recorded before this revision get it from their reason.

Undoing this revision loses nothing: the reasons still name the copies, which the release before reads.

Revision ID: 0022
Revises: 0021
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0022"
down_revision = "0021"
branch_labels = None
depends_on = None

# The reason's words before the copy's id, as every release up to this one wrote them (ingestion/repository.py)
DUPLICATE_OF = "duplicate upload: the department already has this content as document "
ID_CHARS = 36  # core/models.py DOCUMENT_ID_CHARS: a longer rest of the reason is no id (none was ever written)


def upgrade() -> None:
    with op.batch_alter_table("documents") as batch:
        batch.add_column(sa.Column("duplicate_of", sa.String(ID_CHARS), nullable=True))
    # substr, not LIKE: SQLite's LIKE ignores case, and an _ in the words would match any character
    words = len(DUPLICATE_OF)
    op.execute(sa.text("UPDATE documents SET duplicate_of = substr(error, :start) "
                       "WHERE substr(error, 1, :words) = :prefix AND length(error) BETWEEN :start AND :most")
               .bindparams(prefix=DUPLICATE_OF, words=words, start=words + 1, most=words + ID_CHARS))


def downgrade() -> None:
    with op.batch_alter_table("documents") as batch:
        batch.drop_column("duplicate_of")
