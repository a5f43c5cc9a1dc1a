"""a verifier per master key version in use, so a wrong master key is refused before any department key is stored

The master key check (core/keystore.py) unwrapped one stored department or checkpoint key per master version: with
none stored yet (no department made), any master key passed it, and the first department's key was wrapped under
the wrong one. Each master version in use now has a fixed text sealed under it (AES-GCM, the version in its associated
data): written at the first start (for the versions of the stored keys it has just opened, or the newest version
when nothing is stored yet), when a version first wraps a key, and by a master rotation for its new version; dropped
when a rotation retires the version.

Undoing this revision loses only the verifiers: the next start after upgrading again writes them for the keys it
opens (with no department key stored, for its own master key, unchecked).

Revision ID: 0018
Revises: 0017
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0018"
down_revision = "0017"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "master_key_verifiers",
        sa.Column("version", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("sealed", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("version", name=op.f("pk_master_key_verifiers")),
    )


def downgrade() -> None:
    op.drop_table("master_key_verifiers")
