"""initial schema

Revision ID: 0001
Revises: (none)
Create Date: 2026-11-28 01:19:34.753848
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from core.migrate import rows_at_risk


revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('casbin_rule',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('ptype', sa.String(length=255), nullable=True),
    sa.Column('v0', sa.String(length=255), nullable=True),
    sa.Column('v1', sa.String(length=255), nullable=True),
    sa.Column('v2', sa.String(length=255), nullable=True),
    sa.Column('v3', sa.String(length=255), nullable=True),
    sa.Column('v4', sa.String(length=255), nullable=True),
    sa.Column('v5', sa.String(length=255), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_casbin_rule'))
    )
    op.create_table('departments',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_departments')),
    sa.UniqueConstraint('name', name=op.f('uq_departments_name'))
    )
    op.create_table('retrieval_events',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('request_id', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('event_type', sa.String(length=32), nullable=False),
    sa.Column('subject', sa.String(length=255), nullable=False),
    sa.Column('groups', sa.JSON(), nullable=False),
    sa.Column('departments_requested', sa.JSON(), nullable=False),
    sa.Column('departments_searched', sa.JSON(), nullable=False),
    sa.Column('decision', sa.String(length=32), nullable=False),
    sa.Column('reason', sa.String(length=255), nullable=True),
    sa.Column('chunks', sa.JSON(), nullable=False),
    sa.Column('question_masked', sa.Text(), nullable=False),
    sa.Column('purpose', sa.String(length=255), nullable=True),
    sa.Column('latency_ms', sa.Double(), nullable=False),
    sa.Column('prev_hash', sa.String(length=64), nullable=False),
    sa.Column('hash', sa.String(length=64), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_retrieval_events'))
    )
    with op.batch_alter_table('retrieval_events', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_retrieval_events_created_at'), ['created_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_retrieval_events_request_id'), ['request_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_retrieval_events_subject'), ['subject'], unique=False)

    op.create_table('wrapped_keys',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('owner', sa.String(length=64), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('parent_version', sa.Integer(), nullable=False),
    sa.Column('wrapped', sa.LargeBinary(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_wrapped_keys')),
    sa.UniqueConstraint('kind', 'owner', 'version', name=op.f('uq_wrapped_keys_kind'))
    )
    op.create_table('documents',
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('department', sa.String(length=64), nullable=False),
    sa.Column('title', sa.String(length=300), nullable=False),
    sa.Column('content_type', sa.String(length=120), nullable=False),
    sa.Column('size_bytes', sa.Integer(), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('acl_groups', sa.JSON(), nullable=False),
    sa.Column('classification', sa.String(length=32), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('chunk_count', sa.Integer(), nullable=False),
    sa.Column('uploaded_by', sa.String(length=255), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['department'], ['departments.name'], name=op.f('fk_documents_department_departments')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_documents'))
    )
    with op.batch_alter_table('documents', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_documents_department'), ['department'], unique=False)

    op.create_table('ingestion_jobs',
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('document_id', sa.String(length=36), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['document_id'], ['documents.id'], name=op.f('fk_ingestion_jobs_document_id_documents'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_ingestion_jobs'))
    )
    with op.batch_alter_table('ingestion_jobs', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_ingestion_jobs_document_id'), ['document_id'], unique=False)



def data_at_risk(connection: sa.Connection) -> list[str]:
    """What undoing this revision would delete (the p rows are the default policy a later downgrade wrote)."""
    return rows_at_risk(connection, [
        ("departments", "departments", ""), ("documents", "documents", ""),
        ("ingestion jobs", "ingestion_jobs", ""), ("wrapped keys", "wrapped_keys", ""),
        ("role grants", "casbin_rule", "ptype = 'g'"), ("ledger events", "retrieval_events", ""),
    ])


def downgrade() -> None:
    with op.batch_alter_table('ingestion_jobs', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_ingestion_jobs_document_id'))

    op.drop_table('ingestion_jobs')
    with op.batch_alter_table('documents', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_documents_department'))

    op.drop_table('documents')
    op.drop_table('wrapped_keys')
    with op.batch_alter_table('retrieval_events', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_retrieval_events_subject'))
        batch_op.drop_index(batch_op.f('ix_retrieval_events_request_id'))
        batch_op.drop_index(batch_op.f('ix_retrieval_events_created_at'))

    op.drop_table('retrieval_events')
    op.drop_table('departments')
    op.drop_table('casbin_rule')
