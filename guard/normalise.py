"""Undo the usual disguises before a prompt is judged: confusables, invisible characters, encodings, leetspeak."""

from __future__ import annotations

import base64
import binascii
import codecs
import html
import re
import unicodedata
from typing import Annotated
from urllib.parse import unquote

from pydantic import AfterValidator

from core.text import VARIATION_SELECTOR, VARIATION_SELECTORS

# Characters that render as nothing (or as a space) and are used to split trigger words: these, Unicode tag
# characters and variation selectors (`_TAGS`, `_SELECTORS`, below). Together every Default_Ignorable_Code_Point of
# Unicode's DerivedCoreProperties (the shorthand format controls, U+1BCA0-U+1BCA3, and the musical beam and slur
# controls, U+1D173-U+1D17A, too: `<|im_\U0001bca0start|>` split ChatML's token past the chat_template rule).
_ZERO_WIDTH = ("\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180b-\u180f\u200b-\u200f\u202a-\u202e\u2060-\u206f\u3164"
               "\ufeff\uffa0\ufff0-\ufff8\U0001bca0-\U0001bca3\U0001d173-\U0001d17a\U000e0080-\U000e00ff\U000e01f0-\U000e0fff")
_TAGS = "\U000e0000-\U000e007f"
_SELECTORS = VARIATION_SELECTORS
_INVISIBLE = re.compile(f"[{_ZERO_WIDTH}{_TAGS}{_SELECTORS}]")
# Latin look-alikes from Cyrillic, Greek, Armenian, Cherokee and others that NFKC leaves alone.
_LOOK_ALIKES = {
    "а": "a", "в": "b", "е": "e", "ё": "e", "к": "k", "м": "m", "н": "h", "о": "o", "р": "p", "с": "c", "т": "t",
    "у": "y", "х": "x", "і": "i", "ї": "i", "ј": "j", "ѕ": "s", "ԁ": "d", "ԛ": "q", "ԝ": "w", "ɡ": "g", "ı": "i",
    "А": "A", "В": "B", "Е": "E", "К": "K", "М": "M", "Н": "H", "О": "O", "Р": "P", "С": "C", "Т": "T", "Х": "X",
    "І": "I", "Ј": "J", "Ѕ": "S", "α": "a", "ο": "o", "ν": "v", "τ": "t", "ι": "i", "κ": "k", "ρ": "p",
    "Α": "A", "Β": "B", "Ε": "E", "Ζ": "Z", "Η": "H", "Ι": "I", "Κ": "K", "Μ": "M", "Ν": "N", "Ο": "O", "Ρ": "P",
    "Τ": "T", "Υ": "Y", "Χ": "X", "ß": "ss",
    "һ": "h", "ӏ": "l", "Ӏ": "I", "ү": "y", "Ү": "Y", "ɑ": "a", "ɩ": "i", "ϳ": "j",
    "օ": "o", "ս": "u", "ո": "n", "հ": "h", "զ": "q", "ց": "g", "Օ": "O", "Ս": "U",
    "Ꭺ": "A", "Ᏼ": "B", "Ꮯ": "C", "Ꭼ": "E", "Ꮋ": "H", "Ꭻ": "J", "Ꮶ": "K", "Ꮮ": "L", "Ꮇ": "M", "Ꮲ": "P",
    "Ꮪ": "S", "Ꭲ": "T", "Ꮩ": "V", "Ꮃ": "W", "Ꮓ": "Z",
}
# Letters whose Unicode name says which Latin letter they draw: small capitals (`ɪɢɴᴏʀᴇ`, the "small caps" text
# generators' output) and negative circled or squared capitals (NFKC folds the plain circled and squared ones).
_NAMED_LETTER = re.compile(r"(LATIN LETTER SMALL CAPITAL|NEGATIVE (?:CIRCLED|SQUARED) LATIN CAPITAL LETTER) ([A-Z])")
_NAMED_BLOCKS = ((0x0250, 0x02B0), (0x1D00, 0x1DC0), (0xA720, 0xA800), (0x1DF00, 0x1E000), (0x1F100, 0x1F200))


