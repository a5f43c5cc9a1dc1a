"""audit checkpoints are signed with Ed25519 beside the HMAC, so the public key alone checks them

A checkpoint carried an HMAC only: checking it, in the database or in the mirror file, took the checkpoint key, which
also signs. Checkpoints signed from this revision on carry an Ed25519 signature too (base64, the key derived from the
checkpoint key as the export manifests' is), over their `v3.` statement, which names that key: one whose Ed25519
signature is removed fails. The ones signed before it (`v2.` or v1, HMAC only) keep verifying as they were signed.

Undoing this revision deletes the Ed25519 signatures, without which the `v3.` checkpoints cannot be checked: it is
refused while one is stored.

Revision ID: 0019
Revises: 0018
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from core.migrate import rows_at_risk

revision = "0019"
down_revision = "0018"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("audit_checkpoints") as table:
        table.add_column(sa.Column("signature_ed25519", sa.String(length=88), nullable=True))


def data_at_risk(connection: sa.Connection) -> list[str]:
    """What undoing this revision would lose: the Ed25519 signatures the `v3.` checkpoints are checked with."""
    return rows_at_risk(connection, [("audit checkpoints signed with Ed25519", "audit_checkpoints",
                                      "signature_ed25519 IS NOT NULL")])


def downgrade() -> None:
    with op.batch_alter_table("audit_checkpoints") as table:
        table.drop_column("signature_ed25519")
