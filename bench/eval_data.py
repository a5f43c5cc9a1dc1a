"""The prompt-attack corpora of ../shared/eval with the README's train/eval split (used only by bench scripts)."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from guard.eval_corpora import EVAL_DIR, split_of

ATTACK, BENIGN, HARMFUL = 1, 0, 2


@dataclass(frozen=True)
class Row:
    """One prompt: its text, its label (attack / benign / harmful request), source, category and split; `goal`: the
    harmful behaviour a JailbreakBench row pursues (its attack's goal, or a behaviour's own text), else empty."""

    text: str
    label: int
    source: str
    category: str
    split: str
    goal: str = ""


def _jsonl(path: Path) -> Iterator[dict[str, object]]:
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                yield json.loads(line)


def _row(text: str, label: int, source: str, category: str, split: str | None = None, goal: str = "") -> Row:
    return Row(text=text, label=label, source=source, category=category, split=split or split_of(text), goal=goal)


def _jailbreakbench() -> Iterator[Row]:
    folder = EVAL_DIR / "jailbreakbench_artifacts"
    for item in _jsonl(folder / "jbb_attack_prompts.jsonl"):
        yield _row(str(item["text"]), ATTACK, "jailbreakbench", f"jailbreak/{item['method']}", goal=str(item["goal"]))
    for item in _jsonl(folder / "jbb_harmful_behaviors.jsonl"):
        goal = str(item["goal"])
        yield _row(goal, HARMFUL, "jbb_behaviors", f"harmful/{item['category']}", goal=goal)


def _pallms() -> Iterator[Row]:
    for name, category in (("promptinjection.txt", "injection"), ("jailbreak.txt", "jailbreak")):
        for line in (EVAL_DIR / "pallms_payloads" / name).read_text(encoding="utf-8").splitlines():
            if line.strip():
                yield _row(line.strip(), ATTACK, "pallms", f"{category}/pallms")


def _injecguard() -> Iterator[Row]:
    folder = EVAL_DIR / "injecguard_notinject"
    for item in _jsonl(folder / "notinject_wildguard_benign.jsonl"):
        yield _row(str(item["text"]), BENIGN, "notinject_wildguard", str(item["category"]))
    for item in _jsonl(folder / "injecguard_valid_mixed.jsonl"):
        label = ATTACK if int(item["label"]) == 1 else BENIGN  # type: ignore[call-overload]
        yield _row(str(item["text"]), label, "injecguard_valid", str(item["subset"]))


def _alpaca() -> Iterator[Row]:
    for item in _jsonl(EVAL_DIR / "alpaca_eval_instructions" / "alpaca_eval_instructions.jsonl"):
        yield _row(str(item["text"]), BENIGN, "alpaca_eval", f"benign/{item['dataset']}")


def _xstest() -> Iterator[Row]:
    with (EVAL_DIR / "xstest" / "xstest_prompts.csv").open(encoding="utf-8", newline="") as fh:
        for item in csv.DictReader(fh):
            label = BENIGN if item["label"] == "safe" else HARMFUL
            yield _row(item["prompt"], label, "xstest", f"{item['label']}/{item['type']}", split="eval")


def _giskard() -> Iterator[Row]:
    with (EVAL_DIR / "giskard_prompt_injections" / "prompt_injections.csv").open(encoding="utf-8", newline="") as fh:
        for item in csv.DictReader(fh):
            yield _row(item["prompt"], ATTACK, "giskard", f"injection/{item['group']}", split="eval")


def prompt_rows() -> list[Row]:
    """Every question-level row, de-duplicated on (text, label); BIPIA documents are separate."""
    seen: set[tuple[str, int]] = set()
    rows: list[Row] = []
    for loader in (_jailbreakbench, _pallms, _injecguard, _alpaca, _xstest, _giskard):
        for row in loader():
            if row.text.strip() and (row.text, row.label) not in seen:
                seen.add((row.text, row.label))
                rows.append(row)
    return rows


def bipia_documents() -> list[Row]:
    """BIPIA contexts: clean (label 0) and with one injected instruction (label 1, category = position)."""
    rows = []
    for item in _jsonl(EVAL_DIR / "bipia_indirect_injection" / "bipia_docs_labelled.jsonl"):
        label = int(item["label"])  # type: ignore[call-overload]
        category = str(item["position"]) if label else "clean"
        rows.append(_row(str(item["text"]), label, f"bipia/{item['task']}", category))
    return rows