def _named_letters() -> dict[str, str]:
    """Each letter `_NAMED_LETTER` describes, as that Latin letter (a small capital in lower case)."""
    letters = {}
    for first, end in _NAMED_BLOCKS:
        for code in range(first, end):
            if match := _NAMED_LETTER.fullmatch(unicodedata.name(chr(code), "")):
                kind, letter = match.groups()
                letters[chr(code)] = letter.lower() if kind.endswith("SMALL CAPITAL") else letter
    return letters


_CONFUSABLES = str.maketrans({**_named_letters(), **_LOOK_ALIKES})
_LEET = str.maketrans({"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "@": "a", "$": "s", "!": "i",
                       "|": "l", "+": "t"})
_LEET_WORD = re.compile(r"\b(?=[a-z0-9@$!|+]*[a-z])(?=[a-z0-9@$!|+]*[0-9@$|+])[a-z0-9@$!|+]{3,}\b", re.IGNORECASE)
# A run of `_LEET_WORD`'s characters holding one that its second lookahead needs (a digit or `@$|+`): a run without
# one, most words of a prompt, holds no leet word and is not searched for one. Tried only where a run starts.
_LEET_RUN = re.compile(r"(?<![a-z0-9@$!|+])[a-z!]*[0-9@$|+][a-z0-9@$!|+]*", re.IGNORECASE)
_WORD_BOUNDARY = re.compile(r"\b")
_BASE64 = re.compile(r"(?<![A-Za-z0-9+/=])[A-Za-z0-9+/]{16,}={0,2}(?![A-Za-z0-9+/=])")
# URL-safe base64 (RFC 4648 section 5: `-` and `_` for `+` and `/`, padding often left off): a run holding either.
_URLSAFE_BASE64 = re.compile(r"(?<![A-Za-z0-9_=-])(?=[A-Za-z0-9]*[-_])[A-Za-z0-9_-]{16,}={0,2}(?![A-Za-z0-9_=-])")
_URLSAFE_ALPHABET = str.maketrans("-_", "+/")
_HEX = re.compile(r"\b(?:[0-9a-fA-F]{2}){12,}\b")
_SPACES = re.compile(r"[ \t]+")
# A word hyphenated across a line wrap (`in-\nstructions`, or `in- structions` once the lines are joined).
_WRAPPED_HYPHEN = re.compile(r"(?<=[^\W\d_])[-\u2010]\s+(?=[^\W\d_])")
# An HTML character reference: `&#73;` (the `;` may be left off a number, as browsers allow), `&#x49;`, `&amp;`.
_CHARACTER_REFERENCE = re.compile(r"&(?:#[0-9]{1,7};?|#[xX][0-9a-fA-F]{1,6};?|[A-Za-z][A-Za-z0-9]{1,31};)")
# A run of %-escapes (`%3C%7Cim_start%7C%3E`, `%EF%BD%9C` a full-width pipe). Decoded only where it spells brackets,
# pipes and slashes alone (`_MARKUP`, once NFKC has folded it): a chat template's marker, never an address's
# `%20` or `%3A%2F%2F`, which the classifier reads as written.
_PERCENT_ESCAPES = re.compile(r"(?:%[0-9A-Fa-f]{2})+")
_MARKUP = frozenset("<>|[]/")
_COMMON = frozenset("the and you are to of a is in that it for your all this with not be as on ignore instructions "
                    "previous now say print reveal system prompt tell me what".split())
