"""titles stored with a value hidden by a compound file extension have that value redacted

Until guard/pii.py's `title_readings` read a title without each extension of a chain (`.tar.gz.001`), a
title was read as it is and without its last extension alone, so a value the chain hid was stored as given: the
address of `maria@example.com.tar.gz` or `Claim of maria@example.com.pdf.gpg` (neither `.gz` nor `.tar`, `.gpg` nor
`.pdf` is a top-level name), one under a private name (`anna.berg@ops.acme.internal.tar.gz`), a department's value
its pattern finds only at the end of the stem, and the word of a name the NER cut off at the inner extension (`Horak`
of `<PERSON> Horak.docx.enc`, stored for `Jan Horak.docx.enc`, `Brian` of `Meeting notes Brian.docx.enc`). 0023 reads
a stored title as it is, and a run applies only the department's recognizers again: those rows keep them. So do
the titles stored while a chain was read at most three extensions deep and in one case alone (the address of
`maria@example.com.backup.old.tar.gz`, of `maria@example.com.Pdf.Gpg`): the readings this revision adds are those of
`title_readings` as it reads a title now (to the chain's start, up to eight, a known extension in any case).

Only a live document (neither deleted nor rejected) whose title ends in a chain of two or more apparent extensions
(three readings or more) can hold one; every other title is left byte for byte, and the PII model loads only when
such a title exists (`upgrade_titles`). Such a title is read again only in the readings the rule before did not
read, `readings[2:]` (the title without two extensions, three, and so on to its stem), as a title set now is read (the
NER reads the stem alone, the value recognizers each reading), and only the spans found there are replaced, each by
its type placeholder (`PiiRedactor.redact_title_before_compound_extension`):

- values found by a pattern (an address, a department's recognizer), under the default entity set plus the
  department's own recognizers and allow-list as when the title was set: an allow-listed value is kept;
- names too (those the NER finds in the stem), unlike 0023: a stored title holds placeholders, and the NER reads
  one as context and may take a word beside it for a name (`Minutes` of `Minutes <PERSON> Board.tar.gz`), but here the
  word beside it is most often the rest of the very name the rule before cut (`<PERSON> Horak`): a word of a name
  left raw is worse than a word over-redacted;
- never a span over a placeholder the title already holds (a department pattern may match `PERSON` in `<PERSON>`):
  what was redacted is not redacted again; nor a name crossing into the chain (`_kept_in_title`, as for a title set
  now).

A title redacted longer than the column is cut as a title is when it is set. A department's policy row the API would
not have saved stops the revision with one line naming the department, as 0023's does. Written as SQL (`--sql`), the
script fails on a database holding a live title with two dots or more (`offline_guard`): such a database takes this
revision from govrag (README, Schema as SQL).

Revision ID: 0025
Revises: 0024
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from migrations.stored_titles import LIVE, upgrade_titles

if TYPE_CHECKING:
    from guard.pii_rules import RedactionRules

revision = "0025"
down_revision = "0024"
branch_labels = None
depends_on = None

OFFLINE_GUARD = "apply_0025_with_govrag_to_redact_titles"  # the constraint a script written as SQL fails on
# The live documents whose title may end in a chain of file extensions: two dots or more (each extension starts with
# one), the same in the Python run and in the guard of the script written as SQL, in both databases.
_MAY_HAVE_CHAIN = f"{LIVE} AND length(title) - length(replace(title, '.', '')) >= 2"


def upgrade() -> None:
    """Written as SQL (`--sql`), the script fails on a database holding a live document whose title holds two dots or
    more. A title read in fewer than three readings (no chain) was read whole before: no model to load."""
    upgrade_titles(revision, _MAY_HAVE_CHAIN, min_readings=3, redact=_redacted, guard=OFFLINE_GUARD, comment=(
        "Revision 0025 redacts, with govrag's PII model, which SQL cannot do, the values hidden by a compound file\n"
        "extension (.tar.gz, .pdf.gpg) in the titles of documents (neither deleted nor rejected). The statements\n"
        f"below fail (check constraint {OFFLINE_GUARD}) if the database holds a title with two dots\n"
        "or more in such a document: apply revision 0025 with govrag instead (README, Schema as SQL)."))


def _redacted(title: str, rules: RedactionRules) -> str:
    """`title` with the values its compound extension hid replaced."""
    from guard.pii import get_redactor  # loaded only when a database holds one

    return get_redactor().redact_title_before_compound_extension(title, rules)


def downgrade() -> None:
    """The raw values are gone: nothing to restore."""
