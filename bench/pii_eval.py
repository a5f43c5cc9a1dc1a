"""PII span precision/recall per entity type and overall F2 on presidio_synth_pii (eval split by default).

Split rule (shared/eval/README.md): template_id even = train (tuning only), odd = eval (reported).
Out-of-fold choices on train: `--split train --fold K` scores only the train templates of fold K (of FOLDS), for a
model trained without them (`python -m bench.train_pii_ner --fold K`). The name rules of guard/pii_rules.py were
written on train templates and lift held-out train recall far above eval's: `--without-name-rules` scores without
them, so a choice is seen to hold when they miss. `--person-bias B` adds B to the model's own bar for names
(bench/train_pii_ner.py PERSON_START_BIAS) without retraining.
Usage: .venv/bin/python bench/pii_eval.py [--split eval|train] [--fold K] [--data PATH] [--model DIR]
       [--without-name-rules] [--person-bias B] [--show-errors N]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from guard.pii import LANGUAGE, PII_NER_PATH, PiiRedactor, resolve_overlaps  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared/eval/presidio_synth_pii/synth_dataset_v2.spans.jsonl"
# Gold label → the entity type govrag redacts it as; labels not listed are not PII govrag redacts.
LABEL_MAP = {
    "PERSON": "PERSON",
    "EMAIL_ADDRESS": "EMAIL_ADDRESS",
    "PHONE_NUMBER": "PHONE_NUMBER",
    "CREDIT_CARD": "CREDIT_CARD",
    "US_SSN": "US_SSN",
    "IBAN_CODE": "IBAN_CODE",
    "IP_ADDRESS": "IP_ADDRESS",
}
TARGETS = ("EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "US_SSN", "IBAN_CODE")
BETA = 2.0
NAME_RULES = "GovragPersonContextRecognizer"  # guard/pii_rules.py's recognizer of people named by context
FOLDS = 3  # groups of train templates for out-of-fold choices


@dataclass
class Tally:
    """Span counts of one entity type."""

    gold: int = 0
    predicted: int = 0
    recalled: int = 0  # gold spans overlapped by a prediction of the same type
    precise: int = 0  # predictions overlapping a gold span of the same type
    exact: int = 0  # gold spans predicted with identical offsets

    def precision(self) -> float:
        return self.precise / self.predicted if self.predicted else 1.0

    def recall(self) -> float:
        return self.recalled / self.gold if self.gold else 1.0


def f_beta(precision: float, recall: float, beta: float = BETA) -> float:
    """Return the F-beta score (F2 weighs recall four times as much as precision)."""
    if precision == 0 and recall == 0:
        return 0.0
    return (1 + beta**2) * precision * recall / (beta**2 * precision + recall)


def in_fold(template_id: int, fold: int) -> bool:
    """Whether a train template (even id) belongs to one of the FOLDS groups."""
    return template_id // 2 % FOLDS == fold


def load(path: Path, split: str, fold: int | None = None) -> list[dict]:
    """Return the rows of one split (template_id even = train, odd = eval), or of one fold of train."""
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    want = {"train": 0, "eval": 1}[split]
    return [row for row in rows if int(row["template_id"]) % 2 == want
            and (fold is None or in_fold(int(row["template_id"]), fold))]


def _overlaps(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def score(rows: list[dict], redactor: PiiRedactor,
          show_errors: int = 0) -> tuple[dict[str, Tally], Counter[str], int]:
    """Run the redactor's analyzer on every row and tally spans per entity type."""
    tallies: dict[str, Tally] = {label: Tally() for label in sorted(set(LABEL_MAP.values()))}
    extra: Counter[str] = Counter()
    false_pos_rows = 0
    shown = 0
    for row in rows:
        text = row["text"]
        gold = [(LABEL_MAP[s["label"]], (s["start"], s["end"])) for s in row["spans"] if s["label"] in LABEL_MAP]
        preds = [(r.entity_type, (r.start, r.end)) for r in resolve_overlaps(redactor.analyze(text))]
        if not gold and preds:
            false_pos_rows += 1
        for label, span in gold:
            tally = tallies[label]
            tally.gold += 1
            hit = any(p_label == label and _overlaps(span, p_span) for p_label, p_span in preds)
            tally.recalled += hit
            tally.exact += any(p_label == label and p_span == span for p_label, p_span in preds)
            if not hit and shown < show_errors:
                shown += 1
                print(f"  MISS {label}: {text[span[0]:span[1]]!r} in {text[:160]!r}")
        for label, span in preds:
            if label not in tallies:
                extra[label] += 1
                continue
            tally = tallies[label]
            tally.predicted += 1
            ok = any(g_label == label and _overlaps(span, g_span) for g_label, g_span in gold)
            tally.precise += ok
            if not ok and shown < show_errors:
                shown += 1
                print(f"  FP   {label}: {text[span[0]:span[1]]!r} in {text[:160]!r}")
    return tallies, extra, false_pos_rows


