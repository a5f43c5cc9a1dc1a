"""`core.logs.SaidOnChange`: a recurring check's problem logged as it changes, from threads telling at once."""

from __future__ import annotations

import logging
import threading

from core.logs import SaidOnChange


class _Kept(logging.Handler):
    """Keeps each line as it is written."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


class _Stalled(logging.Filter):
    """Holds the first WARNING on its way to the handlers until `go_on` is set: a thread preempted between deciding to
    log a line and writing it (a filter runs before any handler's lock is taken)."""

    def __init__(self) -> None:
        super().__init__()
        self.stalled, self.go_on = threading.Event(), threading.Event()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.WARNING and not self.stalled.is_set():
            self.stalled.set()
            self.go_on.wait(timeout=60)
        return True


def test_the_last_line_says_the_answer_kept_when_threads_tell_at_once() -> None:
    """/readyz runs in uvicorn's thread pool: one probe found the broker down and was about to log it when the next
    found everything up. The answer was kept under the lock and the line written after it, so "ready again" could be
    written first and "not ready" last, while the API was ready: the log said not ready until its next change. The
    lines are now written in the order the answers were kept."""
    logger = logging.getLogger("tests.said_on_change")
    handler, stall = _Kept(), _Stalled()
    logger.addHandler(handler)
    logger.addFilter(stall)
    logger.setLevel(logging.INFO)
    said = SaidOnChange(logger, "not ready: %s %s", "%s ok again")
    try:
        down = threading.Thread(target=said.tell, args=({"broker": "down"},))
        down.start()
        assert stall.stalled.wait(timeout=60)
        up = threading.Thread(target=said.tell, args=({},))
        up.start()
        up.join(timeout=1)  # done at once when it need not wait for the line under way (the old code)
        stall.go_on.set()
        down.join()
        up.join()
        said.tell({})  # the same answer: nothing more
    finally:
        logger.removeHandler(handler)
        logger.removeFilter(stall)
    assert handler.lines == ["not ready: broker down", "broker ok again"]
