"""Deterministic extractive answers: the best passage sentences, each with its citation."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from core.cache import BoundedCache
from guard.placeholders import numbered_pattern

if TYPE_CHECKING:
    from retrieval.embeddings import TextEmbedder

COSINE_WEIGHT = 0.7
OVERLAP_WEIGHT = 0.3
PASSAGE_BOOST = 0.1  # times the passage's own (clamped) vector-search score
ANSWER_TYPE_BONUS = 0.08  # ranking only; never lifts a sentence over min_relevance
OVERLAP_FULL_AT_COSINE = 0.4  # shared words count fully only once meaning is this close
RELATIVE_MARGIN = 0.25  # extra sentences must score within this of the best one
DUPLICATE_COSINE = 0.9
MIN_SENTENCE_CHARS = 20
MAX_EMBEDDED = 24  # sentences embedded at query time per answer, at most (precomputed ones are free)
SENTENCE_KEY_BYTES = 8
ELLIPSIS = "…"  # marks where a snippet cuts its chunk
VECTOR_CACHE_SIZE = 50_000  # sentence vectors kept per process (~75 MiB)

_VECTOR_CACHE: BoundedCache[tuple[int, bytes], np.ndarray] = BoundedCache(VECTOR_CACHE_SIZE)


@dataclass(frozen=True)
class Passage:
    """A retrieved, redacted chunk with its 1-based citation number and, when ingestion stored them, the
    vectors of its scored sentences, keyed by `sentence_key` (see retrieval/sentence_vectors.py)."""

    n: int
    text: str
    score: float
    vectors: Mapping[bytes, np.ndarray] | None = None


@dataclass(frozen=True)
class ExtractiveAnswer:
    """Rendered answer text, the citation numbers it uses (in order of first use), and the first sentence it quotes
    from each (as the passage has it, for the citation's snippet)."""

    text: str
    cited: tuple[int, ...]
    quoted: Mapping[int, str] = field(default_factory=dict)


@dataclass(frozen=True)
class _Candidate:
    """One sentence of one passage, with its scores."""

    n: int
    position: int
    text: str
    relevance: float
    rank: float


# --------------------------------------------------------------------------- splitting

_ABBREVIATIONS = frozenset(
    """
    e.g i.e cf vs viz al approx appt apt dept est fig figs min max vol vols
    dr mr mrs ms mx prof sr jr st mt rev gen col lt sgt capt hon inc ltd co corp
    jan feb mar apr jun jul aug sep sept oct nov dec mon tue wed thu fri
    sec ch p pp para ref tel ext u.s u.k e.u a.m p.m ph.d
    """.split()
)
_BULLET = re.compile(r"^\s*(?:[-*+\u2022\u2023\u25e6\u2043\u2219]|\(?\d{1,3}[.)]|\(?[a-zA-Z][.)])\s+")
_HEADING = re.compile(r"^\s*#{1,6}\s")
_TERMINAL = re.compile(r"[.!?:;][\"')\]]*$")
# Tried only where a run of `.!?` starts (tried at each dot of `.....` it took quadratic time); group 1 ends the head.
_BOUNDARY = re.compile(r"(?<![.!?])([.!?]+[\"')\]\u201d\u2019]*)\s+(?=[\"'(\[\u201c\u2018<A-Z0-9])")
_WORD_BEFORE = re.compile(r"([A-Za-z][A-Za-z.]*)\.$")
_WORD_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.")
_SPACES = re.compile(r"\s+")
_TABLE_RULE = re.compile(r"^[\s:|-]+$")  # what `^\s*\|?[\s:|-]+\|?\s*$` matched, without its quadratic backtracking
_QUOTED_MARKER = re.compile(r"\[(\d+)\]")  # a `[4]` in quoted text would read as a citation


def _is_abbreviation(head: str) -> bool:
    """True when `head` (text up to and including a period) ends with an abbreviation."""
    match = _WORD_BEFORE.search(head)
    if match is None:
        return False
    word = match.group(1).lower().rstrip(".")
    if len(word) == 1:
        return True  # an initial, as in "J. Smith"
    return word in _ABBREVIATIONS


def _paragraphs(text: str, *, headings: bool = False) -> list[tuple[str, str]]:
    """(heading, block) pairs: blank lines, bullets and headings start a new block; with `headings`, each heading's
    own text is a block too (a reader reads it)."""
    blocks: list[tuple[str, str]] = []
    heading = ""
    current: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        starts_block = not line or bool(_HEADING.match(line) or _TABLE_RULE.match(line))
        if current and (starts_block or _BULLET.match(line) or not _is_continuation(current[-1], line)):
            blocks.append((heading, " ".join(current)))
            current = []
        if _HEADING.match(line):
            heading = _SPACES.sub(" ", line.lstrip("#")).strip()
            if headings:
                blocks.append((heading, heading))
        elif not starts_block:
            current.append(_BULLET.sub("", line, count=1))
    if current:
        blocks.append((heading, " ".join(current)))
    return blocks


def _is_continuation(previous: str, line: str) -> bool:
    """A hard-wrapped line: the previous one has no terminal mark and this one starts lower-case."""
    return not _TERMINAL.search(previous) and line[:1].islower()


def _last_word(block: str, start: int, end: int) -> str:
    """The run of letters and dots ending at `end` (not before `start`): all `_WORD_BEFORE` reads of a head, taken
    without copying or searching the whole head (which grows while abbreviations are skipped)."""
    first = end
    while first > start and block[first - 1] in _WORD_CHARS:
        first -= 1
    return block[first:end]


def _split_block(block: str) -> list[str]:
    """Split one block at sentence-ending punctuation, sparing abbreviations."""
    sentences: list[str] = []
    start = 0
    for match in _BOUNDARY.finditer(block):
        head_end = match.end(1)
        if block[head_end - 1] == "." and _is_abbreviation(_last_word(block, start, head_end)):
            continue
        sentences.append(block[start:head_end])
        start = match.end()
    sentences.append(block[start:])
    return sentences


def _keep(sentence: str) -> bool:
    """Whether a fragment is worth quoting: long enough and made of words."""
    return len(sentence) >= MIN_SENTENCE_CHARS and any(ch.isalpha() for ch in sentence)


def _sentences_in_context(text: str, *, every: bool = False) -> list[tuple[str, str]]:
    """(heading, sentence) pairs; the heading is the latest markdown heading above, or "". With `every`, also the
    sentences too short or bare to quote and those of the headings themselves."""
    result: list[tuple[str, str]] = []
    keep = bool if every else _keep
    for heading, block in _paragraphs(text, headings=every):
        for piece in _split_block(block):
            sentence = _SPACES.sub(" ", piece).strip()
            if keep(sentence):
                result.append((heading, sentence))
    return result


def split_sentences(text: str, *, every: bool = False) -> list[str]:
    """Split text into quotable sentences (lists, newlines and headings respected); with `every`, also those too
    short or bare to quote (`CEO earns 4M.`) and the headings' own (`# CEO earns 4M`): every sentence a reader
    reads."""
    return [sentence for _, sentence in _sentences_in_context(text, every=every)]


def scored_sentences(text: str) -> list[str]:
    """The texts whose vectors an answer compares with the question: each sentence with its heading."""
    return [scored for scored, _ in sentence_spans(text)]


def sentence_key(scored: str) -> bytes:
    """The lookup key of one scored sentence text (a digest: the text itself is never a key)."""
    return hashlib.sha256(scored.encode()).digest()[:SENTENCE_KEY_BYTES]


def sentence_spans(text: str) -> list[tuple[str, tuple[int, int]]]:
    """Each scored sentence text with the character span of its sentence in `text` ((-1, -1) if not found)."""
    found, position = [], 0
    for heading, sentence in _sentences_in_context(text):
        span = find_words(text, sentence.split(), position)
        position = span[1] if span else position
        found.append((_with_heading(heading, sentence), span or (-1, -1)))
    return found


def find_words(text: str, words: list[str], position: int = 0) -> tuple[int, int] | None:
    """The leftmost span at or after `position` where `words` appear in order, separated only by whitespace: what
    the regex `\\s+`.join(words) finds, without compiling a pattern per sentence."""
    if not words:
        return position, position
    start = text.find(words[0], position)
    while start >= 0:
        end = _words_follow(text, words, start)
        if end is not None:
            return start, end
        start = text.find(words[0], start + 1)
    return None


def _words_follow(text: str, words: list[str], start: int) -> int | None:
    """Where the run of `words` starting at `start` ends, if each next word follows after some whitespace."""
    cursor = start + len(words[0])
    for word in words[1:]:
        gap_end = cursor
        while gap_end < len(text) and text[gap_end].isspace():
            gap_end += 1
        if gap_end == cursor or not text.startswith(word, gap_end):
            return None
        cursor = gap_end + len(word)
    return cursor


def quote_window(text: str, sentence: str | None, limit: int) -> str:
    """At most `limit` characters of `text`, from where `sentence` first occurs in it (its start when `sentence` is
    None or not found), reaching further back when the text ends first; cut between words, each cut marked `…`."""
    if len(text) <= limit:
        return text
    span = find_words(text, sentence.split()) if sentence else None
    budget = limit - 2 * len(ELLIPSIS)
    start = span[0] if span else 0
    end = min(len(text), start + budget)
    widened = max(0, min(start, end - budget))
    start = start if widened == start else _next_word_start(text, widened, end)
    end = _last_word_end(text, start, end)
    lead = ELLIPSIS if text[:start].strip() else ""
    tail = ELLIPSIS if text[end:].strip() else ""
    return f"{lead}{text[start:end].strip()}{tail}"


def _next_word_start(text: str, start: int, end: int) -> int:
    """`start`, or past the word it cuts in half (unless that word fills the window)."""
    cut = start
    while 0 < cut < end and not text[cut - 1].isspace():
        cut += 1
    return cut if cut < end else start


def _last_word_end(text: str, start: int, end: int) -> int:
    """`end`, or back before the word it cuts in half (unless that word fills the window)."""
    cut = end
    while start < cut < len(text) and not text[cut].isspace():
        cut -= 1
    return cut if cut > start else end


# --------------------------------------------------------------------------- lexical

_STOP_WORDS = frozenset(
    """
    a about above after again against all am an and any are as at be because been before
    being below between both but by can could did do does doing done down during each
    either else etc ever every few for from further get gets got had has have having he
    her here hers herself him himself his how however i if in into is it its itself just
    let lets like may me might more most much must my myself neither no nor not now of off
    on once only or other ought our ours ourselves out over own per please same shall she
    should so some such than that the their theirs them themselves then there these they
    this those through to too under until up upon us very was we were what whatever when
    whenever where whereas wherever whether which while who whoever whom whose why will
    with within without would yet you your yours yourself yourselves tell know many
    """.split()
)
_TOKEN = re.compile(r"[^\W_]+(?:'[^\W_]+)?")  # words in any script: a Cyrillic claim has terms too
# Scripts written without spaces (Han, kana, Thai, Lao, Myanmar, Khmer): a run of them is cut into character bigrams.
UNSPACED = ("\u0e00-\u0eff\u1000-\u109f\u1780-\u17ff"  # Thai, Lao, Myanmar, Khmer
            "\u3041-\u30fa\u30fc-\u30ff"  # kana (not the middle dot)
            "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f")  # Han
_UNSPACED_RUN = re.compile(f"[{UNSPACED}]+")


def _stem(word: str) -> str:
    """A deliberately light suffix stripper (plural, -ing, -ed, final e)."""
    if len(word) > 4 and word.endswith("ies"):
        word = word[:-3] + "y"
    elif len(word) > 4 and word.endswith(("sses", "xes", "ches", "shes", "zes")):
        word = word[:-2]
    elif len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        word = word[:-1]
    if len(word) > 5 and word.endswith("ing"):
        word = word[:-3]
    elif len(word) > 4 and word.endswith("ed"):
        word = word[:-2]
    if len(word) > 3 and word.endswith("e"):
        word = word[:-1]
    return word


def _content_token(token: str) -> str | None:
    """The token without a possessive; None for contractions, stop-words and stray letters."""
    base, _, suffix = token.partition("'")
    if suffix and suffix != "s":
        return None  # I'm, don't, we're: function words
    if base in _STOP_WORDS or (len(base) < 2 and not base.isdigit()):
        return None
    return base


def _bigrams(run: str) -> list[str]:
    """Overlapping character pairs of a run in a script without spaces (a lone character stands for itself)."""
    return [run[i:i + 2] for i in range(max(1, len(run) - 1))]


def content_terms(text: str) -> frozenset[str]:
    """Lower-cased, stemmed content words of `text` (stop-words and contractions dropped), and the character bigrams
    of its runs in scripts written without spaces."""
    text = text.lower().replace("\u2019", "'")
    tokens = (_content_token(token) for token in _TOKEN.findall(_UNSPACED_RUN.sub(" ", text)))
    bigrams = (pair for run in _UNSPACED_RUN.findall(text) for pair in _bigrams(run))
    return frozenset(_stem(token) for token in tokens if token).union(bigrams)


def _overlap(question_terms: frozenset[str], sentence: str, cosine: float) -> float:
    """Smoothed share of question terms in the sentence, damped when meanings diverge."""
    if not question_terms:
        return 0.0
    shared = len(question_terms & content_terms(sentence)) / (len(question_terms) + 1)
    return shared * min(max(cosine / OVERLAP_FULL_AT_COSINE, 0.0), 1.0)


# --------------------------------------------------------------------------- answer types

_MONTHS = (
    r"jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|may|jun(?:e)?|jul(?:y)?|aug(?:ust)?"
    r"|sep(?:t(?:ember)?)?|oct(?:ober)?|nov(?:ember)?|dec(?:ember)?"
)
_DATE = re.compile(
    r"\b(?:1[89]|20)\d{2}\b|\b\d{1,4}[/.-]\d{1,2}[/.-]\d{1,4}\b"
    rf"|\b(?:{_MONTHS})\b\.?\s*\d|\d(?:\s*(?:st|nd|rd|th))?\s+(?:of\s+)?(?:{_MONTHS})\b"  # no \s*\s+: quadratic
    r"|\b(?:monday|tuesday|wednesday|thursday|friday|saturday|sunday|quarter|q[1-4])\b"
    rf"|{numbered_pattern('DATE', 'DATE_TIME')}",
    re.IGNORECASE,
)
_NUMBER_WORDS = (
    r"one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|fifteen|twenty|thirty"
    r"|forty|fifty|hundred|thousand|million|billion|half|quarter|dozen"
)
_NUMBER = re.compile(rf"\d|%|\b(?:{_NUMBER_WORDS})\b|\bper\s?cent\b", re.IGNORECASE)
_PERSON = re.compile(rf"{numbered_pattern('PERSON')}|\b(?:Dr|Mr|Mrs|Ms|Mx|Prof)\.?\s+[A-Z]"
                     r"|(?<=\w\s)[A-Z][a-z]+\s+[A-Z][a-z]+")
_QUESTION_TYPES: tuple[tuple[re.Pattern[str], re.Pattern[str]], ...] = (
    (re.compile(r"^(?:when|by when|until when|what (?:date|day|year|time)|which (?:date|day|year))\b"), _DATE),
    (
        re.compile(r"^(?:how (?:much|many|long|often)|what (?:percentage|percent|proportion|share|number))\b"),
        _NUMBER,
    ),
    (re.compile(r"^(?:who|whom|whose)\b"), _PERSON),
)


def expected_answer_type(question: str) -> re.Pattern[str] | None:
    """The pattern a good answer sentence should contain, judged from the question's opening."""
    opening = _SPACES.sub(" ", re.sub(r"^[^a-z]+", "", question.lower())).strip()
    for asks, pattern in _QUESTION_TYPES:
        if asks.match(opening):
            return pattern
    return None


# --------------------------------------------------------------------------- scoring


def _unit(vector: Sequence[float] | np.ndarray, dimension: int) -> np.ndarray:
    """The question vector as a float32 unit vector of the embedder's dimension."""
    array = np.asarray(vector, dtype=np.float32).reshape(-1)
    if array.shape[0] != dimension:
        raise ValueError(f"question vector has dimension {array.shape[0]}, expected {dimension}")
    norm = float(np.linalg.norm(array))
    return array / norm if norm > 0.0 else array


def _with_heading(heading: str, sentence: str) -> str:
    """The text embedded for a sentence: prefixed by its section heading, for context."""
    return f"{heading}: {sentence}" if heading else sentence


def _candidates(
    question: str, question_vector: np.ndarray, passages: list[Passage], embedder: TextEmbedder
) -> tuple[list[_Candidate], np.ndarray]:
    """Score every sentence of every passage; also return the sentence embeddings."""
    located = [
        _Located(passage, position, sentence, _with_heading(heading, sentence))
        for passage in passages
        for position, (heading, sentence) in enumerate(_sentences_in_context(passage.text))
    ]
    if not located:
        return [], np.zeros((0, embedder.dimension), dtype=np.float32)
    terms = content_terms(question)
    known = [_stored_vector(item) for item in located]
    located, known = _preselect(located, known, terms)
    vectors = _sentence_vectors(embedder, [item.scored for item in located], known)
    cosines = vectors @ question_vector
    wanted = expected_answer_type(question)
    candidates = []
    for item, cosine in zip(located, cosines, strict=True):
        relevance = (
            COSINE_WEIGHT * float(cosine)
            + OVERLAP_WEIGHT * _overlap(terms, item.sentence, float(cosine))
            + PASSAGE_BOOST * min(max(item.passage.score, 0.0), 1.0)
        )
        bonus = ANSWER_TYPE_BONUS if wanted is not None and wanted.search(item.sentence) else 0.0
        candidates.append(_Candidate(item.passage.n, item.position, item.sentence, relevance, relevance + bonus))
    return candidates, vectors


@dataclass(frozen=True)
class _Located:
    """A sentence of a passage: where it is, its text, and the text its vector stands for."""

    passage: Passage
    position: int
    sentence: str
    scored: str


def _stored_vector(item: _Located) -> np.ndarray | None:
    """The vector ingestion stored for this exact sentence, if any."""
    vectors = item.passage.vectors
    return None if vectors is None else vectors.get(sentence_key(item.scored))


def _preselect(
    located: list[_Located], known: list[np.ndarray | None], terms: frozenset[str]
) -> tuple[list[_Located], list[np.ndarray | None]]:
    """Every sentence with a stored vector is kept; of the others at most MAX_EMBEDDED go to the embedder —
    those sharing most words with the question, then those of the best passages. Keeps query cost bounded
    however long the chunks are."""
    missing = [i for i, vector in enumerate(known) if vector is None]
    if len(missing) <= MAX_EMBEDDED:
        return located, known

    def cheap(i: int) -> tuple[float, float, int, int]:
        item = located[i]
        return (-len(terms & content_terms(item.sentence)), -item.passage.score, item.passage.n, item.position)

    dropped = set(sorted(missing, key=cheap)[MAX_EMBEDDED:])
    kept = [i for i in range(len(located)) if i not in dropped]
    return [located[i] for i in kept], [known[i] for i in kept]


def _sentence_vectors(embedder: TextEmbedder, texts: list[str], known: list[np.ndarray | None]) -> np.ndarray:
    """Stored vectors where ingestion computed them; the rest embedded now, through a bounded per-process cache."""
    rows = list(known)
    keys = {i: (id(embedder), hashlib.sha256(texts[i].encode()).digest()) for i, row in enumerate(rows) if row is None}
    for i, key in keys.items():
        rows[i] = _VECTOR_CACHE.get(key)
    missing = [i for i in keys if rows[i] is None]
    if missing:
        for i, vector in zip(missing, embedder.embed([texts[i] for i in missing]), strict=True):
            rows[i] = vector
            _VECTOR_CACHE.put(keys[i], vector)
    return np.stack(rows).astype(np.float32, copy=False)


def _choose(
    candidates: list[_Candidate], vectors: np.ndarray, max_sentences: int, min_relevance: float
) -> list[_Candidate]:
    """Best-ranked relevant sentences, skipping near-duplicates of ones already chosen."""
    order = sorted(range(len(candidates)), key=lambda i: _rank_key(candidates[i]))
    floor = max(min_relevance, max(c.relevance for c in candidates) - RELATIVE_MARGIN)
    chosen: list[int] = []
    for index in order:
        if len(chosen) >= max_sentences:
            break
        if candidates[index].relevance < floor:
            continue
        if chosen and float(np.max(vectors[chosen] @ vectors[index])) > DUPLICATE_COSINE:
            continue
        chosen.append(index)
    return [candidates[i] for i in chosen]


def _rank_key(candidate: _Candidate) -> tuple[float, int, int]:
    """Highest rank first; ties broken by citation number, then position."""
    return (-round(candidate.rank, 6), candidate.n, candidate.position)


def _unmarked(sentence: str) -> str:
    """The sentence with any bracketed number it quotes as `(n)`."""
    return _QUOTED_MARKER.sub(r"(\1)", sentence)


def _render(chosen: list[_Candidate]) -> ExtractiveAnswer:
    """Order sentences by passage and position, and append each one's citation (the only `[n]` in the answer:
    quoted ones become `(n)`)."""
    ordered = sorted(chosen, key=lambda c: (c.n, c.position))
    text = " ".join(f"{_unmarked(c.text)} [{c.n}]" for c in ordered)
    cited = tuple(dict.fromkeys(c.n for c in ordered))
    quoted = {c.n: c.text for c in reversed(ordered)}  # reversed: the first sentence of each passage stays
    return ExtractiveAnswer(text=text, cited=cited, quoted=quoted)


def extractive_answer(
    question: str,
    question_vector: Sequence[float] | np.ndarray,
    passages: list[Passage],
    embedder: TextEmbedder,
    *,
    max_sentences: int = 3,
    min_relevance: float = 0.30,
) -> ExtractiveAnswer | None:
    """Answer with up to `max_sentences` cited passage sentences, or None if none is relevant."""
    if not passages or max_sentences < 1:
        return None
    unit = _unit(question_vector, embedder.dimension)
    candidates, vectors = _candidates(question, unit, passages, embedder)
    if not candidates or max(c.relevance for c in candidates) < min_relevance:
        return None
    return _render(_choose(candidates, vectors, max_sentences, min_relevance))
