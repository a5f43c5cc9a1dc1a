"""Rule-based recognizers that close the small spaCy model's gaps: named-by-context people, loose phones."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import regex
from presidio_analyzer import EntityRecognizer, Pattern, PatternRecognizer, RecognizerResult
from presidio_analyzer.predefined_recognizers import IbanRecognizer, PhoneRecognizer

from core.errors import ErrorCode, GovragError
from guard.placeholders import ENTITY_TYPE

# One name word: a capital then letters, apostrophes or hyphens ("O'Neil", "Jean-Luc", "Szöllösy").
_WORD = r"\p{Lu}[\p{Ll}\p{Lu}'\u2019\-]*\p{Ll}[\p{Ll}'\u2019\-]*"
_INITIAL = r"\p{Lu}\.?"
# A name: one to three words, an optional middle initial ("Faina D. Yefremova", "Szabina J Gelencsér").
_NAME = rf"{_WORD}(?:[ \t]+{_INITIAL})?(?:[ \t]+{_WORD}){{0,2}}"
_LOWER_NAME = r"\p{Ll}{2,}(?:[ \t]+\p{Ll}{2,})?"
_TITLES = r"(?:Mr|Mrs|Ms|Mx|Miss|Dr|Prof|Sir|Dame|Madam|Mme|Mlle|Herr|Frau)\.?"

# Phrases after which the next capitalised words are a person's name (case-insensitive phrases).
_NAME_INTRO = (
    r"(?i:my name is|name is|name:|named|calls? me|this is|i am|i'm|call me|dear|hi|hello|attn:?|attention:?"
    r"|speak to|speak with|talk to|talk with|follow up with|meet with|contact|assistant to|maiden name is"
    r"|change it to|correct it to|directed by|starring|written by|signed by|approved by|reported by"
    r"|prepared by|sincerely,|regards,|thanks,|cc:|from:|to:|under|under my partner's name|said|tell"
    r"|according to|commenter|player|songwriter|employee|manager|patient|client|customer|guardian)"
)
# Lower-case names are accepted only after the most explicit introductions.
_STRONG_INTRO = r"(?i:my name is|name is|name:|follow up with|maiden name is|calls me)"

_PERSON_PATTERNS = [
    Pattern("title_name", rf"(?<=\b{_TITLES}[ \t]+){_NAME}\b", 0.6),
    Pattern("intro_name", rf"(?<=\b{_NAME_INTRO}[ \t]+(?:{_TITLES}[ \t]+)?){_NAME}\b", 0.5),
    Pattern("intro_lower_name", rf"(?<=\b{_STRONG_INTRO}[ \t]+){_LOWER_NAME}\b", 0.45),
    Pattern("said_to", rf"(?<=\b(?i:said|wrote|told|asked)[ \t]+{_NAME}[ \t]+to[ \t]+){_NAME}\b", 0.5),
    # Sentence subjects of verbs only people take: "Jacob lives on…", "Tomomi is from…".
    Pattern(
        "person_verb",
        rf"(?<=(?:^|[.!?:][ \t]+|\n)[ \t]*){_NAME}(?=[ \t]+(?:lives|lived|is from|was from|had given|has given"
        rf"|said|says|spent|works|worked|joined|wrote|told|asked|is a very|was born|is so))",
        0.45,
    ),
    # Addressed at the start of a sentence: "Leif, can I please…".
    Pattern("vocative",
            rf"(?<=(?:^|[.!?][ \t]+|\n)[ \t]*){_WORD}(?=,[ \t]+(?i:can|could|would|will|please|thanks|thank))", 0.45),
    # Possessives of things only people have: "Maite Lemmens's killers", "Matej's address".
    Pattern(
        "possessive",
        rf"{_NAME}(?=['\u2019]s[ \t]+(?i:killers?|address|account|mother|father|wife|husband|son|daughter|phone"
        rf"|e-?mail|manager|salary|contract|review|family|children|birthday|number|car|house|home))",
        0.45,
    ),
    # A line holding only a name at the top of a contact card (gated on card markers in analyze()).
    Pattern("card_name", rf"(?<=^[\s?]*){_WORD}(?:[ \t]+{_INITIAL})?(?:[ \t]+{_WORD}){{1,2}}(?=[ \t]*\n)", 0.45),
    # Dialogue or list lines "Name Surname:" at a line start, followed by speech on the same line.
    Pattern("speaker", rf"(?m)(?<=^[ \t]*){_WORD}(?=:[ \t]+\S)", 0.45),
    # Lists of names after a plural people noun: "founders: Kónya, Becker and Vasquez".
    Pattern(
        "people_list",
        rf"(?<=\b(?i:founders|partners|members|authors|owners|directors|attendees|participants)"
        rf":?[ \t]+(?:{_NAME},?[ \t]+(?:and[ \t]+)?)*){_NAME}\b",
        0.5,
    ),
]
# An e-mail's header names: "From: …" names no speaker (here, and a lone label spaCy tags PERSON: guard/pii.py).
HEADER_NAMES = frozenset({"From", "To", "Cc", "CC", "Bcc", "BCC", "Sent", "Attachments"})
# Words that an intro phrase may precede but that are never names on their own.
_NOT_NAMES = HEADER_NAMES | frozenset(
    {
        "The", "This", "That", "These", "Those", "It", "He", "She", "They", "We", "You", "I", "A", "An",
        "My", "Our", "Your", "His", "Her", "Their", "Please", "Thanks", "Thank", "Team", "All", "Sir",
        "Madam", "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday", "Phone",
        "Email", "E-mail", "Mobile", "Fax", "Desk", "Address", "Date", "Name", "Website", "Subject",
        "Note", "Re", "Fwd", "Yes", "No", "Hello", "Hi", "Dear", "Regards", "Sincerely", "Dept",
        "Department", "Company", "Customer", "Client", "Manager", "Employee", "Patient", "Guardian",
        "Mr", "Mrs", "Ms", "Mx", "Miss", "Dr", "Prof", "Herr", "Frau", "Mme", "Mlle",
    }
)  # fmt: skip
_SPEAKER_MIN_LINES = 2
# A name alone on a line counts only in a contact card or signature block.
_CARD_MARKERS = regex.compile(r"(?i)@|\b(?:phone|mobile|tel|fax|e-?mail|address|apt|suite|p\.?o\.? box)\b")
# A "name" right after a house number or before one on the same line is a street ("5850 Jana Nerudy 894").
_STREET_BEFORE = regex.compile(r"(?:\d[ \t]*|\b(?:ul|u|al|str|rua|rue|via|av|avda|c/|calle|place|platz)\.?[ \t]+)$",
                               regex.IGNORECASE)
_STREET_AFTER = regex.compile(r"^[ \t]+\d")
# Address blocks: the street line ("> 3369 24 Clarke Avenue"), and what may surround a town on its own line
# (quote marks before; a region code or postcode after).
_STREET_LINE = regex.compile(r"^[\s>?*-]*\d+[\d \t]*(?!(?i:office|fax|mobile|cell|home|work|direct|tel|phone)\b)\p{L}")
_LINE_LEAD = regex.compile(r"[\s>?*-]*")
_LINE_TAIL = regex.compile(r"[\s,.]*(?:\p{Lu}{2,3})?[\s,.\d-]*")

# Digit runs shaped like phone numbers in any country. Their base score is SCORE_THRESHOLD (guard/pii.py): a run that
# passes `_plausible_loose_phone` is redacted with no context word around it, for a phone missed is a leak and F2 counts
# recall four times; a context word before it ("phone", "tel", "reach"…) lifts it over the shapes below and over
# overlapping values. What is no phone whatever its neighbours is refused: `_WHOLE_DATE`, `_NOT_LOOSE_PHONE`.
_LOOSE_PHONE = (
    r"(?<![\w.+-])(?<!\d[ .-])(?:\+|00)?(?:\(\d{1,4}\)[ .-]?|\d{1,4}[ .-]?)?(?:\(0\)[ ]?)?"
    r"\d{2,4}(?:[ .-]?\d{2,4}){1,4}(?:[ ]?(?:x|ext\.?)[ ]?\d{1,5})?(?!\w|-(?!\p{L}))"
)
# Shapes that are phone numbers on their own: an international prefix, a bracketed area code, a trunk 0
# with three or more groups, or North American 3-3-4 with an optional extension.
_NOT_PHONE_BEFORE = regex.compile(r"(?i)\b(?:zip|postcode|postal code|licen[cs]e|passport|account|card|invoice|order"
                                   r"|ssn|social security)\b[^\n\d]*$")
_WORD_AFTER = regex.compile(r"^[ \t]+\p{L}")
# A label after the number ("781 1704 office", "3660170548-Fax") makes it a phone whatever its shape.
_LABEL_AFTER = regex.compile(r"^[ \t]*[-(]?[ \t]*(?i:office|fax|mobile|cell|home|work|direct|tel|phone)\b")
_PHONE_SHAPES = [
    Pattern("intl_phone",
            r"(?<![\w+])\+\d{1,3}[ .-]?(?:\(0\)[ ]?)?\(?\d{1,4}\)?(?:[ .-]?\d{2,4}){1,4}(?:[ ]?x\d{1,5})?\b", 0.45),
    Pattern("area_phone", r"(?<![\w)])\(\d{2,4}\)[ .-]?\d{3,4}[ .-]?\d{3,4}(?:[ ]?x\d{1,5})?\b", 0.45),
    Pattern("trunk_phone", r"(?<![\w.+-])(?<!\d[ .-])0\d{1,4}(?:[ .-]\d{2,4}){2,4}(?![\w.-])", 0.45),
    Pattern("nanp_phone", r"(?<![\w.+-])(?<!\d[ .-])(?:1[ .-])?\d{3}[.-]\d{3}[.-]\d{4}(?:[ ]?x\d{1,5})?\b", 0.45),
]
PHONE_CONTEXT = [
    "phone", "telephone", "tel", "mobile", "cell", "desk", "fax", "call", "calls", "called", "answering",
    "messages", "message", "registered", "contact", "sms", "dial", "reach", "phone number",
]  # fmt: skip
_MIN_PHONE_DIGITS, _MAX_PHONE_DIGITS = 7, 15
# A whole date with one separator, a valid month and day and a 19xx/20xx year: year-month-day, day-month-year or
# month-day-year, "2024.05.17", "17.05.2024", "05/17/2024". It is no phone to any recognizer, whatever the context
# (libphonenumber reads "05-17-2024" as a US number).
_DAY, _MONTH, _YEAR = r"(?:0?[1-9]|[12]\d|3[01])", r"(?:0?[1-9]|1[0-2])", r"(?:19|20)\d{2}"
_WHOLE_DATE = regex.compile(
    rf"{_YEAR}(?P<ymd>[./-]){_MONTH}(?P=ymd){_DAY}"
    rf"|(?:{_DAY}(?P<dmy>[./-]){_MONTH}(?P=dmy)|{_MONTH}(?P<mdy>[./-]){_DAY}(?P=mdy)){_YEAR}"
)
# What the loose shapes alone refuse too, even next to the word "number": an ISO date and time, a dotted quad.
# libphonenumber is not asked: it reads Belgian "02.123.45.67" and "0470-12-34-56" as the phones they are.
_NOT_LOOSE_PHONE = regex.compile(r"^\d{4}-\d{2}-\d{2}|^\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}$")


PERSON_CONTEXT_RECOGNIZER = "GovragPersonContextRecognizer"


class _PersonContextRecognizer(PatternRecognizer):
    """People named by context: titles, introductions, speaker labels, lists of founders."""

    def __init__(self) -> None:
        super().__init__(
            supported_entity="PERSON",
            patterns=_PERSON_PATTERNS,
            name=PERSON_CONTEXT_RECOGNIZER,
            global_regex_flags=regex.DOTALL | regex.MULTILINE,  # case-sensitive: capitals matter
        )

    def analyze(self, text: str, entities: list[str], nlp_artifacts: object = None,
                regex_flags: int | None = None) -> list[RecognizerResult]:
        """Return context-named people, dropping function words and one-off speaker labels."""
        results = super().analyze(text, entities, nlp_artifacts, regex_flags) or []
        kept = [r for r in results if text[r.start : r.end].split()[0] not in _NOT_NAMES]
        speakers = [r for r in kept if _pattern_name(r) == "speaker"]
        if len(speakers) < _SPEAKER_MIN_LINES:
            kept = [r for r in kept if _pattern_name(r) != "speaker"]
        if not _CARD_MARKERS.search(text):
            kept = [r for r in kept if _pattern_name(r) != "card_name"]
        return kept


class _LoosePhoneRecognizer(PatternRecognizer):
    """International phone shapes Presidio's libphonenumber regions miss, gated by their shape and neighbours."""

    def __init__(self) -> None:
        super().__init__(
            supported_entity="PHONE_NUMBER",
            patterns=[Pattern("loose_phone", _LOOSE_PHONE, 0.4), *_PHONE_SHAPES],
            context=PHONE_CONTEXT,
            name="GovragLoosePhoneRecognizer",
        )

    def analyze(self, text: str, entities: list[str], nlp_artifacts: object = None,
                regex_flags: int | None = None) -> list[RecognizerResult]:
        """Return phone shapes, minus house numbers, postcodes and licence numbers."""
        results = super().analyze(text, entities, nlp_artifacts, regex_flags) or []
        return [r for r in results if _pattern_name(r) != "loose_phone" or _plausible_loose_phone(text, r)]

    def validate_result(self, pattern_text: str) -> bool | None:
        """Accept only plausible digit counts (7 to 15, ITU E.164) without the extension, and no date or dotted quad."""
        main = regex.split(r"(?i)x|ext", pattern_text)[0]
        digits = sum(ch.isdigit() for ch in main)
        if not _MIN_PHONE_DIGITS <= digits <= _MAX_PHONE_DIGITS or _NOT_LOOSE_PHONE.search(pattern_text):
            return False
        if _whole_date(pattern_text):
            return False
        return None  # keep the pattern's score (the loose run's is the threshold: `_LOOSE_PHONE`); context lifts it


