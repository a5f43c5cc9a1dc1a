"""One shape of a redaction placeholder: what guard/pii.py mints, every reader takes for one."""

from __future__ import annotations

import pytest

from guard.pii import PlaceholderMap, type_placeholder
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
