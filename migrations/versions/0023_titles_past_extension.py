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

import sqlalchemy as sa
from alembic import context, op

from core.migrate import MigrationError, offline_guard

if TYPE_CHECKING:
    from guard.pii_rules import RedactionRules

revision = "0023"
down_revision = "0022"
branch_labels = None
depends_on = None

_BATCH = 500
_MAX_TITLE_CHARS = 300  # documents.title's length
OFFLINE_GUARD = "apply_0023_with_govrag_to_redact_titles"  # the constraint a script written as SQL fails on
# The live documents whose title may end in what looks like a file extension (guard.pii's `_FILE_EXTENSION` starts
# with a dot), the same in the Python run and in the guard of the script written as SQL. A dot found by replace(), in
# both databases, not by LIKE '%.%': the PostgreSQL script would show each % doubled.
_MAY_HAVE_EXTENSION = "status NOT IN ('deleted', 'rejected') AND replace(title, '.', '') <> title"
_POLICIES = sa.table("ingestion_policies", sa.column("department", sa.String),
                     sa.column("allow_list", sa.JSON), sa.column("recognizers", sa.JSON))


def upgrade() -> None:
    if context.is_offline_mode():
        _refuse_titles_to_redact()
    else:
        _redact_titles(op.get_bind())


def _redact_titles(connection: sa.Connection) -> None:
    rules: dict[str, RedactionRules] = {}
    after = ""
    while rows := connection.execute(sa.text(
            f"SELECT id, department, title FROM documents WHERE id > :after AND {_MAY_HAVE_EXTENSION} "  # noqa: S608
            "ORDER BY id LIMIT :batch"), {"after": after, "batch": _BATCH}).all():
        for document_id, department, title in rows:
            redacted = _redacted(connection, rules, department, title)
            if redacted != title:
                connection.execute(sa.text("UPDATE documents SET title = :title WHERE id = :id"),
                                   {"title": redacted, "id": document_id})
        after = rows[-1][0]


def _redacted(connection: sa.Connection, rules: dict[str, RedactionRules], department: str, title: str) -> str:
    """`title` with the values it was stored with past its apparent extension replaced, cut to the column's length
    as a title is when it is set."""
    from guard.pii import REDACTED_ENTITIES, get_redactor, title_readings  # loaded only when a database holds one
    from ingestion.classify import cut_title

    if len(title_readings(title)) == 1:  # no apparent extension: no model to load
        return title
    if department not in rules:
        rules[department] = _rules_of(connection, department)
    redacted = get_redactor().redact_title_past_extension(title, rules[department])
    return cut_title(redacted, _MAX_TITLE_CHARS, [*REDACTED_ENTITIES, *rules[department].entities])


def _rules_of(connection: sa.Connection, department: str) -> RedactionRules:
    """The department's redaction rules, as its policy row holds them at this revision. A row the API would not have
    saved (edited by hand: a recognizer missing its pattern, one that does not compile) is MigrationError naming the
    department, the revision undone: its titles cannot be read as they were set, and the API, which cannot start
    before the upgrade, cannot mend it."""
    from guard.pii_rules import RedactionRules, validate_custom
    from ingestion import quarantine
    from ingestion.schemas import CustomRecognizerIn

    row = connection.execute(sa.select(_POLICIES.c.allow_list, _POLICIES.c.recognizers)
                             .where(_POLICIES.c.department == department)).first()
    if row is None:
        return RedactionRules()
    try:
        rules = quarantine.redaction_rules(recognizers=[CustomRecognizerIn(**spec) for spec in row.recognizers or []],
                                           allow_list=list(row.allow_list or []))
        problem = next((problem for spec in rules.recognizers if (problem := validate_custom(spec))), None)
    except (TypeError, ValueError) as error:  # pydantic's ValidationError is a ValueError; its text quotes the row
        problem = f"unreadable ({type(error).__name__})"
    if problem is not None:
        raise MigrationError(f"revision 0023: the ingestion policy of department {department!r} cannot be applied to "
                             f"its titles (its recognizers or allow-list: {problem}); correct its row in "
                             "ingestion_policies, then migrate again")
    return rules


def _refuse_titles_to_redact() -> None:
    """Written as SQL (`--sql`): the titles are read by the PII model, in Python, which no SQL can do; the script
    fails on a database holding a live document whose title holds a '.' (`offline_guard`)."""
    offline_guard(revision, OFFLINE_GUARD, _MAY_HAVE_EXTENSION,
                  "Revision 0023 redacts, with govrag's PII model, which SQL cannot do, the values ending the titles "
                  "of\ndocuments (neither deleted nor rejected) that were kept as what looked like a file extension. "
                  f"The\nstatements below fail (check constraint {OFFLINE_GUARD}) if the database holds a title with "
                  "a '.'\nin such a document: apply revision 0023 with govrag instead (README, Schema as SQL).")


def downgrade() -> None:
    """The raw values are gone: nothing to restore."""
