"""One shape of a redaction placeholder: what guard/pii.py mints, every reader takes for one."""

from __future__ import annotations

import pytest

from guard.pii import Numbering, PlaceholderMap, type_placeholder
from guard.pii_rules import CustomRecognizer, validate_custom
from guard.placeholders import NUMBERED, UNNUMBERED, document_placeholder, is_placeholder, qualify


@pytest.mark.parametrize("entity_type", ["PERSON", "US_BANK_NUMBER", "EMP2", "E2_ID_9", "X" * 41])
def test_what_redaction_mints_every_reader_takes_for_a_placeholder(entity_type: str) -> None:
    assert validate_custom(CustomRecognizer(entity=entity_type, pattern=r"\d{6}")) is None  # a type one may name
    minted = PlaceholderMap().placeholder_for(entity_type, "value")
    shown = qualify(f"{minted} said so", 12).split()[0]  # as an answer citing several documents shows it
    assert shown == f"{minted[:-1]}·12>"
    assert NUMBERED.fullmatch(minted).group("type") == entity_type  # type: ignore[union-attr]
    assert is_placeholder(minted) and is_placeholder(shown)
    assert document_placeholder(shown) == document_placeholder(minted) == minted
    assert UNNUMBERED.fullmatch(type_placeholder(entity_type, "value")).group("type") == entity_type  # type: ignore[union-attr]


@pytest.mark.parametrize("entity_type", ["X", "X" * 42, "EMP-2", "emp2", "2EMP"])
def test_a_type_no_department_may_name_is_no_placeholder(entity_type: str) -> None:
    assert validate_custom(CustomRecognizer(entity=entity_type, pattern=r"\d{6}")) is not None
    assert not is_placeholder(f"<{entity_type}_1>") and NUMBERED.fullmatch(f"<{entity_type}_1>") is None


def test_a_map_seeded_with_an_earlier_numbering_keeps_its_numbers_and_tells_this_run_alone() -> None:
    """A re-index numbered from 1 again: one more person found earlier in the text shifted every `<PERSON_N>`, and
    an older answer's placeholder was revealed as another person. Seeded with the earlier run's numbering, a value it
    numbered keeps its placeholder and a new one comes after the highest ever minted (a retired number included);
    the counts, the mapping and the numbering to seal hold only the values this run saw."""
    earlier = Numbering(placeholders={"<PERSON_1>": "Maria Gonzalez", "<PERSON_2>": "John Smith",
                                      "<EMAIL_ADDRESS_1>": "maria@example.com"},
                        highest={"PERSON": 3, "EMAIL_ADDRESS": 1})  # <PERSON_3>: a value no longer detected
    placeholders = PlaceholderMap(earlier)
    assert placeholders.placeholder_for("PERSON", "Omar Haddad") == "<PERSON_4>"  # first in the text, numbered after
    assert placeholders.placeholder_for("PERSON", "JOHN  smith") == "<PERSON_2>"
    assert placeholders.placeholder_for("PERSON", "Maria") == "<PERSON_1>"  # "Maria Gonzalez", as numbered before
    assert placeholders.placeholder_for("PERSON", "Maria Gonzalez") == "<PERSON_1>"
    assert placeholders.placeholder_for("EMAIL_ADDRESS", "omar@example.com") == "<EMAIL_ADDRESS_2>"
    assert placeholders.counts() == {"PERSON": 3, "EMAIL_ADDRESS": 1}  # this run's values: the level's input
    assert placeholders.mapping() == {"<PERSON_4>": "Omar Haddad", "<PERSON_2>": "JOHN  smith", "<PERSON_1>": "Maria",
                                      "<EMAIL_ADDRESS_2>": "omar@example.com"}  # maria@example.com: not seen now
    sealed = placeholders.numbering()
    assert sealed.placeholders == placeholders.mapping() and sealed.highest == {"PERSON": 4, "EMAIL_ADDRESS": 2}
    assert Numbering.from_json(sealed.to_json()) == sealed
    assert "Maria" not in repr(sealed) and "Omar" not in repr(placeholders)


def test_a_map_seeded_from_a_map_kept_before_numbers_were_continues_after_its_placeholders() -> None:
    """A sealed map written before the highest numbers were kept is the placeholders alone."""
    earlier = Numbering.from_json(b'{"<PERSON_2>": "John Smith", "<EMP2_1>": "EMP-123455"}')
    assert earlier.placeholders == {"<PERSON_2>": "John Smith", "<EMP2_1>": "EMP-123455"}
    placeholders = PlaceholderMap(earlier)
    assert placeholders.placeholder_for("PERSON", "Maria Gonzalez") == "<PERSON_3>"
    assert placeholders.placeholder_for("EMP2", "EMP-000018") == "<EMP2_2>"
    assert placeholders.placeholder_for("EMP2", "EMP-123455") == "<EMP2_1>"


def test_a_first_name_matching_two_people_gets_a_number_of_its_own_when_one_was_numbered_before() -> None:
    """"Maria" is the same person as the one "Maria …" seen, in this run or numbered before; with one of each it
    could be either, and gets a number of its own rather than the wrong person's."""
    placeholders = PlaceholderMap(Numbering(placeholders={"<PERSON_1>": "Maria Gonzalez"}))
    assert placeholders.placeholder_for("PERSON", "Maria Lopez") == "<PERSON_2>"
    assert placeholders.placeholder_for("PERSON", "Maria") == "<PERSON_3>"
    assert placeholders.placeholder_for("PERSON", "Maria Gonzalez") == "<PERSON_1>"


def test_two_people_with_one_first_name_never_share_a_placeholder_the_first_name_alone_was_given() -> None:
    """A placeholder first given to "Maria" alone took every "Maria …" after it: "Maria Gonzalez" (that Maria,
    perhaps) and then "Maria Lopez" too, two people under one `<PERSON_1>` (revealed as Maria Gonzalez, counted as
    one), and across runs too, an earlier run's "Maria" drawing both into its number. A name now joins a placeholder
    only when it fits every name the placeholder already stands for; a name keeps the placeholder it was given."""
    seeded = PlaceholderMap(Numbering(placeholders={"<PERSON_1>": "Maria"}))
    assert [seeded.placeholder_for("PERSON", name) for name in ("Maria Gonzalez", "Maria Lopez", "Maria")] == [
        "<PERSON_1>", "<PERSON_2>", "<PERSON_1>"]
    assert seeded.counts() == {"PERSON": 2}
    fresh = PlaceholderMap()
    assert [fresh.placeholder_for("PERSON", name) for name in ("Maria", "Maria Gonzalez", "Maria Lopez", "Maria")] == [
        "<PERSON_1>", "<PERSON_1>", "<PERSON_2>", "<PERSON_1>"]
    assert fresh.counts() == {"PERSON": 2} and len(fresh) == 2
    ordered = PlaceholderMap()
    assert [ordered.placeholder_for("PERSON", name) for name in ("Maria Gonzalez", "Maria", "Maria Lopez", "Maria")
            ] == ["<PERSON_1>", "<PERSON_1>", "<PERSON_2>", "<PERSON_1>"]  # "Maria" was <PERSON_3> the second time
