"""the /metrics document counts are read from an index, not from every row of documents

`document_counts` (audit/repository.py: documents and chunks by department and status) runs at every Prometheus
scrape. No index held status or chunk_count, so SQLite read every document through the listing index and grouped
them in a temporary b-tree (81 ms at 50,000 documents), PostgreSQL read the whole table (13 ms). An index on
(department, status, chunk_count) holds all the query reads, in its GROUP BY order: both databases answer it from
the index alone. bench/sqlite_plans.py prints the plans and times.

Revision ID: 0017
Revises: 0016
"""

from __future__ import annotations

from alembic import op

revision = "0017"
down_revision = "0016"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_documents_department_status_chunks", "documents", ["department", "status", "chunk_count"])


def downgrade() -> None:
    op.drop_index("ix_documents_department_status_chunks", table_name="documents")
