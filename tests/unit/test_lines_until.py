"""`tests.support.polling.lines_until`, how a test waits for the line a process of its own prints at the step it is to
be interrupted at (`stopped`, `running`): a process that never prints it fails the test with what it printed, never
hangs the suite (a change taking the step away, say)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support.polling import lines_until


def _python(code: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,  # noqa: S603 (the test's own code)
                            stderr=subprocess.PIPE, text=True)


def test_the_lines_up_to_the_one_waited_for_and_nothing_after_it() -> None:
    process = _python("import sys; print('migrated', 'stopped', 'after', sep='\\n'); print('bye', file=sys.stderr)")
    assert lines_until(process, "stopped") == ["migrated", "stopped"]
    assert process.communicate(timeout=60) == ("after\n", "bye\n") and process.returncode == 0


def test_a_process_that_never_prints_the_line_is_killed_and_fails_the_test_with_what_it_printed() -> None:
    process = _python("import sys, time; print('imported'); print('a warning', file=sys.stderr, flush=True); "
                      "sys.stdout.flush(); time.sleep(600)")
    with pytest.raises(AssertionError) as failed:
        lines_until(process, "stopped", timeout=1)
    assert str(failed.value) == ("the process printed no 'stopped' line in 1 s (killed); the end of what it printed:\n"
                                 "imported\na warning\n")
    assert process.returncode == -9


def test_a_process_that_ends_without_the_line_fails_the_test_with_its_exit_code_and_error() -> None:
    process = _python("import sys; print('imported'); sys.exit('govrag: cannot start')")
    with pytest.raises(AssertionError) as failed:
        lines_until(process, "stopped")
    assert str(failed.value) == ("the process ended (exit 1) without a 'stopped' line; the end of what it printed:\n"
                                 "imported\ngovrag: cannot start\n")


def test_a_process_that_closes_its_output_without_the_line_and_runs_on_is_killed() -> None:
    """Its output closed mid-line (no newline ever comes) while it goes on: the read ends at once, and the process,
    which would hold the test until its own end, is given `timeout` to end, then killed."""
    process = _python("import os, sys, time; sys.stdout.write('half a line'); sys.stdout.flush(); os.close(1); "
                      "time.sleep(600)")
    with pytest.raises(AssertionError) as failed:
        lines_until(process, "stopped", timeout=1)
    assert str(failed.value) == ("the process closed its output without a 'stopped' line and did not end in 1 s "
                                 "(killed); the end of what it printed:\nhalf a line\n")
    assert process.returncode == -9


def test_a_process_started_for_bytes_is_read_as_one_started_for_text() -> None:
    process = subprocess.Popen([sys.executable, "-c", "import sys; print('ready'); sys.exit('no')"],  # noqa: S603
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert lines_until(process, "ready") == ["ready"]
    assert process.communicate(timeout=60) == (b"", b"no\n")
    process = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit('no')"],  # noqa: S603
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    with pytest.raises(AssertionError, match="ended \\(exit 1\\) without a 'ready' line; the end of what it printed:"
                                             "\nno\n$"):
        lines_until(process, "ready")
