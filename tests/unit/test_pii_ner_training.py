"""The PII NER's lower bar for names (bench/train_pii_ner.py) and the benchmark's switches (bench/pii_eval.py)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np

from bench.pii_eval import NAME_RULES, redactor_for
from bench.train_pii_ner import PERSON_START_ACTIONS, favour_person
from guard.pii import PII_NER_PATH, load_ner_pipeline


def test_favour_person_raises_only_the_actions_that_open_a_name() -> None:
    nlp = load_ner_pipeline(PII_NER_PATH)
    ner = nlp.get_pipe("ner")
    before = ner.model.get_ref("upper").get_param("b").copy()
    favour_person(nlp, 1.5)
    shift = ner.model.get_ref("upper").get_param("b") - before
    raised = np.flatnonzero(shift)
    assert {ner.move_names[i] for i in raised} == set(PERSON_START_ACTIONS)
    assert np.allclose(shift[raised], 1.5)


def test_the_benchmark_scores_with_or_without_the_name_rules() -> None:
    def names(name_rules: bool) -> set[str]:
        registry = redactor_for(PII_NER_PATH, name_rules=name_rules)._analyzer.registry  # noqa: SLF001
        return {recognizer.name for recognizer in registry.recognizers}

    assert NAME_RULES in names(True)
    assert NAME_RULES not in names(False)
