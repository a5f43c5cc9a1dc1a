"""an upload's duplicate lookup and the job sweep each seek their rows, on SQLite without statistics too

SQLite is never ANALYZEd here (core/db.py), so its planner picks an index by its shape alone. `find_duplicate`
(department = ?, sha256 = ?, oldest first) and `failed_copies` took ix_documents_department_created, which gives the
order, over ix_documents_department_sha256, which gives the rows: every upload read all of its department's documents.
With created_at and id after sha256 one index gives both. The job sweep (every 10 s in each API process: jobs queued
and lost, processing and stalled, unsent; workers/dispatch.py) read all of ingestion_jobs in each of its three steps
for the few unfinished ones, two of them under SQLite's write lock (UPDATE); ix_ingestion_jobs_status seeks them.
bench/sqlite_plans.py prints the plans and times (50,000 documents, one job each: find_duplicate 3.5 ms -> 0.01 ms
an upload, each sweep step 3.0-3.2 ms -> 0.1-0.7 ms).

The status index is whole, not partial (WHERE status is unfinished), though only the few unfinished jobs are looked
for: SQLite uses a partial index only for a query repeating its WHERE term as written (it does no algebra), so
`status IN ('queued', 'processing')` served none of the sweep's three steps and `status = 'queued' OR status =
'processing'` not send_unsent's IN. PostgreSQL, with its statistics, seeks the unfinished jobs through either (at
50,000 jobs the whole index is 352 kB, a partial one 16 kB; the same time).

Revision ID: 0015
Revises: 0014
"""

from __future__ import annotations

from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_index("ix_documents_department_sha256", table_name="documents")
    op.create_index("ix_documents_department_sha256_created", "documents", ["department", "sha256", "created_at", "id"])
    op.create_index("ix_ingestion_jobs_status", "ingestion_jobs", ["status"])


def downgrade() -> None:
    op.drop_index("ix_ingestion_jobs_status", table_name="ingestion_jobs")
    op.drop_index("ix_documents_department_sha256_created", table_name="documents")
    op.create_index("ix_documents_department_sha256", "documents", ["department", "sha256"])
