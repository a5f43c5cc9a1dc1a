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