MAX_DECODED = 4
# Unicode tag characters (U+E0000-U+E007F) render as nothing; from U+E0020 to U+E007E they mirror printable ASCII
# (U+E0041 is a hidden `A`), and a model reads the text they spell ("ASCII smuggling"): stripped as invisible, that
# text went to the model unjudged. A run is read across the other invisible characters between its tags (a zero-width
# space after each tag hides the text no less).
_TAG_CHARACTERS = re.compile(f"[{_TAGS}]+")
_TAG_LETTER = re.compile("[\U000e0020-\U000e007e]")
_TAG_RUN = re.compile(f"{_TAG_LETTER.pattern}(?:[{_ZERO_WIDTH}{_SELECTORS}]*{_TAG_LETTER.pattern})*")
# Variation selectors (VS1-VS16, U+FE00-U+FE0F, and VS17-VS256, U+E0100-U+E01EF) render as nothing; each may stand
# for one byte (VS1-VS16 the bytes 0-15, VS17-VS256 the bytes 16-255), and selectors after a visible character hide
# a whole text a model can be told to decode ("emoji smuggling"). A variation sequence is one character and ONE
# selector (U+2764 U+FE0F is the red heart emoji, an ideograph with one of VS17-VS256 a registered glyph variant):
# a single selector is left be, but one that selects nothing is hidden text: one that follows another, with nothing
# or only invisible characters between them (a zero-width space or a tag character between hides no less), and one of
# VS17-VS256 after anything but a CJK unified ideograph (the only characters they select a glyph of, in Unicode's
# Ideographic Variation Database): after every letter of a visible sentence, those hide one byte a letter, and every
# byte of UTF-8 text is one of them (16-255).
_IDEOGRAPHS = "\u3400-\u4dbf\u4e00-\u9fff\U00020000-\U0003ffff"
_HIDDEN_SELECTORS = re.compile(f"[{_SELECTORS}](?:[{_ZERO_WIDTH}{_TAGS}]*[{_SELECTORS}])+"
                               f"|(?<![{_IDEOGRAPHS}])[\U000e0100-\U000e01ef]")
# What `without_hidden` removes: every tag character, and every variation selector that selects nothing.
_HIDDEN = re.compile(f"{_HIDDEN_SELECTORS.pattern}|{_TAG_CHARACTERS.pattern}")


def has_hidden_selectors(text: str) -> bool:
    """Whether `text` hides text in variation selectors (`_HIDDEN_SELECTORS`: a run of two or more, or one of
    VS17-VS256 after anything but a CJK ideograph), what `hidden_texts` reads and `without_hidden` removes; an emoji's
    or an ideograph's own single selector (U+26A0 U+FE0F, the warning sign emoji) hides nothing."""
    return _HIDDEN_SELECTORS.search(text) is not None


def has_invisible(text: str) -> bool:
    """True when the text carries an invisible character (`_INVISIBLE`: zero-width, bidi controls, Unicode tag
    characters, variation selectors)."""
    return bool(_INVISIBLE.search(text))


def strip_invisible(text: str) -> str:
    """NFKC, drop the invisible characters (`_INVISIBLE`: zero-width, bidi controls, tag characters, variation
    selectors, every one of them: what they hide is `hidden_texts`'s to read), map look-alike letters to Latin. ASCII
    text is returned as it is: NFKC keeps every ASCII character, and no invisible or look-alike one is ASCII."""
    if text.isascii():
        return text
    return _INVISIBLE.sub("", unicodedata.normalize("NFKC", text)).translate(_CONFUSABLES)


def deleet(text: str) -> str:
    """Map digits and symbols used as letters, only inside words that also contain letters."""
    pieces, done = [], 0
    for run in _LEET_RUN.finditer(text):
        word = _leet_word(text, run)
        if word is not None:
            pieces += [text[done:word.start()], word.group().translate(_LEET)]
            done = word.end()
    return "".join([*pieces, text[done:]])


def _leet_word(text: str, run: re.Match[str]) -> re.Match[str] | None:
    """`_LEET_WORD`'s match in a run of its characters. Only its first word boundary can start one (the lookaheads
    and the closing boundary hold there if anywhere later): searched from every boundary, as `_LEET_WORD.sub` did,
    the lookaheads made `!1!1!1...` quadratic."""
    boundary = _WORD_BOUNDARY.search(text, run.start(), run.end())
    return _LEET_WORD.match(text, boundary.start()) if boundary and boundary.start() < run.end() else None


def _englishness(text: str) -> float:
    """Share of words that are very common English (or injection) words."""
    words = re.findall(r"[a-z]+", text.lower())
    return sum(w in _COMMON for w in words) / len(words) if words else 0.0


