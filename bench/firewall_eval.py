"""Prompt-firewall figures on the EVAL split of ../shared/eval (the weights never saw these rows).

Prints: ROC-AUC (attacks vs pooled benign), TPR at the threshold giving <= 1% FPR on the pooled benign eval rows,
the same at the shipped threshold (fixed on train), per source and category (and JailbreakBench attacks by whether
their goal is one a train row names: those goals are in the harmful bank), harmful requests separately, the
retrieved-text scanner on BIPIA documents by injection position, and latency per prompt: the firewall's own cost
given the question's sentence embedding (what it adds to the query path, which embeds the question for retrieval
anyway) and, apart, the cost of that embedding; and the output guard's withholding checks (canary readings and
system-prompt echo, one decoding per answer) over the same prompts read as answers.
    .venv/bin/python -m bench.firewall_eval
"""

from __future__ import annotations

import os
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from operator import attrgetter

import numpy as np
from sklearn.metrics import roc_auc_score

from bench.eval_data import ATTACK, BENIGN, HARMFUL, Row, bipia_documents, prompt_rows
from bench.train_firewall import threshold_at_fpr
from guard.firewall import FirewallModel, get_firewall, question_vectors
from guard.injection import get_scanner
from guard.output import withholding


def _grouped(rows: list[Row], detected: np.ndarray, key: str | Callable[[Row], str]) -> dict[str, tuple[int, int]]:
    """(hits, total) per group: the rows' `key` attribute, or what `key(row)` names (rows it names "" are left out)."""
    name_of = key if callable(key) else attrgetter(key)
    groups: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for row, hit in zip(rows, detected, strict=True):
        name = name_of(row)
        if not name:
            continue
        groups[name][0] += int(hit)
        groups[name][1] += 1
    return {name: (hits, total) for name, (hits, total) in sorted(groups.items())}


def _print_groups(title: str, groups: dict[str, tuple[int, int]]) -> None:
    print(title)
    for name, (hits, total) in groups.items():
        print(f"  {name:<48} {hits:>4}/{total:<4} = {hits / total:.3f}")


def _prompts(model: FirewallModel) -> None:
    rows = [r for r in prompt_rows() if r.split == "eval"]
    texts = [r.text for r in rows]
    scores, _ = model.scores(texts, question_vectors(texts) if model.uses_embedding else None)
    labels = np.array([r.label for r in rows])
    train_goals = {r.goal for r in prompt_rows() if r.split == "train" and r.goal}
    attack, benign, harmful = labels == ATTACK, labels == BENIGN, labels == HARMFUL
    auc = roc_auc_score(attack[attack | benign], scores[attack | benign])
    at_fpr = threshold_at_fpr(scores[benign])
    print(f"eval rows: {attack.sum()} attacks, {benign.sum()} benign, {harmful.sum()} harmful requests")
    print(f"ROC-AUC (attacks vs pooled benign): {auc:.4f}")
    for name, threshold in (("threshold at <=1% FPR on pooled benign eval", at_fpr),
                            ("shipped threshold (fixed on train)", model.threshold)):
        detected = scores >= threshold
        print(f"\n{name} = {threshold:.4f}: TPR {detected[attack].mean():.4f}, FPR {detected[benign].mean():.4f}, "
              f"harmful requests flagged {detected[harmful].mean():.4f}")
        attack_rows = [r for r in rows if r.label == ATTACK]
        _print_groups(" attacks detected, by source:", _grouped(attack_rows, detected[attack], "source"))
        _print_groups(" attacks detected, by category:", _grouped(attack_rows, detected[attack], "category"))
        by_goal = _grouped(attack_rows, detected[attack], lambda row: _goal_seen(row, train_goals))
        _print_groups(" JailbreakBench attacks, by whether a train row names their goal (the harmful bank holds "
                      "those goals):", by_goal)
        _print_groups(" benign false positives, by source:",
                      _grouped([r for r in rows if r.label == BENIGN], detected[benign], "source"))
        _print_groups(" harmful requests (not injections) flagged, by source:",
                      _grouped([r for r in rows if r.label == HARMFUL], detected[harmful], "source"))


def _goal_seen(row: Row, train_goals: set[str]) -> str:
    if not row.goal:
        return ""
    return "goal named by a train row" if row.goal in train_goals else "goal no train row names"