class _AnyCaseIbanRecognizer(IbanRecognizer):
    """Presidio's IBAN recognizer that also accepts lower-case IBANs (typed into forms and chats)."""

    def __init__(self) -> None:
        super().__init__(regex_flags=regex.MULTILINE | regex.DOTALL | regex.IGNORECASE)

    def validate_result(self, pattern_text: str) -> bool:
        """Validate the checksum on the upper-cased value."""
        return bool(super().validate_result(pattern_text.upper()))


class _PlausiblePhoneRecognizer(PhoneRecognizer):
    """Presidio's libphonenumber recognizer minus short numbers, house numbers, postcodes and licence numbers.

    libphonenumber scans the whole text once per region; it runs here only on windows around digit runs long
    enough to be kept (7+ digits), with a margin for its own checks of the neighbouring characters.
    """

    def analyze(self, text: str, entities: list[str], nlp_artifacts: object = None) -> list[RecognizerResult]:
        """Return Presidio's phone matches that pass the same shape and neighbour checks as the loose shapes."""
        results = []
        for start, end in _phone_windows(text):
            for result in super().analyze(text[start:end], entities, nlp_artifacts) or []:
                result.start, result.end = result.start + start, result.end + start
                results.append(result)
        return [r for r in results if _phone_shaped(text[r.start : r.end]) and _plausible_loose_phone(text, r)]


