"""documents listed by department, newest first (GET /v1/documents pages by created_at, id)

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_documents_department_created", "documents", ["department", "created_at", "id"])


def downgrade() -> None:
    op.drop_index("ix_documents_department_created", table_name="documents")