def _documents() -> None:
    scanner = get_scanner()
    rows = [r for r in bipia_documents() if r.split == "eval"]
    scores = np.array([scanner.score(r.text) for r in rows])
    labels = np.array([r.label for r in rows])
    print(f"\nretrieved-text scanner on BIPIA eval documents ({labels.sum()} injected, {(labels == 0).sum()} clean)")
    print(f"ROC-AUC: {roc_auc_score(labels, scores):.4f}")
    for name, threshold in (("threshold at <=1% FPR on clean eval docs", threshold_at_fpr(scores[labels == 0])),
                            ("shipped threshold", scanner.threshold)):
        detected = scores >= threshold
        print(f" {name} = {threshold:.4f}: TPR {detected[labels == 1].mean():.4f}, "
              f"FPR {detected[labels == 0].mean():.4f}")
        injected = [r for r in rows if r.label == 1]
        _print_groups("  by position:", _grouped(injected, detected[labels == 1], "category"))
        _print_groups("  by task:", _grouped(injected, detected[labels == 1], "source"))


def _timed(call: Callable[[int], object], texts: list[str],
           clock: Callable[[], float]) -> tuple[list[float], list[float]]:
    """Wall and CPU milliseconds (by `clock`) of `call(i)` for each text."""
    wall, cpu = [], []
    for index in range(len(texts)):
        started, started_cpu = time.perf_counter(), clock()
        call(index)
        wall.append((time.perf_counter() - started) * 1000)
        cpu.append((clock() - started_cpu) * 1000)
    return wall, cpu


def _print_timings(title: str, wall: list[float], cpu: list[float]) -> None:
    print(title)
    for name, timings in (("wall", sorted(wall)), ("cpu ", sorted(cpu))):
        print(f"  {name} median {statistics.median(timings):.2f} ms, p95 {timings[int(0.95 * len(timings))]:.2f} ms, "
              f"p99 {timings[int(0.99 * len(timings))]:.2f} ms, max {timings[-1]:.2f} ms")


def _latency() -> None:
    """Per prompt, one at a time: the firewall given the question's vector, and the embedding on its own.

    The firewall runs in the calling thread (its CPU time is this thread's, which other load cannot inflate); the
    embedding runs in onnxruntime's threads too, so its CPU time is the whole process's."""
    from retrieval.embeddings import get_embedder

    firewall, embedder = get_firewall(), get_embedder()
    texts = [r.text for r in prompt_rows() if r.split == "eval"][:600]
    vectors = question_vectors(texts)
    firewall.inspect("warm up", vector=vectors[0])
    print(f"\nlatency per prompt over {len(texts)} eval prompts (one at a time, this CPU, load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores):")
    _print_timings(" firewall given the question's vector (its marginal cost on the query path):",
                   *_timed(lambda i: firewall.inspect(texts[i], vector=vectors[i]), texts, time.thread_time))
    if firewall.model.uses_embedding:
        _print_timings(" question embedding alone (all-MiniLM-L6-v2, embed_one; the query path computes it for "
                       "retrieval anyway, a caller without it pays this too):",
                       *_timed(lambda i: embedder.embed_one(texts[i]), texts, time.process_time))


def _output_guard_latency() -> None:
    """Per answer, one at a time: the output guard's withholding checks (`guard.output.withholding`: the canary
    readings and the system-prompt echo check, read from one decoding of the answer), the eval prompts standing in for
    model answers (they hold the base64, rot13, look-alike and invisible-character disguises an answer might)."""
    from retrieval.prompting import HIDDEN_MARKER, SYSTEM_PROMPT

    canaries = {"finance": "CNRY-0123456789abcdef", "hr": "CNRY-5a1e7c93d04b28f6"}
    system = "\n".join([SYSTEM_PROMPT, *(HIDDEN_MARKER.format(department=d, canary=c) for d, c in canaries.items())])
    texts = [r.text for r in prompt_rows() if r.split == "eval"][:600]
    withholding("warm up", canaries=canaries, system_prompt=system)
    _print_timings(f"\noutput guard's withholding checks per answer over {len(texts)} eval prompts read as answers "
                   f"(mean {statistics.fmean(len(t) for t in texts):.0f} characters):",
                   *_timed(lambda i: withholding(texts[i], canaries=canaries, system_prompt=system), texts,
                           time.thread_time))


def main() -> int:
    """Print every figure. Latency first: the firewall caches words, and the prompts timed must find only the words
    of the prompts timed before them, not of the whole eval set scored below."""
    _latency()
    _output_guard_latency()
    _prompts(get_firewall().model)
    _documents()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