# Digits joined by at most four non-word characters (or libphonenumber's "x"): a superset of what its matcher
# takes as one number, extension aside (the right margin covers "ext. 123").
_DIGIT_RUN = regex.compile(r"\d(?:(?:[^\w]|x){0,4}\d)*")
_PHONE_MARGIN = 24


def _phone_windows(text: str) -> list[tuple[int, int]]:
    """Merged (start, end) windows around the digit runs that could hold a 7+ digit phone number."""
    windows: list[tuple[int, int]] = []
    for run in _DIGIT_RUN.finditer(text):
        if sum(ch.isdigit() for ch in run.group()) < _MIN_PHONE_DIGITS:
            continue
        start, end = max(0, run.start() - _PHONE_MARGIN), min(len(text), run.end() + _PHONE_MARGIN)
        if windows and start <= windows[-1][1]:
            windows[-1] = (windows[-1][0], end)
        else:
            windows.append((start, end))
    return windows


def _phone_shaped(value: str) -> bool:
    """Enough digits for a phone, and no whole date (`05-17-2024` is a US phone to libphonenumber)."""
    return sum(ch.isdigit() for ch in value) >= _MIN_PHONE_DIGITS and not _whole_date(value)


def _whole_date(value: str) -> bool:
    """Whether a phone-shaped value is a whole date (`_WHOLE_DATE`), no phone to any recognizer."""
    return bool(_WHOLE_DATE.fullmatch(value))


