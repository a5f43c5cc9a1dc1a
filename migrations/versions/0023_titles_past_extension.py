"""titles stored with a value ending in what looks like a file extension have that value redacted

Until guard/pii.py's `_kept_in_title`, a title was redacted without every span reaching past the start of what looks
like a file extension, so a value ending a title was stored as given: the e-mail address of `Claim of
maria.gonzalez@example.com` (its `.com`), the IP address of `Access from 10.0.0.1` (its `.1`), a department's handle
`maria.gonzalez`. A run applies only the department's recognizers again to a stored title, so those rows keep them:
this redacts exactly those spans (`PiiRedactor.redact_title_past_extension`), not the whole title again (the models
would read its placeholders as context and take a word beside one for a name), and no name: not one wholly after
the dot either (`<PERSON>.Smith`), which that rule left too. Titles are read with the default
entity set plus the department's own recognizers and allow-list, as they were when they were set (0010's were
without: they were redacted again with the department's at their next run): a department's handle was left so too,
and an allow-listed value is kept. Only a title holding a '.' can look like it ends in an extension; the PII model
loads only when one does.

Revision ID: 0023
Revises: 0022
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from migrations.stored_titles import LIVE, upgrade_titles

if TYPE_CHECKING:
    from guard.pii_rules import RedactionRules

revision = "0023"
down_revision = "0022"
branch_labels = None
depends_on = None

OFFLINE_GUARD = "apply_0023_with_govrag_to_redact_titles"  # the constraint a script written as SQL fails on
# The live documents whose title may end in what looks like a file extension (guard.pii's `_FILE_EXTENSION` starts
# with a dot), the same in the Python run and in the guard of the script written as SQL. A dot found by replace(), in
# both databases, not by LIKE '%.%': the PostgreSQL script would show each % doubled.
_MAY_HAVE_EXTENSION = f"{LIVE} AND replace(title, '.', '') <> title"


def upgrade() -> None:
    """Written as SQL (`--sql`), the script fails on a database holding a live document whose title holds a '.'. A
    title with no apparent extension (one reading) has no such span: no model to load."""
    upgrade_titles(revision, _MAY_HAVE_EXTENSION, min_readings=2, redact=_redacted, guard=OFFLINE_GUARD, comment=(
        "Revision 0023 redacts, with govrag's PII model, which SQL cannot do, the values ending the titles of\n"
        "documents (neither deleted nor rejected) that were kept as what looked like a file extension. The\n"
        f"statements below fail (check constraint {OFFLINE_GUARD}) if the database holds a title with a '.'\n"
        "in such a document: apply revision 0023 with govrag instead (README, Schema as SQL)."))


def _redacted(title: str, rules: RedactionRules) -> str:
    """`title` with the values it was stored with past its apparent extension replaced."""
    from guard.pii import get_redactor  # loaded only when a database holds one

    return get_redactor().redact_title_past_extension(title, rules)


def downgrade() -> None:
    """The raw values are gone: nothing to restore."""
