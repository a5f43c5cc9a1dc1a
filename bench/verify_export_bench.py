"""`govrag audit verify-export` benchmark: time and peak memory of checking an export file, valid or hostile.

    .venv/bin/python -m bench.verify_export_bench [--rows 100000]

Needs no database: the exports are rendered from synthetic rows (bench.audit_bench's) with a throw-away checkpoint
key, then checked by audit.export.check_export, each case in a subprocess of its own. Memory is the subprocess's
peak resident set (VmHWM) above what it held before the check, the peak reset first (/proc/self/clear_refs): what
the check itself took, the interpreter and imports left out. Cases: valid exports of --rows rows (JSONL, CSV, OCSF);
a 39 MiB line of empty JSON objects in place of a row; the same line swapped in by a file served signed on its first
read and hostile on any later one (what a file a writer rewrites can do between two reads); a 39 MiB row holding
one 4-byte character, and a row of 4-byte characters alone. Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

_KEY = bytes(range(32))
_HOSTILE_LINE = 39 * 1024 * 1024
_MIB = 1024 * 1024


def _rows(count: int) -> Iterator[dict[str, Any]]:
    from audit.integrity import event_hash, plain
    from audit.schemas import EXPORT_FIELDS
    from bench.audit_bench import _synthetic

    rng, start = random.Random(7), datetime(2026, 1, 1, tzinfo=UTC)
    for n in range(1, count + 1):
        event = _synthetic(n, start, rng)
        event.prev_hash = "0" * 64
        row = {name: plain(getattr(event, name)) for name in EXPORT_FIELDS}
        row["hash"] = event_hash(SimpleNamespace(**row))
        yield row


def _write(path: Path, rows: Iterator[dict[str, Any]], fmt: str) -> Path:
    from audit import export
    from audit.integrity import Signer
    from audit.schemas import ExportFilters, ExportFormat

    with path.open("w", encoding="utf-8") as out:
        out.writelines(export.render(rows, ExportFormat(fmt), filters=ExportFilters(), through_id=1 << 40,
                                     departments=None, signer=Signer(_KEY, "bench")))
    return path


def _replaced(path: Path, line_number: int, line: bytes, name: str) -> Path:
    """The export with its line `line_number` (1-based) replaced, the manifest kept (so the body is not the one
    signed), written to `name` beside it."""
    lines = path.read_bytes().split(b"\n")
    lines[line_number - 1] = line
    edited = path.with_name(name)
    edited.write_bytes(b"\n".join(lines))
    return edited


class _SwappedAfterItsFirstRead(io.BufferedReader):
    """An export file served as signed on its first read from the start, and as `swapped` (another file of the same
    length) from any later one: a file another machine rewrites between two reads."""

    def __init__(self, path: Path, swapped: Path) -> None:
        super().__init__(io.FileIO(path, "rb"))
        self.swapped, self.reads_from_start = swapped, 0

    def seek(self, offset: int, whence: int = os.SEEK_SET, /) -> int:
        if (offset, whence) == (0, os.SEEK_SET):
            self.reads_from_start += 1
            if self.reads_from_start == 2:
                swapped = os.open(self.swapped, os.O_RDONLY)
                os.dup2(swapped, self.raw.fileno())
                os.close(swapped)
        return super().seek(offset, whence)


def _swapped(valid: Path) -> Path:
    """`valid` with its rows from the second on, 39 MiB of them, made one line of empty JSON objects as long."""
    lines = valid.read_bytes().split(b"\n")
    length, last = -1, 1
    while length < _HOSTILE_LINE:
        length, last = length + len(lines[last]) + 1, last + 1
    start, end = b'{"id": 2, "x": [', b"{}]}"
    filler = b"{}," * ((length - len(start) - len(end)) // 3)
    hostile = start + filler + b" " * (length - len(start) - len(end) - len(filler)) + end
    swapped = valid.with_name(f"swapped-{valid.name}")
    swapped.write_bytes(b"\n".join([lines[0], hostile, *lines[last:]]))
    assert swapped.stat().st_size == valid.stat().st_size
    return swapped


def _build(folder: Path, rows: int) -> dict[str, tuple[str, str]]:
    """Each case: (the file checked, the file swapped in after its first read, or '')."""
    cases = {f"valid {fmt} ({rows:,} rows)": (str(_write(folder / f"valid.{fmt}", _rows(rows), fmt)), "")
             for fmt in ("jsonl", "csv", "ocsf")}
    small = _write(folder / "small.jsonl", _rows(3), "jsonl")
    second = json.loads(small.read_bytes().split(b"\n")[1])
    objects = _replaced(small, 2, b'{"id": 2, "x": [' + b"{}," * (_HOSTILE_LINE // 3) + b"{}]}",
                        "objects.jsonl")
    cases["39 MiB line of empty objects"] = (str(objects), "")
    valid = Path(cases[f"valid jsonl ({rows:,} rows)"][0])
    if valid.stat().st_size > _HOSTILE_LINE + _MIB:  # rows enough to make the line of (some 28,000)
        cases["39 MiB line swapped in after the first read"] = (str(valid), str(_swapped(valid)))
    else:
        print(f"  (no line swapped in after the first read: {rows:,} rows are fewer than 39 MiB)")
    padding = _HOSTILE_LINE - len(json.dumps(second))
    one_wide = _replaced(small, 2, json.dumps(second | {"x": "a" * padding + "\U0001F600"},
                                              ensure_ascii=False).encode(), "one-wide.jsonl")
    cases["39 MiB row, ASCII but one 4-byte character"] = (str(one_wide), "")
    all_wide = _replaced(small, 2, json.dumps(second | {"x": "\U0001F600" * (padding // 4)},
                                              ensure_ascii=False).encode(), "all-wide.jsonl")
    cases["39 MiB row of 4-byte characters"] = (str(all_wide), "")
    return cases


def _status(field: str) -> int:
    """A /proc/self/status figure, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise LookupError(field)


def _check(path: str, swapped: str) -> None:
    """In the subprocess: check the file, print the outcome, seconds and peak memory above the start, as JSON."""
    from audit import export
    from audit.integrity import Signer

    opened = _SwappedAfterItsFirstRead(Path(path), Path(swapped)) if swapped else Path(path).open("rb")
    with opened as export_file:
        Path("/proc/self/clear_refs").write_text("5")  # the peak resident set reset to what is held now
        before, started, cpu = _status("VmRSS"), time.perf_counter(), time.process_time()
        checked = export.check_export(export_file, by=Signer(_KEY, "bench"), deployment_id="bench")
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    print(json.dumps({"ok": checked.ok, "reason": checked.reason, "line": checked.line, "seconds": seconds,
                      "cpu": cpu, "peak": _status("VmHWM") - before}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--check", nargs=2, metavar=("FILE", "SWAPPED"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.check:
        _check(*args.check)
        return
    with tempfile.TemporaryDirectory() as tmp:
        for name, (path, swapped) in _build(Path(tmp), args.rows).items():
            ran = subprocess.run([sys.executable, "-m", "bench.verify_export_bench", "--check", path, swapped],  # noqa: S603
                                 check=True, capture_output=True, text=True)
            out = json.loads(ran.stdout)
            print(f"  {name}: ok={out['ok']} reason={out['reason']} line={out['line']} in {out['seconds']:.2f} s "
                  f"({out['cpu']:.2f} s CPU), "
                  f"peak {out['peak'] / _MIB:,.0f} MiB above the start ({Path(path).stat().st_size / _MIB:,.1f} "
                  "MiB file)")


if __name__ == "__main__":
    main()