def _plausible_loose_phone(text: str, result: RecognizerResult) -> bool:
    """Tell a loose digit run from an address number, a postcode or an identifier by its neighbours."""
    groups = len(regex.findall(r"\d+", text[result.start : result.end]))
    before = text[max(0, result.start - 30) : result.start]
    if _NOT_PHONE_BEFORE.search(before):
        return False
    after = text[result.end : result.end + 12]
    return groups >= 3 or bool(_LABEL_AFTER.match(after)) or not _WORD_AFTER.match(after)


def _pattern_name(result: RecognizerResult) -> str | None:
    explanation = result.analysis_explanation
    return explanation.pattern_name if explanation is not None else None


def drop_street_names(text: str, results: list[RecognizerResult]) -> list[RecognizerResult]:
    """Remove PERSON spans that sit next to a house number or fill a town line below a street, as places do."""
    return [r for r in results
            if r.entity_type != "PERSON" or not (_next_to_house_number(text, r) or _town_line(text, r))]


# Where a capitalised word names a place or a company rather than a person: "I am in Hirvli", "Aimee is from
# Vitalchek", "a year at Balefire Global", "based in Kulusuk".
_PLACE_BEFORE = regex.compile(
    r"(?:\b(?i:in|near|based at|located at|arrived at|returned to|moved to|flew to|travel(?:l)?ed to|headquartered at)"
    r"|\b(?i:is|are|was|were|am|comes?|came)[ \t]+(?i:from))[ \t]+(?:(?i:the)[ \t]+)?$"
)
# "at <Name>" is a person only after a verb aimed at someone ("looked at Maria") or as "at Maria's".
_AT_BEFORE = regex.compile(r"\b(?i:at)[ \t]+$")
_AT_PEOPLE_VERBS = regex.compile(
    r"(?i:look(?:s|ed|ing)?|laugh(?:s|ed|ing)?|smil(?:e|es|ed|ing)|star(?:e|es|ed|ing)|glanc(?:e|es|ed|ing)"
    r"|shout(?:s|ed|ing)?|yell(?:s|ed|ing)?|angry|mad|upset|point(?:s|ed|ing)?|wav(?:e|es|ed|ing)|nod(?:s|ded)?"
    r"|wink(?:s|ed)?|aim(?:s|ed)?|directed)[ \t]+at[ \t]+$"
)
# Companies shaped like surname lists ("Hawkins, Richardson and Santana", "Becker-Shaffer", "Jones and Sons")
# when a company word follows or a place/employer cue precedes them.
_SURNAME_LIST = regex.compile(
    rf"\b{_WORD}(?:,[ \t]+{_WORD})+,?[ \t]+(?:and|&)[ \t]+{_WORD}\b|\b{_WORD}[ \t]+(?:and|&)[ \t]+Sons\b"
)
_COMPANY_AFTER = regex.compile(
    r"^,?[ \t]+(?:(?i:inc|llc|ltd|plc|corp|co|gmbh|group|partners|associates|company|corporation|orchestra"
    r"|agency|foundation|law firm|llp|holdings)\b|(?:is|was)[ \t]+an?[ \t]+(?:\w+[ \t]+){0,3}"
    r"(?i:agency|company|firm|startup|consultancy|studio|brand|retailer|manufacturer)\b"
    r"(?![ \t]+(?i:director|owner|founder|manager|lawyer|partner|employee|secretary|executive|officer|member)))"
)
_COMPANY_BEFORE = regex.compile(r"(?:^|\b(?i:the|at|joined|works? for|worked for|(?:is|are|was|were) from))[ \t]*$")
# A town or country closing an address on the same line: "…, 61 Wiesenstrasse 31, Barzheim", "…Apt. 561, X, Austria?"
_STREET_SEGMENT_BEFORE = regex.compile(r"\b\d+[\d \t]*[ \t.]\p{L}[^,\n]*,[ \t]*(?:[^,\n\d]+,[ \t]*)?$")
_ADDRESS_END_AFTER = regex.compile(r"^[ \t]*(?:[,.?!;\n]|$)")
# One side of a street corner: "Lauren and Sorlaskeid 32", "Hallgerður and Hegedûs Gyula utca 76."
_STREET_WORDS = (r"(?i:utca|út|ul|ulica|street|st|road|rd|avenue|ave|strasse|straße|gasse|weg|vej|gata|rua|rue|via"
                 r"|calle|place|platz)")
