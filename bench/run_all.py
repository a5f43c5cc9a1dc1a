"""`make bench`: run every benchmark and evaluation, and write their printed figures to bench/RESULTS.md.

`--only bench/ingest.py ...` re-runs those and replaces just their sections; the header then says which sections
were taken when (every section also names its own machine, date and commit where the script prints them).
"""

from __future__ import annotations

import argparse
import re
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
    ("bench/dispatch.py", ["--runs", "1", "--jobs", "2000"]),
    ("bench/pii_eval.py", []),
    ("bench/firewall_eval.py", []),
    ("bench/authz_bench.py", []),
    ("bench/audit_bench.py", []),
    ("bench/verify_export_bench.py", ["--rows", "2000"]),  # its 39 MiB hostile lines are the same at any row count
    ("bench/sqlite_plans.py", ["--both"]),  # the embedded SQLite, then PostgreSQL
]


def main(argv: list[str] | None = None) -> int:
    """Run each chosen benchmark in turn; a failing one is recorded with its exit code and the rest still run."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", nargs="+", choices=[script for script, _ in BENCHMARKS],
                        help="re-run these and keep the other sections of bench/RESULTS.md")
    args = parser.parse_args(argv)
    results = ROOT / "bench" / "RESULTS.md"
    chosen = [(s, a) for s, a in BENCHMARKS if args.only is None or s in args.only]
    fresh = dict(_run(script, arguments) for script, arguments in chosen)
    if args.only is None:
        header = f"# govrag benchmark results\n\n{machine()}\n"
        sections = [fresh[script] for script, _ in BENCHMARKS]
    else:
        header, kept = _read_sections(results.read_text())
        header = header.rstrip("\n") + f"\n\nRe-run with --only ({', '.join(args.only)}): {machine()}\n"
        sections = [fresh.get(script) or kept.get(script, f"## {script}\n\nnot run yet.\n") for script, _ in BENCHMARKS]
    results.write_text("\n".join([header, *sections]))
    print("wrote bench/RESULTS.md")
    return 1 if any(" — FAILED" in fresh[script].splitlines()[0] for script in fresh) else 0


def _run(script: str, arguments: list[str]) -> tuple[str, str]:
    """The script's section: its printed Markdown under a heading with the time it took (and any failure)."""
    if not (ROOT / script).exists():
        return script, f"## {script}\n\nnot present in this checkout.\n"
    started = time.perf_counter()
    module = script.removesuffix(".py").replace("/", ".")
    run = subprocess.run([sys.executable, "-m", module, *arguments], cwd=ROOT, capture_output=True,  # noqa: S603
                         text=True, check=False)
    took = time.perf_counter() - started
    status = "" if run.returncode == 0 else f" — FAILED with exit code {run.returncode}"
    print(f"{script}: {took:.0f} s{status}", flush=True)
    return script, f"## {script} ({took:.0f} s{status})\n\n{run.stdout.strip()}\n"


def _read_sections(text: str) -> tuple[str, dict[str, str]]:
    """The header and each `## bench/x.py (...)` section of an existing RESULTS.md, by script."""
    parts = re.split(r"^(?=## bench/)", text, flags=re.MULTILINE)
    sections = {}
    for part in parts[1:]:
        script = part.split()[1]
        sections[script] = part.rstrip("\n") + "\n"
    return parts[0], sections


if __name__ == "__main__":
    sys.exit(main())
