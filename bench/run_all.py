"""`make bench`: run every benchmark and evaluation, and write their printed figures to bench/RESULTS.md."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ROOT, machine  # noqa: E402

# (script, arguments); each prints Markdown. Scripts that are missing are reported, not skipped silently.
BENCHMARKS: list[tuple[str, list[str]]] = [
    ("bench/query.py", ["--chunks", "10000", "--requests", "200", "--soak-seconds", "120"]),
    ("bench/retrieval_quality.py", []),
    ("bench/answer_quality.py", []),
    ("bench/ingest.py", []),
    ("bench/pii_eval.py", []),
    ("bench/firewall_eval.py", []),
    ("bench/authz_bench.py", []),
    ("bench/audit_bench.py", []),
]


def main() -> int:
    """Run each benchmark in turn; a failing one is recorded with its exit code and the rest still run."""
    sections = [f"# govrag benchmark results\n\n{machine()}\n"]
    failures = 0
    for script, arguments in BENCHMARKS:
        started = time.perf_counter()
        if not (ROOT / script).exists():
            sections.append(f"## {script}\n\nnot present in this checkout.\n")
            continue
        module = script.removesuffix(".py").replace("/", ".")
        run = subprocess.run([sys.executable, "-m", module, *arguments], cwd=ROOT, capture_output=True,  # noqa: S603
                             text=True, check=False)
        took = time.perf_counter() - started
        status = "" if run.returncode == 0 else f" — FAILED with exit code {run.returncode}"
        failures += run.returncode != 0
        sections.append(f"## {script} ({took:.0f} s{status})\n\n{run.stdout.strip()}\n")
        print(f"{script}: {took:.0f} s{status}", flush=True)
    (ROOT / "bench" / "RESULTS.md").write_text("\n".join(sections))
    print("wrote bench/RESULTS.md")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
