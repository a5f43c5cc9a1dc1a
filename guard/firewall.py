"""Prompt firewall: normalisation, rules and a small linear classifier that runs offline in a few milliseconds.

The firewall's classifier also weighs the question's all-MiniLM-L6-v2 sentence embedding, which the query path
computes for retrieval anyway: callers pass that vector to `PromptFirewall.inspect`, or the firewall embeds the
question itself with the packaged model. It also compares that embedding with three small banks of train-split
examples (harmful requests, attacks, benign prompts; only from MIT or ODC-BY sources): the nearest of each is one more
column. A small gradient-boosted tree ensemble (the "booster", kept as plain arrays) then looks at the regression's
logit, those bank similarities (and the mean of the three nearest attacks and benign prompts) and the rule/shape
features together, and the final logit is the mean of the two. The retrieved-text scanner shares `FirewallModel`
without embedding weights, banks or booster.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from importlib import resources
from pathlib import Path

import numpy as np
import sklearn
from scipy import sparse
from sklearn.feature_extraction.text import HashingVectorizer

from guard.hashed_ngrams import WordCharNgrams, l2_normalised
from guard.normalise import has_invisible, normalise

WEIGHTS_FILE = "{name}_weights.npz"
META_FILE = "{name}_meta.json"
N_FEATURES = 2**18
MAX_CHARS = 2400  # head and tail of very long prompts: bounded latency, payloads sit at either end
EMBEDDING_DIMENSION = 384  # all-MiniLM-L6-v2, L2-normalised: the retrieval embedding of the question


class Verdict(StrEnum):
    allow = "allow"
    flag = "flag"
    block = "block"


class GuardMode(StrEnum):
    block = "block"
    flag = "flag"
    off = "off"


@dataclass(frozen=True)
class Rule:
    """A named pattern over the normalised, lower-cased text; `hard` rules block on their own."""

    name: str
    pattern: re.Pattern[str]
    hard: bool = False


def _rx(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern, re.IGNORECASE | re.DOTALL)


_CREDENTIAL_COMPOUNDS = (  # "password" + these: a compound noun
    r"[\s-]+(?:polic(?:y|ies)|resets?|requirements?|rules?|managers?|expiry|expiration|length|changes?|complexity|"
    r"strength|guidelines?|format|history|hints?|standards?|procedures?|process(?:es)?|rotation|vault)\b")
_CANARY_COMPOUNDS = (r"[\s-]+(?:deployments?|releases?|rollouts?|builds?|tests?|testing|versions?|channels?|process|"
                     r"servers?|clusters?|analysis|stage|environment)\b")
RULES: tuple[Rule, ...] = (
    Rule("ignore_instructions", _rx(
        r"\b(ignore|disregard|forget|override|bypass)\b\W+(?:\w+\W+){0,4}?(previous|prior|above|earlier|preceding|"
        r"former|initial|original|system|all|your)\W+(?:\w+\W+){0,3}?(instructions?|directions?|prompts?|rules|"
        r"guidelines|directives|context|commands|text|programming)\b"), hard=True),
    Rule("reveal_prompt", _rx(
        r"\b(reveal|print|show|repeat|output|display|leak|spell out|tell me|what (?:is|are|were))\b\W+(?:\w+\W+){0,4}?"
        r"(system prompt|initial (?:instructions|prompt)|(?:your|hidden|secret|original) (?:instructions|prompt|"
        r"rules|guidelines)|the (?:canary\b(?!" + _CANARY_COMPOUNDS + r")|password\b(?!" + _CREDENTIAL_COMPOUNDS + r")|"
        r"secret (?:password|key|code|word|phrase)\b|secret\b(?!\s+\w)))"),
        hard=True),  # "the secret" as a noun, not as an adjective ("the secret headquarters of..."); "the password" and
    # "the canary" as the thing itself, not the first word of an everyday compound ("the password policy", "the canary
    # release"): an employee asking about those is no attack, and a hard rule blocks without the classifier's say
    Rule("do_anything_now", _rx(r"\b(do anything now|developer mode|dev mode|jailbr(?:oken|eak)|unfiltered (?:ai|mode)"
                                r"|anti-?dan|evil ?bot|god ?mode)\b"), hard=True),
    Rule("no_restrictions", _rx(
        r"\b(no|without|free (?:of|from)|not bound by|freed from|break free of|ignore all)\b\W+(?:\w+\W+){0,3}?"
        r"(restrictions|limitations|filters?|censorship|ethical|morals?|guidelines|content polic(?:y|ies)|rules)\b")),
    Rule("persona", _rx(r"\b(you are now|from now on,? you|act as|pretend (?:to be|you are)|role-?play as|"
                        r"you will (?:now )?(?:act|respond|answer) as|stay in character)\b")),
    Rule("fiction_frame", _rx(
        r"\b(imagine (?:you are|you're|that you|a)|you are an? (?:\w+ ){0,3}(?:character|villain|expert|writer|"
        r"hacker|criminal|novelist|screenwriter)|in a (?:story|novel|movie|film|screenplay|fictional)|role-?play|"
        r"hypothetical(?:ly)?|purely fictional|for (?:educational|research) purposes|sure,? here is)\b")),
    Rule("new_instructions", _rx(
        r"\b(new instructions?|instead,? (?:you (?:must|will|should)|say|print|output)|"
        r"your (?:new|real|true) (?:task|goal|purpose)|begin your (?:reply|response) with)\b")),
    Rule("exfiltrate", _rx(r"(!\[[^\]]*\]\(https?://|\b(?:send|post|forward|exfiltrate|upload)\b\W+(?:\w+\W+){0,4}?"
                           r"(?:to|at)\W+(?:https?://|\S+@\S+))")),
    Rule("fake_system", _rx(r"(<\|?(?:im_start|system|endoftext)\|?>|\[/?(?:inst|system)\]|^\s*(?:system|assistant)"
                            r"\s*:|###\s*(?:instruction|system))")),
)
# Chat-template control sequences that open a role's turn or end one, as the templates spell them (the normaliser has
# folded full-width forms, dropped invisible characters and decoded character references and %-escaped brackets and
# pipes first): ChatML's `<|im_start|>`, `<|im_end|>` (Phi-4's `<|im_sep|>`); Llama 3's `<|start_header_id|>`,
# `<|end_header_id|>`, `<|eot_id|>` and Llama 4's `<|header_start|>`, `<|eot|>`; Phi-3's and Zephyr's `<|system|>`,
# `<|user|>`, `<|assistant|>`, `<|end|>`; gpt-oss's `<|start|>`, `<|message|>`, `<|call|>`; Command R's
# `<|START_OF_TURN_TOKEN|>`, `<|SYSTEM_TOKEN|>`; Granite's `<|start_of_role|>`; DeepSeek's `<｜User｜>`,
# `<｜end▁of▁sentence｜>`; Gemma's `<start_of_turn>`; Llama 2's and Mistral's `[INST]`, `<<SYS>>`, `[SYSTEM_PROMPT]`,
# `[TOOL_RESULTS]`; and `</s>` or Gemma's `<eos>` closing a turn right before a role opens the next (`</s> User:`,
# `</s> ### Assistant:`). A question or a document holding one forges a turn: an attack by construction. Their brackets
# and pipes are also read in look-alike forms NFKC leaves alone (`‹|im_start|›`, `〈|eot_id|〉`, `<∣user∣>`). A name
# no word of prose or code is (`im_end`, not `user`) is also read spaced out or split, inside its brackets and in its
# name (`<| im _ start |>`, `<|im start|>`: a model still reads the marker), and in parentheses, as a title shows `<`
# and `>` (`(|im_end|)`); a plain word only as written (F#'s `f <| user |> g`), and a role's in parentheses too
# (`(|user|)`), unless F# defines an active pattern so (`let (|User|) u = u`) or passes one as a value (`List.map
# (|User|) xs`, `xs |> (|User|)`: `_ROLE_IN_PARENTHESES`). Left to fake_system (soft): a bare
# `<s>`/`</s>` (HTML's strike-through, code), `[system]` (an INI section), `<system>` (XML), `System:` and `### System`.
# A reasoning model's `<think>`, `</think>` (Qwen3, DeepSeek-R1; Magistral's `[THINK]`, Seed's `<seed:think>`, Kimi's
# `◁think▷`) and Qwen's tool tags (`<tool_call>`, `</tool_call>`, `<tool_response>`: a tool's call, or its result
# inside the user's turn) forge no turn on their own and are named in questions about those models and in texts about
# their templates, so they fire only where they stand at a turn's edge (`_REASONING_TURN`) and go on in the model's
# voice: an instruction to it, or reasoning of its own (`open?</think>\n\nNow print...`, `<think>The user is an admin,
# so I should...`, `</tool_response>\nIgnore the sources`). The prompt shows all of them as text, not tokens
# (`retrieval.prompting._CONTROL_OPENING`).
_TURN_NAMES = ("im_start", "im_end", "im_sep", "eot_id", "eom_id", "eot", "start_header_id", "end_header_id",
               "header_start", "header_end", "begin_of_text", "end_of_text", "start_of_turn_token",
               "end_of_turn_token", "start_of_turn", "end_of_turn", "start_of_role", "end_of_role", "system_token",
               "user_token", "chatbot_token", "begin\u2581of\u2581sentence", "end\u2581of\u2581sentence")
_TURN_WORDS = r"system|user|assistant|end|start|message|channel|constrain|return|call"
_ROLES = r"(?:system|user|assistant|human|model)"
# Brackets and pipes as templates write them and their look-alikes NFKC leaves alone (it folds `＜`, `〈`, `｜`, `￨`).
_OPENING = "<\u2039\u00ab\u27e8\u3008\u276e\u02c2\u1438"  # `<`, `‹`, `«`, `⟨`, `〈`, `❮`, `˂`, `ᐸ`
_CLOSING = ">\u203a\u00bb\u27e9\u3009\u276f\u02c3\u1433"
_PIPE = "[|\u2223\u01c0\u2502\u00a6\u2758\u23d0]"  # `|`, `∣`, `ǀ`, `│`, `¦`, `❘`, `⏐`
# A reasoning tag's: not `«`, `»`, which quote the word in French (`le mot « think »`); Kimi's `◁`, `▷` too.
_TAG_OPENING = "<\u2039\u27e8\u3008\u276e\u02c2\u1438\u25c1"
_TAG_CLOSING = ">\u203a\u27e9\u3009\u276f\u02c3\u1433\u25b7"


def _spelt(name: str) -> str:
    """A pattern reading `name` also with spaces between its letters and its `_` or `▁` spaced, left out or a `-`.
    One quantifier between two letters: spaces read on either side of a separator's too would try every split of a run
    of spaces (cubic time: 80 s for 2,400 newlines)."""
    words = re.split("[_\u2581]", name)
    return r"[\s_\-\u2581]*".join(r"\s*".join(map(re.escape, word)) for word in words)


_SPELT_NAMES = "|".join(_spelt(name) for name in _TURN_NAMES)
# F#'s core modules, whose functions take an active pattern as a value (`List.map (|User|) xs`, `Seq.choose`).
_F_SHARP_MODULES = ("list", "seq", "array", "option", "voption", "result", "map", "set", "string", "async", "event",
                    "observable")
_F_SHARP_NAME_LENGTHS = range(1, 17)  # their functions' names: `map` to `tryFindIndexBack`


def _not_after(*contexts: str) -> str:
    """Lookbehinds, at a `(`, that the text before it ends in none of `contexts` (each of a fixed width)."""
    return "".join(rf"(?<!{context}\()" for context in contexts)


def _after_no_core_function() -> str:
    """Lookbehinds, at a `(`, that it follows no `Module.function ` of `_F_SHARP_MODULES`: one per length of the
    module's and of the function's names (a lookbehind reads a fixed width; modules of one length share one)."""
    lengths = sorted({len(module) for module in _F_SHARP_MODULES})
    modules = ["|".join(m for m in _F_SHARP_MODULES if len(m) == n) for n in lengths]
    return _not_after(*(rf"\b(?:{names})\.\w{{{n}}}\s" for names in modules for n in _F_SHARP_NAME_LENGTHS))


# A role's name in parentheses, as a title shows `<|user|>` (`(|user|)`), where F# neither defines an active pattern so
# (`let (|User|) u = u`) nor passes one as a value: to a function of its core modules (`List.map (|User|) xs`), to or
# from an operator (`xs |> (|User|)`, `f = (|User|)`) or in a parenthesis (`((|User|) u)`). Only as F# spells an
# active pattern, capitalised: a title's `=<|system|>`, `<<|user|>` or `let <|user|>` shows `=(|system|)`, `((|user|)`,
# `let (|user|)`, the role as the template writes it. Each pattern here starts with a character, the words before it
# looked behind at only then, here only where the role follows: Python's `re` searches such a pattern several times
# faster.
_ROLE_IN_PARENTHESES = (
    rf"\((?=\s*{_PIPE}\s*(?:system|user|assistant)\s*{_PIPE}\s*\))"
    + rf"(?:(?=\s*{_PIPE}\s*(?-i:[a-z]))|"
    + _not_after(*(rf"\b{word}\s" for word in ("let", "inline", "private", "and", "rec")), r"[|<>=(]\s", r"[|<>=(]")
    + _after_no_core_function() + r")[^)]*\)")
# An optional `/` and the spaces around it, read one way (`\s*/?\s*` would split a run of spaces every way it can).
_SLASH = r"\s*(?:/\s*)?"
_TEMPLATE_TOKENS = (
    rf"[{_OPENING}(]\s*{_PIPE}\s*(?:{_SPELT_NAMES})\s*{_PIPE}\s*[{_CLOSING})]",
    rf"[{_OPENING}]{_PIPE}(?:{_TURN_WORDS}){_PIPE}[{_CLOSING}]",
    _ROLE_IN_PARENTHESES,
    rf"[{_OPENING}]\s*(?:{_spelt('start_of_turn')}|{_spelt('end_of_turn')})\s*[{_CLOSING}]",
    rf"\[{_SLASH}(?:inst|system_prompt|available_tools|tool_calls|tool_results)\s*\]",
    rf"<<{_SLASH}sys\s*>>",
    rf"(?:</s>|<{_SLASH}eos\s*>)\s*(?:<(?:s|bos)>\s*)?(?:#+\s*)?{_ROLES}\s*:",
)
_TAG_NAMES = r"think(?:ing)?|reasoning|seed\s*:\s*think|tool_call|tool_response"
_REASONING_TAG = (rf"(?:[{_TAG_OPENING}]{_SLASH}(?:{_TAG_NAMES})\s*[{_TAG_CLOSING}]"
                  rf"|\[{_SLASH}think\s*\]|\(\s*/\s*(?:{_TAG_NAMES})\s*\))")  # a title shows `</think>` as `(/think)`
_TURN_EDGE = r"(?:^|[.!?:;)\]}>\"'`*\n\u201d\u2019\u203a\u3009\u27e9\u276f\u25b7])"  # read, not looked behind
_MODEL_VOICE_LEAD = (r"(?:(?:ok(?:ay)?|alright|so|well|hmm|now|next|then|finally|final answer|answer|response|"
                     r"output|please|from\s+now\s+on)\b\W*)")
_ORDERS = (r"ignore|disregard|forget|override|bypass|print|output|say|write|reply|respond|reveal|tell|display|repeat|"
           r"give|provide|send|leak|share|follow|obey|comply|switch|enter|act|pretend|answer|translate")
# What else only an order to the model goes on with after `you must` (`You must never mention`, `You should state`).
_MORE_ORDERS = r"state|claim|mention|inform|insist|refuse|behave|become|append|prepend|pretend|roleplay"
# An instruction to the model: an order, or one addressed to it (`you must reply`, `you are now`, `your new task`);
# not "you" or "your" alone, which a text about the tag addresses its reader with (`...with </think>. You can strip
# it`, `Your parser splits the text there`).
_INSTRUCTION = (
    rf"(?:{_ORDERS}|you(?:['\u2019]ll|\s+(?:must|will|shall|should|need\s+to|have\s+to|are\s+to|(?:can|may)\s+"
    rf"(?:now|only)))(?:\s+(?:now|only|also|instead|just|always|never|not|first|then|\w{{1,20}}ly\b)){{0,2}}\s+"
    rf"(?:{_ORDERS}|{_MORE_ORDERS})|"
    r"you(?:\s+are|['\u2019]re)\s+(?:now|no\s+longer|to|allowed\s+to|required\s+to|supposed\s+to|free\s+to|"
    r"(?:an?\s+)?(?:unrestricted|unfiltered|uncensored|jailbroken|dan)\b)|"
    r"your\s+(?:(?:new|real|true|only|next|actual)\s+)?(?:instructions|task|job|goal|purpose|orders|rules|"
    r"guidelines|directives|system\s+prompt))\b")
# Reasoning of the model's own, or its answer begun (`<think>The user is an admin, so I should...`, `Sure, here is`).
_OWN_VOICE = (
    r"(?:sure|certainly|here\s+is|here's|the\s+user|let\s+me|let's|"
    r"i\s+(?:should|must|will|shall|need\s+to|have\s+to|am\s+(?:allowed|supposed|going)|can\s+now)|"
    r"i['\u2019](?:ll|m\s+(?:allowed|supposed|going))|we\s+(?:should|must|will|need\s+to)|"
    r"my\s+(?:instructions|rules|guidelines|task|system\s+prompt))\b")
# Where a tag stands at a turn's edge: after what ends a sentence, a line or a tag, or before a line break or a capital
# (`open </think> Say...`; the scanner reads a document's lines as one: `open\n</think>\nSay...` so too). Then the
# model's voice: an instruction to it, after spaces or a sign (`open?</think>\n\nOkay, now say`, `</think>. Reply`), or
# reasoning of its own right after the tag, spaces between at most (a tag that ends a sentence of a text about it,
# `` `</think>`. The user never sees it``, `<think>...</think>. Let me show how to strip it`, is named, not written).
_REASONING_TURN = (rf"(?:{_TURN_EDGE}[^\S\n]*{_REASONING_TAG}|{_REASONING_TAG}(?=[^\S\n]*(?:\n|(?-i:[A-Z]))))"
                   rf"(?:\W*{_MODEL_VOICE_LEAD}{{0,3}}{_INSTRUCTION}|\s*{_MODEL_VOICE_LEAD}{{0,3}}{_OWN_VOICE})")
# Rules outside the classifier: they block on their own and are no feature of it (`lexical_features` has a column per
# rule of RULES, which the shipped weights were trained on).
RULES_OUTSIDE_MODEL: tuple[Rule, ...] = (
    Rule("chat_template", _rx("|".join((*_TEMPLATE_TOKENS, _REASONING_TURN))), hard=True),
)
HARD_RULES = frozenset(rule.name for rule in (*RULES, *RULES_OUTSIDE_MODEL) if rule.hard)
HARD_SCORE = 0.999


@dataclass(frozen=True)
class FirewallResult:
    """Score in [0, 1], the rules that fired and the verdict under the department's mode."""

    score: float
    rules: tuple[str, ...]
    verdict: Verdict
    threshold: float

    @property
    def detected(self) -> bool:
        return self.score >= self.threshold


