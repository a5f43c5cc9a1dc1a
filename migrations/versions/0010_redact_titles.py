"""titles stored before their PII was redacted are redacted; retired documents forget what named their original

A title (from the upload form, the file's name, an e-mail attachment's name) was stored as given and shown to readers
beside redacted text; a deleted or rejected document's row kept its title and its original's sha256. Titles are now
redacted when they are set, and retirement clears that metadata (ingestion/service.py, ingestion/purge.py): this
brings rows written before up to date. Titles are redacted with the default entity set (a department's own
recognizers and allow-list are not applied to them). The PII model loads only when there is a title to read.

Revision ID: 0010
Revises: 0009
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op

from core.migrate import offline_guard

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

_BATCH = 500
_RETIRED = ("deleted", "rejected")
OFFLINE_GUARD = "apply_0010_with_govrag_to_redact_titles"  # the constraint a script written as SQL fails on


def upgrade() -> None:
    for status in _RETIRED:
        op.execute(sa.text("UPDATE documents SET title = :title, sha256 = '', size_bytes = 0, content_type = '' "
                           "WHERE status = :status").bindparams(title=f"({status})", status=status))
    if context.is_offline_mode():
        _refuse_titles_to_redact()
    else:
        _redact_titles(op.get_bind())


def _redact_titles(connection: sa.Connection) -> None:
    after = ""
    while rows := connection.execute(sa.text(
            "SELECT id, title FROM documents WHERE id > :after AND status NOT IN ('deleted', 'rejected') "
            "ORDER BY id LIMIT :batch"), {"after": after, "batch": _BATCH}).all():
        for document_id, title in rows:
            redacted = _redacted(title)
            if redacted != title:
                connection.execute(sa.text("UPDATE documents SET title = :title WHERE id = :id"),
                                   {"title": redacted, "id": document_id})
        after = rows[-1][0]


def _refuse_titles_to_redact() -> None:
    """Written as SQL (`--sql`): the titles are redacted by the PII model, in Python, which no SQL can do; the script
    fails on a database holding a document whose title would be read (`offline_guard`)."""
    offline_guard(revision, OFFLINE_GUARD, "status NOT IN ('deleted', 'rejected')",
                  "Revision 0010 redacts the PII in the titles of documents (neither deleted nor rejected) with "
                  "govrag's PII\nmodel, which SQL cannot do. The statements below fail (check constraint "
                  f"{OFFLINE_GUARD})\nif the database holds such a document: apply revision 0010 with govrag instead "
                  "(README, Schema as SQL).")


def _redacted(title: str) -> str:
    from guard.pii import get_redactor  # loaded only when a database holds documents

    return get_redactor().redact_title(title).strip()[:300] or "untitled"


def downgrade() -> None:
    """The raw titles and hashes are gone: nothing to restore."""
