"""Rule-based PII additions: people named by context, phone shapes, department recognizers, allow-lists."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
from presidio_analyzer import RecognizerResult

from guard.pii import PiiRedactor, PlaceholderMap, get_redactor
from guard.pii_rules import (
    CustomRecognizer,
    RedactionRules,
    drop_non_people,
    drop_street_names,
    luhn_valid,
    mod11_valid,
    mod97_valid,
    validate_custom,
)


@pytest.fixture(scope="module")
def redactor() -> PiiRedactor:
    return get_redactor()


@pytest.mark.parametrize(("text", "name"), [
    ("My name is Rubija and I need help.", "Rubija"),
    ("Please forward it to Dr. Kyle Kuefer today.", "Kyle Kuefer"),
    ("Ubul: What a wife.\nNicole: Remember me?", "Ubul"),
    ("Our founders: Kónya, Becker and Vasquez.", "Becker"),
    ("follow up with patricia desrosiers next week.", "patricia desrosiers"),
])
def test_people_named_by_context(redactor: PiiRedactor, text: str, name: str) -> None:
    redacted = redactor.redact(text)
    assert name not in redacted and "<PERSON_" in redacted


@pytest.mark.parametrize("text", [
    "Phone:\n0490 75 40 81",
    "Desk: +41 (0)96 471 07 95",
    "They're not answering at 78 651 450",
    "Call (08) 8747 6301 after lunch.",
    "Jane Roe\n512 7730 office\n(415)555-0199 fax",
    "Main line 312 555 0187-Office, 6465550123-Fax",
    "Reach me abroad: +447911 123 456 or by mail.",
    "Mobile +447911123456 (after 6pm)",
])
def test_international_phone_shapes(redactor: PiiRedactor, text: str) -> None:
    assert "<PHONE_NUMBER_1>" in redactor.redact(text)


@pytest.mark.parametrize("text", [
    "The restaurant is at 17151 2450 Crown St",
    "Date: 2003-08-28 12:13:52",
    "ZIP: 75534-030",
    "My driving licence number is 4417-82-3390",
    "We meet at Vantage, 0712 48 Harbour Street, Leeds",
])
def test_addresses_dates_and_postcodes_are_not_phones(redactor: PiiRedactor, text: str) -> None:
    assert "PHONE_NUMBER" not in redactor.redact(text)


@pytest.mark.parametrize("text", [
    "Report 2024.05.17",
    "Minutes 2024.05.17",
    "The meeting held 17.05.2024 in Leeds agreed the budget.",
    "Call 17.05.2024 the deadline.",  # a context word does not make a date a phone
    "Phone bill of 01.05.2024",  # the trunk 0 shape
    "Payment due 05-17-2024.",  # a US date, which libphonenumber reads as a number
    "Born 1985.11.03 in Oslo.",
])
def test_dates_are_not_phones(redactor: PiiRedactor, text: str) -> None:
    """A date ending a title or in body text was redacted as PHONE_NUMBER: its digits passed as a loose phone shape,
    whose base score is the threshold."""
    assert redactor.redact(text) == text


@pytest.mark.parametrize(("text", "redacted"), [
    ("Call 020.7946.0958 after lunch.", "Call <PHONE_NUMBER_1> after lunch."),
    ("Switchboard: 020.7946.0958", "Switchboard: <PHONE_NUMBER_1>"),
    ("Tel 0412.345.678", "Tel <PHONE_NUMBER_1>"),
    ("0412.345.678", "<PHONE_NUMBER_1>"),
    ("Reach me at 06.12.34.56.78", "Reach me at <PHONE_NUMBER_1>"),
    ("06.12.34.56.78", "<PHONE_NUMBER_1>"),
    ("Ring 555.867.5309 or write.", "Ring <PHONE_NUMBER_1> or write."),
    ("Tel 02.123.45.67", "Tel <PHONE_NUMBER_1>"),  # Belgian: a dotted quad's shape, libphonenumber's phone
    ("Bureau 010.123.45.67", "Bureau <PHONE_NUMBER_1>"),
    ("Mobile 0470-12-34-56", "Mobile <PHONE_NUMBER_1>"),  # an ISO date's start
])
def test_dotted_phones_are_phones_with_or_without_context(redactor: PiiRedactor, text: str, redacted: str) -> None:
    """The date shapes refused above leave real dotted phones as they were redacted (a guard on recall: these pass on
    main too; the Belgian ones failed when the loose shapes' refusal of dotted quads and ISO dates' starts was asked
    of libphonenumber's matches as well)."""
    assert redactor.redact(text) == redacted


def test_street_names_are_not_people(redactor: PiiRedactor) -> None:
    assert "PERSON" not in redactor.redact("Send it to 5850 Jana Nerudy 894, Prague.")


def test_town_lines_below_a_street_are_not_people() -> None:
    text = "> Ada Lovelace\n> 12 Harbour Road\n> Apt. 4\n> Grand Rapids, MI\n> United States 49503"
    spans = [RecognizerResult("PERSON", text.index(name), text.index(name) + len(name), 0.85)
             for name in ("Ada Lovelace", "Grand Rapids")]
    kept = drop_street_names(text, spans)
    assert [text[r.start : r.end] for r in kept] == ["Ada Lovelace"]


def _kept_people(text: str, names: tuple[str, ...]) -> list[str]:
    spans = [RecognizerResult("PERSON", text.index(name), text.index(name) + len(name), 0.85) for name in names]
    return [text[r.start : r.end] for r in drop_non_people(text, spans)]


@pytest.mark.parametrize(("text", "names", "people"), [
    ("I am in Hirvli for a business trip", ("Hirvli",), []),
    ("Aimee is from Vitalchek", ("Aimee", "Vitalchek"), ["Aimee"]),
    ("Kai spent a year at Balefire Global in Amsterdam.", ("Kai", "Balefire Global"), ["Kai"]),
    ("Tomomi is from Hawkins, Richardson and Santana", ("Tomomi", "Richardson", "Santana"), ["Tomomi"]),
    ("The Clark, Romero and Hall Orchestra was founded in 1973.", ("Clark", "Romero"), []),
    ("Berkshire Hathaway is a design agency based in Pelhrimov.", ("Berkshire Hathaway",), []),
    ("We'll meet Friday at Kroll, 61 Wiesenstrasse 31, Barzheim", ("Barzheim",), []),
    ("Please return to Lauren and Sorlaskeid 32 in case of an issue.", ("Lauren",), []),
    ("Carly Jones\nTopcoder\n53772 Holmatun 45\nSuite 757", ("Carly Jones", "Topcoder"), ["Carly Jones"]),
    ("Send it to the corner of Kuusiku 7 and Alexander Flat?", ("Alexander Flat",), []),
    ("Freja Clausen\n02 53 place Stanislas\nNantes", ("Freja Clausen", "Stanislas"), ["Freja Clausen"]),
])
def test_places_and_companies_are_not_people(text: str, names: tuple[str, ...], people: list[str]) -> None:
    assert _kept_people(text, names) == people


@pytest.mark.parametrize(("text", "names"), [
    ("She looked at Maria and smiled.", ("Maria",)),
    ("Dinner is at Maria's tonight.", ("Maria",)),
    ("I met Hawkins, Richardson and Santana yesterday.", ("Hawkins", "Richardson", "Santana")),
    ("Ada Lovelace\n12 Harbour Road\nLondon", ("Ada Lovelace",)),
    ("We hired 5 engineers, Maria and Tom.", ("Maria", "Tom")),
    ("Anna and Tom have 3 kids.", ("Anna", "Tom")),
    ("Maria is a company director.", ("Maria",)),
    ("The paper was written by Smith, Jones and Lee.", ("Smith", "Jones", "Lee")),
])
def test_people_near_place_words_are_kept(text: str, names: tuple[str, ...]) -> None:
    assert _kept_people(text, names) == list(names)


def test_a_name_is_one_placeholder_across_chunks(redactor: PiiRedactor) -> None:
    chunks = ["Maria Gonzalez chaired the meeting.", "Afterwards Maria thanked the team; Gonzalez left early."]
    redacted = redactor.redact_many(chunks, PlaceholderMap())
    assert redacted[0] == "<PERSON_1> chaired the meeting."
    assert redacted[1] == "Afterwards <PERSON_1> thanked the team; <PERSON_1> left early."


def test_lower_case_iban_is_found(redactor: PiiRedactor) -> None:
    assert "<IBAN_CODE_1>" in redactor.redact("my iban is gb82west12345698765432")


def test_department_recognizer_needs_its_checksum(redactor: PiiRedactor) -> None:
    rules = RedactionRules(recognizers=(CustomRecognizer("EMPLOYEE_ID", r"\bEMP-\d{6}\b", "luhn", ("employee",)),))
    redacted = redactor.redact("Employee EMP-123455 replaced badge EMP-123456.", rules=rules)
    assert "EMP-123455" not in redacted and "<EMPLOYEE_ID_1>" in redacted
    assert "EMP-123456" in redacted  # fails Luhn: not an employee id
    assert "EMP-123455" in redactor.redact("Employee EMP-123455 replaced a badge.")  # other departments: no rule


def test_allow_list_keeps_named_values(redactor: PiiRedactor) -> None:
    rules = RedactionRules(allow_list=("Acme Helpdesk", "helpdesk@example.com"))
    redacted = redactor.redact("Maria Gonzalez wrote to helpdesk@example.com and Acme Helpdesk.", rules=rules)
    assert "helpdesk@example.com" in redacted and "Maria Gonzalez" not in redacted


def test_checksums() -> None:
    assert luhn_valid("4111111111111111") and not luhn_valid("4111111111111112")
    assert mod97_valid("WEST12345698765432GB82") and not mod97_valid("WEST12345698765432GB83")
    assert mod11_valid("123456789") and not mod11_valid("123456782")
    assert not luhn_valid("") and not mod97_valid("") and not mod11_valid("")


@pytest.mark.parametrize("value", ["4111111111111111\u00b2", "\u0664111111111111111", "12345678\u00b9"])
def test_checksums_refuse_digits_beyond_ascii(value: str) -> None:
    """'²' passes `str.isdigit` but not `int`: the ValueError failed the whole document. Other scripts' digits are
    no check digits either."""
    assert not luhn_valid(value) and not mod11_valid(value) and not mod97_valid(value)
    assert not mod97_valid("GB82WEST12345698765\u212a32")  # the Kelvin sign is `isalnum`


def test_a_department_checksum_drops_a_match_with_non_ascii_characters(redactor: PiiRedactor) -> None:
    """The global IGNORECASE lets [A-Z] match the Kelvin sign; `\\S` takes '²': the match is dropped, not a crash."""
    rules = RedactionRules(recognizers=(
        CustomRecognizer("ACCOUNT", r"\b[A-Z]{2}\d{2}[A-Z0-9]{10,30}\b", "mod97"),
        CustomRecognizer("EMPLOYEE_ID", r"\bEMP-\S{6}", "luhn")))
    text = "Pay GB82WEST12345698765\u212a32; employee EMP-12345\u00b2 joined."
    assert redactor.redact(text, rules=rules) == text


@pytest.mark.parametrize(("spec", "problem"), [
    (CustomRecognizer("lower", r"\d+"), "entity"),
    (CustomRecognizer("ACCOUNT", r"(", "none"), "compile"),
    (CustomRecognizer("ACCOUNT", r"\d*", "none"), "empty"),
    (CustomRecognizer("ACCOUNT", r"\d+", "crc32"), "checksum"),
])
def test_unsafe_custom_recognizers_are_refused(spec: CustomRecognizer, problem: str) -> None:
    reason = validate_custom(spec)
    assert reason is not None and problem in reason
    assert validate_custom(CustomRecognizer("ACCOUNT", r"\bACC\d{8}\b", "mod11")) is None


def test_a_department_pattern_that_backtracks_fails_closed(redactor: PiiRedactor,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """`(a|aa)+c` takes exponential time on a run of a's. Presidio would give it 60 s and then skip it, leaving what
    the pattern was written to catch unredacted; the department's recognizer raises instead, naming itself."""
    from core.errors import GovragError
    from guard import pii_rules

    monkeypatch.setattr(pii_rules, "CUSTOM_PATTERN_SECONDS", 0.2)
    rules = RedactionRules(recognizers=(CustomRecognizer("CASE_ID", r"(a|aa)+c"),))
    assert redactor.redact("Case aac is open.", rules=rules) == "Case <CASE_ID_1> is open."
    for redact in (lambda text: redactor.redact(text, rules=rules),
                   lambda text: redactor.redact_many([text], PlaceholderMap(), rules=rules)):
        with pytest.raises(GovragError, match="CASE_ID recognizer ran past 0.2 s"):
            redact(f"A run of {'a' * 40} letters.")
