"""What the revisions that redact stored titles again (0023, 0025, 0026) share (`upgrade_titles`): the live documents'
titles read in batches by id, each under its department's redaction rules as its policy row holds them
(`department_rules`), and written back only when the redaction changed them, cut to the column's length as a title is
when it is set; or, written as SQL, the guard that fails the script where such a title may be (`offline_guard`).

guard.pii and ingestion are imported only once a title is to be read: Alembic imports every revision's module for
every upgrade, and a database holding no such title loads no model."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import sqlalchemy as sa
from alembic import context, op

from core.migrate import MigrationError, offline_guard

if TYPE_CHECKING:
    from guard.pii_rules import RedactionRules

BATCH = 500
MAX_TITLE_CHARS = 300  # documents.title's length
LIVE = "status NOT IN ('deleted', 'rejected')"  # a retired document's title is "(deleted)" or "(rejected)" (0010)
_POLICIES = sa.table("ingestion_policies", sa.column("department", sa.String),
                     sa.column("allow_list", sa.JSON), sa.column("recognizers", sa.JSON))


def upgrade_titles(revision: str, where: str, *, min_readings: int, redact: Callable[[str, RedactionRules], str],
                   guard: str, comment: str, readings: Callable[[str], list[str]] | None = None) -> None:
    """A revision's upgrade redacting stored titles: run, `_redact_stored_titles`; written as SQL (`--sql`), where no
    SQL can read a title with the PII model, `offline_guard` on the same documents (`where`), failing on the check
    constraint `guard` if one is there, the script saying why (`comment`)."""
    if context.is_offline_mode():
        offline_guard(revision, guard, where, comment)
    else:
        _redact_stored_titles(op.get_bind(), revision, where, min_readings=min_readings, redact=redact,
                              readings=readings or _title_readings)


def _redact_stored_titles(connection: sa.Connection, revision: str, where: str, *, min_readings: int,
                         redact: Callable[[str, RedactionRules], str], readings: Callable[[str], list[str]]) -> None:
    """Each title of a document matching the SQL condition `where` (of live ones, `LIVE`: the condition the revision's
    script written as SQL checks too, `offline_guard`) with at least `min_readings` `readings` (by default guard.pii's
    `title_readings`: 2, an apparent extension; 3, a chain of them), given to `redact` with its department's rules
    (`department_rules`, read once a department, only for such a title). A title `redact` returns as it is stays byte
    for byte; another is cut to the column's length as a title is when it is set."""
    rules: dict[str, RedactionRules] = {}
    after = ""
    while rows := connection.execute(sa.text(
            f"SELECT id, department, title FROM documents WHERE id > :after AND ({where}) "  # noqa: S608
            "ORDER BY id LIMIT :batch"), {"after": after, "batch": BATCH}).all():
        for document_id, department, title in rows:
            if len(readings(title)) < min_readings:
                continue
            if department not in rules:
                rules[department] = department_rules(connection, revision, department)
            redacted = redact(title, rules[department])
            if redacted != title:
                connection.execute(sa.text("UPDATE documents SET title = :title WHERE id = :id"),
                                   {"title": _cut(redacted, rules[department]), "id": document_id})
        after = rows[-1][0]


def _title_readings(title: str) -> list[str]:
    from guard.pii import title_readings  # no model: that loads at the first title redacted (`get_redactor`)

    return title_readings(title)


def _cut(title: str, rules: RedactionRules) -> str:
    from guard.pii import REDACTED_ENTITIES
    from ingestion.classify import cut_title

    return cut_title(title, MAX_TITLE_CHARS, [*REDACTED_ENTITIES, *rules.entities])


def department_rules(connection: sa.Connection, revision: str, department: str) -> RedactionRules:
    """The department's redaction rules, as its policy row holds them at `revision`. A row the API would not have
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
        raise MigrationError(f"revision {revision}: the ingestion policy of department {department!r} cannot be "
                             f"applied to its titles (its recognizers or allow-list: {problem}); correct its row in "
                             "ingestion_policies, then migrate again")
    return rules