_CORNER_AFTER = regex.compile(rf"^[ \t]+and[ \t]+(?:(?:\p{{Lu}}[\p{{L}}.]*|{_STREET_WORDS}\.?)[ \t]+){{1,4}}\d+\b")
# "<street name> utca 76": a lower-case street word and a number after the span.
_STREET_AFTER_WORD = regex.compile(rf"^[ \t]+(?:{_STREET_WORDS}\.?[ \t]+)?\d+\.?[ \t]*(?:[,.?!;\n]|$)")
_CORNER_BEFORE = regex.compile(r"\b(?i:corner of)[ \t]+$|[ \t]and[ \t]+$")
# "the corner of Kuusiku 7 and Alexander Flat": the second street of a corner.
_CORNER_SECOND = regex.compile(r"\b(?i:corner of)[ \t]+[^,.?!;\n]{1,40}[ \t]and[ \t]+$")
# A line that starts an address below the name and company lines of a card ("53772 Holmatun 45", "Unit 5022").
_ADDRESS_LINE = regex.compile(
    r"^[\s>?*-]*(?:\d+[\d \t]*\p{L}|(?i:unit|box|p\.?o\.? box|postfach|apt|suite|flat|usns|usnv|uss|psc)\b)"
)


def drop_non_people(text: str, results: list[RecognizerResult]) -> list[RecognizerResult]:
    """Remove PERSON spans that are streets, towns, places after "in", companies shaped like surname lists, or
    the company line between a name and an address in a contact card."""
    kept = drop_street_names(text, results)
    people = [r for r in kept if r.entity_type == "PERSON"]
    return [r for r in kept
            if r.entity_type != "PERSON"
            or not (_after_place_word(text, r) or _in_company_name(text, r) or _company_line(text, r, people)
                    or _closes_address(text, r) or _street_corner(text, r))]


