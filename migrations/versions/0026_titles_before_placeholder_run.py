"""titles stored with a value before a capitalised extension chain taken for names have that value redacted

Before guard/pii.py's `title_readings` read a capitalised chain of known extensions (`.Pdf.Gpg`, `.Backup.Old`) and
`_kept_in_title` dropped a name that is such an extension alone, the NER could take the links of such a chain for
names, and the value they hid was stored raw before them: `Claim of maria@example.com.Pdf.Gpg` stored as `Claim of
maria@example.com.<PERSON>.<PERSON>`, `maria@example.com.Backup.Old` as `maria@example.com.<PERSON>.<PERSON>` (the
address's end was `.com.Pdf.Gpg` to the e-mail recognizer, no top-level name). Such a title now ends in `>`: no
apparent extension, so 0023 and 0025 leave it, and a run applies only the department's recognizers to it again.

Only a live document (neither deleted nor rejected) whose title ends in a run of placeholders each after a dot
(`.<PERSON>`, once or more; of any type, `.<PERSON>.<STAFF_HANDLE>`: any placeholder there replaced what followed a
dot, and hid the end of what precedes it just as well) can hold one; every other title is left byte for byte, and
the PII model loads only when such a title exists (`upgrade_titles`). Such a title is read without that run, and
without each link of it in turn as the readings of a chain (`placeholder_run_readings`), by the value recognizers
alone (no NER), and only the values found there are replaced, each by its type placeholder
(`PiiRedactor.redact_title_before_placeholder_run`):

- under the default entity set plus the department's own recognizers and allow-list as when the title was set, as
  0023 and 0025 do: an allow-listed value is kept;
- no name: the NER would read the title's placeholders as context and take a word beside one for a name (it takes
  `Rivera` in `Notes for <PERSON> Rivera at maria@example.com`), and nothing says a name was hidden there (the
  chain's links were taken for names, the words before them were read whole);
- never a span over a placeholder the title already holds.

A title redacted longer than the column is cut as a title is when it is set. A department's policy row the API would
not have saved stops the revision with one line naming the department, as 0023's and 0025's do. Written as SQL
(`--sql`), the script fails on a database holding a live title ending in '>' and holding '.<' (`offline_guard`):
such a database takes this revision from govrag (README, Schema as SQL).

Revision ID: 0026
Revises: 0025
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from migrations.stored_titles import LIVE, upgrade_titles

if TYPE_CHECKING:
    from guard.pii_rules import RedactionRules

revision = "0026"
down_revision = "0025"
branch_labels = None
depends_on = None

OFFLINE_GUARD = "apply_0026_with_govrag_to_redact_titles"  # the constraint a script written as SQL fails on
# The live documents whose title may end in a run of placeholders each after a dot: it ends in '>' and holds '.<', the
# same in the Python run and in the guard of the script written as SQL, in both databases (no LIKE: the PostgreSQL
# script would show each % doubled).
_MAY_END_IN_PLACEHOLDERS = f"{LIVE} AND substr(title, length(title), 1) = '>' AND replace(title, '.<', '') <> title"


def upgrade() -> None:
    """Written as SQL (`--sql`), the script fails on a database holding a live document whose title ends in '>' and
    holds '.<'. A title with no such run (one reading) is left as it is: no model to load."""
    upgrade_titles(revision, _MAY_END_IN_PLACEHOLDERS, min_readings=2, readings=_readings, redact=_redacted,
                   guard=OFFLINE_GUARD, comment=(
        "Revision 0026 redacts, with govrag's PII model, which SQL cannot do, the values before a run of\n"
        "placeholders ending the titles of documents (neither deleted nor rejected), stored when a capitalised\n"
        "extension chain (.Pdf.Gpg) was taken for names. The statements below fail (check constraint\n"
        f"{OFFLINE_GUARD}) if the database holds a title ending in '>' and holding '.<' in such a\n"
        "document: apply revision 0026 with govrag instead (README, Schema as SQL)."))


def _readings(title: str) -> list[str]:
    """`title`, then without each placeholder of the run ending it (no model: that loads at the first title
    redacted)."""
    from guard.pii import placeholder_run_readings

    return placeholder_run_readings(title)


def _redacted(title: str, rules: RedactionRules) -> str:
    """`title` with the values before the run of placeholders ending it replaced."""
    from guard.pii import get_redactor  # loaded only when a database holds one

    return get_redactor().redact_title_before_placeholder_run(title, rules)


def downgrade() -> None:
    """The raw values are gone: nothing to restore."""