def _printable(raw: bytes) -> str | None:
    """Bytes as text when they decode to mostly printable UTF-8."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    printable = sum(ch.isprintable() or ch.isspace() for ch in text)
    return text if text and printable / len(text) > 0.9 else None


def _base64_text(encoded: str) -> str | None:
    """Base64 (standard or URL-safe, padded or not) decoded, when it decodes to mostly printable UTF-8."""
    try:
        raw = base64.b64decode(encoded.translate(_URLSAFE_ALPHABET) + "=" * (-len(encoded) % 4), validate=True)
    except (binascii.Error, ValueError):
        return None
    return _printable(raw)


def encoded_payloads(text: str) -> list[str]:
    """Texts hidden as base64 (standard or URL-safe) or hex inside `text`."""
    runs = [match.group(0) for pattern in (_BASE64, _URLSAFE_BASE64) for match in pattern.finditer(text)]
    found = [decoded for run in runs if (decoded := _base64_text(run)) is not None]
    hexes = (_printable(bytes.fromhex(match.group(0))) for match in _HEX.finditer(text))
    return found + [decoded for decoded in hexes if decoded is not None]


def decoded_payloads(text: str, limit: int | None = MAX_DECODED) -> list[str]:
    """Texts hidden as base64, hex (`encoded_payloads`) or rot13 inside `text` (the first `limit`; None: all)."""
    found = encoded_payloads(text)
    rot = codecs.decode(text, "rot13")
    if _englishness(rot) > max(0.2, 2 * _englishness(text)):
        found.append(rot)
    return found[:limit]


def _selector_byte(ch: str) -> int:
    """The byte a variation selector stands for: VS1-VS16 0-15, VS17-VS256 16-255."""
    return ord(ch) - 0xFE00 if ord(ch) < 0xE0000 else ord(ch) - 0xE0100 + 16


def hidden_texts(text: str) -> list[str]:
    """The texts hidden in `text` that render as nothing but a model reads: the ASCII spelled in Unicode tag
    characters, one per run (`_TAG_RUN`), then the UTF-8 spelled in the variation selectors that select nothing
    (`_HIDDEN_SELECTORS`), all of them as one text, in order (bytes that are not UTF-8 read as U+FFFD)."""
    tagged = ["".join(chr(ord(ch) - 0xE0000) for ch in _TAG_LETTER.findall(run)) for run in _TAG_RUN.findall(text)]
    selected = VARIATION_SELECTOR.findall("".join(_HIDDEN_SELECTORS.findall(text)))
    return tagged + ([bytes(map(_selector_byte, selected)).decode("utf-8", errors="replace")] if selected else [])


def without_hidden(text: str) -> str:
    """`text` without what `hidden_texts` reads: every Unicode tag character and every variation selector that selects
    nothing (`_HIDDEN_SELECTORS`). What a reader sees, all a model is given to read, and all a response carries; a
    variation sequence (U+2764 U+FE0F, the red heart emoji; an ideograph and its glyph's selector) stays."""
    return _HIDDEN.sub("", text)


# A response field holding text a person wrote or a document held (a title, a reason, a snippet): shown as
# `without_hidden` leaves it, whatever was stored.
ShownText = Annotated[str, AfterValidator(without_hidden)]


def _unescape_references(text: str) -> str:
    """HTML character references decoded (`&#73;gnore` is `Ignore` to any reader of markup), and %-escapes that spell
    brackets and pipes (`_escaped_markup`); the rest as it is."""
    unescaped = _CHARACTER_REFERENCE.sub(lambda match: html.unescape(match.group()), text)
    return _PERCENT_ESCAPES.sub(_escaped_markup, unescaped)


def _escaped_markup(match: re.Match[str]) -> str:
    """A run of %-escapes decoded where it spells brackets, pipes and slashes alone, not slashes alone; else kept."""
    decoded = unquote(match.group())
    read = unicodedata.normalize("NFKC", decoded)
    return decoded if set(read) <= _MARKUP and set(read) - {"/"} else match.group()


def normalise(text: str) -> str:
    """One canonical text: the visible letters, words hyphenated across a line wrap joined, de-leeted, with any
    decoded payloads and any text hidden in tag characters or variation selectors (`hidden_texts`) appended."""
    unescaped = _unescape_references(text)
    clean = _SPACES.sub(" ", _WRAPPED_HYPHEN.sub("", strip_invisible(unescaped)))
    visible = deleet(clean)
    extra = [deleet(strip_invisible(p)) for p in [*decoded_payloads(clean), *hidden_texts(unescaped)]]
    return "\n".join([visible, *extra])