def _closes_address(text: str, result: RecognizerResult) -> bool:
    """A span ending an address line after a numbered street segment is its town or country."""
    before = text[max(0, result.start - 80) : result.start]
    return bool(_STREET_SEGMENT_BEFORE.search(before) and _ADDRESS_END_AFTER.match(text[result.end : result.end + 3]))


def _street_corner(text: str, result: RecognizerResult) -> bool:
    """"<A> and <street> <number>": both sides of a street corner, not people."""
    after = text[result.end : result.end + 60]
    if _CORNER_AFTER.match(after):
        return True
    before = text[max(0, result.start - 60) : result.start]
    if _CORNER_SECOND.search(before):
        return True
    return bool(_CORNER_BEFORE.search(before) and _STREET_AFTER_WORD.match(text[result.end : result.end + 20]))


def _after_place_word(text: str, result: RecognizerResult) -> bool:
    """A span right after "in", "is from", "arrived at"… or after "at" (unless aimed at someone) is a place."""
    before = text[max(0, result.start - 40) : result.start]
    if _PLACE_BEFORE.search(before):
        return True
    possessive = text.startswith(("'s", "\u2019s"), result.end)
    return bool(_AT_BEFORE.search(before)) and not possessive and not _AT_PEOPLE_VERBS.search(before)


def _in_company_name(text: str, result: RecognizerResult) -> bool:
    """Followed by a company word ("… Inc", "… is a design agency"), or inside "A, B and C" / "A and Sons" with a
    company word after or "the", "at", "from"… before."""
    if _COMPANY_AFTER.match(text[result.end : result.end + 60]):
        return True
    for match in _SURNAME_LIST.finditer(text, max(0, result.start - 80), min(len(text), result.end + 80)):
        if match.start() <= result.start and result.end <= match.end():
            after = text[match.end() : match.end() + 60]
            before = text[max(0, match.start() - 20) : match.start()]
            return bool(_COMPANY_AFTER.match(after) or _COMPANY_BEFORE.search(before))
    return False


