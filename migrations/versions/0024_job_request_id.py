"""ingestion jobs keep the request id of the request or run that queued them

A job's task carried the request id its sender logged under, so only its first send was tied to the request that
queued it: a job sent again — by the sweep (the broker was down at the upload, or lost the task), by an embedded API
as it starts, after a re-index handed it back — carried `-`, and its run logged under no request. Each job now keeps
that id in `request_id`, and every send of it carries it (workers/dispatch.py). Jobs queued before this revision
have none: a later send of one carries its sender's id (a command run's), else `-`, as before.

Undoing this revision loses only those ids: the release before sends each job with its sender's id.

Revision ID: 0024
Revises: 0023
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0024"
down_revision = "0023"
branch_labels = None
depends_on = None

REQUEST_ID_CHARS = 64  # retrieval_events.request_id's length: a request id as govrag makes one is at most 36


def upgrade() -> None:
    with op.batch_alter_table("ingestion_jobs") as batch:
        batch.add_column(sa.Column("request_id", sa.String(REQUEST_ID_CHARS), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("ingestion_jobs") as batch:
        batch.drop_column("request_id")