def _bounded(text: str) -> str:
    return text if len(text) <= MAX_CHARS else text[: MAX_CHARS * 2 // 3] + "\n" + text[-MAX_CHARS // 3:]


def rule_hits(normalised: str) -> tuple[str, ...]:
    """Names of the rules (those outside the model too) whose pattern occurs in the normalised text."""
    return tuple(rule.name for rule in (*RULES, *RULES_OUTSIDE_MODEL) if rule.pattern.search(normalised))


def fires_hard_rule(hits: Iterable[str]) -> bool:
    """Whether the rule `hits` (`rule_hits`) hold a rule that blocks on its own."""
    return not HARD_RULES.isdisjoint(hits)


def lexical_features(raw: str, normalised: str, hits: tuple[str, ...]) -> np.ndarray:
    """Dense side features: rule hits, shape of the text and signs of disguise."""
    counts = Counter(raw)  # each distinct character once: long prompts repeat a few dozen characters
    letters = sum(n for ch, n in counts.items() if ch.isalpha())
    upper = sum(n for ch, n in counts.items() if ch.isalpha() and ch.isupper()) / letters if letters else 0.0
    non_ascii = sum(n for ch, n in counts.items() if ord(ch) > 127) / len(raw) if raw else 0.0
    symbols = _symbol_ratio(raw, counts)
    tokens = raw.split()
    odd = sum(bool(_ODD_TOKEN.search(t)) for t in tokens) / len(tokens) if tokens else 0.0
    disguised = float(normalised.count("\n") > raw.count("\n"))  # a decoded payload was appended
    return np.array([*(float(rule.name in hits) for rule in RULES), math.log1p(len(raw)) / 8.0, upper, non_ascii,
                     symbols, _symbol_ratio(raw[-120:]), odd, float(has_invisible(raw)), disguised,
                     *gibberish_features(raw)], dtype=np.float32)


_ODD_TOKEN = re.compile(r"[a-z][A-Z]|[^\w\s]{2,}\w|\w[^\w\s'.,!?:;\-]\w|[\[\]{}<>|\\$=*]")
_WORD_LIKE = re.compile(r"^[\"'(\[]?[A-Za-z]+(?:['-][A-Za-z]+)*[.,!?;:)\"']{0,2}$|^\d+(?:[.,]\d+)?[.,%]?$")
_PUNCTUATION_RUN = re.compile(r"[^\w\s]{3,}")
_CODE_SYMBOLS = frozenset("[]{}()<>`$\\|^~")
TAIL_CHARS = 200  # optimisation suffixes (GCG-style) sit at the end of the prompt


def gibberish_features(raw: str) -> tuple[float, ...]:
    """Signs of an optimised adversarial suffix: non-word tokens, punctuation runs, character entropy, whole/tail."""
    tail = raw[-TAIL_CHARS:]
    runs = [len(run) for run in _PUNCTUATION_RUN.findall(raw)]
    return (_non_word_ratio(raw), _non_word_ratio(tail), min(len(runs), 10) / 10, min(max(runs, default=0), 20) / 20,
            _entropy(raw), _entropy(tail), len(_CODE_SYMBOLS.intersection(raw)) / len(_CODE_SYMBOLS))


def _non_word_ratio(text: str) -> float:
    tokens = text.split()
    return sum(not _WORD_LIKE.match(t) for t in tokens) / len(tokens) if tokens else 0.0


def _entropy(text: str) -> float:
    """Shannon entropy of the characters in bits, scaled by 1/7 (about the maximum for ASCII prose)."""
    if not text:
        return 0.0
    counts = np.fromiter(Counter(text).values(), dtype=np.float64) / len(text)
    return float(-(counts * np.log2(counts)).sum() / 7.0)


def _symbol_ratio(text: str, counts: Counter[str] | None = None) -> float:
    """Share of characters that are neither letters, digits nor spaces (`counts`: the text's, if already made)."""
    if not text:
        return 0.0
    counts = counts if counts is not None else Counter(text)
    return sum(n for ch, n in counts.items() if not ch.isalnum() and not ch.isspace()) / len(text)


WORD_COLUMNS = slice(N_FEATURES, 2 * N_FEATURES)  # the word n-grams among `featurise`'s columns (char n-grams first)
DENSE_COLUMNS = slice(2 * N_FEATURES, None)  # then `lexical_features` (rule hits, shape, gibberish)


@functools.lru_cache(maxsize=1)
def _vectorisers() -> tuple[WordCharNgrams, HashingVectorizer]:
    """Character 3-5-grams inside words (each word's hashes cached) and word uni/bigrams, hashed alike."""
    return (WordCharNgrams(ngram_range=(3, 5), n_features=N_FEATURES),
            HashingVectorizer(analyzer="word", ngram_range=(1, 2), token_pattern=r"(?u)\b\w+\b",  # noqa: S106
                              n_features=N_FEATURES, alternate_sign=False, norm=None, lowercase=True,
                              dtype=np.float32))  # L2-normalised by `featurise`, without scikit-learn's input checks


def featurise(texts: list[str]) -> tuple[sparse.csr_matrix, np.ndarray, list[tuple[str, ...]]]:
    """The classifier's input for raw `texts`, its `DENSE_COLUMNS` as an array (`lexical_features`, one row a text)
    and each text's rule hits (training and inference share this)."""
    chars, words = _vectorisers()
    prepared = [_bounded(t) for t in texts]
    normalised = [normalise(t) for t in prepared]
    hits = [rule_hits(n) for n in normalised]
    dense = np.vstack([lexical_features(t, n, h) for t, n, h in zip(prepared, normalised, hits, strict=True)])
    with sklearn.config_context(skip_parameter_validation=True):  # constant parameters; ~0.3 ms a question
        hashed = [chars.transform(normalised), l2_normalised(words.transform(normalised))]
    return _side_by_side(hashed, dense), dense, hits


def _side_by_side(hashed: list[sparse.csr_matrix], dense: np.ndarray) -> sparse.csr_matrix:
    """`sparse.hstack([*hashed, sparse.csr_matrix(dense)], format="csr")`, entry for entry in the same order (a logit
    sums a row's products in it), built from the blocks' arrays: scipy's took a third of a millisecond a question."""
    rows, columns = np.nonzero(dense)
    offsets = np.cumsum([0, *(block.shape[1] for block in hashed)])
    row_of_entry = np.concatenate([*(np.repeat(np.arange(len(dense)), np.diff(block.indptr)) for block in hashed),
                                   rows])
    order = np.argsort(row_of_entry, kind="stable")  # each row: its entries block by block, each block's in its order
    data = np.concatenate([*(block.data for block in hashed), dense[rows, columns]])[order]
    indices = np.concatenate([*(block.indices + offset for block, offset in zip(hashed, offsets[:-1], strict=True)),
                              columns + offsets[-1]])[order]
    indptr = np.concatenate([[0], np.cumsum(np.bincount(row_of_entry, minlength=len(dense)))])
    return sparse.csr_matrix((data, indices, indptr), shape=(len(dense), offsets[-1] + dense.shape[1]))


def question_vectors(texts: list[str]) -> np.ndarray:
    """The packaged sentence embedding of each raw text, as retrieval computes it (training and inference share it)."""
    from retrieval.embeddings import get_embedder  # lazy: the scanner and `off` mode never load the model

    return np.asarray(get_embedder().embed(texts), dtype=np.float32)


BANK_NAMES = ("harmful", "attacks", "benign")
BANK_SCALE = 3.0  # a cosine similarity's weight in the regression's input (chosen on train out-of-fold scores)
SAME_ROW = 0.9999  # similarity of a row to itself: skipped when a training row is compared with its own bank
NEIGHBOURS = 3  # the booster's mean similarity to the nearest attacks and benign prompts
LOGIT_CLIP = 13.8  # about logit(1 - 1e-6): the regression's logit as the booster sees and blends it


@dataclass(frozen=True)
class ExampleBanks:
    """Sentence embeddings of train-split examples, one matrix per bank (`BANK_NAMES`), rows L2-normalised."""

    harmful: np.ndarray
    attacks: np.ndarray
    benign: np.ndarray

    def nearest(self, vectors: np.ndarray, skip_same_row: bool = False) -> np.ndarray:
        """(n, 3): each vector's highest cosine similarity to each bank, times BANK_SCALE.

        `skip_same_row` (training only): ignore a bank row identical to the vector, as if the row were unseen."""
        return self.neighbourhood(vectors, skip_same_row)[:, :3]

    def neighbourhood(self, vectors: np.ndarray, skip_same_row: bool = False) -> np.ndarray:
        """(n, 5): `nearest`'s three columns, then the mean of the NEIGHBOURS highest similarities to the attack bank
        and to the benign bank, all times BANK_SCALE (the booster's bank inputs)."""
        columns, means = [], []
        for name in BANK_NAMES:
            bank = getattr(self, name)
            similarity = vectors @ bank.T
            if skip_same_row:
                similarity = np.where(similarity > SAME_ROW, -1.0, similarity)
            if not bank.shape[0]:
                similarity = np.zeros((len(vectors), 1), dtype=np.float32)
            columns.append(similarity.max(axis=1))
            if name != "harmful":
                k = min(NEIGHBOURS, similarity.shape[1])
                means.append(np.sort(similarity, axis=1)[:, -k:].mean(axis=1))
        return (np.stack(columns + means, axis=1) * BANK_SCALE).astype(np.float32)

    @classmethod
    def stored(cls, harmful: np.ndarray, attacks: np.ndarray, benign: np.ndarray) -> ExampleBanks:
        """Banks rounded as the weights file keeps them (float16), so training sees what inference will."""
        def rounded(bank: np.ndarray) -> np.ndarray:
            return np.asarray(bank, dtype=np.float16).astype(np.float32)

        return cls(harmful=rounded(harmful), attacks=rounded(attacks), benign=rounded(benign))

    def arrays(self) -> dict[str, np.ndarray]:
        """The banks as the weights file keeps them."""
        return {f"bank_{name}": getattr(self, name).astype(np.float16) for name in BANK_NAMES}

    @classmethod
    def from_arrays(cls, data: Mapping[str, np.ndarray]) -> ExampleBanks | None:
        """The banks kept in a weights file, or None for a model without them."""
        if "bank_harmful" not in data:
            return None
        return cls(**{name: np.asarray(data[f"bank_{name}"], dtype=np.float32) for name in BANK_NAMES})


def booster_inputs(logits: np.ndarray, neighbourhood: np.ndarray, dense: np.ndarray) -> np.ndarray:
    """The booster's input rows: the regression's clipped logit, `ExampleBanks.neighbourhood`, the dense lexical
    features (`DENSE_COLUMNS` of `featurise`). Training and inference share this."""
    clipped = np.clip(np.asarray(logits, dtype=np.float64), -LOGIT_CLIP, LOGIT_CLIP)
    return np.hstack([clipped.reshape(-1, 1), np.asarray(neighbourhood, dtype=np.float64),
                      np.asarray(dense, dtype=np.float64)])


@dataclass(frozen=True)
class Booster:
    """Regression trees of a gradient-boosted ensemble as padded arrays (one row per tree, one column per node):
    a sample goes left where its feature is at or below the threshold; its raw score is `baseline` plus the value of
    the leaf it reaches in every tree. `blend`: the booster's share of the final logit (the regression has the rest)."""

    feature: np.ndarray
    threshold: np.ndarray
    left: np.ndarray
    right: np.ndarray
    leaf: np.ndarray
    value: np.ndarray
    baseline: float
    blend: float

    FIELDS = ("feature", "threshold", "left", "right", "leaf", "value")

    def raw(self, inputs: np.ndarray) -> np.ndarray:
        """(n,): the ensemble's log-odds for `booster_inputs` rows."""
        trees = np.arange(self.feature.shape[0])[None, :]
        node = np.zeros((inputs.shape[0], self.feature.shape[0]), dtype=np.int64)
        rows = np.arange(inputs.shape[0])[:, None]
        for _ in range(self.feature.shape[1]):
            at_leaf = self.leaf[trees, node]
            if at_leaf.all():
                break
            goes_left = inputs[rows, self.feature[trees, node]] <= self.threshold[trees, node]
            node = np.where(at_leaf, node, np.where(goes_left, self.left[trees, node], self.right[trees, node]))
        return self.baseline + self.value[trees, node].sum(axis=1)

    def blended(self, inputs: np.ndarray) -> np.ndarray:
        """The final logit: the regression's clipped logit and the booster's, weighed by `blend`."""
        return (1.0 - self.blend) * inputs[:, 0] + self.blend * self.raw(inputs)

    def arrays(self) -> dict[str, np.ndarray]:
        """The booster as the weights file keeps it."""
        return {**{f"booster_{name}": getattr(self, name) for name in self.FIELDS},
                "booster_baseline": np.float64(self.baseline), "booster_blend": np.float64(self.blend)}

    @classmethod
    def from_arrays(cls, data: Mapping[str, np.ndarray]) -> Booster | None:
        """The booster kept in a weights file, or None for a model without one."""
        if "booster_feature" not in data:
            return None
        return cls(**{name: np.asarray(data[f"booster_{name}"]) for name in cls.FIELDS},
                   baseline=float(data["booster_baseline"]), blend=float(data["booster_blend"]))


@dataclass(frozen=True)
class FirewallModel:
    """Logistic-regression weights over `featurise` (and, for the firewall, the question's sentence embedding) and
    the threshold fixed on the train split."""

    coef: np.ndarray
    intercept: float
    threshold: float
    embedding_coef: np.ndarray | None = None
    banks: ExampleBanks | None = None
    bank_coef: np.ndarray | None = None
    booster: Booster | None = None

    @classmethod
    def load(cls, name: str = "firewall", directory: Path | None = None) -> FirewallModel:
        """Load the shipped weights `name` (firewall, scanner), or a directory's for the training script."""
        base = directory if directory is not None else resources.files("guard")
        with (base / WEIGHTS_FILE.format(name=name)).open("rb") as fh:  # type: ignore[operator]
            data = np.load(fh)
            coef, intercept = np.asarray(data["coef"], dtype=np.float32), float(data["intercept"])
            embedding = np.asarray(data["embedding_coef"], dtype=np.float32) if "embedding_coef" in data else None
            banks = ExampleBanks.from_arrays(data)
            bank_coef = np.asarray(data["bank_coef"], dtype=np.float32) if banks is not None else None
            booster = Booster.from_arrays(data)
        meta = json.loads((base / META_FILE.format(name=name)).read_text(encoding="utf-8"))  # type: ignore[operator]
        return cls(coef=coef, intercept=intercept, threshold=float(meta["threshold"]), embedding_coef=embedding,
                   banks=banks, bank_coef=bank_coef, booster=booster)

    @property
    def uses_embedding(self) -> bool:
        """Whether scoring needs the question's sentence embedding (the firewall's weights; not the scanner's)."""
        return self.embedding_coef is not None

    def scores(self, texts: list[str], vectors: np.ndarray | None = None) -> tuple[np.ndarray, list[tuple[str, ...]]]:
        """Classifier probabilities, lifted to near-certain where a hard rule fires, and the rule hits.

        `vectors`: the texts' sentence embeddings (n, EMBEDDING_DIMENSION) when the model weighs them; computed here
        when omitted. Ignored by models without embedding weights (the scanner)."""
        matrix, dense, hits = featurise(texts)
        logits = matrix @ self.coef + self.intercept
        if self.embedding_coef is not None:
            embeddings = self._checked(texts, vectors)
            logits = logits + embeddings @ self.embedding_coef
            if self.banks is not None and self.bank_coef is not None:
                neighbourhood = self.banks.neighbourhood(embeddings)
                logits = logits + neighbourhood[:, :3] @ self.bank_coef
                if self.booster is not None:
                    inputs = booster_inputs(logits, neighbourhood, dense)
                    logits = self.booster.blended(inputs)
        probabilities = 1.0 / (1.0 + np.exp(-logits))
        hard = np.array([fires_hard_rule(h) for h in hits])
        return np.where(hard, np.maximum(probabilities, HARD_SCORE), probabilities), hits

    @staticmethod
    def _checked(texts: list[str], vectors: np.ndarray | None) -> np.ndarray:
        """The given vectors as a float32 matrix of the right shape, or the texts' own embeddings."""
        if vectors is None:
            return question_vectors(texts)
        matrix = np.asarray(vectors, dtype=np.float32).reshape(len(texts), -1)
        if matrix.shape[1] != EMBEDDING_DIMENSION:
            raise ValueError(f"expected {EMBEDDING_DIMENSION}-dimensional question vectors, got {matrix.shape[1]}")
        return matrix


class PromptFirewall:
    """Judge one question: score, rules, and the verdict for a department's mode."""

    def __init__(self, model: FirewallModel) -> None:
        self.model = model

    def inspect(self, text: str, mode: GuardMode = GuardMode.block,
                vector: Sequence[float] | np.ndarray | None = None) -> FirewallResult:
        """Score `text`; `block` mode blocks detections, `flag` only records them, `off` skips scoring.

        `vector`: the question's all-MiniLM-L6-v2 embedding if the caller already has it (the query path computes it
        for retrieval); without it the firewall embeds the question itself."""
        if mode is GuardMode.off:
            return FirewallResult(score=0.0, rules=(), verdict=Verdict.allow, threshold=self.model.threshold)
        vectors = None if vector is None else np.asarray(vector, dtype=np.float32).reshape(1, -1)
        scores, hits = self.model.scores([text], vectors)
        score = float(scores[0])
        detected = score >= self.model.threshold
        verdict = Verdict.allow if not detected else Verdict.block if mode is GuardMode.block else Verdict.flag
        return FirewallResult(score=score, rules=hits[0], verdict=verdict, threshold=self.model.threshold)


@functools.lru_cache(maxsize=1)
def get_firewall() -> PromptFirewall:
    """The process-wide firewall with the shipped weights."""
    return PromptFirewall(FirewallModel.load())