def _company_line(text: str, result: RecognizerResult, people: list[RecognizerResult]) -> bool:
    """A span alone on its line, between a line naming a person and an address line, is the company's name."""
    line_start = text.rfind("\n", 0, result.start) + 1
    line_end = text.find("\n", result.end)
    if line_start == 0 or line_end == -1:
        return False
    alone = _LINE_LEAD.fullmatch(text[line_start : result.start]) and _LINE_TAIL.fullmatch(text[result.end : line_end])
    if not alone:
        return False
    next_end = text.find("\n", line_end + 1)
    if not _ADDRESS_LINE.match(text[line_end + 1 : len(text) if next_end == -1 else next_end]):
        return False
    above_start = text.rfind("\n", 0, line_start - 1) + 1
    return any(above_start <= p.start and p.end <= line_start - 1 for p in people)


def _town_line(text: str, result: RecognizerResult) -> bool:
    """A span alone on its line within three lines below a "<number> <street>" line is a town, not a person."""
    line_start = text.rfind("\n", 0, result.start) + 1
    line_end = text.find("\n", result.end)
    line_end = len(text) if line_end == -1 else line_end
    alone = _LINE_LEAD.fullmatch(text[line_start : result.start]) and _LINE_TAIL.fullmatch(text[result.end : line_end])
    if not alone:
        return False
    above = text[:line_start].splitlines()[-3:]
    return any(_STREET_LINE.match(line) for line in above)


def _next_to_house_number(text: str, result: RecognizerResult) -> bool:
    before = text[max(0, result.start - 8) : result.start]
    return bool(_STREET_BEFORE.search(before) or _STREET_AFTER.match(text[result.end : result.end + 4]))


def rule_recognizers() -> list[EntityRecognizer]:
    """Return the rule-based recognizers added to Presidio's defaults."""
    return [_PersonContextRecognizer(), _PlausiblePhoneRecognizer(), _LoosePhoneRecognizer(), _AnyCaseIbanRecognizer()]


def person_words(text: str, results: list[RecognizerResult]) -> set[str]:
    """The name words of the people detected in a text."""
    return {
        word
        for r in drop_non_people(text, results)
        if r.entity_type == "PERSON"
        for word in regex.findall(_WORD, text[r.start : r.end])
        if word not in _NOT_NAMES
    }


def propagate_people(text: str, results: list[RecognizerResult],
                     known: set[str] | None = None) -> list[RecognizerResult]:
    """Add every other whole-word occurrence of a detected person's name words (here or `known` elsewhere)."""
    results = drop_non_people(text, results)
    words = person_words(text, results) | (known or set())
    if not words:
        return results
    pattern = regex.compile(r"\b(?:" + "|".join(regex.escape(w) for w in sorted(words, key=len, reverse=True))
                            + r")\b")
    added = [
        RecognizerResult("PERSON", match.start(), match.end(), 0.45)
        for match in pattern.finditer(text)
        if not any(r.start <= match.start() and match.end() <= r.end for r in results)
    ]
    return results + added


# --- department rules: custom recognizers (regex + checksum) and allow-lists ---

CHECKSUMS = ("none", "luhn", "mod97", "mod11")
MAX_CUSTOM_PATTERN_CHARS = 300
CUSTOM_PATTERN_SECONDS = 2.0  # per text searched; past it the document fails rather than go unredacted


@dataclass(frozen=True)
class CustomRecognizer:
    """A department's own identifier: an entity name, a regex, an optional checksum and context words."""

    entity: str  # upper-case, e.g. EMPLOYEE_ID
    pattern: str
    checksum: str = "none"
    context: tuple[str, ...] = ()
    score: float = 0.6


@dataclass(frozen=True)
class RedactionRules:
    """Per-department additions to the redactor; the default is no additions."""

    recognizers: tuple[CustomRecognizer, ...] = ()
    allow_list: tuple[str, ...] = ()

    @property
    def entities(self) -> list[str]:
        """The extra entity types these rules produce."""
        return sorted({r.entity for r in self.recognizers})


def _ascii_digits(text: str) -> bool:
    """Only 0-9: `str.isdigit` also takes '²' or Arabic-Indic digits, which the checks cannot (and must not) read."""
    return text.isascii() and text.isdigit()


def luhn_valid(digits: str) -> bool:
    """The Luhn (mod 10) check used by card and many employee numbers; False for anything but ASCII digits."""
    if not _ascii_digits(digits):
        return False
    total = 0
    for position, char in enumerate(reversed(digits)):
        value = int(char)
        if position % 2 == 1:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


