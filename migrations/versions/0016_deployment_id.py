"""the database records a random deployment id, which every audit checkpoint and export manifest signs

A checkpoint signed the chain's position only: two deployments sharing a checkpoint key (the same
GOVRAG_AUDIT_CHECKPOINT_KEY, or a master key copied to staging) each took the other's checkpoints and, once exports
were signed, exports as their own. Checkpoints signed from this revision on carry the id (`v2.` signatures); the
ones signed before it keep verifying as they were signed.

Undoing this revision deletes the id, which the signatures made since cannot be checked without: it is refused while
a checkpoint signed with it is stored.

Revision ID: 0016
Revises: 0015
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from core.migrate import rows_at_risk

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None


# The id (a random UUID, version 4, as uuid.uuid4() writes it) and the time, made by the database as the row is written
_NEW_ID = {
    "postgresql": "gen_random_uuid()::text",
    "sqlite": "lower(hex(randomblob(4))) || '-' || lower(hex(randomblob(2))) || '-4' || substr(lower(hex(randomblob(2))), "
              "2) || '-' || substr('89ab', 1 + (random() & 3), 1) || substr(lower(hex(randomblob(2))), 2) || '-' || "
              "lower(hex(randomblob(6)))",
}
_NOW = {"postgresql": "now()", "sqlite": "strftime('%Y-%m-%d %H:%M:%f', 'now') || '000'"}  # SQLAlchemy's format


def upgrade() -> None:
    op.create_table(
        "deployment",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("deployment_id", sa.String(length=36), nullable=False),
        sa.Column("minted_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_deployment")),
    )
    # Minted in SQL, not in Python: a script written as SQL (`--sql`) mints an id of its own, when it runs, in each
    # database it is applied to, rather than carrying one fixed when it was written (two deployments sharing it)
    dialect = op.get_context().dialect.name
    op.execute(f"INSERT INTO deployment (id, deployment_id, minted_at) VALUES (1, {_NEW_ID[dialect]}, {_NOW[dialect]})")


def data_at_risk(connection: sa.Connection) -> list[str]:
    """What undoing this revision would lose: the id the checkpoints signed since are checked with."""
    return rows_at_risk(connection, [("audit checkpoints signed with the deployment id", "audit_checkpoints",
                                      "signature LIKE 'v2.%'")])


def downgrade() -> None:
    op.drop_table("deployment")