def report(tallies: dict[str, Tally], extra: Counter[str], false_pos_rows: int, empty_rows: int) -> float:
    """Print the per-entity table and return overall F2 (micro-averaged over the evaluated types)."""
    print(f"{'entity':<15}{'gold':>6}{'pred':>6}{'P':>7}{'R':>7}{'R_exact':>9}{'F2':>7}")
    for label, t in tallies.items():
        mark = "  target R>=0.95" if label in TARGETS else ""
        print(f"{label:<15}{t.gold:>6}{t.predicted:>6}{t.precision():>7.3f}{t.recall():>7.3f}"
              f"{(t.exact / t.gold if t.gold else 1.0):>9.3f}{f_beta(t.precision(), t.recall()):>7.3f}{mark}")
    gold = sum(t.gold for t in tallies.values())
    predicted = sum(t.predicted for t in tallies.values())
    precision = sum(t.precise for t in tallies.values()) / predicted if predicted else 1.0
    recall = sum(t.recalled for t in tallies.values()) / gold if gold else 1.0
    overall = f_beta(precision, recall)
    print(f"{'OVERALL':<15}{gold:>6}{predicted:>6}{precision:>7.3f}{recall:>7.3f}{'':>9}{overall:>7.3f}")
    print(f"predictions of types without gold labels (not scored): {dict(extra)}")
    print(f"rows with no PII that got a prediction: {false_pos_rows}/{empty_rows}")
    return overall


def redactor_for(model: Path, name_rules: bool = True, person_bias: float = 0.0) -> PiiRedactor:
    """The redactor over a NER model, optionally without the name rules or with a lower bar for names."""
    redactor = PiiRedactor(model)
    if not name_rules:
        redactor._analyzer.registry.remove_recognizer(NAME_RULES)  # noqa: SLF001 - a benchmark switch
    if person_bias:
        from bench.train_pii_ner import favour_person  # noqa: PLC0415 - the trainer imports this module

        favour_person(redactor._analyzer.nlp_engine.nlp[LANGUAGE], person_bias)  # noqa: SLF001
    return redactor


def main(argv: list[str] | None = None) -> int:
    """Evaluate and print; exits 0 whatever the figures (a benchmark, not a test)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--split", choices=("eval", "train"), default="eval")
    parser.add_argument("--fold", type=int, choices=range(FOLDS), help="train only: score this fold of templates")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--model", type=Path, default=PII_NER_PATH, help="NER model directory (default: shipped)")
    parser.add_argument("--without-name-rules", action="store_true", help="drop guard/pii_rules.py's name rules")
    parser.add_argument("--person-bias", type=float, default=0.0, help="added to the model's PERSON-opening actions")
    parser.add_argument("--show-errors", type=int, default=0)
    args = parser.parse_args(argv)
    if args.fold is not None and args.split != "train":
        parser.error("--fold picks train templates: use it with --split train")
    rows = load(args.data, args.split, args.fold)
    started = time.perf_counter()
    redactor = redactor_for(args.model, not args.without_name_rules, args.person_bias)
    tallies, extra, false_pos_rows = score(rows, redactor, args.show_errors)
    elapsed = time.perf_counter() - started
    fold = "" if args.fold is None else f" fold {args.fold}/{FOLDS}"
    options = " without name rules" if args.without_name_rules else ""
    options += f" person bias {args.person_bias:+g}" if args.person_bias else ""
    print(f"presidio_synth_pii {args.data.name}, split={args.split}{fold}{options}: {len(rows)} rows in {elapsed:.1f}s")
    empty_rows = sum(1 for row in rows if not any(s["label"] in LABEL_MAP for s in row["spans"]))
    report(tallies, extra, false_pos_rows, empty_rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