def mod97_valid(value: str) -> bool:
    """ISO 7064 MOD 97-10 (IBAN style): letters count as 10..35, the number mod 97 must be 1; False for anything but
    ASCII letters and digits (`str.isalnum` also takes the Kelvin sign or '²')."""
    if not (value.isascii() and value.isalnum()):
        return False
    return int("".join(str(int(ch, 36)) for ch in value)) % 97 == 1


def mod11_valid(digits: str) -> bool:
    """Weighted mod 11 (weights 2, 3, 4… from the right, check digit last; 10 is not allowed); False for anything but
    ASCII digits."""
    if len(digits) < 2 or not _ascii_digits(digits):
        return False
    body, check = digits[:-1], int(digits[-1])
    total = sum(int(ch) * weight for ch, weight in zip(reversed(body), range(2, 2 + len(body)), strict=False))
    remainder = (11 - total % 11) % 11
    return remainder == check


_CHECKERS = {"luhn": luhn_valid, "mod97": mod97_valid, "mod11": mod11_valid}


class _CustomPatternRecognizer(PatternRecognizer):
    """A department recognizer: its regex, gated by its checksum over the letters and digits, and bounded in time."""

    def __init__(self, spec: CustomRecognizer) -> None:
        self._checker = _CHECKERS.get(spec.checksum)
        self._alnum_only = spec.checksum == "mod97"
        super().__init__(
            supported_entity=spec.entity,
            patterns=[Pattern(spec.entity.lower(), spec.pattern, spec.score)],
            context=list(spec.context) or None,
            name=f"Department{spec.entity.title().replace('_', '')}Recognizer",
        )
        pattern = self.patterns[0]  # compiled here, as Presidio would for its flags, but bounded
        pattern.compiled_with_flags = self.global_regex_flags
        compiled = regex.compile(spec.pattern, flags=self.global_regex_flags)
        pattern.compiled_regex = _BoundedPattern(compiled, spec.entity)

    def validate_result(self, pattern_text: str) -> bool | None:
        """Run the checksum (None keeps the pattern's score; False drops the match)."""
        if self._checker is None:
            return None
        if self._alnum_only:
            value = "".join(ch for ch in pattern_text.upper() if ch.isalnum())
            return None if self._checker(value) else False
        digits = "".join(ch for ch in pattern_text if ch.isdigit())
        return None if self._checker(digits) else False


class _BoundedPattern:
    """A department's compiled pattern that fails closed: a search running past `CUSTOM_PATTERN_SECONDS` (a pattern
    that backtracks, such as `(a|aa)+c`) raises, naming the recognizer, and the document fails. Presidio's own
    timeout (60 s) skips the pattern instead, which would index unredacted what the pattern was written to catch."""

    def __init__(self, compiled: regex.Pattern[str], entity: str) -> None:
        self._compiled, self._entity = compiled, entity

    def finditer(self, text: str, timeout: float | None = None) -> Iterator[regex.Match[str]]:  # noqa: ARG002
        """Every match, found within our bound (`timeout`, Presidio's own, is ignored)."""
        try:
            return iter(list(self._compiled.finditer(text, timeout=CUSTOM_PATTERN_SECONDS)))
        except TimeoutError as exc:
            raise GovragError(ErrorCode.invalid_request,
                              f"the department's {self._entity} recognizer ran past {CUSTOM_PATTERN_SECONDS:g} s on "
                              "this document (its pattern backtracks): simplify the pattern, then re-index") from exc


def custom_recognizers(rules: RedactionRules) -> list[EntityRecognizer]:
    """Presidio recognizers for a department's custom identifiers."""
    return [_CustomPatternRecognizer(spec) for spec in rules.recognizers]


def validate_custom(spec: CustomRecognizer) -> str | None:
    """Return why a custom recognizer is unusable, or None when it compiles and is bounded."""
    if not regex.fullmatch(ENTITY_TYPE, spec.entity):
        return "entity must be upper-case letters, digits and underscores"
    if spec.checksum not in CHECKSUMS:
        return f"checksum must be one of {', '.join(CHECKSUMS)}"
    if len(spec.pattern) > MAX_CUSTOM_PATTERN_CHARS:
        return "pattern is too long"
    try:
        compiled = regex.compile(spec.pattern)
    except regex.error:
        return "pattern does not compile"
    if compiled.search(""):
        return "pattern matches the empty string"
    return None
