"""ingestion lifecycle: classification, quarantine, key versions, duplicates (issue 3)

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from core.migrate import rows_at_risk

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "ingestion_policies",
        sa.Column("department", sa.String(length=64), nullable=False),
        sa.Column("ai_max_level", sa.String(length=32), nullable=False),
        sa.Column("injection_action", sa.String(length=16), nullable=False),
        sa.Column("keywords", sa.JSON(), nullable=False),
        sa.Column("allow_list", sa.JSON(), nullable=False),
        sa.Column("recognizers", sa.JSON(), nullable=False),
        sa.Column("reversible", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("updated_by", sa.String(length=255), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["department"], ["departments.name"],
                                name=op.f("fk_ingestion_policies_department_departments")),
        sa.PrimaryKeyConstraint("department", name=op.f("pk_ingestion_policies")),
    )
    with op.batch_alter_table("documents") as batch:
        batch.add_column(sa.Column("declared_classification", sa.String(length=32), nullable=True))
        batch.add_column(sa.Column("classification_reasons", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("flagged_chunks", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("review_reason", sa.String(length=500), nullable=True))
        batch.add_column(sa.Column("approved_by", sa.String(length=255), nullable=True))
        batch.add_column(sa.Column("parent_id", sa.String(length=36), nullable=True))
        batch.create_index("ix_documents_department_sha256", ["department", "sha256"], unique=False)
        batch.create_index("ix_documents_parent_id", ["parent_id"], unique=False)


def data_at_risk(connection: sa.Connection) -> list[str]:
    """What undoing this revision would delete: ingestion policies and documents' classification and review."""
    return rows_at_risk(connection, [
        ("department ingestion policies", "ingestion_policies", ""),
        ("documents' classification, review or attachment details", "documents",
         "declared_classification IS NOT NULL OR classification_reasons IS NOT NULL OR flagged_chunks <> 0"
         " OR review_reason IS NOT NULL OR approved_by IS NOT NULL OR parent_id IS NOT NULL"),
    ])


def downgrade() -> None:
    with op.batch_alter_table("documents") as batch:
        batch.drop_index("ix_documents_parent_id")
        batch.drop_index("ix_documents_department_sha256")
        batch.drop_column("parent_id")
        batch.drop_column("approved_by")
        batch.drop_column("review_reason")
        batch.drop_column("flagged_chunks")
        batch.drop_column("classification_reasons")
        batch.drop_column("declared_classification")
    op.drop_table("ingestion_policies")
