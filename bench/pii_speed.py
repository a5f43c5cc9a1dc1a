"""PII redaction speed: ms per short question (`redact`, the query path) and per ~1k-char memo chunk
(`redact_many`, the ingestion path), on generated text shaped like bench/ingest.py's memos. Times are CPU time of
this process (steadier than wall time on a shared machine).

Usage: nice -n 15 .venv/bin/python bench/pii_speed.py [--rounds N]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from guard.pii import PlaceholderMap, get_redactor  # noqa: E402

CHUNK_CHARS = 1000
NAMES = ["Maria Gonzalez", "Liam O'Brien", "Aiko Tanaka", "Samuel Okafor", "Elena Petrova", "Jonas Berg"]
TOPICS = ["travel policy", "expense claims", "onboarding", "security training", "parental leave", "procurement"]
QUESTIONS = [
    "What is the travel policy for contractors?",
    "How many days of parental leave do I get?",
    "Who approves expense claims above 500 euros?",
    "Can Maria Gonzalez sign off my onboarding checklist?",
    "When is the next security training session?",
    "What changed in the procurement rules this quarter?",
    "Is my card 4111 1111 1111 1111 still on file for travel bookings?",
    "Please call me back on +44 20 7946 0123 about my claim.",
    "Where do I send questions about team 12's onboarding?",
    "Summarise the expense policy for remote staff.",
]


def memo_chunks(count: int, seed: int = 7) -> list[str]:
    """~1k-char chunks of memo-like text with names, e-mails and phone numbers (as bench/ingest.py makes)."""
    rng = random.Random(seed)
    chunks: list[str] = []
    for n in range(count):
        topic, person = rng.choice(TOPICS), rng.choice(NAMES)
        email = person.lower().replace(" ", ".").replace("'", "") + "@example.com"
        text = f"# {topic.title()} update {n}\n\nOwner: {person}, {email}, +44 20 7946 {rng.randint(1000, 9999)}\n\n"
        text += " ".join(
            f"The {topic} rules for team {rng.randint(1, 40)} change on day {rng.randint(1, 28)}; "
            f"questions go to {rng.choice(NAMES)} before the quarterly review." for _ in range(9))
        chunks.append(text[:CHUNK_CHARS])
    return chunks


def time_questions(rounds: int) -> float:
    """Median ms per `redact(question)` call."""
    redactor = get_redactor()
    samples = []
    for _ in range(rounds):
        for question in QUESTIONS:
            started = time.process_time()
            redactor.redact(question)
            samples.append((time.process_time() - started) * 1000)
    return statistics.median(samples)


def time_chunks(rounds: int, per_doc: int = 8) -> float:
    """Best-of-rounds ms per 1k-char chunk through `redact_many` (documents of `per_doc` chunks)."""
    redactor = get_redactor()
    chunks = memo_chunks(per_doc * 8)
    best = float("inf")
    for _ in range(rounds):
        started = time.process_time()
        for at in range(0, len(chunks), per_doc):
            redactor.redact_many(chunks[at : at + per_doc], PlaceholderMap())
        best = min(best, (time.process_time() - started) * 1000 / len(chunks))
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    redactor = get_redactor()
    redactor.redact_many(memo_chunks(4), PlaceholderMap())  # warm up
    redactor.redact(QUESTIONS[0])
    print(f"short question: {time_questions(args.rounds):.2f} ms (median of {args.rounds * len(QUESTIONS)})")
    print(f"1k-char memo chunk via redact_many: {time_chunks(args.rounds):.2f} ms (best of {args.rounds})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
