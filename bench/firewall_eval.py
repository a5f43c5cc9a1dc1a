"""Prompt-firewall figures on the EVAL split of ../shared/eval (the weights never saw these rows).

Prints: ROC-AUC (attacks vs pooled benign), TPR at the threshold giving <= 1% FPR on the pooled benign eval rows,
the same at the shipped threshold (fixed on train), per source and category, harmful requests separately, the
retrieved-text scanner on BIPIA documents by injection position, and latency per prompt.
    .venv/bin/python -m bench.firewall_eval
"""

from __future__ import annotations

import os
import statistics
import time
from collections import defaultdict

import numpy as np
from sklearn.metrics import roc_auc_score

from bench.eval_data import ATTACK, BENIGN, HARMFUL, Row, bipia_documents, prompt_rows
from bench.train_firewall import threshold_at_fpr
from guard.firewall import FirewallModel, get_firewall
from guard.injection import get_scanner


def _grouped(rows: list[Row], detected: np.ndarray, key: str) -> dict[str, tuple[int, int]]:
    groups: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for row, hit in zip(rows, detected, strict=True):
        name = getattr(row, key)
        groups[name][0] += int(hit)
        groups[name][1] += 1
    return {name: (hits, total) for name, (hits, total) in sorted(groups.items())}


def _print_groups(title: str, groups: dict[str, tuple[int, int]]) -> None:
    print(title)
    for name, (hits, total) in groups.items():
        print(f"  {name:<48} {hits:>4}/{total:<4} = {hits / total:.3f}")


def _prompts(model: FirewallModel) -> None:
    rows = [r for r in prompt_rows() if r.split == "eval"]
    scores, _ = model.scores([r.text for r in rows])
    labels = np.array([r.label for r in rows])
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
        _print_groups(" benign false positives, by source:",
                      _grouped([r for r in rows if r.label == BENIGN], detected[benign], "source"))
        _print_groups(" harmful requests (not injections) flagged, by source:",
                      _grouped([r for r in rows if r.label == HARMFUL], detected[harmful], "source"))


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


def _latency() -> None:
    """Wall time and this thread's CPU time per prompt (CPU time is what other load on the machine cannot inflate)."""
    firewall = get_firewall()
    rows = [r for r in prompt_rows() if r.split == "eval"][:600]
    firewall.inspect("warm up")
    wall, cpu = [], []
    for row in rows:
        started, started_cpu = time.perf_counter(), time.thread_time()
        firewall.inspect(row.text)
        wall.append((time.perf_counter() - started) * 1000)
        cpu.append((time.thread_time() - started_cpu) * 1000)
    print(f"\nlatency per prompt over {len(rows)} eval prompts (one at a time, this CPU, load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores):")
    for name, timings in (("wall", sorted(wall)), ("cpu ", sorted(cpu))):
        print(f"  {name} median {statistics.median(timings):.2f} ms, p95 {timings[int(0.95 * len(timings))]:.2f} ms, "
              f"max {timings[-1]:.2f} ms")


def main() -> int:
    """Print every figure."""
    _prompts(get_firewall().model)
    _documents()
    _latency()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
